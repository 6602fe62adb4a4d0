"""A small client of OpenAI-compatible servers (`gpt2lab chat --url`): standard library only.

It talks to `gpt2lab serve`, vLLM, llama.cpp's server, Ollama or OpenAI: GET /v1/models to find a model,
POST /v1/chat/completions with "stream": true, and reads the server-sent events as they come.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

from gpt2lab.errors import UserError


def api_base(url: str) -> str:
    """The /v1 base of a server URL given with or without /v1 (or a full endpoint path)."""
    base = url.strip().rstrip("/")
    for tail in ("/chat/completions", "/completions", "/models"):
        if base.endswith(tail):
            base = base[: -len(tail)]
    if not base.startswith(("http://", "https://")):
        raise UserError(f"--url {url!r} is not an http:// or https:// URL")
    return base if base.endswith("/v1") else base + "/v1"


class ServerError(UserError):
    """The server answered with an error; `code` is OpenAI's error code when it gave one."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.code = status, code


def _error_of(err: urllib.error.HTTPError, where: str) -> ServerError:
    try:
        body = err.read().decode("utf-8", "replace")
    except OSError:
        body = ""
    message, code = body.strip() or (err.reason or "no message"), None
    try:
        e = json.loads(body).get("error")
        if isinstance(e, dict):
            message, code = str(e.get("message") or message), e.get("code")
        elif isinstance(e, str):
            message = e
    except (ValueError, AttributeError):
        pass
    message = " ".join(message.split())[:300]
    hint = "; pass --api-key" if err.code == 401 else ""
    return ServerError(f"{where} answered HTTP {err.code}: {message}{hint}", err.code, code)


class Client:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 300):
        self.base, self.api_key, self.timeout = api_base(url), api_key, timeout

    def _open(self, path: str, payload: dict | None = None):
        headers = {"Accept": "application/json" if payload is None or not payload.get("stream")
                   else "text/event-stream"}
        data = None
        if payload is not None:
            headers["Content-Type"] = "application/json"
            data = json.dumps(payload).encode("utf-8")
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        url = self.base + path
        request = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            raise _error_of(e, url) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            reason = getattr(e, "reason", e)
            raise UserError(f"no server answered at {self.base} ({reason}); start one (gpt2lab serve RUN) or "
                            "check --url") from None

    def models(self) -> list[str]:
        with self._open("/models") as r:
            try:
                data = json.loads(r.read())
                return [m["id"] for m in data["data"]]
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{self.base}/models did not answer like an OpenAI-compatible server") from None

    def stream_chat(self, model: str, messages: list[dict], **settings) -> Iterator[tuple[str, str]]:
        """(kind, text) pieces of the answer as they come: kind is "content" or "reasoning"; the last one
        is ("finish", reason)."""
        payload = {"model": model, "messages": messages, "stream": True,
                   **{k: v for k, v in settings.items() if v is not None}}
        response = self._open("/chat/completions", payload)
        finish = None
        with response:
            for raw in response:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue  # blank lines, comments, event names
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                try:
                    chunk = json.loads(data)
                except ValueError:
                    raise UserError(f"{self.base}/chat/completions sent an event that is not JSON: "
                                    f"{data[:80]!r}") from None
                if isinstance(chunk, dict) and "error" in chunk:
                    e = chunk["error"]
                    raise ServerError(f"the server stopped the answer: "
                                      f"{e.get('message') if isinstance(e, dict) else e}")
                for choice in chunk.get("choices") or []:
                    if choice.get("index", 0) != 0:
                        continue
                    delta = choice.get("delta") or {}
                    for key, kind in (("reasoning_content", "reasoning"), ("reasoning", "reasoning"),
                                      ("content", "content")):
                        if isinstance(delta.get(key), str) and delta[key]:
                            yield kind, delta[key]
                    finish = choice.get("finish_reason") or finish
        yield "finish", finish or "stop"
