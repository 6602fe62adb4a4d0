"""Checkable tasks for reinforcement learning: prompts whose answers a program can verify.

A task makes prompts (a train stream and a disjoint held-out set), writes worked solutions (the
thinking SFT can teach), and scores a completion: `reward(record, completion) -> float`. Rewards
read only the answer, the text after a thinking section (<think> ... </think>) when there is one.

  arithmetic   "What is 387 + 45?"  -> 432. difficulty d: d + 1 digit numbers (1: up to 99), adding
               or subtracting (never below zero); the worked solution goes digit by digit with carries
               and borrows.
  countdown    "Using the numbers 3, 7, 2, make 23."  -> an expression such as 3*7+2 that uses each
               given number at most once, with + - * and parentheses. difficulty d: d + 1 numbers.
  FILE:FN      any task: prompts from a JSONL file and a reward function from a Python file
               (`--prompts FILE.jsonl --reward PATH.py:FUNCTION`; prompts.py).

A prompt belongs to the held-out set when a hash of its text says so (1 in 5); the train stream
skips those, so no held-out prompt is ever trained on. The same seed gives the same prompts.
"""

from __future__ import annotations

import ast
import hashlib
import math
import random
import re
from collections import Counter

import torch

from gpt2lab.errors import UserError
from gpt2lab.evals.benchmarks import TaskResult
from gpt2lab.generate import fit_to_context, generate_batch, generate_group
from gpt2lab.templates import encode_messages, get_format
from gpt2lab.text import cut_at_stop, split_thinking

HELD_OUT_EVERY = 5


def held_out(prompt: str) -> bool:
    return int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) % HELD_OUT_EVERY == 0


class CheckableTask:
    name = "task"
    correct_at = 1.0  # a reward at least this counts as a pass

    def __init__(self, difficulty: int = 1, format_reward: float = 0.0):
        if not 1 <= difficulty <= 5:
            raise UserError(f"--difficulty must be from 1 to 5, got {difficulty}")
        if not 0.0 <= format_reward < 1.0:
            raise UserError(f"--format-reward must be in [0, 1), got {format_reward}")
        self.difficulty, self.format_reward = difficulty, format_reward

    def make(self, rng: random.Random) -> dict:
        raise NotImplementedError

    def prompts(self, seed: int, split: str = "train"):
        """An endless stream of records of one split, the same for the same seed."""
        rng = random.Random(f"{self.name}:{self.difficulty}:{seed}:{split}")
        want_held_out = split == "heldout"
        while True:
            record = self.make(rng)
            if held_out(record["prompt"]) == want_held_out:
                yield record

    def distinct(self, n: int, seed: int = 0, split: str = "train") -> list[dict]:
        """Up to n distinct records of a split. A task at a low difficulty has few distinct prompts: when a
        long run of draws brings no new one, the split is exhausted and what was found is all there is."""
        out, seen, since_new = [], set(), 0
        patience = 5000
        for record in self.prompts(seed, split):
            if record["prompt"] in seen:
                since_new += 1
                if since_new > max(patience, 20 * len(out)):
                    break
                continue
            seen.add(record["prompt"])
            out.append(record)
            since_new = 0
            if len(out) == n:
                break
        return out

    def heldout(self, n: int, seed: int = 0, flag: str | None = "--limit") -> list[dict]:
        """n distinct held-out records. A task with fewer is a UserError naming `flag` (the setting that asked
        for n) and how many there are; with flag None, all it has."""
        out = self.distinct(n, seed, "heldout")
        if len(out) < n and flag is not None:
            raise UserError(f"task {self.name} at difficulty {self.difficulty} has {len(out)} held-out prompts; "
                            f"ask for at most {len(out)} ({flag} {len(out)}), or raise --difficulty")
        return out

    def solution(self, record: dict) -> tuple[str, str]:
        """(worked steps, answer) of a record: the thinking and the answer SFT teaches."""
        raise NotImplementedError

    def reward(self, record: dict, completion: str) -> float:
        raise NotImplementedError


def _answer(completion: str) -> str:
    _, answer = split_thinking(completion)
    return answer.strip()


