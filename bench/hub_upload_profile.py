"""Where a hub's CPU goes during the upload phase of `bench/hub_request_cost.py`, by part.

Runs the same round as hub_request_cost (a real `gridswarm hub` process on SQLite, N signed
light nodes) and attaches py-spy (a dev tool, not a project dependency: pass its path) to the
hub for the upload phase only, sampling the thread that holds the GIL (`--gil`: the Python
CPU; the kernel's share, fsyncs and all, is the hub's system time beside it). The samples are
then put in the parts of an upload (first rule that matches a stack wins) and printed as shares
of the samples, with the phase's user and system CPU per upload from /proc.

    python bench/hub_upload_profile.py --py-spy /tmp/pyspy/bin/py-spy --nodes 2000
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import hub_load  # beside this file
import hub_request_cost

# (part, a frame the stack must hold, and a pattern the frames below it must match ("": any))
PARTS = [
    ("ticker (tick, pre-screening)", "create_app.<locals>.ticker", ""),
    ("check: facts query", "check_upload", "Connection.execute|Engine.connect|Result.one"),
    ("check: unpack + metadata", "check_upload", "unpack|model_validate"),
    ("check: payload, digest, zero checks", "check_upload", "_check_payload|update_sha256|zero"),
    ("check: blob has / write", "check_upload", "LocalBlobStore"),
    ("check: other", "check_upload", ""),
    ("store: the two rows (Core INSERT, UPDATE)", "_store_contribution", "apply_effects"),
    ("store: acceptance (engine, energy facts)", "_store_contribution", "accept_upload"),
    ("store: other per upload", "_store_contribution", ""),
    ("store: savepoint begin / release", "_store_in_savepoint", ""),
    ("store: the batch's reads, commit, speeds", "_store_batch", ""),
    ("nonce", "NonceBook", ""),
    ("signature", "verify_request", ""),
    ("worker-thread plumbing", "WorkerThread.run", ""),
    ("event loop (HTTP, FastAPI, hops)", "MainThread", ""),
]


def parts(raw: Path) -> tuple[Counter[str], int]:
    """Samples per part of py-spy's raw (collapsed) stacks, and the total."""
    counts: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        if not line.strip():
            continue
        stack, n = line.rsplit(" ", 1)
        total += int(n)
        for name, frame, below in PARTS:
            if frame in stack and (not below or re.search(below, stack[stack.index(frame) :])):
                counts[name] += int(n)
                break
        else:
            counts["other"] += int(n)
    return counts, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--py-spy", type=Path, required=True, help="the py-spy executable")
    parser.add_argument("--nodes", type=int, default=2000)
    parser.add_argument("--hub-src", type=Path, default=None, help="run the hub from here")
    parser.add_argument("--rate", type=int, default=700, help="samples per second")
    args = parser.parse_args()
    spy: dict = {}
    start_hub = hub_request_cost.Swarm.start_hub
    log = hub_load.log

    def started(self, *a, **k) -> None:
        start_hub(self, *a, **k)
        spy["pid"] = self.hub.pid

    def ticks(pid: int) -> tuple[int, int]:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]), int(fields[12])

    def phase(message: str) -> None:
        log(message)
        if message.startswith("download:"):  # the upload phase begins
            spy["raw"] = Path(spy["tmp"]) / "upload.raw"
            command = [str(args.py_spy), "record", "-p", str(spy["pid"]), "--gil", "-r"]
            command += [
                str(args.rate),
                "-f",
                "raw",
                "-o",
                str(spy["raw"]),
                "--nonblocking",
                "--threads",
            ]
            spy["proc"] = subprocess.Popen(command, stdout=subprocess.DEVNULL)
            time.sleep(1.0)  # attached before the first upload
            spy["cpu"] = ticks(spy["pid"])
        elif message.startswith("upload:"):
            user, system = (b - a for a, b in zip(spy["cpu"], ticks(spy["pid"]), strict=True))
            spy["user_ms"] = user * 1000 / hub_load.CLK_TCK / args.nodes
            spy["system_ms"] = system * 1000 / hub_load.CLK_TCK / args.nodes
            spy["proc"].send_signal(signal.SIGINT)
            spy["proc"].wait(timeout=120)

    hub_request_cost.Swarm.start_hub = started
    hub_load.log = phase
    with tempfile.TemporaryDirectory() as tmp:
        spy["tmp"] = tmp
        hub_request_cost.measure(args.hub_src, args.nodes, Path(tmp) / "hub")
        counts, total = parts(spy["raw"])
    print(f"`python bench/hub_upload_profile.py {' '.join(sys.argv[1:])}`\n")
    print(
        f"upload phase, {args.nodes} uploads: hub CPU {spy['user_ms']:.2f} ms user + "
        f"{spy['system_ms']:.2f} ms system per upload; {total} GIL-holding samples\n"
    )
    print("| part | share of the GIL-holding samples |\n|---|---|")
    for name, n in counts.most_common():
        print(f"| {name} | {100 * n / total:.1f} % |")


if __name__ == "__main__":
    main()
