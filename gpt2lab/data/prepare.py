"""`gpt2lab prepare`: text -> a data directory of token shards.

    data/
      meta.json           what is in here: tokenizer identity, dtype, token counts, shard names
      tokenizer.json      the tokenizer that made the ids, so the directory describes itself
      train_000000.bin    the training ids, in order (more shards if there are many tokens)
      val_000000.bin      the held-out ids

The shard format is shards.py's; this module writes it.

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

Robustness
----------
Tokenising runs in worker processes that each build their tokenizer once;
pieces of text go out in order and ids come back in order, and at most a few
batches are in flight, so memory stays bounded however big the corpus is.
Ids are appended to the shard files as they come. The directory is built
under a hidden temporary name next to the target and renamed into place only
when complete; any failure or Ctrl-C removes it: a directory with a
meta.json is always a finished one.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import signal
import sys
import time
from collections import deque
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path

import numpy as np

from gpt2lab import io, sources
from gpt2lab.data.shards import FORMAT, META_FILE, SPLITS, VERSION, dtype_for_vocab, shard_header
from gpt2lab.errors import UserError
from gpt2lab.metrics import progress as progress_bar
from gpt2lab.tokenizer import BPETokenizer, FastTokenizer, Tokenizer, get_tokenizer

# How text is cut and batched on its way to the workers. Module-level so that
# tests can make them tiny and exercise the cutting and batching paths.
CHUNK_CHARS = sources.CHUNK_CHARS  # a document is cut into pieces of about this size
BATCH_CHARS = 1 << 20  # characters sent to a worker in one task
BATCH_PIECES = 4096  # ... or this many pieces, whichever comes first


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
    protected = list(inputs) + ([str(tokenizer)] if isinstance(tokenizer, (str, os.PathLike))
                                and str(tokenizer) != "gpt2" else [])
    if hf_dataset and os.path.exists(hf_dataset):  # a dataset saved to disk is an input too
        protected.append(hf_dataset)
    if not hf_dataset:
        # fail on a bad path before starting any work; the files a glob matches are inputs too
        protected += sources.expand_inputs(inputs)
    io.check_output_dir(out, "data", overwrite=overwrite, flag="--out", inputs=protected)
    tok = get_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    if tok.eot_id is None:
        raise UserError(f"tokenizer {tok.name!r} has no <|endoftext|> token to separate documents; "
                        "train one with `gpt2lab tokenizer train` (it adds it) or use 'gpt2'")
    dtype = dtype_for_vocab(tok.vocab_size)

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
    io.remove_stale_temps(out.parent)
    stage = io.staging(out)
    tmp = stage.__enter__()
    writers = [ShardWriter(tmp, split, dtype, shard_tokens) for split in SPLITS]
    documents = [0, 0]
    pool = None
    bar = None
    try:
        if workers > 1:
            pool = _pool_context().Pool(workers, initializer=_init_worker,
                                        initargs=(_tokenizer_spec(tok, tokenizer), tok.eot_id, dtype.str))
        bar = progress_bar(desc="tokenising", unit="char", unit_scale=True, disable=not progress,
                   dynamic_ncols=True)

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
        io.write_json(tmp / META_FILE, meta)
        io.publish(tmp, out)
    except BaseException:
        if bar is not None:
            bar.close()
        for w in writers:
            w.abort()
        if pool is not None:
            pool.terminate()
            pool = None
        stage.__exit__(None, None, None)
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


