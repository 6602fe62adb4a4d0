"""Can a small model pretrained here learn a new instruction by SFT? A one-line instruction that needs copying a
word from the prompt, scored by exact match on words that fine-tuning never saw.

The records: "Repeat the word after the colon, and nothing else." with the input "Word: w" and the answer
"The word is w."; 1,500 words of the bundled Shakespeare (4 to 10 letters) to train on, and 200 others held out.
The script writes them, runs `gpt2lab finetune sft` (its defaults, plus any flags after --), scores the result
with `gpt2lab eval --task exact` on the held-out words, and splits the score by whether every token of the word
is one that some training answer has (a model that learned to copy gets both right; one that learned the
answers' tokens gets only the first).

    python bench/sft_copy.py demo/run                       # the defaults (after `make demo`)
    python bench/sft_copy.py demo/run -- --no-freeze-embeddings
    python bench/sft_copy.py demo/run --out runs/copy -- --max-steps 500 --lr 1e-4
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpt2lab.checkpoint import load_tokenizer, open_run

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import BUNDLED_CORPUS, gpt2lab  # noqa: E402

INSTRUCTION = "Repeat the word after the colon, and nothing else."


def record(word: str) -> dict:
    return {"instruction": INSTRUCTION, "input": f"Word: {word}", "output": f"The word is {word}."}


def write_records(folder: Path, n_train: int, n_test: int, seed: int) -> tuple[Path, Path]:
    text = gzip.decompress(BUNDLED_CORPUS.read_bytes()).decode("utf-8")
    words = sorted({w.lower() for w in re.findall(r"[A-Za-z]{4,10}", text)})
    random.Random(seed).shuffle(words)
    paths = folder / "train.jsonl", folder / "test.jsonl"
    for path, part in zip(paths, (words[:n_train], words[n_train:n_train + n_test])):
        path.write_text("".join(json.dumps(record(w)) + "\n" for w in part), encoding="utf-8")
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="%(prog)s BASE [options] [-- finetune sft flags]")
    p.add_argument("base", help="the run dir to fine-tune (e.g. demo/run)")
    p.add_argument("--out", default=None, help="the SFT run dir (default: a temporary one)")
    p.add_argument("--train", type=int, default=1500, help="training words (default 1500)")
    p.add_argument("--test", type=int, default=200, help="held-out words (default 200)")
    p.add_argument("--seed", type=int, default=0)
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)  # after --: flags for `gpt2lab finetune sft`
    args = p.parse_args(argv[:cut])
    args.sft_flags = argv[cut + 1:]

    work = Path(tempfile.mkdtemp(prefix="gpt2lab-sft-copy-"))
    out = Path(args.out) if args.out else work / "run"
    train, test = write_records(work, args.train, args.test, args.seed)
    t0 = time.time()
    subprocess.run(gpt2lab("finetune", "sft", "--init", args.base, "--data", str(train), "--out", str(out),
                           *args.sft_flags), check=True)
    minutes = (time.time() - t0) / 60
    predictions = work / "predictions.jsonl"
    subprocess.run(gpt2lab("eval", str(out), "--task", "exact", "--data", str(test), "--max-new-tokens", "16",
                           "--predictions", str(predictions)), check=True)

    tokenizer = load_tokenizer(open_run(out))
    seen = {i for r in map(json.loads, train.read_text().splitlines()) for i in tokenizer.encode(" " + r["input"][6:])}
    groups = {True: [0, 0], False: [0, 0]}
    for line in predictions.read_text().splitlines():
        row = json.loads(line)
        word = row["gold"][len("The word is "):-1]
        group = groups[all(i in seen for i in tokenizer.encode(" " + word))]
        group[0] += bool(row["correct"])
        group[1] += 1
    total = [groups[True][0] + groups[False][0], groups[True][1] + groups[False][1]]
    print(f"\nSFT of {args.base} on {args.train} copying records ({minutes:.1f} min; flags: "
          f"{' '.join(args.sft_flags) or 'the defaults'}); exact match on {args.test} unseen words:\n")
    print("| held-out words | n | exact match |")
    print("|---|---:|---:|")
    for name, (ok, n) in (("every token in some training answer", groups[True]),
                          ("a token no training answer has", groups[False]), ("all", total)):
        print(f"| {name} | {n} | {100 * ok / n:.1f}% |" if n else f"| {name} | 0 | - |")


if __name__ == "__main__":
    main()
