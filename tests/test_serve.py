"""`gpt2lab serve` (gpt2lab/serve: app, openai, scheduler), `gpt2lab chat --url` and the chat page.

Live servers run in this process (uvicorn in a thread, on 127.0.0.1 and a free port) and are asked
with the official `openai` client, raw HTTP where the client hides what is checked (the SSE framing,
malformed bodies, disconnects), the CLI, and headless Chromium. The models are tiny and random, their
weights scaled so that greedy output moves around (as in test_generate.py); one is built by hand to
answer a fixed script with a thinking section.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from gpt2lab.checkpoint import load_run, write_run_config  # noqa: E402
from gpt2lab.generate import answer, generate  # noqa: E402
from gpt2lab.model.config import GPTConfig  # noqa: E402
from gpt2lab.model.gpt import GPT  # noqa: E402
from gpt2lab.serve.scheduler import Job, Scheduler, Text  # noqa: E402
from gpt2lab.templates import encode_messages  # noqa: E402
from gpt2lab.weights import save_weights  # noqa: E402

TEXT = ("The quick brown fox jumps over the lazy dog. A café in Zürich serves crème brûlée. "
        "Hello world, hello there! Numbers: 1, 2, 3, 42. ") * 20
SCRIPT = "<think>plan it</think>the answer"
THINK_QUESTION = "Think first."


def lively(vocab_size: int, block_size: int, seed: int = 0, **kw) -> GPT:
    """A tiny random GPT whose greedy output is not one token repeated."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32, **kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(5.0 if name in ("transformer.wte.weight", "transformer.wpe.weight") else 20.0)
    return model.eval()


def scripted(tok, block_size: int, start: int, script: list[int]) -> GPT:
    """A GPT whose prediction depends on the position only: script[k] at position start + k, then
    <|endoftext|>. The blocks are zero (the residual passes through), the token embedding is zero, and
    position p's embedding points along one axis that the (untied) head maps to the token wanted there."""
    C = 64
    assert len(script) < C - 1
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=1, n_head=2, n_embd=C,
                          tie_embeddings=False))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.transformer.ln_f.weight.fill_(1.0)
        for pos in range(block_size):
            k = pos - start
            axis = k if 0 <= k < len(script) else C - 1
            model.transformer.wpe.weight[pos, axis] = 10.0
        for k, token in enumerate(script):
            model.lm_head.weight[token, k] = 1.0
        model.lm_head.weight[tok.eot_id, C - 1] = 1.0
    return model.eval()


def write_run(out: Path, model: GPT, tok, template: str | None = None) -> Path:
    out.mkdir(parents=True)
    write_run_config(out, model.config, tokenizer_identity=tok.identity(),
                     extra={"template": template} if template else None)
    save_weights(model, out / "model.safetensors")
    tok.save(out)
    return out



def make_runs(root: Path) -> dict[str, Path]:
    """The served run dirs (the `runs` fixture of conftest.py): a base model (context 64), a chat model
    (context 256) and the scripted thinking model."""
    from gpt2lab.tokenizer.train import train_bpe_from_texts

    tok = train_bpe_from_texts([TEXT], 300, name="tiny")
    out = {"base": write_run(root / "base", lively(tok.vocab_size, 64), tok),
           "chat": write_run(root / "chat", lively(tok.vocab_size, 256), tok, "chat")}
    prompt, _ = encode_messages(tok, [{"role": "user", "content": THINK_QUESTION}], "chat")
    out["think"] = write_run(root / "think", scripted(tok, 256, len(prompt) - 1, tok.encode(SCRIPT)), tok, "chat")
    return out


