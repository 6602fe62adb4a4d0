"""`gpt2lab serve` under load and in operation: chunked prefill that never holds a running stream for more
than one chunk, prefix caching that changes no token, 429 at once under overload, conversations kept inside
the context, /metrics, the request log, a graceful SIGTERM, and the Responses API with the official client."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from test_serve import SCRIPT, THINK_QUESTION, Live, lively, user  # noqa: E402

from gpt2lab.generate import generate  # noqa: E402
from gpt2lab.serve.prefix import BLOCK  # noqa: E402
from gpt2lab.serve.scheduler import Finish, Job, Scheduler, Text  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class CharTok:  # one character per id: the text shows every token
    eot_id = 96

    def decode_bytes(self, ids):
        return "".join(chr(0x4E00 + i) for i in ids).encode()


def collect(scheduler: Scheduler, jobs: list[tuple[list[int], int]], gap: float = 0.0) -> dict[int, list]:
    """Submit greedy jobs (prompt, max_new_tokens), `gap` seconds apart; each one's events in order."""
    events, got = queue.Queue(), {}
    for i, (prompt, n) in enumerate(jobs):
        scheduler.submit(Job(prompt, (lambda ev, i=i: events.put((i, ev))), max_new_tokens=n, temperature=0))
        time.sleep(gap)
    done = 0
    while done < len(jobs):
        i, ev = events.get(timeout=60)
        got.setdefault(i, []).append(ev)
        done += isinstance(ev, Finish)
    return got


def alone(model, prompt: list[int], n: int) -> str:
    """What `gpt2lab generate --temperature 0` makes of the prompt, as CharTok's text."""
    return CharTok().decode_bytes(generate(model, prompt, n, temperature=0, eot_id=CharTok.eot_id)).decode()


def text(events) -> str:
    return "".join(e.text for e in events if isinstance(e, Text))


# ------------------------------------------------------------------------- the batch


def test_a_long_prompt_joining_holds_no_running_stream_for_more_than_one_chunk():
    """A 2,000-token prompt joins two running streams: it is read 256 tokens a step, and between two of a
    running stream's tokens the model reads at most one chunk; the streams' tokens are those of alone."""
    model = lively(97, 2304)
    chunk = 256
    scheduler = Scheduler(model, CharTok(), max_batch=4, prefill_chunk=chunk).start()
    marks = []  # (stream, steps, prompt tokens read) when a running stream got a token

    def watch(i):
        def put(ev):
            if isinstance(ev, Text):
                s = scheduler.counters
                marks.append((i, s["steps"], s["prefill_tokens"]))
            events.put((i, ev))
        return put

    events = queue.Queue()
    running = [[5, 6, 7], [8, 9]]
    try:
        for i, prompt in enumerate(running):
            scheduler.submit(Job(prompt, watch(i), max_new_tokens=60, temperature=0))
        while len(marks) < 4:
            time.sleep(0.001)
        long_prompt = [(i * 7) % 96 for i in range(2000)]
        scheduler.submit(Job(long_prompt, watch(2), max_new_tokens=5, temperature=0))
        got, done = {}, 0
        while done < 3:
            i, ev = events.get(timeout=60)
            got.setdefault(i, []).append(ev)
            done += isinstance(ev, Finish)
    finally:
        scheduler.close()
    for i, prompt in enumerate(running):
        steps = [(s, p) for j, s, p in marks if j == i]
        for (s0, p0), (s1, p1) in zip(steps, steps[1:]):
            assert s1 - s0 == 1 and p1 - p0 <= chunk, (i, steps)
        assert text(got[i]) == alone(model, prompt, 60)
    assert text(got[2]) == alone(model, long_prompt, 5)


def test_prefix_caching_reuses_keys_and_values_and_changes_no_token():
    """Prompts that share their beginning (a system prompt; a conversation's earlier turns) take its keys
    and values from the cache: the counter says so, and every greedy answer equals the one made without."""
    model = lively(97, 256, pos_embedding="rope")
    system = [(i * 5) % 96 for i in range(3 * BLOCK + 7)]
    jobs = [(system + [1, 2, 3], 20), (system + [4, 5], 20), (system + [6] * 40, 20), ([9, 8, 7], 20)]
    turn2 = jobs[2][0] + [11, 12, 13] * 12
    without = Scheduler(model, CharTok(), max_batch=4, prefix_cache_bytes=0).start()
    cached = Scheduler(model, CharTok(), max_batch=4).start()
    try:
        plain = collect(without, jobs + [(turn2, 20)])
        first = collect(cached, jobs[:1])
        assert cached.counters["prefix_tokens"] == 0
        rest = collect(cached, jobs[1:], gap=0.05)
        assert cached.counters["prefix_tokens"] == 3 * BLOCK * 2  # the system prompt's 3 whole blocks, twice
        rest[len(jobs) - 1] = collect(cached, [(turn2, 20)])[0]
        # the conversation's earlier turn: its 143 tokens were 4 whole blocks
        assert cached.counters["prefix_tokens"] == 3 * BLOCK * 2 + 4 * BLOCK
        assert without.counters["prefix_tokens"] == 0
    finally:
        without.close()
        cached.close()
    answers = [first[0]] + [rest[i] for i in range(len(jobs))]  # rest[i]: job i + 1
    for i, events in enumerate(answers):
        assert text(events) == text(plain[i]), i
        assert text(events) == alone(model, (jobs + [(turn2, 20)])[i][0], 20)


