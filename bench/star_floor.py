"""The floor under bench/data_plane.py's hub sides: the same star (8 clients, one server
process, loopback, the same upload and download sizes) with nothing on top of TCP but what
no hub can skip. Three levels, each the one before plus more:

  transport: each client sends its upload's bytes to the server over one plain TCP
      connection (a small header, then the bytes, received into a buffer allocated once) and
      waits for a 1-byte acknowledgement; then asks for the download and receives its bytes.
      No HTTP, no hashing, no disk: what loopback TCP and the cores allow.
  verified: plus the hashing and signatures a hub and its nodes cannot skip:
        - the client signs the upload (sha256 of the body in the signed message, Ed25519:
          `identity.sign_request`) and the server verifies it (`identity.verify_request`:
          the body's sha256, which also names the stored blob, and an Ed25519 verify);
        - the server hashes the update once more: the node's signed claim names the sha256
          of the encoded update (`trust.claims.update_sha256`), another framing of the same
          bytes, so one more pass over them;
        - the client checks the sha256 of its download before using it.
  durable: plus what a hub must do before it acknowledges an upload: write the body to a new
      file, fsync it, rename it into place and fsync the folder (`blobs.LocalBlobStore.put`),
      then append a record to a journal file and fsync that (the committed contribution row
      and nonce: the least a database commit costs).

Not counted, as a hub need not do them on this route: HTTP parsing, JSON, a database engine,
copies of the body, decoding (`codecs.check_payload` checks the int8 scales without decoding:
microseconds). The server runs one thread per connection (hashing, writes and fsync release
the GIL, as in the hub's thread pools); every phase starts at a barrier of the clients, and a
phase's wall time is last finish - first start, as on the hub sides. The server also reports
the CPU seconds (thread time) of each of its steps, and the wall seconds of the stores.
"""

from __future__ import annotations

import hashlib
import os
import queue
import socket
import statistics
import struct
import tempfile
import threading
import time
from pathlib import Path

import torch.multiprocessing as mp

from gridswarm.identity import Identity, sign_request, verify_request

LEVELS = ("transport", "verified", "durable")
UPLOAD, DOWNLOAD, BYE = b"U", b"D", b"Q"
HEADER = struct.Struct("<cQH")  # kind, body length, signature headers' length
LENGTH = struct.Struct("<Q")
PATH = "/v1/runs/floor/contributions"  # the path the signatures cover
UPDATE_OFFSET = 64  # the update digest's pass starts past the upload's own header
TIMEOUT_S = 300.0


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill `view` from `sock` (ConnectionError if the peer closes first)."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("peer closed the connection")
        got += n


def _send_header(sock: socket.socket, kind: bytes, length: int, sig: bytes = b"") -> None:
    sock.sendall(HEADER.pack(kind, length, len(sig)) + sig)


class Server:
    """One server process's state: the download everybody gets, the blob folder, the journal
    and the step costs (under `lock`)."""

    def __init__(self, level: str, download_bytes: int) -> None:
        self.level = level
        self.download = os.urandom(download_bytes)
        self.folder = Path(tempfile.mkdtemp(prefix="bench-star-floor-"))
        self.journal = os.open(
            self.folder / "journal", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600
        )
        self.lock = threading.Lock()
        self.costs = {
            "verify_cpu_s": 0.0,
            "update_hash_cpu_s": 0.0,
            "store_cpu_s": 0.0,
            "store_wall_s": 0.0,
        }

    def store(self, data: memoryview, digest: str) -> None:
        """What LocalBlobStore.put does to make a blob durable, then one fsynced journal
        record."""
        tmp = self.folder / f".tmp-{digest}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.folder / digest)
        dir_fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        with self.lock:
            os.write(self.journal, f"{digest} accepted {time.time():.6f}\n".encode())
            os.fsync(self.journal)

    def accept_upload(self, body: memoryview, sig: bytes) -> None:
        """The checks (and, `durable`, the store) before an upload is acknowledged."""
        if self.level == "transport":
            return
        c0 = time.thread_time()
        headers = dict(line.split("=", 1) for line in sig.decode().split("\n"))
        verified = verify_request(headers, "POST", PATH, body, time.time())
        c1 = time.thread_time()
        hashlib.sha256(body[UPDATE_OFFSET:]).hexdigest()  # the update digest: another framing
        c2, w2 = c3, w3 = time.thread_time(), time.perf_counter()
        if self.level == "durable":
            self.store(body, verified.body_sha256)  # named by the hash the signature covers
            c3, w3 = time.thread_time(), time.perf_counter()
        with self.lock:
            self.costs["verify_cpu_s"] += c1 - c0
            self.costs["update_hash_cpu_s"] += c2 - c1
            self.costs["store_cpu_s"] += c3 - c2
            self.costs["store_wall_s"] += w3 - w2

    def serve(self, conn: socket.socket) -> None:
        """One client's connection: uploads received, checked and acknowledged; downloads
        sent."""
        buffer = bytearray(0)
        head = bytearray(HEADER.size)
        with conn:
            while True:
                _recv_exact(conn, memoryview(head))
                kind, length, sig_len = HEADER.unpack(head)
                sig = bytearray(sig_len)
                _recv_exact(conn, memoryview(sig))
                if kind == BYE:
                    return
                if kind == DOWNLOAD:
                    conn.sendall(LENGTH.pack(len(self.download)))
                    conn.sendall(self.download)
                    continue
                if len(buffer) < length:
                    buffer = bytearray(length)
                body = memoryview(buffer)[:length]
                _recv_exact(conn, body)
                self.accept_upload(body, bytes(sig))
                conn.sendall(b"A")

    def close(self) -> None:
        os.close(self.journal)
        for path in self.folder.iterdir():
            path.unlink()
        self.folder.rmdir()


