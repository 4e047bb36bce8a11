"""``modelpress tune`` vs the best single default, on the digits CNN and real third-party models.

For each model: the single default (``int8-static`` with its default options, its own
sensitivity fallback included) and the tuned result (default search space, objective size,
``max_drop``), measured the same way (metric on the evaluation data, file size, ORT latency at
batch 1 on one thread), plus trials run and the study's wall time.

Metrics: accuracy on digits; for the PP-OCR direction classifier, top-1 agreement with the fp32
model (on rendered text lines, half of them upside down); for PP-OCRv4 rec, per-timestep top-1 agreement of the CTC
probabilities with the fp32 model (what decoding reads); for YOLOv8n, cosine between its raw
output tensors and the fp32 model's (boxes and class scores).

Speed-up mode (``--speedup MODEL``; target: >= 1.6x with 2 workers on a 2-core machine): the study
runs with 2 Ray workers, then the SAME configurations run again with 1 worker (the other studies
replay the first one's trials in order, through tune's resume), so they all do the same work; each
study starts its own Ray session (not timed), with new worker processes that pay their imports
(modelpress, ORT, torch: ~3 s of CPU each) as a user's tune does, and then again with workers
warmed beforehand (not timed), as on a cluster or for a second study in one session: the
trial-bound case. Printed: the wall times and their ratio, trials in flight on average (trial-seconds per
wall second: ~2 when two trials really overlap), the load average (what other processes took from
the cores meanwhile), and where the CPU went, which does not depend on the machine's load: the
trials' CPU by phase (import, load, passes, export+verify, latency, metric), the workers' start-up
and imports, and the driver (Optuna/SQLite, the baseline, the final export of the best).

    nice -n 10 python benchmarks/tune.py                  # digits, ppocr-rec, yolov8n
    nice -n 10 python benchmarks/tune.py --models digits --speedup digits      # ~1-2 min on a quiet 2-core machine
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
    from modelpress.demo import digits_arrays, train_demo_model

    data = digits_arrays("nchw")
    path = folder / "digits-cnn.onnx"
    model = modelpress.load(train_demo_model("torch", data, epochs=6), example_inputs=data["x_test"][:4])
    modelpress.export(model, path)
    name = modelpress.load(path).signature.input_names[0]
    files = {"eval": folder / "digits-eval.npz", "calibration": folder / "digits-calib.npz", "train": folder / "digits-train.npz"}
    np.savez(files["eval"], **{name: data["x_test"], "labels": data["y_test"]})
    np.savez(files["calibration"], **{name: data["x_train"][:512]})
    np.savez(files["train"], **{name: data["x_train"], "labels": data["y_train"]})
    return path, files


def _zoo(name: str, folder: Path) -> tuple[Path, dict[str, Path]]:
    from benchmarks.real_models import fetch, inputs

    files = {"eval": folder / f"{name}-eval.npz", "calibration": folder / f"{name}-calib.npz"}
    np.savez(files["eval"], **inputs(name, n=16, seed=1))  # type: ignore[arg-type]
    np.savez(files["calibration"], **inputs(name, n=16, seed=0))  # type: ignore[arg-type]
    return fetch(name), files


def _default(path: Path, files: dict[str, Path], metric: str, max_drop: float, folder: Path) -> modelpress.TuneResult:
    """int8-static's defaults as a one-configuration study: measured exactly like the tuned trials."""
    recipe = {"passes": [{"kind": "quantize", "method": "int8-static"}], "data": {k: str(v) for k, v in files.items() if k != "train"},
              "evaluate": {"metric": metric, "batch_size": 1, "repeats": 10}}
    return modelpress.tune(path, recipe=recipe, budget=1, max_drop=max_drop, output=folder, workers=1, show_progress=False)


def _row(label: str, r: modelpress.TuneResult | None, baseline: dict[str, float], wall: float | None = None) -> str:
    if r is None or r.best is None:
        return f"  {label:26s} (no completed trial)"
    b = r.best
    size = b.size_bytes or 1
    return (f"  {label:26s} {b.metric:9.4f} {'yes' if b.meets else 'NO ':>5s} {size / 1e6:9.3f} {baseline['size_bytes'] / size:6.2f}x "
            f"{b.latency_alone_ms or b.latency_ms or 0:9.3f} {len([t for t in r.trials if t.status != 'interrupted']):6d}"
            f"{'' if wall is None else f'{wall:9.1f}'}  {b.options()[:110]}")


