"""A zero-work BENCHMARK backend, shipped only to measure the router's own overhead (bench/).

It serves model "benchmark-echo" and, when asked, "benchmark-sleep" (a fixed time per job, simulating a
GPU). It generates nothing: it returns a fixed short reply at once, or streams N fixed tokens as fast as
it can. Never use it to judge generation quality.

With ``options.faults: true`` it also SIMULATES FAULTS, for the tests of the worker's supervision: a job
whose prompt holds one of these markers does what a broken native backend would do to its process:
``[[abort]]`` aborts it (SIGABRT, as llama.cpp's uncaught C++ exceptions do), ``[[segfault]]`` dies of
SIGSEGV, ``[[allocate]]`` allocates memory without end, ``[[hang]]`` stops answering cancels (a job stuck
in native code)."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from velesio.backends import Backend, Cancelled, JobContext, ModelConfig, NotSupported, TextParams, TextResult
from velesio.mesh.jobs import Job


class BenchmarkBackend(Backend):
    name = "benchmark"
    kind = "text"
    operations = ("completion", "chat")

    def load(self) -> dict[str, Any]:
        self.delay_s = float(self.config.options.get("delay_ms", 0)) / 1000
        self.reply = str(self.config.options.get("reply", "ok"))
        self.faults = bool(self.config.options.get("faults", False))
        return {"n_ctx": 4096, "type": "benchmark", "size": "0"}

    def run(self, job: Job, ctx: JobContext) -> TextResult:
        p = job.params
        if not isinstance(p, TextParams):
            raise NotSupported(f"the benchmark backend does not do {job.op!r}")
        if self.faults:
            self._fault(p.prompt)
        if self.delay_s:
            self._wait(self.delay_s, ctx)
        n = int(p.max_tokens or 1)
        if job.stream and n > 1:
            for _ in range(n):
                if ctx.cancelled:
                    raise Cancelled("cancelled")
                ctx.emit({"text": " tok"})
            text = " tok" * n
        else:
            text = self.reply
        return TextResult(text=text, finish_reason="length", stop_type="limit", prompt_tokens=1,
                          completion_tokens=n if job.stream else 1)

    @staticmethod
    def _fault(prompt: str) -> None:
        """The simulated faults of ``options.faults`` (see the module's docstring)."""
        if "[[abort]]" in prompt:
            os.abort()
        if "[[segfault]]" in prompt:
            os.kill(os.getpid(), signal.SIGSEGV)
        if "[[allocate]]" in prompt:
            hoard = []
            while True:  # 64 MB at a time, touched so that it is resident
                hoard.append(b"\x01" * (64 << 20))
                time.sleep(0.01)
        if "[[hang]]" in prompt:
            while True:
                time.sleep(1)

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
