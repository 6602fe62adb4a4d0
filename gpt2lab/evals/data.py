"""The data of the evaluation tasks: where the standard test sets come from, and how each file is read.

  hellaswag  hellaswag_val.jsonl (rowanz/hellaswag), downloaded once into the cache dir
  lambada    lambada_test.jsonl (OpenAI's LAMBADA, as GPT-2 was scored), downloaded once
  mc         any JSONL of {"context", "choices": [...], "label": i}
  loss       a data dir made by `gpt2lab prepare` (its val split) or text files

Offline, fetch a file where there is a network and pass it with `--data` (or put it in the
cache dir: $GPT2LAB_CACHE, else $XDG_CACHE_HOME/gpt2lab, else ~/.cache/gpt2lab). Every record
is checked: a malformed one is one error naming the file and line.
"""

from __future__ import annotations

import glob
import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpt2lab import io
from gpt2lab.data.shards import check_tokenizer, load_tokens, read_meta
from gpt2lab.errors import UserError
from gpt2lab.sources import expand_inputs, iter_pieces

# Where the standard test sets live: the original files, cached after the first download.
DOWNLOADS = {
    "hellaswag": ("https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl",
                  "hellaswag_val.jsonl", 10042),
    "lambada": ("https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl",
                "lambada_test.jsonl", 5153),
}


