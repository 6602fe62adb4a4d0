"""Reading raw text: files, directories, globs, .gz, JSONL, and Hugging Face datasets.

Everything upstream of tokenisation goes through `iter_pieces`, which yields a
corpus as a stream of `Piece`s: a document cut into chunks of bounded size, so
that a 50 GB text file never has to fit in memory. Chunks are cut only where
GPT-2's pre-tokenisation regex would cut anyway (a newline with non-space text
on both sides), so tokenising chunk by chunk gives exactly the ids of
tokenising the whole document.

A document is a file, a JSONL record, a dataset row, or a part of one of those
between two `doc_separator` strings.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import json
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import regex

from gpt2lab.errors import UserError

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text", ".jsonl", ".json")
CHUNK_CHARS = 1 << 20

# a newline with non-whitespace on both sides: no GPT-2 pre-token spans it
_SAFE_CUT = regex.compile(r"(?<=\S\n)(?=\S)")


@dataclass
class Piece:
    doc: int  # running index of the document this text belongs to
    text: str
    last: bool  # the final piece of its document


@dataclass
class ReadStats:
    files: int = 0
    documents: int = 0
    chars: int = 0
    replaced_bytes: int = 0  # invalid UTF-8 bytes replaced by U+FFFD
    skipped_records: int = 0  # JSONL records whose text field was empty
    sources: list[str] = field(default_factory=list)


def _is_text_file(p: Path) -> bool:
    name = p.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return name.endswith(TEXT_SUFFIXES)


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files, directories (searched recursively for text files) and globs, in a stable order."""
    if not inputs:
        raise UserError("no input given; pass one or more files, directories or globs")
    out: list[Path] = []
    for spec in inputs:
        if glob.has_magic(spec):
            matches = sorted(glob.glob(spec, recursive=True))
            files = [Path(m) for m in matches if Path(m).is_file()]
            if not files:
                raise UserError(f"the pattern {spec!r} matches no file; check the path and quote the "
                                "pattern so the shell does not expand it")
            out.extend(files)
            continue
        p = Path(spec)
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and _is_text_file(f))
            if not files:
                raise UserError(f"the directory {spec} holds no text files ({', '.join(TEXT_SUFFIXES)}, "
                                "optionally .gz); point at the files themselves")
            out.extend(files)
        else:
            raise UserError(f"input {spec} does not exist; check the path")
    return out


class _CountingDecoder:
    """Incremental UTF-8 decoding that replaces and counts invalid bytes."""

    def __init__(self, stats: ReadStats):
        self.stats = stats
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="gpt2lab-count")

    def decode(self, data: bytes, final: bool = False) -> str:
        _COUNTER[0] = self.stats
        return self._dec.decode(data, final)


_COUNTER: list[ReadStats | None] = [None]


def _count_and_replace(err: UnicodeDecodeError):
    if _COUNTER[0] is not None:
        _COUNTER[0].replaced_bytes += err.end - err.start
    return "\ufffd", err.end


codecs.register_error("gpt2lab-count", _count_and_replace)


def _open_binary(path: Path):
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def _read_text_blocks(path: Path, stats: ReadStats, block: int = CHUNK_CHARS) -> Iterator[str]:
    dec = _CountingDecoder(stats)
    try:
        with _open_binary(path) as f:
            while True:
                data = f.read(block)
                text = dec.decode(data, final=not data)
                if text:
                    yield text
                if not data:
                    return
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read {path}: {e}; check that the file is complete "
                        "(a truncated .gz cannot be read)") from None


def _cut(buffer: str, limit: int) -> int:
    """Where to cut a long buffer: the last safe point before `limit`, or 0 if none."""
    end = min(limit, len(buffer))
    i = buffer.rfind("\n", 0, end)
    while i > 0:  # search backwards: a safe point is nearly always within a line or two
        if i + 1 < end and _SAFE_CUT.match(buffer, i + 1):
            return i + 1
        i = buffer.rfind("\n", 0, i)
    return 0


def _split_document_stream(blocks: Iterator[str], separator: str | None,
                           chunk_chars: int) -> Iterator[tuple[str, bool]]:
    """(text, ends_document) from a stream of text blocks of one source."""
    buf = ""
    for block in blocks:
        buf += block
        if separator:
            while True:
                i = buf.find(separator)
                if i < 0:
                    break
                yield from _emit_all(buf[:i], chunk_chars)
                buf = buf[i + len(separator):]
        # emit a safe prefix of an over-long buffer, keeping what a separator may span
        while len(buf) > 2 * chunk_chars:
            keep_from = len(buf) - (len(separator) if separator else 0)
            cut = _cut(buf, min(chunk_chars, keep_from))
            if cut == 0:
                break  # no safe cut point yet (e.g. one enormous line): keep reading
            yield buf[:cut], False
            buf = buf[cut:]
    yield from _emit_all(buf, chunk_chars)


def _emit_all(text: str, chunk_chars: int) -> Iterator[tuple[str, bool]]:
    while len(text) > 2 * chunk_chars:
        cut = _cut(text, chunk_chars)
        if cut == 0:
            break
        yield text[:cut], False
        text = text[cut:]
    yield text, True