def server_main(level: str, download_bytes: int, ready, stop) -> None:
    """The server process: a thread per connection until `stop` is set; then its step costs
    go back on `ready`."""
    server = Server(level, download_bytes)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.5)
    ready.put((listener.getsockname()[1], hashlib.sha256(server.download).hexdigest()))
    threads = []
    while not stop.is_set():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threads.append(threading.Thread(target=server.serve, args=(conn,), daemon=True))
        threads[-1].start()
    for t in threads:
        t.join(timeout=10)
    listener.close()
    server.close()
    ready.put(server.costs)


def client_main(
    i: int,
    port: int,
    level: str,
    upload_bytes: int,
    download_digest: str,
    rounds: int,
    barrier,
    results,
) -> None:
    """One client: per round, at the barrier, upload; at the next barrier, download."""
    identity = Identity.generate()
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    inbox = bytearray(0)
    for r in range(rounds):
        body = os.urandom(upload_bytes)  # a fresh update each round, made before the clock
        barrier.wait()
        t0 = time.time()
        sig = b""
        if level != "transport":
            headers = sign_request(identity, "POST", PATH, body)
            sig = "\n".join(f"{k}={v}" for k, v in headers.items()).encode()
        _send_header(sock, UPLOAD, len(body), sig)
        sock.sendall(body)
        _recv_exact(sock, memoryview(bytearray(1)))
        results.put(("up", r, i, t0, time.time(), len(body)))
        barrier.wait()
        t0 = time.time()
        _send_header(sock, DOWNLOAD, 0)
        head = bytearray(LENGTH.size)
        _recv_exact(sock, memoryview(head))
        (length,) = LENGTH.unpack(head)
        if len(inbox) < length:
            inbox = bytearray(length)
        view = memoryview(inbox)[:length]
        _recv_exact(sock, view)
        if level != "transport" and hashlib.sha256(view).hexdigest() != download_digest:
            raise RuntimeError("download does not match its sha256")
        results.put(("down", r, i, t0, time.time(), length))
    _send_header(sock, BYE, 0)
    sock.close()


def star_side(nodes: int, upload_bytes: int, download_bytes: int, rounds: int, level: str) -> dict:
    """`rounds` rounds of the star at `level` with `nodes` clients: per phase and round, wall
    seconds (last end - first start) and bytes, in the `phases` shape, and
    the server's step costs (`server_costs`, summed over all uploads)."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, not {level!r}")
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Event()
    server = ctx.Process(target=server_main, args=(level, download_bytes, ready, stop))
    server.start()
    procs: list = []
    try:
        port, digest = ready.get(timeout=60)
        barrier, results = ctx.Barrier(nodes), ctx.Queue()
        for i in range(nodes):
            args = (i, port, level, upload_bytes, digest, rounds, barrier, results)
            procs.append(ctx.Process(target=client_main, args=args))
            procs[-1].start()
        records: list[tuple] = []
        deadline = time.monotonic() + TIMEOUT_S
        while len(records) < 2 * rounds * nodes:
            try:
                records.append(results.get(timeout=2))
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in [*procs, server]):
                    raise RuntimeError("a floor process failed (traceback above)") from None
                if time.monotonic() > deadline:
                    raise TimeoutError("the star floor did not finish") from None
        for p in procs:
            p.join(timeout=60)
        stop.set()
        costs = ready.get(timeout=60)
    finally:
        stop.set()
        server.join(timeout=30)
        for p in [*procs, server]:
            if p.is_alive():
                p.kill()
    return {"level": level, **phases(records), "server_costs": costs}


def phases(records: list[tuple]) -> dict:
    """Per phase and round of (phase, round, node, start, end, bytes) records, the shape
    bench/data_plane.py's sides report too: wall seconds (last end - first start) and bytes."""
    out: dict = {"up": [], "down": []}
    for phase in out:
        for r in sorted({rec[1] for rec in records if rec[0] == phase}):
            recs = [rec for rec in records if rec[0] == phase and rec[1] == r]
            out[phase].append(
                {
                    "round": r,
                    "wall_s": max(x[4] for x in recs) - min(x[3] for x in recs),
                    "bytes": sum(x[5] for x in recs),
                    "nodes": len(recs),
                }
            )
    return out


def medians(side: dict) -> tuple[float, float, float]:
    """Median upload, download and round (upload + download) seconds of a side."""
    up = [u["wall_s"] for u in side["up"]]
    down = [d["wall_s"] for d in side["down"]]
    rounds = [u + d for u, d in zip(up, down, strict=True)]
    return statistics.median(up), statistics.median(down), statistics.median(rounds)


if __name__ == "__main__":  # a quick look at the three levels
    for name in LEVELS:
        star = star_side(8, 10_939_920, 10_938_952, 3, name)
        print(name, [round(x, 3) for x in medians(star)], star["server_costs"])
