"""Test helpers: a recording TCP proxy between nodes and hub, and a search for private text in
what it recorded (raw and in the obvious encodings)."""

from __future__ import annotations

import base64
import binascii
import contextlib
import random
import socket
import threading
import urllib.parse

import numpy as np


class RecordingProxy:
    """Forwards 127.0.0.1:port to the hub's port and keeps every byte each connection sent
    towards the hub (one buffer per connection, so a needle is never split by interleaving)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.to_hub: list[bytearray] = []
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            upstream.settimeout(None)
            record = bytearray()
            with self._lock:
                self.to_hub.append(record)
                self._sockets += [client, upstream]
            threading.Thread(
                target=self._pump, args=(client, upstream, record), daemon=True
            ).start()
            threading.Thread(target=self._pump, args=(upstream, client, None), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, record: bytearray | None) -> None:
        try:
            while chunk := src.recv(65536):
                if record is not None:
                    record += chunk
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    @property
    def bytes_to_hub(self) -> int:
        with self._lock:
            return sum(len(r) for r in self.to_hub)

    def streams(self) -> list[bytes]:
        with self._lock:
            return [bytes(r) for r in self.to_hub]

    def close(self) -> None:
        self.listener.close()
        with self._lock:
            for sock in self._sockets:
                sock.close()


def encodings(needle: bytes) -> dict[str, list[bytes]]:
    """`needle` as it would look raw, as UTF-16, hex, URL-encoded, base64 (any alignment) or as
    byte-level token ids stored as int32/int64."""
    ids = np.frombuffer(needle, dtype=np.uint8)
    b64 = []
    for shift in range(3):  # base64 of a longer text holds the needle's aligned middle part
        part = needle[shift:]
        part = part[: len(part) - len(part) % 3]
        b64.append(base64.b64encode(part))
        b64.append(base64.urlsafe_b64encode(part))
    return {
        "raw": [needle],
        "utf-16": [needle.decode("latin-1").encode("utf-16-le")],
        "hex": [binascii.hexlify(needle), binascii.hexlify(needle).upper()],
        "url": [urllib.parse.quote(needle).encode(), urllib.parse.quote_plus(needle).encode()],
        "base64": b64,
        "token-ids": [ids.astype("<i4").tobytes(), ids.astype("<i8").tobytes()],
    }


def find_leaks(haystacks: list[bytes], needles: list[bytes]) -> list[tuple[bytes, str]]:
    """(needle, encoding) for every needle found in any haystack in any encoding."""
    found = []
    for needle in needles:
        for kind, forms in encodings(needle).items():
            if any(form in hay for form in forms for hay in haystacks):
                found.append((needle, kind))
    return found


def sample_ngrams(text: bytes, n: int, count: int, seed: int) -> list[bytes]:
    """`count` random n-byte windows of `text`."""
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(text) - n) for _ in range(count)]
    return [text[s : s + n] for s in starts]
