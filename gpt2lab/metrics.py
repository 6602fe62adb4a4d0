"""Where training numbers go: one console line, metrics.jsonl, and TensorBoard.

Only rank 0 of a distributed run creates a `MetricsLogger`; the others log nothing.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from tqdm import tqdm

from gpt2lab import io


def format_seconds(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}"


def human_duration(seconds: float) -> str:
    """A duration as people say it: 40 s, 12 min, 5.3 hours, 3.6 days."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds / 86400:.1f} days"


class MetricsLogger:
    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool = True, resume_step: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_step is not None:
            self._truncate_after(resume_step)
        elif self.path.exists():
            self.path.unlink()
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"),
                                         purge_step=(resume_step + 1) if resume_step is not None else None)
            except ImportError:
                self._tb = None

    def _truncate_after(self, step: int) -> None:
        """On resume, drop what was logged after the checkpoint we resume from."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
        io.write_text(self.path, "".join(k + "\n" for k in kept))

    def log(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self._tb is not None:
            self._tb.add_text(tag, text, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def console(line: str) -> None:
    print(line, file=sys.stdout, flush=True)


def progress(iterable=None, *, disable: bool = False, **kw):
    """A tqdm progress bar on stderr, shown only when stderr is a terminal: in a log, "\\r" redraws
    would run into the next line (an `error:` line included)."""
    kw.setdefault("file", sys.stderr)
    return tqdm(iterable, disable=disable or not sys.stderr.isatty(), **kw)
