"""Deep Compression end to end: prune -> codebook (weight sharing) -> lossless pack.

    python examples/deep_compression.py [OUT_DIR] [--model mlp|cnn|both] [--epochs N] [--seeds 0,1,2]

Han et al. (ICLR 2016) compress LeNet-300-100 40x with no accuracy loss by iterative magnitude
pruning with retraining, k-means weight sharing with centroid fine-tuning and Huffman coding.
This runs the same pipeline as a modelpress recipe (examples/deep-compression-recipe.yaml), then
packs the result once more with ``strip=True`` (no metadata properties such as provenance or
the exporter's per-node stack traces, no doc strings or shape annotations: the deployable
minimum), on

* ``mlp``: a LeNet-300-100-shaped MLP (64 -> 300 -> 100 -> 10) on scikit-learn's 8x8 digits, and
* ``cnn``: the digits CNN of ``modelpress demo``,

and prints, per stage, the accuracy, the ONNX size, the packed (.mpk) size and the ratio against
the float32 ONNX file. With several ``--seeds`` (on the MLP each trains a new source model;
the fine-tuning passes seed themselves) it ends with one line per seed. Fine-tuning selects
epochs on a held-out part of the training split; the test split is only measured. Needs the
torch extra (training) and scikit-learn (the data).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

import numpy as np

import modelpress
from modelpress.app.demo import digits_arrays, train_demo_model

HERE = Path(__file__).resolve().parent
RECIPE = HERE / "deep-compression-recipe.yaml"


def train_lenet_300_100(data: dict[str, np.ndarray], epochs: int, seed: int = 0) -> Any:
    import torch
    from torch import nn

    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 300),
        nn.ReLU(),
        nn.Linear(300, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
    )
    x, y = torch.from_numpy(data["x_train"]), torch.from_numpy(data["y_train"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = order[i : i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def run(
    kind: str,
    out: Path,
    epochs: int,
    *,
    seed: int = 0,
    recipe: Path = RECIPE,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Train the model, run the recipe, and return the per-stage rows and the headline figures."""
    out.mkdir(parents=True, exist_ok=True)
    data = digits_arrays("nchw")
    if kind == "mlp":
        data = {k: (v.reshape(len(v), -1) if k.startswith("x_") else v) for k, v in data.items()}
        net = train_lenet_300_100(data, epochs, seed)
    else:
        net = train_demo_model(
            "torch", data, epochs=epochs
        )  # NOTE: seeds itself (0): `seed` is for the MLP
    model = modelpress.load(net, example_inputs=data["x_test"][:4])
    source = out / f"digits-{kind}.onnx"
    modelpress.export(model, source)
    name = model.signature.input_names[0]
    np.savez(out / "train.npz", **{name: data["x_train"], "labels": data["y_train"]})
    np.savez(out / "test.npz", **{name: data["x_test"], "labels": data["y_test"]})
    shutil.copy(recipe, out / recipe.name)
    result = modelpress.compress(
        source,
        out / recipe.name,
        output=out / f"digits-{kind}-dc.onnx",
        show_progress=show_progress,
    )
    fp32 = result.stages[0].size_bytes
    rows = []
    for stage in result.stages:
        rows.append(
            {
                "stage": stage.stage,
                "accuracy": stage.value,
                "onnx_bytes": stage.size_bytes,
                "packed_bytes": stage.packed_bytes,
                "sparsity": stage.sparsity,
                "ratio_onnx": fp32 / stage.size_bytes,
                "ratio_packed": fp32 / (stage.packed_bytes or fp32),
            }
        )
    # for deployment: pack again without what running the model does not need (the provenance
    # metadata, doc strings, shape annotations); the weights and the graph's computation are the same
    from modelpress.runtime.session import make_session
    from modelpress.runtime.session import run as ort_run

    assert result.packed is not None and result.output is not None
    final = modelpress.pack(result.output, out / f"digits-{kind}-dc.stripped.mpk", strip=True)
    rows.append(
        {
            "stage": "pack --strip (no metadata, doc strings, value_info)",
            "accuracy": rows[-1]["accuracy"],
            "onnx_bytes": rows[-1]["onnx_bytes"],
            "packed_bytes": final.size_bytes,
            "sparsity": rows[-1]["sparsity"],
            "ratio_onnx": rows[-1]["ratio_onnx"],
            "ratio_packed": fp32 / final.size_bytes,
        }
    )
    # the packed file decodes in memory into the same model: check its accuracy in ORT directly
    logits = ort_run(make_session(final.path), {name: data["x_test"]})[0]
    packed_accuracy = float(np.mean(logits.argmax(-1) == data["y_test"]))
    return {
        "model": kind,
        "seed": seed,
        "rows": rows,
        "fp32_bytes": fp32,
        "packed": str(final.path),
        "packed_accuracy": packed_accuracy,
        "ratio": fp32 / final.size_bytes,
        "accuracy_loss_pt": 100 * (rows[0]["accuracy"] - packed_accuracy),
    }