def _jsonl_texts(path: Path, text_field: str, stats: ReadStats) -> Iterator[str]:
    pending = ""
    lineno = 0
    for block in _read_text_blocks(path, stats):
        pending += block
        lines = pending.split("\n")
        pending = lines.pop()
        for line in lines:
            lineno += 1
            yield from _jsonl_record(path, lineno, line, text_field, stats)
    if pending:
        yield from _jsonl_record(path, lineno + 1, pending, text_field, stats)


def _jsonl_record(path: Path, lineno: int, line: str, text_field: str, stats: ReadStats) -> Iterator[str]:
    if not line.strip():
        return
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{lineno} is not valid JSON ({e.msg}); each line of a .jsonl file "
                        "must be one JSON object") from None
    if not isinstance(record, dict) or text_field not in record:
        keys = sorted(record) if isinstance(record, dict) else []
        raise UserError(f"{path}:{lineno} has no field {text_field!r} (fields: {keys}); "
                        "choose the text field with --text-field")
    text = record[text_field]
    if not isinstance(text, str):
        raise UserError(f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, not text; "
                        "choose the text field with --text-field")
    if not text:
        stats.skipped_records += 1
        return
    yield text


def _is_jsonl(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".jsonl") or name.endswith(".jsonl.gz")


def iter_pieces(
    inputs: list[str],
    text_field: str = "text",
    doc_separator: str | None = None,
    stats: ReadStats | None = None,
    chunk_chars: int = CHUNK_CHARS,
) -> Iterator[Piece]:
    """Stream the documents of local files as bounded pieces of text."""
    stats = stats if stats is not None else ReadStats()
    paths = expand_inputs(inputs)
    doc = 0
    for path in paths:
        stats.files += 1
        stats.sources.append(str(path))
        if _is_jsonl(path):
            streams = (iter([t]) for t in _jsonl_texts(path, text_field, stats))
        else:
            streams = iter([_read_text_blocks(path, stats)])
        for blocks in streams:
            for text, last in _split_document_stream(blocks, doc_separator, chunk_chars):
                if not text and not last:
                    continue
                stats.chars += len(text)
                yield Piece(doc, text, last)
                if last:
                    doc += 1
                    stats.documents = doc


def iter_hf_pieces(
    dataset: str,
    split: str = "train",
    config: str | None = None,
    text_field: str = "text",
    stats: ReadStats | None = None,
    chunk_chars: int = CHUNK_CHARS,
) -> Iterator[Piece]:
    """Stream a Hugging Face dataset (by hub name or a local path), one row a document."""
    try:
        import datasets
    except ImportError:
        raise UserError("reading a Hugging Face dataset needs the `datasets` package; "
                        "install it with `pip install 'gpt2lab[hf]'`") from None
    stats = stats if stats is not None else ReadStats()
    stats.sources.append(f"hf:{dataset}:{config or ''}:{split}")
    local = os.path.isdir(dataset)
    if not local:
        _check_hub_reachable(dataset)
    try:
        datasets.utils.logging.set_verbosity_error()  # no retry chatter before the one error line
        if local and os.path.exists(os.path.join(dataset, "dataset_info.json")):
            ds = datasets.load_from_disk(dataset)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
        else:
            ds = datasets.load_dataset(dataset, config, split=split, streaming=True)
    except Exception as e:  # the hub raises many types: offline, unknown name, bad split
        raise UserError(f"cannot load the dataset {dataset!r} (split {split!r}): {str(e).splitlines()[0]}; "
                        "check the name and split, and that the machine is online") from None
    doc = 0
    for row in ds:
        if text_field not in row:
            raise UserError(f"dataset {dataset!r} has no field {text_field!r} (fields: {sorted(row)}); "
                            "choose it with --text-field")
        text = row[text_field]
        if not text:
            stats.skipped_records += 1
            continue
        for part, last in _emit_all(text, chunk_chars):
            stats.chars += len(part)
            yield Piece(doc, part, last)
        doc += 1
        stats.documents = doc


def _check_hub_reachable(dataset: str) -> None:
    """Fail at once, in one line, when the Hugging Face hub cannot be reached (instead of the dataset
    library's minute of retries)."""
    if os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE"):
        return  # the library answers from its cache, or says it is offline
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=10):
            pass
    except OSError as e:
        raise UserError(f"cannot reach the Hugging Face hub at {host} ({e.strerror or e}) to stream the dataset "
                        f"{dataset!r}; on a machine that is online save it with `datasets` (`save_to_disk`) and "
                        "pass that directory to --hf-dataset, or give text files with --input") from None


def read_text(path: str | os.PathLike) -> str:
    """A whole (possibly gzipped) text file, for small inputs such as prompts."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p} does not exist; check the path")
    return "".join(_read_text_blocks(p, ReadStats()))


__all__ = ["Piece", "ReadStats", "expand_inputs", "iter_pieces", "iter_hf_pieces", "read_text"]
