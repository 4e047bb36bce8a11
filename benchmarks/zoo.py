"""Real third-party ONNX models through modelpress's methods and its peers' quantizers, side by side.

    python benchmarks/zoo.py [--models ppocr-cls,yolov8n] [--methods int8-static,ort-static] [--calib 16] [--json out.json]

modelpress int8-static against ONNX Runtime's ``quantize_static`` / ``quantize_dynamic`` and NNCF's
post-training ``nncf.quantize`` (its default, and ``model_type=TRANSFORMER`` on transformers), each
at its defaults, every model, ratios to ORT's static file and the issue-24 bars::

    nice -n 10 python benchmarks/zoo.py --methods int8-static,ort-static,ort-dynamic,nncf,nncf-transformer \
        --repeat 1 --vs ort-static

The models are those of ``benchmarks/real_models.py`` (PP-OCRv4 det/rec/cls, YOLOv8n, silero-vad,
MTCNN's ONet face-landmark stage) and ``minilm`` (``benchmarks/minilm.py``, all-MiniLM-L6-v2, fed
real sentences), with their realistic inputs: ``--calib`` samples (seed 0) calibrate, ``--evaluate``
other samples (seed 1, default 64: with 16, one near-tie flip moves agreement by 6 points and the
ranking of two close files changes with the draw) evaluate. Every quantizer runs in a fresh child process that loads the
calibration arrays from an ``.npz`` and quantizes; its peak RSS is the kernel's high-water mark of
that whole process (``ru_maxrss`` from ``wait4``; the child is started by a small launcher process
made before anything is loaded, because Linux carries the forking parent's high-water mark over
``exec``), its CPU time that of the quantization (user + system, with its own children). The
parent then judges each written file against the fp32 file on the evaluation samples with
modelpress's own criteria (:mod:`modelpress.evaluation`: each output classified, judged by
agreement / cosine / relative error / RMS error, and the worst flattened cosine), and times every
file at batch 1 on 1 intra-op thread, in interleaved rounds. A method that refuses a model prints
its one-line reason instead of figures.

The table is data: add a row to ``METHODS`` (a name and a function writing the quantized file)
or a model to ``real_models.ZOO`` and it is measured like the rest.
"""

from __future__ import annotations

import argparse
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

ROOT = Path(__file__).resolve().parents[1]

# NOTE: the launcher is started first, while this process is small: a child's ru_maxrss includes
# the high-water mark of the process it was exec'd from, so children are forked from the launcher.
_LAUNCHER = r"""
import json, os, subprocess, sys
for line in sys.stdin:
    spec = json.loads(line)
    with open(spec["log"], "w") as log:
        p = subprocess.Popen(spec["argv"], stdout=log, stderr=subprocess.STDOUT, env=spec["env"])
        _, status, usage = os.wait4(p.pid, 0)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "maxrss_kb": usage.ru_maxrss,
                      "cpu_s": usage.ru_utime + usage.ru_stime}), flush=True)
"""


def _compile_sources() -> None:
    """Byte-compile modelpress's sources first, as pip does when it installs a wheel: the peers'
    modules come compiled from their wheels, and with ``PYTHONDONTWRITEBYTECODE`` set (or a
    read-only checkout) every modelpress child would otherwise compile ~170 modules again
    (0.15-0.3 CPU-s a run, counted in its CPU time)."""
    import compileall

    for folder in ("core", "adapters", "plugins"):
        compileall.compile_dir(str(ROOT / folder), quiet=1)


