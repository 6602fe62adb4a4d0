"""Scoring instruction answers: 0-100 by a larger model behind an OpenAI-compatible endpoint, or by exact match.

The book has a locally run Llama 3 (through Ollama) grade each answer of the
fine-tuned model against the reference output. `judge_score` asks any server
that speaks `/v1/chat/completions` (Ollama, vLLM, llama.cpp's server, OpenAI)
the same question, through gpt2lab's one HTTP client (gpt2lab.client);
`eval_judge` generates the answers greedily with the run's prompt template and
averages the scores. `eval_exact` needs no judge: the share of greedy answers
equal to the reference output (whitespace at the ends ignored), for tasks with
one right answer.
"""

from __future__ import annotations

import re
import sys

from gpt2lab.client import Client, api_base
from gpt2lab.data.records import read_instructions
from gpt2lab.errors import UserError
from gpt2lab.evals.benchmarks import TaskResult
from gpt2lab.generate import answer, fit_to_context
from gpt2lab.metrics import progress as progress_bar
from gpt2lab.templates import encode_messages, get_format, record_messages

DEFAULT_URL = "http://localhost:11434"
DEFAULT_MODEL = "llama3"

PROMPT = ("Given the input `{prompt}` and correct output `{reference}`, score the model response "
          "`{answer}` on a scale from 0 to 100, where 100 is the best score. "
          "Respond with the integer number only.")

_NUMBER = r"(-?\d+(?:\.\d+)?)"
# a scale the reply restates, which holds numbers that are no score: "(0-100)", "from 0 to 100", "scale of 10"
_SCALE = re.compile(r"(?i)\(?\s*\b(?:from\s+)?[01]\s*(?:-|\u2013|\u2014|to)\s*(?:5|10|100)\b\s*\)?"
                    r"|\bscale\s+of\s+(?:5|10|100)\b")
# a score over a maximum: "85/100", "85 out of 100", "8/10" (read as 80)
_FRACTION = re.compile(rf"(?i){_NUMBER}\s*(?:/|out\s+of)\s*(100|10|5)\b")
# an explicit verdict: "Score: 85", "score of 85", "Rating: 85", "I rate it 85", "I'd give it a 75"
_VERDICT = re.compile(rf"(?i)\b(?:scores?|scored|rating|rate[sd]?|grade|give[sn]?)\b[^\d\n-]{{0,20}}?{_NUMBER}")
_BARE = re.compile(rf"{_NUMBER}\s*%?")


def completions_url(url: str) -> str:
    """The chat completions endpoint of a server URL, with or without a trailing /v1."""
    return api_base(url, "--judge-url") + "/chat/completions"


def judge_prompt(instruction: str, input: str, reference: str, answer: str) -> str:
    prompt = instruction if not input else f"{instruction}\n\n{input}"
    return PROMPT.format(prompt=prompt, reference=reference, answer=answer)


def parse_score(text) -> int | None:
    """The judge's score from 0 to 100, or None when the reply does not give one clearly.

    The reply is asked to be the number only; a reply that is just a number (markdown, a final period or
    a % allowed) is read as it is. Otherwise the last explicit verdict counts: "Score: 85", "Rating: 85",
    "I rate it 85", "85/100", "85 out of 100", or "8/10" (read as 80); a scale the reply restates ("Score
    (0-100): 85") is not a score, and neither is a number that merely appears in the text. A number
    outside 0..100, or not a whole number, is no score.
    """
    if not isinstance(text, str):
        return None
    bare = text.strip().rstrip(".").strip("*_`\"' ").rstrip(".").strip()
    if _BARE.fullmatch(bare):
        value = float(_BARE.fullmatch(bare).group(1))
    else:
        clean = _SCALE.sub(lambda m: " " * len(m.group(0)), text)  # (same length: positions stay)
        found = [(m.end(), float(m.group(1)) * 100 / int(m.group(2)), m.span(1)) for m in _FRACTION.finditer(clean)]
        inside = [span for _, _, span in found]
        found += [(m.end(), float(m.group(1)), m.span(1)) for m in _VERDICT.finditer(clean)
                  if not any(a <= m.start(1) < b for a, b in inside)]
        if not found:
            return None
        value = max(found)[1]
    if not value.is_integer() or not 0 <= value <= 100:
        return None
    return int(value)


def chat(url: str, model: str, content: str, timeout: float = 60, api_key: str | None = None) -> str:
    """One user message to the endpoint at temperature 0; the reply's text (through gpt2lab's one HTTP
    client: a key goes to this endpoint only, never along a redirect)."""
    client = Client(url, api_key, timeout, name="judge", flag="--judge-url",
                    hint=f"; check --judge-model ({model!r}; with Ollama, `ollama pull {model}`), --judge-url and "
                         "--judge-api-key",
                    unreachable="start one (e.g. `ollama serve` and `ollama pull llama3`) or pass --judge-url of "
                                "an OpenAI-compatible server")
    return client.chat(model, [{"role": "user", "content": content}], temperature=0) or ""


