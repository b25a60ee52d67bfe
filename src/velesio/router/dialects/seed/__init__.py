"""The seed API's own text shapes and OpenAI's (the seed's are a subset of OpenAI's, so one dialect serves
both): /completion, /completions, /v1/completions, /chat/completions, /v1/chat/completions, /v1/models.
Errors: ``{"error": {"code": <seed code string>, "message", "details", "type", "param"}}``."""

from __future__ import annotations

from ..base import Dialect, Route, seed_error
from . import routes

DIALECT = Dialect(
    name="seed",
    routes=(
        Route("POST", "/completion", routes.completion),
        Route("POST", "/completions", routes.completion),  # llama.cpp's alias of /completion
        Route("POST", "/v1/completions", routes.v1_completions),
        Route("POST", "/chat/completions", routes.chat_completions),
        Route("POST", "/v1/chat/completions", routes.chat_completions),
        Route("POST", "/chat/completions/input_tokens", routes.chat_input_tokens),
        Route("POST", "/v1/chat/completions/input_tokens", routes.chat_input_tokens),
        Route("GET", "/v1/models", routes.v1_models),
    ),
    error_body=seed_error,
    sniff=routes.sniff,
)
