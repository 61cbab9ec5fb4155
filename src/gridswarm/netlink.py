"""A slow link on loopback: a TCP proxy that holds traffic to a bit rate and a round-trip time.

`LinkProxy` listens on one 127.0.0.1 port and forwards every connection to a target (e.g. the
hub), so a node started with `--hub http://127.0.0.1:PORT` talks to the hub over a link of, say,
100 Mbit/s and 50 ms round trip. Benchmarks (`bench/utilisation.py`) and tests use it to measure
what slow links cost a swarm without leaving the machine.

The link model, per direction (node -> hub "up", hub -> node "down"), shared by all of the
proxy's connections as one access link is:

- rate: the bytes of a chunk go on the wire one after another at `rate_bit_s` (a serialising
  link: a chunk starts when the previous one, of any connection, has left), so a long transfer
  runs at the configured rate and concurrent connections share it;
- delay: each chunk arrives `rtt_s / 2` after it has left. Chunks wait in a per-connection timed
  queue (their delivery time is fixed when they are read), so a chunk in flight never holds back
  another connection's chunks, and a transfer keeps the link busy while earlier chunks are
  still "in the air" (the bandwidth-delay product is buffered).

Buffers are bounded: a connection's queue holds at most `buffer_bytes` (at least what the link
carries in one one-way delay plus 100 ms), beyond which the proxy stops reading and TCP's own
flow control pushes back on the sender; at most MAX_CONNECTIONS are forwarded at once. `stop()`
closes the port and every connection, and ends the proxy's thread.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from dataclasses import dataclass

CHUNK_BYTES = 16 * 1024  # bytes read at a time; one chunk's serialisation is the link's grain
MAX_BUFFER_BYTES = 64 * 1024 * 1024  # the most one connection's direction may hold
MAX_RATE_BIT_S = 1e12  # 1 Tbit/s: anything above is refused as nonsense
MAX_RTT_S = 60.0
START_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 256  # open at once; more are closed on arrival


@dataclass
class LinkCounters:
    """What crossed the link so far, in bytes, per direction; and the connections accepted."""

    bytes_up: int = 0  # client -> target
    bytes_down: int = 0  # target -> client
    connections: int = 0
    refused: int = 0  # closed on arrival: MAX_CONNECTIONS were open


class _Direction:
    """One direction of the link: when the wire is next free (a monotonic time, in s)."""

    def __init__(self, rate_bit_s: float | None, one_way_s: float) -> None:
        self.rate_bit_s = rate_bit_s
        self.one_way_s = one_way_s
        self.free_at = 0.0

    def delivery_time(self, nbytes: int, now: float) -> float:
        """Put `nbytes` on the wire (after what is already on it); when they arrive."""
        if self.rate_bit_s is None:
            return now + self.one_way_s
        start = max(now, self.free_at)
        self.free_at = start + nbytes * 8.0 / self.rate_bit_s
        return self.free_at + self.one_way_s


def _check_link(rate_bit_s: float | None, rtt_s: float) -> None:
    if rate_bit_s is not None and not (
        isinstance(rate_bit_s, int | float)
        and math.isfinite(rate_bit_s)
        and 0 < rate_bit_s <= MAX_RATE_BIT_S
    ):
        raise ValueError(f"rate_bit_s must be in (0, {MAX_RATE_BIT_S:g}] or None, not {rate_bit_s}")
    if not (isinstance(rtt_s, int | float) and math.isfinite(rtt_s) and 0 <= rtt_s <= MAX_RTT_S):
        raise ValueError(f"rtt_s must be in [0, {MAX_RTT_S:g}], not {rtt_s}")


class LinkProxy:
    """A TCP proxy on 127.0.0.1 to `target` that emulates a link of `rate_bit_s` (None: no rate
    limit) and `rtt_s` round trip. Runs its own event loop in a thread: `start()` returns the
    listening port; `stop()` (or leaving the `with` block) closes everything."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        rate_bit_s: float | None,
        rtt_s: float,
        listen_port: int = 0,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        _check_link(rate_bit_s, rtt_s)
        if not 0 <= listen_port < 65536 or not 0 < target_port < 65536:
            raise ValueError("ports must be in [0, 65535]")
        if not 512 <= chunk_bytes <= 1 << 20:
            raise ValueError("chunk_bytes must be in [512, 1 MiB]")
        self.target = (target_host, target_port)
        self.rate_bit_s = rate_bit_s
        self.rtt_s = float(rtt_s)
        self.chunk_bytes = chunk_bytes
        in_flight = (rate_bit_s or 0.0) / 8.0 * (self.rtt_s / 2 + 0.1)
        self.buffer_bytes = int(min(MAX_BUFFER_BYTES, max(64 * chunk_bytes, 2 * in_flight)))
        self.counters = LinkCounters()
        self.port = listen_port
        self._up = _Direction(rate_bit_s, self.rtt_s / 2)
        self._down = _Direction(rate_bit_s, self.rtt_s / 2)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._open = 0  # connections being forwarded now
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        """http://127.0.0.1:PORT, for an HTTP client (a node's --hub)."""
        return f"http://127.0.0.1:{self.port}"

    def describe(self) -> str:
        rate = "unlimited" if self.rate_bit_s is None else f"{self.rate_bit_s / 1e6:g} Mbit/s"
        return f"{rate}, {self.rtt_s * 1000:g} ms round trip"

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> int:
        """Listen and forward in a background thread; returns the listening port."""
        if self._thread is not None:
            raise RuntimeError("this proxy was already started")
        self._thread = threading.Thread(target=self._run, name=f"linkproxy-{id(self)}", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise TimeoutError("the link proxy did not start")
        if self._error is not None:
            raise RuntimeError(f"the link proxy could not start: {self._error}") from self._error
        return self.port

    def stop(self, timeout_s: float = 10.0) -> None:
        """Close the port and every connection; wait for the thread to end."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
        thread.join(timeout_s)

    def __enter__(self) -> LinkProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
            loop.run_forever()  # until _shutdown stops it
        except BaseException as exc:  # reported to start()'s caller
            self._error = exc
            self._ready.set()
        finally:
            loop.close()

    async def _serve(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        asyncio.get_running_loop().stop()

    # ------------------------------------------------------------------ forwarding

    def _spawn(self, coro: object) -> asyncio.Task:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if self._open >= MAX_CONNECTIONS:
            self.counters.refused += 1
            client_w.close()
            return
        self.counters.connections += 1
        self._open += 1
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        try:
            try:
                target_r, target_w = await asyncio.open_connection(*self.target)
            except OSError:
                client_w.close()
                return
            try:
                await asyncio.gather(
                    self._pipe(client_r, target_w, self._up, "up"),
                    self._pipe(target_r, client_w, self._down, "down"),
                )
            finally:
                for writer in (client_w, target_w):
                    writer.close()
        finally:
            self._open -= 1

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        link: _Direction,
        direction: str,
    ) -> None:
        """Forward one direction of one connection through `link`'s rate and delay."""
        slots = max(2, self.buffer_bytes // self.chunk_bytes)  # bounded timed queue
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=slots)
        sender = self._spawn(self._deliver(queue, writer, direction))
        try:
            while True:
                try:
                    data = await reader.read(self.chunk_bytes)
                except (ConnectionError, OSError):
                    data = b""
                if not data:
                    break
                await queue.put((link.delivery_time(len(data), time.monotonic()), data))
            await queue.put((link.delivery_time(0, time.monotonic()), b""))  # end, after the rest
            await sender
        finally:
            sender.cancel()

    async def _deliver(
        self,
        queue: asyncio.Queue[tuple[float, bytes]],
        writer: asyncio.StreamWriter,
        direction: str,
    ) -> None:
        """Write each queued chunk at its delivery time (in order: times only grow)."""
        try:
            while True:
                due, data = await queue.get()
                wait_s = due - time.monotonic()
                if wait_s > 0:
                    await asyncio.sleep(wait_s)
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                if direction == "up":  # counted as handed over, before the far side can see it
                    self.counters.bytes_up += len(data)
                else:
                    self.counters.bytes_down += len(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            writer.close()  # the far side is gone: the other direction ends with it
            while (await queue.get())[1]:  # and what is still read is dropped, not left to block
                pass
