"""Walkthrough: train a CNN on scikit-learn's digits with PyTorch, then compress it with a recipe.

    python examples/compress_digits.py [OUT_DIR] [--epochs N]

1. train a small CNN (torch) and import it into modelpress (verified against torch);
2. write the data the recipe names (calibration, training and test sets as .npz);
3. run examples/digits-recipe.yaml: channel pruning -> distillation from the original ->
   INT8 static quantization, evaluated after every stage;
4. print the report table and where the files went.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

import modelpress
from modelpress.app.demo import digits_arrays, train_demo_model

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="digits-walkthrough", help="output folder")
    parser.add_argument(
        "--epochs", type=int, default=6, help="training epochs for the source model"
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # 1. a real model, trained here, imported and verified
    data = digits_arrays("nchw")
    cnn = train_demo_model("torch", data, epochs=args.epochs)
    model = modelpress.load(cnn, example_inputs=data["x_test"][:4])
    print(f"imported {model!r}")
    print(f"import check against torch: {model.provenance.extra['import_check']}")
    modelpress.export(model, out / "digits-cnn.onnx")

    # 2. the data the recipe refers to, named after the model's input
    name = model.signature.input_names[0]
    np.savez(out / "calib.npz", **{name: data["x_train"][:512]})
    np.savez(out / "train.npz", **{name: data["x_train"], "labels": data["y_train"]})
    np.savez(out / "test.npz", **{name: data["x_test"], "labels": data["y_test"]})
    shutil.copy(HERE / "digits-recipe.yaml", out / "digits-recipe.yaml")

    # 3. compress with the recipe
    result = modelpress.compress(
        out / "digits-cnn.onnx", out / "digits-recipe.yaml", output=out / "digits-small.onnx"
    )

    # 4. the report
    from rich.console import Console

    Console(width=160).print(result.report.table())
    print(f"compressed model: {result.output}; report: {out / 'report.html'}")


if __name__ == "__main__":
    main()
