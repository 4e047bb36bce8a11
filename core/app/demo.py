"""``modelpress demo``: the whole story on an embedded default, nothing downloaded.

Trains (or loads from ``<out>/cache``) a small CNN on scikit-learn's digits with whichever
framework is installed (torch preferred, Keras otherwise), writes the data as ``.npz`` files and
a recipe next to it, then compresses: channel pruning -> distillation from the original ->
INT8 static quantization, evaluating after every stage.

NOTE: quantization comes last on purpose: an integer (QDQ) graph has no float weights left to
prune or train, so the classic prune -> distill -> quantize order is the one that composes.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from modelpress.base.errors import UnsupportedModelError

__all__ = ["DEMO_RECIPE", "digits_arrays", "run_demo", "train_demo_model"]

# NOTE: the recipe is data (demo_recipe.json beside this module), like any user's recipe: the core
# names no built-in method in its code.
DEMO_RECIPE: dict[str, Any] = json.loads(
    resources.files("modelpress.app").joinpath("demo_recipe.json").read_text()
)


def digits_arrays(layout: str = "nchw") -> dict[str, np.ndarray]:
    """scikit-learn's digits as 8x8 images in [0, 1], a fixed 80/20 split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UnsupportedModelError(
            "the demo uses scikit-learn's digits: pip install -c constraints.txt 'modelpress[all]'"
        ) from None
    data = load_digits()
    x = (data.data / 16.0).astype(np.float32).reshape(-1, 8, 8)
    x = x[:, None] if layout == "nchw" else x[..., None]
    y = data.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    split = int(0.8 * len(x))
    return {"x_train": x[:split], "y_train": y[:split], "x_test": x[split:], "y_test": y[split:]}


def _framework(preferred: str | None) -> str:
    import importlib.util

    for name, module in (("torch", "torch"), ("tensorflow", "tensorflow")):
        if preferred in (None, name) and importlib.util.find_spec(module) is not None:
            return name
    raise UnsupportedModelError(
        "the demo trains its model with torch or Keras: pip install -c constraints.txt 'modelpress[torch]' (or [tensorflow])"
    )


def train_demo_model(framework: str, data: dict[str, np.ndarray], epochs: int) -> Any:
    """A CNN for digits, trained in the chosen framework; returns the framework's model."""
    if framework == "torch":
        import torch
        from torch import nn

        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 10),
        )
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        x, y = torch.from_numpy(data["x_train"]), torch.from_numpy(data["y_train"])
        gen = torch.Generator().manual_seed(0)
        for _ in range(epochs):
            model.train()
            for idx in torch.randperm(len(x), generator=gen).split(64):
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        return model.eval()
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1), name="x")
    h = keras.layers.Conv2D(32, 3, padding="same")(inputs)
    h = keras.layers.ReLU()(keras.layers.BatchNormalization(momentum=0.9)(h))
    h = keras.layers.Conv2D(64, 3, padding="same")(h)
    h = keras.layers.MaxPooling2D()(
        keras.layers.ReLU()(keras.layers.BatchNormalization(momentum=0.9)(h))
    )
    model = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(h)))
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(data["x_train"], data["y_train"], epochs=epochs, batch_size=64, verbose=0)
    return model


def run_demo(
    out: str | os.PathLike[str] = "modelpress-demo",
    *,
    fast: bool = False,
    framework: str | None = None,
    show_progress: bool = True,
) -> Any:
    """Run the demo end to end; returns the :class:`~modelpress.app.compress.CompressResult`."""
    import modelpress
    from modelpress.app.compress import compress

    folder = Path(out)
    (folder / "cache").mkdir(parents=True, exist_ok=True)
    chosen = _framework(framework)
    data = digits_arrays("nchw" if chosen == "torch" else "nhwc")
    cached = folder / "cache" / f"digits-cnn-{chosen}{'-fast' if fast else ''}.onnx"
    if cached.exists():
        model = modelpress.load(cached)
    else:
        trained = train_demo_model(chosen, data, epochs=2 if fast else 6)
        model = (
            modelpress.load(trained, example_inputs=data["x_test"][:4])
            if chosen == "torch"
            else modelpress.load(trained)
        )
        modelpress.export(model, cached)
        model = modelpress.load(cached)
    name = model.signature.input_names[0]
    arrays: dict[str, dict[str, np.ndarray]] = {
        "calib.npz": {name: data["x_train"][:512]},
        "train.npz": {name: data["x_train"], "labels": data["y_train"]},
        "test.npz": {name: data["x_test"], "labels": data["y_test"]},
    }
    for file_name, content in arrays.items():
        np.savez(folder / file_name, **content)  # type: ignore[arg-type]
    recipe = {**DEMO_RECIPE, "passes": [dict(p) for p in DEMO_RECIPE["passes"]]}
    if fast:
        recipe["passes"][1] = {
            **recipe["passes"][1],
            "options": {**recipe["passes"][1]["options"], "epochs": 2},
        }
        recipe["evaluate"] = {**recipe["evaluate"], "repeats": 5}
    import yaml

    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return compress(
        model,
        folder / "recipe.yaml",
        output=folder / "digits-compressed.onnx",
        report_dir=folder,
        show_progress=show_progress,
    )
