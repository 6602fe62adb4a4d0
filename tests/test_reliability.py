"""Reliability and security: what a bad setting, a hostile or broken peer, or a stale run dir cannot do.

Sampling settings too small for float32 cannot poison a batch; the local server refuses foreign Host names,
non-JSON POSTs, too many choices and clients that stall; the one HTTP client never carries a key along a
redirect and bounds what it reads; the judge reads common replies; built-in tasks know their size; resume
and re-runs never mix settings; import-hf never replaces a trained run; nothing hangs or shows a traceback.

Every model is tiny and random; live servers run in this process (test_serve's `Live`), peers are small
`ThreadingHTTPServer`s, commands run in-process through `gpt2lab.cli.main`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from conftest import pretrain_argv

from gpt2lab import cli
from gpt2lab.checkpoint import write_run_config
from gpt2lab.errors import UserError
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from gpt2lab.tokenizer.train import train_bpe_from_texts
from gpt2lab.weights import save_weights

# the text the tiny tokenizers are trained on: task prompts, chat words, code-ish answers
TEXT = ("The quick brown fox jumps over the lazy dog. Hello world, hello there! Numbers: 1, 2, 3, 42. "
        "What is 12 + 34? Using the numbers 3, 7, 2, make 23. <think>3*7=21 21+2=23</think>3*7+2 ") * 20


def run(argv, capsys) -> tuple[int, str, str]:
    """`gpt2lab ARGV` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def one_error(code: int, err: str, *words: str) -> None:
    """A command-line mistake: exit status 2, one line on stderr starting with "error:", no traceback,
    naming each of `words`."""
    assert code == 2, (code, err)
    assert err.startswith("error:") and err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err
    for w in words:
        assert w in err, (w, err)


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
    monkeypatch.delenv("GPT2LAB_DEBUG", raising=False)  # it turns one-line errors into tracebacks


@pytest.fixture(scope="module")
def tok():
    return train_bpe_from_texts([TEXT], 300, name="rel300")


