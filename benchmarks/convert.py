"""Time and peak memory of each conversion, each run in a fresh process, printed as a table.

    python benchmarks/convert.py

Sources are the test suite's digits models (torch CNN, MLP and transformer encoder; Keras CNN),
saved as files first, so every row measures what `modelpress convert` does from a cold start:
import + verification against the source framework + export + verification in ONNX Runtime.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, sys, time
start = time.perf_counter()
import modelpress
import numpy as np
options = json.loads(sys.argv[3])
if "example" in options:
    options["example_inputs"] = np.load(options.pop("example"))
result = modelpress.convert(sys.argv[1], sys.argv[2], **options)
elapsed = time.perf_counter() - start
# NOTE: VmHWM, not ru_maxrss: the latter keeps the forking parent's high-water mark across exec.
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": elapsed, "peak_rss": int(hwm.split()[1]) * 1024,
                  "max_abs_diff": result.verification.max_abs_diff if result.verification else None,
                  "import_diff": result.model.provenance.extra.get("import_check", {}).get("max_abs_diff"),
                  "importer": result.model.provenance.importer}))
"""


def _sources(folder: Path) -> list[tuple[str, Path, Path, dict]]:
    import numpy as np
    import torch

    from tests import torch_models as tm

    rows = []
    x_img = np.random.default_rng(0).standard_normal((4, 1, 8, 8)).astype(np.float32)
    for name, module, example in (
        ("torch CNN (.pt2)", tm.DigitsCNN(width=32), x_img),
        ("torch MLP (.pt2)", tm.DigitsMLP(), x_img.reshape(4, 64)),
        ("torch transformer (.pt2)", tm.DigitsTransformer(), x_img.reshape(4, 8, 8)),
    ):
        path = folder / (name.split()[1].lower() + ".pt2")
        torch.export.save(
            torch.export.export(module.eval(), (torch.from_numpy(example),)), str(path)
        )
        rows.append((name + " -> onnx", path, folder / (path.stem + ".onnx"), {}))
    scripted = folder / "cnn_script.pt"
    torch.jit.trace(tm.DigitsCNN(width=32).eval(), torch.from_numpy(x_img)).save(str(scripted))
    np.save(folder / "example.npy", x_img)
    rows.append(
        (
            "torch CNN (TorchScript) -> onnx",
            scripted,
            folder / "cnn_script.onnx",
            {"example": str(folder / "example.npy")},
        )
    )
    try:
        from tests.models import keras_cnn

        keras_path = folder / "keras_cnn.keras"
        keras_cnn(width=32).save(keras_path)
        rows.append(("keras CNN (.keras) -> onnx", keras_path, folder / "keras_cnn.onnx", {}))
        rows.append(
            ("keras CNN (.keras) -> torch (.pt2)", keras_path, folder / "keras_cnn.pt2", {})
        )
    except ImportError:
        pass
    rows.append(("onnx CNN -> torch (.pt2)", folder / "cnn.onnx", folder / "cnn_back.pt2", {}))
    rows.append(
        (
            "onnx transformer -> torch (.pt2)",
            folder / "transformer.onnx",
            folder / "transformer_back.pt2",
            {},
        )
    )
    return rows


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        table = Table(
            title="modelpress convert: cold-start time and peak memory (one process per row)"
        )
        for col in (
            "conversion",
            "time (s)",
            "peak RSS (MB)",
            "output (KB)",
            "import |diff| vs source",
            "output |diff| vs import",
            "importer",
        ):
            table.add_column(col)
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        for name, source, output, options in _sources(folder):
            done = subprocess.run(
                [sys.executable, "-c", CHILD, str(source), str(output), json.dumps(options)],
                capture_output=True,
                text=True,
                env=env,
                check=False,
            )
            if done.returncode != 0:
                table.add_row(
                    name, "failed", "", "", "", done.stderr.strip().splitlines()[-1][:60], ""
                )
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])

            def fmt(value: float | None) -> str:
                return f"{value:.2e}" if value is not None else "-"

            table.add_row(
                name,
                f"{row['seconds']:.2f}",
                f"{row['peak_rss'] / 1e6:.0f}",
                f"{output.stat().st_size / 1e3:.1f}",
                fmt(row["import_diff"]),
                fmt(row["max_abs_diff"]),
                row["importer"],
            )
        Console(width=160).print(table)


if __name__ == "__main__":
    main()
