"""The generating endpoints of `gpt2lab serve` (gpt2lab/serve.py): a request's body read and checked,
its prompts queued as jobs on the server's scheduler, and their events turned into OpenAI's answer
shapes, collected or streamed as server-sent events.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from typing import TYPE_CHECKING

from gpt2lab.batching import Failed, Finish, PromptLogprobs, Text
from gpt2lab.openai_api import (
    APIError,
    CompletionLogprobs,
    Params,
    ThinkSplitter,
    _bad,
    chat_logprobs,
    parse_messages,
    parse_params,
    parse_prompts,
    sse,
)
from gpt2lab.templates import split_thinking

if TYPE_CHECKING:
    from gpt2lab.serve import Server, _Prepared


def check_key(server: Server, request) -> None:
    if server.api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), server.api_key.encode()):
        raise APIError(401, "a valid API key is required: send `Authorization: Bearer KEY` with the key the server "
                       "was started with (--api-key)", "invalid_request_error", None, "invalid_api_key")


async def read_json(server: Server, request) -> dict:
    length = request.headers.get("content-length")
    too_big = APIError(413, f"the request body is larger than the server's limit of {server.max_body} bytes",
                       "invalid_request_error", None, "request_too_large")
    if length is not None:
        try:
            if int(length) > server.max_body:
                raise too_big
        except ValueError:
            raise _bad("invalid Content-Length header") from None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > server.max_body:
            raise too_big

    def no_constants(name):
        raise ValueError(f"{name} is not valid JSON")

    try:
        data = json.loads(bytes(body), parse_constant=no_constants)
    except (ValueError, RecursionError) as e:
        raise _bad(f"the request body is not valid JSON ({str(e)[:100]})") from None
    if not isinstance(data, dict):
        raise _bad("the request body must be a JSON object")
    return data


def check_model(server: Server, data: dict) -> None:
    model = data.get("model")
    if model is None:
        return
    if not isinstance(model, str):
        raise _bad("`model` must be text", "model")
    if model != server.name:
        raise APIError(404, f"the model `{model[:100]}` does not exist; this server serves `{server.name}`",
                       "invalid_request_error", "model", "model_not_found")


async def _disconnected(request) -> None:
    """Returns when the client goes away (the request's body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class _Run:
    """A request's jobs and their events, on the event loop."""

    def __init__(self, server: Server, prepared: list[_Prepared], p: Params):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.server, self.prepared, self.p = server, prepared, p
        self.jobs = server.submit(prepared, p, self._sink)
        self.finished = 0
        self.total = len(prepared) * p.n
        self.completion_tokens = 0  # of the choices that finished

    def _sink(self, k: int):
        def put(event):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (k, event))
        return put

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel()

    async def events(self):
        """(choice index, event) until every choice finished; a failure raises APIError (500)."""
        while self.finished < self.total:
            k, ev = await self.queue.get()
            if isinstance(ev, Failed):
                self.cancel()
                raise APIError(500, ev.message, "server_error", None, "generation_failed")
            if isinstance(ev, Finish):
                self.finished += 1
                self.completion_tokens += ev.completion_tokens
            index = k * self.p.n + getattr(ev, "index", 0)
            yield k, index, ev

    def usage(self) -> dict:
        prompt = sum(len(x.ids) for x in self.prepared)
        return {"prompt_tokens": prompt, "completion_tokens": self.completion_tokens,
                "total_tokens": prompt + self.completion_tokens}


async def chat_completions(server: Server, request):
    check_key(server, request)
    data = await read_json(server, request)
    check_model(server, data)
    p = parse_params(data, chat=True, max_n=server.scheduler.max_batch)
    messages = parse_messages(data)
    prepared = [await asyncio.to_thread(server.prepare_chat, messages, p)]
    run = _Run(server, prepared, p)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": server.name}
    n = p.n

    if p.stream:
        extra = {"usage": None} if p.include_usage else {}

        async def chunks():
            splitters = [ThinkSplitter() for _ in range(n)]
            yield {**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None} for i in range(n)], **extra}
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
                    choice["logprobs"] = {"content": chat_logprobs(server, ev.tokens)}
                if choice["delta"] or choice["logprobs"]:
                    yield {**head, "choices": [choice], **extra}
                if isinstance(ev, Finish):
                    yield {**head, "choices": [{"index": i, "delta": {}, "logprobs": None, "finish_reason": ev.reason}],
                           **extra}

        return _streaming(run, head, p.include_usage, chunks())

    async def collect():
        texts, reasons, lps = [""] * n, [None] * n, [[] for _ in range(n)]
        async for _, i, ev in run.events():
            if isinstance(ev, Text):
                texts[i] += ev.text
                if p.logprobs is not None:
                    lps[i] += chat_logprobs(server, ev.tokens)
            elif isinstance(ev, Finish):
                reasons[i] = ev.reason
        choices = []
        for i in range(n):
            reasoning, content = split_thinking(texts[i])  # (None, text) when there is no thinking
            message = {"role": "assistant", "content": content}
            if reasoning:
                message["reasoning_content"] = reasoning
            choices.append({"index": i, "message": message,
                            "logprobs": {"content": lps[i]} if p.logprobs is not None else None,
                            "finish_reason": reasons[i]})
        return {"id": rid, "object": "chat.completion", "created": created, "model": server.name,
                "choices": choices, "usage": run.usage()}

    return await _answer(request, run, collect())