def tiny_run(out: Path, tok, block_size: int = 64, template: str | None = None, seed: int = 0,
             lively: bool = False) -> Path:
    """A run dir of a random 2-layer model (lively: weights scaled so greedy output moves around)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32))
    if lively:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2:
                    p.mul_(5.0 if name in ("transformer.wte.weight", "transformer.wpe.weight") else 20.0)
    out.mkdir(parents=True)
    write_run_config(out, model.config, tokenizer_identity=tok.identity(),
                     extra={"template": template} if template else None)
    save_weights(model, out / "model.safetensors")
    tok.save(out)
    return out


# ================================================================== 1-2: the server


@pytest.fixture(scope="module")
def serve_runs(tmp_path_factory, tok) -> dict[str, Path]:
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    root = tmp_path_factory.mktemp("serve")
    return {"base": tiny_run(root / "base", tok, 64, lively=True),
            "chat": tiny_run(root / "chat", tok, 256, "chat", lively=True)}


def live(run_dir: Path, **kw):
    from test_serve import Live

    return Live(run_dir, **kw)


@pytest.fixture(scope="module")
def base(serve_runs):
    """The base model served with a 1 s --timeout (bodies and readers that stall are cut after 1 s)."""
    server = live(serve_runs["base"], timeout=1.0)
    yield server
    server.stop()


def slow_steps(monkeypatch, server, seconds: float) -> None:
    """Each decoding step takes `seconds` longer: the tiny model is so fast that requests would hardly overlap."""
    sched = server.server.scheduler
    decode = sched._decode

    def slow():
        time.sleep(seconds)
        decode()

    monkeypatch.setattr(sched, "_decode", slow)


def post(server, body: dict, path: str = "/v1/completions"):
    return server.request("POST", path, body)


def assert_openai_error(data, code: str | None = None, param=None) -> None:
    assert isinstance(data, dict) and set(data) == {"error"}, data
    assert set(data["error"]) == {"message", "type", "param", "code"}, data
    assert isinstance(data["error"]["message"], str) and data["error"]["message"]
    if code is not None:
        assert data["error"]["code"] == code, data
    assert data["error"]["param"] == param, data


def test_sampling_settings_too_small_for_float32_are_greedy_never_nan():
    from gpt2lab.generate import sample_next

    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 5
    logits[3] = torch.linspace(-1, 1, 50)  # a row whose best token is the last
    greedy = logits.argmax(-1)
    for temperature, top_k, top_p in [(1e-300, None, None), (1e-300, 5, None), (1e-300, None, 1e-300),
                                      (1.0, None, 1e-300), (0.7, 3, 1e-300), (1e-45, None, None), (0, None, None)]:
        for _ in range(5):
            got = sample_next(logits, temperature, top_k, top_p)
            assert torch.equal(got, greedy), (temperature, top_k, top_p)
    # neighbours: a small but representable temperature still samples near the argmax; top_p 1 samples all
    assert torch.equal(sample_next(logits, 1e-6), greedy)
    g = torch.Generator().manual_seed(0)
    flat = torch.zeros(1, 50)
    drawn = {int(sample_next(flat, 1.0, None, 1.0, generator=g)) for _ in range(200)}
    assert len(drawn) > 20  # top_p 1 keeps every token: a flat distribution is sampled, not collapsed
    drawn = {int(sample_next(flat, 1.0, None, 1e-300, generator=g)) for _ in range(50)}
    assert len(drawn) == 1  # a tiny top_p keeps exactly one token


def test_a_tiny_temperature_and_top_p_cannot_poison_a_batch(base, monkeypatch):
    from gpt2lab.generate import answer

    slow_steps(monkeypatch, base, 0.005)  # both requests share decoding steps
    prompts = ["Hello world", "The quick brown"]
    bodies = [{"prompt": prompts[0], "max_tokens": 20, "temperature": 1e-300, "top_p": 1e-300},
              {"prompt": prompts[1], "max_tokens": 20, "temperature": 0}]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda b: post(base, b), bodies))
    for (status, data, _), prompt in zip(results, prompts):
        assert status == 200, data
        # the tiny settings are greedy (temperature 0 in float32), and the greedy neighbour is undisturbed
        assert data["choices"][0]["text"] == answer(base.model, base.tok, prompt, 20, temperature=0)
        assert data["usage"]["completion_tokens"] == 20
    assert base.health()["status"] == "ok"


def test_a_request_whose_sampling_fails_fails_alone(base, monkeypatch):
    """Sampling that raises for one request's temperature (0.77) fails that request with a 500 OpenAI error;
    a sampled (seeded) and a greedy request in the same batch complete as they would alone."""
    import gpt2lab.serve.jobs as jobs
    from gpt2lab.generate import answer

    real = jobs.sample_next

    def flaky(logits, temperature, *a, **kw):
        if temperature == 0.77:
            raise RuntimeError("sampling exploded")
        return real(logits, temperature, *a, **kw)

    monkeypatch.setattr(jobs, "sample_next", flaky)
    slow_steps(monkeypatch, base, 0.01)
    failed_before = base.health()["failed"]
    bodies = [{"prompt": "Hello world", "max_tokens": 30, "temperature": 0.9, "seed": 3},
              {"prompt": "The quick brown", "max_tokens": 30, "temperature": 0},
              {"prompt": "Numbers", "max_tokens": 30, "temperature": 0.77}]

    def ask(i):
        time.sleep(0.05 * i)  # the failing one arrives while the others are running
        return post(base, bodies[i])

    with ThreadPoolExecutor(3) as pool:
        (s1, sampled, _), (s2, greedy, _), (s3, bad, _) = pool.map(ask, range(3))
    assert s3 == 500, bad
    assert_openai_error(bad, "generation_failed")
    assert "sampling failed" in bad["error"]["message"] and "exploded" in bad["error"]["message"]
    assert (s1, s2) == (200, 200), (sampled, greedy)
    assert sampled["choices"][0]["text"] == answer(base.model, base.tok, "Hello world", 30, temperature=0.9, seed=3)
    assert greedy["choices"][0]["text"] == answer(base.model, base.tok, "The quick brown", 30, temperature=0)
    assert base.health()["failed"] > failed_before
    # the openai client sees the failure as an APIError with status 500; the server keeps serving
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.APIStatusError) as e:
        base.client().completions.create(model="base", prompt="x", max_tokens=3, temperature=0.77)
    assert e.value.status_code == 500
    monkeypatch.undo()
    r = base.client().completions.create(model="base", prompt="Hello", max_tokens=5, temperature=0)
    assert r.choices[0].text == answer(base.model, base.tok, "Hello", 5, temperature=0)
    status, data, _ = post(base, {"prompt": "Hello", "max_tokens": 5, "temperature": 0.77, "seed": 1})
    assert status == 200 and data["usage"]["completion_tokens"] == 5  # 0.77 itself was never the problem


def raw_http(port: int, request: bytes, timeout: float = 20) -> tuple[int, dict | str]:
    """Send bytes as they are (any Host header) and read the whole answer: (status, JSON body or text)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep and b"content-length:" in head.lower():
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                if len(body) >= length:
                    break
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode("utf-8", "replace")


def get_with_host(port: int, host: str, path: str = "/v1/models") -> tuple[int, dict | str]:
    return raw_http(port, f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())


def test_only_trusted_host_names_are_answered(base, serve_runs):
    port = base.port
    status, data = get_with_host(port, "evil.example")
    assert status == 403
    assert_openai_error(data, "host_not_allowed")
    assert "--allowed-host" in data["error"]["message"]
    status, data = get_with_host(port, "evil.example:80", "/health")  # every path, /health included
    assert status == 403 and data["error"]["code"] == "host_not_allowed"
    for host in (f"127.0.0.1:{port}", "localhost", f"localhost:{port}", "127.0.0.1"):
        status, data = get_with_host(port, host)
        assert status == 200 and data["data"][0]["id"] == "base", (host, data)
    # a POST with a foreign Host is refused before its body is read
    body = json.dumps({"prompt": "x", "max_tokens": 1}).encode()
    status, data = raw_http(port, b"POST /v1/completions HTTP/1.1\r\nHost: evil.example\r\nContent-Type: "
                            b"application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    assert status == 403 and data["error"]["code"] == "host_not_allowed"

    named = live(serve_runs["base"], allowed_hosts=("my-box.lan",))
    try:
        assert get_with_host(named.port, "my-box.lan")[0] == 200
        assert get_with_host(named.port, f"my-box.lan:{named.port}")[0] == 200
        assert get_with_host(named.port, "localhost")[0] == 200
        assert get_with_host(named.port, "other-box.lan")[0] == 403
    finally:
        named.stop()
    anything = live(serve_runs["base"], allowed_hosts=("*",))
    try:
        for host in ("evil.example", "my-box.lan", "localhost"):
            assert get_with_host(anything.port, host)[0] == 200, host
    finally:
        anything.stop()


def test_the_command_passes_allowed_hosts_and_timeout(serve_runs, monkeypatch, capsys):
    """`gpt2lab serve --allowed-host NAME --timeout S` builds the server with them (nothing listens)."""
    import uvicorn

    import gpt2lab.serve.command as app

    seen = {}
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)
    monkeypatch.setattr(app, "_listen", lambda host, port: socket.socket())
    real = app.Server

    def spy(*a, **kw):
        seen.update(kw)
        return real(*a, **kw)

    monkeypatch.setattr(app, "Server", spy)
    code, out, err = run(["serve", serve_runs["base"], "--allowed-host", "my-box.lan", "--timeout", "5",
                          "--device", "cpu"], capsys)
    assert code == 0, err
    assert seen["allowed_hosts"] == ("my-box.lan",) and seen["timeout"] == 5.0
    code, _, err = run(["serve", serve_runs["base"], "--timeout", "0", "--device", "cpu"], capsys)
    one_error(code, err, "--timeout")


