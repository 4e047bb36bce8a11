"""``modelpress tune`` vs the best single default, on the digits CNN and real third-party models.

For each model: the single default (``int8-static`` with its default options, its own
sensitivity fallback included) and the tuned result (default search space, objective size,
``max_drop``), measured the same way (metric on the evaluation data, file size, ORT latency at
batch 1 on one thread), plus trials run and the study's wall time.

Metrics: accuracy on digits; for the PP-OCR direction classifier, top-1 agreement with the fp32
model (on rendered text lines, half of them upside down); for PP-OCRv4 rec, per-timestep top-1 agreement of the CTC
probabilities with the fp32 model (what decoding reads); for YOLOv8n, cosine between its raw
output tensors and the fp32 model's (boxes and class scores).

Speed-up (``--speedup MODEL``; target: >= 1.6x with 2 workers on a 2-core machine for
trial-bound studies): a trial-bound study, a fixed grid of configurations whose trials each take
seconds of CPU (``ppocr-det``: 16 int8-static trials on the real PP-OCRv4 detector; ``digits``: 16
channel-prune + fine-tune + int8-static trials on the digits CNN), runs with 2 and with 1 Ray
worker, alternated 2, 1, 1, 2 (so a drift of the machine's load weighs on both sides). Every run
does the same trials (the grid is seeded into its study as interrupted trials, which tune's
resume runs first) and is timed as a user's ``modelpress tune`` is: tune starts its own Ray
session, new worker processes import modelpress and ONNX Runtime, the baseline is measured and
the best exported. Printed per run: the wall time, trials in flight on average (trial-seconds per
wall second: ~2 when two trials really overlap), the load average (what other processes took from
the cores), and where the CPU went, which does not depend on the load: the trials (in all and per
trial), the workers' start-up, Ray's own processes (GCS, raylet, helpers; from /proc) and the
driver; then the ratio of the mean walls.

    nice -n 10 python benchmarks/tune.py --models digits ppocr-rec yolov8n --speedup     # the tuned-vs-default tables
    nice -n 10 python benchmarks/tune.py --models --speedup ppocr-det                     # the 1-vs-2-worker figure alone

Two nodes (``--two-nodes digits``): the same grid attached (``address=``) to a Ray cluster of one node of 1 CPU and to
one of two nodes of 1 CPU each (a head and a worker node, separate ``ray start`` processes on 127.0.0.1 with their own
folders and temp dirs: tests/cluster_helpers.py), alternated 1, 2, 2, 1 nodes. Printed: the speed-up of the second node
(mean wall, 1 node / 2 nodes), its efficiency (speed-up / 2) and its overhead: how much longer each trial took from
submission to result on two nodes than on one (the models and data fetched from the head's object store, a cold worker
on the new node, the cores shared), as ratios of one run, with the load average.

    nice -n 10 python benchmarks/tune.py --models --speedup --two-nodes digits --limit 6
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import modelpress

SETTINGS: dict[str, dict[str, Any]] = {
    "digits": {"metric": "accuracy", "max_drop": 0.01},
    "ppocr-rec": {"metric": "agreement", "max_drop": 0.01},
    "ppocr-det": {"metric": "cosine", "max_drop": 0.01},
    "ppocr-cls": {"metric": "agreement", "max_drop": 0.01},
    "yolov8n": {"metric": "cosine", "max_drop": 0.01},
}


def _digits(folder: Path) -> tuple[Path, dict[str, Path]]:
    from modelpress.app.demo import digits_arrays, train_demo_model

    data = digits_arrays("nchw")
    path = folder / "digits-cnn.onnx"
    model = modelpress.load(
        train_demo_model("torch", data, epochs=6), example_inputs=data["x_test"][:4]
    )
    modelpress.export(model, path)
    name = modelpress.load(path).signature.input_names[0]
    files = {
        "eval": folder / "digits-eval.npz",
        "calibration": folder / "digits-calib.npz",
        "train": folder / "digits-train.npz",
    }
    np.savez(files["eval"], **{name: data["x_test"], "labels": data["y_test"]})
    np.savez(files["calibration"], **{name: data["x_train"][:512]})
    np.savez(files["train"], **{name: data["x_train"], "labels": data["y_train"]})
    return path, files


def _zoo(name: str, folder: Path, images: int = 16) -> tuple[Path, dict[str, Path]]:
    from benchmarks.real_models import fetch, inputs

    files = {"eval": folder / f"{name}-eval.npz", "calibration": folder / f"{name}-calib.npz"}
    np.savez(files["eval"], **inputs(name, n=images, seed=1))  # type: ignore[arg-type]
    np.savez(files["calibration"], **inputs(name, n=images, seed=0))  # type: ignore[arg-type]
    return fetch(name), files


def _default(
    path: Path, files: dict[str, Path], metric: str, max_drop: float, folder: Path
) -> modelpress.TuneResult:
    """int8-static's defaults as a one-configuration study: measured exactly like the tuned trials."""
    recipe = {
        "passes": [{"kind": "quantize", "method": "int8-static"}],
        "data": {k: str(v) for k, v in files.items() if k != "train"},
        "evaluate": {"metric": metric, "batch_size": 1, "repeats": 10},
    }
    return modelpress.tune(
        path,
        recipe=recipe,
        budget=1,
        max_drop=max_drop,
        output=folder,
        workers=1,
        show_progress=False,
    )


