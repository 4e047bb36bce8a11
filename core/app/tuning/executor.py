"""Where trials and batch jobs run: Ray tasks in worker processes that are kept between jobs.

Local by default (a new ``ray.init`` instance with ``workers`` CPUs, no dashboard: it starts in a few
seconds, whatever an earlier ``ray start`` left in Ray's temp dir); ``address`` (or ``RAY_ADDRESS``)
attaches to an existing cluster. A job runs in a Ray worker process that Ray keeps for
the next jobs (up to :data:`JOBS_PER_WORKER`, then it is replaced, which bounds what a leak can
gather): the imports (modelpress, ONNX Runtime, torch) are paid once per worker, not once per job.
``fresh_workers=True`` runs every job in a new process instead. Ray retries nothing: a job that
crashes, exceeds its memory limit (a watchdog in the worker, running while the job runs) or its
time limit (cancelled by force, which ends its process) comes back as a failed :class:`Outcome`
and the caller goes on; a job that raises does too, with its timing. A job whose node died comes
back failed with ``node_lost`` set (the caller may submit it again: Ray places it on a node that is
alive). Every outcome names the node and host the job ran on; the model and data reach the workers
as Ray objects, so a worker node needs none of the driver's files. Each job holds one CPU and its thread pools (ONNX Runtime, torch, BLAS) use
one thread, so parallel jobs do not oversubscribe the cores. Ray is imported only here, and only
when an executor is made.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from modelpress.base.errors import ModelpressError

__all__ = ["JOBS_PER_WORKER", "Job", "Outcome", "RayExecutor", "import_ray"]

# NOTE: light local start: no dashboard, a small object store (models travel once, as bytes)
_OBJECT_STORE_BYTES = 512 * 2**20
JOBS_PER_WORKER = 25
_CPUS_PER_JOB = 1
_THREAD_ENV = {
    name: str(_CPUS_PER_JOB)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "MODELPRESS_THREADS")
}


def _worker_options(fresh: bool = False) -> dict[str, Any]:
    """Ray starts workers with OMP_NUM_THREADS=1 unless it is set, and a job sets the rest before numpy, torch or ORT
    read them. A thread variable set otherwise in this environment would reach the workers' BLAS before a job could
    change it: then the workers start with ours (a runtime env; it makes Ray start new worker processes, so only then).
    ``fresh`` (a new process per job): a runtime env of their own, so Ray never hands such a job an idle worker
    that ran other jobs of the same Ray session (max_calls=1 only ends a worker after its call)."""
    clash = any(
        os.environ.get(name, value) != value
        for name, value in _THREAD_ENV.items()
        if name != "MODELPRESS_THREADS"
    )
    env = dict(_THREAD_ENV) if clash else {}
    if fresh:
        env["MODELPRESS_FRESH_WORKER"] = "1"
    return {"runtime_env": {"env_vars": env}} if env else {}


def _warm_up(fn: Callable[..., Any], args: tuple[Any, ...]) -> int:
    """Runs ``fn`` (imports, say) in a worker while the driver prepares the study."""
    os.environ.update(_THREAD_ENV)
    fn(*args)
    _limit_torch_threads()
    _freeze_imports()
    return os.getpid()


def _limit_torch_threads() -> None:
    """torch, once imported, reads no environment variable again: its pools are set here (inter-op: once, before any use)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return
    torch.set_num_threads(_CPUS_PER_JOB)
    if torch.get_num_interop_threads() != _CPUS_PER_JOB:
        try:
            torch.set_num_interop_threads(_CPUS_PER_JOB)
        except (
            RuntimeError
        ):  # NOTE: too late once the inter-op pool has started; eager training does not use it
            pass


_FROZEN_MODULES = 0


