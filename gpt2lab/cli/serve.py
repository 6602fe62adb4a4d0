"""`gpt2lab serve`: an OpenAI-compatible server for a run dir, with a chat page (gpt2lab/serve)."""

from __future__ import annotations

import argparse
import importlib.util

from gpt2lab.cli import finite_float, nonneg_int, positive_int


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port number (0-65535; 0 picks a free one)")
    return value


def _seconds(text: str) -> float:
    value = finite_float(text)
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"{text} must be a number of seconds in (0, 86400]")
    return value


def cmd_serve(args) -> int:
    if not all(importlib.util.find_spec(m) for m in ("fastapi", "uvicorn")):
        from gpt2lab.errors import UserError

        raise UserError("gpt2lab serve needs FastAPI and uvicorn: pip install 'gpt2lab[serve]'")
    from gpt2lab.serve.command import serve

    serve(args.run_dir, host=args.host, port=args.port, model_name=args.model_name, api_key=args.api_key,
          cors_origins=tuple(args.cors_origin or ()), max_batch=args.max_batch, device=args.device,
          dtype=args.dtype, max_body=args.max_body_bytes, allowed_hosts=tuple(args.allowed_host or ()),
          timeout=args.timeout, quantize=args.quantize, max_queue=args.max_queue,
          prefix_cache_mb=args.prefix_cache_mb, grace=args.grace, log_requests=not args.quiet)
    return 0


def register(sub) -> None:
    s = sub.add_parser("serve", help="serve a run over an OpenAI-compatible HTTP API, with a chat page",
                       description="Serve a run dir over HTTP: /v1/chat/completions, /v1/completions, /v1/responses "
                       "(streaming or not), /v1/models, /health, /metrics (Prometheus) and a chat page at /. "
                       "Concurrent requests share decoding steps (continuous batching); prompts that begin alike "
                       "reuse their keys and values (prefix caching); a full queue answers 429 at once. SIGTERM "
                       "or Ctrl-C stops taking requests and lets running answers finish (--grace). Needs the "
                       "extra: pip install 'gpt2lab[serve]'.")
    s.add_argument("run_dir", metavar="RUN", help="a run directory (trained, fine-tuned or imported)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                   "only; 0.0.0.0 listens everywhere, give it an --api-key)")
    s.add_argument("--port", type=_port, default=8000, help="port to listen on (default 8000; 0 picks a free one)")
    s.add_argument("--model-name", default=None, metavar="NAME",
                   help="the model's id in the API (default: the run dir's name)")
    s.add_argument("--api-key", default=None, metavar="KEY",
                   help="require `Authorization: Bearer KEY` on /v1 (default: $GPT2LAB_API_KEY if set, which "
                   "other users cannot see in `ps`; else no key)")
    s.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                   help="let web pages from this origin call the API, e.g. http://localhost:3000 (repeatable; "
                   "default: none)")
    s.add_argument("--max-batch", type=positive_int, default=32,
                   help="most sequences decoded together (default 32; 1 serves one at a time)")
    s.add_argument("--max-queue", type=nonneg_int, default=64, metavar="N",
                   help="requests that may wait for a place in the batch; past them a request gets 429 with "
                   "Retry-After at once (default 64; 0: none wait)")
    s.add_argument("--prefix-cache-mb", type=nonneg_int, default=512, metavar="MB",
                   help="memory for the keys and values of prompt beginnings that later requests reuse (a "
                   "system prompt, earlier turns of a conversation) (default 512; 0: off)")
    s.add_argument("--grace", type=_seconds, default=30.0, metavar="SECONDS",
                   help="on SIGTERM or Ctrl-C, how long running answers may take to finish before the server "
                   "exits (default 30)")
    s.add_argument("--quiet", action="store_true", help="no log line per request")
    s.add_argument("--max-body-bytes", type=positive_int, default=1 << 20, metavar="N",
                   help="largest request body accepted (default 1048576)")
    s.add_argument("--allowed-host", action="append", metavar="NAME",
                   help="a Host name the server answers to besides localhost and the address it listens on, e.g. "
                   "my-box.lan (repeatable; '*' answers to any, which lets other sites' pages in a browser reach "
                   "a server on this machine)")
    s.add_argument("--timeout", type=_seconds, default=30.0, metavar="SECONDS",
                   help="how long a client may take to send its request, or stop reading its answer, before "
                   "the request ends and its rows are freed (default 30)")
    s.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8 weights for every linear layer and the LM head: faster decoding on a CPU")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    s.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="fp32 or bf16 (default fp32)")
    s.set_defaults(func=cmd_serve)
