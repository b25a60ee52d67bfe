"""The router's middlewares: errors → responses (the one place), CORS, Bearer/Basic auth, rate limits."""

from __future__ import annotations

import base64
import hmac
import logging
import re
from collections.abc import Awaitable, Callable

from aiohttp import web

from . import dialects
from .errors import ApiError
from .keys import CONFIG, RATE_HEADERS, TOKEN_NAME
from .ratelimit import RATE_LIMITER

log = logging.getLogger("velesio.router")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Paths answered without a token: liveness probes (LLM for Unity v3 polls POST /health) and CORS preflights.
PUBLIC_PATHS = {"/health", "/v1/health"}

# Paths that need a token but do not count against its rate limits.
UNMETERED_PATHS = {"/sdapi/v1/progress"}

# The operator API (router/admin_routes.py): admin tokens only (router.admin_tokens), never the users' tokens.
ADMIN_PREFIX = "/admin"

async def error_response(request: web.Request, err: ApiError) -> web.Response:
    """The error in the shape of the request's dialect (router/dialects)."""
    dialect = await dialects.dialect_of(request)
    response = web.json_response(dialect.error_body(err), status=err.status)
    response.headers.update(err.headers)
    return response


_HTTP_CODES = {400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 413: "payload_too_large", 429: "rate_limited"}


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as err:
        return await error_response(request, err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "internal_error" if exc.status >= 500 else "invalid_request")
        message = {404: f"no route {request.method} {request.path}",
                   405: f"method {request.method} is not allowed on {request.path}",
                   413: "request body too large"}.get(exc.status, exc.reason)
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else {}
        return await error_response(request, ApiError(code, message, status=exc.status, headers=headers))
    except (ConnectionResetError, ConnectionError):
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return await error_response(request, ApiError("internal_error", "internal server error"))


_LOCAL_ORIGIN = re.compile(r"^https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?$")


def origin_allowed(origin: str, origins: list[str]) -> bool:
    """``origin`` is in ``origins``, or ``origins`` has ``"*"`` (any), or ``"localhost"`` and the origin is
    this machine's (``http(s)://localhost``, ``127.0.0.1`` or ``[::1]``, any port: llama.cpp's
    ``--cors-origins localhost``)."""
    return "*" in origins or origin in origins or ("localhost" in origins and bool(_LOCAL_ORIGIN.match(origin)))


@web.middleware
async def cors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    origins = request.app[CONFIG].cors_origins
    origin = request.headers.get("Origin")
    allowed = origin if origin and origin_allowed(origin, origins) else None
    if request.method == "OPTIONS" and request.headers.get("Access-Control-Request-Method"):
        response: web.StreamResponse = web.Response(status=200)  # as llama.cpp answers a preflight
    else:
        response = await handler(request)
    if allowed is not None and not response.prepared:
        response.headers["Access-Control-Allow-Origin"] = allowed
        response.headers["Access-Control-Allow-Credentials"] = "true"
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, PATCH, DELETE, OPTIONS"
        response.headers["Access-Control-Allow-Headers"] = request.headers.get(
            "Access-Control-Request-Headers", "Authorization, Content-Type")
        response.headers["Vary"] = "Origin"
    return response


def presented_token(request: web.Request) -> str | None:
    """Bearer, X-Api-Key, or HTTP Basic with the token as password (webuiapi)."""
    auth = request.headers.get("Authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    if scheme.lower() == "basic" and value.strip():
        try:
            _user, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        return password or None
    return request.headers.get("X-Api-Key") or None


def token_name(tokens: dict[str, str], presented: str | None) -> str | None:
    """Constant-time comparison against every configured token; never logs the token."""
    match = None
    candidate = (presented or "").encode()
    for token, name in tokens.items():
        if hmac.compare_digest(candidate, token.encode()) and presented is not None:
            match = name
    return match


async def admin_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The operator API's scope: an admin token, not rate limited; an API token is refused (403)."""
    cfg = request.app[CONFIG]
    if not cfg.admin_tokens:
        raise ApiError("forbidden", "the admin API is off: give it tokens of its own with router.admin_tokens in "
                                    "mesh.yaml or ADMIN_TOKENS in the environment")
    presented = presented_token(request)
    name = token_name(cfg.admin_tokens, presented)
    if name is None:
        if token_name(cfg.tokens, presented) is not None:
            raise ApiError("forbidden", "an API token cannot use the admin API; it takes an admin token")
        raise ApiError("unauthorized", "invalid or missing admin token",
                       headers={"WWW-Authenticate": 'Bearer realm="velesio-admin"'})
    request[TOKEN_NAME] = name
    return await handler(request)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.method == "OPTIONS" or request.path in PUBLIC_PATHS:
        return await handler(request)
    if request.path == ADMIN_PREFIX or request.path.startswith(ADMIN_PREFIX + "/"):
        return await admin_auth(request, handler)
    tokens = request.app[CONFIG].tokens
    if tokens:
        name = token_name(tokens, presented_token(request))
        if name is None:
            raise ApiError("unauthorized", "invalid or missing API token",
                           headers={"WWW-Authenticate": 'Bearer, Basic realm="velesio"'})
        request[TOKEN_NAME] = name
    else:
        request[TOKEN_NAME] = "anonymous"
    if request.path in UNMETERED_PATHS:  # status polls (A1111 UIs poll progress twice a second)
        return await handler(request)
    limiter = request.app[RATE_LIMITER]
    name = request[TOKEN_NAME]
    headers = limiter.admit(name)
    request[RATE_HEADERS] = headers
    try:
        response = await handler(request)
    except ApiError as err:
        err.headers.update(headers)
        raise
    finally:
        limiter.release(name)
    if not response.prepared:
        response.headers.update(headers)
    return response