def test_posts_must_be_json_and_every_refusal_is_an_openai_error(base):
    for headers in ({"Content-Type": "text/plain"}, {"Content-Type": "application/x-www-form-urlencoded"},
                    {"Content-Type": ""}):
        status, data, _ = base.request("POST", "/v1/completions", {"prompt": "x", "max_tokens": 1}, headers)
        assert status == 415, (headers, data)
        assert_openai_error(data, "unsupported_media_type")
    # no Content-Type at all (raw: http.client would not add one either)
    body = json.dumps({"prompt": "x", "max_tokens": 1}).encode()
    status, data = raw_http(base.port, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: "
                            + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
    assert status == 415 and data["error"]["code"] == "unsupported_media_type"
    # the neighbour: JSON with a charset is JSON
    status, data, _ = base.request("POST", "/v1/completions", {"prompt": "x", "max_tokens": 1},
                                   {"Content-Type": "application/json; charset=utf-8"})
    assert status == 200, data
    status, data, _ = base.request("GET", "/no/such/path")
    assert status == 404
    assert_openai_error(data, "not_found")
    status, data, _ = base.request("GET", "/v1/chat/completions")
    assert status == 405
    assert_openai_error(data, "method_not_allowed")
    # 16 prompts x n=5 = 80 choices, more than 64: refused naming n; 16 x 4 = 64 is fine
    status, data, _ = post(base, {"prompt": ["Hello"] * 16, "n": 5, "max_tokens": 1})
    assert status == 400
    assert_openai_error(data, param="n")
    assert "80" in data["error"]["message"]
    status, data, _ = post(base, {"prompt": ["Hello"] * 16, "n": 4, "max_tokens": 1, "temperature": 0})
    assert status == 200 and len(data["choices"]) == 64


def test_a_body_that_stalls_is_answered_408(base):
    start = time.time()
    status, data = raw_http(base.port, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                            b"application/json\r\nContent-Length: 1000\r\n\r\n{\"prompt\": \"Hel", timeout=15)
    waited = time.time() - start
    assert status == 408, data
    assert_openai_error(data, "request_timeout")
    assert 0.8 < waited < 10  # the server's --timeout is 1 s
    assert base.health()["status"] == "ok"
    # a body that arrives in pieces, within the time, is read
    body = json.dumps({"prompt": "Hello", "max_tokens": 2, "temperature": 0}).encode()
    with socket.create_connection(("127.0.0.1", base.port), timeout=15) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:5])
        time.sleep(0.3)
        s.sendall(body[5:])
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]


def test_a_reader_that_stops_reading_has_its_rows_freed(serve_runs, monkeypatch):
    """A streamed answer that is not read: once the socket buffers are full (kept small here: a client's 2 KB
    receive window and a 4 KB send buffer on the server's side, so that the test does not depend on how much
    the kernel would buffer), the answer waits unread for --timeout (1 s), its job is cancelled and its
    rows leave the batch; the server goes on answering."""
    import gpt2lab.serve.command as app

    real_listen = app._listen

    def small_buffers(host, port):
        sock = real_listen(host, port)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # accepted sockets inherit it
        return sock

    monkeypatch.setattr(app, "_listen", small_buffers)
    server = live(serve_runs["chat"], timeout=1.0)
    try:
        slow_steps(monkeypatch, server, 0.02)  # 240 steps would take 5 s or more
        before = server.health()
        body = json.dumps({"messages": [{"role": "user", "content": "Go on"}], "max_tokens": 240, "n": 16,
                           "temperature": 0.9, "seed": 1, "stream": True}).encode()
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        s.connect(("127.0.0.1", server.port))
        try:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            first = s.recv(1024)
            assert first.startswith(b"HTTP/1.1 200") and b"text/event-stream" in first
            deadline = time.time() + 10
            while server.health()["active"] < 16:
                assert time.time() < deadline
                time.sleep(0.02)
            # ... and now nothing more is read (the socket stays open)
            deadline = time.time() + 8
            while (h := server.health())["active"] or h["waiting"] or h["prefilling"]:
                assert time.time() < deadline, h
                time.sleep(0.05)
            assert h["cancelled"] > before["cancelled"]
            assert h["tokens"] - before["tokens"] < 16 * 240 // 2  # stopped long before its 16 x 240 tokens
            monkeypatch.undo()
            r = server.client().chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}],
                                                        max_tokens=3)
            assert r.choices[0].message.content is not None
        finally:
            s.close()
    finally:
        server.stop()


