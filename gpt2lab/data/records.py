"""Instruction records: Alpaca records {instruction, input, output} or chat records {messages}, read from a
.json list or a .jsonl file, each one checked (SFT trains on them; the judge and instruction scoring ask
them)."""

from __future__ import annotations

import csv
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


QUESTION_FIELDS = ("question", "prompt", "instruction", "query", "q", "input")
ANSWER_FIELDS = ("answer", "output", "response", "completion", "a", "target")


def read_qa_file(path: str | os.PathLike, question_field: str | None = None,
                 answer_field: str | None = None) -> list[dict]:
    """Instruction records ({instruction, output}) from a user's own question/answer file: JSONL, JSON (a list
    of objects), CSV or TSV with a header line. The fields are named, or found among the usual names
    (question/prompt/instruction/..., answer/output/response/...)."""
    path = Path(path)
    name = path.name.lower().removesuffix(".gz")
    if name.endswith((".csv", ".tsv")):
        text = io.read_text(path, "Q/A file")
        rows = list(csv.DictReader(text.splitlines(), delimiter="\t" if name.endswith(".tsv") else ","))
        located = [(f"{path}:{i + 2}", r) for i, r in enumerate(rows)]
    elif name.endswith((".jsonl", ".json")):
        located = io.read_records(path, "Q/A file")
    else:
        raise UserError(f"--source {path}: a Q/A file is .jsonl, .json, .csv or .tsv (or a folder of Q/A material)")
    if not located:
        raise UserError(f"--source {path} holds no records")
    fields = list(located[0][1])
    q = _field(question_field, QUESTION_FIELDS, fields, path, "--question-field", "question")
    a = _field(answer_field, ANSWER_FIELDS, fields, path, "--answer-field", "answer")
    out = []
    for where, r in located:
        question, answer = r.get(q), r.get(a)
        if not isinstance(question, str) or not isinstance(answer, str) or not question.strip():
            raise UserError(f"{where}: `{q}` and `{a}` must be text (the question and its answer)")
        out.append({"instruction": question.strip(), "output": answer.strip(), "task": path.stem})
    return out


def _field(given: str | None, usual: tuple[str, ...], fields: list[str], path: Path, flag: str, what: str) -> str:
    if given is not None:
        if given not in fields:
            raise UserError(f"{flag} {given!r}: {path} has no such field (it has {', '.join(fields)})")
        return given
    lower = {f.lower(): f for f in fields}
    for name in usual:
        if name in lower:
            return lower[name]
    raise UserError(f"{path}: no field holds the {what} (it has {', '.join(fields)}); name it with {flag}")
