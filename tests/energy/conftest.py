"""Fixtures for the energy tests: shared-data paths and a real loopback HTTP server that replays
recorded API responses."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
SHARED_ENERGY = Path(__file__).resolve().parents[3] / "shared" / "data" / "energy"


@pytest.fixture(scope="session")
def energy_data() -> Path:
    if not SHARED_ENERGY.is_dir():
        pytest.skip(f"shared energy data not found at {SHARED_ENERGY}")
    return SHARED_ENERGY


@dataclass
class Route:
    fixture: str
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)  # required request headers


@dataclass
class RecordedApi:
    """Routes path -> recorded JSON; records every request for assertions."""

    base_url: str
    routes: dict[str, Route]
    requests: list[dict] = field(default_factory=list)

    def route(self, path: str, fixture: str, **kwargs) -> None:
        self.routes[path] = Route(fixture, **kwargs)


@pytest.fixture
def recorded_api() -> Iterator[RecordedApi]:
    api = RecordedApi(base_url="", routes={})

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            api.requests.append(
                {
                    "path": parts.path,
                    "query": {k: v[0] for k, v in parse_qs(parts.query).items()},
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                }
            )
            route = api.routes.get(parts.path)
            if route is None:
                return self._send(404, {"error": f"no route {parts.path}"})
            for name, value in route.headers.items():
                if self.headers.get(name) != value:
                    return self._send(401, {"error": f"bad or missing {name}"})
            if route.status != 200:
                return self._send(route.status, {"error": "recorded failure"})
            return self._send(200, json.loads((FIXTURES / route.fixture).read_text()))

        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    # a short poll interval: shutdown() waits for the loop's next poll (0.5 s by default)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    api.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield api
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
