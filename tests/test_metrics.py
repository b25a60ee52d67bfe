"""GET /metrics: Prometheus text format that parses, with numbers that move with traffic."""

from __future__ import annotations

import requests
from prometheus_client.parser import text_string_to_metric_families


def scrape(router) -> dict[str, list]:
    r = router.get("/metrics")
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/plain")
    families = {}
    for family in text_string_to_metric_families(r.text):
        families[family.name] = family.samples
    return families


def value(samples, name, **labels) -> float:
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_move_with_traffic(mesh):
    before = scrape(mesh)
    mesh.post("/completion", {"prompt": "Hello", "max_tokens": 5, "temperature": 0})
    stream = mesh.post("/completion", {"prompt": "Hello", "max_tokens": 5, "stream": True}, stream=True)
    assert b"[DONE]" in stream.content
    mesh.post("/completion", {"prompt": "x", "temperature": 9})
    after = scrape(mesh)

    ok = dict(endpoint="/completion", status="200", token="token-1")
    assert value(after["velesio_requests"], "velesio_requests_total", **ok) == \
        value(before.get("velesio_requests", []), "velesio_requests_total", **ok) + 2
    assert value(after["velesio_requests"], "velesio_requests_total", endpoint="/completion", status="400") >= 1
    model = "smollm2-135m-instruct"
    gained = value(after["velesio_generated_tokens"], "velesio_generated_tokens_total", model=model) - \
        value(before.get("velesio_generated_tokens", []), "velesio_generated_tokens_total", model=model)
    assert gained >= 6
    assert value(after["velesio_time_to_first_token_seconds"], "velesio_time_to_first_token_seconds_count",
                 model=model) >= 1
    assert value(after["velesio_queue_wait_seconds"], "velesio_queue_wait_seconds_count", model=model) >= 2
    assert value(after["velesio_workers"], "velesio_workers") == 1
    ages = [s.value for s in after["velesio_worker_heartbeat_age_seconds"]]
    assert ages and all(0 <= a < 3 for a in ages)
    assert "velesio_queue_depth" in after and "velesio_failovers" in after and "velesio_cancellations" in after


def test_metrics_need_a_token_and_never_show_it(mesh):
    assert requests.get(mesh.url + "/metrics", timeout=10).status_code == 401
    assert mesh.token not in mesh.get("/metrics").text


def test_histogram_buckets_are_cumulative_and_inclusive():
    from prometheus_client import CollectorRegistry, generate_latest

    from velesio.router.metric_families import FamiliesCollector, HistogramFamily

    h = HistogramFamily("t_seconds", "test", ("model",), (0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 7.0):
        h.observe(("m",), v)
    registry = CollectorRegistry()
    registry.register(FamiliesCollector([h]))
    samples = {(s.name, s.labels.get("le")): s.value
               for f in text_string_to_metric_families(generate_latest(registry).decode()) for s in f.samples}
    assert samples[("t_seconds_bucket", "0.1")] == 2  # 0.1 itself is in the 0.1 bucket (le)
    assert samples[("t_seconds_bucket", "1.0")] == 3
    assert samples[("t_seconds_bucket", "+Inf")] == 4 == samples[("t_seconds_count", None)]
    assert abs(samples[("t_seconds_sum", None)] - 7.65) < 1e-9
