"""The data directory and its shards, read back as batches.

`gpt2lab prepare` (prepare.py) writes a *data directory*::

    data/
      meta.json           what is in here: tokenizer identity, dtype, token counts, shard names
      tokenizer.json      the tokenizer that made the ids, so the directory describes itself
      train_000000.bin    the training ids, in order (more shards if there are many tokens)
      val_000000.bin      the held-out ids

and this module reads it: `read_meta`, `check_tokenizer`, `open_shard`, `load_tokens`
(batches of it are loader.py's).

Shard files
-----------
A shard is a 1024-byte header followed by the ids, nothing else::

    offset  size  little-endian field
         0     8  magic b"GPT2LABT"
         8     4  uint32 format version (1)
        12     4  uint32 itemsize: 2 for uint16 ids, 4 for uint32 ids
        16     8  uint64 number of ids that follow
        24  1000  zero
      1024   n*itemsize  the ids

uint16 is used when every id fits (vocab_size <= 65536, true of GPT-2's
50257), uint32 otherwise. Shards are named train_000000.bin,
train_000001.bin, ... and a new one is started every `shard_tokens` ids.
The fixed header keeps the ids aligned and lets `np.memmap` read a shard of
any size without loading it: a batch only touches the pages it needs.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from gpt2lab import io
from gpt2lab.errors import UserError
from gpt2lab.tokenizer import Tokenizer, load_tokenizer_file

FORMAT = "gpt2lab-data"
VERSION = 1
META_FILE = io.DATA_META
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "val")

MAGIC = b"GPT2LABT"
SHARD_VERSION = 1
HEADER_BYTES = 1024
_HEADER = struct.Struct("<8sIIQ")  # magic, version, itemsize, count


# --------------------------------------------------------------------- shards


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The smallest id type that holds every id of the vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def shard_header(count: int, itemsize: int) -> bytes:
    """The 1024-byte header of a shard holding `count` ids of `itemsize` bytes."""
    return _HEADER.pack(MAGIC, SHARD_VERSION, itemsize, count).ljust(HEADER_BYTES, b"\0")

def open_shard(path: str | os.PathLike) -> np.ndarray:
    """The ids of one shard as a read-only memory map, after checking its header and size."""
    path = Path(path)
    fix = "prepare the data again with `gpt2lab prepare`"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise UserError(f"shard {path} is missing; {fix}") from None
    if len(head) < HEADER_BYTES:
        raise UserError(f"shard {path} is {size} bytes, shorter than its {HEADER_BYTES}-byte header; "
                        f"the file is truncated, {fix}")
    magic, version, itemsize, count = _HEADER.unpack_from(head)
    if magic != MAGIC:
        raise UserError(f"{path} is not a gpt2lab shard (bad magic {magic!r}, expected {MAGIC!r}); {fix}")
    if version != SHARD_VERSION:
        raise UserError(f"shard {path} has format version {version}, this gpt2lab reads version "
                        f"{SHARD_VERSION}; {fix} or upgrade gpt2lab")
    if itemsize not in (2, 4):
        raise UserError(f"shard {path} has a bad header (itemsize {itemsize}, expected 2 or 4); {fix}")
    expected = HEADER_BYTES + count * itemsize
    if size != expected:
        raise UserError(f"shard {path} is {size} bytes but its header promises {count} ids "
                        f"({expected} bytes); the file is truncated or corrupt, {fix}")
    dtype = np.uint16 if itemsize == 2 else np.uint32
    if count == 0:
        return np.empty(0, dtype=dtype)  # a zero-length file region cannot be memory-mapped
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))

# ------------------------------------------------------------------- reading


def read_meta(data_dir: str | os.PathLike) -> dict:
    """meta.json of a data directory, checked to be one this gpt2lab can read."""
    d = Path(data_dir)
    fix = f"run `gpt2lab prepare --input ... --out {data_dir}` first"
    if not d.exists():
        raise UserError(f"data directory {data_dir} does not exist; {fix}")
    if not d.is_dir():
        raise UserError(f"{data_dir} is a file, not a data directory; {fix}")
    path = d / META_FILE
    if not path.is_file():
        raise UserError(f"{data_dir} has no {META_FILE}, so it is not a prepared data directory; {fix}")
    meta = io.read_json(path, "data description", "prepare the data again with `gpt2lab prepare --overwrite`")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise UserError(f"{path} is not a gpt2lab data description (format {found!r}, expected "
                        f"{FORMAT!r}); point at a directory made by `gpt2lab prepare`")
    if meta.get("version") != VERSION:
        raise UserError(f"{path} has data format version {meta.get('version')!r}, this gpt2lab reads "
                        f"version {VERSION}; prepare the data again with `gpt2lab prepare --overwrite`")
    try:
        if not isinstance(meta["tokenizer"]["sha256"], str) or np.dtype(meta["dtype"]).kind != "u":
            raise ValueError("bad tokenizer or dtype")
        for split in meta["splits"].values():
            if not isinstance(split["tokens"], int) or not all(isinstance(n, str) and "/" not in n
                                                               and n.endswith(".bin") for n in split["shards"]):
                raise ValueError("bad split")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{path} is damaged ({e}); prepare the data again with "
                        "`gpt2lab prepare --overwrite`") from None
    return meta


def check_tokenizer(meta: dict, tokenizer: Tokenizer, data_dir: str | os.PathLike | None = None) -> None:
    """Refuse data whose ids were made by another tokenizer than `tokenizer`."""
    have = meta["tokenizer"]
    want = tokenizer.identity()
    if have.get("sha256") == want["sha256"]:
        return
    where = f"the data in {data_dir}" if data_dir is not None else "the data"
    spec = "gpt2" if want["name"] == "gpt2" else f"<the directory of tokenizer {want['name']!r}>"
    raise UserError(f"{where} was prepared with tokenizer {have.get('name')!r} (sha256 "
                    f"{str(have.get('sha256'))[:12]}...), but this uses tokenizer {want['name']!r} "
                    f"(sha256 {want['sha256'][:12]}...); their ids differ, so prepare the data again with "
                    f"--tokenizer {spec}")


def data_tokenizer(data_dir: str | os.PathLike, fast: bool = True) -> Tokenizer:
    """The tokenizer stored in a data directory (the one that made its ids)."""
    read_meta(data_dir)
    return load_tokenizer_file(Path(data_dir) / TOKENIZER_FILE, fast=fast)


def split_shards(data_dir: str | os.PathLike, split: str) -> tuple[dict, list[np.ndarray]]:
    meta = read_meta(data_dir)
    splits = meta.get("splits", {})
    if split not in splits:
        raise UserError(f"{data_dir} has no split {split!r}; it has {sorted(splits)}")
    info = splits[split]
    arrays = [open_shard(Path(data_dir) / name) for name in info["shards"]]
    want = np.dtype(meta["dtype"])
    for name, a in zip(info["shards"], arrays):
        if a.dtype != want:
            raise UserError(f"shard {Path(data_dir) / name} holds {a.dtype} ids but meta.json says "
                            f"{want}; prepare the data again with `gpt2lab prepare --overwrite`")
    if sum(len(a) for a in arrays) != info["tokens"]:
        raise UserError(f"the {split} shards of {data_dir} hold {sum(len(a) for a in arrays)} ids but "
                        f"meta.json says {info['tokens']}; prepare the data again with "
                        "`gpt2lab prepare --overwrite`")
    return meta, arrays


def load_tokens(data_dir: str | os.PathLike, split: str = "train") -> np.ndarray:
    """All ids of a split, in order: a memory map when it has one shard (the usual case)."""
    meta, arrays = split_shards(data_dir, split)
    if len(arrays) == 1:
        return arrays[0]
    if not arrays:
        return np.empty(0, dtype=np.dtype(meta["dtype"]))
    return np.concatenate(arrays)

# ------------------------------------------------------------------- batches


__all__ = ["HEADER_BYTES", "MAGIC", "check_tokenizer", "data_tokenizer", "dtype_for_vocab", "load_tokens",
           "open_shard", "read_meta", "shard_header"]