class Launcher:
    """A small process that starts each measured child and reports its ``wait4`` rusage."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _LAUNCHER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def run(self, argv: list[str], log: Path) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc.stdin.write(json.dumps({"argv": argv, "env": env, "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait()


import numpy as np  # noqa: E402

sys.path.insert(0, str(ROOT))

from benchmarks.real_models import ZOO, fetch, inputs  # noqa: E402

# NOTE: a trained transformer encoder beside the pip-wheel models (benchmarks/minilm.py): 64 real
# sentences calibrate it (as in the quantize-vs-ORT runs), its output is a pooled embedding.
MINILM = "minilm"
MODELS = [*ZOO, MINILM]
TRANSFORMERS = {MINILM}
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
    """One feed dict per sample (ORT's CalibrationDataReader protocol, NNCF's dataset items)."""
    if name == "silero-vad":
        n = len(feeds["input"])
        return [
            {
                "input": feeds["input"][i : i + 1],
                "state": feeds["state"][:, i : i + 1],
                "sr": feeds["sr"],
            }
            for i in range(n)
        ]
    n = len(next(iter(feeds.values())))
    return [{k: v[i : i + 1] for k, v in feeds.items()} for i in range(n)]


def _modelpress_calibration(name: str, feeds: dict[str, np.ndarray]) -> Any:
    # NOTE: silero-vad's too: it has no common batch axis 0 (a scalar sample rate, state [2, N, 128]), so
    # the data is one whole feed; int8-static quantizes the If branch it takes (16 kHz)
    return feeds


# -- the methods -------------------------------------------------------------------------------------
def _modelpress(
    method: str, *, calibrated: bool = False, **options: Any
) -> Callable[[str, Path, dict[str, np.ndarray], Path], None]:
    """modelpress ``method`` at its defaults (``options`` aside), given the calibration data when
    ``calibrated`` (int8-static needs it; int4-weight-only uses it when given: GPTQ)."""

    def run(name: str, source: Path, calib: dict[str, np.ndarray], out: Path) -> None:
        import modelpress

        model = modelpress.load(source)
        data = _modelpress_calibration(name, calib) if calibrated else None
        result = modelpress.quantize(
            model, method, calibration=data, show_progress=False, **options
        )
        # NOTE: as a user runs it: the written file is verified, on the data they have (every method:
        # generated inputs give silero-vad a random sample rate and a chunk too short for its 8 kHz branch)
        modelpress.export(
            result, out, sample=_modelpress_calibration(name, calib), show_progress=False
        )
        figures = result.provenance.passes[-1].figures
        keep = (
            "quantized_nodes",
            "opset_converted",
            "calibration_batch",
            "calibration_cosine",
            "layers",
            "configuration",
        )
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


def _nncf(transformer: bool = False) -> Callable[[str, Path, dict[str, np.ndarray], Path], None]:
    """NNCF's ONNX post-training quantization at its defaults (every calibration sample: its
    ``subset_size`` is 300), with ``model_type=TRANSFORMER`` when asked."""

    def run(name: str, source: Path, calib: dict[str, np.ndarray], out: Path) -> None:
        import nncf
        import onnx

        samples = _per_sample(name, calib)
        model_type = nncf.ModelType.TRANSFORMER if transformer else None
        quantized = nncf.quantize(
            onnx.load(str(source)), nncf.Dataset(samples), model_type=model_type
        )
        onnx.save(quantized, str(out))

    return run


@dataclass(frozen=True)
class Variant:
    name: str
    run: Callable[[str, Path, dict[str, np.ndarray], Path], None]
    tool: str = "modelpress"
    transformers_only: bool = False  # NOTE: a preset for transformers: not run on the CNNs


METHODS: list[Variant] = [
    Variant("int8-static", _modelpress("int8-static", calibrated=True)),
    # NOTE: without the sensitivity search (fully quantized): its cost is issue 12's subject
    Variant("int8-static-nosens", _modelpress("int8-static", calibrated=True, sensitivity=False)),
    # NOTE: with the configuration search (opt-in): its gain and cost beside the defaults
    Variant("int8-static-search", _modelpress("int8-static", calibrated=True, search_config=True)),
    # NOTE: the sensitivity search's fallback forced to one form (the default, "auto", picks per node):
    # float for every node, or int8 weight-only first for every node (PP-OCR det: 47 nodes weight-only,
    # 1.14x fp32 latency; weight-only keeps its weights' rounding error, so more nodes leave int8)
    Variant("int8-static-floatfb", _modelpress("int8-static", calibrated=True, fallback="float")),
    Variant(
        "int8-static-wofb", _modelpress("int8-static", calibrated=True, fallback="weight-only")
    ),
    Variant("int8-dynamic", _modelpress("int8-dynamic")),
    Variant("int8-weight-only", _modelpress("int8-weight-only")),
    Variant("int4-weight-only", _modelpress("int4-weight-only")),
    # NOTE: as a user with calibration data runs it (its default is then GPTQ)
    Variant("int4-weight-only-data", _modelpress("int4-weight-only", calibrated=True)),
    Variant("fp16", _modelpress("fp16")),
    Variant(
        "codebook", _modelpress("codebook", op_types=["Conv", "ConvTranspose", "Gemm", "MatMul"])
    ),
    Variant("ort-static", _ort_static, tool="onnxruntime"),
    Variant("ort-dynamic", _ort_dynamic, tool="onnxruntime"),
    Variant("nncf", _nncf(), tool="nncf"),
    Variant("nncf-transformer", _nncf(transformer=True), tool="nncf", transformers_only=True),
]
PEERS = ("ort-static", "ort-dynamic", "nncf", "nncf-transformer")


# -- child process: one quantization, its CPU time -------------------------------------------------
def _child(model: str, method: str, calib_path: str, out: str) -> None:
    import logging

    import onnxruntime  # noqa: F401  (every tool runs on it: imported alike before the clock starts)

    logging.disable(logging.INFO)  # NOTE: ORT's and NNCF's quantizers log every node at INFO
    with np.load(calib_path) as z:
        calib = {k: z[k] for k in z.files}
    variant = next(v for v in METHODS if v.name == method)
    source = _source(model)

    def cpu() -> float:
        own, kids = (
            resource.getrusage(resource.RUSAGE_SELF),
            resource.getrusage(resource.RUSAGE_CHILDREN),
        )
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    start, wall = cpu(), time.perf_counter()
    try:
        variant.run(model, source, calib, Path(out))
        error = None
    except Exception as exc:  # a refusal is a result: its message is printed
        error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    print(
        "RESULT "
        + json.dumps(
            {
                "cpu_s": round(cpu() - start, 2),
                "wall_s": round(time.perf_counter() - wall, 2),
                "error": error,
            }
        )
    )


def _measure(launcher: Launcher, model: str, method: str, calib: Path, out: Path) -> dict[str, Any]:
    log = out.with_suffix(".log")
    usage = launcher.run(
        [sys.executable, __file__, "--child", model, method, str(calib), str(out)], log
    )
    lines = log.read_text(errors="replace").splitlines()
    result = next((json.loads(x[7:]) for x in lines if x.startswith("RESULT ")), None)
    if result is None:
        return {"error": f"child failed (rc {usage['rc']}): {lines[-1] if lines else ''}"}
    figures = next((json.loads(x[8:]) for x in lines if x.startswith("FIGURES ")), {})
    return {**result, "peak_mb": round(usage["maxrss_kb"] / 1024, 1), "figures": figures}


# -- evaluation: modelpress's own criteria ----------------------------------------------------------
def _run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [np.asarray(o) for o in session.run(None, feeds)]


@dataclass
class Judge:
    """The fp32 model's outputs on the evaluation samples and how each output is judged (the
    criteria int8-static's defaults imply: agreement 0.99, cosine 0.99, relative error 0.1)."""

    names: list[str]
    reference: list[np.ndarray]
    criteria: list[Any]

    @classmethod
    def of(cls, source: Path, evaluation: dict[str, np.ndarray]) -> Judge:
        import modelpress
        from modelpress.evaluation.criteria import Bounds, infer_criteria

        model = modelpress.load(source)
        names = model.signature.output_names
        reference = _run(source, evaluation)
        bounds = Bounds(agreement=0.99, cosine=0.99, relative_error=0.1)
        return cls(names, reference, infer_criteria(names, reference, model=model, bounds=bounds))

    def figures(self, actual: list[np.ndarray]) -> dict[str, Any]:
        from modelpress.evaluation.comparison import compare_outputs
        from modelpress.evaluation.criteria import judge

        comparison = compare_outputs(self.names, self.reference, actual, self.criteria)
        judgement = judge(self.criteria, self.reference, actual, self.names)
        agreements = [
            v
            for c, v in zip(judgement.criteria, judgement.values, strict=True)
            if c.metric == "agreement"
        ]
        return {
            "cosine": comparison.cosine,
            "agreement": min(agreements) if agreements else None,
            "met": judgement.met,
            "loss": judgement.loss,
            "judged": judgement.figures(),
        }

    def rules(self) -> str:
        return ", ".join(f"{c.output}: {c.form or c.kind} by {c.metric}" for c in self.criteria)