# ================================================================== 3: the one HTTP client


class Peer(ThreadingHTTPServer):
    """A small HTTP server run by a test: `answer(handler, method)` writes each answer; every request is
    recorded as (method, path, headers, body)."""

    daemon_threads = True

    def __init__(self, answer):
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _any(self, method):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                self.server.requests.append((method, self.path, dict(self.headers), body))
                answer(self, method, body)

            def do_GET(self):
                self._any("GET")

            def do_POST(self):
                self._any("POST")

        super().__init__(("127.0.0.1", 0), Handler)
        self.requests = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.shutdown()
        self.server_close()


def send(handler, status: int, body: bytes, content_type: str = "application/json", headers=None) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    for k, v in (headers or {}).items():
        handler.send_header(k, v)
    handler.end_headers()
    handler.wfile.write(body)


def reply(content: str) -> bytes:
    return json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                    "finish_reason": "stop"}]}).encode()


@pytest.fixture
def peers():
    made = []

    def make(answer) -> Peer:
        made.append(Peer(answer))
        return made[-1]

    yield make
    for p in made:
        p.close()


def test_a_key_never_travels_along_a_redirect(peers):
    from gpt2lab.client import Client, ServerError
    from gpt2lab.evals.judge import judge_score

    target = peers(lambda h, method, body: send(h, 200, reply("85") if method == "POST" else
                                                json.dumps({"data": [{"id": "m"}]}).encode()))
    for status in (302, 307, 301, 308):
        redirect = peers(lambda h, method, body, status=status: send(h, status, b"", headers={
            "Location": target.url + h.path}))
        client = Client(redirect.url, api_key="sk-secret")
        with pytest.raises(ServerError) as e:
            client.models()
        assert isinstance(e.value, UserError) and target.url in str(e.value) and "\n" not in str(e.value)
        assert str(status) in str(e.value)
        with pytest.raises(ServerError) as e:
            client.chat("m", [{"role": "user", "content": "hi"}], temperature=0)
        assert target.url in str(e.value)
        with pytest.raises(ServerError):
            list(client.stream_chat("m", [{"role": "user", "content": "hi"}]))
        with pytest.raises(UserError) as e:
            judge_score(redirect.url, "m", "Name a colour.", "", "blue", "red", api_key="sk-secret")
        assert target.url in str(e.value) and "\n" not in str(e.value)
        # the key went to the address it was given for, and the redirect was not followed
        assert redirect.requests and all(r[2].get("Authorization") == "Bearer sk-secret" for r in redirect.requests)
        assert target.requests == [], target.requests
    # the neighbour: asked directly, the same calls work (and carry the key there)
    assert Client(target.url, api_key="sk-secret").models() == ["m"]
    assert judge_score(target.url, "m", "Name a colour.", "", "blue", "red", api_key="sk-secret") == 85
    assert target.requests[-1][2].get("Authorization") == "Bearer sk-secret"


def test_what_a_server_sends_is_bounded_and_checked(peers):
    from gpt2lab.client import Client, ServerError

    def answer(h, method, body):
        if h.path == "/v1/models":
            send(h, 200, json.dumps({"data": [{"id": "x" * 5000}]}).encode())
        elif h.path == "/v1/chat/completions" and b'"stream": true' not in body:
            send(h, 200, b"<html>\nnot json\n</html>", "text/html")
        else:  # a stream that stops without [DONE]
            events = b"".join(b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": w}}]}).encode()
                              + b"\n\n" for w in ("Hel", "lo"))
            send(h, 200, events, "text/event-stream")

    peer = peers(answer)
    with pytest.raises(ServerError) as e:
        Client(peer.url, max_bytes=1000).models()
    assert "more than 1000 bytes" in str(e.value) and "\n" not in str(e.value)
    assert len(Client(peer.url).models()[0]) == 5000  # within the default bound it is read
    with pytest.raises(ServerError) as e:
        Client(peer.url).chat("m", [{"role": "user", "content": "hi"}])
    assert "not JSON" in str(e.value) and "\n" not in str(e.value)
    pieces = []
    with pytest.raises(ServerError) as e:
        for piece in Client(peer.url).stream_chat("m", [{"role": "user", "content": "hi"}]):
            pieces.append(piece)
    assert pieces == [("content", "Hel"), ("content", "lo")]  # what came, came; then the error
    assert "cut" in str(e.value) and "[DONE]" in str(e.value) and "\n" not in str(e.value)
    # a whole stream larger than max_bytes is refused too, even when every line is short
    with pytest.raises(ServerError, match="more than 100 bytes"):
        list(Client(peer.url, max_bytes=100).stream_chat("m", [{"role": "user", "content": "hi"}]))