def judge_score(url: str, model: str, instruction: str, input: str, reference: str, answer: str,
                timeout: float = 60, api_key: str | None = None) -> int | None:
    """The judge's 0-100 score of `answer`; None when the reply holds no such integer."""
    reply = chat(url, model, judge_prompt(instruction, input, reference, answer), timeout, api_key)
    return parse_score(reply)


def generate_answer(model, tokenizer, fmt, record: dict, max_new_tokens: int = 128) -> str:
    """The model's greedy answer to an Alpaca record, in the run's chat format."""
    fmt = get_format(fmt) if not hasattr(fmt, "segments") else fmt
    messages = [m for m in record_messages(record) if m["role"] != "assistant"]
    ids, _ = encode_messages(tokenizer, messages, fmt, add_generation_prompt=True)
    ids, room = fit_to_context(ids, max_new_tokens, model.config.block_size)
    return answer(model, tokenizer, ids, room, stop=fmt.stop).strip()


def eval_judge(model, tokenizer, records: list[dict], fmt="alpaca", url: str = DEFAULT_URL,
               judge_model: str = DEFAULT_MODEL, max_new_tokens: int = 128, limit: int | None = None, *,
               api_key: str | None = None, timeout: float = 60, progress: bool = False):
    """Generate an answer to each Alpaca record and have the judge score it.

    Returns a TaskResult: {"task": "judge", "n", "mean_score", "scored",
    "unscored"} (the mean over the scored answers; None when none was) and one
    record per example: index, answer, score.
    """
    records = records[:limit] if limit is not None else records
    _check_records(records, "judge")
    preds, scores = [], []
    for i, r in enumerate(progress_bar(records, desc="judge", unit="ex", disable=not progress, leave=False,
                               file=sys.stderr)):
        ans = generate_answer(model, tokenizer, fmt, r, max_new_tokens)
        score = judge_score(url, judge_model, r["instruction"], r.get("input") or "", r["output"], ans,
                            timeout=timeout, api_key=api_key)
        if score is not None:
            scores.append(score)
        preds.append({"task": "judge", "index": i, "answer": ans, "score": score})
    mean = sum(scores) / len(scores) if scores else None
    return TaskResult({"task": "judge", "n": len(records), "mean_score": mean, "scored": len(scores),
                       "unscored": len(records) - len(scores), "judge_model": judge_model}, preds)


def _check_records(records: list[dict], task: str) -> None:
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not isinstance(r.get("instruction"), str) \
                or not isinstance(r.get("output"), str):
            raise UserError(f"{task}: record {i} is not an Alpaca record; each needs text `instruction` and "
                            "`output` (and optionally `input`)")


def eval_exact(model, tokenizer, records: list[dict], fmt="alpaca", max_new_tokens: int = 128,
               limit: int | None = None, *, progress: bool = False):
    """The share of records whose greedy answer is their `output` exactly (ends' whitespace aside).

    Returns a TaskResult: {"task": "exact", "n", "exact_match"} and one record per example: index,
    answer, gold, correct.
    """
    records = records[:limit] if limit is not None else records
    _check_records(records, "exact")
    preds = []
    for i, r in enumerate(progress_bar(records, desc="exact", unit="ex", disable=not progress, leave=False,
                                       file=sys.stderr)):
        ans = generate_answer(model, tokenizer, fmt, r, max_new_tokens)
        preds.append({"task": "exact", "index": i, "answer": ans, "gold": r["output"].strip(),
                      "correct": ans == r["output"].strip()})
    hits = sum(p["correct"] for p in preds)
    return TaskResult({"task": "exact", "n": len(records), "exact_match": hits / len(records) if records else None},
                      preds)


def exact_task(max_new_tokens: int = 128):
    """Exact match as a task of `evaluate_run`: greedy answers in the run's chat format."""

    def run(model, tokenizer, info, data, limit=None, progress=False):
        if data is None:
            raise UserError("task exact needs --data FILE.json or .jsonl of Alpaca records")
        return eval_exact(model, tokenizer, read_instructions(data), info.template or "alpaca", max_new_tokens,
                          limit, progress=progress)

    return run


def judge_task(url: str = DEFAULT_URL, judge_model: str = DEFAULT_MODEL, api_key: str | None = None,
               max_new_tokens: int = 128, timeout: float = 60):
    """The judge as a task of `gpt2lab.evals.benchmarks.evaluate_run`: answers in the run's chat format
    (alpaca when the run has none), scored by the endpoint."""

    def run(model, tokenizer, info, data, limit=None, progress=False):
        if data is None:
            raise UserError("task judge needs --data FILE.json or .jsonl of Alpaca records")

        return eval_judge(model, tokenizer, read_instructions(data), info.template or "alpaca", url, judge_model,
                          max_new_tokens, limit, api_key=api_key, timeout=timeout, progress=progress)

    return run


__all__ = ["DEFAULT_MODEL", "DEFAULT_URL", "chat", "completions_url", "eval_exact", "eval_judge", "exact_task",
           "generate_answer", "judge_prompt", "judge_score", "judge_task", "parse_score"]