class Live:
    """`gpt2lab serve` of a run dir, in this process: uvicorn in a thread on 127.0.0.1 and a free port."""

    def __init__(self, run_dir: Path, name: str | None = None, **kw):
        import uvicorn

        from gpt2lab.checkpoint import open_run
        from gpt2lab.serve.app import Server, create_app
        from gpt2lab.serve.command import _listen
        from gpt2lab.templates import get_format

        self.model, self.tok = load_run(run_dir, "cpu", kind="lm")
        self.fmt = get_format(open_run(run_dir).template)
        self.server = Server(self.model, self.tok, self.fmt, name or run_dir.name, **kw)
        sock = _listen("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.uvicorn = uvicorn.Server(uvicorn.Config(create_app(self.server), log_level="error", access_log=False,
                                                     timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.uvicorn.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.01)

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)

    def request(self, method: str, path: str, body=None, headers=None) -> tuple[int, dict | str, dict]:
        """Raw HTTP: (status, JSON body or text, headers)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        data = body if isinstance(body, bytes | type(None)) else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        raw = r.read().decode("utf-8", "replace")
        conn.close()
        try:
            return r.status, json.loads(raw), dict(r.getheaders())
        except ValueError:
            return r.status, raw, dict(r.getheaders())

    def health(self) -> dict:
        return self.request("GET", "/health")[1]

    def stop(self):
        self.uvicorn.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def base(runs):
    live = Live(runs["base"])
    yield live
    live.stop()


@pytest.fixture(scope="module")
def chat(runs):
    live = Live(runs["chat"], name="tiny-chat")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def think(runs):
    live = Live(runs["think"])
    yield live
    live.stop()


def run_cli(monkeypatch, capsys, argv: list, stdin: str = "") -> tuple[int, str, str]:
    import io

    from gpt2lab.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ------------------------------------------------------------------------------ the scheduler


@pytest.mark.parametrize("kw", [{}, {"pos_embedding": "rope", "n_kv_head": 1}, {"attention": "mla"}])
def test_rows_joining_and_leaving_decode_what_they_decode_alone(kw):
    """Jobs of different lengths arrive while others run: each row's tokens (greedy, and sampled with a
    seed) are those of `generate` alone."""
    import queue
    import random

    model = lively(97, 96, **kw)

    class Tok:  # one character per id: the text shows every token
        eot_id = 96

        def decode_bytes(self, ids):
            return "".join(chr(0x4E00 + i) for i in ids).encode()

    scheduler = Scheduler(model, Tok(), max_batch=6).start()
    rng = random.Random(0)
    jobs = [([rng.randrange(96) for _ in range(rng.randint(1, 30))], rng.randint(1, 40), t, s)
            for s, t in enumerate([0, 0.9] * 9)]
    got, events = {}, queue.Queue()
    try:
        for i, (prompt, n, temperature, seed) in enumerate(jobs):
            scheduler.submit(Job(prompt, (lambda ev, i=i: events.put((i, ev))), max_new_tokens=n,
                                 temperature=temperature, seed=seed))
            time.sleep(rng.random() * 0.01)
        done = 0
        while done < len(jobs):
            i, ev = events.get(timeout=30)
            if isinstance(ev, Text):
                got[i] = got.get(i, "") + ev.text
            else:
                done += 1
        assert scheduler.stats()["max_rows"] > 1
    finally:
        scheduler.close()
    for i, (prompt, n, temperature, seed) in enumerate(jobs):
        alone = generate(model, prompt, n, temperature=temperature, seed=seed, eot_id=96)
        assert got.get(i, "") == Tok().decode_bytes(alone).decode(), i


def test_thinking_splitter_streams_what_split_thinking_splits():
    """However the answer is cut into pieces, the streamed reasoning and content join to what
    templates.split_thinking makes of the whole, and no piece shows part of a tag."""
    import random

    from gpt2lab.text import ThinkSplitter, split_thinking

    rng = random.Random(0)
    answers = ["\n<think>\nplan it \n</think>\n\nthe answer", "no thinking <think>x</think>", "<think>never closed  ",
               "<thi", "  ", "", "<think></think>x", "<think>a < b </thin k></think> ok", SCRIPT]
    for text in answers:
        thinking, content = split_thinking(text)
        for _ in range(20):
            cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 6)))) if len(text) > 1 \
                else []
            pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
            s = ThinkSplitter()
            out = [s.push(p) for p in pieces] + [s.flush()]
            assert "".join(r for r, _ in out) == (thinking or ""), (text, pieces)
            assert "".join(c for _, c in out) == content, (text, pieces)
            assert not any("</think>" in r for r, _ in out)
            if "<think>" not in content:
                assert not any("<think" in c for _, c in out)


# ----------------------------------------------------------------------------------- the API


def test_health_and_models(base, chat):
    h = base.health()
    assert h["status"] == "ok" and h["model"] == "base" and h["active"] == 0
    assert [m.id for m in base.client().models.list()] == ["base"]  # the run dir's name
    assert [m.id for m in chat.client().models.list()] == ["tiny-chat"]  # --model-name
    assert chat.client().models.retrieve("tiny-chat").id == "tiny-chat"
    status, body, _ = chat.request("GET", "/v1/models/other")
    assert status == 404 and body["error"]["code"] == "model_not_found"


def test_greedy_completion_equals_generate(base, runs, monkeypatch, capsys):
    r = base.client().completions.create(model="base", prompt="Hello world", max_tokens=12, temperature=0)
    rc, out, err = run_cli(monkeypatch, capsys, ["generate", runs["base"], "--prompt", "Hello world",
                                                 "--temperature", "0", "--max-new-tokens", "12", "--device", "cpu"])
    assert (rc, err) == (0, "")
    assert out == "Hello world" + r.choices[0].text + "\n"
    assert len(r.choices[0].text) > 5
    assert r.usage.prompt_tokens == len(base.tok.encode("Hello world"))
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == r.usage.prompt_tokens + 12
    assert r.choices[0].finish_reason == "length" and r.object == "text_completion"


def test_a_base_model_chats_through_a_transcript(base, runs):
    """A base model has no chat format: the API gives it a plain transcript to continue, up to the next turn."""
    from gpt2lab.templates import TRANSCRIPT, render_messages

    messages = [{"role": "user", "content": "Hello world"}, {"role": "assistant", "content": "Hello there"},
                {"role": "user", "content": "The quick"}]
    r = base.client().chat.completions.create(model="base", messages=messages, max_tokens=12, temperature=0)
    prompt = render_messages(messages, TRANSCRIPT)
    assert prompt == "User: Hello world\nAssistant: Hello there\nUser: The quick\nAssistant:"
    model, tok = load_run(runs["base"])
    ids, _ = encode_messages(tok, messages, TRANSCRIPT)
    assert r.choices[0].message.content == answer(model, tok, ids, 12, stop=TRANSCRIPT.stop)


def test_greedy_chat_equals_generate(chat, runs, monkeypatch, capsys):
    r = chat.client().chat.completions.create(model="tiny-chat", messages=user("Name a color."), max_tokens=12,
                                              temperature=0)
    rc, out, err = run_cli(monkeypatch, capsys, ["generate", runs["chat"], "--prompt", "Name a color.",
                                                 "--temperature", "0", "--max-new-tokens", "12", "--device", "cpu"])
    assert (rc, err) == (0, "")
    msg = r.choices[0].message
    assert out == msg.content + "\n" and msg.content and msg.role == "assistant"
    assert getattr(msg, "reasoning_content", None) is None
    ids, _ = encode_messages(chat.tok, user("Name a color."), chat.fmt)
    assert r.usage.prompt_tokens == len(ids) and r.usage.total_tokens == len(ids) + r.usage.completion_tokens
    # max_completion_tokens is max_tokens' newer name
    r2 = chat.client().chat.completions.create(model="tiny-chat", messages=user("Name a color."),
                                               max_completion_tokens=12, temperature=0)
    assert r2.choices[0].message.content == msg.content


def sse_events(live: Live, path: str, body: dict) -> tuple[list, str]:
    status, raw, headers = live.request("POST", path, body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream"), raw
    blocks = [b for b in raw.split("\n\n") if b]
    assert all(b.startswith("data: ") for b in blocks)
    return [json.loads(b[6:]) for b in blocks if b != "data: [DONE]"], raw


def test_streamed_deltas_join_to_the_answer(chat, base):
    client = chat.client()
    whole = client.chat.completions.create(model="tiny-chat", messages=user("Tell me"), max_tokens=20,
                                           temperature=0)
    stream = client.chat.completions.create(model="tiny-chat", messages=user("Tell me"), max_tokens=20,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 3  # it came in pieces
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert all(c.usage is None for c in chunks[:-1])
    # the wire: server-sent events that end with [DONE]; without include_usage no usage chunk
    events, raw = sse_events(chat, "/v1/chat/completions", {"messages": user("Tell me"), "max_tokens": 5,
                                                            "stream": True})
    assert raw.endswith("data: [DONE]\n\n") and all(e["object"] == "chat.completion.chunk" for e in events)
    assert all(e["choices"] for e in events) and all("usage" not in e for e in events)
    # completions stream too
    text = base.client().completions.create(model="base", prompt="The", max_tokens=10, temperature=0).choices[0].text
    events, raw = sse_events(base, "/v1/completions", {"prompt": "The", "max_tokens": 10, "temperature": 0,
                                                      "stream": True, "stream_options": {"include_usage": True}})
    assert raw.endswith("data: [DONE]\n\n") and events[-1]["usage"]["completion_tokens"] == 10
    assert "".join(c["text"] for e in events for c in e["choices"]) == text


def test_n_seed_stop_echo_and_logprobs(chat, base):
    client = chat.client()
    kw = {"model": "tiny-chat", "messages": user("Say something"), "max_tokens": 15}
    r = client.chat.completions.create(n=3, temperature=1.0, seed=5, **kw)
    texts = [c.message.content for c in r.choices]
    assert [c.index for c in r.choices] == [0, 1, 2] and len(set(texts)) > 1
    assert r.usage.completion_tokens == sum(len(chat.tok.encode(t)) for t in texts) or r.usage.completion_tokens > 3
    again = client.chat.completions.create(n=3, temperature=1.0, seed=5, **kw)
    assert [c.message.content for c in again.choices] == texts  # seeded: reproducible
    ids, _ = encode_messages(chat.tok, user("Say something"), chat.fmt)
    alone = answer(chat.model, chat.tok, ids, 15, temperature=1.0, seed=6, stop=chat.fmt.stop)
    assert texts[1] == alone  # choice i samples with seed + i, as `generate --num-samples` does

    greedy = client.chat.completions.create(temperature=0, **kw).choices[0].message.content
    stop = greedy[4:7]
    cut = client.chat.completions.create(temperature=0, stop=stop, **kw).choices[0]
    assert cut.message.content == greedy[:greedy.find(stop)] and cut.finish_reason == "stop"
    cut2 = client.chat.completions.create(temperature=0, stop=["zzzz", stop], stream=True, **kw)
    assert "".join(c.choices[0].delta.content or "" for c in cut2 if c.choices) == greedy[:greedy.find(stop)]

    lp = client.chat.completions.create(temperature=0, logprobs=True, top_logprobs=3, **kw).choices[0].logprobs
    assert len(lp.content) == 15
    for entry in lp.content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy takes the most likely

    c = base.client().completions.create(model="base", prompt="Hello", max_tokens=4, temperature=0, echo=True,
                                         logprobs=2)
    choice = c.choices[0]
    assert choice.text.startswith("Hello") and len(choice.logprobs.tokens) == len(base.tok.encode("Hello")) + 4
    assert choice.logprobs.token_logprobs[0] is None and all(x <= 0 for x in choice.logprobs.token_logprobs[1:])
    assert c.usage.completion_tokens == 4
    several = base.client().completions.create(model="base", prompt=["Hello", "The"], n=2, max_tokens=3,
                                               temperature=0)
    assert [x.index for x in several.choices] == [0, 1, 2, 3]
    assert several.choices[0].text == several.choices[1].text != several.choices[2].text


def test_32_concurrent_streams_each_equal_its_answer_alone(base, monkeypatch):
    slow_steps(monkeypatch, base, 0.005)  # the tiny model is so fast that streams would hardly overlap
    prompts = [" ".join(TEXT.split()[i % 20: i % 20 + 1 + i % 7]) for i in range(32)]
    limits = [4 + (i * 7) % 20 for i in range(32)]
    expected = [answer(base.model, base.tok, p, n, temperature=0) for p, n in zip(prompts, limits)]
    before = base.health()["max_rows"]

    async def one(client, i):
        await asyncio.sleep((i % 8) * 0.01)  # arrivals spread over the first steps: rows join a running batch
        stream = await client.completions.create(model="base", prompt=prompts[i], max_tokens=limits[i],
                                                 temperature=0, stream=True)
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def main():
        async with openai.AsyncOpenAI(base_url=base.url + "/v1", api_key="none", max_retries=0) as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    got = asyncio.run(main())
    assert got == expected
    h = base.health()
    assert max(before, h["max_rows"]) > 8 and h["active"] == 0  # they shared decoding steps


@pytest.mark.parametrize("body,status,param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400, None),
    (b"[" * 100000 + b"]" * 100000, 400, None),
    ({"messages": "hello"}, 400, "messages"),
    ({}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400,
     "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": -1}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, 400, "top_p"),
    ({"messages": [{"role": "user", "content": "x"}], "top_k": 2.5}, 400, "top_k"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 0}, 400, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 1000}, 400, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": -5}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": True}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": 7}, 400, "stop"),
    ({"messages": [{"role": "user", "content": "x"}], "seed": -1}, 400, "seed"),
    ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, 400, "stream"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 50, "logprobs": True}, 400, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, 400, "tools"),
    ({"messages": [{"role": "user", "content": "x"}], "frequency_penalty": 1}, 400, "frequency_penalty"),
    ({"messages": [{"role": "user", "content": "word " * 400}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "model": "gpt-5"}, 404, "model"),
])
def test_bad_chat_requests_answer_openai_errors(chat, body, status, param):
    got, data, _ = chat.request("POST", "/v1/chat/completions", body)
    assert got == status, data
    assert set(data) == {"error"} and set(data["error"]) == {"message", "type", "param", "code"}
    assert isinstance(data["error"]["message"], str) and data["error"]["message"]
    assert data["error"]["param"] == param
    if status == 404:
        assert data["error"]["code"] == "model_not_found"


def test_more_bad_requests_and_the_server_keeps_serving(chat, base):
    checks = [
        (base, "POST", "/v1/completions", {"prompt": 5}, 400),
        (base, "POST", "/v1/completions", {"prompt": [1, 2, 999999]}, 400),
        (base, "POST", "/v1/completions", {"prompt": "x", "logprobs": 21}, 400),
        (base, "POST", "/v1/completions", {"prompt": "word " * 100}, 400),  # past the context of 64
        (base, "POST", "/v1/completions", {"prompt": "x", "suffix": "y"}, 400),
        (chat, "POST", "/v1/chat/completions", b"x" * (2 << 20), 413),
        (chat, "GET", "/v1/chat/completions", None, 405),
        (chat, "GET", "/v2/nothing", None, 404),
        (chat, "POST", "/v1/embeddings", {"input": "x"}, 404),
    ]
    for live, method, path, body, status in checks:
        got, data, _ = live.request(method, path, body)
        assert got == status and set(data["error"]) == {"message", "type", "param", "code"}, (path, body, data)
    got, data, _ = base.request("POST", "/v1/completions", {"prompt": "word " * 100})
    assert data["error"]["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        chat.client().chat.completions.create(model="nope", messages=user("x"))
    with pytest.raises(openai.BadRequestError):
        chat.client().chat.completions.create(model="tiny-chat", messages=user("x"), temperature=7)
    # a completion whose prompt and max_tokens pass the context is refused before it takes a place
    with pytest.raises(openai.BadRequestError, match="ask for at most"):
        base.client().completions.create(model="base", prompt="Hello world", max_tokens=10_000, temperature=0)
    # a chat fits max_tokens to what the context leaves: generation stops at the context's end
    r = chat.client().chat.completions.create(model="tiny-chat", messages=user("Hello"), max_tokens=10_000,
                                              temperature=0)
    context = chat.client().models.retrieve("tiny-chat").context_length
    assert r.usage.total_tokens <= context and r.choices[0].finish_reason in ("length", "stop")
    # a client that sends half a body and hangs up
    with socket.create_connection(("127.0.0.1", chat.port)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n{\"mess")
    assert chat.health()["status"] == "ok"
    assert chat.client().chat.completions.create(model="tiny-chat", messages=user("x"), max_tokens=3).choices


def test_api_key_required_when_set(runs):
    live = Live(runs["chat"], api_key="sekret-key")
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret-key"}):
            status, data, _ = live.request("POST", "/v1/chat/completions", {"messages": user("x")}, headers)
            assert status == 401 and data["error"]["code"] == "invalid_api_key"
        assert live.request("GET", "/v1/models")[0] == 401
        with pytest.raises(openai.AuthenticationError):
            live.client(api_key="wrong").models.list()
        r = live.client(api_key="sekret-key").chat.completions.create(model="chat", messages=user("x"), max_tokens=3)
        assert r.choices[0].message.content is not None
        assert live.health()["status"] == "ok"  # health and the page need no key
        assert live.request("GET", "/")[0] == 200
    finally:
        live.stop()


def slow_steps(monkeypatch, live: Live, seconds: float) -> None:
    sched = live.server.scheduler
    decode = sched._decode

    def slow():
        time.sleep(seconds)
        decode()

    monkeypatch.setattr(sched, "_decode", slow)


def test_a_disconnected_client_stops_its_generation(chat, monkeypatch):
    slow_steps(monkeypatch, chat, 0.01)  # 200 tokens would take 2 s or more
    before = chat.health()
    body = json.dumps({"messages": user("Go on"), "max_tokens": 200, "temperature": 0, "stream": True}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", chat.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200
    r.fp.readline()  # the first event
    # a non-streamed request whose client hangs up
    s = socket.create_connection(("127.0.0.1", chat.port))
    body2 = json.dumps({"messages": user("More"), "max_tokens": 200, "temperature": 0}).encode()
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(body2)).encode() + b"\r\n\r\n" + body2)
    deadline = time.time() + 10
    while chat.health()["active"] < 2:  # both are generating
        assert time.time() < deadline
        time.sleep(0.02)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    s.close()
    deadline = time.time() + 10
    while (h := chat.health())["active"] or h["waiting"]:
        assert time.time() < deadline, h
        time.sleep(0.05)
    assert h["cancelled"] - before["cancelled"] == 2
    assert h["tokens"] - before["tokens"] < 200  # both stopped long before their 200 tokens each
    monkeypatch.undo()
    assert chat.client().chat.completions.create(model="tiny-chat", messages=user("x"), max_tokens=3).choices


def test_a_thinking_section_comes_back_apart(think):
    client = think.client()
    r = client.chat.completions.create(model="think", messages=user(THINK_QUESTION), temperature=0)
    msg = r.choices[0].message
    assert (msg.reasoning_content, msg.content, r.choices[0].finish_reason) == ("plan it", "the answer", "stop")
    chunks = list(client.chat.completions.create(model="think", messages=user(THINK_QUESTION), temperature=0,
                                                 stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "plan it"
    assert "".join(d.content or "" for d in deltas) == "the answer"
    # completions return the raw text
    ids, _ = encode_messages(think.tok, user(THINK_QUESTION), "chat")
    raw = client.completions.create(model="think", prompt=ids, temperature=0, max_tokens=50).choices[0].text
    assert raw == SCRIPT


# ------------------------------------------------------------------------------- the commands


CUT_NOTE = "(the answer was cut at {} tokens; raise --max-new-tokens for longer ones)\n"


def test_chat_url_talks_to_the_server(chat, runs, monkeypatch, capsys):
    greedy = ["--temperature", "0", "--max-new-tokens", "12"]
    served = chat.client().chat.completions.create(model="tiny-chat", messages=user("Name a color."),
                                                   max_tokens=12, temperature=0).choices[0].message.content
    rc, out, err = run_cli(monkeypatch, capsys, ["chat", "--url", chat.url, "-p", "Name a color.", *greedy])
    # a random model never ends its answer: it is cut at --max-new-tokens, which chat says on stderr
    assert (rc, out) == (0, served + "\n") and err == CUT_NOTE.format(12)
    # multi-turn: the second question is asked with the first exchange
    rc, out, err = run_cli(monkeypatch, capsys, ["chat", "--url", chat.url + "/v1", "--model", "tiny-chat",
                                                 *greedy], stdin="hello\nand then?\n/quit\n")
    assert rc == 0, err
    first = chat.client().chat.completions.create(model="tiny-chat", messages=user("hello"), max_tokens=12,
                                                  temperature=0).choices[0].message.content
    second = chat.client().chat.completions.create(
        model="tiny-chat", max_tokens=12, temperature=0,
        messages=user("hello") + [{"role": "assistant", "content": first}] + user("and then?"),
    ).choices[0].message.content
    assert f"> {first}\n> {second}\n> " in out
    # mistakes: one error line, exit 2
    for argv in (["chat", "--url", chat.url, "--model", "nope", "-p", "x"],
                 ["chat", "--model", "tiny-chat", "-p", "x"],
                 ["chat", runs["chat"], "--url", chat.url, "-p", "x"],
                 ["chat", "--url", "ftp://x", "-p", "x"],
                 ["chat", "--url", "http://127.0.0.1:9", "-p", "x"],
                 ["chat", "-p", "x"]):
        rc, out, err = run_cli(monkeypatch, capsys, argv)
        assert rc == 2 and err.startswith("error:") and err.count("\n") == 1, (argv, err)


def test_chat_url_shows_a_thinking_section(think, monkeypatch, capsys):
    rc, out, err = run_cli(monkeypatch, capsys, ["chat", "--url", think.url, "-p", THINK_QUESTION, "--temperature",
                                                 "0", "--top-k", "5", "--seed", "1"])
    assert (rc, out, err) == (0, SCRIPT + "\n", "")  # as `gpt2lab chat RUN_DIR` shows it
    rc, out, err = run_cli(monkeypatch, capsys, ["chat", "--url", think.url, "-p", THINK_QUESTION, "--temperature",
                                                 "0", "--think", "hide"])
    assert (rc, out, err) == (0, "the answer\n", "")


def test_serve_command(runs, monkeypatch, capsys):
    """The command: it loads the run, warns when it listens beyond this machine without a key, and
    refuses bad flags in one line (uvicorn's loop and the socket are stubbed: nothing listens)."""
    import uvicorn

    import gpt2lab.serve.command as serve_mod

    seen, real_listen = {}, serve_mod._listen
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: seen.update(app=self.config.app))
    monkeypatch.setattr(serve_mod, "_listen", lambda host, port: socket.socket())
    rc, out, err = run_cli(monkeypatch, capsys, ["serve", runs["chat"], "--host", "0.0.0.0", "--port", "0",
                                                 "--device", "cpu", "--cors-origin", "http://example.test"])
    assert rc == 0 and "warning: serving on 0.0.0.0 without --api-key" in err
    assert "as model 'chat'" in out and "chat format" in out and "app" in seen
    rc, out, err = run_cli(monkeypatch, capsys, ["serve", runs["chat"], "--host", "0.0.0.0", "--api-key", "k",
                                                 "--device", "cpu"])
    assert rc == 0 and "warning" not in err
    for argv in (["serve", runs["chat"], "--port", "70000"], ["serve", runs["chat"].parent / "missing"],
                 ["serve", runs["chat"], "--max-batch", "0"], ["serve", runs["chat"], "--api-key", " "]):
        rc, out, err = run_cli(monkeypatch, capsys, argv)
        assert rc == 2 and err.startswith("error:") and err.count("\n") == 1, (argv, err)
    # a port in use is a one-line error too
    monkeypatch.setattr(serve_mod, "_listen", real_listen)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        rc, out, err = run_cli(monkeypatch, capsys, ["serve", runs["chat"], "--port", s.getsockname()[1],
                                                     "--device", "cpu"])
    assert rc == 2 and err.startswith("error: cannot listen on 127.0.0.1:")


