"""llama.cpp's server API (what LLM for Unity and llama.cpp tooling speak): /completion with llama.cpp's
fields and shapes (dialects/llamacpp/completion.py), and the utility routes (routes.py). Errors:
``{"error": {"code": <HTTP status>, "message", "type"}}``."""

from __future__ import annotations

from ..base import Dialect, Route
from . import routes
from .completion import LlamaCppText, error_body, wants
from .routes import completion

__all__ = ["DIALECT", "LlamaCppText", "completion", "wants"]

DIALECT = Dialect(
    name="llamacpp",
    routes=(
        Route("POST", "/tokenize", routes.tokenize),
        Route("POST", "/detokenize", routes.detokenize),
        Route("POST", "/template", routes.template),
        Route("POST", "/apply-template", routes.apply_template),
        Route("GET", "/props", routes.props),
        Route("POST", "/props", routes.props),
        Route("GET", "/slots", routes.slots),
        Route("POST", "/embeddings", routes.embeddings),
        Route("POST", "/v1/embeddings", routes.v1_embeddings),
        Route("POST", "/infill", routes.infill),
    ),
    error_body=error_body,
)
