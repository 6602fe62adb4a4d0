"""The `gpt2lab serve` command: load the run, listen, serve until SIGTERM or Ctrl-C, then stop gracefully
(uvicorn stops accepting, running answers get --grace seconds to finish, the scheduler closes, exit 0)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path

import uvicorn

from gpt2lab.checkpoint import open_run
from gpt2lab.device import resolve_device
from gpt2lab.errors import UserError
from gpt2lab.serve.app import DEFAULT_MAX_BODY, Server, create_app
from gpt2lab.serve.metrics import log as metrics_log
from gpt2lab.serve.scheduler import MAX_QUEUE, PREFIX_CACHE_BYTES
from gpt2lab.templates import get_format

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _listen(host: str, port: int):
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UserError(f"--host {host}: cannot resolve it ({e.strerror}); pass an address such as 127.0.0.1") \
            from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port or stop what "
                        "uses it") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class _Stopped(Exception):
    """SIGTERM, after uvicorn's graceful shutdown."""


def _stopped(signum, frame):
    raise _Stopped


def serve(run_dir, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
          api_key: str | None = None, cors_origins: tuple[str, ...] = (), max_batch: int = 32,
          device: str = "auto", dtype: str = "fp32", max_body: int = DEFAULT_MAX_BODY, ready=None,
          allowed_hosts: tuple[str, ...] = (), timeout: float = 30.0, quantize: str | None = None,
          max_queue: int = MAX_QUEUE, prefix_cache_mb: int = PREFIX_CACHE_BYTES >> 20, grace: float = 30.0,
          log_requests: bool = True) -> None:
    """Load the run and serve it until interrupted (the `gpt2lab serve` command)."""
    api_key = api_key if api_key is not None else os.environ.get("GPT2LAB_API_KEY")  # (a flag shows in `ps`)
    if api_key is not None and not api_key.strip():
        raise UserError("--api-key is empty; give a key or leave the flag out")
    name = model_name or Path(run_dir).resolve().name
    if not name.strip():
        raise UserError("--model-name is empty")
    info = open_run(run_dir)
    fmt = get_format(info.template)
    model, tok = info.load(resolve_device(device), kind="lm", dtype=dtype, quantize=quantize)
    if tok.eot_id is None:
        raise UserError(f"{run_dir}: the tokenizer has no <|endoftext|> token; gpt2lab serve needs one to end answers")
    sock = _listen(host, port)
    if host not in LOOPBACK and api_key is None:
        print(f"warning: serving on {host} without --api-key: anyone who can reach this machine can use the model",
              file=sys.stderr, flush=True)
    server = Server(model, tok, fmt, name, max_batch=max_batch, api_key=api_key, max_body=max_body,
                    cors_origins=cors_origins, allowed_hosts=allowed_hosts, bound_host=host, timeout=timeout,
                    max_queue=max_queue, prefix_cache_bytes=prefix_cache_mb << 20)
    handler = None
    if log_requests:  # one line per request on stderr, while this server runs
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        metrics_log.addHandler(handler)
        metrics_log.setLevel(logging.INFO)
    app = create_app(server)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(f"gpt2lab serve: {run_dir} as model {name!r} ({fmt.name} format, context {server.block}, batch up to "
          f"{max_batch}, queue up to {max_queue}) on http://{shown}:{bound} (chat page at /, API at /v1)", flush=True)
    # SIGTERM or Ctrl-C: uvicorn stops accepting, lets running answers finish for `grace` seconds, then exits
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=grace)
    if ready is not None:
        ready(server, bound)
    # uvicorn takes SIGTERM and SIGINT while it runs, shuts down gracefully, then raises the signal again for
    # the handler it found: Ctrl-C arrives as KeyboardInterrupt, SIGTERM as _Stopped; both are a clean exit
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _stopped) if main_thread else None
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except (KeyboardInterrupt, _Stopped):
        pass
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        if handler is not None:
            metrics_log.removeHandler(handler)
    print("gpt2lab serve: stopped", flush=True)
