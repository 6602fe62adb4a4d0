"""prepare() (gpt2lab/data/prepare.py): text -> shards + meta.json, what --overwrite may replace, and the
readers of gpt2lab/data (shards.py, loader.py): shards, TokenLoader, SlidingWindowDataset.

Corpora are written inside each test, so the file runs anywhere; one test
also prepares a slice of the shared Shakespeare corpus when it is present.
"""

import gzip
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2lab.data import prepare as prepare_mod
from gpt2lab.data import shards
from gpt2lab.data.loader import SlidingWindowDataset, TokenLoader
from gpt2lab.data.prepare import ShardWriter, prepare
from gpt2lab.data.shards import HEADER_BYTES, check_tokenizer, load_tokens, open_shard, read_meta
from gpt2lab.errors import UserError
from gpt2lab.tokenizer import EOT, BPETokenizer, bytes_to_unicode, get_tokenizer

REPO = Path(__file__).resolve().parents[1]

DOCS = [
    "First document.\nIt has two lines.",
    "Second: numbers 12345 and punctuation!?",
    "  leading spaces and a trailing newline\n",
    "Ünïcödé text — with dashes, “quotes” and 漢字.",
    "A document that mentions <|endoftext|> in the middle of its text.",
    "Short.",
    "Line one\nLine two\nLine three\nLine four\nLine five",
    "The seventh document, the first of val when val_fraction is 1/8.",
    "'s 're 've contractions: it's we're they've",
    "last document\n\n",
]


@pytest.fixture(scope="module")
def gpt2():
    return get_tokenizer("gpt2")


@pytest.fixture(scope="module")
def gpt2_slow():
    return get_tokenizer("gpt2", fast=False)


@pytest.fixture
def small_batches(monkeypatch):
    """Cut documents into small pieces and send few per task, to exercise those paths."""
    monkeypatch.setattr(prepare_mod, "CHUNK_CHARS", 40)
    monkeypatch.setattr(prepare_mod, "BATCH_CHARS", 100)


def write_docs(path: Path, docs, sep="\n@@@\n"):
    path.write_text(sep.join(docs), encoding="utf-8")
    return path


def is_val(i: int, f: float) -> bool:
    """The documented rule, in floats for a fraction whose multiples are exact (1/2, 1/4, 1/8...)."""
    return int((i + 1) * f) > int(i * f)


def split_documents(ids: np.ndarray, eot: int) -> list[np.ndarray]:
    """Ids of a split -> the ids of each document (every document starts with eot)."""
    assert len(ids) == 0 or ids[0] == eot, "a split must start with <|endoftext|>"
    starts = np.flatnonzero(ids == eot)
    ends = list(starts[1:]) + [len(ids)]
    return [ids[s + 1:e] for s, e in zip(starts, ends)]


def documents_of(out: Path, tok, f: float) -> list[str]:
    """Decode both splits and interleave their documents back into the original order."""
    per_split = {s: split_documents(np.asarray(load_tokens(out, s)), tok.eot_id) for s in ("train", "val")}
    n = sum(len(v) for v in per_split.values())
    taken = {"train": 0, "val": 0}
    docs = []
    for i in range(n):
        s = "val" if is_val(i, f) else "train"
        docs.append(tok.decode(per_split[s][taken[s]]))
        taken[s] += 1
    assert taken["train"] == len(per_split["train"]) and taken["val"] == len(per_split["val"])
    return docs


def no_leftovers(parent: Path, name: str) -> bool:
    temp = [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]
    return not (parent / name).exists() and not temp


# ---------------------------------------------------------------- prepare


