"""What the hub's per-request metrics cost (hub/metrics.py `RequestMetrics`), in microseconds of
CPU per request, measured in one process without a server: a bare ASGI app that answers at once,
called directly, with and without the middleware in front (the difference is what every request
pays), and the real app's `/healthz`, called as ASGI the same way, with metrics on and off.
bench/hub_request_cost.py gives the hub's CPU per request of each endpoint to set it against
(`--baseline-hub-arg=--no-metrics`), but on a shared 2-core box its noise is larger than this
difference.

    python bench/metrics_cost.py --requests 20000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from gridswarm.hub.metrics import HubMetrics, RequestMetrics

torch.set_num_threads(1)


async def bare(scope, receive, send) -> None:
    """An ASGI app that answers 200 with a small body: the floor of any request."""
    scope["route"] = ROUTE
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


class _Route:
    path = "/v1/nodes/heartbeat"


ROUTE = _Route()


async def drive(app, n: int) -> float:
    """CPU seconds for `n` calls of `app` with a minimal GET scope."""

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(_message):
        return None

    start = time.process_time()
    for _ in range(n):
        scope = {"type": "http", "method": "POST", "path": "/v1/nodes/heartbeat", "headers": []}
        await app(scope, receive, send)
    return time.process_time() - start


def healthz_us(metrics: bool, n: int) -> float:
    """CPU microseconds per `/healthz` through the real app (called as ASGI, no server)."""
    from gridswarm.hub.app import create_app
    from gridswarm.hub.server import build_service

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(_message):
        return None

    async def calls(app, count: int) -> float:
        start = time.process_time()
        for _ in range(count):
            await app(healthz_scope(), receive, send)
        return time.process_time() - start

    with tempfile.TemporaryDirectory() as tmp:
        service = build_service(f"sqlite:///{tmp}/hub.db", Path(tmp) / "blobs")
        app = create_app(service, metrics=metrics)
        asyncio.run(calls(app, 200))  # warm up (builds the middleware stack)
        return 1e6 * asyncio.run(calls(app, n)) / n


def healthz_scope() -> dict:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/healthz",
        "raw_path": b"/healthz",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"hub")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 8470),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="JSON")
    args = parser.parse_args()
    n = args.requests
    wrapped = RequestMetrics(bare, HubMetrics())
    without, with_ = [], []
    for _ in range(args.repeats):  # interleaved, the best of each (least disturbed by others)
        without.append(1e6 * asyncio.run(drive(bare, n)) / n)
        with_.append(1e6 * asyncio.run(drive(wrapped, n)) / n)
    health_off, health_on = [], []
    for _ in range(args.repeats):
        health_off.append(healthz_us(False, n // 4))
        health_on.append(healthz_us(True, n // 4))
    doc = {
        "command": "python bench/metrics_cost.py " + " ".join(sys.argv[1:]),
        "bare_asgi_us": min(without),
        "bare_asgi_with_metrics_us": min(with_),
        "middleware_us": min(with_) - min(without),
        "healthz_asgi_us": {"off": min(health_off), "on": min(health_on)},
        "healthz_asgi_us_all": {"off": health_off, "on": health_on},
    }
    print(json.dumps(doc, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