def test_a_full_queue_answers_429_at_once_and_every_request_is_answered(runs):
    """4x overload of a server with 2 rows and 2 places in its queue: every request gets tokens or a 429
    with Retry-After, at once (no growing wait), and none hangs."""
    live = Live(runs["chat"], name="tiny-chat", max_batch=2, max_queue=2)
    results = []

    def ask(k):
        t = time.monotonic()
        status, data, headers = live.request("POST", "/v1/chat/completions", {
            "messages": user(f"question {k}"), "max_tokens": 150, "temperature": 0})
        results.append((status, data, headers, time.monotonic() - t))

    try:
        threads = [threading.Thread(target=ask, args=(k,)) for k in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads)
        statuses = sorted(r[0] for r in results)
        assert set(statuses) == {200, 429} and statuses.count(200) >= 4, statuses
        for status, data, headers, _ in results:
            if status == 429:
                assert data["error"]["code"] == "server_busy" and int(headers["retry-after"]) >= 1
            else:
                assert data["choices"][0]["message"]["content"]
        refused = [r[3] for r in results if r[0] == 429]
        assert max(refused) < min(r[3] for r in results if r[0] == 200)  # told at once, not after a wait
        metrics = parse_metrics(live.request("GET", "/metrics")[1])
        assert metrics["gpt2lab_rejected_total"] == statuses.count(429)
    finally:
        live.stop()


def test_a_conversation_longer_than_the_context_keeps_its_newest_turns(runs):
    """The chat endpoints drop the oldest turns (never the system message) and fit max_tokens to what is
    left, and say so; a last message longer than the context alone is refused."""
    live = Live(runs["chat"], name="tiny-chat")  # context 256
    try:
        turns = [{"role": "system", "content": "Be brief."}]
        for k in range(12):
            turns += [{"role": "user", "content": f"turn {k}: " + "words and more words " * 4},
                      {"role": "assistant", "content": "an answer of a few words " * 3}]
        turns.append({"role": "user", "content": "the last question"})
        status, data, headers = live.request("POST", "/v1/chat/completions",
                                             {"messages": turns, "max_tokens": 500, "temperature": 0})
        assert status == 200 and int(headers["x-dropped-messages"]) >= 2
        assert data["usage"]["total_tokens"] <= 256
        status, data, _ = live.request("POST", "/v1/chat/completions",
                                       {"messages": user("too long " * 200), "max_tokens": 5})
        assert status == 400 and data["error"]["code"] == "context_length_exceeded"
    finally:
        live.stop()


# ---------------------------------------------------------------------------- operations


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus' text format: every sample line is NAME{LABELS} VALUE; a line of anything else fails."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        m = re.fullmatch(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_]+="[^"]*",?)*\})? (\S+)', line)
        assert m, line
        out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def test_metrics_parse_and_count_what_was_served(runs, caplog):
    live = Live(runs["chat"], name="tiny-chat")
    try:
        client = live.client()
        with caplog.at_level("INFO", logger="gpt2lab.serve"):
            for k in range(3):
                client.chat.completions.create(model="tiny-chat", messages=user(f"hi {k}"), max_tokens=8,
                                               temperature=0)
            list(client.chat.completions.create(model="tiny-chat", messages=user("a stream"), max_tokens=8,
                                                temperature=0, stream=True))
            live.request("POST", "/v1/chat/completions", {"messages": "not a list"})
            deadline = time.time() + 5  # a request is logged once its last byte is sent: just after it arrived
            while len([r for r in caplog.records if r.name == "gpt2lab.serve"]) < 5 and time.time() < deadline:
                time.sleep(0.01)
        status, body, headers = live.request("GET", "/metrics")
        assert status == 200 and headers["content-type"].startswith("text/plain")
        m = parse_metrics(body)
        assert m['gpt2lab_requests_total{endpoint="/v1/chat/completions",status="200"}'] == 4
        assert m['gpt2lab_requests_total{endpoint="/v1/chat/completions",status="400"}'] == 1
        assert m["gpt2lab_completion_tokens_total"] == 32 and m["gpt2lab_prompt_tokens_total"] > 0
        assert m["gpt2lab_time_to_first_token_seconds_count"] == 4
        assert m["gpt2lab_inter_token_latency_seconds_count"] > 0
        assert m['gpt2lab_time_to_first_token_seconds_bucket{le="+Inf"}'] == 4
        assert m["gpt2lab_queue_length"] == 0 and m["gpt2lab_batch_size"] == 0
        lines = [r.getMessage() for r in caplog.records if r.name == "gpt2lab.serve"]
        assert len(lines) == 5
        assert all(re.fullmatch(r"request [0-9a-f]{8} POST /v1/chat/completions (200|400) in=\d+ out=\d+"
                                r"( ttft=[0-9.]+s)? total=[0-9.]+s", line) for line in lines), lines
    finally:
        live.stop()


