"""`--hub URL1,URL2,…`: a node's client moves on to the next hub replica when one does not
answer (connection refused) or answers 5xx, and a bad URL in the list is one line."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gridswarm.identity import Identity
from gridswarm.node.client import (
    HubClient,
    HubRequestError,
    HubUnreachable,
    HubURLError,
    check_hub_urls,
)
from gridswarm.swarm import free_port


def answering(status: int) -> Iterator[tuple[str, list[str]]]:
    """A loopback HTTP server answering every GET with `status`; yields (URL, paths seen)."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            body = b'{"ok": true}' if status == 200 else b'{"detail": "down"}'
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    # a short poll: shutdown() waits for it (0.5 s by default, at every test's teardown)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def ok_hub() -> Iterator[tuple[str, list[str]]]:
    yield from answering(200)


@pytest.fixture
def broken_hub() -> Iterator[tuple[str, list[str]]]:
    yield from answering(503)


def starting_on_the_first(client: HubClient) -> HubClient:
    """`client` set to begin with its first URL (each identity starts on its own)."""
    client.current, client.http = 0, client.clients[0]
    return client


def test_each_identity_starts_on_its_own_replica():
    urls = ",".join(f"http://127.0.0.1:{9000 + i}" for i in range(3))
    starts = {HubClient(urls, Identity.generate()).base_url for _ in range(60)}
    assert len(starts) == 3  # spread by key (60 keys all on 2 of 3: odds ~1e-10)


def test_the_client_fails_over_to_the_next_replica_at_once(ok_hub, broken_hub):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused
    waits: list[float] = []
    client = HubClient(
        f"{dead},{broken_hub[0]},{ok_hub[0]}",
        Identity.generate(),
        retry_for_s=30,
        on_retry=lambda cause, retry_in_s, left_s: waits.append(retry_in_s),
    )
    starting_on_the_first(client)
    client.healthz()
    assert client.base_url == ok_hub[0]
    assert broken_hub[1] == ["/healthz"] and ok_hub[1] == ["/healthz"]
    assert waits == []  # another replica answered: no backoff
    client.healthz()  # the replica that answered keeps the requests
    assert ok_hub[1] == ["/healthz", "/healthz"] and broken_hub[1] == ["/healthz"]
    client.close()


@pytest.mark.slow  # waits on the wall clock (seconds): the full suite
def test_every_replica_down_is_bounded_with_backoff(broken_hub):
    dead = f"http://127.0.0.1:{free_port()}"
    waits: list[float] = []
    client = HubClient(
        f"{dead},{broken_hub[0]}",
        Identity.generate(),
        retry_for_s=1.5,
        on_retry=lambda cause, retry_in_s, left_s: waits.append(retry_in_s),
    )
    with pytest.raises((HubUnreachable, HubRequestError)):  # the last failure, as with one URL
        client.healthz()
    assert waits and waits == sorted(waits)  # waits only after a full pass, growing
    assert len(broken_hub[1]) >= 2  # both replicas were tried on every pass
    client.close()


def test_a_heartbeat_tries_each_replica_once_and_never_announces(broken_hub):
    """While the hub is down the main loop prints the countdown; a heartbeat failing beside it
    must not print a second one (nor wait)."""
    dead = f"http://127.0.0.1:{free_port()}"
    waits: list[float] = []
    client = HubClient(
        f"{dead},{broken_hub[0]}",
        Identity.generate(),
        retry_for_s=None,  # the node's default: retry until stopped
        on_retry=lambda cause, retry_in_s, left_s: waits.append(retry_in_s),
    )
    starting_on_the_first(client)
    with pytest.raises(HubUnreachable):
        client.request("GET", "/healthz", signed=False, retry=False)
    assert waits == [] and broken_hub[1] == ["/healthz"]  # both tried once, no countdown
    client.close()


@pytest.mark.parametrize(
    "value",
    ["http://a:1,localhost:2", "http://a:1,,http://b:2", "http://a:1,http://a:1", ""],
)
def test_a_bad_hub_list_is_refused(value):
    with pytest.raises(HubURLError):
        check_hub_urls(value)


def test_a_good_hub_list_is_normalized():
    assert check_hub_urls(" http://a:1/ , https://b ") == "http://a:1,https://b"


@pytest.mark.slow  # a subprocess importing the whole CLI
def test_the_node_command_names_the_bad_url_in_one_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gridswarm.cli",
            "node",
            "--hub",
            "http://127.0.0.1:1,127.0.0.1:2",
            "--home",
            str(tmp_path / "node"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "'127.0.0.1:2'" in lines[0] and "Traceback" not in proc.stderr
