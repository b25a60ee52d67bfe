"""Per-token admission: requests per minute (sliding window) and concurrent requests (the seed's "burst").

Headers on every authenticated response: X-RateLimit-Limit (requests per minute), X-RateLimit-Remaining,
X-RateLimit-Reset (epoch seconds when the oldest request in the window leaves it, as in the seed)."""

from __future__ import annotations

import collections
import math
import time

from aiohttp import web

from velesio.config import TokenLimits

from .errors import ApiError


class RateLimiter:
    def __init__(self, default: TokenLimits, per_token: dict[str, TokenLimits] | None = None):
        self.default = default
        self.per_token = per_token or {}
        self.windows: dict[str, collections.deque[float]] = collections.defaultdict(collections.deque)
        self.active: dict[str, int] = collections.defaultdict(int)
        self.rejected = 0

    def limits(self, name: str) -> TokenLimits:
        return self.per_token.get(name, self.default)

    def admit(self, name: str) -> dict[str, str]:
        """Count a request of token ``name`` and return its X-RateLimit-* headers, or raise 429. Every
        admitted request is given back with ``release(name)`` when it ends."""
        limits = self.limits(name)
        now = time.time()
        window = self.windows[name]
        while window and window[0] <= now - 60:
            window.popleft()
        reset = int(math.ceil(window[0] + 60 if window else now + 60))
        if len(window) >= limits.requests_per_minute:
            self.rejected += 1
            retry = max(1, int(math.ceil(window[0] + 60 - now)))
            raise ApiError("rate_limited", f"rate limit of {limits.requests_per_minute} requests per minute "
                           "exceeded", headers={**self._headers(limits, 0, reset), "Retry-After": str(retry)})
        if self.active[name] >= limits.concurrent:
            self.rejected += 1
            raise ApiError("rate_limited", f"at most {limits.concurrent} concurrent requests per token",
                           headers={**self._headers(limits, limits.requests_per_minute - len(window), reset),
                                    "Retry-After": "1"})
        window.append(now)
        self.active[name] += 1
        return self._headers(limits, limits.requests_per_minute - len(window), reset)

    def release(self, name: str) -> None:
        self.active[name] -= 1

    @staticmethod
    def _headers(limits: TokenLimits, remaining: int, reset: int) -> dict[str, str]:
        return {"X-RateLimit-Limit": str(limits.requests_per_minute),
                "X-RateLimit-Remaining": str(max(0, remaining)), "X-RateLimit-Reset": str(reset)}


RATE_LIMITER = web.AppKey("rate_limiter", RateLimiter)
