"""Serving under load: `gpt2lab serve` (continuous batching, chunked prefill, prefix caching) against
`transformers serve` with and without continuous batching, on the same model exported with `gpt2lab
export-hf`, over the load shapes of serve_loads.py: concurrency (1, 8, 32, 64 clients, short prompts),
mixed (long prompts joining running streams), chat (multi-turn conversations), poisson (rising arrival
rates until the p95 time to first token passes 2 s: the goodput).

The model is GPT-2 size (124M, `--model` preset) with random weights and GPT-2's tokenizer. Each server runs
in its own process with the same torch threads (`--threads`, default 1: on a small shared CPU, two threads
that wait for each other are slower than one); this process is the load, through the official `openai`
client (AsyncOpenAI), greedy and streamed. All servers are started first and each level goes round them in
turn, so that load from elsewhere that comes and goes hurts them alike. Measured: time to first token
(request sent -> first text; p50, p95), inter-token latency (between two texts of a stream; p95), tokens/s
per client (its tokens over its request's duration) and in total (all tokens over the level's wall time).
The greedy texts of every server are compared with those of the first (same weights: they should agree).

    python bench/serve.py                                            # every shape, every server
    python bench/serve.py --shapes concurrency --clients 1 8 --servers gpt2lab transformers-cb
    python bench/serve.py --shapes chat --servers gpt2lab gpt2lab-noprefix

`transformers serve` needs `pip install accelerate` besides transformers' serving extras (FastAPI,
uvicorn); it runs offline from the exported directory (HF_HUB_OFFLINE=1). vLLM has no CPU build on PyPI
(its wheels are CUDA builds; the CPU backend is built from source against its own torch): where it is
installed in a virtual environment of its own, pass that environment's `vllm` with --vllm and it joins the
servers. Where a server cannot start, the table says why.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_name  # noqa: E402
from serve_loads import SYSTEM, chat, concurrency, mixed, poisson, summarize  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_run(out: Path, preset: str, seed: int = 0) -> Path:
    """A run dir: a `preset`-size GPT with random weights and GPT-2's tokenizer."""
    import torch

    from gpt2lab.checkpoint import write_run_config
    from gpt2lab.model.config import GPTConfig
    from gpt2lab.model.gpt import GPT
    from gpt2lab.tokenizer import get_tokenizer
    from gpt2lab.weights import save_weights

    tok = get_tokenizer("gpt2")
    torch.manual_seed(seed)
    cfg = GPTConfig.from_preset(preset, vocab_size=tok.vocab_size)
    model = GPT(cfg)
    out.mkdir(parents=True)
    write_run_config(out, model.config, tokenizer_identity=tok.identity())
    save_weights(model, out / "model.safetensors")
    tok.save(out)
    return out


def prompts(n: int, tokens: int) -> list[str]:
    """n different prompts of about `tokens` GPT-2 tokens each, from the bundled Shakespeare."""
    from gpt2lab.tokenizer import get_tokenizer

    tok = get_tokenizer("gpt2")
    with gzip.open(ROOT / "gpt2lab" / "assets" / "shakespeare.txt.gz", "rt", encoding="utf-8") as f:
        ids = tok.encode(f.read(400_000))
    return [tok.decode(ids[i * 997: i * 997 + tokens]) for i in range(n)]