def test_prepare_roundtrip_ids_and_meta(tmp_path, gpt2, small_batches, capsys):
    src = write_docs(tmp_path / "corpus.txt", DOCS)
    out = tmp_path / "data"
    meta = prepare([str(src)], out, val_fraction=0.125, doc_separator="\n@@@\n", workers=2)
    assert "prepared" in capsys.readouterr().out

    assert meta == read_meta(out)
    assert meta["format"] == "gpt2lab-data" and meta["version"] == 1
    assert meta["tokenizer"] == gpt2.identity()
    assert (meta["vocab_size"], meta["eot_id"], meta["dtype"]) == (50257, 50256, "uint16")
    assert meta["splits"]["train"]["documents"] == 9 and meta["splits"]["val"]["documents"] == 1
    assert meta["splits"]["train"]["shards"] == ["train_000000.bin"]
    assert meta["sources"] == [str(src)]
    assert meta["doc_separator"] == "\n@@@\n" and meta["val_fraction"] == 0.125

    # the documents come back exactly, and their ids are those of the whole document
    assert documents_of(out, gpt2, 0.125) == DOCS
    train = np.asarray(load_tokens(out, "train"))
    val = np.asarray(load_tokens(out, "val"))
    assert val.tolist() == [gpt2.eot_id] + gpt2.encode_ordinary(DOCS[7])
    expected = [t for i, d in enumerate(DOCS) if i != 7 for t in [gpt2.eot_id] + gpt2.encode_ordinary(d)]
    assert train.tolist() == expected
    assert meta["splits"]["train"]["tokens"] == len(train)
    # the literal text "<|endoftext|>" in document 4 is ordinary text: one eot per document
    assert int((train == gpt2.eot_id).sum()) == 9
    # the data dir carries its tokenizer
    assert shards.data_tokenizer(out).identity() == gpt2.identity()


def test_slow_and_fast_tokenizers_write_the_same_shards(tmp_path, gpt2, gpt2_slow, small_batches):
    src = write_docs(tmp_path / "c.txt", DOCS)
    fast = prepare([str(src)], tmp_path / "fast", tokenizer=gpt2, val_fraction=0, doc_separator="\n@@@\n",
                   workers=1, progress=False)
    slow = prepare([str(src)], tmp_path / "slow", tokenizer=gpt2_slow, val_fraction=0,
                   doc_separator="\n@@@\n", workers=2, progress=False)
    assert fast["splits"] == slow["splits"] and fast["tokenizer"] == slow["tokenizer"]
    shard = "train_000000.bin"
    assert (tmp_path / "fast" / shard).read_bytes() == (tmp_path / "slow" / shard).read_bytes()
    ids = np.asarray(load_tokens(tmp_path / "slow", "train"))
    docs = [d.tolist() for d in split_documents(ids, gpt2.eot_id)]
    assert docs == [gpt2_slow.encode_ordinary(d) for d in DOCS]
    assert fast["splits"]["val"] == {"tokens": 0, "documents": 0, "shards": []}