def _latencies(model: str, paths: list[Path], evaluation: dict[str, np.ndarray]) -> list[float]:
    """Batch-1 latency (ms) of each file, 1 intra-op thread, in interleaved rounds (about 0.2 s of
    fp32 runs per round, at least 3 runs), the median of the per-round medians."""
    import onnxruntime as ort

    from benchmarks.quantize_vs_ort import _interleaved_latency

    feeds = _per_sample(model, evaluation)[0]
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level = 1, 4
    session = ort.InferenceSession(str(paths[0]), options, providers=["CPUExecutionProvider"])
    session.run(None, feeds)
    # NOTE: one warm run times a round (not the session's creation: that made silero-vad's rounds 10
    # runs of 0.1 ms, and its latency ratios swing 0.7x-1.1x from one run of the benchmark to the next)
    start = time.perf_counter()
    session.run(None, feeds)
    once = max(time.perf_counter() - start, 1e-5)
    del session
    return _interleaved_latency(
        paths, feeds, threads=1, repeats=int(min(max(3, 0.2 / once), 5000)), rounds=5
    )


# -- one model -------------------------------------------------------------------------------------
def _variants(model: str, methods: list[str]) -> list[str]:
    by_name = {v.name: v for v in METHODS}
    unknown = sorted(set(methods) - set(by_name))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; known: {', '.join(by_name)}")
    return [m for m in methods if not by_name[m].transformers_only or model in TRANSFORMERS]


