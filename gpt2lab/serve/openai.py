"""The answers of the OpenAI API: a request's prompts queued as jobs on the scheduler, and their events
turned into OpenAI's shapes.

Each endpoint has one function that turns the events into the chunks of a streamed answer
(`chat_chunks`, `completion_chunks`); the whole (non-streamed) answer is those chunks folded together
(`fold_chat`, `fold_completion`), so a streamed and a whole answer can never disagree. The web framework
lives in app.py; the fields of a request are read in api.py.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

from gpt2lab.errors import UserError
from gpt2lab.serve.api import APIError, Params, bad_request
from gpt2lab.serve.metrics import Metrics
from gpt2lab.serve.scheduler import Busy, Failed, Finish, Job, PromptLogprobs, Scheduler, Text
from gpt2lab.templates import PLAIN, TRANSCRIPT, fit_conversation
from gpt2lab.text import ThinkSplitter


@dataclass
class Prepared:
    """One prompt of a request: its ids, the text to echo and how many tokens it may add."""

    ids: list[int]
    echo_text: str
    limit: int
    dropped: int = 0  # the oldest messages of a conversation left out to fit the context


class ServedModel:
    """The model behind the API: its name, tokenizer, chat format and context, and the scheduler that runs it."""

    def __init__(self, model, tokenizer, fmt, name: str, **scheduling):
        if fmt is PLAIN:  # a base model: chat messages become a transcript it continues
            fmt = TRANSCRIPT
        self.tokenizer, self.fmt, self.name = tokenizer, fmt, name
        self.block = model.config.block_size
        self.scheduler = Scheduler(model, tokenizer, **scheduling)
        self.metrics = Metrics()
        self.created = int(time.time())

    def card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "gpt2lab",
                "context_length": self.block, "chat_format": self.fmt.name}

    # prompts ---------------------------------------------------------------------------------

    def _limit(self, n_prompt: int, p: Params, param: str, default: int | None) -> int:
        if n_prompt > self.block:
            raise bad_request(f"the prompt is {n_prompt} tokens long, longer than the model's context of "
                              f"{self.block} tokens; shorten it", param, "context_length_exceeded")
        room = self.block - n_prompt
        if p.max_tokens is not None and p.max_tokens > room:  # refused up front, before it takes a place
            raise bad_request(f"the prompt is {n_prompt} tokens long and max_tokens is {p.max_tokens}: together "
                              f"{n_prompt + p.max_tokens}, past the model's context of {self.block} tokens; ask for "
                              f"at most {room} tokens", "max_tokens", "context_length_exceeded")
        wanted = p.max_tokens if p.max_tokens is not None else (default if default is not None else room)
        if wanted > 0 and room == 0:
            raise bad_request(f"the prompt is {n_prompt} tokens long and fills the model's context of "
                              f"{self.block} tokens; no room is left for an answer", param, "context_length_exceeded")
        return min(wanted, room)

    def prepare_chat(self, messages: list[dict], p: Params) -> Prepared:
        """A conversation kept inside the context as every gpt2lab chat does: the oldest turns go (the system
        message stays) and max_tokens is fitted to what is left; the answer says so (`dropped`)."""
        try:
            fitted = fit_conversation(self.tokenizer, messages, self.fmt, self.block, p.max_tokens)
        except UserError as e:
            raise bad_request(str(e), "messages", "context_length_exceeded" if "context" in str(e) else None) \
                from None
        return Prepared(fitted.ids or [self.tokenizer.eot_id], "", fitted.max_new_tokens, fitted.dropped)

    def prepare_completion(self, prompt, p: Params) -> Prepared:
        tok = self.tokenizer
        if isinstance(prompt, str):
            text, ids = prompt, tok.encode(prompt)
        else:
            bad = [i for i in prompt if not 0 <= i < tok.vocab_size]
            if bad:
                raise bad_request(f"token id {bad[0]} is outside the vocabulary (0..{tok.vocab_size - 1})", "prompt")
            text, ids = tok.decode(prompt), list(prompt)
        if not ids:  # an empty prompt starts a new document, as `gpt2lab generate` does
            ids = [tok.eot_id]
        return Prepared(ids, text, self._limit(len(ids), p, "prompt", 16))

    def token_text(self, token: int) -> tuple[str, bytes]:
        """A token's text and bytes; a token that is not whole UTF-8 (part of a character) is shown as
        "bytes:\\xe2\\x80", as OpenAI does."""
        b = self.tokenizer.decode_bytes([token])
        try:
            return b.decode("utf-8"), b
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{c:02x}" for c in b), b


class Run:
    """A request's jobs on the scheduler, and their events, on the event loop.

    A client that stops reading holds rows of the batch: when its answer has waited unread for
    `stall_timeout` seconds (or `max_unread` events pile up), its jobs are cancelled and their rows freed."""

    def __init__(self, served: ServedModel, prepared: list[Prepared], p: Params, stall_timeout: float = 30.0,
                 max_unread: int = 4096, arrived: float | None = None):
        self.loop = asyncio.get_running_loop()
        self.arrived = arrived if arrived is not None else time.monotonic()
        self.first_token: float | None = None  # seconds from arrival to the first token
        self._last_token: dict[int, float] = {}  # choice -> when its last token came
        self.queue: asyncio.Queue = asyncio.Queue()
        self.stall_timeout, self.max_unread = stall_timeout, max_unread
        self.last_read, self.stalled = time.monotonic(), False
        self.served, self.prepared, self.p = served, prepared, p
        self.finished = 0
        self.total = len(prepared) * p.n
        self.completion_tokens = 0  # of the choices that finished
        self.jobs = []
        try:
            for k, prep in enumerate(prepared):
                job = Job(prep.ids, self._sink(k), max_new_tokens=prep.limit, temperature=p.temperature,
                          top_k=p.top_k, top_p=p.top_p, seed=p.seed, stop=p.stop, n=p.n, logprobs=p.logprobs,
                          prompt_logprobs=p.echo and p.logprobs is not None)
                self.jobs.append(served.scheduler.submit(job))
        except UserError as e:
            self.cancel()
            if isinstance(e, Busy) and e.retry_after is None:
                raise APIError(503, str(e), "server_error", None, "shutting_down") from None
            if isinstance(e, Busy):  # come back later, at once rather than after a growing wait
                raise APIError(429, str(e), "rate_limit_error", None, "server_busy",
                               {"Retry-After": str(e.retry_after)}) from None
            raise bad_request(str(e)) from None

    def _sink(self, k: int):
        def put(event):
            waited = time.monotonic() - self.last_read
            if self.queue.qsize() > self.max_unread or (self.queue.qsize() and waited > self.stall_timeout):
                if not self.stalled:  # the client stopped reading: its rows go back to the batch
                    self.stalled = True
                    self.cancel()
                    event = Failed(f"the client read nothing for {waited:.0f} s; the answer was stopped")
                else:
                    return
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (k, event))
        return put

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel()

    async def events(self):
        """(prompt index, choice index, event) until every choice finished; a failure raises APIError (500)."""
        while self.finished < self.total:
            k, ev = await self.queue.get()
            self.last_read = time.monotonic()
            if isinstance(ev, Failed):
                self.cancel()
                raise APIError(500, ev.message, "server_error", None, "generation_failed")
            if isinstance(ev, Finish):
                self.finished += 1
                self.completion_tokens += ev.completion_tokens
            i = k * self.p.n + getattr(ev, "index", 0)
            if isinstance(ev, Text):
                self._timing(i)
            yield k, i, ev

    def _timing(self, choice: int) -> None:
        now = time.monotonic()
        if self.first_token is None:
            self.first_token = now - self.arrived
            self.served.metrics.ttft.observe(self.first_token)
        last = self._last_token.get(choice)
        if last is not None:
            self.served.metrics.itl.observe(now - last)
        self._last_token[choice] = now

    def usage(self) -> dict:
        prompt = sum(len(x.ids) for x in self.prepared)
        return {"prompt_tokens": prompt, "completion_tokens": self.completion_tokens,
                "total_tokens": prompt + self.completion_tokens}


def head(kind: str, served: ServedModel) -> dict:
    """The fields every chunk of an answer shares."""
    prefix = "chatcmpl" if kind == "chat.completion.chunk" else "cmpl"
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": served.name}


# ------------------------------------------------------------------------------------ chat


def chat_logprobs(served: ServedModel, infos) -> list[dict]:
    out = []
    for t in infos:
        text, b = served.token_text(t.id)
        entry = {"token": text, "logprob": t.logprob, "bytes": list(b), "top_logprobs": []}
        for alt, lp in t.top or []:
            at, ab = served.token_text(alt)
            entry["top_logprobs"].append({"token": at, "logprob": lp, "bytes": list(ab)})
        out.append(entry)
    return out


async def chat_chunks(run: Run, top: dict):
    """The chat answer as chunks: the role first, then reasoning and content pieces (a thinking section
    comes apart as `reasoning_content`), each choice's finish reason last."""
    p, n = run.p, run.p.n
    splitters = [ThinkSplitter() for _ in range(n)]
    yield {**top, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                               "finish_reason": None} for i in range(n)]}
    async for _, i, ev in run.events():
        choice = {"index": i, "delta": {}, "logprobs": None, "finish_reason": None}
        if isinstance(ev, Text):
            reasoning, content = splitters[i].push(ev.text)
        elif isinstance(ev, Finish):
            reasoning, content = splitters[i].flush()
        else:
            continue
        if reasoning:
            choice["delta"]["reasoning_content"] = reasoning
        if content:
            choice["delta"]["content"] = content
        if p.logprobs is not None and getattr(ev, "tokens", None):
            choice["logprobs"] = {"content": chat_logprobs(run.served, ev.tokens)}
        if choice["delta"] or choice["logprobs"]:
            yield {**top, "choices": [choice]}
        if isinstance(ev, Finish):
            yield {**top, "choices": [{"index": i, "delta": {}, "logprobs": None, "finish_reason": ev.reason}]}