class Process:
    """A server process; `ready()` waits for its /health."""

    def __init__(self, argv: list[str], port: int, threads: int, log: Path):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self.log = log
        self.port = port
        self.proc = subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def ready(self, timeout: float = 300) -> str | None:
        """None when it answers /health; else why not (its last log lines)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                return self.why()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return None
            except OSError:
                pass
            time.sleep(0.5)
        return "it did not answer /health in time; " + self.why()

    def why(self) -> str:
        lines = [x for x in self.log.read_text(errors="replace").splitlines() if x.strip()]
        return " / ".join(lines[-2:])[-300:] or "no output"

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


SHAPES = ("concurrency", "mixed", "chat", "poisson")


def server_table(run: Path, hf_dir: Path, vllm: str | None) -> dict:
    """key -> (label, argv without --port, the model id it serves)."""
    gpt2lab = [str(BIN / "gpt2lab"), "serve", str(run), "--device", "cpu", "--quiet"]
    tfm = [str(BIN / "transformers"), "serve", str(hf_dir), "--device", "cpu", "--host", "127.0.0.1"]
    table = {
        "gpt2lab": ("gpt2lab serve (--max-batch 64)", gpt2lab + ["--max-batch", "64", "--max-queue", "256"], "run"),
        "gpt2lab-noprefix": ("gpt2lab serve, no prefix cache", gpt2lab + ["--max-batch", "64", "--max-queue", "256",
                                                                          "--prefix-cache-mb", "0"], "run"),
        "serial": ("gpt2lab serve --max-batch 1 (one at a time)", gpt2lab + ["--max-batch", "1", "--max-queue",
                                                                              "256"], "run"),
        "transformers": ("transformers serve", tfm, str(hf_dir)),
        "transformers-cb": ("transformers serve --continuous-batching", tfm + ["--continuous-batching"], str(hf_dir)),
    }
    if vllm:
        table["vllm"] = ("vLLM (CPU)", [vllm, "serve", str(hf_dir), "--host", "127.0.0.1", "--dtype", "float32"],
                         str(hf_dir))
    return table


def start_servers(keys: list[str], table: dict, threads: int, work: Path, notes: list[str]) -> dict:
    running = {}
    for key in keys:
        label, argv, model_id = table[key]
        if shutil.which(argv[0]) is None:
            notes.append(f"{label}: not run: `{argv[0]}` is not installed")
            continue
        port = free_port()
        proc = Process(argv + ["--port", str(port)], port, threads, work / f"{key}.log")
        why = proc.ready()
        if why is not None:
            notes.append(f"{label}: could not run: {why}")
            proc.stop()
            continue
        running[key] = (proc, f"http://127.0.0.1:{port}/v1")
        asyncio.run(concurrency(running[key][1], model_id, ["warm up"], 4))
    return running


def each_server(running: dict, table: dict, what: str, call, notes: list[str], failed: set) -> dict:
    """call(base_url, model_id) on each running server in turn; a server that fails is noted and left out."""
    out = {}
    for key, (_, base_url) in running.items():
        if key in failed:
            continue
        label, _, model_id = table[key]
        print(f"{label}: {what} ...", file=sys.stderr, flush=True)
        try:
            out[key] = asyncio.run(call(base_url, model_id))
        except Exception as e:  # noqa: BLE001 - a server that fails under load is a result
            notes.append(f"{label}, {what}: failed: {type(e).__name__}: {str(e)[:200]}")
            failed.add(key)
            continue
        print(f"  {out[key] if isinstance(out[key], dict) else summarize(out[key])}", file=sys.stderr, flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2", help="gpt2lab preset (default gpt2: 124M, random weights)")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=SHAPES)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--long-tokens", type=int, default=700, help="the long prompts of the mixed load (default 700)")
    p.add_argument("--turns", type=int, default=4, help="turns of each conversation of the chat load (default 4)")
    p.add_argument("--rates", type=float, nargs="+", default=[0.5, 1, 2, 4, 8],
                   help="arrival rates (requests/s) of the poisson load, tried in order until p95 TTFT > 2 s")
    p.add_argument("--seconds", type=float, default=20.0, help="how long each poisson rate lasts (default 20)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each server (default 1)")
    p.add_argument("--servers", nargs="+", default=["gpt2lab", "transformers-cb", "transformers"],
                   choices=["gpt2lab", "gpt2lab-noprefix", "serial", "transformers", "transformers-cb", "vllm"])
    p.add_argument("--vllm", default=None, metavar="PATH", help="the `vllm` command of vLLM's own environment")
    p.add_argument("--keep", default=None, help="keep the run dir and logs here")
    args = p.parse_args()

    import torch
    import transformers

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="gpt2lab-bench-serve-"))
    work.mkdir(parents=True, exist_ok=True)
    run = work / "run"
    if not run.exists():
        make_run(run, args.model)
    hf_dir = work / "hf"
    if not hf_dir.exists():
        subprocess.run([str(BIN / "gpt2lab"), "export-hf", str(run), "--out", str(hf_dir)], check=True,
                       stdout=subprocess.DEVNULL)
    texts = prompts(max(args.clients + [64]), args.prompt_tokens)
    long_texts = prompts(68, args.long_tokens)[64:]
    questions = [t[:120] + "?" for t in prompts(64, 24)]
    load_before = os.getloadavg()
    table = server_table(run, hf_dir, args.vllm)
    keys = list(dict.fromkeys(args.servers + (["gpt2lab-noprefix"] if "chat" in args.shapes and "gpt2lab" in
                                               args.servers else [])))
    notes, sections = [], []
    running = start_servers(keys, table, args.threads, work, notes)
    try:
        if "concurrency" in args.shapes:
            rows = []
            for n in args.clients:
                out = each_server({k: v for k, v in running.items() if k != "gpt2lab-noprefix"}, table,
                                  f"{n} clients", lambda url, m, n=n: concurrency(url, m, texts[:n], args.new_tokens),
                                  notes, set())
                check_agreement(out, table, f"{n} clients", notes)
                rows += [(table[k][0], n, summarize(r)) for k, r in out.items()]
            sections.append(("concurrency: N clients at once, each a different "
                             f"{args.prompt_tokens}-token prompt, {args.new_tokens} new tokens",
                             ["server", "clients", "TTFT p50 (s)", "TTFT p95 (s)", "ITL p95 (s)",
                              "tokens/s per client", "tokens/s total"],
                             [[label, n, f"{s['ttft_p50']:.2f}", f"{s['ttft_p95']:.2f}", f"{s['itl_p95']:.3f}",
                               f"{s['per_client']:.1f}", f"{s['total']:.1f}"] for label, n, s in rows]))
        if "mixed" in args.shapes:
            out = each_server({k: v for k, v in running.items() if k != "gpt2lab-noprefix"}, table, "mixed",
                              lambda url, m: mixed(url, m, texts[:8], long_texts, args.new_tokens), notes, set())
            sections.append((f"mixed: 8 streams of {4 * args.new_tokens} tokens; 4 prompts of {args.long_tokens} "
                             "tokens join them one after another",
                             ["server", "ITL p95 alone (s)", "ITL p95 with long prompts (s)", "ratio",
                              "long prompts' TTFT p95 (s)"],
                             [[table[k][0], f"{r['alone']['itl_p95']:.3f}", f"{r['with_long']['itl_p95']:.3f}",
                               f"{r['with_long']['itl_p95'] / r['alone']['itl_p95']:.2f}x",
                               f"{r['long']['ttft_p95']:.2f}"] for k, r in out.items()]))
        if "chat" in args.shapes:
            out = each_server(running, table, "chat", lambda url, m: chat(url, m, questions, 8, args.turns,
                                                                         args.new_tokens), notes, set())
            sections.append((f"chat: 8 conversations at once, {args.turns} turns each (a {len(SYSTEM.split())}-word "
                             "system prompt; every turn sends the whole conversation)",
                             ["server", "TTFT p50 (s)", "TTFT p50 of later turns (s)", "TTFT p95 (s)",
                              "tokens/s total"],
                             [[table[k][0], f"{r['ttft_p50']:.2f}", f"{r['later_ttft_p50']:.2f}",
                               f"{r['ttft_p95']:.2f}", f"{r['total']:.1f}"] for k, r in out.items()]))
        if "poisson" in args.shapes:
            rows = []
            for key in [k for k in running if k != "gpt2lab-noprefix"]:
                good = 0.0
                for rate in args.rates:
                    r = each_server({key: running[key]}, table, f"poisson {rate}/s",
                                    lambda url, m, rate=rate: poisson(url, m, texts, args.new_tokens, rate,
                                                                      args.seconds), notes, set()).get(key)
                    if r is None:
                        good = None
                        break
                    rows.append([table[key][0], f"{rate:g}", r["requests"], f"{r['ttft_p50']:.2f}",
                                 f"{r['ttft_p95']:.2f}", f"{r['total']:.1f}"])
                    if r["ttft_p95"] > 2.0:
                        break
                    good = rate
                rows.append([table[key][0], "goodput", "", "", "", "failed (see the notes)" if good is None else
                             f"{good:g} requests/s with p95 TTFT <= 2 s"])
            sections.append((f"poisson: requests arriving at random for {args.seconds:g} s at each rate",
                             ["server", "rate (requests/s)", "requests", "TTFT p50 (s)", "TTFT p95 (s)",
                              "tokens/s total"], rows))
    finally:
        for proc, _ in running.values():
            proc.stop()
    load_after = os.getloadavg()
    cfg = open_run_config(run)
    print(f"# serving {args.model} ({cfg}, random weights), GPT-2 tokenizer, greedy, streamed")
    print(f"# machine: {cpu_name()}, {os.cpu_count()} cores; each server with {args.threads} torch thread(s); "
          f"torch {torch.__version__}, transformers {transformers.__version__}; load average "
          f"{load_before[0]:.2f} before, {load_after[0]:.2f} after")
    for title, header, rows in sections:
        print(f"\n## {title}\n")
        print("| " + " | ".join(header) + " |")
        print("|---" + "|---:" * (len(header) - 1) + "|")
        for row in rows:
            print("| " + " | ".join(str(x) for x in row) + " |")
    for note in notes:
        print(f"# note: {note}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def check_agreement(out: dict, table: dict, what: str, notes: list[str]) -> None:
    """Same weights, greedy: every server's texts should equal the first's."""
    keys = list(out)
    if not keys:
        return
    reference = [r["text"] for r in out[keys[0]]]
    for key in keys[1:]:
        same = sum(r["text"] == t for r, t in zip(out[key], reference))
        if same < len(reference):
            notes.append(f"{table[key][0]}, {what}: {same}/{len(reference)} greedy texts equal to "
                         f"{table[keys[0]][0]}'s")


def open_run_config(run: Path) -> str:
    from gpt2lab.checkpoint import open_run

    cfg = open_run(run).model_config
    return f"{cfg.n_layer} layers, width {cfg.n_embd}, context {cfg.block_size}"


if __name__ == "__main__":
    main()
