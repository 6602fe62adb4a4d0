"""Guarding outputs: before any work starts, decide whether an output may be written.

`--overwrite` replaces only an output of the same kind that gpt2lab wrote (`dir_kind`, `FILE_KINDS`),
and never one that is, holds or lies inside an input of the command.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from gpt2lab.errors import UserError
from gpt2lab.io.files import (
    DATA_META,
    EXPORT_MARKER,
    INSTRUCTIONS_MARKER,
    KIND_NAMES,
    RUN_CONFIG,
    TOKENIZER_JSON,
    remove_stale_temps,
)


def dir_kind(path: str | os.PathLike) -> str | None:
    """What gpt2lab wrote in `path`: "run", "data", "tokenizer", "hf-export", "instructions", "ablation",
    "empty"; None for a directory gpt2lab did not write (or one it cannot tell)."""
    path = Path(path)
    if not path.is_dir():
        return None
    entries = [p for p in path.iterdir() if not (p.name == ".lock" or p.name.startswith(".") and (
        ".tmp-" in p.name or ".old-" in p.name))]
    if not entries:
        return "empty"

    def fmt(name: str) -> str | None:
        try:
            value = json.loads((path / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return value.get("format") if isinstance(value, dict) else None

    if (path / EXPORT_MARKER).is_file() and fmt(EXPORT_MARKER) == "gpt2lab-export":
        return "hf-export"
    if fmt(RUN_CONFIG) == "gpt2lab-run":
        return "run"
    if fmt(DATA_META) == "gpt2lab-data":
        return "data"
    if fmt(INSTRUCTIONS_MARKER) == "gpt2lab-instructions":
        return "instructions"
    try:  # an ablation's results: a list of {"name", ...}, one per variant (empty while the first one trains)
        rows = json.loads((path / "ablation.json").read_text(encoding="utf-8"))
        if isinstance(rows, list) and all(isinstance(r, dict) and "name" in r for r in rows):
            return "ablation"
    except (OSError, ValueError):
        pass
    if [p.name for p in entries] == [TOKENIZER_JSON] and fmt(TOKENIZER_JSON) == "gpt2lab-bpe":
        return "tokenizer"
    return None


def _related(out: Path, inp: Path) -> str | None:
    """How `out` touches the input `inp`, or None."""
    if out == inp:
        return "is"
    if out in inp.parents:
        return "holds"
    if inp in out.parents:
        return "lies inside"
    return None


def _resolved(p: str | os.PathLike) -> Path:
    return Path(os.path.abspath(os.path.realpath(Path(p).expanduser())))


def check_not_an_input(out: str | os.PathLike, inputs: Iterable[str | os.PathLike], flag: str) -> None:
    """Refuse an output that is, holds or lies inside one of the inputs."""
    out_r = _resolved(out)
    for inp in inputs:
        if inp is None:
            continue
        how = _related(out_r, _resolved(inp))
        if how:
            raise UserError(f"{flag} {out} {how} the input {inp}; write the output somewhere else")


def _probe_writable(path: Path, flag: str) -> None:
    """The nearest existing ancestor of `path` must be a directory in which a file can be created."""
    ancestor = path.parent
    while not ancestor.exists():
        if ancestor == ancestor.parent:
            break
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{flag} {path}: {ancestor} is a file, not a directory; choose another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".gpt2lab-probe-", dir=ancestor)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{flag} {path} cannot be written ({e.strerror} in {ancestor}); choose a writable "
                        "location") from None


def check_output_dir(out: str | os.PathLike, kind: str, *, overwrite: bool = False, flag: str = "--out",
                     inputs: Iterable[str | os.PathLike] = (), allow_same_kind: bool = False) -> None:
    """May the directory `out` be written as a `kind` output? A UserError, before any work, if not.

    A missing or empty directory may always be written. An existing one only with `overwrite` and only
    when gpt2lab wrote it as the same kind (`allow_same_kind`: without `overwrite`, for outputs that add
    to a directory of their kind). Never a directory that is, holds or lies inside an input.
    """
    out = Path(out)
    check_not_an_input(out, inputs, flag)
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out} is a file, not a directory; choose another {flag}")
    found = dir_kind(out)
    if found not in (None, "empty"):
        if found != kind:
            raise UserError(f"{flag} {out} is {KIND_NAMES.get(found, found)}, not {KIND_NAMES[kind]}; "
                            f"--overwrite never replaces another kind of output, choose another {flag}")
        if not (overwrite or allow_same_kind):
            raise UserError(f"{flag} {out} already holds {KIND_NAMES[kind]}; pass --overwrite to replace it, "
                            f"or choose another {flag}")
    elif found is None and out.is_dir():
        raise UserError(f"{flag} {out} is a non-empty directory that gpt2lab did not write; --overwrite only "
                        f"replaces {KIND_NAMES[kind]}, choose another {flag}")
    _probe_writable(out, flag)
    remove_stale_temps(out.parent, out.name)


# file kinds: how to recognise an existing file gpt2lab wrote
def _is_png(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def _is_eval_json(path: Path) -> bool:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    # what `gpt2lab eval --output` writes: a non-empty list of {"task", "n", ...}
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) and {"task", "n"} <= set(v)
                                                           for v in value)


def _is_eval_jsonl(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
        records = [json.loads(line) for line in lines]
    except (OSError, ValueError):
        return False
    # what `gpt2lab eval --predictions` writes: one {"task", "index", ...} per line (or nothing at all)
    return all(isinstance(r, dict) and {"task", "index"} <= set(r) for r in records)


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _is_modelfile(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(40).startswith(b"# an Ollama Modelfile written by gpt2lab")


FILE_KINDS = {"png": ("a PNG image", _is_png), "eval-json": ("gpt2lab eval metrics", _is_eval_json),
              "eval-jsonl": ("gpt2lab eval predictions", _is_eval_jsonl), "gguf": ("a GGUF file", _is_gguf),
              "modelfile": ("an Ollama Modelfile gpt2lab wrote", _is_modelfile)}


def check_output_file(out: str | os.PathLike, kind: str, *, flag: str,
                      inputs: Iterable[str | os.PathLike] = ()) -> None:
    """May the file `out` be written as a `kind` file? An existing file is replaced only when it is one
    gpt2lab wrote of the same kind; a directory, or a file inside or equal to an input, never."""
    out = Path(out)
    check_not_an_input(out, inputs, flag)
    what, is_kind = FILE_KINDS[kind]
    if out.is_dir():
        raise UserError(f"{flag} {out} is a directory; give a file path")
    if out.exists():
        if not out.is_file() or not is_kind(out):
            raise UserError(f"{flag} {out} exists and is not {what}; gpt2lab replaces only a file of the same "
                            f"kind, choose another {flag}")
    _probe_writable(out, flag)
    remove_stale_temps(out.parent, out.name)


# ------------------------------------------------------------------------------ a run dir's lock

