"""The requests of the OpenAI API as `gpt2lab serve` reads them: the fields of a request, checked, and the
errors it answers with. Every check here answers a client with OpenAI's error JSON,
{"error": {"message", "type", "param", "code"}}, naming the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

MAX_N = 16  # choices per prompt
MAX_PROMPTS = 64  # prompts of one completions request
MAX_CHOICES = 64  # choices of one request, all its prompts together
MAX_STOP = 8  # stop strings (OpenAI allows 4)
MAX_TOP_LOGPROBS = 20


class APIError(Exception):
    """An error answered as OpenAI does: HTTP status and {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


# ----------------------------------------------------------------------------- request fields


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _get_int(data: dict, name: str, lo: int, hi: int | None, default=None):
    v = data.get(name)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not _is_int(v) or v < lo or (hi is not None and v > hi):
        limit = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise bad_request(f"`{name}` must be an integer {limit}, got {json.dumps(v)[:40]}", name)
    return v


def _get_number(data: dict, name: str, lo: float, hi: float, default, lo_open: bool = False):
    v = data.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) \
            or v < lo or v > hi or (lo_open and v == lo):
        raise bad_request(f"`{name}` must be a number in {'(' if lo_open else '['}{lo:g}, {hi:g}], "
                   f"got {json.dumps(v)[:40]}", name)
    return float(v)


def _get_bool(data: dict, name: str, default: bool = False) -> bool:
    v = data.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad_request(f"`{name}` must be true or false, got {json.dumps(v)[:40]}", name)
    return v


def _get_stop(data: dict) -> list[str]:
    v = data.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or len(v) > MAX_STOP or not all(isinstance(s, str) and len(s) <= 256 for s in v):
        raise bad_request(f"`stop` must be a string or a list of at most {MAX_STOP} strings (256 characters each)",
                          "stop")
    return [s for s in v if s]


def _unsupported(data: dict) -> None:
    """Fields gpt2lab does not implement are refused unless they ask for nothing."""
    for name in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
        v = data.get(name)
        if v is not None and v != 0 and not (name == "repetition_penalty" and v == 1):
            raise bad_request(f"`{name}` is not supported by gpt2lab serve; leave it out", name)
    if data.get("logit_bias"):
        raise bad_request("`logit_bias` is not supported by gpt2lab serve; leave it out", "logit_bias")
    if data.get("tools") or data.get("functions"):
        raise bad_request("tools and function calling are not supported by gpt2lab serve", "tools")
    rf = data.get("response_format")
    if rf is not None and rf != {"type": "text"}:
        raise bad_request("only `response_format` {\"type\": \"text\"} is supported", "response_format")
    if data.get("suffix"):
        raise bad_request("`suffix` is not supported by gpt2lab serve", "suffix")


@dataclass
class Params:
    """The sampling settings of one request, checked."""

    max_tokens: int | None
    temperature: float
    top_p: float | None
    top_k: int | None
    n: int
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    logprobs: int | None  # None: none; k: the chosen token's and the k most likely
    echo: bool = False
    extra: dict = field(default_factory=dict)


def parse_params(data: dict, chat: bool, max_n: int) -> Params:
    _unsupported(data)
    max_tokens = _get_int(data, "max_tokens", 0, None)
    max_completion = _get_int(data, "max_completion_tokens", 0, None)
    if max_completion is not None:
        max_tokens = max_completion
    if chat and max_tokens == 0:
        raise bad_request("`max_tokens` must be at least 1", "max_completion_tokens" if max_completion is not None
                   else "max_tokens")
    temperature = _get_number(data, "temperature", 0.0, 2.0, 1.0)
    top_p = _get_number(data, "top_p", 0.0, 1.0, None, lo_open=True)
    top_k = data.get("top_k")
    if top_k is not None and _is_int(top_k) and top_k in (0, -1):
        top_k = None  # "no top-k", as other servers spell it
    elif top_k is not None:
        top_k = _get_int(data, "top_k", 1, None)
    n = _get_int(data, "n", 1, min(MAX_N, max_n), 1)
    best_of = data.get("best_of")
    if best_of is not None and best_of != n:
        raise bad_request("`best_of` other than n is not supported", "best_of")
    seed = _get_int(data, "seed", 0, 2**63 - 1)
    stream = _get_bool(data, "stream")
    so = data.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise bad_request("`stream_options` must be an object such as {\"include_usage\": true}", "stream_options")
    include_usage = _get_bool(so or {}, "include_usage")
    if chat:
        want = _get_bool(data, "logprobs")
        top = _get_int(data, "top_logprobs", 0, MAX_TOP_LOGPROBS, 0)
        if data.get("top_logprobs") is not None and not want:
            raise bad_request("`top_logprobs` needs `logprobs`: true", "top_logprobs")
        logprobs = top if want else None
        echo = False
    else:
        logprobs = _get_int(data, "logprobs", 0, MAX_TOP_LOGPROBS)
        echo = _get_bool(data, "echo")
    return Params(max_tokens, temperature, top_p, top_k, n, seed, _get_stop(data), stream, include_usage,
                  logprobs, echo)


def parse_messages(data: dict) -> list[dict]:
    """OpenAI chat messages -> gpt2lab's {role, content} (text parts joined; "developer" is a system message)."""
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("`messages` must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{where} must be an object with `role` and `content`", where)
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise bad_request(f"{where}.role must be system, developer, user or assistant, got {json.dumps(role)[:40]}",
                       f"{where}.role")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, list):
            parts = []
            for p in content:
                if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                    raise bad_request(f"{where}.content: only text parts ({{\"type\": \"text\", \"text\": ...}}) are "
                               "supported", f"{where}.content")
                parts.append(p["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise bad_request(f"{where}.content must be text", f"{where}.content")
        out.append({"role": role, "content": content})
    return out


def check_choices(prompts: int, n: int) -> None:
    """One request may hold at most MAX_CHOICES choices (prompts x n), so that no client can fill the queue
    alone."""
    if prompts * n > MAX_CHOICES:
        raise bad_request(f"the request asks for {prompts} prompts x n={n} = {prompts * n} choices; at most "
                          f"{MAX_CHOICES} per request, send the rest in another", "n")


def parse_prompts(data: dict) -> list[str | list[int]]:
    """A completions `prompt`: text, a list of texts, a list of token ids, or a list of such lists."""
    p = data.get("prompt")
    if p is None:
        raise bad_request("`prompt` is required (text or token ids)", "prompt")
    if isinstance(p, str):
        return [p]
    if isinstance(p, list) and p and all(_is_int(i) for i in p):
        return [p]
    if isinstance(p, list) and p and len(p) <= MAX_PROMPTS and all(
            isinstance(x, str) or (isinstance(x, list) and x and all(_is_int(i) for i in x)) for x in p):
        return p
    raise bad_request(f"`prompt` must be text, a list of token ids, or a list of at most {MAX_PROMPTS} of these",
                      "prompt")
