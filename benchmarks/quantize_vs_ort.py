"""modelpress's quantize methods side by side with ONNX Runtime's own quantization tool.

    python benchmarks/quantize_vs_ort.py [--quick]

Two models trained here on scikit-learn's digits: a CNN (torch) and a transformer encoder
classifier (torch.nn.TransformerEncoder, each 8x8 image read as 8 row tokens). The same
calibration data (512 training images) goes to every tool. For each variant the table prints
accuracy on the test split, top-1 agreement and output cosine against fp32, file size and
ratio, quantization wall time and peak memory (each run in a fresh process), and ORT latency
(median) at batch 1 and 64 with 1 and 2 threads, all measured in this one run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# -- the models ---------------------------------------------------------------------------------
def _data() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    return {"x_train": x[:1437], "y_train": y[:1437], "x_test": x[1437:], "y_test": y[1437:]}


def _models(folder: Path, data: dict[str, np.ndarray], quick: bool) -> dict[str, dict]:
    import torch
    from torch import nn

    import modelpress
    from tests.torch_models import DigitsCNN, train_torch

    class Transformer(nn.Module):
        def __init__(self, d_model: int = 128, layers: int = 4) -> None:
            super().__init__()
            self.embed = nn.Linear(8, d_model)
            self.position = nn.Parameter(torch.randn(1, 8, d_model) * 0.1)
            layer = nn.TransformerEncoderLayer(
                d_model, 4, 4 * d_model, dropout=0.0, batch_first=True
            )
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.head = nn.Linear(d_model, 10)

        def forward(self, rows):  # type: ignore[no-untyped-def]
            return self.head(self.encoder(self.embed(rows) + self.position).mean(dim=1))

    img = lambda x: x.reshape(-1, 1, 8, 8)  # noqa: E731
    rows = lambda x: x.reshape(-1, 8, 8)  # noqa: E731
    specs = {
        "digits CNN": (DigitsCNN(width=64), img, 3 if quick else 8, 3e-3),
        "transformer encoder": (Transformer(), rows, 3 if quick else 12, 1e-3),
    }
    out = {}
    for name, (module, shape, epochs, lr) in specs.items():
        train_torch(module, shape(data["x_train"]), data["y_train"], epochs=epochs, lr=lr)
        x_test = shape(data["x_test"])
        model = modelpress.load(module, example_inputs=x_test[:4])
        path = folder / (name.split()[1] + ".onnx")
        modelpress.export(model, path)
        input_name = model.signature.input_names[0]
        np.savez(
            folder / (name.split()[1] + "_calib.npz"), **{input_name: shape(data["x_train"][:512])}
        )
        out[name] = {
            "path": path,
            "input": input_name,
            "x_test": x_test,
            "calib": folder / (name.split()[1] + "_calib.npz"),
        }
    return out


# -- quantizers (each runs in a fresh process: time and peak memory are its own) ------------------
def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _reset_peak() -> None:
    # NOTE: writing 5 to clear_refs resets VmHWM to the current RSS (Linux).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _run_quantizer(
    tool: str, source: str, target: str, calib: str, options: dict, queue: mp.Queue
) -> None:
    import logging

    import onnxruntime  # noqa: F401  (imported before measuring)

    logging.disable(logging.INFO)  # NOTE: ORT's quantizers log every node at INFO

    import modelpress

    arrays = dict(np.load(calib))
    _reset_peak()
    base = _peak_rss()
    start = time.perf_counter()
    if tool == "modelpress":
        model = modelpress.load(source)
        method = options.pop("method")
        result = modelpress.quantize(
            model, method, calibration=arrays, show_progress=False, **options
        )
        modelpress.export(result, target, verify=False)
        figures = result.provenance.passes[-1].figures
        count = figures.get(
            "quantized_nodes", figures.get("layers", figures.get("float16_nodes", ""))
        )
        note = f"{count} nodes {'in float16' if method == 'fp16' else 'quantized'}"
        if figures.get("float_nodes"):
            note += f", {len(figures['float_nodes'])} kept float"
    elif tool == "ort-static":
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                name, array = next(iter(arrays.items()))
                self.batches = iter([{name: array[i : i + 64]} for i in range(0, len(array), 64)])

            def get_next(self):  # type: ignore[no-untyped-def]
                return next(self.batches, None)

        quantize_static(
            source,
            target,
            Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=options.get("per_channel", False),
            calibrate_method=getattr(CalibrationMethod, options["calibrator"]),
            op_types_to_quantize=options.get("op_types"),
        )
        note = f"{options['calibrator']}, {'Conv/MatMul/Gemm' if options.get('op_types') else 'default op list'}"
    elif tool == "ort-dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=True)
        note = "QInt8 per-channel"
    elif tool == "ort-nbits":
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(onnx.load(source), block_size=128, is_symmetric=False)
        quantizer.process()
        quantizer.model.save_model_to_file(target)
        note = "RTN, block 128, asymmetric"
    else:
        raise ValueError(tool)
    elapsed = time.perf_counter() - start
    queue.put({"seconds": elapsed, "peak_mb": (_peak_rss() - base) / 1e6, "note": note})


def quantize_in_child(tool: str, source: Path, target: Path, calib: Path, options: dict) -> dict:
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()
    proc = ctx.Process(
        target=_run_quantizer,
        args=(tool, str(source), str(target), str(calib), dict(options), queue),
    )
    proc.start()
    proc.join()
    if proc.exitcode != 0 or queue.empty():
        return {"failed": True}
    return queue.get()


# -- measurement --------------------------------------------------------------------------------
def _interleaved_latency(
    paths: list[Path], feeds: dict[str, np.ndarray], threads: int, repeats: int, rounds: int = 5
) -> list[float]:
    """Median latency (ms) per model, measured in interleaved rounds so that machine drift hits
    every model alike; each round runs ``repeats`` times per model, the result is the median of
    the per-round medians."""
    import onnxruntime as ort

    sessions = []
    for path in paths:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        for _ in range(3):
            session.run(None, feeds)
        sessions.append(session)
    per_round: list[list[float]] = [[] for _ in paths]
    for _ in range(rounds):
        for i, session in enumerate(sessions):
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                session.run(None, feeds)
                times.append(time.perf_counter() - start)
            per_round[i].append(float(np.median(times)) * 1000)
    return [float(np.median(r)) for r in per_round]


def _evaluate(path: Path, info: dict, reference: np.ndarray, y: np.ndarray) -> dict:
    import onnxruntime as ort

    from modelpress.evaluation.criteria import score

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {info["input"]: info["x_test"]})[0]
    figures = {
        metric: score(metric, reference, logits, y)
        for metric in ("accuracy", "agreement", "cosine")
    }
    return {**figures, "logits": logits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer training epochs and latency repeats"
    )
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from rich.console import Console
    from rich.table import Table

    data = _data()
    repeats = {1: 10 if args.quick else 40, 64: 3 if args.quick else 8}
    console = Console(width=220)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        models = _models(folder, data, args.quick)
        for name, info in models.items():
            variants: list[tuple[str, str, dict]] = [
                ("ORT static, MinMax", "ort-static", {"calibrator": "MinMax"}),
                ("ORT static, Entropy", "ort-static", {"calibrator": "Entropy"}),
                ("ORT static, Percentile", "ort-static", {"calibrator": "Percentile"}),
                (
                    "ORT static, MinMax, Conv/MatMul/Gemm, per-channel",
                    "ort-static",
                    {
                        "calibrator": "MinMax",
                        "per_channel": True,
                        "op_types": ["Conv", "MatMul", "Gemm"],
                    },
                ),
                ("modelpress int8-static", "modelpress", {"method": "int8-static"}),
                (
                    "modelpress int8-static, entropy",
                    "modelpress",
                    {"method": "int8-static", "calibrator": "entropy"},
                ),
                ("ORT dynamic", "ort-dynamic", {}),
                ("modelpress int8-dynamic", "modelpress", {"method": "int8-dynamic"}),
                ("ORT MatMulNBits (int4)", "ort-nbits", {}),
                ("modelpress int4-weight-only (rtn)", "modelpress", {"method": "int4-weight-only"}),
                (
                    "modelpress int4-weight-only (gptq)",
                    "modelpress",
                    {"method": "int4-weight-only", "algorithm": "gptq"},
                ),
                (
                    "modelpress int4-weight-only (rtn, MatMulNBits)",
                    "modelpress",
                    {"method": "int4-weight-only", "format": "matmulnbits"},
                ),
                ("modelpress fp16", "modelpress", {"method": "fp16"}),
                ("modelpress codebook (4 bits)", "modelpress", {"method": "codebook", "bits": 4}),
            ]
            fp32_size = info["path"].stat().st_size
            import onnxruntime as ort

            reference = ort.InferenceSession(
                str(info["path"]), providers=["CPUExecutionProvider"]
            ).run(None, {info["input"]: info["x_test"]})[0]
            table = Table(
                title=f"{name}: quantization, side by side (test split: {len(data['y_test'])} digits)"
            )
            for col in (
                "variant",
                "acc",
                "agree",
                "cosine",
                "size KB",
                "ratio",
                "quant s",
                "peak MB",
                "b1 1t ms",
                "b1 2t ms",
                "b64 1t ms",
                "b64 2t ms",
                "notes",
            ):
                table.add_column(col, justify="left" if col in ("variant", "notes") else "right")
            rows = [("fp32", info["path"], {"seconds": 0.0, "peak_mb": 0.0, "note": "reference"})]
            for label, tool, options in variants:
                target = folder / f"{info['path'].stem}_{len(rows)}.onnx"
                run = quantize_in_child(tool, info["path"], target, info["calib"], options)
                rows.append((label, target if not run.get("failed") else None, run))
            feeds = {
                1: {info["input"]: info["x_test"][:1]},
                64: {info["input"]: info["x_test"][:64]},
            }
            ok = [
                (label, path, run)
                for label, path, run in rows
                if path is not None and path.exists()
            ]
            settings = [(b, t) for b in (1, 64) for t in (1, 2)]
            latencies = {
                s: _interleaved_latency([p for _, p, _ in ok], feeds[s[0]], s[1], repeats[s[0]])
                for s in settings
            }
            index = {label: i for i, (label, _, _) in enumerate(ok)}
            for label, path, run in rows:
                if label not in index:
                    table.add_row(label, *["-"] * 11, "failed")
                    continue
                ev = _evaluate(path, info, reference, data["y_test"])
                lat = [latencies[s][index[label]] for s in settings]
                size = path.stat().st_size
                table.add_row(
                    label,
                    f"{ev['accuracy']:.4f}",
                    f"{ev['agreement']:.4f}",
                    f"{ev['cosine']:.5f}",
                    f"{size / 1e3:.0f}",
                    f"{fp32_size / size:.2f}x",
                    f"{run['seconds']:.2f}",
                    f"{run['peak_mb']:.0f}",
                    *(f"{v:.3f}" for v in lat),
                    run["note"],
                )
                info.setdefault("results", {})[label] = {
                    **{k: v for k, v in ev.items() if k != "logits"},
                    "size": size,
                    "latency": lat,
                    **run,
                }
            console.print(table)
        summary = {name: info.get("results", {}) for name, info in models.items()}
        (ROOT / "benchmarks" / "results").mkdir(exist_ok=True)
        (ROOT / "benchmarks" / "results" / "quantize_vs_ort.json").write_text(
            json.dumps(summary, indent=1, default=float)
        )


if __name__ == "__main__":
    main()