async def completions(server: Server, request):
    check_key(server, request)
    data = await read_json(server, request)
    check_model(server, data)
    p = parse_params(data, chat=False, max_n=server.scheduler.max_batch)
    prompts = parse_prompts(data)
    prepared = await asyncio.to_thread(lambda: [server.prepare_completion(x, p) for x in prompts])
    run = _Run(server, prepared, p)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "object": "text_completion", "created": created, "model": server.name}
    total = len(prepared) * p.n

    def echo_lp(k: int, ev) -> CompletionLogprobs:
        lp = CompletionLogprobs(server)
        lp.add(ev.tokens)
        lp.offset = len(prepared[k].echo_text)
        return lp

    if p.stream:
        extra = {"usage": None} if p.include_usage else {}

        async def chunks():
            lps = [None] * total
            if p.echo and p.logprobs is None:
                for k, prep in enumerate(prepared):
                    for j in range(p.n):
                        yield {**head, "choices": [{"index": k * p.n + j, "text": prep.echo_text,
                                                    "logprobs": None, "finish_reason": None}], **extra}
            async for k, i, ev in run.events():
                choice = {"index": i, "text": "", "logprobs": None, "finish_reason": None}
                if isinstance(ev, PromptLogprobs):  # the prompt's logprobs (echo)
                    for j in range(p.n):
                        lp = echo_lp(k, ev)
                        lps[k * p.n + j] = lp
                        yield {**head, "choices": [{"index": k * p.n + j, "text": prepared[k].echo_text,
                                                    "logprobs": lp.view(), "finish_reason": None}], **extra}
                    continue
                if isinstance(ev, Text):
                    choice["text"] = ev.text
                    if p.logprobs is not None:
                        if lps[i] is None:
                            lps[i] = CompletionLogprobs(server)
                        choice["logprobs"] = lps[i].add(ev.tokens)
                elif isinstance(ev, Finish):
                    choice["finish_reason"] = ev.reason
                yield {**head, "choices": [choice], **extra}

        return _streaming(run, head, p.include_usage, chunks())

    async def collect():
        texts = [prepared[i // p.n].echo_text if p.echo else "" for i in range(total)]
        reasons = [None] * total
        lps: list[CompletionLogprobs | None] = [None] * total
        async for k, i, ev in run.events():
            if isinstance(ev, PromptLogprobs):
                for j in range(p.n):
                    lps[k * p.n + j] = echo_lp(k, ev)
            elif isinstance(ev, Text):
                texts[i] += ev.text
                if p.logprobs is not None:
                    if lps[i] is None:
                        lps[i] = CompletionLogprobs(server, len(texts[i]) - len(ev.text))
                    lps[i].add(ev.tokens)
            elif isinstance(ev, Finish):
                reasons[i] = ev.reason
        choices = [{"index": i, "text": texts[i],
                    "logprobs": (lps[i] or CompletionLogprobs(server)).view() if p.logprobs is not None else None,
                    "finish_reason": reasons[i]} for i in range(total)]
        return {**head, "choices": choices, "usage": run.usage()}

    return await _answer(request, run, collect())


def _streaming(run: _Run, head: dict, include_usage: bool, chunks):
    """The answer as server-sent events: each chunk `chunks` yields, the usage chunk when asked for, then
    [DONE]; a failure ends the stream with OpenAI's error body, and however the stream ends (a client
    that goes away included) the run's jobs are cancelled."""
    from starlette.responses import StreamingResponse

    async def body():
        try:
            try:
                async for chunk in chunks:
                    yield sse(chunk)
            except APIError as e:
                yield sse(e.body())
                return
            if include_usage:
                yield sse({**head, "choices": [], "usage": run.usage()})
            yield b"data: [DONE]\n\n"
        finally:
            run.cancel()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _answer(request, run: _Run, collect):
    """The collected answer; if the client leaves first, its jobs are cancelled."""
    from starlette.responses import JSONResponse, Response

    task = asyncio.ensure_future(collect)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            run.cancel()
        gone.cancel()
    if task.cancelled():
        return Response(status_code=499)  # nobody reads it
    return JSONResponse(task.result())