def _freeze_imports() -> None:
    """Move what is loaded now (modules, their objects) out of the cyclic GC's reach: with torch imported a full
    collection takes ~0.2 s of CPU, as much as a small trial; after this it scans only what the jobs made."""
    global _FROZEN_MODULES
    gc.collect()
    gc.freeze()
    _FROZEN_MODULES = len(sys.modules)


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ModelpressError(
            "tune and batch compression run on Ray: pip install 'modelpress[distributed]'"
        ) from None
    return ray


@dataclass
class Job:
    ref: Any
    key: Any
    started: float
    timeout_s: float | None
    memory_mb: float | None
    submitted: float = 0.0  # NOTE: time.time(), comparable with the worker's clock on one machine


@dataclass
class Outcome:
    job: Job
    ok: bool
    value: Any = None
    error: str = ""
    seconds: float = 0.0
    # NOTE: where the time went, from the worker: seconds from submit to the job's start ("queued"), the
    # worker's CPU seconds before the job (its start-up and imports when it is new) and during it, and
    # how many jobs the worker ran before this one
    timing: dict[str, Any] = field(default_factory=dict)
    node_lost: bool = False  # NOTE: the job's node died under it (its raylet ended): the job may run again elsewhere


def _where() -> dict[str, str]:
    """The Ray node and the host this worker runs on."""
    import socket

    import ray

    return {"node": ray.get_runtime_context().get_node_id(), "host": socket.gethostname()}


_NODE_ID = re.compile(r"node ID:? ([0-9a-f]{16,})")


