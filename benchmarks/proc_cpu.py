"""CPU seconds of this process's descendants (Ray's GCS, raylet, its helper processes, the workers), read from /proc.

A sampling thread walks the process tree under this process every ``every`` seconds and keeps each
process's latest user+system time, so processes that exit between samples lose at most their last
interval; the thread's own CPU (``own``) is the caller's to subtract from its process's. Linux
only; elsewhere :attr:`available` is False and the figures are empty.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

__all__ = ["ProcessCPU"]

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
# NOTE: what each of Ray's processes is, from a word of its command line
_KINDS = (
    ("default_worker", "worker"),
    ("ray::", "worker"),
    ("raylet", "raylet"),
    ("gcs_server", "gcs"),
    ("dashboard/agent", "dashboard agent"),
    ("dashboard.py", "api server"),
    ("log_monitor", "log monitor"),
    ("monitor.py", "autoscaler monitor"),
    ("runtime_env", "runtime-env agent"),
    ("ray_process_reaper", "reaper"),
)


def _table() -> dict[int, list[tuple[int, float]]]:
    """parent pid -> [(pid, cpu seconds)] for every process now."""
    children: dict[int, list[tuple[int, float]]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(
            (int(entry), (int(fields[11]) + int(fields[12])) / _TICK)
        )
    return children


def _kind(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "other"
    for word, kind in _KINDS:
        if word in command:
            return kind
    return "other (" + command.split(" ", 1)[0].rsplit("/", 1)[-1][:20] + ")"


@dataclass
class ProcessCPU:
    every: float = 0.5
    available: bool = field(default_factory=lambda: os.path.isdir("/proc/self/task"))
    seconds: dict[int, float] = field(default_factory=dict)
    kinds: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.own = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        if not self.available:
            return
        table, stack = _table(), [os.getpid()]
        while stack:
            for pid, cpu in table.get(stack.pop(), []):
                stack.append(pid)
                if pid not in self.kinds:
                    self.kinds[pid] = _kind(pid)
                self.seconds[pid] = max(self.seconds.get(pid, 0.0), cpu)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.every)
        self.own = (
            time.thread_time()
        )  # NOTE: this thread's CPU: the caller's process CPU less this is its own work

    def __enter__(self) -> ProcessCPU:
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sample()
        self._stop.set()
        self._thread.join()

    def by_kind(self) -> dict[str, float]:
        """CPU seconds per kind of process (``worker``, ``raylet``, ...), over the processes seen."""
        out: dict[str, float] = {}
        for pid, cpu in self.seconds.items():
            out[self.kinds[pid]] = out.get(self.kinds[pid], 0.0) + cpu
        return out