def _run_model(
    launcher: Launcher,
    model: str,
    methods: list[str],
    counts: tuple[int, int],
    repeat: int,
    tmp: Path,
) -> list[dict[str, Any]]:
    calib_n, evaluate_n = counts
    methods = _variants(model, methods)
    source = _source(model)
    evaluation = _inputs(model, evaluate_n, seed=1)
    judge = Judge.of(source, evaluation)
    calib = tmp / f"{model}-calib.npz"
    np.savez(calib, **_inputs(model, calib_n, seed=0))
    base = source.stat().st_size
    description = (
        ZOO[model].description
        if model in ZOO
        else "all-MiniLM-L6-v2 sentence encoder (torch export, opset 17)"
    )
    print(
        f"\n{model}: {description}; fp32 {base / 1e6:.2f} MB; {calib_n} calibration samples; judged: {judge.rules()}"
    )
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for _ in range(repeat):  # NOTE: interleaved, so every method sees the same machine load
        for method in methods:
            runs[method].append(
                _measure(launcher, model, method, calib, tmp / f"{model}-{method}.onnx")
            )
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
            try:
                row.update(judge.figures(_run(out, evaluation)))
                row["bytes"] = out.stat().st_size + sum(
                    p.stat().st_size for p in out.parent.glob(out.name + ".data")
                )
            except (
                Exception
            ) as exc:  # NOTE: the tool wrote a file ORT cannot run: that is its result
                row["error"] = f"its file does not run: {' '.join(str(exc).split())[:240]}"
        rows.append(row)
    _add_latency(model, source, rows, evaluation, tmp)
    _print_model(rows, base)
    return rows


def _add_latency(
    model: str,
    source: Path,
    rows: list[dict[str, Any]],
    evaluation: dict[str, np.ndarray],
    tmp: Path,
) -> None:
    timed = [r for r in rows if "bytes" in r]
    paths = [source] + [tmp / f"{model}-{r['method']}.onnx" for r in timed]
    try:
        latency = _latencies(model, paths, evaluation)
    except (
        Exception
    ) as exc:  # NOTE: a file ORT ran on the samples may still refuse batch 1 (silero's state)
        print(f"  (latency not measured: {' '.join(str(exc).split())[:200]})")
        return
    for row, ms in zip(timed, latency[1:], strict=True):
        row["latency_ms"], row["latency_fp32"] = ms, ms / latency[0]
    for row in rows:
        row["fp32_latency_ms"] = latency[0]


