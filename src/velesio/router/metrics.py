"""Prometheus metrics (prometheus-client), on ``GET /metrics``: request counters from a middleware, job
timings from the scheduler's events (kept in router/metric_families.py), and mesh state (queues, workers,
heartbeats) read at scrape time.
Tokens never appear: requests are labelled with the token's configured name."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .keys import SCHEDULER, TOKEN_NAME
from .metric_families import CounterFamily, FamiliesCollector, HistogramFamily
from .scheduler import JobRecord, Scheduler

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class MeshCollector(Collector):
    """Gauges read from the scheduler when Prometheus scrapes."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler

    def collect(self) -> Iterator[GaugeMetricFamily]:
        s = self.scheduler
        depth = GaugeMetricFamily("velesio_queue_depth", "Jobs waiting for a worker, per model", labels=["model"])
        for model, queue in s.queues.items():
            depth.add_metric([model], len(queue))
        workers = GaugeMetricFamily("velesio_workers", "Live workers")
        workers.add_metric([], len(s.workers))
        in_flight = GaugeMetricFamily("velesio_worker_jobs_in_flight", "Jobs running on each worker",
                                      labels=["worker"])
        age = GaugeMetricFamily("velesio_worker_heartbeat_age_seconds", "Seconds since each worker was heard",
                                labels=["worker"])
        free = GaugeMetricFamily("velesio_worker_free_slots", "Free slots per worker and model",
                                 labels=["worker", "model"])
        restarts = GaugeMetricFamily("velesio_backend_restarts", "Restarts of each model's backend process "
                                     "since its worker started", labels=["worker", "model"])
        up = GaugeMetricFamily("velesio_backend_up", "1 while a model's backend process is ready, 0 while it "
                               "restarts", labels=["worker", "model"])
        now = time.monotonic()
        for w in s.workers.values():
            in_flight.add_metric([w.name], len(w.running))
            age.add_metric([w.name], now - w.last_seen)
            for model in w.models:
                free.add_metric([w.name, model], w.free(model))
                up.add_metric([w.name, model], 1 if w.available(model) else 0)
                backend = w.backends.get(model) or {}
                if isinstance(backend.get("restarts"), int):
                    restarts.add_metric([w.name, model], backend["restarts"])
        yield from (depth, workers, in_flight, age, free, restarts, up)


class Metrics:
    """The router's metrics; also the scheduler's observer (``observe(event, rec, **data)``)."""

    def __init__(self, scheduler: Scheduler):
        self.requests = CounterFamily("velesio_requests", "HTTP requests", ("endpoint", "status", "token"))
        self.rate_limited = CounterFamily("velesio_rate_limited", "Requests refused by rate limits", ("token",))
        self.queue_wait = HistogramFamily("velesio_queue_wait_seconds", "Time from acceptance to dispatch",
                                          ("model",), _LATENCY_BUCKETS)
        self.ttft = HistogramFamily("velesio_time_to_first_token_seconds", "Time from acceptance to the first token",
                                    ("model",), _LATENCY_BUCKETS)
        self.job_seconds = HistogramFamily("velesio_job_seconds", "Time from acceptance to the result",
                                           ("model", "op"), _LATENCY_BUCKETS)
        self.tokens = CounterFamily("velesio_generated_tokens", "Tokens generated", ("model",))
        self.tokens_per_second = HistogramFamily("velesio_tokens_per_second", "Generation speed of each text job",
                                                 ("model",), (5, 10, 25, 50, 100, 200, 400, 800, 1600))
        self.image_steps = CounterFamily("velesio_image_steps", "Denoising steps done", ("model",))
        self.jobs = CounterFamily("velesio_jobs", "Jobs ended, by outcome", ("model", "op", "outcome"))
        self.failovers = CounterFamily("velesio_failovers", "Jobs moved to another worker", ("model",))
        self.cancellations = CounterFamily("velesio_cancellations", "Jobs cancelled (client gone, interrupt)",
                                           ("model",))
        self.crashes = CounterFamily("velesio_backend_crashes", "Backend processes that died running a job",
                                     ("worker", "model"))
        self.registry = CollectorRegistry()
        self.registry.register(FamiliesCollector([
            self.requests, self.rate_limited, self.queue_wait, self.ttft, self.job_seconds, self.tokens,
            self.tokens_per_second, self.image_steps, self.jobs, self.failovers, self.cancellations,
            self.crashes]))
        self.registry.register(MeshCollector(scheduler))

    def observe(self, event: str, rec: JobRecord, **data: Any) -> None:
        job = rec.job
        model = (job.model,)
        elapsed = time.time() - rec.created
        if event == "dispatch":
            if job.attempt == 1:
                self.queue_wait.observe(model, elapsed)
        elif event == "first_token":
            self.ttft.observe(model, elapsed)
        elif event == "step":
            self.image_steps.inc(model)
        elif event == "failover":
            self.failovers.inc(model)
        elif event == "cancel":
            self.cancellations.inc(model)
        elif event == "crash":
            self.crashes.inc((str(data.get("worker")), job.model))
        elif event == "end":
            outcome = data.get("outcome", "ok")
            self.jobs.inc((job.model, job.op, outcome))
            self.job_seconds.observe((job.model, job.op), elapsed)
            result = data.get("result") or {}
            n = result.get("completion_tokens")
            if outcome == "ok" and isinstance(n, int) and n > 0:
                self.tokens.inc(model, n)
                predicted_ms = result.get("predicted_ms")
                if predicted_ms:
                    self.tokens_per_second.observe(model, n / (predicted_ms / 1000))


METRICS = web.AppKey("metrics", Metrics)


def endpoint_label(request: web.Request) -> str:
    """The route's path pattern, so that unknown paths do not grow label sets without bound."""
    resource = request.match_info.route.resource if request.match_info.route else None
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def metrics_middleware(request: web.Request, handler) -> web.StreamResponse:
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        metrics = request.app[METRICS]
        token = request.get(TOKEN_NAME, "none")
        metrics.requests.inc((endpoint_label(request), str(status), token))
        if status == 429:
            metrics.rate_limited.inc((token,))


async def metrics_handler(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def setup(app: web.Application) -> None:
    metrics = Metrics(app[SCHEDULER])
    app[METRICS] = metrics
    app[SCHEDULER].observer = metrics
    app.router.add_get("/metrics", metrics_handler)
