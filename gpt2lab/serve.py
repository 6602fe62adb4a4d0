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

Requests share decoding steps: a `gpt2lab.batching.Scheduler` runs the model in one worker thread and
rows join and leave its batch between steps; the event loop only parses, queues and writes. A client
that disconnects cancels its job (its rows leave the batch before the next step).

Errors are OpenAI's JSON, {"error": {"message", "type", "param", "code"}}: 400 for malformed JSON or
fields and a prompt past the context, 401 for a missing or wrong key (when --api-key is set), 404 for
an unknown model or path, 413 for a body past --max-body-bytes, 503 when the queue is full, 500 when
generation itself fails. No request can stop the server: a failed step fails its own requests only.

This module holds the server's state, the app and the command; the generating endpoints are in
gpt2lab/routes.py and the API's request fields and answer shapes in gpt2lab/openai_api.py.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from gpt2lab.batching import Busy, Job, Scheduler
from gpt2lab.errors import UserError
from gpt2lab.openai_api import (
    APIError,
    Params,
    _bad,
)
from gpt2lab.routes import chat_completions, check_key, check_model, completions
from gpt2lab.templates import PLAIN, TRANSCRIPT

DEFAULT_MAX_BODY = 1 << 20
LOOPBACK = ("127.0.0.1", "localhost", "::1")


# ------------------------------------------------------------------------------- the server


@dataclass
class _Prepared:
    """One prompt of a request: its ids, the text to echo and how many tokens it may add."""

    ids: list[int]
    echo_text: str
    limit: int


class Server:
    """What the routes share: the model's tokenizer and format, the scheduler, the settings."""

    def __init__(self, model, tokenizer, fmt, model_name: str, *, max_batch: int = 32, api_key: str | None = None,
                 max_body: int = DEFAULT_MAX_BODY, cors_origins: tuple[str, ...] = ()):
        if fmt is PLAIN:  # a base model: chat messages become a transcript it continues
            fmt = TRANSCRIPT
        self.model, self.tokenizer, self.fmt, self.name = model, tokenizer, fmt, model_name
        self.block = model.config.block_size
        self.api_key, self.max_body, self.cors_origins = api_key, max_body, tuple(cors_origins)
        self.scheduler = Scheduler(model, tokenizer, max_batch=max_batch)
        self.created = int(time.time())

    # prompts ---------------------------------------------------------------------------------

    def _limit(self, n_prompt: int, p: Params, param: str, default: int | None) -> int:
        if n_prompt > self.block:
            raise _bad(f"the prompt is {n_prompt} tokens long, longer than the model's context of {self.block} "
                       "tokens; shorten it", param, "context_length_exceeded")
        room = self.block - n_prompt
        wanted = p.max_tokens if p.max_tokens is not None else (default if default is not None else room)
        if wanted > 0 and room == 0:
            raise _bad(f"the prompt is {n_prompt} tokens long and fills the model's context of {self.block} "
                       "tokens; no room is left for an answer", param, "context_length_exceeded")
        return min(wanted, room)

    def prepare_chat(self, messages: list[dict], p: Params) -> _Prepared:
        from gpt2lab.templates import encode_messages

        try:
            ids, _ = encode_messages(self.tokenizer, messages, self.fmt, add_generation_prompt=True)
        except UserError as e:
            raise _bad(str(e), "messages") from None
        if not ids:
            ids = [self.tokenizer.eot_id]
        return _Prepared(ids, "", self._limit(len(ids), p, "messages", None))

    def prepare_completion(self, prompt, p: Params) -> _Prepared:
        tok = self.tokenizer
        if isinstance(prompt, str):
            text, ids = prompt, tok.encode(prompt)
        else:
            bad = [i for i in prompt if not 0 <= i < tok.vocab_size]
            if bad:
                raise _bad(f"token id {bad[0]} is outside the vocabulary (0..{tok.vocab_size - 1})", "prompt")
            text, ids = tok.decode(prompt), list(prompt)
        if not ids:  # an empty prompt starts a new document, as `gpt2lab generate` does
            ids = [tok.eot_id]
        return _Prepared(ids, text, self._limit(len(ids), p, "prompt", 16))

    # running ---------------------------------------------------------------------------------

    def submit(self, prepared: list[_Prepared], p: Params, sink_for) -> list:
        jobs = []
        try:
            for k, prep in enumerate(prepared):
                job = Job(prep.ids, sink_for(k), max_new_tokens=prep.limit, temperature=p.temperature,
                          top_k=p.top_k, top_p=p.top_p, seed=p.seed, stop=p.stop, n=p.n, logprobs=p.logprobs,
                          prompt_logprobs=p.echo and p.logprobs is not None)
                jobs.append(self.scheduler.submit(job))
        except UserError as e:
            for job in jobs:
                job.cancel()
            if isinstance(e, Busy):
                raise APIError(503, str(e), "server_error", None, "server_busy") from None
            raise _bad(str(e)) from None
        return jobs

    def token_text(self, token: int) -> tuple[str, bytes]:
        """A token's text and bytes; a token that is not whole UTF-8 (part of a character) is shown as
        "bytes:\\xe2\\x80", as OpenAI does."""
        b = self.tokenizer.decode_bytes([token])
        try:
            return b.decode("utf-8"), b
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{c:02x}" for c in b), b