async def fold_chat(run: Run, top: dict) -> dict:
    """The whole chat answer: its chunks folded together."""
    n, want_logprobs = run.p.n, run.p.logprobs is not None
    content, reasoning, reasons = [""] * n, [""] * n, [None] * n
    logprobs = [[] for _ in range(n)]
    thinking = [False] * n
    async for chunk in chat_chunks(run, top):
        for c in chunk["choices"]:
            i, delta = c["index"], c["delta"]
            content[i] += delta.get("content") or ""
            if "reasoning_content" in delta:
                reasoning[i] += delta["reasoning_content"]
                thinking[i] = True
            if c["logprobs"]:
                logprobs[i] += c["logprobs"]["content"]
            reasons[i] = c["finish_reason"] or reasons[i]
    choices = []
    for i in range(n):
        message = {"role": "assistant", "content": content[i]}
        if thinking[i]:
            message["reasoning_content"] = reasoning[i]
        choices.append({"index": i, "message": message, "logprobs": {"content": logprobs[i]} if want_logprobs
                        else None, "finish_reason": reasons[i]})
    return {**top, "object": "chat.completion", "choices": choices, "usage": run.usage()}


# ------------------------------------------------------------------------------ completions


class CompletionLogprobs:
    """The legacy completions `logprobs` object, built token by token."""

    def __init__(self, served: ServedModel, offset: int = 0):
        self.served, self.offset = served, offset
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []

    def add(self, infos) -> dict:
        start = len(self.tokens)
        for t in infos:
            text, b = self.served.token_text(t.id)
            self.tokens.append(text)
            self.token_logprobs.append(t.logprob)
            self.top_logprobs.append({self.served.token_text(a)[0]: lp for a, lp in t.top} if t.top else
                                     (None if t.logprob is None else {}))
            self.text_offset.append(self.offset)
            self.offset += len(b.decode("utf-8", errors="ignore"))
        return self.view(start)

    def view(self, start: int = 0) -> dict:
        return {"tokens": self.tokens[start:], "token_logprobs": self.token_logprobs[start:],
                "top_logprobs": self.top_logprobs[start:], "text_offset": self.text_offset[start:]}


