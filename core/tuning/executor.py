"""Where trials and batch jobs run: Ray tasks, each in its own worker process.

Local by default (``ray.init`` with ``workers`` CPUs, no dashboard: it starts in a few seconds);
``address`` attaches to an existing cluster. Each job runs in a fresh worker process
(``max_calls=1``), with no retries: a job that crashes, exceeds its memory limit (a watchdog in
the worker) or its time limit (cancelled by force) comes back as a failed :class:`Outcome` and the
caller goes on. Ray is imported only here, and only when an executor is made.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from modelpress.errors import ModelpressError

__all__ = ["Job", "Outcome", "RayExecutor", "import_ray"]

# NOTE: light local start: no dashboard, a small object store (models travel once, as bytes)
_OBJECT_STORE_BYTES = 512 * 2**20


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ModelpressError("tune and batch compression run on Ray: pip install 'modelpress[distributed]'") from None
    return ray


@dataclass
class Job:
    ref: Any
    key: Any
    started: float
    timeout_s: float | None
    memory_mb: float | None


@dataclass
class Outcome:
    job: Job
    ok: bool
    value: Any = None
    error: str = ""
    seconds: float = 0.0


def _rss_mb() -> float:
    """Resident memory of this process and its children (Linux /proc; else the peak from getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            own = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return own


def _watch_memory(limit_mb: float) -> None:
    while True:
        rss = _rss_mb()
        if rss > limit_mb:
            os.write(2, f"modelpress: job exceeded its memory limit ({rss:.0f} MB > {limit_mb:.0f} MB)\n".encode())
            os._exit(137)
        time.sleep(0.1)


def _run_job(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], memory_mb: float | None) -> Any:
    """Runs inside the Ray worker process."""
    import ray

    def resolve(value: Any) -> Any:
        # NOTE: Ray resolves object references only at the top level of a task's arguments
        if isinstance(value, ray.ObjectRef):
            return ray.get(value)
        if isinstance(value, dict):
            return {k: resolve(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(resolve(v) for v in value)
        return value

    args, kwargs = resolve(args), resolve(kwargs)
    # NOTE: a job holds one CPU (Ray sets OMP_NUM_THREADS for torch likewise); ORT sessions follow this
    os.environ.setdefault("MODELPRESS_THREADS", "1")
    if memory_mb:
        threading.Thread(target=_watch_memory, args=(memory_mb,), daemon=True).start()
    return fn(*args, **kwargs)


class RayExecutor:
    """Submit functions as Ray tasks; collect their outcomes; cancel those past their time limit."""

    def __init__(self, workers: int | None = None, address: str | None = None):
        ray = import_ray()
        self.ray = ray
        self.owns_session = False
        if not ray.is_initialized():
            if address:
                try:
                    ray.init(address=address, log_to_driver=False, configure_logging=False)
                except Exception as exc:
                    raise ModelpressError(f"cannot attach to the Ray cluster at {address!r}: {exc}") from None
            else:
                ray.init(num_cpus=workers or os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
                         configure_logging=False, object_store_memory=_OBJECT_STORE_BYTES)
            self.owns_session = True
        # NOTE: max_calls=1: a fresh process per job, so a crash or a leak stays inside its job
        self._remote = ray.remote(num_cpus=1, max_retries=0, max_calls=1)(_run_job)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        # NOTE: on a session that is already up (a cluster, a test's), `workers` still caps the parallel jobs
        self.workers = max(1, min(workers, cpus) if workers else cpus)
        self.running: dict[Any, Job] = {}

    def put(self, value: Any) -> Any:
        return self.ray.put(value)

    def submit(self, key: Any, fn: Callable[..., Any], *args: Any, timeout_s: float | None = None,
               memory_mb: float | None = None, **kwargs: Any) -> Job:
        ref = self._remote.remote(fn, args, kwargs, memory_mb)
        job = Job(ref, key, time.monotonic(), timeout_s, memory_mb)
        self.running[ref] = job
        return job

    def wait(self, timeout: float = 0.5) -> list[Outcome]:
        """Outcomes of the jobs that finished (or ran out of time) within ``timeout`` seconds."""
        if not self.running:
            return []
        done, _ = self.ray.wait(list(self.running), num_returns=len(self.running), timeout=timeout)
        outcomes = [self._collect(self.running.pop(ref)) for ref in done]
        now = time.monotonic()
        for ref, job in list(self.running.items()):
            if job.timeout_s is not None and now - job.started > job.timeout_s:
                self.ray.cancel(ref, force=True)
                self.running.pop(ref)
                outcomes.append(Outcome(job, False, error=f"exceeded its time limit of {job.timeout_s:.0f}s (cancelled)",
                                        seconds=now - job.started))
        return outcomes

    def _collect(self, job: Job) -> Outcome:
        seconds = time.monotonic() - job.started
        try:
            return Outcome(job, True, self.ray.get(job.ref), seconds=seconds)
        except self.ray.exceptions.RayTaskError as exc:
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            return Outcome(job, False, error=f"{type(cause).__name__}: {' '.join(str(cause).split())[:500]}", seconds=seconds)
        except (self.ray.exceptions.WorkerCrashedError, self.ray.exceptions.OutOfMemoryError) as exc:
            limit = f" (or exceeded its memory limit of {job.memory_mb:.0f} MB)" if job.memory_mb else ""
            return Outcome(job, False, error=f"worker process died{limit}: {type(exc).__name__}", seconds=seconds)
        except self.ray.exceptions.RayError as exc:
            return Outcome(job, False, error=f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}", seconds=seconds)

    def cancel_all(self) -> list[Job]:
        jobs = list(self.running.values())
        for ref in list(self.running):
            try:
                self.ray.cancel(ref, force=True)
            except Exception:  # NOTE: Ray itself may be gone (Ctrl-C reaches its processes too)
                pass
        self.running.clear()
        return jobs

    def shutdown(self) -> None:
        self.cancel_all()
        if self.owns_session:
            self.ray.shutdown()
