"""`gpt2lab serve`: an OpenAI-compatible HTTP server for a run, with a chat page.

    gpt2lab serve RUN [--host 127.0.0.1] [--port 8000] [--model-name NAME] [--api-key KEY]

Endpoints (FastAPI on uvicorn, the optional extra `gpt2lab[serve]`):

    GET  /                      the chat page (gpt2lab/assets/chat.html: one static file, works offline)
    GET  /health                {"status": "ok", ...} and the batch's counters (no key needed)
    GET  /v1/models             the one model: its id is --model-name or the run dir's name
    POST /v1/completions        prompt: text, texts, token ids or lists of them; echo; logprobs (0-20)
    POST /v1/chat/completions   messages in the run's chat format (a base model: a transcript, "User: ...
                                Assistant:", templates.TRANSCRIPT); logprobs / top_logprobs; a thinking section
                                (<think>...</think> at the start of the answer) comes back apart, as
                                `reasoning_content`; a conversation longer than the context loses its oldest
                                turns (the system message stays; the X-Dropped-Messages header counts them)
    POST /v1/responses          the Responses API, stateless (responses.py)
    GET  /metrics               Prometheus text: requests, tokens, queue, batch, latencies (metrics.py)

Both take max_tokens / max_completion_tokens (capped by what the context leaves), temperature (0 is
greedy), top_p, top_k (an extra), stop (a string or a list; the stop text is not returned), n, seed and
stream (server-sent events in OpenAI's chunk format ending with `data: [DONE]`; stream_options.
include_usage adds a last chunk with the usage). Every answer carries `usage`.

Serving points one way: this module (routes, auth, limits, the event stream) -> openai.py (the answers'
shapes) and api.py (the requests' fields) -> scheduler.py (continuous batching) -> the model's forward.
Requests share decoding steps: the scheduler runs the model in one worker thread and rows join and leave
its batch between steps; the event loop only parses, queues and writes. A client that disconnects
cancels its job (its rows leave the batch before the next step).

Errors are OpenAI's JSON, {"error": {"message", "type", "param", "code"}}, on every path: 400 for
malformed JSON or fields and a prompt past the context, 401 for a missing or wrong key (when --api-key is
set), 403 for a Host the server does not answer to, 404 for an unknown model or path, 408 for a body that
does not arrive within --timeout, 413 for a body past --max-body-bytes, 415 for a body that is not
`application/json`, 429 with Retry-After when --max-queue requests already wait, 503 while shutting down,
500 when generation itself fails. No request can stop
the server or fail another's: a failed step or sample fails its own rows only.

What the defaults protect against, for a server on this machine: other sites' pages in a browser (a
Host it does not know is refused, so DNS rebinding cannot read answers; a POST must be JSON, which a
page cannot send to another origin without a CORS preflight this server does not grant unless
--cors-origin says so); one client filling the server (at most 64 choices a request, bodies up to
--max-body-bytes); clients that stall (a body must arrive, and an answer be read, within --timeout
seconds, or the request ends and its rows are freed).
"""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from gpt2lab.serve import openai, responses
from gpt2lab.serve.api import APIError, check_choices, parse_messages, parse_params, parse_prompts
from gpt2lab.serve.guards import GuardHosts, check_key, check_model, read_json, trusted_hosts
from gpt2lab.serve.metrics import RequestLog
from gpt2lab.serve.scheduler import MAX_QUEUE, PREFIX_CACHE_BYTES

DEFAULT_MAX_BODY = 1 << 20
PAGE = Path(__file__).resolve().parents[1] / "assets" / "chat.html"


