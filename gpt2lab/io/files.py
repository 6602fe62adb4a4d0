"""Files in and out: atomic writes, publishing a directory, reading JSON and JSONL, the run lock.

Every file gpt2lab writes goes through here (tensors too: `gpt2lab.checkpoint.save_tensors` writes
through `atomic_path`):

- `write_bytes` / `write_text` / `write_json` / `write_jsonl` write to a hidden
  temporary name next to the target (`.NAME.tmp-PID`), fsync it and rename it into place, so an
  interrupted command leaves the old file or the new one, never half of one.
- `staging(out)` builds a whole directory under a temporary name; `publish` renames it into place
  (moving an old one aside first and deleting it only after the rename).
- `read_json` / `read_jsonl` / `read_records` name the file and line of anything malformed.
- `RunLock` keeps two processes from training into one run dir at once.

Nothing here imports torch at module level, so commands that only check their arguments stay fast.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from gpt2lab.errors import UserError

# the marker files that say what kind of directory gpt2lab wrote
RUN_CONFIG = "config.json"  # {"format": "gpt2lab-run"}
DATA_META = "meta.json"  # {"format": "gpt2lab-data"}
TOKENIZER_JSON = "tokenizer.json"  # {"format": "gpt2lab-bpe"}
EXPORT_MARKER = "gpt2lab-export.json"  # next to an HF export's config.json
INSTRUCTIONS_MARKER = "instructions.json"  # an instruction set made by `finetune instructions`
KIND_NAMES = {"run": "a gpt2lab run dir", "data": "a gpt2lab data dir", "tokenizer": "a gpt2lab tokenizer dir",
              "hf-export": "a Hugging Face export made by gpt2lab", "instructions": "an instruction set",
              "ablation": "an ablation dir"}


# ------------------------------------------------------------------------------ writing


def temp_name(path: Path) -> Path:
    """The hidden temporary name a file or directory is built under before its rename."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


fsync_dir = _fsync_dir


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """A temporary path next to `path` for a writer that wants a file name; when the block ends without
    an error the file is fsynced and renamed over `path`, otherwise it is removed."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None):
    """Open a temporary file next to `path`; on success fsync it and rename it over `path`."""
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding) as f:
        yield f


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj, indent: int | None = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    with atomic_file(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


class staging:
    """`with staging(out) as tmp:` a temporary directory next to `out`, removed unless published."""

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.path = temp_name(self.out)

    def __enter__(self) -> Path:
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.mkdir()
        return self.path

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def publish(tmp: Path, out: Path) -> None:
    """Move a finished temporary directory to `out` in one rename; an old `out` moves aside first
    and is deleted only once the new one is in place."""
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
    _fsync_dir(out.parent)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(directory: str | os.PathLike, target: str | None = None) -> None:
    """Delete the `.NAME.tmp-PID` / `.NAME.old-PID` leftovers of processes that no longer run (of the output
    `target` only, when given)."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for p in directory.iterdir():
        name = p.name
        if not name.startswith(".") or (target is not None and not name.startswith(f".{target}.")):
            continue
        for tag in (".tmp-", ".old-"):
            if tag in name:
                pid_text = name.rsplit(tag, 1)[1].split(".")[0]
                if pid_text.isdigit() and not _pid_alive(int(pid_text)):
                    if p.is_dir() and not p.is_symlink():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        with contextlib.suppress(OSError):
                            p.unlink()


# ------------------------------------------------------------------------------ reading


def _decode(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8-sig")  # a byte-order mark at the start is allowed and dropped
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text (a binary file?); pass a JSON/text file") from None


def read_bytes(path: str | os.PathLike, what: str = "file", fix: str = "check the path") -> bytes:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory, not a {what}; {fix}")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; {fix}") from None
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror}); {fix}") from None
    if path.name.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise UserError(f"{path} is not a readable gzip file ({e}); {fix}") from None
    return data


def read_text(path: str | os.PathLike, what: str = "text file", fix: str = "check the path") -> str:
    return _decode(read_bytes(path, what, fix), Path(path))


def read_json(path: str | os.PathLike, what: str = "JSON file", fix: str = "check the path"):
    """A JSON file's value; missing, binary or malformed files are one UserError naming the file."""
    path = Path(path)
    text = _decode(read_bytes(path, what, fix), path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno} is not valid JSON ({e.msg}); the {what} is damaged, {fix}") from None


def read_json_object(path: str | os.PathLike, what: str = "JSON file", fix: str = "check the path") -> dict:
    value = read_json(path, what, fix)
    if not isinstance(value, dict):
        raise UserError(f"{path} holds a JSON {type(value).__name__}, not an object; the {what} is damaged, "
                        f"{fix}")
    return value


def read_jsonl(path: str | os.PathLike, what: str = "JSONL file") -> Iterator[tuple[int, dict]]:
    """(line number, record) of a .jsonl (or .jsonl.gz) file of JSON objects, blank lines skipped."""
    path = Path(path)
    text = read_text(path, what)
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno} is not valid JSON ({e.msg}); each line of a {what} must be "
                            "one JSON object") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{lineno} is a JSON {type(record).__name__}, not an object; each line "
                            f"of a {what} must be one JSON object")
        yield lineno, record


def read_records(path: str | os.PathLike, what: str = "records file") -> list[tuple[str, dict]]:
    """Records of a .json file (a list of objects) or a .jsonl file, each with where it is ("file:line"
    or "file: record i")."""
    path = Path(path)
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(".json"):
        value = read_json(path, what)
        if not isinstance(value, list):
            raise UserError(f"{path} holds a JSON {type(value).__name__}; a .json {what} must be a list of "
                            "objects (or use one object per line in a .jsonl file)")
        out = []
        for i, r in enumerate(value):
            if not isinstance(r, dict):
                raise UserError(f"{path}: record {i} is a JSON {type(r).__name__}, not an object")
            out.append((f"{path}: record {i}", r))
        return out
    return [(f"{path}:{lineno}", r) for lineno, r in read_jsonl(path, what)]


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, read in blocks (what run dirs record of their data files)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


class RunLock:
    """An exclusive lock on a directory (a `.lock` file held with flock) for as long as a process trains
    in it. The operating system releases it when the process ends, however it ends, so a lock left by a
    killed run is never stale: the next run simply takes it."""

    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                try:
                    holder = self.path.read_text().strip() or "another process"
                except OSError:
                    holder = "another process"
                raise UserError(f"{self.path.parent} is in use by {holder}; wait for it to finish (or stop it) "
                                "before training into the same directory") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()}".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# the OSError numbers that mean "this output cannot be written here", reported as one line by the CLI
WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EROFS, errno.EISDIR, errno.ENOTDIR,
                errno.EEXIST, errno.EDQUOT, errno.ENAMETOOLONG, errno.EFBIG}
