"""How fast `gpt2lab prepare` turns text into GPT-2 token shards, against tiktoken alone.

    python bench/prepare.py                        # shakespeare + austen + kjv from ../shared/data
    python bench/prepare.py --input my.txt.gz --workers 1 4 8 --json bench/prepare.json

For each worker count it runs the whole of `prepare` (read and decompress,
cut into pieces, tokenise in worker processes, write shards, meta.json)
with the GPT-2 tokenizer, and reports input MB/s and tokens/s end to end.
The reference row is tiktoken's own `encode_ordinary_batch` on the same text,
already decoded and in memory: the speed of the tokeniser with no reading,
writing or process overhead, i.e. the ceiling prepare can approach.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tiktoken
import tiktoken.load

from gpt2lab import sources
from gpt2lab.data.prepare import prepare
from gpt2lab.tokenizer import EOT, GPT2_PATTERN, get_tokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_name  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DEFAULT_INPUTS = [SHARED / "corpora" / "shakespeare.txt.gz", SHARED / "corpora" / "austen",
                  SHARED / "corpora" / "kjv.txt.gz"]


def machine() -> str:
    cpu = cpu_name()
    return (f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, tiktoken {tiktoken.__version__}, numpy {np.__version__}")


def reference_encoding() -> tiktoken.Encoding:
    """tiktoken's GPT-2 built from the shared gpt2.tiktoken file, or from gpt2lab's own vocabulary."""
    ranks_file = SHARED / "gpt2-tokenizer" / "gpt2.tiktoken"
    if ranks_file.is_file():
        return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN,
                                 mergeable_ranks=tiktoken.load.load_tiktoken_bpe(str(ranks_file)),
                                 special_tokens={EOT: 50256})
    return get_tokenizer("gpt2").enc


def best_of(repeat: int, fn):
    times, result = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return min(times), result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", nargs="+", default=[str(x) for x in DEFAULT_INPUTS],
                   help="files, directories or globs (default: shakespeare + austen + kjv from shared data)")
    p.add_argument("--workers", nargs="+", type=int, default=None,
                   help="worker counts to time (default: 1 and the number of CPUs)")
    p.add_argument("--repeat", type=int, default=2, help="report the best of this many runs")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args()
    workers = args.workers or sorted({1, os.cpu_count() or 1})

    # the text as prepare sees it: the same pieces, decoded once, for the tiktoken reference
    stats = sources.ReadStats()
    pieces = [piece.text for piece in sources.iter_pieces(args.input, stats=stats)]
    nbytes = sum(len(t.encode("utf-8")) for t in pieces)
    mb = nbytes / 1e6
    print(f"input: {', '.join(args.input)}")
    print(f"       {stats.files} files, {stats.documents} documents, {stats.chars:,} chars, "
          f"{mb:.1f} MB UTF-8, {len(pieces)} pieces")
    print(f"machine: {machine()}\n")

    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="gpt2lab-bench-"))
    try:
        for n in workers:
            out = tmp / f"w{n}"

            def run(n=n, out=out):
                shutil.rmtree(out, ignore_errors=True)
                return prepare(args.input, out, val_fraction=0, workers=n, progress=False)

            seconds, meta = best_of(args.repeat, run)
            tokens = meta["splits"]["train"]["tokens"]
            rows.append({"what": f"gpt2lab prepare, {n} worker{'s' * (n != 1)}", "workers": n,
                         "seconds": seconds, "tokens": tokens})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    enc = reference_encoding()
    for n in workers:
        seconds, ids = best_of(args.repeat, lambda n=n: enc.encode_ordinary_batch(pieces, num_threads=n))
        tokens = sum(len(x) for x in ids) + stats.documents  # + one eot per document, as prepare counts
        rows.append({"what": f"tiktoken encode_ordinary_batch, {n} thread{'s' * (n != 1)}", "workers": n,
                     "seconds": seconds, "tokens": tokens})

    print(f"{'':44s} {'seconds':>8s} {'MB/s':>8s} {'tokens/s':>12s} {'tokens':>11s}")
    for r in rows:
        r["mb_per_s"] = mb / r["seconds"]
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        print(f"{r['what']:44s} {r['seconds']:8.2f} {r['mb_per_s']:8.2f} {r['tokens_per_s']:12,.0f} "
              f"{r['tokens']:11,d}")
    print(f"\nbest of {args.repeat} runs each; prepare times are end to end (read, tokenise, write, "
          "meta.json); tiktoken's are on text already in memory.")

    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "inputs": args.input, "bytes": nbytes,
                                               "documents": stats.documents, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
