"""Python client for the Velesio AI Server API.

``Client`` uses the standard library only; ``AsyncClient`` uses aiohttp. Both offer ``complete``, ``chat``,
``stream_complete``, ``stream_chat`` (iterators of text pieces), ``txt2img``, ``img2img``, ``health``,
``models`` and ``queue_status``; errors raise ``VelesioError`` subclasses named after the API's error codes,
and 429/503 answers are retried (``max_retries`` times) after their ``Retry-After``::

    from velesio.client import Client
    client = Client("http://localhost:8000", "your-token")
    print(client.complete("Explain AI:", max_tokens=100).text)
    for piece in client.stream_chat([{"role": "user", "content": "Hi"}]):
        print(piece, end="", flush=True)
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import io
import json
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

__all__ = ["Client", "AsyncClient", "Completion", "ImageResult", "VelesioError", "Unauthorized", "InvalidRequest",
           "ModelNotFound", "RateLimited", "QueueFull", "ServiceUnavailable", "InternalError", "make_error",
           "encode_image"]


class VelesioError(Exception):
    """An error answer: ``status`` (HTTP status, 0 when no answer came), ``code`` (e.g. ``model_not_found``),
    ``message``, ``details``; ``retry_after`` (seconds) when the server gave one."""

    def __init__(self, status: int, code: str, message: str, details: Any = None, *,
                 retry_after: float | None = None, body: Any = None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.details = status, code, message, details
        self.retry_after, self.body = retry_after, body


class Unauthorized(VelesioError):
    """401: invalid or missing API token."""


class InvalidRequest(VelesioError):
    """400: the request was invalid."""


class ModelNotFound(VelesioError):
    """404: the requested model is not available."""


class RateLimited(VelesioError):
    """429: too many requests for this token."""


class ServiceUnavailable(VelesioError):
    """503: no worker, busy or shutting down."""


class QueueFull(ServiceUnavailable):
    """503: the job queue is at capacity."""


class InternalError(VelesioError):
    """5xx: a server error."""


# code -> (HTTP status, class); codes the router may send that are not listed fall back on the status
_CODES: dict[str, tuple[int, type]] = {
    "invalid_request": (400, InvalidRequest), "context_exceeded": (400, InvalidRequest),
    "unauthorized": (401, Unauthorized), "model_not_found": (404, ModelNotFound), "rate_limited": (429, RateLimited),
    "queue_full": (503, QueueFull), "no_worker": (503, ServiceUnavailable), "busy": (503, ServiceUnavailable),
    "shutting_down": (503, ServiceUnavailable), "internal_error": (500, InternalError)}
_STATUS_CODES = {400: "invalid_request", 401: "unauthorized", 404: "not_found", 429: "rate_limited",
                 503: "service_unavailable"}
_STATUS_CLASSES = {400: InvalidRequest, 401: Unauthorized, 429: RateLimited, 503: ServiceUnavailable}
RETRY_STATUSES = (429, 503)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:  # an HTTP date
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _error_of(status: int, raw: bytes, retry_after: str | None) -> VelesioError:
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = raw.decode("utf-8", "replace")
    return make_error(status, parsed, _retry_after(retry_after))


def make_error(status: int, body: Any, retry_after: float | None = None) -> VelesioError:
    """The typed error for an answer; reads the seed/OpenAI, llama.cpp (int code) and A1111 error shapes."""
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        code, message, details = err.get("code"), err.get("message", ""), err.get("details")
    else:
        code, details = None, None
        message = (body.get("detail") or err) if isinstance(body, dict) else (body or "")
    if isinstance(code, int) and not status:
        status = code  # llama.cpp's shape: the HTTP status as code
    if not isinstance(code, str):
        code = _STATUS_CODES.get(status) or ("internal_error" if status >= 500 else "error")
    known_status, cls = _CODES.get(code, (0, None))
    status = status or known_status
    cls = cls or _STATUS_CLASSES.get(status) or (InternalError if status >= 500 else VelesioError)
    return cls(status, code, str(message), details, retry_after=retry_after, body=body)


class Completion(dict):
    """The JSON answer of a text route (a dict, as the seed's snippet returns) plus ``.text``."""

    @property
    def text(self) -> str:
        choice = (self.get("choices") or [{}])[0]
        if "message" in choice:
            return choice["message"].get("content") or ""
        return choice.get("text", self.get("content", ""))

    @property
    def finish_reason(self) -> str | None:
        return (self.get("choices") or [{}])[0].get("finish_reason")

    @property
    def usage(self) -> dict[str, int]:
        return self.get("usage") or {}


class ImageResult:
    """An A1111 answer: ``images`` (PNG bytes), ``parameters`` (dict), ``info`` (parsed JSON), ``raw``."""

    def __init__(self, raw: dict[str, Any]):
        self.raw = raw
        self.images = [base64.b64decode(img.split(",", 1)[1] if img.startswith("data:") else img)
                       for img in raw.get("images") or []]
        self.parameters = raw.get("parameters") or {}
        info = raw.get("info")
        try:
            self.info = json.loads(info) if isinstance(info, str) else info
        except ValueError:
            self.info = info

    def pil_images(self) -> list[Any]:
        from PIL import Image  # optional: pip install pillow

        return [Image.open(io.BytesIO(data)) for data in self.images]


def encode_image(image: Any) -> str:
    """bytes, a PIL image or a base64 string (data URIs too) → base64 for ``init_images``."""
    if isinstance(image, str):
        return image
    if hasattr(image, "save"):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        image = buf.getvalue()
    return base64.b64encode(bytes(image)).decode("ascii")


def _piece(event: dict[str, Any]) -> str:
    """The text of one stream event (seed/OpenAI completion or chat chunk, or llama.cpp's ``content``)."""
    choices = event.get("choices")
    if choices is None:
        return event.get("content") or ""
    if not choices:  # the usage chunk
        return ""
    return (choices[0].get("delta") or {}).get("content") or choices[0].get("text") or ""


_DONE: dict[str, Any] = {}


def _parse_line(line: bytes | str) -> dict[str, Any] | None:
    """One SSE line → its event; None for blank, comment and other lines; ``_DONE`` at ``[DONE]``."""
    if isinstance(line, bytes):
        line = line.decode("utf-8")
    line = line.rstrip("\r\n")
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return _DONE
    event = json.loads(data)
    if isinstance(event, dict) and event.get("error"):
        raise make_error(0, event)
    return event


class _Base:
    """``base_url``: one router, or several (a list, or comma-separated) serving the same mesh: a request
    that cannot reach one router, or that it answers 429/503, is retried on the next (docs/deployment.md
    "Several routers")."""

    def __init__(self, base_url: str | Sequence[str] = "http://localhost:8000", token: str | None = None, *,
                 model: str | None = None, timeout: float = 120.0, max_retries: int = 2,
                 max_retry_wait: float = 30.0):
        urls = base_url.split(",") if isinstance(base_url, str) else list(base_url)
        self.base_urls = [u.strip().rstrip("/") for u in urls if u.strip()]
        if not self.base_urls:
            raise ValueError("base_url: at least one router URL")
        self._router = 0  # the router requests go to; moves on when one fails
        self.token, self.model, self.timeout = token, model, timeout
        self.max_retries, self.max_retry_wait = max_retries, max_retry_wait

    @property
    def base_url(self) -> str:
        return self.base_urls[self._router]

    def _attempts(self) -> int:
        """Tries per request: the retries, and at least one on each router."""
        return max(self.max_retries, len(self.base_urls) - 1) + 1

    def _unreachable(self, exc: BaseException, attempt: int) -> VelesioError | None:
        """A connection error: move on to the next router and return None to retry there, or the error to
        raise (one router only, or every try spent)."""
        err = VelesioError(0, "connection_error", str(getattr(exc, "reason", exc)) or type(exc).__name__)
        if len(self.base_urls) == 1 or attempt + 1 >= self._attempts():
            return err
        self._router = (self._router + 1) % len(self.base_urls)
        return None

    def _headers(self, stream: bool = False) -> dict[str, str]:
        headers = {"Content-Type": "application/json",
                   "Accept": "text/event-stream" if stream else "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def _wait(self, err: VelesioError, attempt: int) -> float | None:
        """Seconds to sleep before retrying ``err`` (on the next router, when there are several), or None to
        raise it."""
        if err.status not in RETRY_STATUSES or attempt + 1 >= self._attempts():
            return None
        if len(self.base_urls) > 1:
            self._router = (self._router + 1) % len(self.base_urls)
            return 0.0 if attempt < len(self.base_urls) - 1 else min(0.5 * 2**attempt, self.max_retry_wait)
        wait = err.retry_after if err.retry_after is not None else 0.5 * 2**attempt
        return min(wait, self.max_retry_wait)

    def _text_body(self, key: str, value: Any, params: dict[str, Any], stream: bool) -> dict[str, Any]:
        body = {key: value, **params, "stream": stream}
        if self.model and "model" not in params:
            body["model"] = self.model
        return body

    # The API; on AsyncClient the methods return awaitables and the streams are async iterators.
    def complete(self, prompt: str, **params: Any) -> Completion:
        """POST /completion: ``.text`` and the seed's JSON (``result["choices"][0]["text"]``)."""
        return self._call(Completion, "POST", "/completion", self._text_body("prompt", prompt, params, False))

    def chat(self, messages: list[dict[str, str]], **params: Any) -> Completion:
        return self._call(Completion, "POST", "/chat/completions", self._text_body("messages", messages, params,
                                                                                     False))

    def stream_complete(self, prompt: str, **params: Any) -> Iterator[str]:
        return self._stream("/completion", self._text_body("prompt", prompt, params, True))

    def stream_chat(self, messages: list[dict[str, str]], **params: Any) -> Iterator[str]:
        return self._stream("/chat/completions", self._text_body("messages", messages, params, True))

    def txt2img(self, prompt: str, **params: Any) -> ImageResult:
        return self._call(ImageResult, "POST", "/sdapi/v1/txt2img", {"prompt": prompt, **params})

    def img2img(self, init_images: Any, prompt: str, **params: Any) -> ImageResult:
        """``init_images``: PNG/JPEG bytes, PIL images or base64 strings (one or a list)."""
        if not isinstance(init_images, (list, tuple)):
            init_images = [init_images]
        body = {"init_images": [encode_image(i) for i in init_images], "prompt": prompt, **params}
        return self._call(ImageResult, "POST", "/sdapi/v1/img2img", body)

    def health(self) -> dict[str, Any]:
        return self._call(dict, "GET", "/health")

    def models(self) -> dict[str, Any]:
        return self._call(dict, "GET", "/models")

    def queue_status(self) -> dict[str, Any]:
        return self._call(dict, "GET", "/queue/status")

    def _call(self, wrap: Any, method: str, path: str, body: Any = None) -> Any:
        raise NotImplementedError

    def _stream(self, path: str, body: dict[str, Any]) -> Any:
        raise NotImplementedError


class Client(_Base):
    """Synchronous client (standard library only)."""

    def _open(self, method: str, path: str, body: Any = None, stream: bool = False) -> Any:
        data = None if body is None else json.dumps(body).encode()
        for attempt in range(self._attempts()):
            req = urllib.request.Request(self.base_url + path, data=data, method=method,
                                         headers=self._headers(stream))
            try:
                return urllib.request.urlopen(req, timeout=self.timeout)
            except urllib.error.HTTPError as exc:
                err = _error_of(exc.code, exc.read(), exc.headers.get("Retry-After"))
            except (urllib.error.URLError, OSError) as exc:
                unreachable = self._unreachable(exc, attempt)
                if unreachable is not None:
                    raise unreachable from exc
                continue
            wait = self._wait(err, attempt)
            if wait is None:
                raise err
            time.sleep(wait)
        raise AssertionError("unreachable")

    def _call(self, wrap: Any, method: str, path: str, body: Any = None) -> Any:
        with self._open(method, path, body) as resp:
            return wrap(json.loads(resp.read()))

    def _stream(self, path: str, body: dict[str, Any]) -> Iterator[str]:
        with self._open("POST", path, body, stream=True) as resp:
            try:
                for line in resp:
                    event = _parse_line(line)
                    if event is _DONE:
                        return
                    if event and (piece := _piece(event)):
                        yield piece
            except OSError as exc:  # a read timeout or a dropped connection
                raise VelesioError(0, "connection_error", str(exc) or type(exc).__name__) from exc


class AsyncClient(_Base):
    """Asynchronous client on aiohttp; use ``async with AsyncClient(...) as client`` or call ``close()``."""

    _session: Any = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _open(self, method: str, path: str, body: Any = None, stream: bool = False) -> Any:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(
                total=None, connect=self.timeout, sock_read=self.timeout))
        for attempt in range(self._attempts()):
            try:
                resp = await self._session.request(method, self.base_url + path, json=body,
                                                   headers=self._headers(stream))
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                unreachable = self._unreachable(exc, attempt)
                if unreachable is not None:
                    raise unreachable from exc
                continue
            if resp.status < 400:
                return resp
            async with resp:
                err = _error_of(resp.status, await resp.read(), resp.headers.get("Retry-After"))
            wait = self._wait(err, attempt)
            if wait is None:
                raise err
            await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    async def _call(self, wrap: Any, method: str, path: str, body: Any = None) -> Any:
        async with await self._open(method, path, body) as resp:
            return wrap(json.loads(await resp.read()))

    async def _stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[str]:
        import aiohttp

        async with await self._open("POST", path, body, stream=True) as resp:
            try:
                async for line in resp.content:
                    event = _parse_line(line)
                    if event is _DONE:
                        return
                    if event and (piece := _piece(event)):
                        yield piece
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                raise VelesioError(0, "connection_error", str(exc) or type(exc).__name__) from exc
