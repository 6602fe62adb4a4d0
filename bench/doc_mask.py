"""What `pretrain --doc-mask` costs and gives: tokens/s and held-out loss with and without it.

    python bench/doc_mask.py                                  # micro preset, 256-token rows, 200 steps
    python bench/doc_mask.py --model nano --seq-len 128 --steps 300 --workdir /tmp/docmask

The bundled Shakespeare is cut into documents at every blank line (`--doc-separator '\\n\\n'`: speeches
and stage directions, ~40 tokens each with a 4096-token BPE trained on it), so a training row holds
several documents. Both runs have the same seed, batches and steps; they differ only in --doc-mask
(a block-diagonal causal mask and positions that restart at each <|endoftext|>, which takes attention
off the fused causal kernel onto a masked one).

The training loop's own val loss is not comparable between the two (with --doc-mask the val rows are
masked too), so both runs are scored the same way afterwards: `gpt2lab eval RUN --task loss --data DATA`,
which scores each val document alone, from its start. Every command is echoed to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bundled_data, cpu_name, gpt2lab, load_line, run_command, run_metrics  # noqa: E402


def rows_with_several_documents(data: Path, seq_len: int) -> tuple[float, float]:
    """(share of the training rows (windows at 0, T, 2T, ...) that hold more than one document, mean documents
    per row): a document starts at each <|endoftext|> and at a row's first token."""
    from gpt2lab.data.shards import load_tokens, read_meta

    eot = read_meta(data)["eot_id"]
    tokens = np.asarray(load_tokens(data, "train"))
    n = (len(tokens) - 1) // seq_len
    rows = tokens[: n * seq_len].reshape(n, seq_len)
    starts = 1 + (rows[:, 1:] == eot).sum(axis=1)
    return float((starts > 1).mean()), float(starts.mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="micro", help="model preset (default micro: 4 layers, width 256)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--eval-limit", type=int, default=None, help="score only the first N val documents")
    p.add_argument("--eval-batch-size", type=int, default=64, help="documents per forward pass of the eval")
    p.add_argument("--workdir", default=None, help="keep the data and runs here (default: a temporary dir)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = bundled_data(work)
        meta = json.loads((data / "meta.json").read_text())
        several, per_row = rows_with_several_documents(data, args.seq_len)
        load_before = load_line()
        rows = []
        for mask in (False, True):
            run = work / ("run-doc-mask" if mask else "run-plain")
            cmd = gpt2lab("pretrain", "--data", str(data), "--out", str(run), "--model", args.model,
                          "--block-size", str(args.seq_len), "--seq-len", str(args.seq_len),
                          "--batch-size", str(args.batch_size), "--max-steps", str(args.steps),
                          "--lr", str(args.lr), "--warmup-steps", str(max(1, args.steps // 10)),
                          "--seed", str(args.seed), "--dropout", "0", "--log-every", "10",
                          "--eval-every", str(args.steps), "--eval-batches", "20", "--checkpoint-every",
                          str(args.steps), "--sample-tokens", "0", "--no-tensorboard", "--device", "cpu",
                          "--dtype", "fp32", "--doc-mask" if mask else "--no-doc-mask")
            shutil.rmtree(run, ignore_errors=True)  # (a run of an earlier invocation in --workdir)
            wall = run_command(cmd, log=run.with_suffix(".log"))
            m = run_metrics(run)
            scored = work / f"eval-{run.name}.json"
            eval_cmd = gpt2lab("eval", str(run), "--task", "loss", "--data", str(data), "--device", "cpu",
                               "--batch-size", str(args.eval_batch_size), "--output", str(scored), "--quiet")
            if args.eval_limit:
                eval_cmd += ["--limit", str(args.eval_limit)]
            run_command(eval_cmd)
            ev = json.loads(scored.read_text())[0]
            rows.append({"doc_mask": mask, "tokens_per_sec": m["tokens_per_sec"],
                         "median_tokens_per_sec": m["median_tokens_per_sec"], "wall_s": wall,
                         "train_loss": m["losses"][max(m["losses"])], "loop_val_loss": m["vals"][max(m["vals"])],
                         "eval_loss": ev["loss"], "eval_bpb": ev["bpb"], "eval_docs": ev["n"]})

    print(f"## --doc-mask: {args.model}, {args.steps} steps of {args.batch_size} x {args.seq_len} tokens, seed "
          f"{args.seed}\n")
    print(f"- machine: {cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"- {load_line()} at the end; {load_before} at the start")
    print(f"- data: the bundled Shakespeare, 4096-token BPE, --doc-separator '\\n\\n': "
          f"{meta['splits']['train']['documents']:,} train documents ({meta['splits']['train']['tokens']:,} tokens), "
          f"{meta['splits']['val']['documents']:,} val documents")
    print(f"- training rows of {args.seq_len} tokens holding more than one document: {100 * several:.1f}% "
          f"(mean {per_row:.2f} documents per row)")
    print(f"- eval loss: `gpt2lab eval RUN --task loss --data DATA`, each of {rows[0]['eval_docs']:,} val documents "
          "scored alone (the same for both runs); loop val loss: the run's own last validation (masked rows "
          "with --doc-mask, so not comparable)\n")
    print("| --doc-mask | tokens/s (training loop) | median of 10-step windows | wall s (whole command) "
          "| final train loss | loop val loss | eval loss | eval bits/byte |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {'on' if r['doc_mask'] else 'off'} | {r['tokens_per_sec']:,.0f} | "
              f"{r['median_tokens_per_sec']:,.0f} | {r['wall_s']:.1f} | "
              f"{r['train_loss']:.4f} | {r['loop_val_loss']:.4f} | {r['eval_loss']:.4f} | {r['eval_bpb']:.4f} |")
    off, on = rows
    print(f"\n--doc-mask: {on['tokens_per_sec'] / off['tokens_per_sec']:.2f}x the tokens/s "
          f"({on['median_tokens_per_sec'] / off['median_tokens_per_sec']:.2f}x by the median window), eval loss "
          f"{on['eval_loss'] - off['eval_loss']:+.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "several": several}, indent=1))


if __name__ == "__main__":
    main()