def _ray_session() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False, object_store_memory=512 * 2**20)


def _replay(source: Path, target: Path) -> int:
    """A study in ``target`` whose only trials are ``source``'s run trials, as interrupted: tune reruns them first, in order."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    old = optuna.load_study(study_name="modelpress-tune", storage=f"sqlite:///{source / 'study.db'}")
    new = optuna.create_study(study_name="modelpress-tune", storage=f"sqlite:///{target / 'study.db'}", directions=old.directions)
    ran = [t for t in old.get_trials(deepcopy=False) if t.user_attrs.get("status") in ("ok", "failed", "pruned")]
    for t in ran:
        new.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL,
                                                user_attrs={"config": t.user_attrs["config"], "status": "interrupted", "session": "replay"}))
    return len(ran)


def _warm_workers(workers: int) -> None:
    """Have ``workers`` worker processes import what trials need and run a torch backward pass (what a study's first trials pay)."""
    import ray

    from modelpress.tuning.executor import JOBS_PER_WORKER
    from modelpress.tuning.trial import prepare_worker

    # NOTE: the options of tune's own jobs, so its jobs run in these processes
    ray.get([ray.remote(num_cpus=1, max_calls=JOBS_PER_WORKER)(prepare_worker).remote(True) for _ in range(workers)])


def _tune_timed(path: Path, files: dict[str, Path], name: str, trials: int, workers: int, output: Path, warm: bool = False) -> dict:
    _ray_session()  # NOTE: not timed; new worker processes, so each study pays its own imports...
    if warm:
        _warm_workers(workers)  # NOTE: ... unless they are warmed first (not timed either)
    metric, max_drop = SETTINGS[name]["metric"], SETTINGS[name]["max_drop"]
    load_before = os.getloadavg()[0]
    start, cpu = time.perf_counter(), time.process_time()
    result = modelpress.tune(path, data=dict(files), metric=metric, max_drop=max_drop, objective="size", budget=trials, workers=workers,
                             output=output, show_progress=False)
    wall, driver = time.perf_counter() - start, time.process_time() - cpu
    ran = [t for t in result.trials if t.session != "replay"]
    phases: dict[str, float] = {}
    for t in ran:
        for phase, spent in t.timing.get("phases", {}).items():
            phases[phase] = phases.get(phase, 0.0) + spent["cpu"]
    # NOTE: a worker's CPU at the end of its last trial: its start-up, imports, the sensitivity job and every trial it ran
    workers: dict[int, float] = {}
    for t in ran:
        if t.timing:
            workers[t.timing["pid"]] = max(workers.get(t.timing["pid"], 0.0), t.timing["cpu_before"] + t.timing["cpu"])
    wrapper = sum(t.timing.get("cpu_setup", 0.0) + t.timing.get("cpu_cleanup", 0.0) for t in ran)
    return {"result": result, "wall": wall, "driver": driver, "ran": ran, "phases": phases, "workers_cpu": sum(workers.values()), "wrapper": wrapper,
            "workers_used": len({t.timing.get("pid") for t in ran if t.timing}), "busy": sum(t.seconds or 0 for t in ran),
            "job_cpu": sum(t.timing.get("cpu", 0.0) for t in ran), "load": (load_before + os.getloadavg()[0]) / 2,
            "configs": [json.dumps(t.config, sort_keys=True) for t in sorted(ran, key=lambda t: t.number)]}


def _speedup(name: str, path: Path, files: dict[str, Path], two: dict, folder: Path) -> list[str]:
    """``two``: the 2-worker study (in ``folder / "tune"``); its trials run again with 1 worker, then with 2 and 1 warmed workers."""
    runs = {"2, new": two}
    for label, workers, warm in (("1, new", 1, False), ("2, warm", 2, True), ("1, warm", 1, True)):
        target = folder / f"tune-{label.replace(', ', '-')}"
        _replay(folder / "tune", target)
        runs[label] = _tune_timed(path, files, name, len(two["ran"]), workers, target, warm=warm)
        print(f"{name}: {label} worker(s): {runs[label]['wall']:.1f}s for {len(runs[label]['ran'])} trials", flush=True)
    same = all(sorted(run["configs"]) == sorted(two["configs"]) for run in runs.values())
    phases = sorted({p for run in runs.values() for p in run["phases"]}, key=lambda p: ["import", "load", "probe", "passes", "export", "latency", "metric"].index(p)
                    if p in ("import", "load", "probe", "passes", "export", "latency", "metric") else 99)
    lines = [f"\n{name}: 1 vs 2 Ray workers on {len(two['ran'])} trials, {'the same configurations in all' if same else 'NOT the same configurations'} "
             f"(the other studies replay the first 2-worker study's); 'new': new worker processes (as a user's tune: they import modelpress, "
             f"ORT, torch), 'warm': workers that already did (a cluster's, a second tune in one session)",
             f"  {'workers':>7s} {'wall (s)':>8s} {'in flight':>9s} {'load avg':>8s} | CPU seconds: {'workers':>11s} {'trials':>6s} {'wrapper':>7s} "
             f"{'driver':>6s} | " + " ".join(f"{p:>7s}" for p in phases)]
    for workers, run in runs.items():
        lines.append(f"  {workers:>7s} {run['wall']:8.1f} {run['busy'] / run['wall']:9.2f} {run['load']:8.1f} |              {run['workers_cpu']:6.1f} "
                     f"({run['workers_used']}) {run['job_cpu']:6.1f} {run['wrapper']:7.2f} {run['driver']:6.1f} | "
                     + " ".join(f"{run['phases'].get(p, 0.0):7.2f}" for p in phases))
    for kind in ("new", "warm"):
        ratio = runs[f"1, {kind}"]["wall"] / runs[f"2, {kind}"]["wall"]
        lines.append(f"  speed-up with 2 workers, {kind} workers: {ratio:.2f}x ({'meets' if ratio >= 1.6 else 'misses'} the 1.6x target for a "
                     f"2-core machine; this machine has {os.cpu_count()} cores, load average "
                     f"{runs[f'2, {kind}']['load']:.1f} / {runs[f'1, {kind}']['load']:.1f} during the runs)")
    lines.append("  (in flight: trial-seconds per wall second. CPU seconds: 'workers': the worker processes in all (start-up, imports, "
                 "the sensitivity job, trials), their number in brackets; 'trials': the trial jobs, by phase on the right, 'wrapper' of it "
                 "the executor's own part (fetching arguments, GC); 'driver': this process (Optuna/SQLite, the baseline, the best's export))")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["digits", "ppocr-rec", "yolov8n"], choices=sorted(SETTINGS))
    parser.add_argument("--trials", type=int, default=20, help="trial budget per study")
    parser.add_argument("--speedup", nargs="*", default=["digits"], help="models whose study also runs with 1 and 2 workers on the same configurations")
    parser.add_argument("--out", help="keep the studies here (default: a temporary folder)")
    args = parser.parse_args()

    import ray

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        root.mkdir(parents=True, exist_ok=True)
        lines = []
        for name in args.models:
            folder = root / name
            folder.mkdir(exist_ok=True)
            path, files = _digits(folder) if name == "digits" else _zoo(name, folder)
            metric, max_drop = SETTINGS[name]["metric"], SETTINGS[name]["max_drop"]
            _ray_session()
            default = _default(path, files, metric, max_drop, folder / "default")
            tuned = _tune_timed(path, files, name, args.trials, 2, folder / "tune")
            base = tuned["result"].baseline
            lines.append(f"\n{name}: {metric}, max drop {max_drop:g}; source {metric} {base['metric']:.4f}, {base['size_bytes'] / 1e6:.3f} MB, "
                         f"{base['latency_ms']:.3f} ms")
            lines.append(f"  {'':26s} {metric:>9s} {'meets':>5s} {'size (MB)':>9s} {'ratio':>7s} {'lat ms':>9s} {'trials':>6s} {'wall (s)':>8s}  configuration")
            lines.append(_row("best default (int8-static)", default, base))
            lines.append(_row("tuned, 2 workers", tuned["result"], base, tuned["wall"]))
            d, t = default.best, tuned["result"].best
            if d is not None and t is not None:
                verdict = ("tuned meets and is at least as small as the default" if t.meets and (not d.meets or (t.size_bytes or 0) <= (d.size_bytes or 0))
                           else "tuned misses the target")
                lines.append(f"  -> {verdict}{'' if d.meets else ' (the default misses the criterion)'}")
            print("\n".join(lines[-5:]), flush=True)
            print(f"{name}: 2 workers: {tuned['wall']:.1f}s for {len(tuned['ran'])} trials", flush=True)
            if name in args.speedup:
                lines += _speedup(name, path, files, tuned, folder)
                print("\n".join(lines[-9:]), flush=True)
        print("\n=== summary ===" + "\n".join(lines))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