def print_table(summary: dict[str, Any]) -> None:
    print(
        f"\nDeep Compression on the digits {summary['model'].upper()} (fp32 ONNX {summary['fp32_bytes']:,} bytes)"
    )
    print(
        f"{'stage':46s} {'accuracy':>8s} {'sparsity':>8s} {'ONNX bytes':>11s} {'packed bytes':>12s} {'ratio (packed)':>14s}"
    )
    for r in summary["rows"]:
        print(
            f"{r['stage']:46s} {r['accuracy']:8.4f} {r['sparsity']:8.1%} {r['onnx_bytes']:11,d} {r['packed_bytes']:12,d} {r['ratio_packed']:13.1f}x"
        )
    print(
        f"final .mpk: {summary['ratio']:.1f}x smaller than the fp32 ONNX, accuracy {summary['packed_accuracy']:.4f} "
        f"({summary['accuracy_loss_pt']:+.2f} pt loss), decoded in memory by ONNX Runtime"
    )


def print_seeds(summaries: list[dict[str, Any]], target: tuple[float, float] = (35, 0.5)) -> None:
    """One line per seed (each a new source model): accuracy before and after, loss, ratio, verdict."""
    ratio, loss = target
    print(
        f"\nDeep Compression on the digits {summaries[0]['model'].upper()}, per seed (target: >= {ratio:g}x at <= {loss:g} pt loss)"
    )
    print(
        f"{'seed':>4s} {'source acc':>10s} {'final acc':>9s} {'loss (pt)':>9s} {'ratio':>7s} {'target':>7s}"
    )
    for s in summaries:
        met = s["ratio"] >= ratio and s["accuracy_loss_pt"] <= loss + 1e-9
        figures = f"{s['rows'][0]['accuracy']:10.4f} {s['packed_accuracy']:9.4f} {s['accuracy_loss_pt']:+9.2f}"
        print(f"{s['seed']:4d} {figures} {s['ratio']:6.1f}x {'met' if met else 'NOT met':>7s}")
    losses = [s["accuracy_loss_pt"] for s in summaries]
    print(
        f"mean loss {np.mean(losses):+.2f} pt (worst {max(losses):+.2f}), smallest ratio {min(s['ratio'] for s in summaries):.1f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="deep-compression", help="output folder")
    parser.add_argument("--model", choices=("mlp", "cnn", "both"), default="both")
    parser.add_argument(
        "--epochs", type=int, default=40, help="training epochs of the source model"
    )
    parser.add_argument(
        "--seeds",
        default="0",
        help="comma-separated seeds: one run each (MLP: a new source model each)",
    )
    args = parser.parse_args()
    seeds = [int(x) for x in args.seeds.split(",")]
    for kind in ("mlp", "cnn") if args.model == "both" else (args.model,):
        summaries = []
        for seed in seeds:
            summaries.append(
                run(
                    kind,
                    Path(args.out) / f"{kind}-{seed}",
                    args.epochs if kind == "mlp" else min(args.epochs, 8),
                    seed=seed,
                )
            )
            print_table(summaries[-1])
        if len(seeds) > 1:
            print_seeds(summaries)


if __name__ == "__main__":
    main()
