"""Text -> token shards -> batches: everything between raw text and the training loop.

`prepare` turns a corpus into a *data directory*::

    data/
      meta.json           what is in here: tokenizer identity, dtype, token counts, shard names
      tokenizer.json      the tokenizer that made the ids, so the directory describes itself
      train_000000.bin    the training ids, in order (more shards if there are many tokens)
      val_000000.bin      the held-out ids

and the rest of this module reads it back: `read_meta`, `check_tokenizer`,
`open_shard`, `load_tokens`, `TokenLoader` (the batches of pretraining) and
`SlidingWindowDataset` (the same idea as a `torch.utils.data.Dataset`).

Documents
---------
Every document is preceded by `<|endoftext|>` (the "eot" token). GPT-2 was
trained this way: the token ends the document before it and announces the
one after it, so the first token of each split is eot and a model sampling
from a lone eot starts a fresh document. Text is encoded with
`encode_ordinary`, so a document that merely *contains* the characters
"<|endoftext|>" gets ordinary ids for them, never the special id.

Whole documents go to train or val. Document i (counting from 0) goes to val
when floor((i+1)*f) > floor(i*f), with f = val_fraction. That puts exactly
floor(n*f) of the first n documents in val, spread evenly (with f = 0.01,
documents 99, 199, 299, ...), and it is decided the moment a document
arrives, so the corpus can be streamed. f is taken as the decimal it is
written as (0.005 is exactly 1/200), so the rule has no rounding surprises.

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

Robustness
----------
Tokenising runs in worker processes that each build their tokenizer once;
pieces of text go out in order and ids come back in order, and at most a few
batches are in flight, so memory stays bounded however big the corpus is.
Ids are appended to the shard files as they come. The directory is built
under a hidden temporary name next to the target and renamed into place only
when complete; any failure or Ctrl-C removes it. A directory with a
meta.json is therefore always a finished one.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import shutil
import signal
import struct
import sys
import time
from collections import deque
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from gpt2lab import sources
from gpt2lab.checkpoint import fsync_dir, write_json
from gpt2lab.errors import UserError
from gpt2lab.tokenizer import BPETokenizer, FastTokenizer, Tokenizer, get_tokenizer, load_tokenizer_file

FORMAT = "gpt2lab-data"
VERSION = 1
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "val")

MAGIC = b"GPT2LABT"
SHARD_VERSION = 1
HEADER_BYTES = 1024
_HEADER = struct.Struct("<8sIIQ")  # magic, version, itemsize, count

# How text is cut and batched on its way to the workers. Module-level so that
# tests can make them tiny and exercise the cutting and batching paths.
CHUNK_CHARS = sources.CHUNK_CHARS  # a document is cut into pieces of about this size
BATCH_CHARS = 1 << 20  # characters sent to a worker in one task
BATCH_PIECES = 4096  # ... or this many pieces, whichever comes first


# --------------------------------------------------------------------- shards


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The smallest id type that holds every id of the vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def shard_header(count: int, itemsize: int) -> bytes:
    """The 1024-byte header of a shard holding `count` ids of `itemsize` bytes."""
    return _HEADER.pack(MAGIC, SHARD_VERSION, itemsize, count).ljust(HEADER_BYTES, b"\0")


class ShardWriter:
    """Appends the ids of one split to numbered shard files, rolling over every `shard_tokens` ids.

    A shard's header first says 0 ids; the real count is written when the
    shard is finished, so a shard cut short never passes `open_shard`.
    """

    def __init__(self, directory: str | os.PathLike, split: str, dtype, shard_tokens: int):
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be at least 1, got {shard_tokens}")
        self.directory = Path(directory)
        self.split = split
        self.dtype = np.dtype(dtype)
        self.shard_tokens = shard_tokens
        self.shards: list[str] = []  # names of the shards written so far
        self.tokens = 0  # ids written in all shards
        self._file = None
        self._count = 0  # ids in the open shard

    def write(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids)
        if ids.dtype != self.dtype:
            ids = ids.astype(self.dtype)
        while len(ids):
            if self._file is None:
                name = f"{self.split}_{len(self.shards):06d}.bin"
                self._file = open(self.directory / name, "wb", buffering=1 << 20)
                self._file.write(shard_header(0, self.dtype.itemsize))
                self.shards.append(name)
            room = self.shard_tokens - self._count
            part, ids = ids[:room], ids[room:]
            self._file.write(part.tobytes())
            self._count += len(part)
            self.tokens += len(part)
            if self._count == self.shard_tokens:
                self._finish_shard()

    def _finish_shard(self) -> None:
        f = self._file
        f.seek(0)
        f.write(shard_header(self._count, self.dtype.itemsize))
        f.flush()
        os.fsync(f.fileno())
        f.close()
        self._file, self._count = None, 0

    def close(self) -> list[str]:
        if self._file is not None:
            self._finish_shard()
        return self.shards

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


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


# ------------------------------------------------------------------- prepare


class _ValSplitter:
    """Document i goes to val when floor((i+1)*f) > floor(i*f), in exact integer arithmetic."""

    def __init__(self, val_fraction: float):
        # str(0.005) == "0.005", so 0.005 becomes exactly 1/200
        frac = Fraction(str(float(val_fraction)))
        self.num, self.den = frac.numerator, frac.denominator

    def is_val(self, i: int) -> bool:
        return (i + 1) * self.num // self.den > i * self.num // self.den

    def first_val(self) -> int:
        """How many documents it takes before one goes to val."""
        return math.ceil(self.den / self.num) if self.num else 0


def _tokenizer_spec(tok: Tokenizer, given) -> tuple:
    """How a worker process rebuilds the tokenizer: by name/path, or from its full definition."""
    if isinstance(given, (str, os.PathLike)):
        spec = str(given)
        return ("path", spec if spec == "gpt2" else str(Path(spec).resolve()))
    return ("dict", tok.to_dict(), tok.fast)


def _build_tokenizer(spec: tuple) -> Tokenizer:
    if spec[0] == "path":
        return get_tokenizer(spec[1])
    slow = BPETokenizer.from_dict(spec[1])
    return FastTokenizer(slow) if spec[2] else slow


_worker: dict = {}  # a worker process's tokenizer, eot id and id dtype, set by _init_worker


def _init_worker(spec: tuple, eot_id: int, dtype: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled once, by the parent
    _worker.update(tok=_build_tokenizer(spec), eot_id=eot_id, dtype=np.dtype(dtype))


def _encode_pieces(tok: Tokenizer, eot_id: int, dtype: np.dtype, texts: list[str],
                   starts: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    """Encode a batch of pieces: one flat id array (eot before each document's first piece)
    and the number of ids each piece contributed to it."""
    ids: list[int] = []
    lengths = np.empty(len(texts), dtype=np.int64)
    for k, (text, start) in enumerate(zip(texts, starts)):
        before = len(ids)
        if start:
            ids.append(eot_id)
        ids.extend(tok.encode_ordinary(text))
        lengths[k] = len(ids) - before
    return np.array(ids, dtype=dtype), lengths


def _encode_in_worker(texts: list[str], starts: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    return _encode_pieces(_worker["tok"], _worker["eot_id"], _worker["dtype"], texts, starts)


def _pool_context():
    # fork starts workers instantly and shares the already-loaded vocabulary;
    # elsewhere use the platform's safe default (spawn)
    return mp.get_context("fork") if sys.platform.startswith("linux") else mp.get_context()


def _batches(pieces, splitter: _ValSplitter, counts: dict):
    """Group pieces into worker tasks: (texts, starts, splits, chars).

    Assigns each non-empty document its index and split; empty documents
    (an empty file, two separators in a row) are dropped.
    """
    texts, starts, splits, chars = [], [], [], 0
    starting, split = True, 0
    for piece in pieces:
        if starting:
            if not piece.text:  # an empty document: nothing to write, not counted
                continue
            split = 1 if splitter.is_val(counts["documents"]) else 0
            counts["documents"] += 1
        if piece.text:
            texts.append(piece.text)
            starts.append(starting)
            splits.append(split)
            chars += len(piece.text)
        starting = piece.last
        if chars >= BATCH_CHARS or len(texts) >= BATCH_PIECES:
            yield texts, starts, splits, chars
            texts, starts, splits, chars = [], [], [], 0
    if texts:
        yield texts, starts, splits, chars


def _write_result(result, splits: list[int], writers: list[ShardWriter]) -> None:
    """Write a batch's ids, one write per run of pieces that go to the same split."""
    ids, lengths = result
    ends = np.cumsum(lengths)
    run_start, begin = 0, 0
    for k in range(1, len(splits) + 1):
        if k == len(splits) or splits[k] != splits[run_start]:
            end = int(ends[k - 1])
            writers[splits[run_start]].write(ids[begin:end])
            run_start, begin = k, end


def prepare(
    inputs: list[str],
    out_dir: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike | Tokenizer = "gpt2",
    val_fraction: float = 0.005,
    text_field: str = "text",
    doc_separator: str | None = None,
    hf_dataset: str | None = None,
    hf_split: str = "train",
    hf_config: str | None = None,
    workers: int | None = None,
    shard_tokens: int = 100_000_000,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Tokenise documents into a data directory of train/val shards; returns its meta.json.

    inputs: files (.txt, .gz, .jsonl, ...), directories and globs, read by
      `gpt2lab.sources` (empty when `hf_dataset` is given: one or the other).
    tokenizer: 'gpt2', a tokenizer directory, or a tokenizer object.
    val_fraction: share of whole documents held out, by the rule in the module docstring.
    doc_separator: also cut files into documents at this string.
    workers: tokeniser processes (default: all CPUs; 1 runs in this process).
    shard_tokens: ids per shard file.
    overwrite: replace an existing `out_dir` (only once the new one is complete).
    """
    t0 = time.perf_counter()
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = [str(x) for x in inputs]
    if hf_dataset and inputs:
        raise UserError("give either input files or --hf-dataset, not both; prepare them into separate "
                        "data directories")
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}; e.g. --val-fraction 0.005")
    if shard_tokens < 1:
        raise UserError(f"shard_tokens must be at least 1, got {shard_tokens}")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise UserError(f"workers must be at least 1, got {workers}")

    out = Path(out_dir).absolute()
    if out.exists() and not (overwrite and out.is_dir()):
        what = "a file" if not out.is_dir() else "a directory"
        raise UserError(f"{out_dir} already exists ({what}); choose another --out"
                        + (" or pass --overwrite to replace it" if out.is_dir() else ""))
    tok = get_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    if tok.eot_id is None:
        raise UserError(f"tokenizer {tok.name!r} has no <|endoftext|> token to separate documents; "
                        "train one with `gpt2lab tokenizer train` (it adds it) or use 'gpt2'")
    dtype = dtype_for_vocab(tok.vocab_size)

    if not hf_dataset:
        sources.expand_inputs(inputs)  # fail on a bad path before starting any work
    stats = sources.ReadStats()
    if hf_dataset:
        pieces = sources.iter_hf_pieces(hf_dataset, hf_split, hf_config, text_field, stats,
                                        chunk_chars=CHUNK_CHARS)
    else:
        pieces = sources.iter_pieces(inputs, text_field, doc_separator, stats,
                                     chunk_chars=CHUNK_CHARS)
    splitter = _ValSplitter(val_fraction)
    counts = {"documents": 0}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    writers = [ShardWriter(tmp, split, dtype, shard_tokens) for split in SPLITS]
    documents = [0, 0]
    pool = None
    bar = None
    try:
        if workers > 1:
            pool = _pool_context().Pool(workers, initializer=_init_worker,
                                        initargs=(_tokenizer_spec(tok, tokenizer), tok.eot_id, dtype.str))
        bar = tqdm(desc="tokenising", unit="char", unit_scale=True, disable=not progress,
                   dynamic_ncols=True, file=sys.stderr)

        def consume(result, batch):
            texts, starts, splits, chars = batch
            _write_result(result, splits, writers)
            for start, split in zip(starts, splits):
                documents[split] += start
            bar.update(chars)

        # Pool.imap would read the whole input ahead of the workers (unbounded
        # memory); instead keep a fixed number of batches in flight, in order.
        in_flight: deque = deque()
        for batch in _batches(pieces, splitter, counts):
            if pool is None:  # workers=1: tokenise right here
                consume(_encode_pieces(tok, tok.eot_id, dtype, batch[0], batch[1]), batch)
                continue
            in_flight.append((pool.apply_async(_encode_in_worker, (batch[0], batch[1])), batch))
            if len(in_flight) >= 2 * workers + 2:
                job, done = in_flight.popleft()
                consume(job.get(), done)
        while in_flight:
            job, done = in_flight.popleft()
            consume(job.get(), done)
        bar.close()

        shards = [w.close() for w in writers]
        tokens = [w.tokens for w in writers]
        if counts["documents"] == 0:
            where = f"the dataset {hf_dataset!r}" if hf_dataset else ", ".join(map(str, inputs))
            hint = f", or check --text-field {text_field!r}" if stats.skipped_records else ""
            raise UserError(f"{where} holds no text (no non-empty document); give input that contains "
                            f"text{hint}")
        if val_fraction > 0 and tokens[1] == 0:
            n = counts["documents"]
            raise UserError(f"the input has {n} document{'s' * (n != 1)}, too few for --val-fraction "
                            f"{val_fraction}: the first validation document is number "
                            f"{splitter.first_val()}; split files into documents with --doc-separator "
                            "(e.g. '\\n\\n'), add documents, raise --val-fraction, or pass --val-fraction 0 "
                            "for no validation split")
        if tokens[0] == 0:
            raise UserError("every document went to the validation split; lower --val-fraction")

        tok.save(tmp)
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "tokenizer": tok.identity(),
            "vocab_size": tok.vocab_size,
            "eot_id": tok.eot_id,
            "dtype": dtype.name,
            "splits": {split: {"tokens": tokens[k], "documents": documents[k], "shards": shards[k]}
                       for k, split in enumerate(SPLITS)},
            "sources": list(stats.sources),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "val_fraction": float(val_fraction),
            "doc_separator": doc_separator,
            "input": {"files": stats.files, "chars": stats.chars, "replaced_bytes": stats.replaced_bytes,
                      "skipped_records": stats.skipped_records},
        }
        write_json(tmp / META_FILE, meta)
        fsync_dir(tmp)
        _move_into_place(tmp, out)
    except BaseException:
        if bar is not None:
            bar.close()
        for w in writers:
            w.abort()
        if pool is not None:
            pool.terminate()
            pool = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if pool is not None:
            pool.close()
            pool.join()

    seconds = time.perf_counter() - t0
    if progress:
        total = sum(tokens)
        docs = [f"{n:,} document{'s' * (n != 1)}" for n in documents]
        line = (f"prepared {out_dir}: train {tokens[0]:,} tokens ({docs[0]}), "
                f"val {tokens[1]:,} tokens ({docs[1]}) in {seconds:.1f} s, "
                f"{total / max(seconds, 1e-9):,.0f} tokens/s")
        if stats.replaced_bytes:
            line += f"; replaced {stats.replaced_bytes:,} invalid UTF-8 bytes with U+FFFD"
        if stats.skipped_records:
            line += f"; skipped {stats.skipped_records:,} records with empty text"
        print(line, flush=True)
    return meta


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished temp dir to `out`; an old `out` is removed only after that."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------- reading


def read_meta(data_dir: str | os.PathLike) -> dict:
    """meta.json of a data directory, checked to be one this gpt2lab can read."""
    d = Path(data_dir)
    fix = f"run `gpt2lab prepare --input ... --out {data_dir}` first"
    if not d.is_dir():
        raise UserError(f"data directory {data_dir} does not exist; {fix}")
    path = d / META_FILE
    if not path.is_file():
        raise UserError(f"{data_dir} has no {META_FILE}, so it is not a prepared data directory; {fix}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); prepare the data again with "
                        "`gpt2lab prepare --overwrite`") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise UserError(f"{path} is not a gpt2lab data description (format {found!r}, expected "
                        f"{FORMAT!r}); point at a directory made by `gpt2lab prepare`")
    if meta.get("version") != VERSION:
        raise UserError(f"{path} has data format version {meta.get('version')!r}, this gpt2lab reads "
                        f"version {VERSION}; prepare the data again with `gpt2lab prepare --overwrite`")
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


def _split_shards(data_dir: str | os.PathLike, split: str) -> tuple[dict, list[np.ndarray]]:
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
    meta, arrays = _split_shards(data_dir, split)
    if len(arrays) == 1:
        return arrays[0]
    if not arrays:
        return np.empty(0, dtype=np.dtype(meta["dtype"]))
    return np.concatenate(arrays)


# ------------------------------------------------------------------- batches


class TokenLoader:
    """Batches (x, y) of shape (batch_size, seq_len) for language modelling; y is x shifted by one.

    Every row is a window of seq_len + 1 consecutive ids from one shard:
    x = window[:-1], y = window[1:].

    mode="random": window starts drawn uniformly from every start that fits,
      by a numpy Generator seeded from (seed, rank), so each rank of a
      distributed run sees different data. The usual choice for training.
    mode="sequential": the split cut into consecutive windows (each starting
      where the previous one's x ended), walked in order. Step k hands rank r
      of W windows [k*B*W + r*B, k*B*W + (r+1)*B): the ranks share out each
      step's B*T*W tokens in contiguous slices. At the end it wraps around
      and `epoch` counts up. The usual choice for evaluation.

    `state_dict()` captures where the stream is; `load_state_dict()` puts a
    fresh loader there, after which it returns exactly the batches the old
    one would have: that is what makes a resumed training run bitwise equal.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str,
        batch_size: int,
        seq_len: int,
        *,
        mode: str = "random",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
    ):
        if mode not in ("random", "sequential"):
            raise ValueError(f"mode must be 'random' or 'sequential', got {mode!r}")
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be at least 1, got {batch_size} and {seq_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.data_dir, self.split, self.mode = str(data_dir), split, mode
        self.batch_size, self.seq_len = batch_size, seq_len
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.device = torch.device(device)
        self.meta, self.shards = _split_shards(data_dir, split)
        self.tokens = sum(len(s) for s in self.shards)

        window = seq_len + 1
        longest = max((len(s) for s in self.shards), default=0)
        if longest < window:
            detail = f"{self.tokens} tokens" + (f" (at most {longest} in one shard)"
                                                if len(self.shards) > 1 else "")
            hint = (" (it was prepared with --val-fraction 0)"
                    if self.tokens == 0 and self.meta.get("val_fraction") == 0 else "")
            raise UserError(f"the {split} split of {data_dir} has {detail}{hint}, but one window of "
                            f"seq_len + 1 = {window} tokens is needed; use a smaller --seq-len or "
                            "prepare more data")
        if mode == "random":
            # number of valid window starts per shard, and their running total
            counts = np.array([max(0, len(s) - seq_len) for s in self.shards], dtype=np.int64)
        else:
            # windows at offsets 0, T, 2T, ... with offset + T + 1 <= shard length
            counts = np.array([max(0, (len(s) - 1) // seq_len) for s in self.shards], dtype=np.int64)
        self._cum = np.cumsum(counts)
        self._total = int(self._cum[-1])
        self._rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, rank])))
        self._position = 0  # sequential: global index of the next step's first window

    @property
    def epoch(self) -> int:
        """Sequential mode: how many times the whole split has been walked."""
        return self._position // self._total if self.mode == "sequential" else 0

    @property
    def steps_per_epoch(self) -> int:
        """Sequential mode: whole steps (of all ranks) in one pass over the split."""
        return max(1, self._total // (self.batch_size * self.world_size))

    def _locate(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global window index -> (shard, index within that shard)."""
        shard = np.searchsorted(self._cum, index, side="right")
        before = np.where(shard > 0, self._cum[shard - 1], 0)
        return shard, index - before

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = self.batch_size, self.seq_len
        if self.mode == "random":
            index = self._rng.integers(0, self._total, size=B)
            shard, starts = self._locate(index)
        else:
            first = self._position + self.rank * B
            index = (first + np.arange(B)) % self._total
            self._position += B * self.world_size
            shard, within = self._locate(index)
            starts = within * T
        rows = np.empty((B, T + 1), dtype=np.int64)
        for b in range(B):
            s = int(starts[b])
            rows[b] = self.shards[shard[b]][s:s + T + 1]
        batch = torch.from_numpy(rows)
        x, y = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
        if self.device.type == "cuda":
            # page-locked host memory lets the copy run asynchronously with compute
            x = x.pin_memory().to(self.device, non_blocking=True)
            y = y.pin_memory().to(self.device, non_blocking=True)
        elif self.device.type != "cpu":
            x, y = x.to(self.device), y.to(self.device)
        return x, y

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        state = {"mode": self.mode, "split": self.split, "batch_size": self.batch_size,
                 "seq_len": self.seq_len, "seed": self.seed, "rank": self.rank,
                 "world_size": self.world_size}
        if self.mode == "random":
            state["rng"] = self._rng.bit_generator.state
        else:
            state["position"] = self._position
            state["epoch"] = self.epoch
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("mode") != self.mode:
            raise UserError(f"the saved data position is for mode {state.get('mode')!r}, this loader is "
                            f"{self.mode!r}; resume with the same data settings")
        if self.mode == "random":
            self._rng.bit_generator.state = state["rng"]
        else:
            if state.get("seq_len") != self.seq_len:
                raise UserError(f"the saved data position is for seq_len {state.get('seq_len')}, this "
                                f"loader has {self.seq_len}; resume with the same --seq-len")
            self._position = int(state["position"])


class SlidingWindowDataset(torch.utils.data.Dataset):
    """Input/target windows slid over a stream of ids, for a `torch.utils.data.DataLoader`.

    Item i is the window that starts at i * stride: x = ids[s : s + max_length]
    and y = ids[s + 1 : s + max_length + 1], the same ids shifted by one, so
    at every position the target is the token that comes next. stride =
    max_length gives windows that touch without overlapping; a smaller
    stride overlaps them (more, correlated, samples); a larger one skips text.

    `ids` is a 1-D array of ids, or a data directory (with `split`).
    """

    def __init__(self, ids, max_length: int, stride: int | None = None, *, split: str = "train"):
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length}")
        stride = max_length if stride is None else stride
        if stride < 1:
            raise ValueError(f"stride must be at least 1, got {stride}")
        if isinstance(ids, (str, os.PathLike)):
            ids = load_tokens(ids, split)
        elif isinstance(ids, torch.Tensor):
            ids = ids.numpy()
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise ValueError(f"ids must be 1-D, got shape {ids.shape}")
        if len(ids) < max_length + 1:
            raise UserError(f"{len(ids)} tokens are too few for one window of max_length + 1 = "
                            f"{max_length + 1}; use a smaller max_length or more text")
        self.ids, self.max_length, self.stride = ids, max_length, stride
        self._n = (len(ids) - max_length - 1) // stride + 1

    @classmethod
    def from_text(cls, text: str, tokenizer: Tokenizer, max_length: int, stride: int | None = None):
        """Windows over one text; `<|endoftext|>` in it becomes the eot id, as in the book's example."""
        ids = tokenizer.encode(text, allowed_special={"<|endoftext|>"})
        return cls(np.array(ids, dtype=np.int64), max_length, stride)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -self._n <= i < self._n:
            raise IndexError(f"window {i} out of range for {self._n} windows")
        s = (i % self._n) * self.stride
        window = torch.from_numpy(np.asarray(self.ids[s:s + self.max_length + 1], dtype=np.int64))
        return window[:-1], window[1:]


__all__ = [
    "HEADER_BYTES", "MAGIC", "ShardWriter", "SlidingWindowDataset", "TokenLoader", "check_tokenizer",
    "data_tokenizer", "dtype_for_vocab", "load_tokens", "open_shard", "prepare", "read_meta", "shard_header",
]
