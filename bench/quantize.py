"""What `--quantize int8` costs on a trained run: held-out bits per byte, next-token agreement and greedy
agreement with fp32, and the decoding speed of both.

On the run's held-out split (a data dir from `gpt2lab prepare` with the run's tokenizer): bits per byte as
`gpt2lab eval --task loss` computes it, the share of --positions positions whose most likely next token is the
same (teacher-forced), and from --prompts places in the held-out text, greedy continuations of --new-tokens:
how many are identical to fp32's token for token, and the share of positions equal.

    python bench/quantize.py demo/run --data demo/data
    python bench/quantize.py runs/big --data data/web --positions 16384 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch

from gpt2lab.checkpoint import load_run
from gpt2lab.data.shards import split_shards
from gpt2lab.evals.benchmarks import eval_loss
from gpt2lab.evals.data import loss_documents
from gpt2lab.generate import generate
from gpt2lab.model.quantize import quantize


def next_token_agreement(a, b, tokens: np.ndarray, positions: int, T: int) -> float:
    same = total = 0
    with torch.no_grad():
        for i in range(0, min(len(tokens) - T - 1, positions), T):
            x = torch.from_numpy(tokens[i:i + T].astype(np.int64))[None]
            same += (a(x).argmax(-1) == b(x).argmax(-1)).sum().item()
            total += T
    return same / total


def greedy(model, prompts, new_tokens: int) -> tuple[list[list[int]], float]:
    t = time.perf_counter()
    outs = [generate(model, p, max_new_tokens=new_tokens, temperature=0) for p in prompts]
    n = sum(len(o) for o in outs)
    return outs, n / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a trained run dir")
    p.add_argument("--data", required=True, help="a data dir with the run's tokenizer (its val split is used)")
    p.add_argument("--positions", type=int, default=8192, help="teacher-forced positions compared (default 8192)")
    p.add_argument("--prompts", type=int, default=20, help="greedy continuations compared (default 20)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    fp32, tokenizer = load_run(args.run)
    fp32.eval()
    int8 = quantize(copy.deepcopy(fp32))
    _, shards = split_shards(args.data, "val")
    tokens = np.concatenate([np.asarray(s) for s in shards])
    T = fp32.config.block_size
    docs = loss_documents(tokenizer, args.data, None, vocab_size=fp32.config.vocab_size)
    rows = {name: eval_loss(model, tokenizer, docs) for name, model in (("fp32", fp32), ("int8", int8))}
    agree = next_token_agreement(fp32, int8, tokens, args.positions, T)
    stride = max(1, (len(tokens) - 16) // args.prompts)
    prompts = [tokens[k * stride:k * stride + 16].astype(np.int64).tolist() for k in range(args.prompts)]
    fp_out, fp_speed = greedy(fp32, prompts, args.new_tokens)
    q_out, q_speed = greedy(int8, prompts, args.new_tokens)
    identical = sum(a == b for a, b in zip(fp_out, q_out))
    equal = sum(x == y for a, b in zip(fp_out, q_out) for x, y in zip(a, b))
    total = sum(max(len(a), len(b)) for a, b in zip(fp_out, q_out))

    print(f"{args.run}: {sum(p.numel() for p in fp32.parameters()):,} parameters, {args.threads} thread(s)\n")
    print("| weights | held-out loss | bits per byte | greedy tokens/s |")
    print("|---|---:|---:|---:|")
    for name, speed in (("fp32", fp_speed), ("int8", q_speed)):
        print(f"| {name} | {rows[name].metrics['loss']:.4f} | {rows[name].metrics['bpb']:.4f} | {speed:.1f} |")
    print(f"\nnext token equal to fp32's: {100 * agree:.1f}% of {min(args.positions, len(tokens) - T - 1):,} "
          f"held-out positions (teacher-forced)")
    print(f"greedy continuations ({args.new_tokens} tokens from {args.prompts} held-out places): {identical} of "
          f"{args.prompts} identical, {100 * equal / max(total, 1):.1f}% of positions equal")


if __name__ == "__main__":
    main()
