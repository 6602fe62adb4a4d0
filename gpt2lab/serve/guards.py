"""Who may ask the server, and what: the API key, trusted Host names, JSON bodies of bounded size that
arrive in time, the model's name. Each refusal is an OpenAI-shaped error (api.py)."""

from __future__ import annotations

import asyncio
import hmac
import json
import socket

from starlette.responses import JSONResponse

from gpt2lab.serve.api import APIError, bad_request


def trusted_hosts(bound: str, allowed: tuple[str, ...]) -> set[str] | None:
    """The names a request's Host header may give: this machine's loopback names, the address the server
    listens on, and --allowed-host; None (anything) with --allowed-host '*'. A web page on another site
    cannot reach the server through a name of its own (DNS rebinding)."""
    if "*" in allowed:
        return None
    names = {"localhost", "127.0.0.1", "::1", bound.strip("[]").lower()}
    return names | {h.strip("[]").lower() for h in allowed}


def host_allowed(server, host_header: str) -> bool:
    if server.hosts is None:
        return True
    host = host_header.strip().lower()
    if host.startswith("["):  # [::1]:8000
        host = host[1:host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    if host in server.hosts:
        return True
    # an address (not a name) cannot be rebound by DNS; on a wildcard address, any of this machine's addresses
    wildcard = {"0.0.0.0", "::", ""} & server.hosts
    return bool(wildcard) and _is_address(host)


def _is_address(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        return True
    except OSError:
        return False


class GuardHosts:
    """ASGI middleware: a request whose Host is not trusted is answered 403 before it reaches a route."""

    def __init__(self, app, server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
            if not host_allowed(self.server, host):
                error = APIError(403, f"the Host {host[:100]!r} is not one this server answers to; start it with "
                                 "--allowed-host NAME to allow a name", "invalid_request_error", None,
                                 "host_not_allowed")
                await JSONResponse(error.body(), status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def check_key(server, request) -> None:
    if server.api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), server.api_key.encode()):
        raise APIError(401, "a valid API key is required: send `Authorization: Bearer KEY` with the key the server "
                       "was started with (--api-key)", "invalid_request_error", None, "invalid_api_key")


async def read_json(server, request) -> dict:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        # a form or text/plain POST is what another site's page can send without asking: refused
        raise APIError(415, f"the request body must be JSON with `Content-Type: application/json` (got "
                       f"{kind or 'none'!r})", "invalid_request_error", None, "unsupported_media_type")
    length = request.headers.get("content-length")
    too_big = APIError(413, f"the request body is larger than the server's limit of {server.max_body} bytes",
                       "invalid_request_error", None, "request_too_large")
    if length is not None:
        try:
            if int(length) > server.max_body:
                raise too_big
        except ValueError:
            raise bad_request("invalid Content-Length header") from None
    body = bytearray()

    async def read():
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > server.max_body:
                raise too_big

    try:
        await asyncio.wait_for(read(), server.timeout)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {server.timeout:g} s",
                       "invalid_request_error", None, "request_timeout") from None

    def no_constants(name):
        raise ValueError(f"{name} is not valid JSON")

    try:
        data = json.loads(bytes(body), parse_constant=no_constants)
    except (ValueError, RecursionError) as e:
        raise bad_request(f"the request body is not valid JSON ({str(e)[:100]})") from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    return data


def check_model(server, data: dict) -> None:
    model = data.get("model")
    if model is None:
        return
    if not isinstance(model, str):
        raise bad_request("`model` must be text", "model")
    if model != server.name:
        raise APIError(404, f"the model `{model[:100]}` does not exist; this server serves `{server.name}`",
                       "invalid_request_error", "model", "model_not_found")