def _print_model(rows: list[dict[str, Any]], base: int) -> None:
    if rows and "fp32_latency_ms" in rows[0]:
        print(f"  fp32 latency {rows[0]['fp32_latency_ms']:.2f} ms (batch 1, 1 thread)")
    print(
        f"  {'method':18s} {'size MB':>8s} {'ratio':>6s} {'cosine':>8s} {'agree':>6s} {'met':>3s} {'cpu s':>6s} {'peak MB':>7s} "
        f"{'ms':>7s} {'/fp32':>6s}  judged / notes"
    )
    for row in rows:
        method = row["method"]
        if "bytes" not in row:
            print(
                f"  {method:18s} {'-':>8s} {'-':>6s} {'-':>8s} {'-':>6s} {'-':>3s} {row.get('cpu_s', 0):6.1f} {row.get('peak_mb', 0):7.0f} "
                f"{'-':>7s} {'-':>6s}  refused: {str(row.get('error'))[:300]}"
            )
            continue
        agree = "-" if row["agreement"] is None else f"{row['agreement']:.3f}"
        ms = (
            f"{row['latency_ms']:7.2f} {row['latency_fp32']:5.2f}x"
            if "latency_ms" in row
            else f"{'-':>7s} {'-':>6s}"
        )
        judged = ", ".join(f"{k} {v:.4g}" for k, v in row["judged"].items())
        notes = ", ".join(
            f"{k} {v}" for k, v in row.get("figures", {}).items() if k != "opset_converted"
        )
        print(
            f"  {method:18s} {row['bytes'] / 1e6:8.2f} {base / row['bytes']:5.2f}x {row['cosine']:8.5f} {agree:>6s} {'yes' if row['met'] else 'no':>3s} "
            f"{row['cpu_s']:6.1f} {row['peak_mb']:7.0f} {ms}  {judged}{'; ' + notes if notes else ''}"
        )
    sys.stdout.flush()


# -- side by side ----------------------------------------------------------------------------------
def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:5.2f}x" if a is not None and b else f"{'-':>6s}"


def _print_ratios(rows: list[dict[str, Any]], vs: str) -> None:
    """Each method against ``vs`` on the same model: CPU time, file size, peak RSS and batch-1
    latency as ratios (below 1: less than ``vs``), cosine and agreement side by side."""
    print(f"\nratios to {vs} (same run, interleaved; load average {_load()})")
    print(
        f"  {'model':11s} {'method':18s} {'cpu':>6s} {'size':>6s} {'peak':>6s} {'lat':>6s} {'cosine':>8s} {'vs':>8s} {'agree':>6s} {'vs':>6s}"
    )
    for row in rows:
        ref = next((r for r in rows if r["model"] == row["model"] and r["method"] == vs), None)
        if row["method"] == vs or ref is None or "bytes" not in row or "bytes" not in ref:
            continue
        agree = "-" if row.get("agreement") is None else f"{row['agreement']:.3f}"
        ref_agree = "-" if ref.get("agreement") is None else f"{ref['agreement']:.3f}"
        print(
            f"  {row['model']:11s} {row['method']:18s} {_ratio(row['cpu_s'], ref['cpu_s'])} {_ratio(row['bytes'], ref['bytes'])} "
            f"{_ratio(row['peak_mb'], ref['peak_mb'])} {_ratio(row.get('latency_ms'), ref.get('latency_ms'))} "
            f"{row['cosine']:8.5f} {ref['cosine']:8.5f} {agree:>6s} {ref_agree:>6s}"
        )


