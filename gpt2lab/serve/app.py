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
                                `reasoning_content`

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
`application/json`, 503 when the queue is full, 500 when generation itself fails. No request can stop
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
import os
import socket
import sys
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from gpt2lab.checkpoint import open_run
from gpt2lab.device import resolve_device
from gpt2lab.errors import UserError
from gpt2lab.serve import openai
from gpt2lab.serve.api import APIError, check_choices, parse_messages, parse_params, parse_prompts
from gpt2lab.serve.guards import GuardHosts, check_key, check_model, read_json, trusted_hosts
from gpt2lab.templates import get_format

DEFAULT_MAX_BODY = 1 << 20
LOOPBACK = ("127.0.0.1", "localhost", "::1")
PAGE = Path(__file__).resolve().parents[1] / "assets" / "chat.html"


class Server:
    """What the routes share: the model being served and the server's settings."""

    def __init__(self, model, tokenizer, fmt, model_name: str, *, max_batch: int = 32, api_key: str | None = None,
                 max_body: int = DEFAULT_MAX_BODY, cors_origins: tuple[str, ...] = (),
                 allowed_hosts: tuple[str, ...] = (), bound_host: str = "127.0.0.1", timeout: float = 30.0):
        self.served = openai.ServedModel(model, tokenizer, fmt, model_name, max_batch=max_batch)
        self.api_key, self.max_body, self.cors_origins = api_key, max_body, tuple(cors_origins)
        self.hosts = trusted_hosts(bound_host, allowed_hosts)
        self.timeout = timeout  # seconds a client may take to send its body or to read its answer

    @property
    def scheduler(self):
        return self.served.scheduler

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


def _event_stream(run: openai.Run, chunks, include_usage: bool, usage_head: dict) -> StreamingResponse:
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

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _whole(request, run: openai.Run, answer) -> Response:
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
    return JSONResponse(task.result())


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
    run = openai.Run(served, prepared, p, stall_timeout=server.timeout)
    top = openai.head(kind, served)
    if p.stream:
        return _event_stream(run, chunks(run, top), p.include_usage, top)
    return await _whole(request, run, fold(run, top))


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
    if server.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(server.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

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

    app.add_route("/", chat_page, methods=["GET"], include_in_schema=False)
    app.add_route("/health", health, methods=["GET"], include_in_schema=False)
    app.add_route("/v1/models", models, methods=["GET"], include_in_schema=False)
    app.add_route("/v1/models/{model_id:path}", model, methods=["GET"], include_in_schema=False)
    app.add_route("/v1/chat/completions", chat, methods=["POST"], include_in_schema=False)
    app.add_route("/v1/completions", complete, methods=["POST"], include_in_schema=False)
    return app


# --------------------------------------------------------------------------------- the command


def _listen(host: str, port: int):
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UserError(f"--host {host}: cannot resolve it ({e.strerror}); pass an address such as 127.0.0.1") \
            from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port or stop what "
                        "uses it") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(run_dir, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
          api_key: str | None = None, cors_origins: tuple[str, ...] = (), max_batch: int = 32,
          device: str = "auto", dtype: str = "fp32", max_body: int = DEFAULT_MAX_BODY, ready=None,
          allowed_hosts: tuple[str, ...] = (), timeout: float = 30.0, quantize: str | None = None) -> None:
    """Load the run and serve it until interrupted (the `gpt2lab serve` command)."""
    api_key = api_key if api_key is not None else os.environ.get("GPT2LAB_API_KEY")  # (a flag shows in `ps`)
    if api_key is not None and not api_key.strip():
        raise UserError("--api-key is empty; give a key or leave the flag out")
    name = model_name or Path(run_dir).resolve().name
    if not name.strip():
        raise UserError("--model-name is empty")
    info = open_run(run_dir)
    fmt = get_format(info.template)
    model, tok = info.load(resolve_device(device), kind="lm", dtype=dtype, quantize=quantize)
    if tok.eot_id is None:
        raise UserError(f"{run_dir}: the tokenizer has no <|endoftext|> token; gpt2lab serve needs one to end answers")
    sock = _listen(host, port)
    if host not in LOOPBACK and api_key is None:
        print(f"warning: serving on {host} without --api-key: anyone who can reach this machine can use the model",
              file=sys.stderr, flush=True)
    server = Server(model, tok, fmt, name, max_batch=max_batch, api_key=api_key, max_body=max_body,
                    cors_origins=cors_origins, allowed_hosts=allowed_hosts, bound_host=host, timeout=timeout)
    app = create_app(server)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(f"gpt2lab serve: {run_dir} as model {name!r} ({fmt.name} format, context {server.block}, batch up to "
          f"{max_batch}) on http://{shown}:{bound} (chat page at /, API at /v1)", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=3)
    if ready is not None:
        ready(server, bound)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shut down gracefully and passes Ctrl-C on: the usual way to stop
        pass
    print("gpt2lab serve: stopped", flush=True)
