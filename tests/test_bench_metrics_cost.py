"""bench/metrics_cost.py measures what it says: a bare ASGI app with and without the metrics
middleware, and the real app's /healthz with metrics on and off (finite CPU figures), and the
middleware really counted the requests it timed."""

from __future__ import annotations

import asyncio
import math

from gridswarm.hub.metrics import HubMetrics, RequestMetrics
from tests.benches import load_bench


def test_the_metrics_cost_bench_measures_both_sides() -> None:
    bench = load_bench("metrics_cost")
    metrics = HubMetrics()
    wrapped = RequestMetrics(bench.bare, metrics)
    for app in (bench.bare, wrapped):
        seconds = asyncio.run(bench.drive(app, 200))
        assert math.isfinite(seconds) and seconds >= 0
    text = metrics.scrape().decode()
    labels = 'method="POST",route="/v1/nodes/heartbeat",status="2xx"'
    assert f"gridswarm_http_requests_total{{{labels}}} 200.0" in text
    for on in (False, True):
        per_request_us = bench.healthz_us(on, 50)
        assert math.isfinite(per_request_us) and per_request_us > 0
