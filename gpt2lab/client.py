"""The one HTTP client of gpt2lab, for every outgoing call: `chat --url` and the judge talk to
OpenAI-compatible servers (gpt2lab serve, vLLM, llama.cpp's server, Ollama, OpenAI) through it.
Standard library only.

    client = Client("http://127.0.0.1:8000", api_key=None)
    client.models()                                   GET /v1/models
    client.chat(model, messages, temperature=0)       POST /v1/chat/completions -> the reply's text
    for kind, text in client.stream_chat(model, messages): ...   the same, streamed

What it promises:
- A key goes to the endpoint it was given for and nowhere else: a redirect is never followed (it is an
  error naming the new location), so a key cannot be forwarded to another host or port.
- What a server sends is bounded, in size (`max_bytes` for a whole answer and for each streamed line) and
  in time (`timeout` seconds of silence), so a hostile or broken server cannot make a client hang or fill
  its memory.
- A server that answers with an error, a malformed body or a cut stream is one line naming the server and
  what went wrong (`ServerError`, a UserError).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

from gpt2lab.errors import UserError

MAX_BYTES = 8 << 20  # the largest answer (or streamed line) read from a server


def api_base(url: str, flag: str = "--url") -> str:
    """The /v1 base of a server URL given with or without /v1 (or a full endpoint path)."""
    base = url.strip().rstrip("/")
    for tail in ("/chat/completions", "/completions", "/models"):
        if base.endswith(tail):
            base = base[: -len(tail)]
    if not base.startswith(("http://", "https://")):
        raise UserError(f"{flag} {url!r} is not an http:// or https:// URL")
    return base if base.endswith("/v1") else base + "/v1"


class ServerError(UserError):
    """The server answered with an error, or not like an OpenAI-compatible server; `code` is OpenAI's error
    code when it gave one."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.code = status, code


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise ServerError(f"{req.full_url} redirected to {newurl} (HTTP {code}); gpt2lab does not follow redirects "
                          "(a key must not travel to another address): pass the final URL itself", code)


_OPENER = urllib.request.build_opener(_NoRedirects)


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text[:limit] + "..." if len(text) > limit else text


def _error_of(err: urllib.error.HTTPError, where: str, hint: str = "") -> ServerError:
    try:
        body = err.read(64 << 10).decode("utf-8", "replace")
    except OSError:
        body = ""
    message, code = body.strip() or (err.reason or "no message"), None
    try:
        e = json.loads(body)
        e = e.get("error", e) if isinstance(e, dict) else e
        if isinstance(e, dict):
            message, code = str(e.get("message") or message), e.get("code")
        elif isinstance(e, str):
            message = e
    except ValueError:
        pass
    if err.code == 401 and not hint:
        hint = "; pass the server's API key"
    return ServerError(f"{where} answered HTTP {err.code}: {_one_line(message)}{hint}", err.code,
                       code if isinstance(code, str) else None)


