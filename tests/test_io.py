"""gpt2lab.io: atomic writes, readers that name file:line, the output guards, RunLock, stale temps."""

import errno
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2lab import io
from gpt2lab.errors import UserError
from gpt2lab.weights import read_tensors, save_tensors


def hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def dead_pid() -> int:
    """The id of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------------------ writing


def test_write_json_replaces_the_file(tmp_path):
    path = tmp_path / "m.json"
    io.write_json(path, {"a": 1})
    io.write_json(path, [{"task": "mc", "ü": "ß"}])
    assert json.loads(path.read_text(encoding="utf-8")) == [{"task": "mc", "ü": "ß"}]
    assert path.read_text(encoding="utf-8").endswith("\n")
    assert hidden(tmp_path) == []


def test_write_json_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "m.json"
    io.write_json(path, {"old": True})
    old = path.read_bytes()

    # the disk fills up while the new content is flushed: the old file stays, no temp file is left
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", full)
        with pytest.raises(OSError, match="No space"):
            io.write_json(path, {"new": True})
    assert path.read_bytes() == old and hidden(tmp_path) == []

    # the rename fails
    def cross_device(src, dst):
        raise OSError(errno.EXDEV, "cross-device link")

    with monkeypatch.context() as m:
        m.setattr(os, "replace", cross_device)
        with pytest.raises(OSError, match="cross-device"):
            io.write_json(path, {"new": True})
    assert path.read_bytes() == old and hidden(tmp_path) == []

    # an object that cannot be written
    with pytest.raises(TypeError):
        io.write_json(path, {"new": object()})
    assert path.read_bytes() == old and hidden(tmp_path) == []


def test_write_jsonl_interrupted_midway_keeps_the_old_file(tmp_path):
    path = tmp_path / "p.jsonl"
    io.write_jsonl(path, [{"task": "mc", "index": 0}])
    old = path.read_bytes()

    def records():
        yield {"task": "mc", "index": 0}
        yield {"task": "mc", "index": 1}
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        io.write_jsonl(path, records())
    assert path.read_bytes() == old and hidden(tmp_path) == []
    io.write_jsonl(path, ({"i": i} for i in range(3)))
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"i": 0}, {"i": 1}, {"i": 2}]


def test_atomic_file_never_shows_half_a_file(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    with io.atomic_file(path, "w", encoding="utf-8") as f:
        f.write("new")
        f.flush()
        assert path.read_text() == "old"  # the new content is under the temporary name until the end
        assert hidden(tmp_path) == [io.temp_name(path).name] == [f".f.txt.tmp-{os.getpid()}"]
    assert path.read_text() == "new" and hidden(tmp_path) == []


def test_save_and_read_tensors(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "w.safetensors"
    save_tensors({"a": torch.arange(4.0)}, path, metadata={"k": "v"})
    assert torch.equal(read_tensors(path, "train first")["a"], torch.arange(4.0))
    assert hidden(tmp_path) == []
    with pytest.raises(UserError, match="does not exist; train first"):
        read_tensors(tmp_path / "missing.safetensors", "train first")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(UserError, match="cannot be read as safetensors"):
        read_tensors(tmp_path / "bad.safetensors", "train first")


def test_staging_and_publish(tmp_path):
    out = tmp_path / "out"
    with io.staging(out) as tmp:
        (tmp / "a").write_text("1")
        io.publish(tmp, out)
    assert (out / "a").read_text() == "1"
    with io.staging(out) as tmp:
        (tmp / "b").write_text("2")
        io.publish(tmp, out)  # replaces the old directory whole
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    # a staging directory that is not published is removed
    with pytest.raises(RuntimeError), io.staging(out) as tmp:
        (tmp / "c").write_text("3")
        raise RuntimeError("failed")
    assert sorted(p.name for p in out.iterdir()) == ["b"] and hidden(tmp_path) == []


# ------------------------------------------------------------------------------ reading


def test_read_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n{"a": \n', encoding="utf-8")
    it = io.read_jsonl(path)
    assert next(it) == (1, {"a": 1}) and next(it) == (3, {"a": 2})  # blank lines skipped, lines counted
    with pytest.raises(UserError, match=f"^{path}:4 is not valid JSON"):
        next(it)
    path.write_text('{"a": 1}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(UserError, match=f"^{path}:2 is a JSON list, not an object"):
        list(io.read_jsonl(path))
    # a byte-order mark is dropped; .gz is read through
    path.write_text('\ufeff{"a": 1}\n', encoding="utf-8")
    assert list(io.read_jsonl(path)) == [(1, {"a": 1})]
    gz = tmp_path / "r.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"a": 1}\n{"b": 2}\n'))
    assert list(io.read_jsonl(gz)) == [(1, {"a": 1}), (2, {"b": 2})]
    # binary, missing, a directory, a bad gzip: one UserError naming the path
    binary = tmp_path / "model.jsonl"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    for bad, words in [(binary, "not UTF-8 text"), (tmp_path / "missing.jsonl", "does not exist"),
                       (tmp_path, "is a directory"), (tmp_path / "bad.jsonl.gz", "not a readable gzip")]:
        if bad.name == "bad.jsonl.gz":
            bad.write_bytes(b"not gzip")
        with pytest.raises(UserError, match=words):
            list(io.read_jsonl(bad))


def test_read_json_names_file_and_line(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{\n  "a": 1,\n  "b": \n}\n')
    with pytest.raises(UserError, match=f"^{path}:4 is not valid JSON"):
        io.read_json(path)
    path.write_text("[1]")
    with pytest.raises(UserError, match="holds a JSON list, not an object"):
        io.read_json_object(path)


def test_read_records_json_and_jsonl(tmp_path):
    records = [{"instruction": "a"}, {"instruction": "b"}]
    js = tmp_path / "r.json"
    js.write_text(json.dumps(records))
    assert io.read_records(js) == [(f"{js}: record 0", records[0]), (f"{js}: record 1", records[1])]
    gz = tmp_path / "r.JSON.gz"
    gz.write_bytes(gzip.compress(json.dumps(records).encode()))
    assert [r for _, r in io.read_records(gz)] == records
    jl = tmp_path / "r.jsonl"
    jl.write_text(json.dumps(records[0]) + "\n\n" + json.dumps(records[1]) + "\n")  # line 2 is blank
    assert io.read_records(jl) == [(f"{jl}:1", records[0]), (f"{jl}:3", records[1])]

    js.write_text(json.dumps({"instruction": "a"}))
    with pytest.raises(UserError, match="holds a JSON dict; a .json records file must be a list"):
        io.read_records(js)
    js.write_text(json.dumps([records[0], "text"]))
    with pytest.raises(UserError, match=f"{js}: record 1 is a JSON str, not an object"):
        io.read_records(js)
    jl.write_text(json.dumps(records[0]) + "\nnot json\n")
    with pytest.raises(UserError, match=f"{jl}:2 is not valid JSON"):
        io.read_records(jl)


# ------------------------------------------------------------------------------ output guards


def make(path: Path, kind: str) -> Path:
    """A directory of the given kind, as gpt2lab writes it."""
    path.mkdir(parents=True, exist_ok=True)
    if kind == "data":
        (path / "meta.json").write_text(json.dumps({"format": "gpt2lab-data"}))
        (path / "train_000000.bin").write_bytes(b"GPT2LABT")
    elif kind == "run":
        (path / "config.json").write_text(json.dumps({"format": "gpt2lab-run"}))
        (path / "model.safetensors").write_bytes(b"weights")
    elif kind == "tokenizer":
        (path / "tokenizer.json").write_text(json.dumps({"format": "gpt2lab-bpe"}))
    elif kind == "theirs":
        (path / "notes.txt").write_text("someone else's")
    return path


def test_dir_kind(tmp_path):
    assert io.dir_kind(tmp_path / "missing") is None
    assert io.dir_kind(make(tmp_path / "e", "empty")) == "empty"
    for kind in ("data", "run", "tokenizer"):
        assert io.dir_kind(make(tmp_path / kind, kind)) == kind
    assert io.dir_kind(make(tmp_path / "t", "theirs")) is None
    # a tokenizer.json with other files beside it is not a tokenizer dir gpt2lab wrote
    (tmp_path / "tokenizer" / "x.txt").write_text("x")
    assert io.dir_kind(tmp_path / "tokenizer") is None
    # a lock and the leftovers of an interrupted write do not make a directory non-empty
    e = tmp_path / "e"
    (e / ".lock").write_text("")
    (e / ".meta.json.tmp-123").write_text("")
    (e / ".d.old-4").mkdir()
    assert io.dir_kind(e) == "empty"
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "meta.json").write_text("{not json")
    assert io.dir_kind(tmp_path / "damaged") is None


def test_check_output_dir_rules(tmp_path):
    check = io.check_output_dir
    # missing (its parents too) or empty: always
    check(tmp_path / "missing" / "deeper", "data")
    assert not (tmp_path / "missing").exists()  # checking writes nothing
    check(make(tmp_path / "empty", "empty"), "data")
    # the same kind: only with overwrite (or allow_same_kind)
    data = make(tmp_path / "data", "data")
    with pytest.raises(UserError, match="already holds a gpt2lab data dir; pass --overwrite"):
        check(data, "data")
    check(data, "data", overwrite=True)
    check(data, "data", allow_same_kind=True)
    # another kind, or a directory gpt2lab did not write: never, even with overwrite
    run = make(tmp_path / "run", "run")
    theirs = make(tmp_path / "theirs", "theirs")
    for overwrite in (False, True):
        with pytest.raises(UserError, match="--out .*run is a gpt2lab run dir, not a gpt2lab data dir"):
            check(run, "data", overwrite=overwrite)
        with pytest.raises(UserError, match="non-empty directory that gpt2lab did not write"):
            check(theirs, "data", overwrite=overwrite)
    # a file, or a path under a file
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is a file, not a directory"):
        check(tmp_path / "f", "data", overwrite=True)
    with pytest.raises(UserError, match="is a file, not a directory"):
        check(tmp_path / "f" / "sub", "data", overwrite=True)
    # the flag named is the one given
    with pytest.raises(UserError, match="^--save-dir "):
        check(run, "data", flag="--save-dir")
    assert hidden(tmp_path) == []


def test_check_output_dir_never_touches_an_input(tmp_path):
    data = make(tmp_path / "data", "data")  # a directory overwrite could replace, were it not an input
    (data / "sub").mkdir()
    corpus = make(tmp_path / "data" / "sub" / "corpus", "empty")
    (corpus / "a.txt").write_text("text")
    for inputs, how in [([data], "is"), ([data / "train_000000.bin"], "holds"), ([corpus / "a.txt"], "holds"),
                        ([str(tmp_path / "other"), data], "is")]:
        with pytest.raises(UserError, match=f"--out {data} {how} the input"):
            io.check_output_dir(data, "data", overwrite=True, inputs=inputs)
    with pytest.raises(UserError, match="lies inside the input"):
        io.check_output_dir(data / "new", "data", overwrite=True, inputs=[data])
    # through a symbolic link, and with a relative path
    link = tmp_path / "link"
    link.symlink_to(data, target_is_directory=True)
    with pytest.raises(UserError, match="is the input"):
        io.check_output_dir(link, "data", overwrite=True, inputs=[data])
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        with pytest.raises(UserError, match="holds the input"):
            io.check_output_dir("data", "data", overwrite=True, inputs=["data/sub/corpus/a.txt"])
    finally:
        os.chdir(cwd)
    io.check_output_dir(data, "data", overwrite=True, inputs=[None, tmp_path / "elsewhere"])  # unrelated: ok


def test_check_output_file_kinds(tmp_path):
    check = io.check_output_file
    check(tmp_path / "new.json", "eval-json", flag="--output")
    # an existing file of the same kind is replaced
    metrics = tmp_path / "m.json"
    metrics.write_text(json.dumps([{"task": "mc", "n": 4, "acc": 0.5}, {"task": "loss", "n": 2}]))
    check(metrics, "eval-json", flag="--output")
    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps({"task": "mc", "index": 0}) + "\n")
    check(preds, "eval-jsonl", flag="--predictions")
    png = tmp_path / "curve.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(16))
    check(png, "png", flag="--out")

    # any other file is not
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + bytes(64))
    other_json = tmp_path / "config.json"
    other_json.write_text(json.dumps({"format": "gpt2lab-run"}))
    not_all = tmp_path / "mixed.json"
    not_all.write_text(json.dumps([{"task": "mc"}, {"acc": 1}]))
    for kind, flag, path in [("eval-json", "--output", weights), ("eval-json", "--output", other_json),
                             ("eval-json", "--output", not_all), ("eval-json", "--output", preds),
                             ("eval-jsonl", "--predictions", weights), ("eval-jsonl", "--predictions", metrics),
                             ("png", "--out", metrics)]:
        with pytest.raises(UserError, match=f"^{flag} {path} exists and is not"):
            check(path, kind, flag=flag)
    # an empty predictions file (no records) may be replaced; a text that merely starts with a blank line not
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    check(empty, "eval-jsonl", flag="--predictions")
    notes = tmp_path / "notes.jsonl"
    notes.write_text("\nmy notes, not predictions\n")
    with pytest.raises(UserError, match="exists and is not gpt2lab eval predictions"):
        check(notes, "eval-jsonl", flag="--predictions")
    # files that only look like ours: an instruction set whose records name a task, an empty list
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps({"task": "add", "instruction": "2+2", "output": "4"}) + "\n")
    empty_list = tmp_path / "empty.json"
    empty_list.write_text("[]")
    for path, kind, flag in [(records, "eval-jsonl", "--predictions"), (empty_list, "eval-json", "--output")]:
        with pytest.raises(UserError, match="exists and is not"):
            check(path, kind, flag=flag)
    # a directory, a path under a file, a file that is or lies inside an input
    with pytest.raises(UserError, match="is a directory"):
        check(tmp_path, "eval-json", flag="--output")
    with pytest.raises(UserError, match="is a file, not a directory"):
        check(weights / "x.json", "eval-json", flag="--output")
    with pytest.raises(UserError, match="is the input"):
        check(metrics, "eval-json", flag="--output", inputs=[metrics])
    with pytest.raises(UserError, match="lies inside the input"):
        check(tmp_path / "new.json", "eval-json", flag="--output", inputs=[tmp_path])
    assert hidden(tmp_path) == []


def test_run_lock(tmp_path):
    first = io.RunLock(tmp_path / "run")
    first.acquire()
    try:
        assert (tmp_path / "run" / ".lock").read_text() == f"process {os.getpid()}"
        second = io.RunLock(tmp_path / "run")
        with pytest.raises(UserError, match=f"in use by process {os.getpid()}"):
            second.acquire()
        with pytest.raises(UserError, match="in use"), io.RunLock(tmp_path / "run"):
            pass
        # another process cannot take it either
        code = ("import sys; from gpt2lab import io; from gpt2lab.errors import UserError\n"
                "try:\n    io.RunLock(sys.argv[1]).acquire()\nexcept UserError:\n    sys.exit(3)\n")
        r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], timeout=60)
        assert r.returncode == 3
    finally:
        first.release()
    with io.RunLock(tmp_path / "run") as again:  # free once released
        assert again._fd is not None
    first.release()  # releasing twice is harmless
    # a lock left by a process that died is no obstacle: the system dropped it
    code = "import sys, os; from gpt2lab import io\nio.RunLock(sys.argv[1]).acquire()\nos._exit(0)\n"
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "run2")], check=True, timeout=60)
    with io.RunLock(tmp_path / "run2"):
        pass


def test_remove_stale_temps(tmp_path):
    dead, live = dead_pid(), os.getpid()
    stale = [f".x.tmp-{dead}", f".d.tmp-{dead}", f".run.old-{dead}", f".w.safetensors.tmp-{dead}"]
    kept = [f".x.tmp-{live}", f".d.old-{live}", f"x.tmp-{dead}", ".lock", f".x.tmp-{dead}abc", "data"]
    for name in stale + kept:
        if name.startswith(".d") or name == "data":
            (tmp_path / name).mkdir()
            (tmp_path / name / "f").write_text("x")
        else:
            (tmp_path / name).write_text("x")
    io.remove_stale_temps(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    io.remove_stale_temps(tmp_path / "missing")  # nothing to do
