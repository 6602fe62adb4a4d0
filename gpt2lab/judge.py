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
import os
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

_INT = re.compile(r"(?<![\d.])\d+(?!\d|\.\d)")  # whole numbers, not parts of decimals


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


def parse_score(text: str | None) -> int | None:
    """The first integer from 0 to 100 in a reply; None when there is none."""
    for m in _INT.finditer(text or ""):
        value = int(m.group())
        if 0 <= value <= 100:
            return value
    return None


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
    key = api_key or os.environ.get("OPENAI_API_KEY")
    if key:
        headers["Authorization"] = f"Bearer {key}"
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
        data = json.loads(body)
        return data["choices"][0]["message"]["content"] or ""
    except (ValueError, KeyError, IndexError, TypeError):
        raise UserError(f"the judge at {endpoint} did not answer like an OpenAI chat completions "
                        "endpoint (no choices[0].message.content); pass --judge-url of one") from None


def judge_score(url: str, model: str, instruction: str, input: str, reference: str, answer: str,
                timeout: float = 60, api_key: str | None = None) -> int | None:
    """The judge's 0-100 score of `answer`; None when the reply holds no such integer."""
    reply = chat(url, model, judge_prompt(instruction, input, reference, answer), timeout, api_key)
    return parse_score(reply)


def generate_answer(model, tokenizer, template, record: dict, max_new_tokens: int = 128) -> str:
    """The model's greedy answer to an Alpaca record, cut at <|endoftext|> or the template's stop text."""
    from gpt2lab.generate import StreamDecoder, stream

    prompt = template.render(record["instruction"], record.get("input") or "")
    ids = tokenizer.encode(prompt)
    stops = tuple(template.stop)
    decoder, text = StreamDecoder(tokenizer), ""
    eot = {tokenizer.eot_id} if tokenizer.eot_id is not None else set()
    for token in stream(model, ids, max_new_tokens, temperature=0.0, stop_ids=eot, start_id=tokenizer.eot_id):
        text += decoder.push(token)
        if any(s in text for s in stops):
            break
    text += decoder.flush()
    for s in stops:
        text = text.split(s, 1)[0]
    return text.strip()


def eval_judge(model, tokenizer, records: list[dict], template, url: str = DEFAULT_URL,
               judge_model: str = DEFAULT_MODEL, max_new_tokens: int = 128, limit: int | None = None, *,
               api_key: str | None = None, timeout: float = 60, progress: bool = False):
    """Generate an answer to each Alpaca record and have the judge score it.

    Returns a TaskResult: {"task": "judge", "n", "mean_score", "scored",
    "unscored"} (the mean over the scored answers; None when none was) and one
    record per example: index, answer, score.
    """
    from tqdm import tqdm

    from gpt2lab.evaluate import TaskResult
    from gpt2lab.templates import ALPACA

    template = template or ALPACA
    records = records[:limit] if limit is not None else records
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not isinstance(r.get("instruction"), str) \
                or not isinstance(r.get("output"), str):
            raise UserError(f"judge: record {i} is not an Alpaca record; each needs text `instruction` and "
                            "`output` (and optionally `input`)")
    preds, scores = [], []
    for i, r in enumerate(tqdm(records, desc="judge", unit="ex", disable=not progress, leave=False,
                               file=sys.stderr)):
        answer = generate_answer(model, tokenizer, template, r, max_new_tokens)
        score = judge_score(url, judge_model, r["instruction"], r.get("input") or "", r["output"], answer,
                            timeout=timeout, api_key=api_key)
        if score is not None:
            scores.append(score)
        preds.append({"task": "judge", "index": i, "answer": answer, "score": score})
    mean = sum(scores) / len(scores) if scores else None
    return TaskResult({"task": "judge", "n": len(records), "mean_score": mean, "scored": len(scores),
                       "unscored": len(records) - len(scores), "judge_model": judge_model}, preds)


__all__ = ["DEFAULT_MODEL", "DEFAULT_URL", "chat", "completions_url", "eval_judge", "generate_answer",
           "judge_prompt", "judge_score", "parse_score"]