class Client:
    """A client of one OpenAI-compatible server (see the module's docstring)."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 300, max_bytes: int = MAX_BYTES, *,
                 name: str = "server", flag: str = "--url", hint: str = "",
                 unreachable: str = "start one (gpt2lab serve RUN) or check --url"):
        self.base, self.api_key, self.timeout, self.max_bytes = api_base(url, flag), api_key, timeout, max_bytes
        self.name = name  # what the server is, in messages: "server", "judge"
        self.hint = hint  # said after an HTTP error: how to fix it where the client is used
        self.unreachable = unreachable  # said when nothing answers

    def _open(self, path: str, payload: dict | None = None):
        stream = payload is not None and bool(payload.get("stream"))
        headers = {"Accept": "text/event-stream" if stream else "application/json"}
        data = None
        if payload is not None:
            headers["Content-Type"] = "application/json"
            data = json.dumps(payload).encode("utf-8")
        if self.api_key:  # only a key given for this server is ever sent
            headers["Authorization"] = f"Bearer {self.api_key}"
        url = self.base + path
        request = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
        try:
            return _OPENER.open(request, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            raise _error_of(e, f"the {self.name} at {url}", self.hint) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            reason = getattr(e, "reason", e)
            raise UserError(f"no {self.name} answered at {self.base} ({reason}); {self.unreachable}") from None

    def _read_json(self, path: str, payload: dict | None = None):
        with self._open(path, payload) as response:
            try:
                body = response.read(self.max_bytes + 1)
            except (TimeoutError, OSError) as e:
                raise ServerError(f"the {self.name} at {self.base}{path} stopped answering ({type(e).__name__}); "
                              "try again") from None
        if len(body) > self.max_bytes:
            raise ServerError(f"the {self.name} at {self.base}{path} sent more than {self.max_bytes} bytes; it is "
                              "not an answer")
        try:
            return json.loads(body)
        except ValueError:
            raise ServerError(f"the {self.name} at {self.base}{path} answered with something that is not JSON "
                              f"({_one_line(body[:80].decode('utf-8', 'replace'))!r})") from None

    def models(self) -> list[str]:
        data = self._read_json("/models")
        try:
            return [str(m["id"]) for m in data["data"]]
        except (KeyError, TypeError):
            raise ServerError(f"the {self.name} at {self.base}/models did not answer like an OpenAI-compatible "
                              "server") from None

    def chat(self, model: str, messages: list[dict], **settings) -> str | None:
        """The reply's text to `messages` (None when the reply has no content)."""
        payload = {"model": model, "messages": messages, "stream": False,
                   **{k: v for k, v in settings.items() if v is not None}}
        data = self._read_json("/chat/completions", payload)
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise ServerError(f"the {self.name} at {self.base}/chat/completions did not answer like an OpenAI chat "
                              f"completions endpoint (no choices[0].message.content){self.hint}") from None
        if content is not None and not isinstance(content, str):
            raise ServerError(f"the {self.name} at {self.base}/chat/completions answered with content that is not "
                              f"text ({type(content).__name__}){self.hint}")
        return content

    def _events(self, response, where: str) -> Iterator[dict]:
        """The JSON objects of a server-sent event stream, up to [DONE]; a stream that ends without it is
        an error (the answer was cut), and so is one of more than `max_bytes` in all."""
        total = 0
        while True:
            try:
                raw = response.readline(self.max_bytes + 1)
            except (TimeoutError, OSError) as e:
                raise ServerError(f"{where} stopped sending in the middle of the answer ({type(e).__name__}); "
                                  "the answer is cut") from None
            if not raw:
                raise ServerError(f"{where} closed the stream before it ended ([DONE] never came); the answer is "
                                  "cut")
            total += len(raw)
            if total > self.max_bytes:
                raise ServerError(f"{where} sent more than {self.max_bytes} bytes; it is not an answer")
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue  # blank lines, comments, event names
            data = line[5:].strip()
            if data == "[DONE]":
                return
            try:
                chunk = json.loads(data)
            except ValueError:
                raise ServerError(f"{where} sent an event that is not JSON: {_one_line(data, 80)!r}") from None
            if not isinstance(chunk, dict):
                raise ServerError(f"{where} sent an event that is not a JSON object: {_one_line(data, 80)!r}")
            if "error" in chunk:
                e = chunk["error"]
                raise ServerError(f"the {self.name} stopped the answer: "
                                  f"{_one_line(str(e.get('message') if isinstance(e, dict) else e))}")
            yield chunk

    def stream_chat(self, model: str, messages: list[dict], **settings) -> Iterator[tuple[str, str]]:
        """(kind, text) pieces of the answer as they come: kind is "content" or "reasoning"; the last one
        is ("finish", reason)."""
        payload = {"model": model, "messages": messages, "stream": True,
                   **{k: v for k, v in settings.items() if v is not None}}
        where = f"the {self.name} at {self.base}/chat/completions"
        finish = None
        with self._open("/chat/completions", payload) as response:
            for chunk in self._events(response, where):
                choices = chunk.get("choices")
                if not isinstance(choices, list):
                    continue
                for choice in choices:
                    if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                        continue
                    delta = choice.get("delta")
                    delta = delta if isinstance(delta, dict) else {}
                    for key, kind in (("reasoning_content", "reasoning"), ("reasoning", "reasoning"),
                                      ("content", "content")):
                        if isinstance(delta.get(key), str) and delta[key]:
                            yield kind, delta[key]
                    reason = choice.get("finish_reason")
                    finish = reason if isinstance(reason, str) else finish
        yield "finish", finish or "stop"