def test_sigterm_finishes_running_streams_then_exits_0(runs, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "gpt2lab", "serve", str(runs["chat"]), "--port", "0",
                             "--device", "cpu", "--grace", "20"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = proc.stdout.readline()
        port = int(re.search(r":(\d+) \(chat page", line).group(1))
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        stream = client.chat.completions.create(model="chat", messages=user("go on"), max_tokens=200,
                                                temperature=0, stream=True)
        pieces = [next(iter(stream))]
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(openai.APIConnectionError):  # no new request is taken
            client.models.list()
        pieces += list(stream)  # the running stream runs to its end
        assert pieces[-1].choices[0].finish_reason in ("length", "stop")
        assert proc.wait(timeout=60) == 0
        assert "request " in proc.stderr.read()  # its log line
    finally:
        proc.kill()


# --------------------------------------------------------------------------- the Responses API


def test_responses_with_the_official_client(runs):
    live = Live(runs["chat"], name="tiny-chat")
    try:
        client = live.client()
        chat = client.chat.completions.create(model="tiny-chat", temperature=0, max_tokens=12, messages=[
            {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}])
        r = client.responses.create(model="tiny-chat", instructions="Be brief.", input="Name a color.",
                                    temperature=0, max_output_tokens=12)
        assert r.output_text == chat.choices[0].message.content and r.status in ("completed", "incomplete")
        assert r.usage.output_tokens == chat.usage.completion_tokens
        assert r.usage.input_tokens == chat.usage.prompt_tokens
        # messages as input, with text parts; streamed: the deltas join to the answer
        items = [{"role": "developer", "content": "Be brief."},
                 {"role": "user", "content": [{"type": "input_text", "text": "Name a color."}]}]
        with client.responses.stream(model="tiny-chat", input=items, temperature=0, max_output_tokens=12) as s:
            events = list(s)
        deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
        # a random model does not stop by itself: the answer is cut at max_output_tokens, as OpenAI says it
        assert events[-1].type == "response.incomplete"
        final = events[-1].response
        assert final.incomplete_details.reason == "max_output_tokens"
        assert "".join(deltas) == final.output_text == r.output_text
        with pytest.raises(openai.BadRequestError, match="keeps no state"):
            client.responses.create(model="tiny-chat", input="x", previous_response_id="resp_1")
        with pytest.raises(openai.BadRequestError, match="tools"):
            client.responses.create(model="tiny-chat", input="x", tools=[{"type": "web_search"}])
    finally:
        live.stop()


def test_a_thinking_section_is_a_reasoning_item(runs):
    live = Live(runs["think"])
    try:
        client = live.client()
        r = client.responses.create(model="think", input=THINK_QUESTION, temperature=0, max_output_tokens=50)
        kinds = [item.type for item in r.output]
        assert kinds == ["reasoning", "message"] and r.status == "completed"
        assert r.output[0].content[0].text == "plan it" and r.output_text == "the answer"
        assert r.usage.output_tokens_details.reasoning_tokens > 0
        with client.responses.stream(model="think", input=THINK_QUESTION, temperature=0,
                                     max_output_tokens=50) as s:
            types = [e.type for e in s]
        assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed"
        assert "response.reasoning_text.delta" in types and "response.output_text.delta" in types
        assert SCRIPT.startswith("<think>")
        status, data, _ = live.request("POST", "/v1/responses", {"input": THINK_QUESTION, "max_output_tokens": 3})
        assert status == 200 and data["status"] == "incomplete"
        assert data["incomplete_details"] == {"reason": "max_output_tokens"}
        json.dumps(data)
    finally:
        live.stop()
