"""A zero-work BENCHMARK backend, shipped only to measure the router's own overhead (bench/).

It serves model "benchmark-echo" and, when asked, "benchmark-sleep" (a fixed time per job, simulating a
GPU). It generates nothing: it returns a fixed short reply at once, or streams N fixed tokens as fast as
it can. Never use it to judge generation quality."""

from __future__ import annotations

import time
from typing import Any

from velesio.backends import Backend, Cancelled, JobContext, ModelConfig
from velesio.mesh.jobs import Job


class BenchmarkBackend(Backend):
    name = "benchmark"
    kind = "text"
    operations = ("completion", "chat")

    def load(self) -> dict[str, Any]:
        self.delay_s = float(self.config.options.get("delay_ms", 0)) / 1000
        self.reply = str(self.config.options.get("reply", "ok"))
        return {"n_ctx": 4096, "type": "benchmark", "size": "0"}

    def run(self, job: Job, ctx: JobContext) -> dict[str, Any]:
        if self.delay_s:
            self._wait(self.delay_s, ctx)
        n = int(job.params.get("max_tokens") or 1)
        if job.stream and n > 1:
            for _ in range(n):
                if ctx.cancelled:
                    raise Cancelled("cancelled")
                ctx.emit({"text": " tok"})
            text = " tok" * n
        else:
            text = self.reply
        return {"text": text, "finish_reason": "length", "stop_type": "limit", "stopping_word": "",
                "prompt_tokens": 1, "completion_tokens": n if job.stream else 1,
                "timings": {"prompt_n": 1, "prompt_ms": 0.0, "predicted_n": n, "predicted_ms": 0.0}}

    @staticmethod
    def _wait(seconds: float, ctx: JobContext) -> None:
        """The fixed delay, in slices short enough that a cancelled job (a client gone) stops within 0.25 s."""
        end = time.monotonic() + seconds
        while True:
            if ctx.cancelled:
                raise Cancelled("cancelled")
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.25))

    @classmethod
    def embedded_models(cls) -> list[ModelConfig]:
        return []  # only served when mesh.yaml names it
