"""Run a Python module under a light sampling profiler that sees every thread (bench use only).

cProfile sees only the thread that enabled it, and the hub answers requests in a thread pool, so
this samples the stacks of all threads (`sys._current_frames`) every `interval` seconds and
counts only threads the kernel reports running (`R` in /proc/self/task/TID/stat): CPU, not
waiting on a lock, a socket or PostgreSQL. SIGUSR1 clears the counts (start of a measuring
window); SIGUSR2 writes them as JSON to OUT (end of the window); they are written at exit too.
Beside the samples it stores each thread's own CPU seconds in the window (utime + stime from
/proc/self/task/TID/stat, read about once a second so threads that end are kept), grouped by
thread name: the ticker, the event loop, the request worker threads, the sampler itself. A
sample counts a thread that is runnable, so one waiting for a core or the GIL counts too; the
CPU seconds are what the kernel charged.

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
CPU_READ_EVERY_S = 0.5  # how often each thread's CPU time is read
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def thread_cpu_s() -> dict[int, float]:
    """Each thread of this process: its CPU seconds so far (user + system), by native id."""
    cpu = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        cpu[int(tid)] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S
    return cpu


def thread_group(name: str) -> str:
    """A thread's name without its number: 'AnyIO worker thread', 'round-ticker', …"""
    return name.split(" (", 1)[0].rstrip("-0123456789") or name


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
        self.by_thread: Counter[str] = Counter()  # samples by thread group
        self.cpu_start = thread_cpu_s()  # native id -> CPU seconds at the window's start
        self.cpu_last: dict[int, tuple[str, float]] = {}  # native id -> (group, CPU s) lately

    def read_cpu(self) -> None:
        """Note every live thread's CPU seconds (and group) now."""
        names = {t.native_id: thread_group(t.name) for t in threading.enumerate()}
        for tid, cpu in thread_cpu_s().items():
            self.cpu_last[tid] = (names.get(tid, "other"), cpu)

    def cpu_by_group(self) -> dict[str, float]:
        """CPU seconds each thread group used in the window (threads that ended included up
        to their last reading)."""
        self.read_cpu()
        groups: Counter[str] = Counter()
        for tid, (group, cpu) in self.cpu_last.items():
            groups[group] += cpu - self.cpu_start.get(tid, 0.0)
        return {g: round(s, 2) for g, s in groups.most_common()}

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
        threads = {t.ident: t for t in threading.enumerate()}
        for ident, frame in sys._current_frames().items():
            thread = threads.get(ident)
            if ident == self.me or thread is None or thread.native_id not in running:
                continue
            self.samples += 1
            self.by_thread[thread_group(thread.name)] += 1
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
        cpu_read_at = 0.0
        while True:
            time.sleep(self.interval_s)
            with suppress(Exception):  # a thread ending mid-walk: skip this sample
                self.sample()
            if time.monotonic() - cpu_read_at >= CPU_READ_EVERY_S:
                cpu_read_at = time.monotonic()
                with suppress(Exception):
                    self.read_cpu()

    def dump(self) -> None:
        document = {
            "samples": self.samples,
            "interval_s": self.interval_s,
            "seconds": round(time.monotonic() - self.started, 1),
            "thread_cpu_s": self.cpu_by_group(),
            "samples_by_thread": self.by_thread.most_common(),
            "inclusive": self.inclusive.most_common(200),
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