def _row(
    label: str,
    r: modelpress.TuneResult | None,
    baseline: dict[str, float],
    wall: float | None = None,
) -> str:
    if r is None or r.best is None:
        return f"  {label:26s} (no completed trial)"
    b = r.best
    size = b.size_bytes or 1
    return (
        f"  {label:26s} {b.metric:9.4f} {'yes' if b.meets else 'NO ':>5s} {size / 1e6:9.3f} {baseline['size_bytes'] / size:6.2f}x "
        f"{b.latency_alone_ms or b.latency_ms or 0:9.3f} {len([t for t in r.trials if t.status != 'interrupted']):6d}"
        f"{'' if wall is None else f'{wall:9.1f}'}  {b.options()[:110]}"
    )


# NOTE: the 1-vs-2-worker studies: a fixed grid (the same trials in every run), each trial seconds of CPU,
# so that the trials, not a tune's fixed costs (Ray's start, the workers' imports, the driver), decide the wall time
SPEEDUP: dict[str, dict[str, Any]] = {
    "ppocr-det": {
        "metric": "cosine",
        "passes": [
            {
                "kind": "quantize",
                "method": "int8-static",
                "options": {
                    "percentile": {"search": [99.9, 99.99, 99.999, 99.9999]},
                    "activation_type": {"search": ["uint8", "int8"]},
                    "bias_correction": {"search": [False, True]},
                    "sensitivity": False,
                },
            }
        ],
    },
    "digits": {
        "metric": "accuracy",
        "passes": [
            {
                "kind": "prune",
                "method": "channel",
                "options": {
                    "ratio": {"search": [0.2, 0.3, 0.4, 0.5]},
                    "fine_tune_epochs": {"search": [2, 3]},
                },
            },
            {
                "kind": "quantize",
                "method": "int8-static",
                "options": {"per_channel": {"search": [True, False]}, "sensitivity": False},
            },
        ],
    },
}
_ORDER = (2, 1, 1, 2)  # NOTE: ABBA: a drift of the machine's load weighs on both sides alike


def _grid(recipe: dict[str, Any]) -> list[dict[str, Any]]:
    """Every configuration of the recipe's search space, as tune names them."""
    import itertools

    from modelpress.app.recipe import load_recipe
    from modelpress.app.tuning.space import space_from_recipe
    from modelpress.plugin.registry import get_registry

    pipeline = space_from_recipe(load_recipe(recipe), get_registry()).pipelines[0]
    params = pipeline.params()
    return [
        {
            "pipeline": pipeline.name,
            **{f"{pipeline.name}:{k}": v for k, v in zip(params, values, strict=True)},
        }
        for values in itertools.product(*(p.grid() for p in params.values()))
    ]