def sse(*chunks) -> bytes:
    return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def test_interactive_chat_survives_a_failed_turn_and_says_when_an_answer_was_cut(peers, monkeypatch, capsys):
    import io

    def answer(h, method, body):
        if method == "GET":
            return send(h, 200, json.dumps({"data": [{"id": "fake"}]}).encode())
        asked = json.loads(body)["messages"][-1]["content"]
        if asked == "boom":
            return send(h, 500, json.dumps({"error": {"message": "the GPU\ncaught fire", "type": "server_error",
                                                      "param": None, "code": None}}).encode())
        finish = "length" if asked == "long" else "stop"
        send(h, 200, sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
                         {"choices": [{"index": 0, "delta": {"content": f"reply to {asked}"}}]},
                         {"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}), "text/event-stream")

    peer = peers(answer)
    monkeypatch.setattr(sys, "stdin", io.StringIO("boom\nhello\nlong\n/quit\n"))
    code, out, err = run(["chat", "--url", peer.url, "--max-new-tokens", "7"], capsys)
    assert code == 0, err
    assert "reply to hello" in out and "reply to long" in out
    lines = err.splitlines()
    assert [x for x in lines if x.startswith("error:")] == [lines[0]] and "HTTP 500" in lines[0], err
    assert "caught fire" in lines[0]  # the server's message, on one line
    assert len(lines) == 2 and "cut" in lines[1] and "7 tokens" in lines[1], err  # only the "long" answer
    assert "Traceback" not in err
    # the failed turn is not in the history: the second question was asked alone, the third after it
    asked = [json.loads(r[3])["messages"] for r in peer.requests if r[0] == "POST"]
    assert asked[1] == [{"role": "user", "content": "hello"}]
    assert [m["content"] for m in asked[2]] == ["hello", "reply to hello", "long"]
    # with -p a failed turn is the command's one error line
    code, _, err = run(["chat", "--url", peer.url, "-p", "boom"], capsys)
    one_error(code, err, "HTTP 500")


# ================================================================== 4: the judge's reader


@pytest.mark.parametrize("text,score", [
    ("Score (0-100): 75", 75),
    ("Score: 8/10", 80),
    ("Rating: 7/10", 70),
    ("I would rate this response 75.", 75),
    ("75%", 75),
    ("**Score:** 85", 85),
    ("On a scale from 0 to 100, I would give it 60.", 60),
    ("Score: 7 out of 10", 70),
    # the old rules still hold
    ("The answer 42 is right.", None),
    ("I'd give it 250 points, so 90", None),
    ("Score: 85.5", None),
    ("85", 85),
    ("Score: 20. On reflection, final score: 80", 80),
    ("150 out of 100", None),
    ("Score (0-100):", None),  # a restated scale alone is no score
    ("On a scale from 0 to 100.", None),
])
def test_the_judge_reads_common_replies(text, score):
    from gpt2lab.evals.judge import parse_score

    assert parse_score(text) == score


# ================================================================== 5: tasks that know their size


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, tok) -> Path:
    """A tiny random model in the chat format with a 128-token context."""
    return tiny_run(tmp_path_factory.mktemp("rel-chat") / "chat", tok, 128, "chat")


def test_a_task_says_how_many_held_out_prompts_it_has():
    from gpt2lab.evals.checkable import get_task

    task = get_task("countdown", 1)
    start = time.time()
    everything = task.heldout(1000, flag=None)  # all it has, without error
    have = len(everything)
    assert 0 < have < 60 and len({r["prompt"] for r in everything}) == have
    with pytest.raises(UserError) as e:
        task.heldout(60)
    assert f"has {have} held-out prompts" in str(e.value) and f"--limit {have}" in str(e.value)
    with pytest.raises(UserError, match="--eval-prompts"):
        task.heldout(60, flag="--eval-prompts")
    assert [r["prompt"] for r in task.heldout(have)] == [r["prompt"] for r in everything]  # exactly all: fine
    assert len(task.heldout(60, flag=None)) == have
    assert time.time() - start < 10  # an exhausted task stops looking: no hang
    assert len(get_task("countdown", 2).heldout(200)) == 200  # a larger task has them


def test_eval_and_instructions_fit_a_small_task(chat_run, tmp_path, capsys):
    code, _, err = run(["eval", chat_run, "--task", "countdown", "--limit", "60", "--device", "cpu"], capsys)
    one_error(code, err, "--limit", "held-out prompts")
    code, out, err = run(["eval", chat_run, "--task", "countdown", "--difficulty", "1", "--max-new-tokens", "8",
                          "--device", "cpu", "--quiet", "--output", tmp_path / "m.json"], capsys)
    assert code == 0, err
    (m,) = json.loads((tmp_path / "m.json").read_text())
    assert 0 < m["n"] < 60 and m["task"] == "countdown"  # all the held-out prompts it has
    n_held = m["n"]

    argv = ["finetune", "instructions", "--task", "countdown", "--synthetic", "50"]
    code, _, err = run([*argv, "--heldout", "100", "--out", tmp_path / "bad"], capsys)
    one_error(code, err, "--heldout")
    assert not (tmp_path / "bad").exists()
    code, out, err = run([*argv, "--out", tmp_path / "set"], capsys)
    assert code == 0, err
    held = (tmp_path / "set" / "heldout.jsonl").read_text().splitlines()
    train = (tmp_path / "set" / "train.jsonl").read_text().splitlines()
    assert len(held) == n_held < 200 and len(train) == 50  # fewer than the default 200: all it has
    prompts = lambda lines: {json.loads(x)["messages"][0]["content"] for x in lines}  # noqa: E731
    assert not prompts(held) & prompts(train)


def test_generation_lengths_fit_the_context(tok, tmp_path, capsys):
    from gpt2lab.checkpoint import load_run
    from gpt2lab.evals.checkable import get_task, score_task
    from gpt2lab.templates import get_format

    run_dir = tiny_run(tmp_path / "small", tok, 64, "chat")
    model, tk = load_run(run_dir, "cpu")
    task = get_task("arithmetic", 1)
    records = task.heldout(3)
    metrics = score_task(model, tk, get_format("chat"), task, records, max_new_tokens=128)
    assert metrics["n"] == 3 and all(len(tk.encode(r["answer"])) <= 64 for r in metrics["rows"])
    code, out, err = run(["eval", run_dir, "--task", "arithmetic", "--max-new-tokens", "128", "--limit", "3",
                          "--samples", "2", "--k", "2", "--device", "cpu", "--quiet"], capsys)
    assert code == 0 and err == "", err
    assert "pass_at_2" in out


RECORDING_REWARD = '''
import numpy

LOG = {log!r}


def score(prompt, completion, record):
    with open(LOG, "a") as f:
        f.write(prompt + "\\n")
    return numpy.float64(0.5 if record["letter"] in completion else 0.25)
'''

RL_ARGS = ["--max-steps", "2", "--batch-size", "2", "--group-size", "2", "--max-new-tokens", "4", "--lr", "1e-3",
           "--eval-every", "2", "--log-every", "1", "--checkpoint-every", "100", "--device", "cpu",
           "--no-tensorboard"]


def write_prompts(path: Path, words) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"Say {w}.", "letter": w[0]}) + "\n" for w in words))
    return path


