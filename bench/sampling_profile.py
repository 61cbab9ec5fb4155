"""Run a Python module under a light sampling profiler that sees every thread (bench use only).

cProfile sees only the thread that enabled it, and the hub answers requests in a thread pool, so
this samples the stacks of all threads (`sys._current_frames`) every `interval` seconds and
counts only threads the kernel reports running (`R` in /proc/self/task/TID/stat): CPU, not
waiting on a lock, a socket or PostgreSQL. SIGUSR1 clears the counts (start of a measuring
window); SIGUSR2 writes them as JSON to OUT (end of the window); they are written at exit too.

    python bench/sampling_profile.py OUT.json 0.01 -m gridswarm.cli hub --db … --port …
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import signal
import sys
import threading
import time
from collections import Counter
from contextlib import suppress
from pathlib import Path

MAX_DEPTH = 80  # frames walked per stack


class Sampler:
    """Counts, over the running threads' stacks: each function once per sample (inclusive), the
    innermost frame (self), and the innermost frame of this project's code (where in gridswarm
    the CPU goes, whatever library it is spent in)."""

    def __init__(self, out: Path, interval_s: float) -> None:
        self.out, self.interval_s = out, interval_s
        self.me = 0  # the sampling thread's ident (set when it starts): never sampled
        self.clear()

    def clear(self) -> None:
        self.samples = 0
        self.started = time.monotonic()
        self.inclusive: Counter[str] = Counter()
        self.leaf: Counter[str] = Counter()
        self.own_leaf: Counter[str] = Counter()

    @staticmethod
    def running_natives() -> set[int]:
        running = set()
        for tid in os.listdir("/proc/self/task"):
            try:
                stat = Path(f"/proc/self/task/{tid}/stat").read_text()
            except OSError:
                continue
            if stat.rsplit(")", 1)[1].split()[0] == "R":
                running.add(int(tid))
        return running

    def sample(self) -> None:
        running = self.running_natives()
        natives = {t.ident: t.native_id for t in threading.enumerate()}
        for ident, frame in sys._current_frames().items():
            if ident == self.me or natives.get(ident) not in running:
                continue
            self.samples += 1
            seen: set[str] = set()
            own = None
            depth = 0
            f = frame
            while f is not None and depth < MAX_DEPTH:
                code = f.f_code
                name = f"{code.co_filename.rsplit('site-packages/', 1)[-1]}:{code.co_name}"
                if depth == 0:
                    self.leaf[name] += 1
                if own is None and "gridswarm" in code.co_filename:
                    own = f"{name}:{f.f_lineno}"
                seen.add(name)
                f, depth = f.f_back, depth + 1
            self.inclusive.update(seen)
            if own is not None:
                self.own_leaf[own] += 1

    def loop(self) -> None:
        self.me = threading.get_ident()
        while True:
            time.sleep(self.interval_s)
            with suppress(Exception):  # a thread ending mid-walk: skip this sample
                self.sample()

    def dump(self) -> None:
        document = {
            "samples": self.samples,
            "interval_s": self.interval_s,
            "seconds": round(time.monotonic() - self.started, 1),
            "inclusive": self.inclusive.most_common(60),
            "self": self.leaf.most_common(40),
            "gridswarm_line": self.own_leaf.most_common(40),
        }
        self.out.write_text(json.dumps(document, indent=1))


def main() -> None:
    out, interval = Path(sys.argv[1]), float(sys.argv[2])
    if sys.argv[3] != "-m":
        sys.exit("usage: sampling_profile.py OUT INTERVAL_S -m MODULE ARGS…")
    module, sys.argv = sys.argv[4], [sys.argv[4], *sys.argv[5:]]
    sampler = Sampler(out, interval)
    signal.signal(signal.SIGUSR1, lambda *_: sampler.clear())
    signal.signal(signal.SIGUSR2, lambda *_: sampler.dump())
    atexit.register(sampler.dump)
    threading.Thread(target=sampler.loop, daemon=True, name="sampler").start()
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
