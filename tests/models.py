"""Small real models for the tests, trained on scikit-learn's digits (torch and Keras).

Imported only by fixtures that need a framework, so the core tests run without either.
"""

from __future__ import annotations

import numpy as np


def images(x: np.ndarray, layout: str) -> np.ndarray:
    """Digits as images: NCHW for torch, NHWC for Keras."""
    x = x.reshape(-1, 8, 8)
    return x[:, None, :, :] if layout == "nchw" else x[:, :, :, None]


def tiny_cnn_int8(**options):  # type: ignore[no-untyped-def]
    """modelpress's tiny CNN (16 channels) through int8-static on 4 generated batches of 8 (SmoothQuant
    off, a result without gain allowed; ``options`` on top): ``(cnn, calibration, result)``."""
    import modelpress
    from modelpress.data.samples import sample_inputs
    from modelpress.testing import tiny_cnn

    cnn = tiny_cnn(channels=16)
    calibration = [sample_inputs(cnn.signature, batch=8, seed=i) for i in range(4)]
    result = modelpress.quantize(
        cnn,
        "int8-static",
        calibration=calibration,
        smoothquant=False,
        allow_no_gain=True,
        show_progress=False,
        **options,
    )
    return cnn, calibration, result


# -- keras ----------------------------------------------------------------------------------------
def keras_cnn(width: int = 16):  # type: ignore[no-untyped-def]
    import keras

    inputs = keras.Input((8, 8, 1), name="image")
    x = keras.layers.Conv2D(width, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.Conv2D(2 * width, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.MaxPooling2D(name="pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    outputs = keras.layers.Dense(10, name="logits")(x)
    return keras.Model(inputs, outputs, name="digits_cnn")


def keras_mlp():  # type: ignore[no-untyped-def]
    import keras

    return keras.Sequential(
        [
            keras.Input((64,), name="pixels"),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dropout(0.1),
            keras.layers.Dense(10),
        ],
        name="digits_mlp",
    )


def train_keras(model, x: np.ndarray, y: np.ndarray, *, epochs: int, seed: int = 0):  # type: ignore[no-untyped-def]
    import keras

    keras.utils.set_random_seed(seed)
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, epochs=epochs, batch_size=64, verbose=0, shuffle=True)
    return model