def _bars(
    row: dict[str, Any], peers: list[dict[str, Any]], ort: dict[str, Any] | None
) -> list[str]:
    """Where ``row`` misses issue 24's bars against the ``peers`` (their files) and ORT's static run."""
    missed = []
    best = max(peers, key=lambda p: p["cosine"])
    if row["cosine"] < best["cosine"]:
        missed.append(f"cosine {row['cosine']:.5f} < {best['method']} {best['cosine']:.5f}")
    agreeing = [p for p in peers if p.get("agreement") is not None]
    if row.get("agreement") is not None and agreeing:
        top = max(agreeing, key=lambda p: p["agreement"])
        if row["agreement"] < top["agreement"]:
            missed.append(
                f"agreement {row['agreement']:.3f} < {top['method']} {top['agreement']:.3f}"
            )
    small = min(peers, key=lambda p: p["bytes"])
    if row["bytes"] > small["bytes"]:
        missed.append(
            f"size {row['bytes'] / 1e6:.2f} MB > {small['method']} {small['bytes'] / 1e6:.2f} MB"
        )
    if ort is not None and "peak_mb" in ort and "bytes" in ort:
        if row["peak_mb"] > ort["peak_mb"]:
            missed.append(f"peak RSS {row['peak_mb']:.0f} MB > ort-static {ort['peak_mb']:.0f} MB")
        if row["cpu_s"] > 2 * ort["cpu_s"]:
            missed.append(f"quantize CPU {row['cpu_s']:.1f} s > 2x ort-static {ort['cpu_s']:.1f} s")
        if (
            ort.get("latency_ms")
            and row.get("latency_ms")
            and row["latency_ms"] > 1.05 * ort["latency_ms"]
        ):
            missed.append(
                f"latency {row['latency_ms']:.2f} ms > 1.05x ort-static {ort['latency_ms']:.2f} ms"
            )
    return missed


def _print_bars(rows: list[dict[str, Any]], ours: str) -> None:
    """Issue 24's bars for ``ours`` on each model: quality >= the best peer's, size <= the smallest
    peer file, peak RSS <= ORT static's, quantize CPU <= 2x ORT static's, latency <= 1.05x ORT's file."""
    print(f"\n{ours} against the peers' defaults ({', '.join(PEERS)}; load average {_load()})")
    for model in dict.fromkeys(r["model"] for r in rows):
        row = next((r for r in rows if r["model"] == model and r["method"] == ours), None)
        peers = [r for r in rows if r["model"] == model and r["method"] in PEERS and "bytes" in r]
        ort = next((r for r in rows if r["model"] == model and r["method"] == "ort-static"), None)
        if row is None or "bytes" not in row or not peers:
            print(
                f"  {model:11s} not compared ({'no peer file' if row and 'bytes' in row else ours + ' wrote no file'})"
            )
            continue
        missed = _bars(row, peers, ort)
        unrun = (
            " (ort-static wrote no file that runs: peak, CPU and latency not compared)"
            if ort is not None and "bytes" not in ort
            else ""
        )
        print(
            f"  {model:11s} "
            + ("every bar met" if not missed else "behind: " + "; ".join(missed))
            + unrun
        )


def _load() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", default=",".join(MODELS), help=f"models, from {', '.join(MODELS)}"
    )
    parser.add_argument(
        "--methods",
        default="int8-static,ort-static,ort-dynamic,nncf,nncf-transformer",
        help=f"from {', '.join(v.name for v in METHODS)}",
    )
    parser.add_argument(
        "--calib", type=int, default=None, help="calibration samples (default 16; minilm 64)"
    )
    parser.add_argument(
        "--evaluate", type=int, default=64, help="held-out samples every file is judged on"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run each method this many times, interleaved; CPU time and peak RSS are the medians",
    )
    parser.add_argument(
        "--vs",
        default="ort-static",
        help="print each method's ratios to this one: CPU time, size, peak RSS, latency",
    )
    parser.add_argument("--json", help="also write the rows as JSON here")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, method, calib, out = args.child
        _child(model, method, calib, out)
        return
    _compile_sources()
    launcher = Launcher()
    print(f"load average at start {_load()} ({os.cpu_count()} CPUs)")
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="modelpress-zoo-") as tmp:
            for model in args.models.split(","):
                calib = args.calib or DEFAULT_CALIB.get(model, 16)
                counts = (calib, args.evaluate)
                rows += _run_model(
                    launcher, model, args.methods.split(","), counts, args.repeat, Path(tmp)
                )
    finally:
        launcher.close()
    if args.vs:
        _print_ratios(rows, args.vs)
    if "int8-static" in args.methods.split(","):
        _print_bars(rows, "int8-static")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
