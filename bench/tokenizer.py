"""Tokenizer benchmark: encode throughput and BPE training time, with a correctness check.

    python bench/tokenizer.py                      # all of Shakespeare (5 MB), vocab 8192
    python bench/tokenizer.py --mb 1 --json out.json

Encoding (GPT-2's vocabulary, one thread, `encode_ordinary` over the whole text):
  gpt2lab from scratch  - BPETokenizer, plain Python, fresh instance (its piece cache starts empty)
  gpt2lab fast path     - FastTokenizer (tiktoken under the hood)
  tiktoken              - tiktoken.Encoding built offline from gpt2.tiktoken, used directly
All three must give identical ids, or the script exits with status 1.

Training (same text, same vocab size, GPT-2's pre-tokenisation):
  gpt2lab               - gpt2lab.tokenizer.train (pure Python, one thread)
  HF tokenizers         - Rust BpeTrainer with the ByteLevel pre-tokenizer (all cores)
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import sys
import time
from pathlib import Path

import regex
import tiktoken
import tiktoken.load

from gpt2lab.tokenizer import EOT, GPT2_PATTERN, get_tokenizer
from gpt2lab.tokenizer.bpe import load_gpt2_files
from gpt2lab.tokenizer.train import train_bpe_from_texts

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_name  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
ASSETS = ROOT / "gpt2lab" / "assets" / "gpt2"

# GPT-2's regex never matches across a newline with non-space text on both sides
_SAFE_CUT = regex.compile(r"(?<=\S\n)(?=\S)")


def machine() -> dict:
    cpu = cpu_name()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    import tokenizers

    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable,
            "python": platform.python_version(), "tiktoken": tiktoken.__version__,
            "tokenizers": tokenizers.__version__,
            "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def read_corpus(path: Path, mb: float | None) -> str:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    if mb is not None:
        limit = int(mb * 1_000_000)
        data = text.encode("utf-8")
        if len(data) > limit:
            text = data[:limit].decode("utf-8", errors="ignore")
    return text


def chunks(text: str, size: int = 1 << 16) -> list[str]:
    """Cut the text into ~size pieces only where pre-tokenisation cuts anyway."""
    out, start = [], 0
    while len(text) - start > size:
        m = _SAFE_CUT.search(text, start + size)
        if m is None:
            break
        out.append(text[start:m.start()])
        start = m.start()
    out.append(text[start:])
    return out


def timed(fn, repeat: int = 1):
    best, result = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def reference_encoding(shared: Path) -> tiktoken.Encoding:
    path = shared / "gpt2-tokenizer" / "gpt2.tiktoken"
    if not path.is_file():
        sys.exit(f"error: {path} not found; pass --shared-data pointing at the shared data folder")
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN,
                             mergeable_ranks=tiktoken.load.load_tiktoken_bpe(str(path)),
                             special_tokens={EOT: 50256})


def bench_encode(text: str, shared: Path, repeat: int) -> tuple[list[dict], bool]:
    mbytes = len(text.encode("utf-8")) / 1e6
    slow = load_gpt2_files(ASSETS / "encoder.json", ASSETS / "vocab.bpe")  # fresh: empty cache
    fast = get_tokenizer("gpt2")
    ref = reference_encoding(shared)
    encoders = [("gpt2lab from scratch", slow.encode_ordinary, 1),
                ("gpt2lab fast path", fast.encode_ordinary, repeat),
                ("tiktoken (offline)", ref.encode_ordinary, repeat)]
    best = [float("inf")] * len(encoders)
    ids: list[list[int]] = [[] for _ in encoders]
    # interleave the repeats so that drift in machine speed hits every encoder alike
    for round_ in range(max(n for _, _, n in encoders)):
        for k, (_, fn, n) in enumerate(encoders):
            if round_ < n:
                secs, ids[k] = timed(lambda fn=fn: fn(text))
                best[k] = min(best[k], secs)
    rows = [{"what": label, "seconds": secs, "MB/s": mbytes / secs, "tokens/s": len(out) / secs,
             "tokens": len(out)} for (label, _, _), secs, out in zip(encoders, best, ids)]
    return rows, ids[0] == ids[1] == ids[2]


def bench_train(text: str, vocab_size: int) -> list[dict]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    parts = chunks(text)
    rows = []

    secs, ours = timed(lambda: train_bpe_from_texts(parts, vocab_size, name="bench"))
    rows.append({"what": "gpt2lab trainer (Python, 1 thread)", "seconds": secs,
                 "vocab": ours.vocab_size, "chars/token": len(text) / len(ours.encode_ordinary(text))})

    def hf_train():
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(parts, trainer=trainer)
        return tok

    secs, hf = timed(hf_train)
    hf_ids = sum((e.ids for e in hf.encode_batch(parts)), [])
    threads = os.environ.get("RAYON_NUM_THREADS", str(os.cpu_count()))
    rows.append({"what": f"HF tokenizers BpeTrainer (Rust, {threads} threads)", "seconds": secs,
                 "vocab": hf.get_vocab_size(), "chars/token": len(text) / len(hf_ids)})
    ours_tokens = set(ours.vocab)
    shared_tokens = len(ours_tokens & set(hf.get_vocab()))
    rows[-1]["tokens also in gpt2lab vocab"] = shared_tokens
    return rows


def print_table(title: str, rows: list[dict], cols: list[tuple[str, str]]) -> None:
    print(f"\n{title}")
    header = ["what"] + [c for c, _ in cols]
    cells = [[r["what"]] + [format(r[c], f) if c in r else "" for c, f in cols] for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", type=Path, default=SHARED / "corpora" / "shakespeare.txt.gz",
                   help="a .txt or .txt.gz file (default: the shared Shakespeare)")
    p.add_argument("--shared-data", type=Path, default=SHARED,
                   help="the shared data folder (for gpt2.tiktoken)")
    p.add_argument("--mb", type=float, default=None, help="use at most this many MB of the corpus")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocab size to train to (default 8192)")
    p.add_argument("--repeat", type=int, default=5, help="best of N for the tiktoken-based encoders")
    p.add_argument("--no-train", action="store_true", help="skip the training comparison")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the results here")
    args = p.parse_args(argv)

    if not args.corpus.is_file():
        print(f"error: corpus {args.corpus} not found; pass --corpus", file=sys.stderr)
        return 2
    info = machine()
    text = read_corpus(args.corpus, args.mb)
    mbytes = len(text.encode("utf-8")) / 1e6
    print(f"machine: {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), "
          f"Python {info['python']}, tiktoken {info['tiktoken']}, tokenizers {info['tokenizers']}, "
          f"load average {info['load_average_1min']:.2f} before the run")
    print(f"corpus:  {args.corpus} ({mbytes:.2f} MB, {len(text):,} chars)")

    enc_rows, identical = bench_encode(text, args.shared_data, args.repeat)
    print_table("encode_ordinary with GPT-2's vocabulary (one thread)", enc_rows,
                [("seconds", ".3f"), ("MB/s", ".2f"), ("tokens/s", ",.0f"), ("tokens", ",d")])
    print(f"ids identical across all three: {'yes' if identical else 'NO'}")

    train_rows = []
    if not args.no_train:
        train_rows = bench_train(text, args.vocab_size)
        print_table(f"BPE training to vocab {args.vocab_size} on the same text", train_rows,
                    [("seconds", ".2f"), ("vocab", "d"), ("chars/token", ".3f"),
                     ("tokens also in gpt2lab vocab", "d")])

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": info, "corpus": str(args.corpus), "mb": mbytes,
                                         "chars": len(text), "vocab_size": args.vocab_size,
                                         "encode": enc_rows, "ids_identical": identical,
                                         "train": train_rows}, indent=2) + "\n")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
