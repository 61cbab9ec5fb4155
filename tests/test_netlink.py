"""The slow-link proxy (gridswarm.netlink): its rate, its round trip, bounded setup, clean stop.

Timing is checked with wide margins only (a loaded 2-core box is slower, never faster than the
link): a 20 Mbit/s link must carry ~2 MB at 0.6×–1.3× its rate, and a small request's round trip
through a 200 ms link must take at least 200 ms.
"""

from __future__ import annotations

import math
import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from gridswarm.netlink import LinkProxy

PAYLOAD_BYTES = 2 * 1024 * 1024


class _Handler(socketserver.BaseRequestHandler):
    """`E` + 4-byte length: echo that many bytes back; `S` + length: read them, answer b"ok";
    `D` + length: send that many bytes."""

    def handle(self) -> None:
        sock: socket.socket = self.request
        while True:
            head = _read_exactly(sock, 5)
            if head is None:
                return
            kind, size = head[:1], int.from_bytes(head[1:], "big")
            if kind == b"D":
                sock.sendall(b"x" * size)
                continue
            body = _read_exactly(sock, size)
            if body is None:
                return
            sock.sendall(body if kind == b"E" else b"ok")


def _read_exactly(sock: socket.socket, size: int) -> bytes | None:
    parts, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 16))
        if not chunk:
            return None
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


@pytest.fixture
def server() -> Iterator[int]:
    """A threaded TCP server on a free loopback port (stopped at teardown)."""
    srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    # a short poll: shutdown() waits for it (0.5 s by default, at every test's teardown)
    thread = threading.Thread(target=srv.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.settimeout(30)
    return sock


@pytest.mark.slow  # waits on the wall clock (seconds): the full suite
def test_rate_both_directions_within_wide_bounds(server: int) -> None:
    rate = 20e6
    with LinkProxy("127.0.0.1", server, rate_bit_s=rate, rtt_s=0.02) as proxy:
        with _connect(proxy.port) as sock:
            started = time.perf_counter()  # up: 2 MB to the server, which answers "ok"
            sock.sendall(b"S" + PAYLOAD_BYTES.to_bytes(4, "big") + b"y" * PAYLOAD_BYTES)
            assert _read_exactly(sock, 2) == b"ok"
            up_bit_s = PAYLOAD_BYTES * 8 / (time.perf_counter() - started)
            started = time.perf_counter()  # down: 2 MB from the server
            sock.sendall(b"D" + PAYLOAD_BYTES.to_bytes(4, "big"))
            assert _read_exactly(sock, PAYLOAD_BYTES) == b"x" * PAYLOAD_BYTES
            down_bit_s = PAYLOAD_BYTES * 8 / (time.perf_counter() - started)
        assert 0.6 * rate <= up_bit_s <= 1.3 * rate, up_bit_s
        assert 0.6 * rate <= down_bit_s <= 1.3 * rate, down_bit_s
        assert proxy.counters.bytes_up >= PAYLOAD_BYTES
        assert proxy.counters.bytes_down >= PAYLOAD_BYTES


@pytest.mark.slow  # waits on the wall clock (seconds): the full suite
def test_round_trip_at_least_the_rtt(server: int) -> None:
    with (
        LinkProxy("127.0.0.1", server, rate_bit_s=None, rtt_s=0.2) as proxy,
        _connect(proxy.port) as sock,
    ):
        for _ in range(3):
            started = time.perf_counter()
            sock.sendall(b"E" + (5).to_bytes(4, "big") + b"hello")
            assert _read_exactly(sock, 5) == b"hello"
            assert time.perf_counter() - started >= 0.2


@pytest.mark.slow  # waits on the wall clock (seconds): the full suite
def test_connections_share_the_link_and_do_not_block_each_other(server: int) -> None:
    """A bulk download in flight on one connection does not hold a small echo on another back
    behind its queued chunks beyond the link's own serialisation (the echo still needs a slot on
    the shared down link, so it is bounded, generously, not instant)."""
    with LinkProxy("127.0.0.1", server, rate_bit_s=50e6, rtt_s=0.1) as proxy:
        bulk, small = _connect(proxy.port), _connect(proxy.port)
        with bulk, small:
            bulk.sendall(b"D" + PAYLOAD_BYTES.to_bytes(4, "big"))
            time.sleep(0.05)
            started = time.perf_counter()
            small.sendall(b"E" + (2).to_bytes(4, "big") + b"hi")
            assert _read_exactly(small, 2) == b"hi"
            echo_s = time.perf_counter() - started
            assert _read_exactly(bulk, PAYLOAD_BYTES) is not None
        assert 0.1 <= echo_s < 10.0


def test_http_through_the_proxy_and_clean_stop(server: int) -> None:
    """Real HTTP passes unchanged; after stop() the port is closed and the thread is gone."""
    body = {"ok": True}

    class Http(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            while self.rfile.readline() not in (b"\r\n", b""):
                pass
            payload = httpx.Response(200, json=body).content
            self.wfile.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                + f"content-length: {len(payload)}\r\nconnection: close\r\n\r\n".encode()
                + payload
            )

    srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Http)
    threading.Thread(target=srv.serve_forever, args=(0.02,), daemon=True).start()
    try:
        proxy = LinkProxy("127.0.0.1", srv.server_address[1], rate_bit_s=100e6, rtt_s=0.05)
        proxy.start()
        assert httpx.get(f"{proxy.url}/x", timeout=30).json() == body
        thread = proxy._thread
        proxy.stop()
        assert thread is not None and not thread.is_alive()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", proxy.port), timeout=5).close()
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.mark.parametrize(
    "rate, rtt",
    [(0, 0.05), (-1e6, 0.05), (math.nan, 0.05), (math.inf, 0.05), (1e6, -0.1), (1e6, math.nan)],
)
def test_refuses_nonsense_links(rate: float, rtt: float) -> None:
    with pytest.raises(ValueError):
        LinkProxy("127.0.0.1", 1, rate_bit_s=rate, rtt_s=rtt)


def test_connections_beyond_the_cap_are_closed(server: int, monkeypatch) -> None:
    monkeypatch.setattr("gridswarm.netlink.MAX_CONNECTIONS", 1)
    with LinkProxy("127.0.0.1", server, rate_bit_s=None, rtt_s=0.0) as proxy:
        first = _connect(proxy.port)
        with first:
            first.sendall(b"E" + (2).to_bytes(4, "big") + b"hi")
            assert _read_exactly(first, 2) == b"hi"  # the first is being forwarded
            with _connect(proxy.port) as second:
                assert second.recv(1) == b""  # closed on arrival
            assert proxy.counters.refused == 1
        deadline = time.monotonic() + 10  # once the first is gone, a new one is served
        while proxy._open and time.monotonic() < deadline:
            time.sleep(0.05)
        with _connect(proxy.port) as third:
            third.sendall(b"E" + (2).to_bytes(4, "big") + b"ok")
            assert _read_exactly(third, 2) == b"ok"