def _seeded(target: Path, configs: list[dict[str, Any]], metric: str) -> None:
    """A study in ``target`` holding ``configs`` as interrupted trials: tune reruns them first, in order (its resume)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    study = optuna.create_study(
        study_name="modelpress-tune",
        storage=f"sqlite:///{target / 'study.db'}",
        directions=["minimize" if metric == "mse" else "maximize", "minimize"],
    )
    for config in configs:
        study.add_trial(
            optuna.trial.create_trial(
                state=optuna.trial.TrialState.FAIL,
                user_attrs={"config": config, "status": "interrupted", "session": "seed"},
            )
        )


def _timed_study(
    path: Path,
    files: dict[str, Path],
    recipe: dict[str, Any],
    configs: list[dict[str, Any]],
    workers: int,
    output: Path,
    address: str | None = None,
) -> dict:
    """One study of exactly ``configs``, as a user runs it: tune starts its own Ray session (or attaches to the cluster at
    ``address``) and new workers (all timed)."""
    import ray

    from benchmarks.proc_cpu import ProcessCPU

    assert not ray.is_initialized()
    _seeded(output, configs, recipe["evaluate"]["metric"])
    load_before = os.getloadavg()[0]
    times = os.times()
    with ProcessCPU() as procs:
        start = time.perf_counter()
        result = modelpress.tune(
            path,
            recipe=recipe,
            budget=len(configs),
            max_drop=0.01,
            workers=workers,
            output=output,
            show_progress=False,
            address=address,
        )
        wall = time.perf_counter() - start
    after = os.times()
    ran = [t for t in result.trials if t.session != "seed"]
    kinds = procs.by_kind()
    job_cpu = sum(t.timing.get("cpu", 0.0) for t in ran)
    workers_cpu = kinds.pop("worker", 0.0)
    return {
        "wall": wall,
        "trials": len(ran),
        "ok": sum(t.status == "ok" for t in ran),
        "job_cpu": job_cpu,
        "busy": sum(t.seconds or 0.0 for t in ran),
        "load": (load_before + os.getloadavg()[0]) / 2,
        "driver": (after.user + after.system) - (times.user + times.system) - procs.own,
        "start_up": workers_cpu - job_cpu,
        "ray": sum(kinds.values()),
        "ray_kinds": kinds,
        "procs": procs.available,
        "workers_used": len({t.timing.get("pid") for t in ran if t.timing}),
        "nodes_used": len({t.node for t in ran if t.node}),
        "configs": sorted(json.dumps(t.config, sort_keys=True) for t in ran),
    }


def _speedup(
    name: str, folder: Path, images: int, rounds: int, limit: int | None = None
) -> list[str]:
    """The same grid of trials with 2 and 1 Ray workers, alternated (2, 1, 1, 2 per round): wall, CPU and load of each run."""
    if name == "digits":
        path, files = _digits(folder)
    else:
        path, files = _zoo(name, folder, images)
    spec = SPEEDUP[name]
    recipe = {
        "passes": spec["passes"],
        "data": {k: str(v) for k, v in files.items() if k != "train" or name == "digits"},
        "evaluate": {"metric": spec["metric"], "batch_size": 1, "repeats": 10},
    }
    configs = _grid(recipe)[:limit]
    runs: list[tuple[int, dict]] = []
    for i, workers in enumerate(_ORDER * rounds):
        run = _timed_study(
            path, files, recipe, configs, workers, folder / f"speedup-{i}-{workers}w"
        )
        runs.append((workers, run))
        print(
            f"{name}: run {i + 1}, {workers} worker(s): {run['wall']:.1f}s for {run['trials']} trials, load {run['load']:.1f}",
            flush=True,
        )
    same = len({tuple(run["configs"]) for _, run in runs}) == 1
    lines = [
        f"\n{name}: 1 vs 2 Ray workers, {len(configs)} trials ({' -> '.join(p['method'] for p in spec['passes'])}, a fixed grid: "
        f"{'the same configurations in every run' if same else 'NOT the same configurations'}); runs alternate 2, 1, 1, 2; each is a "
        f"whole tune as a user runs it: Ray's start, new workers and their imports, the baseline and the best's export all timed",
        f"  {'run':>3s} {'workers':>7s} {'wall (s)':>8s} {'in flight':>9s} {'load avg':>8s} | CPU seconds: {'trials':>6s} {'per trial':>9s} "
        f"{'start-up':>8s} {'Ray procs':>9s} {'driver':>6s} {'trials %':>8s} {'CPU/s':>5s}",
    ]
    for i, (workers, run) in enumerate(runs, 1):
        overhead = run["start_up"] + run["ray"] + run["driver"]
        lines.append(
            f"  {i:3d} {workers:7d} {run['wall']:8.1f} {run['busy'] / run['wall']:9.2f} {run['load']:8.1f} |              "
            f"{run['job_cpu']:6.1f} {run['job_cpu'] / max(run['trials'], 1):9.2f} {run['start_up']:8.1f} {run['ray']:9.1f} "
            f"{run['driver']:6.1f} {100 * run['job_cpu'] / (run['job_cpu'] + overhead):7.0f}% {(run['job_cpu'] + overhead) / run['wall']:5.2f}"
        )
    walls = {w: [run["wall"] for v, run in runs if v == w] for w in (1, 2)}
    cpu = {w: [run["job_cpu"] for v, run in runs if v == w] for w in (1, 2)}
    ratio = (sum(walls[1]) / len(walls[1])) / (sum(walls[2]) / len(walls[2]))
    loads = [run["load"] for _, run in runs]
    lines.append(
        f"  speed-up with 2 workers: {ratio:.2f}x (mean wall {sum(walls[1]) / len(walls[1]):.1f}s / {sum(walls[2]) / len(walls[2]):.1f}s; "
        f"{'meets' if ratio >= 1.6 else 'misses'} the 1.6x target for a 2-core machine; this machine has {os.cpu_count()} cores, "
        f"load average {min(loads):.1f}-{max(loads):.1f} during the runs)"
    )
    lines.append(
        f"  the trials' CPU with 2 workers is {sum(cpu[2]) / len(cpu[2]) / (sum(cpu[1]) / len(cpu[1])):.2f}x that with 1 "
        "(two trials side by side share the cores' caches and memory bandwidth, and the cores with the driver and Ray)"
    )
    kinds: dict[str, float] = {}
    for _, run in runs:
        for kind, seconds in run["ray_kinds"].items():
            kinds[kind] = kinds.get(kind, 0.0) + seconds / len(runs)
    if runs[0][1]["procs"]:
        lines.append(
            "  Ray's processes, CPU seconds per run: "
            + ", ".join(f"{k} {v:.1f}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
        )
    lines.append(
        "  (in flight: trial-seconds per wall second, ~2 when two trials really overlap. CPU seconds: 'trials': the trial jobs "
        "in the workers; 'start-up': the rest of the workers' CPU (process start, imports); 'Ray procs': GCS, raylet and Ray's "
        "helper processes; 'driver': this process (import, Optuna/SQLite, the baseline, the best's export and report); "
        "'trials %': the trials' share of all of it; 'CPU/s': all of it per wall second, what the run got of the machine: "
        "~2 with 2 workers and ~1 with 1 on an idle 2-core machine. On a busy machine a niced run gets what the others leave, "
        "about the same for 1 or 2 workers: then CPU/s is alike in both and the wall ratio says nothing about tune)"
    )
    return lines


def _two_nodes(name: str, folder: Path, images: int, limit: int | None) -> list[str]:
    """The same grid on a cluster of one node of 1 CPU and on one of two such nodes, alternated 1, 2, 2, 1."""
    from tests.cluster_helpers import LocalCluster

    path, files = _digits(folder) if name == "digits" else _zoo(name, folder, images)
    spec = SPEEDUP[name]
    recipe = {
        "passes": spec["passes"],
        "data": {k: str(v) for k, v in files.items() if k != "train" or name == "digits"},
        "evaluate": {"metric": spec["metric"], "batch_size": 1, "repeats": 10},
    }
    configs = _grid(recipe)[:limit]
    os.environ["RAY_AUTH_MODE"] = (
        "disabled"  # NOTE: as the clusters' nodes run (tests/cluster_helpers.py)
    )
    bases = [
        Path(tempfile.mkdtemp(prefix="mpb-", dir="/tmp")) for _ in range(2)
    ]  # NOTE: short: Ray's socket paths
    clusters = {1: LocalCluster(bases[0]), 2: LocalCluster(bases[1])}
    runs: list[tuple[int, dict]] = []
    try:
        for nodes, cluster in clusters.items():
            cluster.start_head()
            cluster.wait_for(1)
            if nodes == 2:
                cluster.add_worker()
                cluster.wait_for(2)
        for i, nodes in enumerate((1, 2, 2, 1)):
            run = _timed_study(
                path,
                files,
                recipe,
                configs,
                nodes,
                folder / f"nodes-{i}-{nodes}",
                clusters[nodes].address,
            )
            runs.append((nodes, run))
            print(
                f"{name}: run {i + 1}, {nodes} node(s): {run['wall']:.1f}s for {run['trials']} trials on {run['nodes_used']} node(s), "
                f"load {run['load']:.1f}",
                flush=True,
            )
    finally:
        for cluster in clusters.values():
            cluster.stop()
        for base in bases:
            shutil.rmtree(base, ignore_errors=True)
    return _two_nodes_lines(name, configs, runs)


def _two_nodes_lines(
    name: str, configs: list[dict[str, Any]], runs: list[tuple[int, dict]]
) -> list[str]:
    def mean(key: str, nodes: int) -> float:
        values = [run[key] for n, run in runs if n == nodes]
        return sum(values) / len(values)

    lines = [
        f"\n{name}: a Ray cluster of 2 nodes (1 CPU each) vs 1 node of 1 CPU, {len(configs)} trials (a fixed grid), runs alternate "
        "1, 2, 2, 1 nodes; the driver attaches with address= (Ray's start is not timed, the workers' is)",
        f"  {'run':>3s} {'nodes':>5s} {'used':>4s} {'wall (s)':>8s} {'in flight':>9s} {'trial s':>7s} {'load avg':>8s}",
    ]
    lines += [
        f"  {i:3d} {n:5d} {run['nodes_used']:4d} {run['wall']:8.1f} {run['busy'] / run['wall']:9.2f} {run['busy'] / max(run['trials'], 1):7.2f} "
        f"{run['load']:8.1f}"
        for i, (n, run) in enumerate(runs, 1)
    ]
    speedup = mean("wall", 1) / mean("wall", 2)
    per_trial = (mean("busy", 2) / mean("trials", 2)) / (mean("busy", 1) / mean("trials", 1))
    loads = [run["load"] for _, run in runs]
    lines.append(
        f"  speed-up of the second node: {speedup:.2f}x (mean wall {mean('wall', 1):.1f}s / {mean('wall', 2):.1f}s), efficiency "
        f"{speedup / 2:.2f} of the ideal 2x; overhead: a trial took {per_trial:.2f}x as long (submission to result) on two nodes "
        f"as on one; this machine has {os.cpu_count()} cores shared by both nodes and other work, load average "
        f"{min(loads):.1f}-{max(loads):.1f} during the runs"
    )
    return lines


def _tuned(
    path: Path, files: dict[str, Path], name: str, trials: int, output: Path
) -> tuple[modelpress.TuneResult, float]:
    metric, max_drop = SETTINGS[name]["metric"], SETTINGS[name]["max_drop"]
    start = time.perf_counter()
    result = modelpress.tune(
        path,
        data=dict(files),
        metric=metric,
        max_drop=max_drop,
        objective="size",
        budget=trials,
        workers=2,
        output=output,
        show_progress=False,
    )
    return result, time.perf_counter() - start


def _compare(name: str, folder: Path, trials: int, images: int) -> list[str]:
    """The best single default vs the tuned result (default space, 2 workers) on one model."""
    path, files = _digits(folder) if name == "digits" else _zoo(name, folder, images)
    metric, max_drop = SETTINGS[name]["metric"], SETTINGS[name]["max_drop"]
    default = _default(path, files, metric, max_drop, folder / "default")
    tuned, wall = _tuned(path, files, name, trials, folder / "tune")
    base = tuned.baseline
    lines = [
        f"\n{name}: {metric}, max drop {max_drop:g}; source {metric} {base['metric']:.4f}, {base['size_bytes'] / 1e6:.3f} MB, "
        f"{base['latency_ms']:.3f} ms",
        f"  {'':26s} {metric:>9s} {'meets':>5s} {'size (MB)':>9s} {'ratio':>7s} {'lat ms':>9s} {'trials':>6s} {'wall (s)':>8s}  configuration",
        _row("best default (int8-static)", default, base),
        _row("tuned, 2 workers", tuned, base, wall),
    ]
    d, t = default.best, tuned.best
    if d is not None and t is not None:
        verdict = (
            "tuned meets and is at least as small as the default"
            if t.meets and (not d.meets or (t.size_bytes or 0) <= (d.size_bytes or 0))
            else "tuned misses the target"
        )
        lines.append(f"  -> {verdict}{'' if d.meets else ' (the default misses the criterion)'}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models",
        nargs="*",
        default=["digits", "ppocr-rec", "yolov8n"],
        choices=sorted(SETTINGS),
        help="models for the tuned-vs-default table (none: only the speed-up)",
    )
    parser.add_argument("--trials", type=int, default=20, help="trial budget per study")
    parser.add_argument(
        "--speedup",
        nargs="*",
        default=["ppocr-det"],
        choices=sorted(SPEEDUP),
        help="trial-bound studies run with 1 and 2 workers on the same grid of configurations",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="speed-up: rounds of 2, 1, 1, 2 workers"
    )
    parser.add_argument(
        "--limit",
        type=int,
        help="speed-up, two nodes: only the first N configurations of the grid (a quick check)",
    )
    parser.add_argument(
        "--two-nodes",
        nargs="*",
        default=[],
        choices=sorted(SPEEDUP),
        help="trial-bound studies on a Ray cluster of 2 nodes of 1 CPU vs 1 node of 1 CPU (separate `ray start` processes)",
    )
    parser.add_argument(
        "--images",
        type=int,
        default=16,
        help="evaluation and calibration images for the real models",
    )
    parser.add_argument("--out", help="keep the studies here (default: a temporary folder)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        lines = []
        for name in args.models:
            (root / name).mkdir(parents=True, exist_ok=True)
            lines += _compare(name, root / name, args.trials, args.images)
            print("\n".join(lines[-5:]), flush=True)
        for name in args.speedup:
            (root / f"speedup-{name}").mkdir(parents=True, exist_ok=True)
            lines += _speedup(name, root / f"speedup-{name}", args.images, args.rounds, args.limit)
            print("\n".join(lines[-8:]), flush=True)
        for name in args.two_nodes:
            (root / f"nodes-{name}").mkdir(parents=True, exist_ok=True)
            lines += _two_nodes(name, root / f"nodes-{name}", args.images, args.limit)
            print("\n".join(lines[-8:]), flush=True)
        print("\n=== summary ===" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