def _rss_mb() -> float:
    """Resident memory of this process (Linux /proc; else the peak from getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            own = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return own


def _watch_memory(limit_mb: float, done: threading.Event) -> None:
    while not done.is_set():
        rss = _rss_mb()
        if rss > limit_mb:
            os.write(
                2,
                f"modelpress: job exceeded its memory limit ({rss:.0f} MB > {limit_mb:.0f} MB)\n".encode(),
            )
            os._exit(137)
        done.wait(0.1)


_JOBS_RUN = 0


def _run_job(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    memory_mb: float | None,
    kept: bool = True,
) -> dict[str, Any]:
    """Runs inside the Ray worker process (``kept``: which runs more jobs after this one); the job's value with its timing."""
    import ray

    global _JOBS_RUN
    began, cpu_before = time.time(), time.process_time()

    def resolve(value: Any) -> Any:
        # NOTE: Ray resolves object references only at the top level of a task's arguments
        if isinstance(value, ray.ObjectRef):
            return ray.get(value)
        if isinstance(value, dict):
            return {k: resolve(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(resolve(v) for v in value)
        return value

    # NOTE: the worker was started with these; a job that changed them must not leak them into the next
    os.environ.update(_THREAD_ENV)
    _limit_torch_threads()
    done = threading.Event()
    if memory_mb:
        threading.Thread(target=_watch_memory, args=(memory_mb, done), daemon=True).start()
    if kept and _FROZEN_MODULES == 0:
        _freeze_imports()
    value, error, cpu_args = None, None, cpu_before
    try:
        args, kwargs = resolve(args), resolve(kwargs)
        cpu_args = time.process_time()
        value = fn(*args, **kwargs)
    except (
        Exception
    ) as exc:  # NOTE: reported here, with the timing: a failed trial's time is accounted for too
        error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}"
    finally:
        cpu_fn = time.process_time()
        done.set()
        _JOBS_RUN += 1
        args = kwargs = None  # type: ignore[assignment]
        if (
            kept and len(sys.modules) > _FROZEN_MODULES + 20
        ):  # NOTE: the job imported more (torch, say): freeze that too
            _freeze_imports()
        elif kept and memory_mb:
            gc.collect()  # NOTE: the next job's memory limit counts from what this one left
    # NOTE: "cpu" splits into "cpu_setup" (the arguments fetched, the imports frozen), the job itself and "cpu_cleanup"
    cpu_end = time.process_time()
    return {
        "value": value,
        "error": error,
        "timing": {
            "began": began,
            "ended": time.time(),
            "cpu_before": round(cpu_before, 4),
            "cpu": round(cpu_end - cpu_before, 4),
            "cpu_setup": round(cpu_args - cpu_before, 4),
            "cpu_cleanup": round(cpu_end - cpu_fn, 4),
            "earlier_jobs": _JOBS_RUN - 1,
            "pid": os.getpid(),
            **_where(),
        },
    }


# NOTE: Ray's logger for its token-authentication notice (a stable name; if it changes, the notice just shows)
_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


class _QuietAuthNotice(logging.Filter):
    """Drops Ray's "Token authentication is enabled for this Ray cluster" notice, printed on every local start."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled")


def _start_ray(ray: Any, workers: int | None, address: str | None) -> None:
    """Attach to the cluster at ``address`` (or ``RAY_ADDRESS``), else start a local instance of our own.

    NOTE: ``address="local"``: a plain ``ray.init()`` attaches to whatever cluster ``ray_current_cluster`` (in Ray's
    temp dir) names, even one whose processes died long ago, and then refuses ``num_cpus``; a local run never
    attaches by accident. Ray's authentication is left as Ray sets it; only its notice is filtered out.
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        except Exception as exc:
            raise ModelpressError(
                f"cannot attach to the Ray cluster at {address!r}: {exc}"
            ) from None
        return
    quiet, logger = _QuietAuthNotice(), logging.getLogger(_AUTH_LOGGER)
    logger.addFilter(quiet)
    try:
        ray.init(
            address="local",
            num_cpus=workers or os.cpu_count() or 1,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            object_store_memory=_OBJECT_STORE_BYTES,
        )
    finally:
        logger.removeFilter(quiet)


class RayExecutor:
    """Submit functions as Ray tasks; collect their outcomes; cancel those past their time limit."""

    def __init__(
        self, workers: int | None = None, address: str | None = None, *, fresh_workers: bool = False
    ):
        ray = import_ray()
        self.ray = ray
        self.owns_session = False
        if not ray.is_initialized():
            _start_ray(ray, workers, address)
            self.owns_session = True
        self.fresh_workers = fresh_workers
        # NOTE: SPREAD: Ray's default packs jobs on the driver's node and queues them there while it is busy, leaving
        # other nodes idle; jobs are CPU-bound, so they go to the node with the most room (the warm-ups too: each node warms)
        options = dict(
            num_cpus=_CPUS_PER_JOB,
            max_retries=0,
            max_calls=1 if fresh_workers else JOBS_PER_WORKER,
            scheduling_strategy="SPREAD",
            **_worker_options(fresh_workers),
        )
        self._remote = ray.remote(**options)(_run_job)
        self._warm = ray.remote(**options)(_warm_up)
        self._warming: list[Any] = []
        cpus = int(ray.cluster_resources().get("CPU", 1))
        # NOTE: on a session that is already up (a cluster, a test's), `workers` still caps the parallel jobs
        self.workers = max(1, min(workers, cpus) if workers else cpus)
        self.running: dict[Any, Job] = {}
        given = address or os.environ.get("RAY_ADDRESS") or None
        # NOTE: attached: to a cluster at an address, or to a Ray session this process had already started (a test's)
        self.attached = given is not None or not self.owns_session
        self.address = given or (
            "local" if self.owns_session else ray.get_runtime_context().gcs_address
        )
        self.nodes = self._alive_nodes()
        self._described: dict[str, Any] | None = None

    def _alive_nodes(self) -> dict[str, dict[str, Any]]:
        return {
            n["NodeID"]: {
                "node": n["NodeID"],
                "host": n.get("NodeManagerHostname", ""),
                "ip": n.get("NodeManagerAddress", ""),
                "cpus": n.get("Resources", {}).get("CPU", 0),
            }
            for n in self.ray.nodes()
            if n.get("Alive")
        }

    def lost_nodes(self) -> set[str]:
        """Nodes seen alive by this executor that are gone now (those that joined since are added to :attr:`nodes`).
        With nodes lost, no more jobs run at a time than the CPUs left (the rest would wait in Ray's queue, their time
        limits running)."""
        alive = self._alive_nodes()
        for node, info in alive.items():
            self.nodes.setdefault(node, info)
        lost = set(self.nodes) - set(alive)
        if lost:
            self.workers = max(
                1, min(self.workers, int(sum(info["cpus"] for info in alive.values())))
            )
        return lost

    def _lost_after_crash(self, wait_s: float = 30.0) -> set[str]:
        """The nodes lost, looked at again for up to ``wait_s`` on a cluster of several nodes: a worker killed with
        its node is reported (WorkerCrashedError) before Ray's health checks declare the node dead (seconds later),
        and a trial lost with its node must be told from a crash of its own. One node: nothing to wait for."""
        deadline = time.monotonic() + (wait_s if len(self.nodes) > 1 else 0.0)
        while True:
            lost = self.lost_nodes()
            if lost or time.monotonic() >= deadline:
                return lost
            time.sleep(0.5)

    def describe(self) -> dict[str, Any]:
        """Where the jobs ran, for reports: the executor, the cluster address and the nodes this executor saw (as of
        :meth:`shutdown`, once shut down)."""
        if self._described is not None:
            return self._described
        lost = self.lost_nodes()
        return {
            "executor": "ray",
            "address": self.address,
            "attached": self.attached,
            "nodes": [{**info, "alive": node not in lost} for node, info in self.nodes.items()],
        }

    def warm_up(self, count: int, fn: Callable[..., Any], *args: Any) -> None:
        """Have ``count`` idle workers run ``fn`` now, e.g. the jobs' imports, overlapping the driver's own work (not with fresh workers)."""
        if not self.fresh_workers:
            self._warming += [self._warm.remote(fn, args) for _ in range(count)]

    def put(self, value: Any) -> Any:
        return self.ray.put(value)

    def submit(
        self,
        key: Any,
        fn: Callable[..., Any],
        *args: Any,
        timeout_s: float | None = None,
        memory_mb: float | None = None,
        **kwargs: Any,
    ) -> Job:
        ref = self._remote.remote(fn, args, kwargs, memory_mb, not self.fresh_workers)
        job = Job(ref, key, time.monotonic(), timeout_s, memory_mb, time.time())
        self.running[ref] = job
        return job

    def wait(self, timeout: float = 1.0) -> list[Outcome]:
        """Blocks until a job finishes or runs out of time, at most ``timeout`` seconds; the outcomes then."""
        if not self.running:
            return []
        now = time.monotonic()
        limits = [
            job.started + job.timeout_s - now
            for job in self.running.values()
            if job.timeout_s is not None
        ]
        timeout = max(0.0, min([timeout, *limits]))
        done, rest = self.ray.wait(list(self.running), num_returns=1, timeout=timeout)
        if done and rest:  # NOTE: and whatever else finished meanwhile
            done += self.ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        outcomes = [self._collect(self.running.pop(ref)) for ref in done]
        now = time.monotonic()
        late = [
            ref
            for ref, job in self.running.items()
            if job.timeout_s is not None and now - job.started > job.timeout_s
        ]
        cancelled = self._cancel_unfinished(late)
        for ref in late:
            job = self.running.pop(ref)
            if ref not in cancelled:  # NOTE: its result came in just now: it counts
                outcomes.append(self._collect(job))
                continue
            outcomes.append(
                Outcome(
                    job,
                    False,
                    error=f"exceeded its time limit of {job.timeout_s:.0f}s (cancelled)",
                    seconds=now - job.started,
                )
            )
        return outcomes

    def _cancel_unfinished(self, refs: list[Any]) -> set[Any]:
        """Cancel by force those of ``refs`` whose result is not here yet; returns them.

        NOTE: a forced cancel racing the task's own reply aborts Ray's core worker in the driver
        ("Tried to complete task that was not pending", ray-project/ray#54798; seen with Ray 2.60
        once in a CI run, which took the whole test session down with exit 1). A task whose
        result has arrived is not cancelled, which leaves only a reply in flight at that instant."""
        if not refs:
            return set()
        arrived = set(self.ray.wait(refs, num_returns=len(refs), timeout=0)[0])
        pending = {ref for ref in refs if ref not in arrived}
        for ref in pending:
            try:
                self.ray.cancel(ref, force=True)
            except Exception:  # NOTE: Ray itself may be gone (Ctrl-C reaches its processes too)
                pass
        return pending

    def _collect(self, job: Job) -> Outcome:
        seconds = time.monotonic() - job.started
        try:
            result = self.ray.get(job.ref)
            timing = result["timing"]
            timing["queued"] = round(timing["began"] - job.submitted, 4)
            if result["error"] is not None:
                return Outcome(job, False, error=result["error"], seconds=seconds, timing=timing)
            return Outcome(job, True, result["value"], seconds=seconds, timing=timing)
        except self.ray.exceptions.RayTaskError as exc:
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            return _failed(
                job, seconds, f"{type(cause).__name__}: {' '.join(str(cause).split())[:500]}"
            )
        except self.ray.exceptions.NodeDiedError as exc:
            self.lost_nodes()
            node = _NODE_ID.search(str(exc))
            return _failed(
                job,
                seconds,
                f"node lost: node {node.group(1) if node else '?'} died while the job ran (NodeDiedError)",
                timing={"node": node.group(1)} if node else {},
                node_lost=True,
            )
        except self.ray.exceptions.OutOfMemoryError as exc:
            return _failed(
                job,
                seconds,
                f"out of memory: Ray's memory monitor ended the worker: {' '.join(str(exc).split())[:300]}",
            )
        except self.ray.exceptions.WorkerCrashedError as exc:
            lost = self._lost_after_crash()
            if lost:  # NOTE: a node's workers may die before its raylet is declared dead: then Ray says the worker crashed
                return _failed(
                    job,
                    seconds,
                    f"node lost: node {', '.join(sorted(lost))} died while the job ran (its worker crashed)",
                    node_lost=True,
                )
            limit = (
                f" (or exceeded its memory limit of {job.memory_mb:.0f} MB)"
                if job.memory_mb
                else ""
            )
            return _failed(job, seconds, f"worker process died{limit}: {type(exc).__name__}")
        except self.ray.exceptions.RayError as exc:
            return _failed(
                job, seconds, f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            )

    def cancel_all(self, *, cancel: bool = True) -> list[Job]:
        """The jobs still running, forgotten; each cancelled by force unless ``cancel=False`` (on
        Ctrl-C: the driver is about to exit and Ray ends a driver's tasks with it; a forced cancel
        racing a task's reply aborted Ray's core worker once, "Tried to complete task that was not
        pending", exit 1 instead of 130)."""
        jobs = list(self.running.values())
        if cancel:
            try:
                self._cancel_unfinished([*self.running, *self._warming])
            except Exception:  # NOTE: Ray itself may be gone (Ctrl-C reaches its processes too)
                pass
        self.running.clear()
        self._warming.clear()
        return jobs

    def shutdown(self) -> None:
        self.cancel_all()
        try:
            self._described = self.describe()
        except Exception:  # NOTE: Ray itself may be gone (Ctrl-C reaches its processes too): the nodes as last seen
            self._described = {
                "executor": "ray",
                "address": self.address,
                "attached": self.attached,
                "nodes": list(self.nodes.values()),
            }
        if self.owns_session:
            self.ray.shutdown()


def _failed(job: Job, seconds: float, error: str, **details: Any) -> Outcome:
    """A job that did not finish: why, after how long (details: timing, node_lost)."""
    return Outcome(job, False, error=error, seconds=seconds, **details)
