"""The data of text classification: CSV, TSV or JSONL examples, their labels and their splits.

Files (`read_examples`): CSV, TSV or JSONL, with configurable text and label fields. CSV and
TSV files have a header line unless `columns` names their columns (sms_spam.tsv has none:
`columns=["label", "text"]`). TSV fields are split on tabs with no quoting (SMS texts contain
quote characters); CSV uses standard CSV quoting. Labels are strings (a JSON 0/1 becomes
"0"/"1"); they are numbered in sorted order (numerically when all are integers) unless `labels`
gives the order.

Splits (`make_splits`), when one file is given: with `balance`, every class is downsampled (at
random) to the size of the smallest; then all examples are shuffled and cut into train / val /
test. The train and val sizes are rounded down and test takes the rest, as the book does: 1,284
balanced SMS examples with fractions 0.7/0.1/0.2 give 898/128/258. Without a test split, val
takes the rest. The same seed gives the same splits.
"""

from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch

from gpt2lab import io
from gpt2lab.errors import UserError

FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
           ".json": "jsonl"}
SPLITS = ("train", "val", "test")


@dataclass
class Example:
    text: str
    label: str
    where: str  # "file:line", for error messages


def _format_of(path: Path, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in ("csv", "tsv", "jsonl"):
            raise UserError(f"unknown data format {fmt!r}; choose csv, tsv or jsonl")
        return fmt
    found = FORMATS.get(path.suffix.lower())
    if found is None:
        raise UserError(f"cannot tell the format of {path} from its extension; name it .csv, .tsv or "
                        ".jsonl, or pass --format csv|tsv|jsonl")
    return found


def _label_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def read_examples(path: str | Path, text_field: str = "text", label_field: str = "label",
                  columns: list[str] | None = None, fmt: str | None = None) -> list[Example]:
    """(text, label) pairs of a CSV, TSV or JSONL file; see the module docstring for the rules."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; check the path of the data file")
    if not path.is_file():
        raise UserError(f"{path} is a directory, not a data file; pass a CSV, TSV or JSONL file")
    fmt = _format_of(path, fmt)
    if fmt == "jsonl":
        if columns:
            raise UserError("--columns names the columns of a CSV/TSV file without a header; a JSONL "
                            "file names its fields itself (use --text-field and --label-field)")
        return _read_jsonl(path, text_field, label_field)
    return _read_table(path, fmt, text_field, label_field, columns)


def _read_table(path: Path, fmt: str, text_field: str, label_field: str,
                columns: list[str] | None) -> list[Example]:
    kwargs = dict(delimiter="\t", quoting=csv.QUOTE_NONE) if fmt == "tsv" else {}
    text = io.read_text(path, "data file", "pass a CSV, TSV or JSONL text file")
    rows = csv.reader(text.splitlines(keepends=True), **kwargs)
    if columns:
        names, first = list(columns), 1
    else:
        try:
            names = next(rows)
        except StopIteration:
            raise UserError(f"{path} is empty; it needs a header line and examples") from None
        first = 2
    for want in (text_field, label_field):
        if want not in names:
            hint = (" If the file has no header line, name its columns with --columns, e.g. "
                    f"--columns {label_field},{text_field}") if not columns else ""
            which = "--text-field" if want == text_field else "--label-field"
            raise UserError(f"{path} has no column {want!r} ({which}); its columns are: "
                            f"{', '.join(repr(n) for n in names)}.{hint}")
    ti, li = names.index(text_field), names.index(label_field)
    out = []
    for lineno, row in enumerate(rows, start=first):
        if not row or row == [""]:
            continue
        if len(row) != len(names):
            raise UserError(f"{path}:{lineno} has {len(row)} fields, the header names {len(names)} "
                            f"({', '.join(names)}); fix the line or the --columns")
        out.append(Example(row[ti], row[li], f"{path}:{lineno}"))
    return _checked(out, path)


def _read_jsonl(path: Path, text_field: str, label_field: str) -> list[Example]:
    out = []
    for lineno, record in io.read_jsonl(path, "data file"):
        for want, flag in ((text_field, "--text-field"), (label_field, "--label-field")):
            if want not in record:
                raise UserError(f"{path}:{lineno} has no field {want!r} ({flag}); its fields are: "
                                f"{', '.join(repr(k) for k in record)}")
        text = record[text_field]
        if not isinstance(text, str):
            raise UserError(f"{path}:{lineno}: field {text_field!r} is a {type(text).__name__}, "
                            "not text; choose the text field with --text-field")
        label = record[label_field]
        if not isinstance(label, (str, int, float, bool)) or label is None:
            raise UserError(f"{path}:{lineno}: label {label!r} is not text or a number")
        out.append(Example(text, _label_text(label), f"{path}:{lineno}"))
    return _checked(out, path)


def _checked(examples: list[Example], path: Path) -> list[Example]:
    if not examples:
        raise UserError(f"{path} holds no examples")
    for ex in examples:
        if ex.label.strip() == "":
            raise UserError(f"{ex.where} has an empty label; every example needs one")
    return examples


def label_order(labels, given: list[str] | None = None) -> list[str]:
    """The class names in id order: `given`, or sorted (numerically when all are integers)."""
    found = set(labels)
    if given:
        if len(set(given)) != len(given):
            raise UserError(f"--labels {','.join(given)} names a label twice")
        unknown = sorted(found - set(given))
        if unknown:
            raise UserError(f"the training data has labels {unknown} that --labels {','.join(given)} "
                            "does not list; add them or leave --labels out")
        names = list(given)
    else:
        try:
            names = sorted(found, key=int)
        except ValueError:
            names = sorted(found)
    present = [n for n in names if n in found]
    if len(present) < 2:
        raise UserError(f"the training data has a single class ({', '.join(present) or 'none'}); a "
                        "classifier needs examples of at least two (check --label-field)")
    return names


def balance_classes(examples: list[Example], rng: random.Random) -> list[Example]:
    """Downsample every class to the size of the smallest (a random subset, order kept)."""
    by_label: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        by_label.setdefault(ex.label, []).append(i)
    n = min(len(v) for v in by_label.values())
    keep = set()
    for label in sorted(by_label):
        keep.update(rng.sample(by_label[label], n))
    return [ex for i, ex in enumerate(examples) if i in keep]


def split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """(train, val, test): train and val rounded down, test takes the rest (val does, without test)."""
    v, t = Fraction(str(val_fraction)), Fraction(str(test_fraction))
    if v < 0 or t < 0 or v + t >= 1:
        raise UserError(f"--val-fraction {val_fraction} and --test-fraction {test_fraction} must be "
                        "non-negative and leave some examples to train on")
    n_train = math.floor(n * (1 - v - t))
    if t == 0:
        return n_train, n - n_train, 0
    n_val = math.floor(n * v)
    return n_train, n_val, n - n_train - n_val


def make_splits(examples: list[Example], val_fraction: float, test_fraction: float, balance: bool,
                seed: int) -> dict[str, list[Example]]:
    rng = random.Random(seed)
    if balance:
        examples = balance_classes(examples, rng)
    examples = list(examples)
    rng.shuffle(examples)
    n_train, n_val, _ = split_sizes(len(examples), val_fraction, test_fraction)
    return {"train": examples[:n_train], "val": examples[n_train:n_train + n_val],
            "test": examples[n_train + n_val:]}



# ------------------------------------------------------------------------ batches


def encode_texts(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids, cut to max_length (the start is kept); an empty text is one <|endoftext|>."""
    eot = tokenizer.eot_id if tokenizer.eot_id is not None else 0
    return [(tokenizer.encode(t) or [eot])[:max_length] for t in texts]


def pad_texts(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest in the batch: (B, T) ids and (B,) lengths."""
    T = max(len(s) for s in seqs)
    idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        idx[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    return idx.to(device), lengths.to(device)
