"""``modelpress tune`` vs the best single default, on the digits CNN and real third-party models.

For each model: the single default (``int8-static`` with its default options, its own
sensitivity fallback included) and the tuned result (default search space, objective size,
``max_drop``), measured the same way (metric on the evaluation data, file size, ORT latency at
batch 1 on one thread), plus trials run and the study's wall time with 1 and 2 Ray workers (same
budget, same seed; the Ray start is not counted).

Metrics: accuracy on digits; for the PP-OCR direction classifier, top-1 agreement with the fp32
model (on rendered text lines, half of them upside down); for PP-OCRv4 rec, per-timestep top-1 agreement of the CTC
probabilities with the fp32 model (what decoding reads); for YOLOv8n, cosine between its raw
output tensors and the fp32 model's (boxes and class scores).

    nice -n 10 python benchmarks/tune.py                  # digits, ppocr-rec, yolov8n
    nice -n 10 python benchmarks/tune.py --models digits --trials 12
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import modelpress

SETTINGS = {
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["digits", "ppocr-rec", "yolov8n"], choices=sorted(SETTINGS))
    parser.add_argument("--trials", type=int, default=12, help="trial budget per study")
    parser.add_argument("--speedup", nargs="*", default=["digits"], help="models whose study also runs with 1 worker (for the 1-vs-2 ratio)")
    parser.add_argument("--out", help="keep the studies here (default: a temporary folder)")
    args = parser.parse_args()

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False, object_store_memory=512 * 2**20)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        root.mkdir(parents=True, exist_ok=True)
        lines = []
        for name in args.models:
            folder = root / name
            folder.mkdir(exist_ok=True)
            path, files = _digits(folder) if name == "digits" else _zoo(name, folder)
            metric, max_drop = SETTINGS[name]["metric"], SETTINGS[name]["max_drop"]
            default = _default(path, files, metric, max_drop, folder / "default")
            walls: dict[int, float] = {}
            concurrency: dict[int, str] = {}
            results: dict[int, modelpress.TuneResult] = {}
            for workers in ([2, 1] if name in args.speedup else [2]):
                start = time.perf_counter()
                results[workers] = modelpress.tune(path, data={k: v for k, v in files.items()}, metric=metric, max_drop=max_drop, objective="size",
                                                   budget=args.trials, workers=workers, output=folder / f"tune-w{workers}", show_progress=False)
                walls[workers] = time.perf_counter() - start
                busy = sum(t.seconds or 0 for t in results[workers].trials)
                # NOTE: trial-seconds per wall second: ~2 when two trials really overlap; the load average says
                # how much of the 2 cores other processes took meanwhile
                concurrency[workers] = f"{busy / walls[workers]:.2f} trials in flight on average, load average {os.getloadavg()[0]:.1f}"
                print(f"{name}: {workers} worker(s): {walls[workers]:.1f}s, {results[workers].stop_reason}; {concurrency[workers]}", flush=True)
            tuned = results[2]
            base = tuned.baseline
            lines.append(f"\n{name}: {metric}, max drop {max_drop:g}; source {metric} {base['metric']:.4f}, {base['size_bytes'] / 1e6:.3f} MB, "
                         f"{base['latency_ms']:.3f} ms")
            lines.append(f"  {'':26s} {metric:>9s} {'meets':>5s} {'size (MB)':>9s} {'ratio':>7s} {'lat ms':>9s} {'trials':>6s} {'wall (s)':>8s}  configuration")
            lines.append(_row("best default (int8-static)", default, base))
            lines.append(_row("tuned, 2 workers", tuned, base, walls[2]))
            if 1 in results:
                lines.append(_row("tuned, 1 worker", results[1], base, walls[1]))
                lines.append(f"  speed-up with 2 workers: {walls[1] / walls[2]:.2f}x (same budget and seed); "
                             f"1 worker: {concurrency[1]}; 2 workers: {concurrency[2]}")
            d, t = default.best, tuned.best
            if d is not None and t is not None:
                verdict = ("tuned meets and is at least as small as the default" if t.meets and (not d.meets or (t.size_bytes or 0) <= (d.size_bytes or 0))
                           else "tuned misses the target")
                lines.append(f"  -> {verdict}{'' if d.meets else ' (the default misses the criterion)'}")
            print("\n".join(lines[-7:]), flush=True)
        print("\n=== summary ===" + "\n".join(lines))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
