"""velesio-openai-upstream: serve a model of another OpenAI-compatible server through the Velesio mesh.

A third-party backend plugin: it is found through its ``velesio.backends`` entry point and uses only the
standard library for HTTP, so it adds no dependency to a worker. mesh.yaml::

    models:
      - name: smollm2-upstream
        backend: openai-upstream
        slots: 4                              # concurrent requests sent upstream
        options:
          base_url: http://127.0.0.1:8080/v1  # the upstream API root (the part before /chat/completions)
          api_key: sk-...                     # optional; or api_key_env: NAME_OF_ENV_VAR
          upstream_model: smollm2             # the model id sent upstream; default: the name above
          timeout_s: 600                      # connect and per-read timeout
          n_ctx: 2048                         # optional, advertised to the router
          llama_params: false                 # true: also send top_k, min_p, repeat_penalty (llama.cpp)
          include_usage: true                 # ask for usage in the stream (stream_options)
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

from velesio.backends import (
    Backend,
    BackendError,
    Cancelled,
    ContextExceeded,
    InvalidRequest,
    JobContext,
    ModelConfig,
    NotSupported,
    TextParams,
    TextResult,
)
from velesio.mesh.jobs import Job

__version__ = "0.1.0"
__all__ = ["OpenAIUpstreamBackend", "UpstreamError", "iter_sse"]


class UpstreamError(BackendError):
    """The upstream server failed or could not be reached."""

    code = "internal_error"


def iter_sse(lines: Iterator[bytes]) -> Iterator[str]:
    """Yield the ``data`` of each server-sent event read from ``lines`` (bytes, with line endings)."""
    data: list[str] = []
    for raw in lines:
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):
            continue  # comment / keep-alive
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "data":
            data.append(value)
    if data:
        yield "\n".join(data)


def _error_message(status: int, body: bytes) -> str:
    try:
        err = json.loads(body)
        if isinstance(err, dict):
            e = err.get("error", err)
            if isinstance(e, dict):
                return str(e.get("message") or e.get("detail") or e)
            return str(e if e is not err else err.get("detail", err))
    except ValueError:
        pass
    return body.decode("utf-8", errors="replace")[:500] or f"HTTP {status}"


class OpenAIUpstreamBackend(Backend):
    name = "openai-upstream"
    kind = "text"
    operations = ("completion", "chat")

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        opts = config.options or {}
        base = opts.get("base_url")
        if not base:
            raise BackendError(f"model '{config.name}': the openai-upstream backend needs options.base_url "
                               f"(e.g. http://127.0.0.1:8080/v1)")
        url = urllib.parse.urlsplit(str(base).rstrip("/"))
        if url.scheme not in ("http", "https") or not url.hostname:
            raise BackendError(f"model '{config.name}': options.base_url must be an http(s) URL, not {base!r}")
        self.base_url = str(base).rstrip("/")
        self._url = url
        key = opts.get("api_key")
        if not key and opts.get("api_key_env"):
            key = os.environ.get(str(opts["api_key_env"]))
        self.api_key: str | None = key or None
        self.upstream_model = str(opts.get("upstream_model") or config.name)
        self.timeout_s = float(opts.get("timeout_s", 600))
        self.llama_params = bool(opts.get("llama_params", False))
        self.include_usage = bool(opts.get("include_usage", True))
        self.n_ctx = opts.get("n_ctx")

    # -- HTTP -------------------------------------------------------------------------------------------

    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._url.scheme == "https" else http.client.HTTPConnection
        return cls(self._url.hostname, self._url.port, timeout=timeout)

    def _headers(self, stream: bool = False) -> dict[str, str]:
        h = {"Accept": "text/event-stream" if stream else "application/json",
             "User-Agent": f"velesio-openai-upstream/{__version__}"}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h

    def _path(self, endpoint: str) -> str:
        return (self._url.path or "") + endpoint

    # -- contract ---------------------------------------------------------------------------------------

    def load(self) -> dict[str, Any]:
        conn = self._connect(min(self.timeout_s, 10.0))
        try:
            conn.request("GET", self._path("/models"), headers=self._headers())
            resp = conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise UpstreamError(f"model '{self.config.name}': cannot reach the upstream at {self.base_url}/models "
                                f"({type(e).__name__}: {e}); start the upstream server or fix options.base_url") from e
        finally:
            conn.close()
        if resp.status in (401, 403):
            raise UpstreamError(f"model '{self.config.name}': {self.base_url} refused the API key (HTTP "
                                f"{resp.status}); set options.api_key or options.api_key_env")
        if resp.status != 200:
            raise UpstreamError(f"model '{self.config.name}': GET {self.base_url}/models answered HTTP "
                                f"{resp.status}: {_error_message(resp.status, body)}; is options.base_url the API "
                                f"root (ending in /v1)?")
        try:
            ids = [m.get("id") for m in json.loads(body).get("data", []) if isinstance(m, dict)]
        except (ValueError, AttributeError) as e:
            raise UpstreamError(f"model '{self.config.name}': {self.base_url}/models did not answer an OpenAI "
                                f"model list; is options.base_url the API root (ending in /v1)?") from e
        if ids and self.upstream_model not in ids:
            raise UpstreamError(f"model '{self.config.name}': the upstream at {self.base_url} does not serve "
                                f"'{self.upstream_model}' (it lists {', '.join(map(str, ids[:10]))}); set "
                                f"options.upstream_model to one of them")
        return {"n_ctx": self.n_ctx, "size": None, "type": "chat", "template": None,
                "upstream": self.base_url, "upstream_model": self.upstream_model}

    def run(self, job: Job, ctx: JobContext) -> TextResult:
        p = job.params
        if job.op not in self.operations or not isinstance(p, TextParams):
            raise NotSupported(f"the openai-upstream backend does not support '{job.op}'")
        body: dict[str, Any] = {"model": self.upstream_model, "stream": True}
        if job.op == "chat":
            if not p.messages:
                raise InvalidRequest("chat needs a non-empty list of messages")
            messages = list(p.messages)
            if p.resume_text:
                # Failover: hand the upstream what was already streamed as the start of the answer.
                messages.append({"role": "assistant", "content": p.resume_text})
            body["messages"] = messages
            endpoint = "/chat/completions"
        else:
            body["prompt"] = p.prompt + p.resume_text
            endpoint = "/completions"
        if p.max_tokens == 0:  # "evaluate the prompt only": OpenAI servers need max_tokens >= 1
            return TextResult(text="", finish_reason="length", stop_type="limit")
        if p.max_tokens > 0:
            body["max_tokens"] = int(p.max_tokens)
        for key in ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty"):
            value = getattr(p, key)
            if value is not None:
                body[key] = value
        if p.stop:
            body["stop"] = list(p.stop)
        if self.llama_params:
            for key in ("top_k", "min_p", "repeat_penalty"):
                body[key] = getattr(p, key)
        if self.include_usage:
            body["stream_options"] = {"include_usage": True}
        try:
            return self._stream(endpoint, body, ctx)
        except _RetryWithoutUsage:
            body.pop("stream_options", None)
            return self._stream(endpoint, body, ctx)

    # -- streaming --------------------------------------------------------------------------------------

    def _stream(self, endpoint: str, body: dict[str, Any], ctx: JobContext) -> TextResult:
        conn = self._connect(self.timeout_s)
        done = threading.Event()

        def watch() -> None:  # cancel closes the connection, which ends a blocking read at once
            while not done.wait(0.05):
                if ctx.cancelled:
                    sock = conn.sock
                    if sock is not None:
                        try:
                            import socket

                            sock.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
                    return

        watcher = threading.Thread(target=watch, name=f"cancel-{ctx.job.id}", daemon=True)
        t0 = time.perf_counter()
        t_first: float | None = None
        parts: list[str] = []
        n_chunks = 0
        finish: str | None = None
        stop_reason: Any = None
        usage: dict[str, Any] | None = None
        try:
            data = json.dumps(body).encode()
            headers = {**self._headers(stream=True), "Content-Type": "application/json"}
            try:
                conn.request("POST", self._path(endpoint), body=data, headers=headers)
                watcher.start()
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as e:
                if ctx.cancelled:
                    raise Cancelled("cancelled") from e
                raise UpstreamError(f"cannot reach the upstream at {self.base_url}{endpoint} "
                                    f"({type(e).__name__}: {e})") from e
            if resp.status != 200:
                self._raise_status(resp.status, resp.read(), body)
            try:
                for event in iter_sse(iter(resp.readline, b"")):
                    if ctx.cancelled:
                        break
                    if event.strip() == "[DONE]":
                        break
                    try:
                        chunk = json.loads(event)
                    except ValueError:
                        continue
                    if not isinstance(chunk, dict):
                        continue
                    if "error" in chunk:
                        err = chunk["error"]
                        msg = err.get("message") if isinstance(err, dict) else str(err)
                        raise UpstreamError(f"the upstream failed mid-stream: {msg}")
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    for choice in chunk.get("choices") or []:
                        if choice.get("index", 0) != 0:
                            continue
                        if "delta" in choice:
                            piece = (choice.get("delta") or {}).get("content") or ""
                        else:
                            piece = choice.get("text") or ""
                        if piece:
                            if t_first is None:
                                t_first = time.perf_counter()
                            parts.append(piece)
                            n_chunks += 1
                            ctx.emit({"text": piece})
                        if choice.get("finish_reason"):
                            finish = choice["finish_reason"]
                            stop_reason = choice.get("stop_reason")
            except (OSError, http.client.HTTPException) as e:
                if not ctx.cancelled:
                    raise UpstreamError(f"the upstream connection broke mid-stream ({type(e).__name__}: {e})") from e
        finally:
            done.set()
            conn.close()

        if ctx.cancelled:
            if not ctx.keep_partial:
                raise Cancelled("cancelled")
            finish, stop_type = "stop", "none"
        elif finish == "length":
            stop_type = "limit"
        elif isinstance(stop_reason, str):  # vLLM names the stop string that matched
            stop_type = "word"
        else:
            finish, stop_type = "stop", "eos"
        t_end = time.perf_counter()
        if usage:
            prompt_tokens = int(usage.get("prompt_tokens") or 0)
            completion_tokens = int(usage.get("completion_tokens") or 0)
        else:  # the upstream reports no usage: no prompt count, and one token per streamed piece
            prompt_tokens, completion_tokens = 0, n_chunks
        return TextResult.timed(text="".join(parts), finish_reason=finish or "stop", stop_type=stop_type,
                                stopping_word=stop_reason if stop_type == "word" else "", prompt_tokens=prompt_tokens,
                                completion_tokens=completion_tokens, prompt_ms=((t_first or t_end) - t0) * 1000.0,
                                predicted_ms=(t_end - (t_first or t_end)) * 1000.0)

    def _raise_status(self, status: int, raw: bytes, body: dict[str, Any]) -> None:
        msg = _error_message(status, raw)
        if status in (400, 422) and "stream_options" in body and "stream_options" in msg:
            raise _RetryWithoutUsage()
        low = msg.lower()
        if status in (400, 413, 422) and ("context" in low and ("length" in low or "exceed" in low)):
            raise ContextExceeded(f"upstream: {msg}")
        if 400 <= status < 500 and status not in (401, 403, 404, 408, 429):
            raise InvalidRequest(f"upstream: {msg}")
        raise UpstreamError(f"upstream HTTP {status}: {msg}")


class _RetryWithoutUsage(Exception):
    pass
