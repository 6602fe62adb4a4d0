"""Your own checkable task: prompts from a JSONL file (each record has "prompt" and any other fields) and a
reward function from a Python file, `--prompts FILE.jsonl --reward PATH.py:FUNCTION`, called as
FUNCTION(prompt, completion, record) -> float. The function is the user's own code: its errors, a call
that runs past REWARD_SECONDS and a value that is not a finite number in [-MAX_REWARD, MAX_REWARD] are
each one line naming the function and the record."""

from __future__ import annotations

import contextlib
import importlib.util
import math
import numbers
import signal
import threading
from pathlib import Path

from gpt2lab import io
from gpt2lab.errors import UserError
from gpt2lab.evals.checkable import CheckableTask

REWARD_SECONDS = 30  # the longest one call of a user's reward function may take
MAX_REWARD = 1e6  # rewards beyond it are a bug of the function (and would overflow the advantages)


class _TooSlow(BaseException):
    """Raised in the reward function's frame when it runs past its time (a BaseException, so that its own
    `except Exception` cannot swallow it)."""


@contextlib.contextmanager
def _time_limit(seconds: float):
    """SIGALRM after `seconds` in the main thread (where signals can interrupt Python code); elsewhere, or
    without SIGALRM, no limit."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def stop(signum, frame):
        raise _TooSlow()

    old = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def load_reward(spec: str):
    """`PATH.py:FUNCTION` -> the function (the file is run as a module: it is the user's own code)."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name.isidentifier():
        raise UserError(f"--reward {spec!r}: write PATH.py:FUNCTION, e.g. --reward my_rewards.py:score")
    if not Path(path).is_file():
        raise UserError(f"--reward {spec!r}: {path} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"gpt2lab_reward_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # the user's file: any error in it is theirs to fix
        raise UserError(f"--reward {spec!r}: {path} failed to load ({type(e).__name__}: {e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"--reward {spec!r}: {path} has no function {name!r}")
    return fn


class FileTask(CheckableTask):
    """Prompts from a JSONL file, rewards from the user's function. The held-out prompts (scored, never
    trained on) come from `val_prompts`, or else every k-th record of the file is held out (k = 1 /
    val_fraction; at least one record on each side)."""

    name = "file"

    def __init__(self, prompts: str, reward: str):
        self.difficulty, self.format_reward = 1, 0.0
        self.path, self.records, self.val_records = prompts, self._read(prompts), []
        self.fn, self.spec = load_reward(reward), reward
        self.where = {id(r): w for w, r in self.records}
        self.split = f"{len(self.records)} prompts, none held out"

    def hold_out(self, val_prompts: str | None = None, val_fraction: float = 0.2) -> None:
        """Set the held-out prompts apart: those of `val_prompts`, or every k-th record (k = 1/val_fraction, at
        least one on each side); `split` says what was done."""
        records = self.records
        if val_prompts:
            self.val_records = [r for _, r in self._read(val_prompts)]
            self.split = f"{len(records)} prompts to train on, {len(self.val_records)} held out ({val_prompts})"
        elif val_fraction > 0:
            k = max(2, round(1 / val_fraction))
            held = {i for i in range(len(records)) if i % k == k - 1} or {len(records) - 1}
            if len(held) >= len(records):
                raise UserError(f"{self.path} holds {len(records)} prompt(s): too few to hold some out for the "
                                "evaluation; add prompts, or give the held-out ones with --val-prompts FILE")
            self.records = [r for i, r in enumerate(records) if i not in held]
            self.val_records = [records[i][1] for i in sorted(held)]
            self.split = (f"{len(self.records)} prompts to train on, {len(held)} held out (every {k}th record of "
                          f"{self.path}; --val-prompts FILE chooses them)")
        self.where.update({id(r): "a held-out prompt" for r in self.val_records})

    @staticmethod
    def _read(path: str) -> list[tuple[str, dict]]:
        out = []
        for where, record in io.read_records(path, "prompts file"):
            if not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
                raise UserError(f"{where} has no text \"prompt\"; each record needs one")
            out.append((where, record))
        if not out:
            raise UserError(f"{path} holds no prompts")
        return out

    def reward(self, record: dict, completion: str) -> float:
        where = self.where.get(id(record), "a record")
        try:
            with _time_limit(REWARD_SECONDS):
                value = self.fn(record["prompt"], completion, record)
        except _TooSlow:
            raise UserError(f"the reward function {self.spec} took more than {REWARD_SECONDS} s on {where}; make "
                            "it faster (it is called for every sampled answer)") from None
        except Exception as e:  # the user's code
            raise UserError(f"the reward function {self.spec} raised {type(e).__name__}: {e} on {where}") from None
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
                or abs(value) > MAX_REWARD:
            raise UserError(f"the reward function {self.spec} returned {value!r} on {where}; it must return a "
                            f"finite number between -{MAX_REWARD:g} and {MAX_REWARD:g}")
        return float(value)
