"""What the benchmark scripts share: naming the machine, and a transformers twin of a model."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, or what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_features() -> str:
    """The CPU's bf16 matrix features (what makes bf16 fast on a CPU), from /proc/cpuinfo."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    found = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return ", ".join(found) or "no AVX-512 / AMX"


def hf_twin(model):
    """transformers' GPT2LMHeadModel (sdpa attention, no dropout) holding `model`'s weights."""
    import transformers

    from gpt2lab.export.hf import gpt2lab_to_hf

    c = model.config
    cfg = transformers.GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
                                  n_layer=c.n_layer, n_head=c.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0, activation_function="gelu_new")
    try:
        hf = transformers.GPT2LMHeadModel(cfg, attn_implementation="sdpa")
    except TypeError:
        hf = transformers.GPT2LMHeadModel(cfg)
    missing, unexpected = hf.load_state_dict(gpt2lab_to_hf(model.state_dict()), strict=False)
    # the causal-mask buffers are rebuilt by transformers; the LM head is tied to wte
    missing = [k for k in missing if not k.endswith((".attn.bias", ".attn.masked_bias", "lm_head.weight"))]
    if missing or unexpected:
        raise RuntimeError(f"weights do not map onto transformers' GPT-2: missing {missing}, "
                           f"unexpected {unexpected}")
    if hf.lm_head.weight.data_ptr() != hf.transformer.wte.weight.data_ptr():
        raise RuntimeError("transformers' LM head is not tied to its token embedding")
    return hf.eval()


# ---------------------------------------------------------------- running gpt2lab's commands (doc_mask.py, scale.py)

BUNDLED_CORPUS = Path(__file__).resolve().parents[1] / "gpt2lab" / "assets" / "shakespeare.txt.gz"


def gpt2lab(*args: str) -> list[str]:
    """The command line of `gpt2lab ARGS` with this interpreter."""
    import sys

    return [sys.executable, "-m", "gpt2lab", *args]


def run_command(cmd: list[str], env: dict | None = None, log: Path | None = None) -> float:
    """Run a command (echoed to stderr as a shell line), fail loudly; its wall-clock seconds. Its output goes
    to `log` when given (and its tail to stderr if it fails)."""
    import os
    import shlex
    import subprocess
    import sys
    import time

    shown = " ".join(f"{k}={v}" for k, v in (env or {}).items() if os.environ.get(k) != v)
    print(f"$ {shown + ' ' if shown else ''}{shlex.join(cmd)}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    out = subprocess.run(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    seconds = time.perf_counter() - start
    if log is not None:
        log.write_text(out.stdout)
    if out.returncode != 0:
        sys.stderr.write(out.stdout[-4000:])
        raise SystemExit(f"command failed with exit status {out.returncode}: {shlex.join(cmd)}")
    return seconds


def bundled_data(workdir: Path, vocab_size: int = 4096, doc_separator: str = r"\n\n") -> Path:
    """A data dir of the bundled Shakespeare (made once in `workdir`, reused after): a `vocab_size` BPE trained
    on it, documents cut at `doc_separator` (as typed on a command line), 10% of them held out."""
    data = workdir / "data"
    if (data / "meta.json").is_file():
        return data
    run_command(gpt2lab("tokenizer", "train", "--input", str(BUNDLED_CORPUS), "--vocab-size", str(vocab_size),
                        "--out", str(workdir / "tokenizer"), "--quiet", "--overwrite"))
    run_command(gpt2lab("prepare", "--input", str(BUNDLED_CORPUS), "--tokenizer", str(workdir / "tokenizer"),
                        "--doc-separator", doc_separator, "--val-fraction", "0.1", "--out", str(data), "--quiet",
                        "--overwrite"))
    return data


def run_metrics(run_dir: Path) -> dict:
    """From a run's metrics.jsonl: per-step losses, val losses, and the training loop's tokens/s over every
    logged window but the first (start-up), evaluations and checkpoints not counted: over all of them
    ("tokens_per_sec") and the median window ("median_tokens_per_sec", which a burst of other work on the
    machine moves less)."""
    import json
    import statistics

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    losses = {r["step"]: r["loss"] for r in steps}
    vals = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    windows = [(b["tokens"] - a["tokens"], b["tokens_per_sec"]) for a, b in zip(steps, steps[1:])]
    seconds = sum(n / rate for n, rate in windows if rate > 0)
    tok_s = sum(n for n, _ in windows) / seconds if seconds else float("nan")
    median = statistics.median(rate for _, rate in windows) if windows else float("nan")
    return {"losses": losses, "vals": vals, "tokens_per_sec": tok_s, "median_tokens_per_sec": median}


def load_line() -> str:
    """The machine's load: other work on it skews a benchmark."""
    import os

    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} logical CPUs"