# ------------------------------------------------------------------------------- the app


def create_app(server: Server):
    """The FastAPI application of a `Server` (its scheduler starts and stops with the app)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from starlette.exceptions import HTTPException
    from starlette.middleware.cors import CORSMiddleware
    from starlette.responses import HTMLResponse, JSONResponse

    page = (Path(__file__).parent / "assets" / "chat.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(app):
        server.scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(server.scheduler.close)

    app = FastAPI(title="gpt2lab serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.server = server
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

    def model_card() -> dict:
        return {"id": server.name, "object": "model", "created": server.created, "owned_by": "gpt2lab",
                "context_length": server.block, "chat_format": server.fmt.name}

    async def models(request):
        check_key(server, request)
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model(request):
        check_key(server, request)
        check_model(server, {"model": request.path_params["model_id"]})
        return JSONResponse(model_card())

    async def chat(request):
        return await chat_completions(server, request)

    async def complete(request):
        return await completions(server, request)

    app.add_route("/", chat_page, methods=["GET"], include_in_schema=False)
    app.add_route("/health", health, methods=["GET"], include_in_schema=False)
    app.add_route("/v1/models", models, methods=["GET"], include_in_schema=False)
    app.add_route("/v1/models/{model_id:path}", model, methods=["GET"], include_in_schema=False)
    app.add_route("/v1/chat/completions", chat, methods=["POST"], include_in_schema=False)
    app.add_route("/v1/completions", complete, methods=["POST"], include_in_schema=False)
    return app


# --------------------------------------------------------------------------------- the command


def _listen(host: str, port: int):
    import socket

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
          device: str = "auto", dtype: str = "fp32", max_body: int = DEFAULT_MAX_BODY, ready=None) -> None:
    """Load the run and serve it until interrupted (the `gpt2lab serve` command)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise UserError("gpt2lab serve needs FastAPI and uvicorn: pip install 'gpt2lab[serve]'") from None
    import torch

    from gpt2lab.checkpoint import load_run, open_run
    from gpt2lab.distributed import resolve_device
    from gpt2lab.templates import get_format

    api_key = api_key if api_key is not None else os.environ.get("GPT2LAB_API_KEY")  # (a flag shows in `ps`)
    if api_key is not None and not api_key.strip():
        raise UserError("--api-key is empty; give a key or leave the flag out")
    name = model_name or Path(run_dir).resolve().name
    if not name.strip():
        raise UserError("--model-name is empty")
    fmt = get_format(open_run(run_dir).template)
    model, tok = load_run(run_dir, device=resolve_device(device), kind="lm")
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    if tok.eot_id is None:
        raise UserError(f"{run_dir}: the tokenizer has no <|endoftext|> token; gpt2lab serve needs one to end answers")
    sock = _listen(host, port)
    if host not in LOOPBACK and api_key is None:
        print(f"warning: serving on {host} without --api-key: anyone who can reach this machine can use the model",
              file=sys.stderr, flush=True)
    server = Server(model, tok, fmt, name, max_batch=max_batch, api_key=api_key, max_body=max_body,
                    cors_origins=cors_origins)
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