def test_serve_is_a_real_program(runs):
    """`gpt2lab serve` in a process of its own: it prints where it listens (--port 0 picks a free port),
    answers with the key, and stops cleanly on Ctrl-C (SIGINT)."""
    import re
    import signal
    import subprocess

    proc = subprocess.Popen([sys.executable, "-m", "gpt2lab", "serve", str(runs["base"]), "--port", "0",
                             "--api-key", "k3y", "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    try:
        line = proc.stdout.readline()
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)", line).group(1))
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k3y", max_retries=0)
        deadline = time.time() + 30
        while True:
            try:
                r = client.completions.create(model="base", prompt="Hello world", max_tokens=12, temperature=0)
                break
            except openai.APIConnectionError:
                assert time.time() < deadline and proc.poll() is None, proc.stderr.read()
                time.sleep(0.1)
        model, tok = load_run(runs["base"], "cpu")
        assert r.choices[0].text == answer(model, tok, "Hello world", 12)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cors_origins(runs):
    live = Live(runs["base"], cors_origins=("http://allowed.test",))
    try:
        _, _, headers = live.request("OPTIONS", "/v1/completions", None, {
            "Origin": "http://allowed.test", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert headers.get("access-control-allow-origin") == "http://allowed.test"
        _, _, headers = live.request("GET", "/v1/models", None, {"Origin": "http://other.test"})
        assert "access-control-allow-origin" not in headers
    finally:
        live.stop()


# ------------------------------------------------------------------------------- the chat page


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1100,800"]


def test_chat_page_in_a_browser(think, chat, tmp_path, monkeypatch):
    """Headless Chromium opens the page, sets temperature 0, types a message and waits for the streamed
    answer; the thinking section is folded apart from it. Then two turns with another model: the second
    answer is the one the API gives to the whole conversation; the stop button ends a long answer (and its
    generation on the server). Screenshots go to the test's tmp dir."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip("Chromium or chromedriver is not installed (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(think.url + "/")
        wait = WebDriverWait(driver, 20)
        wait.until(lambda d: "think" in d.find_element(By.ID, "model").text)
        temperature = driver.find_element(By.ID, "temperature")
        temperature.clear()
        temperature.send_keys("0")
        box = driver.find_element(By.ID, "input")
        box.send_keys(THINK_QUESTION)
        box.send_keys(Keys.ENTER)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done]"))
        reply = driver.find_element(By.CSS_SELECTOR, ".msg.assistant")
        assert reply.find_element(By.CSS_SELECTOR, ".content").text == "the answer"
        thinking = reply.find_element(By.CSS_SELECTOR, "details.thinking")
        assert thinking.get_attribute("open") is None  # folded once the answer came
        assert thinking.find_element(By.CSS_SELECTOR, ".text").get_attribute("textContent") == "plan it"
        assert driver.find_element(By.CSS_SELECTOR, ".msg.user .content").text == THINK_QUESTION
        driver.save_screenshot(str(tmp_path / "chat.png"))
        assert (tmp_path / "chat.png").stat().st_size > 1000
        driver.find_element(By.ID, "new-chat").click()
        assert not driver.find_elements(By.CSS_SELECTOR, ".msg")

        driver.get(chat.url + "/")
        wait.until(lambda d: "tiny-chat" in d.find_element(By.ID, "model").text)
        for field, value in (("temperature", "0"), ("max-tokens", "12")):
            el = driver.find_element(By.ID, field)
            el.clear()
            el.send_keys(value)
        replies, messages = [], []
        for i, question in enumerate(["hello", "and then?"]):
            box = driver.find_element(By.ID, "input")
            box.send_keys(question)
            driver.find_element(By.ID, "send").click()
            wait.until(lambda d, n=i + 1: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done]")) == n)
            shown = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant .content")[i].get_attribute("textContent")
            messages += user(question)
            expected = chat.client().chat.completions.create(model="tiny-chat", messages=messages, max_tokens=12,
                                                             temperature=0, top_p=1).choices[0].message.content
            assert shown == expected
            messages.append({"role": "assistant", "content": expected})
            replies.append(shown)
        driver.save_screenshot(str(tmp_path / "chat2.png"))

        slow_steps(monkeypatch, chat, 0.02)  # 200 tokens would take 4 s
        cancelled = chat.health()["cancelled"]
        el = driver.find_element(By.ID, "max-tokens")
        el.clear()
        el.send_keys("200")
        driver.find_element(By.ID, "input").send_keys("go on", Keys.ENTER)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant .content")[2].get_attribute(
            "textContent"))
        driver.find_element(By.ID, "stop").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done]")) == 3)
        assert driver.find_elements(By.CSS_SELECTOR, ".msg.assistant .meta")[2].text.startswith("stopped")
        deadline = time.time() + 10
        while chat.health()["cancelled"] == cancelled or chat.health()["active"]:
            assert time.time() < deadline
            time.sleep(0.05)
        monkeypatch.undo()

        # a reload keeps the conversation; it goes on past the model's context, its oldest turns left out
        driver.refresh()
        wait.until(lambda d: "tiny-chat" in d.find_element(By.ID, "model").text)
        shown = [m.get_attribute("textContent") for m in driver.find_elements(By.CSS_SELECTOR, ".msg .content")]
        assert shown[:4] == ["hello", replies[0], "and then?", replies[1]] and len(shown) == 6
        el = driver.find_element(By.ID, "max-tokens")
        el.clear()
        el.send_keys("12")
        for i in range(4):
            driver.find_element(By.ID, "input").send_keys(f"turn {i}: " + "many words in a row " * 12, Keys.ENTER)
            wait.until(lambda d, n=i + 4: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done]")) == n)
        metas = [m.text for m in driver.find_elements(By.CSS_SELECTOR, ".msg.assistant .meta")]
        assert "no longer fit the model's context" in metas[-1] and not any("Error" in m for m in metas), metas
        assert not driver.find_elements(By.CSS_SELECTOR, ".msg.error")
        driver.save_screenshot(str(tmp_path / "chat3.png"))
        driver.find_element(By.ID, "new-chat").click()
        driver.refresh()
        wait.until(lambda d: "tiny-chat" in d.find_element(By.ID, "model").text)
        assert not driver.find_elements(By.CSS_SELECTOR, ".msg")
    finally:
        driver.quit()


def test_chat_page_is_packaged():
    import gpt2lab

    page = Path(gpt2lab.__file__).parent / "assets" / "chat.html"
    html = page.read_text(encoding="utf-8")
    assert "http://" not in html.replace("http://www.w3.org", "") and "https://" not in html  # no CDN: offline
    assert "reasoning_content" in html and 'id="stop"' in html and 'id="new-chat"' in html