async def completion_chunks(run: Run, top: dict):
    """The text completion as chunks: the echoed prompt first (with its logprobs when asked for), then
    text pieces, each choice's finish reason last."""
    p, prepared, served = run.p, run.prepared, run.served
    lps: list[CompletionLogprobs | None] = [None] * run.total
    if p.echo and p.logprobs is None:
        for k, prep in enumerate(prepared):
            for j in range(p.n):
                yield {**top, "choices": [{"index": k * p.n + j, "text": prep.echo_text, "logprobs": None,
                                           "finish_reason": None}]}
    async for k, i, ev in run.events():
        if isinstance(ev, PromptLogprobs):  # the prompt's logprobs (echo)
            for j in range(p.n):
                lp = CompletionLogprobs(served)
                lp.add(ev.tokens)
                lp.offset = len(prepared[k].echo_text)
                lps[k * p.n + j] = lp
                yield {**top, "choices": [{"index": k * p.n + j, "text": prepared[k].echo_text,
                                           "logprobs": lp.view(), "finish_reason": None}]}
            continue
        choice = {"index": i, "text": "", "logprobs": None, "finish_reason": None}
        if isinstance(ev, Text):
            choice["text"] = ev.text
            if p.logprobs is not None:
                if lps[i] is None:
                    lps[i] = CompletionLogprobs(served)
                choice["logprobs"] = lps[i].add(ev.tokens)
        elif isinstance(ev, Finish):
            choice["finish_reason"] = ev.reason
        yield {**top, "choices": [choice]}


async def fold_completion(run: Run, top: dict) -> dict:
    """The whole text completion: its chunks folded together."""
    total, want_logprobs = run.total, run.p.logprobs is not None
    texts, reasons = [""] * total, [None] * total
    logprobs = [{"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []} for _ in range(total)]
    async for chunk in completion_chunks(run, top):
        for c in chunk["choices"]:
            i = c["index"]
            texts[i] += c["text"]
            for key, values in (c["logprobs"] or {}).items():
                logprobs[i][key] += values
            reasons[i] = c["finish_reason"] or reasons[i]
    choices = [{"index": i, "text": texts[i], "logprobs": logprobs[i] if want_logprobs else None,
                "finish_reason": reasons[i]} for i in range(total)]
    return {**top, "choices": choices, "usage": run.usage()}
