"""Speculative decoding on real text: a prompt that quotes a passage and starts quoting it again, decoded
greedily at batch 1 with and without `--speculative ngram` (or `--draft RUN`), checked token for token.

Prints, per passage of the bundled Shakespeare: tokens/s plain and speculative (best of --repeat), the speed-up,
the tokens produced per forward of the model, and the share of guesses kept. Greedy output with speculation must
equal plain greedy output; the script stops if it does not.

    python bench/speculative.py demo/run
    python bench/speculative.py runs/big --draft runs/small --threads 2
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
import time

import torch

from gpt2lab.checkpoint import load_run
from gpt2lab.generate import generate
from gpt2lab.generate.speculative import DraftModel, PromptLookup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import BUNDLED_CORPUS  # noqa: E402


def timed(model, ids: list[int], args, drafter) -> tuple[float, list[int]]:
    """The best time of --repeat greedy decodings, and the tokens."""
    best, out = float("inf"), []
    for _ in range(args.repeat):
        t = time.perf_counter()
        out = generate(model, ids, max_new_tokens=args.new_tokens, temperature=0, drafter=drafter)
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--draft", default=None, help="a smaller run with the same tokenizer (default: n-gram lookup)")
    p.add_argument("--draft-tokens", type=int, default=None, help="guesses per step (default 8 n-gram, 4 draft)")
    p.add_argument("--new-tokens", type=int, default=60)
    p.add_argument("--passage-chars", type=int, default=260)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_run(args.run)
    model.eval()
    draft = load_run(args.draft)[0].eval() if args.draft else None
    text = gzip.decompress(BUNDLED_CORPUS.read_bytes()).decode("utf-8")
    starts = {"To be, or not to be": text.index("To be, or not to be"), "a third in": len(text) // 3,
              "two thirds in": 2 * len(text) // 3}
    rows = []
    for name, start in starts.items():
        passage = text[start:start + args.passage_chars]
        ids = tok.encode(passage + "\n\n" + passage[:30])
        ids = ids[-(model.config.block_size - args.new_tokens):]  # prompt and answer inside the context

        t_plain, plain = timed(model, ids, args, None)
        drafter = (DraftModel(draft, k=args.draft_tokens or 4) if draft is not None
                   else PromptLookup(k=args.draft_tokens or 8))
        t_spec, spec = timed(model, ids, args, drafter)
        if spec != plain:
            raise SystemExit(f"speculative greedy output differs from plain greedy output on {name!r}")
        stats = drafter.stats
        rows.append((name, len(ids), len(plain), len(plain) / t_plain, len(plain) / t_spec, t_plain / t_spec,
                     stats.tokens_per_step, stats.acceptance))
    kind = f"--draft {args.draft}" if draft is not None else "--speculative ngram"
    print(f"{args.run}, {kind}, greedy, batch 1, {args.threads} thread(s); outputs identical to plain greedy\n")
    print("| passage | prompt tokens | new tokens | plain tok/s | speculative tok/s | speed-up | tokens per forward "
          "| guesses kept |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, n, m, plain_tps, spec_tps, speedup, per_step, kept in rows:
        print(f"| {name} | {n} | {m} | {plain_tps:.1f} | {spec_tps:.1f} | {speedup:.2f}x | {per_step:.2f} "
              f"| {100 * kept:.0f}% |")


if __name__ == "__main__":
    main()
