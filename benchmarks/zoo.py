"""Real third-party ONNX models through every applicable method, side by side with ONNX Runtime's tool.

    python benchmarks/zoo.py [--models ppocr-cls,yolov8n] [--methods int8-static,ort-static] [--calib 16] [--json out.json]

int8-static against ONNX Runtime's ``quantize_static``, as ratios (time, size, peak RSS; cosine
side by side), every model incl. the MiniLM encoder, each run twice, interleaved::

    nice -n 10 python benchmarks/zoo.py --models yolov8n,ppocr-det,ppocr-rec,ppocr-cls,minilm \
        --methods int8-static,ort-static --repeat 2 --vs ort-static

The models are those of ``benchmarks/real_models.py`` (PP-OCRv4 det/rec/cls, YOLOv8n, silero-vad)
and ``minilm`` (``benchmarks/minilm.py``, all-MiniLM-L6-v2, fed real sentences), with their realistic inputs: ``--calib`` samples (seed 0) calibrate, 16 other samples (seed 1)
evaluate. Every run happens in a fresh child process, which reports its CPU time and peak RSS
(VmHWM of the whole process, reset after the inputs are made: loading the tool and the model
count, decoding the photos does not); the parent then runs each written file in
ONNX Runtime on the evaluation samples and compares it with the original fp32 file. A method
that refuses a model prints its one-line reason instead of figures.

Printed per model and method: file size and ratio to fp32, cosine of the outputs to fp32 (the
worst output) and top-1 agreement (classifier-like outputs), quantize CPU seconds and peak RSS.

The table is data: add a row to ``METHODS`` (a name and a function writing the quantized file)
or a model to ``real_models.ZOO`` and it is measured like the rest.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.real_models import ZOO, fetch, inputs  # noqa: E402

# NOTE: a trained transformer encoder beside the pip-wheel models (benchmarks/minilm.py): 64 real
# sentences calibrate it (as in the quantize-vs-ORT runs), its output is a pooled embedding.
MINILM = "minilm"
KINDS = {**{name: m.output_kind for name, m in ZOO.items()}, MINILM: "embedding"}
DEFAULT_CALIB = {MINILM: 64}


def _source(model: str) -> Path:
    if model == MINILM:
        from benchmarks.minilm import export_minilm

        return export_minilm()
    return fetch(model)


def _inputs(model: str, n: int, seed: int) -> dict[str, np.ndarray]:
    if model == MINILM:
        from benchmarks.minilm import token_inputs

        return token_inputs(n, seed)
    return inputs(model, n=n, seed=seed)


# -- calibration data per model ---------------------------------------------------------------------
def _per_sample(name: str, feeds: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """One feed dict per sample (ORT's CalibrationDataReader protocol)."""
    n = len(next(iter(feeds.values())))
    if name == "silero-vad":
        return [{"input": feeds["input"][i : i + 1], "state": feeds["state"][:, i : i + 1], "sr": feeds["sr"]} for i in range(n)]
    return [{k: v[i : i + 1] for k, v in feeds.items()} for i in range(n)]


def _modelpress_calibration(name: str, feeds: dict[str, np.ndarray]) -> Any:
    # NOTE: silero-vad's scalar `sr` and batch-on-axis-1 `state` do not fit modelpress's data
    # convention (one array per input, samples on axis 0); its int8-static refuses the model
    # (the network is inside If branches) before it would read the data.
    return None if name == "silero-vad" else feeds


# -- the methods -------------------------------------------------------------------------------------
def _modelpress(method: str, **options: Any) -> Callable[[str, Path, dict[str, np.ndarray], Path], None]:
    def run(name: str, source: Path, calib: dict[str, np.ndarray], out: Path) -> None:
        import modelpress

        model = modelpress.load(source)
        data = _modelpress_calibration(name, calib) if method == "int8-static" else None
        result = modelpress.quantize(model, method, calibration=data, show_progress=False, **options)
        modelpress.export(result, out, verify=False)
        figures = result.provenance.passes[-1].figures
        keep = ("quantized_nodes", "opset_converted", "calibration_batch", "calibration_cosine", "layers")
        print("FIGURES " + json.dumps({k: figures[k] for k in keep if k in figures}, default=str))

    return run


def _ort_static(name: str, source: Path, calib: dict[str, np.ndarray], out: Path) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    samples = _per_sample(name, calib)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(samples)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    quantize_static(str(source), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)


def _ort_dynamic(name: str, source: Path, calib: dict[str, np.ndarray], out: Path) -> None:
    from onnxruntime.quantization import quantize_dynamic

    quantize_dynamic(str(source), str(out))


@dataclass(frozen=True)
class Variant:
    name: str
    run: Callable[[str, Path, dict[str, np.ndarray], Path], None]
    tool: str = "modelpress"


METHODS: list[Variant] = [
    Variant("int8-static", _modelpress("int8-static")),
    # NOTE: without the sensitivity search (fully quantized): its cost is issue 12's subject
    Variant("int8-static-nosens", _modelpress("int8-static", sensitivity=False)),
    Variant("int8-dynamic", _modelpress("int8-dynamic")),
    Variant("int8-weight-only", _modelpress("int8-weight-only")),
    Variant("int4-weight-only", _modelpress("int4-weight-only")),
    Variant("fp16", _modelpress("fp16")),
    Variant("codebook", _modelpress("codebook", op_types=["Conv", "ConvTranspose", "Gemm", "MatMul"])),
    Variant("ort-static", _ort_static, tool="onnxruntime"),
    Variant("ort-dynamic", _ort_dynamic, tool="onnxruntime"),
]


# -- child process: one quantization, its CPU time and peak RSS -------------------------------------
def _reset_peak() -> None:
    """Linux: reset the process's peak RSS (VmHWM), so making the inputs (decoding photos,
    rendering text) does not count as the tool's memory."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(model: str, method: str, calib_n: int, out: str) -> None:
    calib = _inputs(model, calib_n, seed=0)
    variant = next(v for v in METHODS if v.name == method)
    _reset_peak()
    start = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.perf_counter()
    try:
        variant.run(model, _source(model), calib, Path(out))
        error = None
    except Exception as exc:  # a refusal is a result: its message is printed
        error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    end = resource.getrusage(resource.RUSAGE_SELF)
    print("RESULT " + json.dumps({
        "cpu_s": round(end.ru_utime + end.ru_stime - start.ru_utime - start.ru_stime, 2),
        "wall_s": round(time.perf_counter() - wall, 2),
        "peak_mb": round(_peak_mb(), 1),
        "error": error,
    }))


def _measure(model: str, method: str, calib_n: int, out: Path) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", model, method, str(calib_n), str(out)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    lines = proc.stdout.splitlines()
    result = next((json.loads(x[7:]) for x in lines if x.startswith("RESULT ")), None)
    if result is None:
        return {"error": f"child failed (rc {proc.returncode}): {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}"}
    figures = next((json.loads(x[8:]) for x in lines if x.startswith("FIGURES ")), {})
    return {**result, "figures": figures}


# -- evaluation ------------------------------------------------------------------------------------
def _run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [np.asarray(o) for o in session.run(None, feeds)]


def _compare(kind: str, reference: list[np.ndarray], actual: list[np.ndarray]) -> dict[str, float | None]:
    cosines = []
    for ref, out in zip(reference, actual, strict=True):
        a, b = ref.astype(np.float64).ravel(), out.astype(np.float64).ravel()
        denominator = np.linalg.norm(a) * np.linalg.norm(b)
        cosines.append(float(a @ b / denominator) if denominator else float(np.array_equal(a, b)))
    agreement = None
    if kind == "probabilities":
        ref, out = reference[0], actual[0]
        agreement = float(np.mean(ref.argmax(axis=-1) == out.argmax(axis=-1)))
    return {"cosine": min(cosines), "agreement": agreement}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(ZOO), help=f"models, from {', '.join(KINDS)}")
    parser.add_argument("--methods", default=",".join(v.name for v in METHODS))
    parser.add_argument("--calib", type=int, default=None, help="calibration samples (default 16; minilm 64)")
    parser.add_argument("--repeat", type=int, default=1, help="run each method this many times, interleaved; CPU time and peak RSS are the medians")
    parser.add_argument("--vs", default="", help="print each method's ratio to this one (e.g. ort-static): CPU time, size, cosine, peak RSS")
    parser.add_argument("--json", help="also write the rows as JSON here")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, method, n, out = args.child
        _child(model, method, int(n), out)
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="modelpress-zoo-") as tmp:
        for model in args.models.split(","):
            rows += _run_model(model, args.methods.split(","), args.calib or DEFAULT_CALIB.get(model, 16), args.repeat, Path(tmp))
    if args.vs:
        _print_ratios(rows, args.vs)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))


def _run_model(model: str, methods: list[str], calib: int, repeat: int, tmp: Path) -> list[dict[str, Any]]:
    source = _source(model)
    evaluation = _inputs(model, 16, seed=1)
    reference = _run(source, evaluation)
    base = source.stat().st_size
    description = ZOO[model].description if model in ZOO else "all-MiniLM-L6-v2 sentence encoder (torch export, opset 17)"
    print(f"\n{model}: {description}; fp32 {base / 1e6:.2f} MB; {calib} calibration samples")
    print(f"  {'method':18s} {'size MB':>8s} {'ratio':>6s} {'cosine':>8s} {'agree':>6s} {'cpu s':>7s} {'peak MB':>8s}  notes")
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for _ in range(repeat):  # NOTE: interleaved, so every method sees the same machine load
        for method in methods:
            runs[method].append(_measure(model, method, calib, tmp / f"{model}-{method}.onnx"))
    rows = []
    for method in methods:
        out = tmp / f"{model}-{method}.onnx"
        measured = dict(runs[method][-1])
        for key in ("cpu_s", "wall_s", "peak_mb"):
            values = [r[key] for r in runs[method] if key in r]
            if values:
                measured[key] = float(np.median(values))
        row: dict[str, Any] = {"model": model, "method": method, "fp32_bytes": base, **measured}
        if not measured.get("error") and out.exists():
            row["bytes"] = out.stat().st_size + sum(p.stat().st_size for p in out.parent.glob(out.name + ".data"))
            row.update(_compare(KINDS[model], reference, _run(out, evaluation)))
            agree = "-" if row["agreement"] is None else f"{row['agreement']:.3f}"
            notes = ", ".join(f"{k} {v}" for k, v in measured.get("figures", {}).items())
            print(f"  {method:18s} {row['bytes'] / 1e6:8.2f} {base / row['bytes']:5.2f}x {row['cosine']:8.5f} {agree:>6s} "
                  f"{measured['cpu_s']:7.1f} {measured['peak_mb']:8.0f}  {notes}")
        else:
            print(f"  {method:18s} {'-':>8s} {'-':>6s} {'-':>8s} {'-':>6s} {measured.get('cpu_s', 0):7.1f} "
                  f"{measured.get('peak_mb', 0):8.0f}  refused: {str(measured.get('error'))[:320]}")
        rows.append(row)
        sys.stdout.flush()
    return rows


def _print_ratios(rows: list[dict[str, Any]], vs: str) -> None:
    """Each method against ``vs`` on the same model: CPU time, file size and peak RSS as ratios
    (below 1: less than ``vs``), cosine side by side."""
    load = os.getloadavg()[0]
    print(f"\nratios to {vs} (same run, interleaved; load average {load:.1f})")
    print(f"  {'model':11s} {'method':18s} {'cpu':>6s} {'size':>6s} {'peak':>6s} {'cosine':>8s} {'vs':>8s} {'agree':>6s} {'vs':>6s}")
    for row in rows:
        ref = next((r for r in rows if r["model"] == row["model"] and r["method"] == vs), None)
        if row["method"] == vs or ref is None or "bytes" not in row or "bytes" not in ref:
            continue
        agree = "-" if row.get("agreement") is None else f"{row['agreement']:.3f}"
        ref_agree = "-" if ref.get("agreement") is None else f"{ref['agreement']:.3f}"
        print(f"  {row['model']:11s} {row['method']:18s} {row['cpu_s'] / max(ref['cpu_s'], 1e-9):5.2f}x {row['bytes'] / ref['bytes']:5.2f}x "
              f"{row['peak_mb'] / max(ref['peak_mb'], 1e-9):5.2f}x {row['cosine']:8.5f} {ref['cosine']:8.5f} {agree:>6s} {ref_agree:>6s}")


if __name__ == "__main__":
    main()
