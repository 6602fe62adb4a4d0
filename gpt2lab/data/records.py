"""Instruction records: Alpaca records {instruction, input, output} or chat records {messages}, read from a
.json list or a .jsonl file, each one checked (SFT trains on them; the judge and instruction scoring ask
them)."""

from __future__ import annotations

import os
from pathlib import Path

from gpt2lab import io
from gpt2lab.errors import UserError


def read_instructions(path: str | os.PathLike) -> list[dict]:
    """Alpaca records or chat records from a .json (list) or .jsonl file, each one checked."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"instruction data {path} does not exist; check the path")
    found = io.read_records(path, "instruction data file")
    if not found:
        raise UserError(f"{path} holds no records; expected a list of {{instruction, input, output}} "
                        "or chat objects with `messages`")
    for where, r in found:
        problem = record_problem(r)
        if problem:
            raise UserError(f"{where} {problem}; each record needs text `instruction` and `output` (and "
                            "optionally `input`) for Alpaca, or `messages` of {role, content} for chat")
    return [r for _, r in found]


def record_problem(r) -> str | None:
    if not isinstance(r, dict):
        return f"is {type(r).__name__}, not an object"
    if "messages" in r:
        msgs = r["messages"]
        if not isinstance(msgs, list) or not msgs:
            return "has `messages` that is not a non-empty list"
        for m in msgs:
            ok = isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") \
                and isinstance(m.get("content"), str)
            if not ok:
                return f"has a message {str(m)[:80]} without a system/user/assistant `role` and text `content`"
        if not any(m["role"] == "assistant" for m in msgs):
            return "has no assistant message to learn from"
        return None
    if not {"instruction", "output"} <= set(r):
        return f"has fields {sorted(r)}"
    for key in ("instruction", "output", "input"):
        if key in r and r[key] is not None and not isinstance(r[key], str):
            return f"has a `{key}` that is {type(r[key]).__name__}, not text"
    return None