def test_sources_gz_jsonl_dir_and_glob(tmp_path, gpt2):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text(DOCS[0], encoding="utf-8")
    with gzip.open(corpus / "sub" / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write(DOCS[1])
    records = [{"body": DOCS[2], "id": 1}, {"body": "", "id": 2}, {"body": DOCS[3], "id": 3}]
    (corpus / "c.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    (corpus / "notes.bin").write_bytes(b"\x00\x01 not text")  # ignored: not a text suffix

    expected = [DOCS[0], DOCS[2], DOCS[3], DOCS[1]]  # sorted paths: a.txt, c.jsonl, sub/b.txt.gz
    meta = prepare([str(corpus)], tmp_path / "d1", text_field="body", val_fraction=0, workers=1,
                   progress=False)
    assert meta["input"]["skipped_records"] == 1 and meta["input"]["files"] == 3
    assert meta["splits"]["train"]["documents"] == 4
    assert documents_of(tmp_path / "d1", gpt2, 0) == expected

    prepare([str(corpus / "**" / "*.txt*")], tmp_path / "d2", val_fraction=0, workers=1, progress=False)
    assert documents_of(tmp_path / "d2", gpt2, 0) == [DOCS[0], DOCS[1]]
    prepare(corpus / "sub" / "b.txt.gz", tmp_path / "d3", val_fraction=0, workers=1, progress=False)
    assert documents_of(tmp_path / "d3", gpt2, 0) == [DOCS[1]]


def test_deterministic_across_runs_and_worker_counts(tmp_path, small_batches):
    src = write_docs(tmp_path / "c.txt", DOCS * 3)
    kw = dict(val_fraction=0.25, doc_separator="\n@@@\n", progress=False)
    prepare([str(src)], tmp_path / "a", workers=1, **kw)
    prepare([str(src)], tmp_path / "b", workers=2, **kw)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["meta.json", "tokenizer.json", "train_000000.bin", "val_000000.bin"]
    for name in names:
        if name != "meta.json":  # meta.json differs only in its creation time
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


@pytest.mark.parametrize("f", [0.5, 0.25, 0.1])
def test_val_split_follows_the_documented_rule(tmp_path, gpt2, f):
    docs = [f"document number {i}" for i in range(40)]
    src = write_docs(tmp_path / "c.txt", docs)
    meta = prepare([str(src)], tmp_path / "d", val_fraction=f, doc_separator="\n@@@\n", workers=1,
                   progress=False)
    val_ids = [i for i in range(40) if (i + 1) * f // 1 > i * f // 1]
    assert meta["splits"]["val"]["documents"] == len(val_ids) == round(40 * f)
    val_docs = [gpt2.decode(d) for d in split_documents(np.asarray(load_tokens(tmp_path / "d", "val")),
                                                         gpt2.eot_id)]
    assert val_docs == [docs[i] for i in val_ids]


def test_default_fraction_is_exact_decimal():
    # 0.005 is read as 1/200: document 199 is the first in val, not 198 or 200
    s = prepare_mod._ValSplitter(0.005)
    assert [i for i in range(1000) if s.is_val(i)] == [199, 399, 599, 799, 999]
    assert s.first_val() == 200
    # 0.1 in floats: 3 * 0.1 = 0.30000000000000004, yet exactly every tenth document
    assert [i for i in range(30) if prepare_mod._ValSplitter(0.1).is_val(i)] == [9, 19, 29]


def byte_tokenizer(eot_id: int) -> BPETokenizer:
    """The 256 bytes, no merges, and unused multi-byte tokens that fill the ids up to eot_id, which
    decides the vocab size: the text encodes to its bytes whatever the size."""
    b2u = bytes_to_unicode()
    chars = [b2u[b] for b in range(256)]
    fillers = itertools.chain(map("".join, itertools.product(chars, repeat=2)),
                              map("".join, itertools.product(chars, repeat=3)))
    vocab = {c: b for b, c in enumerate(chars)}
    vocab.update(zip(fillers, range(256, eot_id)))
    return BPETokenizer(vocab, [], {EOT: eot_id}, name=f"bytes-{eot_id}")


def test_uint32_shards_for_a_vocab_over_65536(tmp_path):
    src = write_docs(tmp_path / "c.txt", DOCS)
    for eot, dtype in ((65535, "uint16"), (70000, "uint32")):
        tok = byte_tokenizer(eot)
        out = tmp_path / str(eot)
        meta = prepare([str(src)], out, tokenizer=tok, val_fraction=0, doc_separator="\n@@@\n", workers=2,
                       progress=False)
        assert meta["dtype"] == dtype and meta["vocab_size"] == eot + 1
        ids = load_tokens(out, "train")
        assert ids.dtype == np.dtype(dtype)
        expected = [t for d in DOCS for t in [eot] + list(d.encode("utf-8"))]
        assert ids.tolist() == expected
        header = (out / "train_000000.bin").read_bytes()[:HEADER_BYTES]
        assert header[:8] == b"GPT2LABT"
        assert int.from_bytes(header[8:12], "little") == 1
        assert int.from_bytes(header[12:16], "little") == np.dtype(dtype).itemsize
        assert int.from_bytes(header[16:24], "little") == len(expected)
        assert header[24:] == bytes(HEADER_BYTES - 24)


def test_shard_writer_rolls_over(tmp_path):
    w = ShardWriter(tmp_path, "train", np.uint32, shard_tokens=4)
    w.write(np.arange(3))
    w.write(np.arange(3, 10))
    assert w.close() == ["train_000000.bin", "train_000001.bin", "train_000002.bin"]
    assert [open_shard(tmp_path / n).tolist() for n in w.shards] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert (tmp_path / "train_000002.bin").stat().st_size == HEADER_BYTES + 2 * 4


def test_many_shards_read_back_in_order(tmp_path, gpt2):
    src = write_docs(tmp_path / "c.txt", DOCS)
    kw = dict(val_fraction=0, doc_separator="\n@@@\n", workers=1, progress=False)
    one = prepare([str(src)], tmp_path / "one", **kw)
    many = prepare([str(src)], tmp_path / "many", shard_tokens=50, **kw)
    n = one["splits"]["train"]["tokens"]
    assert len(many["splits"]["train"]["shards"]) == -(-n // 50)
    assert load_tokens(tmp_path / "many", "train").tolist() == load_tokens(tmp_path / "one", "train").tolist()


def test_invalid_utf8_is_replaced_and_counted(tmp_path, gpt2, capsys):
    src = tmp_path / "bad.txt"
    src.write_bytes(b"good text \xff\xfe then more \xc3")  # two bad bytes, and a cut-off sequence
    meta = prepare([str(src)], tmp_path / "d", val_fraction=0, workers=1)
    assert meta["input"]["replaced_bytes"] == 3
    assert "replaced 3 invalid UTF-8 bytes" in capsys.readouterr().out
    assert documents_of(tmp_path / "d", gpt2, 0) == ["good text \ufffd\ufffd then more \ufffd"]


def test_shakespeare_slice_matches_whole_text_encoding(tmp_path, gpt2, shared_data, monkeypatch):
    text = gzip.open(shared_data / "corpora" / "shakespeare.txt.gz", "rt", encoding="utf-8").read(300_000)
    (tmp_path / "s.txt").write_text(text, encoding="utf-8")
    monkeypatch.setattr(prepare_mod, "CHUNK_CHARS", 5000)  # about 30 pieces, cut where the regex allows
    monkeypatch.setattr(prepare_mod, "BATCH_CHARS", 20_000)
    prepare([str(tmp_path / "s.txt")], tmp_path / "d", val_fraction=0, workers=2, progress=False)
    assert load_tokens(tmp_path / "d", "train").tolist() == [gpt2.eot_id] + gpt2.encode_ordinary(text)


# ------------------------------------------------------------------ errors


def test_input_errors_leave_nothing_behind(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "nodocs").mkdir()
    (tmp_path / "nodocs" / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / "one.txt").write_text("just one document")
    cases = [
        ([str(tmp_path / "missing.txt")], {}, "does not exist"),
        ([str(tmp_path / "empty.txt")], {}, "no text"),
        ([str(tmp_path / "nodocs")], {}, "holds no text files"),
        ([str(tmp_path / "*.nothing")], {}, "matches no file"),
        ([str(tmp_path / "one.txt")], {}, "--val-fraction 0"),
        ([str(tmp_path / "one.txt")], {"val_fraction": 0.5}, "--doc-separator"),
    ]
    for inputs, kw, words in cases:
        with pytest.raises(UserError, match=words.replace("*", r"\*")):
            prepare(inputs, tmp_path / "out", workers=1, progress=False, **kw)
        assert no_leftovers(tmp_path, "out"), inputs
    with pytest.raises(UserError, match="not both"):
        prepare([str(tmp_path / "one.txt")], tmp_path / "out", hf_dataset="somewhere", progress=False)


def hidden(parent: Path) -> list[str]:
    """Hidden leftovers (temporary dirs, probes) in a directory."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_existing_output_needs_overwrite(tmp_path, gpt2):
    src = write_docs(tmp_path / "c.txt", DOCS[:2])
    kw = dict(val_fraction=0, workers=1, progress=False)
    out = tmp_path / "d"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    # a non-empty directory gpt2lab did not write is never replaced, with --overwrite or without
    for overwrite in (False, True):
        with pytest.raises(UserError, match="non-empty directory that gpt2lab did not write"):
            prepare([str(src)], out, overwrite=overwrite, **kw)
        assert snapshot(out) == {"keep.txt": b"old"}

    # an empty directory is written; a data dir made earlier needs --overwrite, and is then replaced whole
    data_dir = tmp_path / "empty"
    data_dir.mkdir()
    prepare([str(src)], data_dir, **kw)
    assert read_meta(data_dir)["splits"]["train"]["documents"] == 1
    (data_dir / "extra.bin").write_bytes(b"left by the old directory")
    before = snapshot(data_dir)
    with pytest.raises(UserError, match="already holds a gpt2lab data dir; pass --overwrite"):
        prepare([str(src)], data_dir, **kw)
    assert snapshot(data_dir) == before
    meta = prepare([str(src)], data_dir, overwrite=True, doc_separator="\n@@@\n", **kw)
    assert read_meta(data_dir) == meta and meta["splits"]["train"]["documents"] == 2
    assert not (data_dir / "extra.bin").exists()
    assert hidden(tmp_path) == []


def test_overwrite_never_replaces_an_input(tmp_path, gpt2):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(DOCS[0], encoding="utf-8")
    kw = dict(val_fraction=0, workers=1, progress=False, overwrite=True)
    inner = corpus / "data"  # a data dir inside the corpus: allowed while it is not an input's relative
    prepare([str(corpus / "a.txt")], inner, **kw)
    before = snapshot(corpus)

    cases = [
        ([str(corpus)], corpus, "is the input"),  # the input directory itself
        ([str(corpus)], inner, "lies inside the input"),  # a data dir, but inside the input directory
        ([str(corpus / "a.txt")], corpus, "holds the input"),  # a directory that holds an input file
        ([str(inner)], inner, "is the input"),  # a data dir given as input
        ([str(corpus / "*.txt")], corpus, "holds the input"),  # a glob's directory
        ([str(corpus / "a.txt")], corpus / "a.txt", "is the input"),  # the input file itself
        ([str(corpus / "a.txt")], tmp_path, "holds the input"),
    ]
    for inputs, out, words in cases:
        with pytest.raises(UserError, match=words):
            prepare(inputs, out, **kw)
        assert snapshot(corpus) == before, (inputs, out)
    # a tokenizer directory is an input too
    tok_dir = tmp_path / "tok"
    byte_tokenizer(300).save(tok_dir)
    tok_before = snapshot(tok_dir)
    with pytest.raises(UserError, match=f"is the input {tok_dir}"):
        prepare([str(corpus / "a.txt")], tok_dir, tokenizer=str(tok_dir), **kw)
    assert snapshot(tok_dir) == tok_before
    assert hidden(tmp_path) == [] and hidden(corpus) == []


def test_overwrite_never_replaces_a_dir_holding_glob_matches(tmp_path):
    """A glob whose matches lie in the output directory makes that directory an input."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(DOCS[0], encoding="utf-8")
    kw = dict(val_fraction=0, workers=1, progress=False, overwrite=True)
    prepare([str(corpus / "a.txt")], corpus / "data", **kw)
    before = snapshot(corpus)
    with pytest.raises(UserError, match="input"):
        prepare([str(corpus / "*" / "*.json")], corpus / "data", **kw)  # matches data/meta.json
    assert snapshot(corpus) == before


def test_a_file_as_out_is_refused(tmp_path):
    src = write_docs(tmp_path / "c.txt", DOCS[:2])
    other = tmp_path / "notes.txt"
    other.write_text("not a directory")
    for overwrite in (False, True):
        with pytest.raises(UserError, match="is a file, not a directory"):
            prepare([str(src)], other, val_fraction=0, workers=1, progress=False, overwrite=overwrite)
    assert other.read_text() == "not a directory"
    # a path below a file cannot be made either
    with pytest.raises(UserError, match="is a file"):
        prepare([str(src)], other / "d", val_fraction=0, workers=1, progress=False)
    assert other.read_text() == "not a directory" and hidden(tmp_path) == []


# a prepare killed (SIGKILL: nothing can clean up) in the middle of writing its shards
_KILLED_PREPARE = r"""
import sys, time
from pathlib import Path
from gpt2lab.data import prepare as p

real, calls = p._encode_pieces, []

def slow(*args):
    calls.append(1)
    if len(calls) == 3:  # two batches are in the shard file by now
        Path(sys.argv[3]).touch()
        time.sleep(120)
    return real(*args)

p._encode_pieces, p.CHUNK_CHARS, p.BATCH_CHARS = slow, 40, 100
p.prepare([sys.argv[1]], sys.argv[2], val_fraction=0, doc_separator="\n@@@\n", workers=1, progress=False,
          overwrite=True)
"""


def test_killed_prepare_leaves_no_half_written_directory(tmp_path):
    src = write_docs(tmp_path / "c.txt", DOCS * 5)
    kw = dict(val_fraction=0, doc_separator="\n@@@\n", workers=1, progress=False)
    old = tmp_path / "old"
    prepare([str(src)], old, **kw)
    old_files = snapshot(old)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    procs = {name: subprocess.Popen([sys.executable, "-c", _KILLED_PREPARE, str(src), str(tmp_path / name),
                                     str(tmp_path / f"{name}.marker")], env=env, stderr=subprocess.PIPE)
             for name in ("new", "old")}
    try:
        deadline = time.time() + 120
        for name, proc in procs.items():
            while not (tmp_path / f"{name}.marker").exists():
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.time() < deadline, "the prepare never reached its third batch"
                time.sleep(0.05)
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
    # the new directory does not exist, the old one is as it was; the partial output is a hidden temp dir
    assert not (tmp_path / "new").exists()
    assert snapshot(old) == old_files
    temps = hidden(tmp_path)
    assert sorted(t.split(".tmp-")[0] for t in temps) == [".new", ".old"], temps
    assert any(p.name.startswith("train_") for t in temps for p in (tmp_path / t).iterdir())
    # the next prepare succeeds and removes the dead process's leftovers
    prepare([str(src)], tmp_path / "new", **kw)
    prepare([str(src)], old, overwrite=True, **kw)
    assert hidden(tmp_path) == []
    assert load_tokens(tmp_path / "new", "train").tolist() == load_tokens(old, "train").tolist()


@pytest.mark.parametrize("workers,exc", [(1, KeyboardInterrupt), (2, RuntimeError)])
def test_interrupted_prepare_leaves_no_valid_directory(tmp_path, monkeypatch, small_batches, workers, exc):
    src = write_docs(tmp_path / "c.txt", DOCS * 5 + ["BOOM"] + DOCS)
    real = prepare_mod._encode_pieces

    def failing(tok, eot_id, dtype, texts, starts):  # fails on the batch holding "BOOM"
        if any("BOOM" in t for t in texts):
            raise exc("interrupted midway")
        return real(tok, eot_id, dtype, texts, starts)

    monkeypatch.setattr(prepare_mod, "_encode_pieces", failing)  # forked workers inherit it
    kw = dict(val_fraction=0, doc_separator="\n@@@\n", workers=workers, progress=False)
    with pytest.raises(exc):
        prepare([str(src)], tmp_path / "new", **kw)
    assert no_leftovers(tmp_path, "new")

    # with --overwrite, a failed run leaves the previous directory as it was
    monkeypatch.setattr(prepare_mod, "_encode_pieces", real)
    prepare([str(src)], tmp_path / "old", **kw)
    before = {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()}
    monkeypatch.setattr(prepare_mod, "_encode_pieces", failing)
    with pytest.raises(exc):
        prepare([str(src)], tmp_path / "old", overwrite=True, **kw)
    assert {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A data dir of about 3k tokens in three train shards and one val shard."""
    root = tmp_path_factory.mktemp("prepared")
    docs = [f"Paragraph {i}: " + " ".join(f"word{j}" for j in range(i % 7, i % 7 + 40)) for i in range(40)]
    write_docs(root / "c.txt", docs)
    prepare([str(root / "c.txt")], root / "d", val_fraction=0.25, doc_separator="\n@@@\n", workers=1,
            shard_tokens=1000, progress=False)
    return root / "d"


def test_reading_errors_name_the_file(prepared, tmp_path, gpt2):
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in prepared.iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    shard = bad / "train_000000.bin"
    good = shard.read_bytes()

    shard.write_bytes(good[:-3])
    with pytest.raises(UserError, match=f"{shard}.*truncated"):
        load_tokens(bad, "train")
    shard.write_bytes(good[:100])
    with pytest.raises(UserError, match=f"{shard}.*header"):
        open_shard(shard)
    shard.write_bytes(b"NOTASHRD" + good[8:])
    with pytest.raises(UserError, match=f"{shard}.*magic"):
        open_shard(shard)
    shard.write_bytes(good[:8] + (2).to_bytes(4, "little") + good[12:])
    with pytest.raises(UserError, match="version 2"):
        open_shard(shard)
    shard.write_bytes(good)
    assert open_shard(shard).tolist() == open_shard(prepared / "train_000000.bin").tolist()
    with pytest.raises(UserError, match="no split 'test'.*'train', 'val'"):
        load_tokens(bad, "test")

    with pytest.raises(UserError, match="does not exist.*gpt2lab prepare"):
        read_meta(tmp_path / "nowhere")
    (bad / "meta.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        read_meta(bad)
    (bad / "meta.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(UserError, match="something-else"):
        read_meta(bad)
    (bad / "meta.json").unlink()
    with pytest.raises(UserError, match="no meta.json.*gpt2lab prepare"):
        read_meta(bad)


def test_tokenizer_mismatch_names_both(prepared, gpt2):
    meta = read_meta(prepared)
    check_tokenizer(meta, gpt2)
    check_tokenizer(meta, get_tokenizer("gpt2", fast=False))
    with pytest.raises(UserError, match="'gpt2'.*'bytes-300'.*--tokenizer"):
        check_tokenizer(meta, byte_tokenizer(300))


# ------------------------------------------------------------------ loaders


def find_window(shards, row):
    """Which shard a row of ids lies in, whole (or None)."""
    n = len(row)
    for k, s in enumerate(shards):
        for start in np.flatnonzero(s[: len(s) - n + 1] == row[0]):
            if np.array_equal(s[start:start + n], row):
                return k
    return None


def test_token_loader_random_batches(prepared):
    loader = TokenLoader(prepared, "train", batch_size=4, seq_len=16, seed=1)
    shards = [open_shard(prepared / n) for n in read_meta(prepared)["splits"]["train"]["shards"]]
    assert len(shards) == 3
    for _ in range(5):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row in torch.cat([x, y[:, -1:]], dim=1).numpy():
            assert find_window(shards, row) is not None  # a window of one shard, never across two

    # resume: a new loader given the state reproduces the next batches exactly
    state = json.loads(json.dumps(loader.state_dict()))
    expected = [loader.next_batch() for _ in range(3)]
    resumed = TokenLoader(prepared, "train", batch_size=4, seq_len=16, seed=1)
    resumed.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(expected, [resumed.next_batch() for _ in range(3)]):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)

    # seeds and ranks see different data; the same seed and rank the same
    first = lambda **kw: TokenLoader(prepared, "train", 4, 16, **kw).next_batch()[0]
    assert torch.equal(first(seed=3), first(seed=3))
    assert not torch.equal(first(seed=3), first(seed=4))
    assert not torch.equal(first(seed=3, rank=0, world_size=2), first(seed=3, rank=1, world_size=2))


def test_token_loader_sequential_walks_in_order(prepared):
    ids = np.asarray(load_tokens(prepared, "val")).astype(np.int64)
    B, T = 2, 8
    assert len(read_meta(prepared)["splits"]["val"]["shards"]) == 1
    loader = TokenLoader(prepared, "val", B, T, mode="sequential")
    windows = (len(ids) - 1) // T
    steps = windows // B
    xs = torch.cat([loader.next_batch()[0] for _ in range(steps)]).flatten().numpy()
    assert xs.tolist() == ids[: steps * B * T].tolist()
    assert loader.epoch == steps * B // windows  # 1 once every window has been served
    for _ in range(loader.steps_per_epoch):
        loader.next_batch()
    assert loader.epoch == 1 + steps * B // windows

    # two ranks take disjoint contiguous slices of each step; together they are the one-rank stream
    one = TokenLoader(prepared, "val", B, T, mode="sequential")
    r0 = TokenLoader(prepared, "val", B, T, mode="sequential", rank=0, world_size=2)
    r1 = TokenLoader(prepared, "val", B, T, mode="sequential", rank=1, world_size=2)
    for _ in range(3):
        x0, y0 = r0.next_batch()
        x1, y1 = r1.next_batch()
        a, b = one.next_batch(), one.next_batch()
        assert torch.equal(x0, a[0]) and torch.equal(y0, a[1])
        assert torch.equal(x1, b[0]) and torch.equal(y1, b[1])

    # resume in the middle, across the wrap-around
    state = one.state_dict()
    expected = [one.next_batch()[1] for _ in range(steps + 2)]
    again = TokenLoader(prepared, "val", B, T, mode="sequential")
    again.load_state_dict(json.loads(json.dumps(state)))
    assert all(torch.equal(e, again.next_batch()[1]) for e in expected)


def test_token_loader_sequential_skips_shard_tails(prepared):
    meta = read_meta(prepared)
    shards = [np.asarray(open_shard(prepared / n)) for n in meta["splits"]["train"]["shards"]]
    T = 100
    loader = TokenLoader(prepared, "train", 1, T, mode="sequential")
    expected = [s[j * T:j * T + T + 1] for s in shards for j in range((len(s) - 1) // T)]
    for window in expected:
        x, y = loader.next_batch()
        assert x[0].tolist() == window[:-1].tolist() and y[0, -1].item() == window[-1]
    assert loader.epoch == 1


def test_token_loader_too_short(prepared):
    n = read_meta(prepared)["splits"]["val"]["tokens"]
    with pytest.raises(UserError, match=f"{n} tokens.*{n + 1}.*--seq-len"):
        TokenLoader(prepared, "val", 1, n)
    TokenLoader(prepared, "val", 1, n - 1)  # exactly one window fits


def test_sliding_window_dataset(prepared):
    ids = np.arange(20)
    ds = SlidingWindowDataset(ids, max_length=4, stride=3)
    assert len(ds) == 6  # starts 0, 3, ..., 15: each needs 5 ids
    x, y = ds[1]
    assert x.tolist() == [3, 4, 5, 6] and y.tolist() == [4, 5, 6, 7]
    assert ds[-1][1].tolist() == [16, 17, 18, 19]
    with pytest.raises(IndexError):
        ds[6]
    assert len(SlidingWindowDataset(ids, max_length=4)) == 4  # stride defaults to max_length
    with pytest.raises(UserError, match="too few"):
        SlidingWindowDataset(np.arange(4), max_length=4)

    loader = torch.utils.data.DataLoader(SlidingWindowDataset(prepared, 8, 8, split="val"), batch_size=2)
    x, y = next(iter(loader))
    assert x.shape == (2, 8) and torch.equal(x[:, 1:], y[:, :-1])
    assert x.flatten().tolist() == load_tokens(prepared, "val")[:16].tolist()

    tok = get_tokenizer("gpt2")
    text = "In the beginning<|endoftext|>God created"
    ds = SlidingWindowDataset.from_text(text, tok, max_length=2, stride=1)
    ids = tok.encode(text, allowed_special={EOT})
    assert tok.eot_id in ids and len(ds) == len(ids) - 2
    assert [ds[i][0][0].item() for i in range(len(ds))] == ids[:-2]


# ---------------------------------------------------------------- HF, CLI


def test_hf_dataset_saved_locally(tmp_path, gpt2):
    datasets = pytest.importorskip("datasets")
    rows = DOCS[:4] + [""] + DOCS[4:]
    datasets.Dataset.from_dict({"text": rows}).save_to_disk(str(tmp_path / "ds"))
    meta = prepare([], tmp_path / "d", hf_dataset=str(tmp_path / "ds"), val_fraction=0.125, workers=1,
                   progress=False)
    assert meta["sources"][0].startswith("hf:")
    assert meta["input"]["skipped_records"] == 1
    assert documents_of(tmp_path / "d", gpt2, 0.125) == DOCS


def start_cli(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("GPT2LAB_DEBUG", None)  # it turns one-line errors into tracebacks
    return subprocess.Popen([sys.executable, "-m", "gpt2lab", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def finish(proc) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_cli(*args):
    return finish(start_cli(*args))


def one_error_line(result, *words):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def test_cli_prepare(tmp_path):
    src = write_docs(tmp_path / "c.txt", DOCS)
    out = tmp_path / "d"
    ok = run_cli("prepare", "--input", str(src), "--out", str(out), "--doc-separator", "\\n@@@\\n",
                 "--val-fraction", "0.125", "--workers", "2", "--shard-tokens", "64")
    assert ok.returncode == 0, ok.stderr
    assert "train" in ok.stdout and "tokens/s" in ok.stdout
    meta = read_meta(out)
    assert meta["splits"]["val"]["documents"] == 1 and len(meta["splits"]["train"]["shards"]) > 1

    bad = run_cli("prepare", "--input", str(src), "--out", str(out), "--quiet")
    one_error_line(bad, "--overwrite")


def test_cli_prepare_overwrite_refusals(tmp_path):
    """--overwrite never deletes an input, a directory holding or inside one, a directory gpt2lab did not
    write, or a file; each refusal is one error line, exit status 2, and nothing is touched."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(DOCS[0], encoding="utf-8")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.md").write_text("mine")
    afile = tmp_path / "afile.txt"
    afile.write_text("a file")
    before = snapshot(tmp_path)
    common = ["--overwrite", "--val-fraction", "0", "--workers", "1", "--quiet"]
    cases = {
        "is the input": ["--input", str(corpus), "--out", str(corpus)],
        "lies inside the input": ["--input", str(corpus), "--out", str(corpus / "sub")],
        "holds the input": ["--input", str(corpus / "a.txt"), "--out", str(tmp_path)],
        "gpt2lab did not write": ["--input", str(corpus), "--out", str(theirs)],
        "is a file, not a directory": ["--input", str(corpus), "--out", str(afile)],
    }
    procs = {words: start_cli("prepare", *argv, *common) for words, argv in cases.items()}
    for words, proc in procs.items():
        one_error_line(finish(proc), words)
    assert snapshot(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile.txt", "corpus", "theirs"]