def cache_dir() -> Path:
    """$GPT2LAB_CACHE, else $XDG_CACHE_HOME/gpt2lab, else ~/.cache/gpt2lab."""
    if os.environ.get("GPT2LAB_CACHE"):
        return Path(os.environ["GPT2LAB_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gpt2lab"


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def _download(url: str, dest: Path, expected_lines: int) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with io.atomic_file(dest, "wb") as f, urllib.request.urlopen(url, timeout=60) as response:
        while chunk := response.read(1 << 20):
            f.write(chunk)
        f.flush()
        lines = _count_lines(Path(f.name))
        if lines != expected_lines:
            raise OSError(f"got {lines} records, expected {expected_lines}")


def default_data(task: str, progress: bool = False) -> Path:
    """The standard test set of `task`: cached, else downloaded."""
    url, name, lines = DOWNLOADS[task]
    cached = cache_dir() / name
    if cached.is_file():
        return cached
    try:
        if progress:
            print(f"downloading {url} to {cached}", file=sys.stderr)
        _download(url, cached, lines)
        return cached
    except (OSError, urllib.error.URLError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"cannot download the {task} data from {url} ({reason}); fetch that file on a machine "
                        f"that is online and pass it with --data PATH (or put it at {cached})") from None


# ----------------------------------------------------------------------------- records


def _field(where: str, record: dict, name: str, kind):
    if name not in record:
        raise UserError(f"{where} has no field {name!r} (fields: {sorted(record)}); the file does "
                        "not have this task's format")
    value = record[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise UserError(f"{where}: field {name!r} is {type(value).__name__}, expected "
                        f"{kind.__name__ if isinstance(kind, type) else 'a number'}")
    return value


def _records(path: str | os.PathLike, limit: int | None) -> Iterator[tuple[str, dict]]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; check the path given with --data")
    for i, (lineno, record) in enumerate(io.read_jsonl(path, "data file")):
        if limit is not None and i >= limit:
            return
        yield f"{path}:{lineno}", record


@dataclass(frozen=True)
class MCExample:
    context: str
    choices: list[str]  # scored as " " + choice
    label: int


def _check_choices(where: str, choices, label) -> None:
    if not choices or not all(isinstance(c, str) for c in choices):
        raise UserError(f"{where}: the choices must be a non-empty list of strings")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise UserError(f"{where}: label {label!r} is not the index of one of the {len(choices)} choices "
                        f"(0..{len(choices) - 1})")


def preprocess(text: str) -> str:
    """HellaSwag's cleanup, as in the harness: WikiHow's "[title]" becomes ". ", other tags go."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_example(doc: dict) -> MCExample:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return MCExample(context=preprocess(doc["activity_label"] + ": " + ctx),
                     choices=[preprocess(e) for e in doc["endings"]], label=int(doc["label"]))


def load_hellaswag(path: str | os.PathLike, limit: int | None = None) -> list[MCExample]:
    out = []
    for where, rec in _records(path, limit):
        for name, kind in (("activity_label", str), ("ctx_a", str), ("ctx_b", str), ("endings", list)):
            _field(where, rec, name, kind)
        if "label" not in rec:
            raise UserError(f"{where} has no label; use the validation file hellaswag_val.jsonl (the test "
                            "file has no labels)")
        label = rec["label"]
        if isinstance(label, str) and label.strip().isdigit():
            label = int(label)
        _check_choices(where, rec["endings"], label)
        out.append(hellaswag_example({**rec, "label": label}))
    return out


def load_mc(path: str | os.PathLike, limit: int | None = None) -> list[MCExample]:
    out = []
    for where, rec in _records(path, limit):
        context = _field(where, rec, "context", str)
        choices = _field(where, rec, "choices", list)
        label = _field(where, rec, "label", int)
        _check_choices(where, choices, label)
        out.append(MCExample(context, list(choices), label))
    return out


def lambada_example(text: str) -> tuple[str, str]:
    """(context, target): the passage without its last space-separated word, and " " + that word."""
    words = text.split(" ")
    return " ".join(words[:-1]), " " + words[-1]


def load_lambada(path: str | os.PathLike, limit: int | None = None) -> list[tuple[str, str]]:
    out = []
    for where, rec in _records(path, limit):
        text = _field(where, rec, "text", str)
        context, target = lambada_example(text)
        if not context.strip() or not target.strip():
            raise UserError(f"{where}: a LAMBADA passage needs words before its last one (got {text[:60]!r})")
        out.append((context, target))
    return out


# ----------------------------------------------------------------------------- documents


def split_documents(ids, eot_id: int | None) -> list[np.ndarray]:
    """A prepared split (<|endoftext|> before each document) -> documents that each start with it.

    Text before the first <|endoftext|> is a document like the others; documents
    with nothing after their <|endoftext|> are dropped. The documents are views
    of one int64 copy of the ids.
    """
    ids = np.asarray(ids).astype(np.int64)
    if eot_id is None:
        return [ids] if len(ids) > 1 else []
    starts = np.flatnonzero(ids == eot_id).tolist()
    if not starts or starts[0] != 0:
        ids, starts = np.concatenate([[eot_id], ids]), [0] + [s + 1 for s in starts]
    bounds = starts + [len(ids)]
    return [ids[a:b] for a, b in zip(bounds, bounds[1:]) if b - a > 1]


def text_documents(tokenizer, inputs: Sequence[str], limit: int | None = None) -> list[list[int]]:
    """Text files (as `gpt2lab prepare` reads them) -> [<|endoftext|>] + ids, one list per document."""
    prefix = [tokenizer.eot_id] if tokenizer.eot_id is not None else []
    docs, parts = [], []
    for piece in iter_pieces(list(inputs)):
        parts.append(piece.text)
        if piece.last:
            text = "".join(parts)
            parts = []
            if text:
                docs.append(prefix + tokenizer.encode_ordinary(text))
            if limit is not None and len(docs) >= limit:
                break
    return docs


def is_data_dir(path: str | os.PathLike) -> bool:
    return io.dir_kind(path) == "data"


def loss_documents(tokenizer, data: str, limit: int | None = None, vocab_size: int | None = None) -> list:
    """The documents of a data dir's val split (checked to share the tokenizer), or of text files."""
    if is_data_dir(data):
        check_tokenizer(read_meta(data), tokenizer, data)
        ids = load_tokens(data, "val")
        if vocab_size is not None and len(ids) and int(ids.max()) >= vocab_size:
            raise UserError(f"the val split of {data} holds token id {int(ids.max())}, outside the model's "
                            f"vocabulary of {vocab_size}; the data is corrupt, prepare it again")
        docs = split_documents(ids, tokenizer.eot_id)
        if not docs:
            raise UserError(f"the val split of {data} holds no document; prepare it with a larger "
                            "--val-fraction")
        return docs[:limit] if limit is not None else docs
    return text_documents(tokenizer, [data], limit)


def resolve_data(task: str, path: str | None, run_config: dict | None = None, progress: bool = False) -> str:
    """The data a task reads: the given path (checked to exist), or the task's default."""
    if path is not None:
        if task == "loss" and glob.has_magic(path):
            expand_inputs([path])  # a glob that matches nothing is reported now
            return path
        if not Path(path).exists():
            raise UserError(f"--data {path} for task {task} does not exist; check the path")
        if task != "loss" and Path(path).is_dir():
            raise UserError(f"--data {path} for task {task} is a directory; pass the task's .jsonl file")
        return path
    if task in DOWNLOADS:
        return str(default_data(task, progress))
    if task == "loss":
        trained_on = ((run_config or {}).get("data") or {}).get("path")
        if trained_on and is_data_dir(trained_on):
            return trained_on
        raise UserError("task loss needs --data: a data dir made by `gpt2lab prepare` (its val split is "
                        "scored) or text files")
    raise UserError(f"task {task} needs --data FILE.jsonl with records "
                    '{"context": ..., "choices": [...], "label": i}')
