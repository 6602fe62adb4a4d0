"""Pretraining on the CPU with 1 process, 2 gloo processes under DDP and 2 under FSDP: tokens/s and how far
their per-step losses are from the single process's.

    python bench/scale.py                                   # mini preset, 8 x 128 tokens per process, 30 steps
    python bench/scale.py --model micro --steps 60 --workdir /tmp/scale

The three runs train on the same batches (the same --total-batch-tokens: one process accumulates two
micro-batches where two processes take one each) from the same seed, in fp32, so their losses should agree
to float rounding. The multi-process runs are started the way a user starts them:

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m gpt2lab pretrain ... --strategy ddp|fsdp

The CPU's cores are shared out evenly: the single process gets OMP_NUM_THREADS = --threads (default: every
logical CPU), each of the two processes half of that. Tokens/s is the training loop's (the first logged window,
evaluations and checkpoints left out); wall s is the whole command, start-up included. Every command is
echoed to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bundled_data, cpu_name, gpt2lab, load_line, run_command, run_metrics  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mini", help="model preset (default mini: 6 layers, width 384)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch and process")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (1e-3 makes mini spike at step 8: a "
                   "spike turns float rounding into visible loss differences)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                   help="threads in all (default: every logical CPU)")
    p.add_argument("--workdir", default=None, help="keep the data and runs here (default: a temporary dir)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args()
    total = args.batch_size * args.seq_len * 2

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = bundled_data(work)
        load_before = load_line()
        runs = []
        for name, nproc, strategy in (("1 process", 1, "ddp"), ("2 processes, DDP", 2, "ddp"),
                                      ("2 processes, FSDP", 2, "fsdp")):
            run = work / f"run-{nproc}-{strategy}"
            shutil.rmtree(run, ignore_errors=True)
            train = ["pretrain", "--data", str(data), "--out", str(run), "--model", args.model,
                     "--block-size", str(args.seq_len), "--seq-len", str(args.seq_len),
                     "--batch-size", str(args.batch_size), "--total-batch-tokens", str(total),
                     "--max-steps", str(args.steps), "--lr", str(args.lr), "--warmup-steps", "10", "--dropout", "0",
                     "--log-every", "1", "--eval-every", str(args.steps), "--eval-batches", "8",
                     "--checkpoint-every", str(args.steps), "--sample-tokens", "0", "--no-tensorboard",
                     "--device", "cpu", "--dtype", "fp32", "--strategy", strategy]
            if nproc == 1:
                cmd = gpt2lab(*train)
            else:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                       str(nproc), "-m", "gpt2lab", *train]
            threads = max(1, args.threads // nproc)
            wall = run_command(cmd, env={"OMP_NUM_THREADS": str(threads)}, log=run.with_suffix(".log"))
            runs.append({"name": name, "nproc": nproc, "strategy": strategy, "threads": threads, "wall_s": wall,
                         **run_metrics(run),
                         "params": json.loads((run / "config.json").read_text())["model"]})

    ref = runs[0]
    print(f"## 1 vs 2 processes on the CPU: {args.model}, {total:,} tokens per step "
          f"({args.batch_size} x {args.seq_len} x 2), {args.steps} steps, fp32\n")
    print(f"- machine: {cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, gloo")
    print(f"- {load_line()} at the end; {load_before} at the start")
    m = ref["params"]
    print(f"- model: {m['n_layer']} layers, width {m['n_embd']}, {m['n_head']} heads, vocabulary {m['vocab_size']} "
          "(the bundled Shakespeare, a 4096-token BPE)\n")
    print("| run | threads per process | tokens/s (training loop) | median step | vs 1 process "
          "| wall s (whole command) | max \\|Δ loss\\| over the steps | \\|Δ val loss\\| | final loss |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        steps = sorted(ref["losses"])
        assert sorted(r["losses"]) == steps, f"{r['name']}: steps {sorted(r['losses'])} != {steps}"
        diff = max(abs(r["losses"][s] - ref["losses"][s]) for s in steps)
        last = max(ref["vals"])
        dval = abs(r["vals"][last] - ref["vals"][last])
        print(f"| {r['name']} | {r['threads']} | {r['tokens_per_sec']:,.0f} | {r['median_tokens_per_sec']:,.0f} | "
              f"{r['tokens_per_sec'] / ref['tokens_per_sec']:.2f}x | {r['wall_s']:.1f} | {diff:.2e} | {dval:.2e} | "
              f"{r['losses'][steps[-1]]:.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1, default=str))


if __name__ == "__main__":
    main()