class Server:
    """What the routes share: the model being served and the server's settings."""

    def __init__(self, model, tokenizer, fmt, model_name: str, *, max_batch: int = 32, api_key: str | None = None,
                 max_body: int = DEFAULT_MAX_BODY, cors_origins: tuple[str, ...] = (),
                 allowed_hosts: tuple[str, ...] = (), bound_host: str = "127.0.0.1", timeout: float = 30.0,
                 max_queue: int = MAX_QUEUE, prefix_cache_bytes: int = PREFIX_CACHE_BYTES):
        self.served = openai.ServedModel(model, tokenizer, fmt, model_name, max_batch=max_batch, max_queue=max_queue,
                                         prefix_cache_bytes=prefix_cache_bytes)
        self.api_key, self.max_body, self.cors_origins = api_key, max_body, tuple(cors_origins)
        self.hosts = trusted_hosts(bound_host, allowed_hosts)
        self.timeout = timeout  # seconds a client may take to send its body or to read its answer

    @property
    def scheduler(self):
        return self.served.scheduler

    @property
    def metrics(self):
        return self.served.metrics

    @property
    def name(self) -> str:
        return self.served.name

    @property
    def block(self) -> int:
        return self.served.block

    @property
    def fmt(self):
        return self.served.fmt


# ---------------------------------------------------------------------------------- answers


async def _disconnected(request) -> None:
    """Returns when the client goes away (the request's body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def sse(obj) -> bytes:
    """One server-sent event of a JSON object."""
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def _typed_events(run: openai.Run, events, headers: dict) -> StreamingResponse:
    """The Responses API's stream: each event as `event: TYPE` and its JSON, no [DONE]; a failure is an
    `error` event. However it ends, the run's jobs are cancelled."""

    async def body():
        try:
            try:
                async for event in events:
                    yield f"event: {event['type']}\n".encode() + sse(event)
            except APIError as e:
                yield b"event: error\n" + sse(responses.error_event(e))
            except Exception as e:  # noqa: BLE001 - the headers are sent: the error goes into the stream
                yield b"event: error\n" + sse(responses.error_event(APIError(500, f"internal error: "
                                                                              f"{type(e).__name__}", "server_error")))
        finally:
            run.cancel()

    return StreamingResponse(body(), media_type="text/event-stream", headers={**headers, **NO_BUFFERING})


NO_BUFFERING = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _event_stream(run: openai.Run, chunks, include_usage: bool, usage_head: dict,
                  headers: dict | None = None) -> StreamingResponse:
    """The one streaming envelope of every endpoint: each chunk as a server-sent event (with "usage": null
    when the usage was asked for), then the usage chunk, then [DONE]; a failure ends the stream with
    OpenAI's error body, and however the stream ends (a client that goes away included) the run's jobs are
    cancelled."""

    async def body():
        try:
            try:
                async for chunk in chunks:
                    yield sse({**chunk, "usage": None} if include_usage else chunk)
            except APIError as e:
                yield sse(e.body())
                return
            except Exception as e:  # noqa: BLE001 - the headers are sent: the error goes into the stream
                yield sse(APIError(500, f"internal error: {type(e).__name__}", "server_error").body())
                return
            if include_usage:
                yield sse({**usage_head, "choices": [], "usage": run.usage()})
            yield b"data: [DONE]\n\n"
        finally:
            run.cancel()

    return StreamingResponse(body(), media_type="text/event-stream", headers={**(headers or {}), **NO_BUFFERING})


async def _whole(request, run: openai.Run, answer, headers: dict | None = None) -> Response:
    """The whole answer; if the client leaves first, its jobs are cancelled."""
    task = asyncio.ensure_future(answer)
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
    return JSONResponse(task.result(), headers=headers)


def _fitted(prepared: list[openai.Prepared]) -> dict:
    """The header that says a conversation was shortened to fit the context."""
    dropped = sum(p.dropped for p in prepared)
    return {"X-Dropped-Messages": str(dropped)} if dropped else {}