class Arithmetic(CheckableTask):
    name = "arithmetic"

    def make(self, rng: random.Random) -> dict:
        top = 10 ** (self.difficulty + 1) - 1
        a, b = rng.randint(0, top), rng.randint(0, top)
        op = rng.choice("+-")
        if op == "-" and b > a:
            a, b = b, a
        value = a + b if op == "+" else a - b
        return {"prompt": f"What is {a} {op} {b}?", "a": a, "b": b, "op": op, "answer": str(value)}

    def solution(self, record: dict) -> tuple[str, str]:
        a, b, op = record["a"], record["b"], record["op"]
        da, db = str(a)[::-1], str(b)[::-1]
        steps, carry, digits = [], 0, []
        for i in range(max(len(da), len(db))):
            x = int(da[i]) if i < len(da) else 0
            y = int(db[i]) if i < len(db) else 0
            if op == "+":
                total = x + y + carry
                steps.append(f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={total}")
                digits.append(total % 10)
                carry = total // 10
            else:
                x -= carry
                carry = 1 if x < y else 0
                steps.append(f"{x + 10 * carry}-{y}={x + 10 * carry - y}")
                digits.append(x + 10 * carry - y)
        if op == "+" and carry:
            digits.append(carry)
        answer = str(int("".join(str(d) for d in reversed(digits))))
        assert answer == record["answer"], (record, answer)
        return " ".join(steps), answer

    def reward(self, record: dict, completion: str) -> float:
        answer = _answer(completion).rstrip(".")
        if answer == record["answer"]:
            return 1.0
        return self.format_reward if re.fullmatch(r"-?\d+", answer) else 0.0


_ALLOWED = (ast.Expression, ast.BinOp, ast.Add, ast.Sub, ast.Mult, ast.Constant, ast.UnaryOp, ast.USub)


def evaluate_expression(text: str) -> tuple[int, list[int]] | None:
    """(value, the numbers it uses) of an arithmetic expression of integers, + - * and parentheses; None
    for anything else (names, calls, division, huge numbers: nothing is ever executed)."""
    if not re.fullmatch(r"[\d\s+\-*()]{1,80}", text):
        return None
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        return None
    numbers = []
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED):
            return None
        if isinstance(node, ast.Constant):
            if not isinstance(node.value, int) or node.value > 10**6:
                return None
            numbers.append(node.value)

    def value(node) -> int:
        if isinstance(node, ast.Expression):
            return value(node.body)
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.UnaryOp):
            return -value(node.operand)
        left, right = value(node.left), value(node.right)
        result = left + right if isinstance(node.op, ast.Add) else left - right if isinstance(node.op, ast.Sub) \
            else left * right
        if abs(result) > 10**12:
            raise OverflowError
        return result

    try:
        return value(tree), numbers
    except OverflowError:
        return None


class Countdown(CheckableTask):
    name = "countdown"

    def make(self, rng: random.Random) -> dict:
        while True:
            numbers = [rng.randint(1, 10) for _ in range(self.difficulty + 1)]
            order = list(numbers)
            rng.shuffle(order)
            expr = str(order[0])
            steps, value = [], order[0]
            for n in order[1:]:
                op = rng.choice("+-*")
                new = value + n if op == "+" else value - n if op == "-" else value * n
                if new <= 0 or new > 200:
                    continue
                steps.append(f"{value}{op}{n}={new}")
                expr = f"({expr}){op}{n}" if op == "*" and ("+" in expr or "-" in expr) else f"{expr}{op}{n}"
                value = new
            if steps:
                given = ", ".join(str(n) for n in numbers)
                return {"prompt": f"Using the numbers {given}, make {value}. Use + - * and each number at most once.",
                        "numbers": numbers, "target": value, "expression": expr, "steps": " ".join(steps)}

    def solution(self, record: dict) -> tuple[str, str]:
        return record["steps"], record["expression"]

    def reward(self, record: dict, completion: str) -> float:
        found = evaluate_expression(_answer(completion).rstrip("."))
        if found is None:
            return 0.0
        value, used = found
        if Counter(used) - Counter(record["numbers"]):  # a number not given, or used too often
            return self.format_reward
        return 1.0 if value == record["target"] else self.format_reward


