"""Scoring instruction answers 0-100 with a larger model behind an OpenAI-compatible endpoint.

The book has a locally run Llama 3 (through Ollama) grade each answer of the
fine-tuned model against the reference output. `judge_score` asks any server
that speaks `/v1/chat/completions` (Ollama, vLLM, llama.cpp's server, OpenAI)
the same question; `eval_judge` generates the answers greedily with the run's
prompt template and averages the scores. Standard library only: no client
package is needed.
"""

from __future__ import annotations

import json
import re
import sys
import urllib.error
import urllib.request

from gpt2lab.errors import UserError

DEFAULT_URL = "http://localhost:11434"
DEFAULT_MODEL = "llama3"

PROMPT = ("Given the input `{prompt}` and correct output `{reference}`, score the model response "
          "`{answer}` on a scale from 0 to 100, where 100 is the best score. "
          "Respond with the integer number only.")

# an explicit verdict: "Score: 85", "score of 85", "85/100", "85 out of 100"
_VERDICT = re.compile(r"(?i)\bscore\b\D{0,12}?(-?\d+(?:\.\d+)?)|(-?\d+(?:\.\d+)?)\s*(?:/|out of)\s*100\b")
_BARE = re.compile(r"-?\d+(?:\.\d+)?")


def completions_url(url: str) -> str:
    """The chat completions endpoint of a server URL, with or without a trailing /v1."""
    base = url.rstrip("/")
    if base.endswith("/chat/completions"):
        return base
    if not base.endswith("/v1"):
        base += "/v1"
    return base + "/chat/completions"


def judge_prompt(instruction: str, input: str, reference: str, answer: str) -> str:
    prompt = instruction if not input else f"{instruction}\n\n{input}"
    return PROMPT.format(prompt=prompt, reference=reference, answer=answer)


def parse_score(text) -> int | None:
    """The judge's score from 0 to 100, or None when the reply does not give one clearly.

    The reply is asked to be the number only; a reply that is just a number (markdown and a final
    period allowed) is read as it is. Otherwise the last explicit verdict counts ("Score: 85",
    "85/100", "85 out of 100"), never a number that merely appears in the text. A number outside
    0..100, or not a whole number, is no score.
    """
    if not isinstance(text, str):
        return None
    bare = text.strip().rstrip(".").strip("*_`\"' ").rstrip(".").strip()
    if _BARE.fullmatch(bare):
        value = float(bare)
    else:
        found = [m.group(1) or m.group(2) for m in _VERDICT.finditer(text)]
        if not found:
            return None
        value = float(found[-1])
    if not value.is_integer() or not 0 <= value <= 100:
        return None
    return int(value)


def _server_message(err: urllib.error.HTTPError) -> str:
    try:
        body = err.read().decode("utf-8", "replace").strip()
    except OSError:
        body = ""
    try:
        data = json.loads(body)
        e = data.get("error", data) if isinstance(data, dict) else data
        body = e.get("message", json.dumps(e)) if isinstance(e, dict) else str(e)
    except (ValueError, AttributeError):
        pass
    body = " ".join(body.split())
    return (body[:300] + "...") if len(body) > 300 else (body or err.reason or "no message")


def chat(url: str, model: str, content: str, timeout: float = 60, api_key: str | None = None) -> str:
    """One user message to the endpoint at temperature 0; the reply's text."""
    endpoint = completions_url(url)
    payload = {"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0,
               "stream": False}
    headers = {"Content-Type": "application/json"}
    if api_key:  # only a key given for this endpoint is ever sent
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(endpoint, data=json.dumps(payload).encode("utf-8"), headers=headers,
                                     method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as e:
        raise UserError(f"the judge at {endpoint} answered HTTP {e.code}: {_server_message(e)}; check "
                        f"--judge-model ({model!r}; with Ollama, `ollama pull {model}`), --judge-url "
                        "and --judge-api-key") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"no judge answered at {url} ({reason}); start one (e.g. `ollama serve` and "
                        "`ollama pull llama3`) or pass --judge-url of an OpenAI-compatible server") from None
    try:
        content = json.loads(body)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise UserError(f"the judge at {endpoint} did not answer like an OpenAI chat completions "
                        "endpoint (no choices[0].message.content); pass --judge-url of one") from None
    if content is None:
        return ""
    if not isinstance(content, str):
        raise UserError(f"the judge at {endpoint} answered with content that is not text "
                        f"({type(content).__name__}); pass --judge-url of an OpenAI-compatible endpoint")
    return content


def judge_score(url: str, model: str, instruction: str, input: str, reference: str, answer: str,
                timeout: float = 60, api_key: str | None = None) -> int | None:
    """The judge's 0-100 score of `answer`; None when the reply holds no such integer."""
    reply = chat(url, model, judge_prompt(instruction, input, reference, answer), timeout, api_key)
    return parse_score(reply)


def generate_answer(model, tokenizer, fmt, record: dict, max_new_tokens: int = 128) -> str:
    """The model's greedy answer to an Alpaca record, in the run's chat format."""
    from gpt2lab.generate import answer
    from gpt2lab.templates import encode_messages, get_format, record_messages

    fmt = get_format(fmt) if not hasattr(fmt, "segments") else fmt
    messages = [m for m in record_messages(record) if m["role"] != "assistant"]
    ids, _ = encode_messages(tokenizer, messages, fmt, add_generation_prompt=True)
    room = max(0, min(max_new_tokens, model.config.block_size - 1))
    ids = ids[-(model.config.block_size - room):] if room else ids
    return answer(model, tokenizer, ids, room, stop=fmt.stop).strip()


def eval_judge(model, tokenizer, records: list[dict], fmt="alpaca", url: str = DEFAULT_URL,
               judge_model: str = DEFAULT_MODEL, max_new_tokens: int = 128, limit: int | None = None, *,
               api_key: str | None = None, timeout: float = 60, progress: bool = False):
    """Generate an answer to each Alpaca record and have the judge score it.

    Returns a TaskResult: {"task": "judge", "n", "mean_score", "scored",
    "unscored"} (the mean over the scored answers; None when none was) and one
    record per example: index, answer, score.
    """
    from gpt2lab.evaluate import TaskResult
    from gpt2lab.metrics import progress as progress_bar

    records = records[:limit] if limit is not None else records
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not isinstance(r.get("instruction"), str) \
                or not isinstance(r.get("output"), str):
            raise UserError(f"judge: record {i} is not an Alpaca record; each needs text `instruction` and "
                            "`output` (and optionally `input`)")
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


def judge_task(url: str = DEFAULT_URL, judge_model: str = DEFAULT_MODEL, api_key: str | None = None,
               max_new_tokens: int = 128, timeout: float = 60):
    """The judge as a task of `gpt2lab.evaluate.evaluate_run`: answers in the run's chat format
    (alpaca when the run has none), scored by the endpoint."""

    def run(model, tokenizer, info, data, limit=None, progress=False):
        from gpt2lab.finetune.sft import read_records

        if data is None:
            raise UserError("task judge needs --data FILE.json or .jsonl of Alpaca records")

        return eval_judge(model, tokenizer, read_records(data), info.template or "alpaca", url, judge_model,
                          max_new_tokens, limit, api_key=api_key, timeout=timeout, progress=progress)

    return run


__all__ = ["DEFAULT_MODEL", "DEFAULT_URL", "chat", "completions_url", "eval_judge", "generate_answer",
           "judge_prompt", "judge_score", "judge_task", "parse_score"]