async def _answer(server: Server, request, chat: bool) -> Response:
    check_key(server, request)
    data = await read_json(server, request)
    check_model(server, data)
    served = server.served
    p = parse_params(data, chat=chat, max_n=served.scheduler.max_batch)
    if chat:
        messages = parse_messages(data)
        check_choices(1, p.n)
        prepared = [await asyncio.to_thread(served.prepare_chat, messages, p)]
        kind, chunks, fold = "chat.completion.chunk", openai.chat_chunks, openai.fold_chat
    else:
        prompts = parse_prompts(data)
        check_choices(len(prompts), p.n)
        prepared = await asyncio.to_thread(lambda: [served.prepare_completion(x, p) for x in prompts])
        kind, chunks, fold = "text_completion", openai.completion_chunks, openai.fold_completion
    run = _start(server, request, prepared, p)
    top = openai.head(kind, served)
    if p.stream:
        return _event_stream(run, chunks(run, top), p.include_usage, top, _fitted(prepared))
    return await _whole(request, run, fold(run, top), _fitted(prepared))


def _start(server: Server, request, prepared, p) -> openai.Run:
    run = openai.Run(server.served, prepared, p, stall_timeout=server.timeout, arrived=request.state.arrived)
    request.state.run = run  # for the request's log line
    return run


async def _respond(server: Server, request) -> Response:
    """POST /v1/responses: the Responses API over the same chat prompt and batch."""
    check_key(server, request)
    data = await read_json(server, request)
    check_model(server, data)
    messages, p = responses.parse_request(data, server.scheduler.max_batch)
    prepared = [await asyncio.to_thread(server.served.prepare_chat, messages, p)]
    run = _start(server, request, prepared, p)
    if p.stream:
        return _typed_events(run, responses.response_events(run, data), _fitted(prepared))
    return await _whole(request, run, responses.fold_response(run, data), _fitted(prepared))


# ------------------------------------------------------------------------------------ the app


def create_app(server: Server):
    """The FastAPI application of a `Server` (its scheduler starts and stops with the app)."""
    page = PAGE.read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(app):
        server.scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(server.scheduler.close)

    app = FastAPI(title="gpt2lab serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.server = server
    app.add_middleware(GuardHosts, server=server)
    app.add_middleware(RequestLog, metrics=server.metrics)
    if server.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(server.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        message = f"{request.method} {request.url.path}: {e.detail}"
        return JSONResponse(APIError(e.status_code, message, "invalid_request_error", None, code).body(),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}", "server_error").body(),
                            status_code=500)

    # plain Starlette-style routes (the handler gets the Request): the bodies are parsed and checked here, so
    # that every mistake is answered in OpenAI's error shape
    async def chat_page(request):
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    async def health(request):
        return JSONResponse({"status": "ok", "model": server.name, **server.scheduler.stats()})

    async def metrics(request):
        return Response(server.metrics.render(server.scheduler.stats()),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    async def models(request):
        check_key(server, request)
        return JSONResponse({"object": "list", "data": [server.served.card()]})

    async def model(request):
        check_key(server, request)
        check_model(server, {"model": request.path_params["model_id"]})
        return JSONResponse(server.served.card())

    async def chat(request):
        return await _answer(server, request, chat=True)

    async def complete(request):
        return await _answer(server, request, chat=False)

    async def respond(request):
        return await _respond(server, request)

    app.add_route("/", chat_page, methods=["GET"], include_in_schema=False)
    app.add_route("/health", health, methods=["GET"], include_in_schema=False)
    app.add_route("/v1/models", models, methods=["GET"], include_in_schema=False)
    app.add_route("/v1/models/{model_id:path}", model, methods=["GET"], include_in_schema=False)
    app.add_route("/v1/chat/completions", chat, methods=["POST"], include_in_schema=False)
    app.add_route("/v1/completions", complete, methods=["POST"], include_in_schema=False)
    app.add_route("/v1/responses", respond, methods=["POST"], include_in_schema=False)
    app.add_route("/metrics", metrics, methods=["GET"], include_in_schema=False)
    return app
