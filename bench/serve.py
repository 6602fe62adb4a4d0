"""Serving under load: `gpt2lab serve` with continuous batching, the same server one request at a time
(--max-batch 1), and `transformers serve` on the same model exported with `gpt2lab export-hf`.

The model is GPT-2 size (124M, `--model` preset) with random weights and GPT-2's tokenizer. Each server
runs in its own process with the same torch threads (`--threads`, default 1: on a small shared CPU, two
threads that wait for each other are slower than one); this process is the load: 1, 8, 32 and 64
concurrent clients of the official `openai` client (AsyncOpenAI), each streaming one /v1/completions
request (a different ~`--prompt-tokens` prompt per client, greedy, `--new-tokens` tokens). All servers
are started first and each level goes round them in turn, so that load from elsewhere that comes and
goes hurts them alike. Per level:
time to first token (p50, p95: request sent -> first text), tokens/s per client (its tokens over its
request's duration, averaged) and in total (all tokens over the level's wall time). A client of level
N starts together with the other N-1. The greedy texts of every server are compared with those of the
first one (same weights, so they should agree; a note says where they do not).

    python bench/serve.py                                   # gpt2, 1/8/32/64 clients, 32 new tokens
    python bench/serve.py --clients 1 8 --new-tokens 16 --servers gpt2lab serial
    python bench/serve.py --model mini --threads 2

`transformers serve` needs `pip install accelerate` besides transformers' serving extras (FastAPI,
uvicorn); it runs offline from the exported directory (HF_HUB_OFFLINE=1). Where it cannot start, the
table says why.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_name  # noqa: E402

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


async def one_client(client, model: str, prompt: str, new_tokens: int) -> dict:
    start = time.perf_counter()
    first, text, tokens = None, [], None
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=new_tokens, temperature=0,
                                             stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        for c in chunk.choices or []:
            if c.text:
                if first is None:
                    first = time.perf_counter()
                text.append(c.text)
        if getattr(chunk, "usage", None) is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    return {"start": start, "ttft": (first or end) - start, "end": end, "tokens": tokens, "text": "".join(text)}


async def level(base_url: str, model: str, texts: list[str], new_tokens: int) -> list[dict]:
    import openai

    # (the client's default connection pool holds far more than 64 connections)
    async with openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=3600) as client:
        return await asyncio.gather(*(one_client(client, model, t, new_tokens) for t in texts))


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(results: list[dict]) -> dict:
    tokens = [r["tokens"] if r["tokens"] is not None else 0 for r in results]
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    return {"ttft_p50": percentile([r["ttft"] for r in results], 0.5),
            "ttft_p95": percentile([r["ttft"] for r in results], 0.95),
            "per_client": statistics.mean(t / (r["end"] - r["start"]) for t, r in zip(tokens, results)),
            "total": sum(tokens) / wall, "tokens": sum(tokens), "wall": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2", help="gpt2lab preset (default gpt2: 124M, random weights)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch threads of each server (default 1)")
    p.add_argument("--servers", nargs="+", default=["gpt2lab", "serial", "transformers", "transformers-cb"],
                   choices=["gpt2lab", "serial", "transformers", "transformers-cb"])
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
    if not hf_dir.exists() and any(s.startswith("transformers") for s in args.servers):
        subprocess.run([str(BIN / "gpt2lab"), "export-hf", str(run), "--out", str(hf_dir)], check=True,
                       stdout=subprocess.DEVNULL)
    texts = prompts(max(args.clients), args.prompt_tokens)
    load_before = os.getloadavg()
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}: load average before {load_before[0]:.2f}", file=sys.stderr)

    servers = {
        "gpt2lab": ("gpt2lab serve (continuous batching, --max-batch 64)",
                    [str(BIN / "gpt2lab"), "serve", str(run), "--device", "cpu", "--max-batch", "64"], "run"),
        "serial": ("gpt2lab serve --max-batch 1 (one at a time)",
                   [str(BIN / "gpt2lab"), "serve", str(run), "--device", "cpu", "--max-batch", "1"], "run"),
        "transformers": ("transformers serve", [str(BIN / "transformers"), "serve", str(hf_dir), "--device", "cpu",
                                                "--host", "127.0.0.1"], str(hf_dir)),
        "transformers-cb": ("transformers serve --continuous-batching",
                            [str(BIN / "transformers"), "serve", str(hf_dir), "--device", "cpu", "--host",
                             "127.0.0.1", "--continuous-batching"], str(hf_dir)),
    }
    # every server is started first and the levels go round them in turn (idle servers use no CPU), so
    # that load from elsewhere that comes and goes hurts them alike
    notes, running = [], {}
    try:
        for key in dict.fromkeys(args.servers):
            label, argv, model_id = servers[key]
            if key.startswith("transformers") and shutil.which(argv[0]) is None:
                notes.append(f"{label}: not run: the `transformers` command is not installed")
                continue
            port = free_port()
            proc = Process(argv + ["--port", str(port)], port, args.threads, work / f"{key}.log")
            why = proc.ready()
            if why is not None:
                notes.append(f"{label}: could not run: {why}")
                proc.stop()
                continue
            running[key] = (proc, f"http://127.0.0.1:{port}/v1")
            asyncio.run(level(running[key][1], model_id, texts[:1], 4))  # warm-up
        results: dict[tuple[str, int], dict] = {}
        failed: set[str] = set()
        for n in args.clients:
            reference = None
            for key, (_, base_url) in running.items():
                label, _, model_id = servers[key]
                if key in failed:
                    continue
                print(f"{label}: {n} clients ...", file=sys.stderr, flush=True)
                try:
                    out = asyncio.run(level(base_url, model_id, texts[:n], args.new_tokens))
                except Exception as e:  # noqa: BLE001 - a server that fails under load is a result
                    notes.append(f"{label}, {n} clients: failed: {type(e).__name__}: {str(e)[:200]}")
                    failed.add(key)
                    continue
                results[key, n] = summarize(out)
                print(f"  {results[key, n]}", file=sys.stderr, flush=True)
                texts_now = [r["text"] for r in out]
                if reference is None:
                    reference = (label, texts_now)
                else:
                    same = sum(a == b for a, b in zip(texts_now, reference[1]))
                    if same < n:
                        notes.append(f"{label}, {n} clients: {same}/{n} greedy texts equal to {reference[0]}'s")
    finally:
        for proc, _ in running.values():
            proc.stop()
    rows = [(servers[key][0], n, results[key, n]) for key in running for n in args.clients if (key, n) in results]
    load_after = os.getloadavg()

    cfg = None
    try:
        from gpt2lab.checkpoint import open_run

        cfg = open_run(run).model_config
    except Exception:  # noqa: BLE001
        pass
    size = f"{cfg.n_layer} layers, width {cfg.n_embd}, context {cfg.block_size}" if cfg else args.model
    print(f"# serving {args.model} ({size}, random weights), GPT-2 tokenizer; {args.prompt_tokens}-token prompts, "
          f"{args.new_tokens} new tokens per request (greedy, streamed, /v1/completions)")
    print(f"# machine: {cpu_name()}, {os.cpu_count()} cores; each server with {args.threads} torch thread(s); "
          f"torch {torch.__version__}, transformers {transformers.__version__}; load average "
          f"{load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print("| server | clients | TTFT p50 (s) | TTFT p95 (s) | tokens/s per client | tokens/s total |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, n, s in rows:
        print(f"| {label} | {n} | {s['ttft_p50']:.2f} | {s['ttft_p95']:.2f} | {s['per_client']:.1f} | "
              f"{s['total']:.1f} |")
    for note in notes:
        print(f"# note: {note}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