BUILTIN = {"arithmetic": Arithmetic, "countdown": Countdown}


def get_task(name: str, difficulty: int = 1, format_reward: float = 0.0) -> CheckableTask:
    if name not in BUILTIN:
        raise UserError(f"unknown task {name!r}; built in: {', '.join(BUILTIN)} (or --prompts FILE --reward PATH:FN)")
    return BUILTIN[name](difficulty, format_reward)


# ------------------------------------------------------------------------------ scoring a model


def answer_text(tokenizer, fmt, ids: list[int]) -> str:
    """The answer a reader would see in ids a model produced: up to <|endoftext|> or the chat format's stop."""
    eot = tokenizer.eot_id
    if eot in ids:
        ids = ids[:ids.index(eot)]
    return cut_at_stop(tokenizer.decode(ids), fmt.stop)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The chance that at least one of k answers drawn from n (c of them correct) is correct (unbiased)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def score_task(model, tokenizer, fmt, task: CheckableTask, records: list[dict], max_new_tokens: int = 64, k: int = 1,
               samples: int = 0, temperature: float = 1.0, seed: int = 0, batch_size: int = 32) -> dict:
    """pass@1 (greedy) of a model on records, and with `samples` > 0 pass@k from that many sampled answers
    each (the unbiased estimator). Returns the metrics and one row per record ("rows")."""
    block = model.config.block_size
    fitted = [fit_to_context(encode_messages(tokenizer, [{"role": "user", "content": r["prompt"]}], fmt,
                                             add_generation_prompt=True)[0], max_new_tokens, block) for r in records]
    prompts, rooms = [p for p, _ in fitted], [n for _, n in fitted]
    rows = []
    for start in range(0, len(records), batch_size):
        chunk = prompts[start:start + batch_size]
        room = min(rooms[start:start + batch_size])
        outs = generate_batch(model, chunk, room, temperature=0, stop_ids={tokenizer.eot_id},
                              pad_id=tokenizer.eot_id)
        for record, out in zip(records[start:start + batch_size], outs):
            answer = answer_text(tokenizer, fmt, out)
            reward = task.reward(record, answer)
            rows.append({"prompt": record["prompt"], "answer": answer, "reward": reward,
                         "correct": reward >= task.correct_at})
    n = len(rows)
    metrics = {"n": n, "pass_at_1": sum(r["correct"] for r in rows) / n,
               "mean_reward": sum(r["reward"] for r in rows) / n}
    if samples:
        gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
        total = 0.0
        for record, ids, row in zip(records, prompts, rows):
            group = generate_group(model, ids, samples, min(max_new_tokens, block - len(ids)), temperature,
                                   generator=gen, stop_ids={tokenizer.eot_id})
            c = sum(task.reward(record, answer_text(tokenizer, fmt, s)) >= task.correct_at for s in group)
            row["samples_correct"] = c
            total += pass_at_k(samples, c, k)
        metrics[f"pass_at_{k}"] = total / n
        metrics["samples"] = samples
    metrics["rows"] = rows
    return metrics


def eval_task(name: str, difficulty: int = 1, samples: int = 0, k: int = 1, max_new_tokens: int = 64,
              temperature: float = 1.0, n: int = 200):
    """A built-in task as a task of `gpt2lab.evals.benchmarks.evaluate_run`: pass@1 (greedy) on `n` held-out prompts
    (or --limit of them), and pass@k from `samples` answers each."""

    def run(model, tokenizer, info, data, limit=None, progress=False):
        task = get_task(name, difficulty)
        records = task.heldout(limit, seed=0) if limit else task.heldout(n, seed=0, flag=None)
        metrics = score_task(model, tokenizer, get_format(info.template), task, records, max_new_tokens, k=k,
                             samples=samples, temperature=temperature)
        rows = metrics.pop("rows")
        metrics = {"task": name, "difficulty": difficulty, **metrics}
        return TaskResult(metrics, [{"task": name, "index": i, **r} for i, r in enumerate(rows)])

    return run