def test_rl_on_your_prompts_holds_some_out(chat_run, tmp_path, capsys, monkeypatch):
    """Ten prompts and no --val-prompts: a few are held out (and said so); the reward function (which returns
    numpy floats) sees them only in evaluations, never in training. With --val-prompts the evaluation
    scores that file's prompts."""
    import gpt2lab.finetune.rl as rl

    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]
    prompts = write_prompts(tmp_path / "prompts.jsonl", words)
    log = tmp_path / "seen.txt"
    (tmp_path / "reward.py").write_text(RECORDING_REWARD.format(log=str(log)))
    real = rl.score_task

    def marked(*a, **kw):  # the reward calls made while evaluating, between markers
        with open(log, "a") as f:
            f.write("<eval>\n")
        try:
            return real(*a, **kw)
        finally:
            with open(log, "a") as f:
                f.write("</eval>\n")

    monkeypatch.setattr(rl, "score_task", marked)

    def seen() -> tuple[set, set]:
        train, evaluated, inside = set(), set(), False
        for line in log.read_text().splitlines():
            if line in ("<eval>", "</eval>"):
                inside = line == "<eval>"
            else:
                (evaluated if inside else train).add(line)
        return train, evaluated

    task = ["--prompts", prompts, "--reward", f"{tmp_path / 'reward.py'}:score"]
    code, out, err = run(["finetune", "rl", "--init", chat_run, "--out", tmp_path / "rl", *task, *RL_ARGS], capsys)
    assert code == 0, err
    assert "8 prompts to train on, 2 held out" in out
    held = {"Say echo.", "Say juliet."}  # every 5th record
    train, evaluated = seen()
    assert evaluated == held
    assert train and not train & held and train <= {f"Say {w}." for w in words}
    # the loader only ever hands out the train records, the task holds the others apart
    from gpt2lab.evals.prompts import FileTask
    from gpt2lab.finetune.rl import PromptLoader

    file_task = FileTask(str(prompts), f"{tmp_path / 'reward.py'}:score")
    file_task.hold_out(None, 0.2)
    assert {r["prompt"] for r in file_task.val_records} == held
    loader = PromptLoader(file_task, batch_size=3, seed=0, rank=0, world_size=1)
    drawn = {r["prompt"] for _ in range(20) for r in loader.next_batch().records}
    assert drawn == {f"Say {w}." for w in words} - held

    # --val-prompts: the evaluation scores those prompts, and every record of --prompts trains
    log.unlink()
    val = write_prompts(tmp_path / "val.jsonl", ["kilo", "lima"])
    code, out, err = run(["finetune", "rl", "--init", chat_run, "--out", tmp_path / "rl2", *task, "--val-prompts", val,
                          *RL_ARGS], capsys)
    assert code == 0, err
    assert "10 prompts to train on, 2 held out" in out
    train, evaluated = seen()
    assert evaluated == {"Say kilo.", "Say lima."} and not train & evaluated
    # too few prompts to hold any out: one line
    one = write_prompts(tmp_path / "one.jsonl", ["alpha"])
    code, _, err = run(["finetune", "rl", "--init", chat_run, "--out", tmp_path / "rl3", "--prompts", one,
                        "--reward", f"{tmp_path / 'reward.py'}:score", *RL_ARGS], capsys)
    one_error(code, err, "--val-prompts")


# ================================================================== 6: resume and re-run never mix settings

SEQ = 32
PRETRAIN = dict(model="tiny", block_size=SEQ, batch_size=4, total_batch_tokens=4 * SEQ * 2, max_steps=2, lr=3e-3,
                warmup_steps=1, eval_every=2, eval_batches=1, log_every=1, checkpoint_every=1, keep_checkpoints=0,
                tensorboard=False, device="cpu", sample_tokens=0)


