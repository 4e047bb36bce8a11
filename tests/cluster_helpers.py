"""A Ray cluster of separate ``ray start`` processes on 127.0.0.1, and the helpers its tests import by name in workers.

Each node is one ``ray start --block`` process (it stays in the foreground, so this session knows its PID) with its
own CPUs, working folder and temp dir, and its own ports (several sessions may run Ray on one machine). Nodes are
stopped by the PIDs of their processes (the ``ray start`` process and what it started), never by name.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class Node:
    name: str
    folder: Path
    process: subprocess.Popen
    log: Path
    known: set[int] = field(default_factory=set)

    def pids(self) -> list[int]:
        """The ``ray start`` process and every process it started (raylet, object store, agents, workers), from /proc."""
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        found, todo = [], [self.process.pid] if self.process.poll() is None else []
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo += children.get(pid, [])
        self.known.update(found)
        return found

    def raylet_pid(self) -> int:
        for pid in self.pids():
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "raylet":
                    return pid
            except OSError:
                continue
        raise RuntimeError(f"node {self.name}: no raylet among {self.pids()}\n{self.logs()}")

    def logs(self, tail: int = 4000) -> str:
        """The ``ray start`` output and the tails of the node's Ray logs (printed when a test fails)."""
        parts = [
            f"== {self.name}: ray start output ==\n{self.log.read_text(errors='replace')[-tail:]}"
        ]
        for path in sorted((self.folder / "tmp").glob("session_*/logs/*")):
            if (
                path.suffix in (".out", ".err", ".log")
                and path.stat().st_size
                and ("raylet" in path.name or "gcs" in path.name or path.name.startswith("worker"))
            ):
                parts.append(
                    f"== {self.name}: {path.name} ==\n{path.read_text(errors='replace')[-tail:]}"
                )
        return "\n".join(parts)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Signal every process of this node seen so far (also those a dead ``ray start`` left behind)."""
        self.pids()
        for pid in sorted(self.known, reverse=True):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


@dataclass
class LocalCluster:
    """A head node and worker nodes, each a ``ray start --block`` process of 1 CPU by default."""

    base: Path
    address: str = ""
    nodes: list[Node] = field(default_factory=list)

    def _start(self, name: str, args: list[str], env: dict[str, str]) -> Node:
        folder = self.base / name
        (folder / "tmp").mkdir(parents=True, exist_ok=True)
        node_port, object_port, agent_port, agent_grpc, metrics, runtime_env = free_ports(6)
        command = [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--temp-dir",
            str(folder / "tmp"),
            "--disable-usage-stats",
            "--node-manager-port",
            str(node_port),
            "--object-manager-port",
            str(object_port),
            "--dashboard-agent-listen-port",
            str(agent_port),
            "--dashboard-agent-grpc-port",
            str(agent_grpc),
            "--metrics-export-port",
            str(metrics),
            "--runtime-env-agent-port",
            str(runtime_env),
            "--object-store-memory",
            str(128 * 2**20),
            *args,
        ]
        log = folder / "ray-start.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                command,
                cwd=folder,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        node = Node(name, folder, process, log)
        self.nodes.append(node)
        return node

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
        # NOTE: workers import the test helpers by name (tests.cluster_helpers:...); the model and data travel as objects
        # NOTE: Ray turns token authentication on for a head when ~/.ray/auth_token exists, but a node or driver that
        # attaches does not send it unless told: this cluster, bound to 127.0.0.1, runs without (the same for every process)
        return {
            **env,
            "PYTHONPATH": str(ROOT),
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "disabled",
            **extra,
        }

    def start_head(self, cpus: int = 1, pause: float = 0.0) -> None:
        """``pause``: seconds each trial's metric waits on this node (tests.cluster_helpers:slow_accuracy)."""
        (port,) = free_ports(1)
        self._start(
            "head",
            [
                "--head",
                "--port",
                str(port),
                "--num-cpus",
                str(cpus),
                "--include-dashboard",
                "false",
                "--resources",
                '{"head": 1}',
            ],
            self.env(MODELPRESS_TEST_TRIAL_PAUSE=str(pause)),
        )
        self.address = f"127.0.0.1:{port}"

    def add_worker(
        self, name: str = "worker", cpus: int = 1, pause: float = 0.0, markers: bool = False
    ) -> Node:
        """``markers``: a trial in slow_accuracy on this node marks itself in ``<node folder>/running`` while it waits."""
        folder = self.base / name
        extra = {
            "MODELPRESS_TEST_TRIAL_PAUSE": str(pause),
            **({"MODELPRESS_TEST_MARKERS": str(folder / "running")} if markers else {}),
        }
        return self._start(
            name,
            ["--address", self.address, "--num-cpus", str(cpus), "--resources", f'{{"{name}": 1}}'],
            self.env(**extra),
        )

    def wait_for(self, count: int, timeout: float = 300.0) -> None:
        """Until ``count`` nodes are alive (asked from a separate process: this one may not attach to Ray)."""
        script = (
            "import ray,sys; ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False); "
            "print(sum(1 for n in ray.nodes() if n['Alive']))"
        )
        end, seen = time.monotonic() + timeout, ""
        while time.monotonic() < end:
            for node in self.nodes:
                if node.process.poll() is not None:
                    raise RuntimeError(
                        f"node {node.name} exited ({node.process.returncode})\n{self.logs()}"
                    )
            try:  # NOTE: an attempt while the GCS is still starting can hang in ray.init: each attempt has its own limit
                done = subprocess.run(
                    [sys.executable, "-c", script, self.address],
                    capture_output=True,
                    text=True,
                    timeout=45,
                    env=self.env(),
                )
            except subprocess.TimeoutExpired as exc:
                seen = f"ray.init timed out: {str(exc.stderr)[-2000:]}"
                continue
            seen = done.stdout.strip() + done.stderr[-2000:]
            if (
                done.returncode == 0
                and done.stdout.strip().splitlines()[-1:]
                and int(done.stdout.strip().splitlines()[-1]) >= count
            ):
                return
            time.sleep(1.0)
        raise RuntimeError(f"fewer than {count} nodes after {timeout:.0f}s: {seen}\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(node.logs() for node in self.nodes)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
        end = time.monotonic() + 20
        for node in self.nodes:
            try:
                node.process.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            node.stop(signal.SIGKILL)


# ---- helpers the cluster tests name in trials (``tests.cluster_helpers:...``); they run in Ray workers ----


def slow_accuracy(
    outputs: list[np.ndarray], labels: np.ndarray | None, reference: list[np.ndarray]
) -> float:
    """Accuracy after the node's pause, in Ray workers only (trials overlap, and are in flight long enough to lose a node
    under them); with MODELPRESS_TEST_MARKERS the trial marks itself running there meanwhile."""
    if os.environ.get(
        "MODELPRESS_THREADS"
    ):  # NOTE: set in Ray workers by the executor, not in the driver
        markers = os.environ.get("MODELPRESS_TEST_MARKERS")
        mark = Path(markers) / str(os.getpid()) if markers else None
        if mark is not None:
            mark.parent.mkdir(exist_ok=True)
            mark.touch()
        try:
            time.sleep(float(os.environ.get("MODELPRESS_TEST_TRIAL_PAUSE", "0")))
        finally:
            if mark is not None:
                mark.unlink(missing_ok=True)
    return float(np.mean(outputs[0].argmax(-1) == labels))


def greedy_when_far(
    outputs: list[np.ndarray], labels: np.ndarray | None, reference: list[np.ndarray]
) -> float:
    """Accuracy, but a configuration far from the reference asks for more memory than any node has (MemoryError)."""
    ref, out = reference[0].ravel().astype(np.float64), outputs[0].ravel().astype(np.float64)
    cosine = float(ref @ out / max(np.linalg.norm(ref) * np.linalg.norm(out), 1e-12))
    if cosine < 0.98:
        np.ones(
            2**50, dtype=np.uint8
        )  # NOTE: 1 PiB: numpy raises MemoryError when the allocation fails
    return float(np.mean(outputs[0].argmax(-1) == labels))