@pytest.fixture(scope="module")
def pretrained(tiny_data, tmp_path_factory):
    """copy(dst) -> a copy of one pretraining run stopped by its --max-steps 2: 4 sequences a micro-batch,
    accumulated twice to the 256 tokens of a step, a checkpoint at each step."""
    out = tmp_path_factory.mktemp("pretrained") / "run"
    with pytest.raises(SystemExit) as e:
        cli.main(pretrain_argv(tiny_data, out, PRETRAIN))
    assert e.value.code == 0

    def copy(dst: Path) -> Path:
        shutil.copytree(out, dst, ignore=shutil.ignore_patterns(".lock"))
        return dst

    return copy


def snapshot(run_dir: Path) -> dict[str, str]:
    """Every file of a run dir and its content's hash."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != ".lock"}


ABLATE = ["--model", "tiny", "--block-size", "32", "--batch-size", "4", "--max-steps", "3", "--lr", "3e-3",
          "--warmup-steps", "1", "--eval-every", "3", "--eval-batches", "1", "--log-every", "3",
          "--checkpoint-every", "3", "--no-tensorboard", "--device", "cpu", "--sample-tokens", "0"]


def test_ablate_refuses_or_retrains_changed_settings_and_keeps_every_row(tiny_data, tmp_path, capsys):
    out = tmp_path / "ablation"
    variants = ["--variant", "a=", "--variant", "b=--mlp relu2"]
    code, _, err = run(["ablate", "--data", tiny_data, "--out", out, *ABLATE, *variants], capsys)
    assert code == 0, err
    rows = json.loads((out / "ablation.json").read_text())
    assert [r["name"] for r in rows] == ["a", "b"]
    before = snapshot(out)
    # a changed shared setting: refused before anything is trained, naming it
    changed = [x if x != "3e-3" else "1e-3" for x in ABLATE]
    code, _, err = run(["ablate", "--data", tiny_data, "--out", out, *changed, *variants], capsys)
    one_error(code, err, "--lr", "--retrain")
    assert snapshot(out) == before
    # the same command again (watching settings may differ): both kept as they are
    code, _, err = run(["ablate", "--data", tiny_data, "--out", out, *ABLATE, "--log-every", "1", *variants], capsys)
    assert code == 0, err
    assert json.loads((out / "ablation.json").read_text()) == rows
    assert snapshot(out / "a") == {k[2:]: v for k, v in before.items() if k.startswith("a/")}
    # --retrain of one variant with the new setting: it trains again; the other's row stays
    code, _, err = run(["ablate", "--data", tiny_data, "--out", out, *changed, "--retrain", "--variant", "a="], capsys)
    assert code == 0, err
    rows2 = json.loads((out / "ablation.json").read_text())
    assert [r["name"] for r in rows2] == ["a", "b"] and rows2[1] == rows[1]
    assert rows2[0]["val_loss"] != rows[0]["val_loss"]
    assert json.loads((out / "a" / "config.json").read_text())["train"]["lr"] == 1e-3
    assert json.loads((out / "b" / "config.json").read_text())["train"]["lr"] == 3e-3


def test_resume_with_a_lower_max_steps_changes_nothing(pretrained, tmp_path, capsys):
    out = pretrained(tmp_path / "run")
    before, config = snapshot(out), (out / "config.json").read_bytes()
    code, _, err = run(["pretrain", "--resume", "--out", out, "--max-steps", "1"], capsys)
    one_error(code, err, "--max-steps 1", "(2)")
    assert (out / "config.json").read_bytes() == config and snapshot(out) == before
    # the same step is no error: nothing left to train
    code, _, err = run(["pretrain", "--resume", "--out", out, "--max-steps", "2"], capsys)
    assert code == 0, err


def test_resume_takes_another_micro_batch_with_the_same_tokens_per_step(pretrained, tmp_path, capsys):
    out = pretrained(tmp_path / "run")
    before = snapshot(out)
    for bad in ("3", "16"):  # 3 x 32 and 16 x 32 do not divide the run's 256 tokens a step
        code, _, err = run(["pretrain", "--resume", "--out", out, "--batch-size", bad, "--max-steps", "4"], capsys)
        one_error(code, err, f"--batch-size {bad}", "256")
        assert snapshot(out) == before
    code, out_text, err = run(["pretrain", "--resume", "--out", out, "--batch-size", "8", "--max-steps", "4"], capsys)
    assert code == 0, err
    assert "8 x 32 x 1 accumulation" in out_text
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["resolved"]["grad_accum"] == 1 and cfg["resolved"]["total_batch_tokens"] == 256
    assert cfg["train"]["batch_size"] == 8 and cfg["resolved"]["max_steps"] == 4
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == [1, 2, 3, 4]
    state = json.loads((out / "checkpoints" / "step_000004" / "state.json").read_text())
    assert state["step"] == 4 and state["tokens_seen"] == 4 * 256


def test_resume_refuses_weights_of_another_dtype(pretrained, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    out = pretrained(tmp_path / "run")
    newest = out / "checkpoints" / "step_000002" / "model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(newest)).items()}, str(newest),
              metadata={"format": "pt"})
    before = snapshot(out)
    code, _, err = run(["pretrain", "--resume", "--out", out, "--max-steps", "3"], capsys)
    one_error(code, err, "bfloat16", "float32")
    assert snapshot(out) == before


def test_resumed_sft_refuses_other_data(chat_run, tmp_path, capsys):
    def records(words):
        return "".join(json.dumps({"messages": [{"role": "user", "content": f"Say {w}."},
                                                {"role": "assistant", "content": w}]}) + "\n" for w in words)

    data = tmp_path / "sft.jsonl"
    data.write_text(records(["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"]))
    argv = ["finetune", "sft", "--init", chat_run, "--data", data, "--out", tmp_path / "sft", "--template", "chat",
            "--batch-size", "2", "--max-steps", "2", "--checkpoint-every", "1", "--eval-every", "2",
            "--eval-batches", "1", "--log-every", "1", "--no-tensorboard", "--device", "cpu"]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    before = snapshot(tmp_path / "sft")
    data.write_text(records(["alpha", "bravo", "charlie", "delta", "echo", "golf"]))  # one record changed
    code, _, err = run(["finetune", "sft", "--resume", "--out", tmp_path / "sft", "--max-steps", "3"], capsys)
    one_error(code, err, "not the data the run", "sha256")
    assert snapshot(tmp_path / "sft") == before
    # its own data again: it resumes
    data.write_text(records(["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"]))
    code, _, err = run(["finetune", "sft", "--resume", "--out", tmp_path / "sft", "--max-steps", "3"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "sft" / "checkpoints" / "step_000003" / "state.json").read_text())["step"] == 3


# ================================================================== 7: import-hf never replaces a trained run


def test_import_hf_overwrite_replaces_only_an_import(pretrained, tok, tmp_path, capsys):
    from gpt2lab.export.hf import export_hf

    hf = export_hf(tiny_run(tmp_path / "small", tok, 32), tmp_path / "hf")  # a local Hugging Face GPT-2 dir
    trained = pretrained(tmp_path / "trained")
    before = snapshot(trained)
    for extra in ([], ["--overwrite"]):
        code, _, err = run(["import-hf", hf, "--out", trained, *extra], capsys)
        one_error(code, err, str(trained))
        assert snapshot(trained) == before
    # the neighbour: an earlier import is replaced with --overwrite
    code, _, err = run(["import-hf", hf, "--out", tmp_path / "imported"], capsys)
    assert code == 0, err
    code, _, err = run(["import-hf", hf, "--out", tmp_path / "imported", "--overwrite"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "imported" / "config.json").read_text())["task"] == "import-hf"


# ================================================================== 8: no hangs, no tracebacks


def test_eval_of_a_diverged_model_reports_an_infinite_perplexity(pretrained, tiny_data, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    out = pretrained(tmp_path / "diverged")
    weights = out / "model.safetensors"
    save_file({k: v * 1e4 for k, v in load_file(str(weights)).items()}, str(weights), metadata={"format": "pt"})
    code, text, err = run(["eval", out, "--task", "loss", "--data", tiny_data, "--limit", "4", "--device", "cpu",
                           "--quiet", "--output", tmp_path / "m.json"], capsys)
    assert code == 0 and "Traceback" not in err, err
    (m,) = json.loads((tmp_path / "m.json").read_text().replace("Infinity", "1e999"))
    assert m["loss"] > 1000 and m["ppl"] == float("inf")
    assert "inf" in text
    # the neighbour: the trained model's perplexity is finite
    code, _, err = run(["eval", pretrained(tmp_path / "fine"), "--task", "loss", "--data", tiny_data, "--limit", "4",
                        "--device", "cpu", "--quiet", "--output", tmp_path / "m2.json"], capsys)
    assert code == 0, err
    (m,) = json.loads((tmp_path / "m2.json").read_text())
    assert 1 < m["ppl"] < 1e4


def test_an_absurd_time_budget_is_one_line(tiny_data, tmp_path, capsys):
    for budget in ("1e300", "inf", "0"):
        code, _, err = run(pretrain_argv(tiny_data, tmp_path / "run", {**PRETRAIN, "max_steps": None,
                                                                      "time_budget": budget}), capsys)
        one_error(code, err, "--time-budget")
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("body,message", [
    ("import time\n\ndef score(p, c, r):\n    time.sleep(5)\n    return 1.0\n", "took more than 1 s"),
    ("def score(p, c, r):\n    return 1e300\n", "returned 1e+300"),
    ("def score(p, c, r):\n    try:\n        import time\n        time.sleep(5)\n    except Exception:\n"
     "        pass\n    return 1.0\n", "took more than 1 s"),  # its own `except Exception` cannot swallow the limit
], ids=["slow", "huge", "slow-swallowing"])
def test_a_reward_function_is_limited_in_time_and_range(chat_run, tmp_path, capsys, monkeypatch, body, message):
    import gpt2lab.evals.prompts as prompts

    monkeypatch.setattr(prompts, "REWARD_SECONDS", 1)
    (tmp_path / "reward.py").write_text(body)
    data = write_prompts(tmp_path / "prompts.jsonl", ["alpha", "bravo", "charlie"])
    start = time.time()
    code, _, err = run(["finetune", "rl", "--init", chat_run, "--out", tmp_path / "rl", "--prompts", data,
                        "--reward", f"{tmp_path / 'reward.py'}:score", *RL_ARGS], capsys)
    one_error(code, err, message, "reward.py:score")
    assert time.time() - start < 4.5  # stopped at the limit, not after the 5 s sleep
    assert not (tmp_path / "rl").exists()
