"""Distillation on digits: a student trained from scratch on labels vs the same student distilled.

    python benchmarks/distill.py [--quick]

A teacher CNN (torch) is trained here. Students are the teacher's architecture narrowed to width
0.5 and 0.25 (channel pruning's structure), *re-initialised at random*, then trained for the
same epochs with the same seed (a) on labels only and (b) by ``kd`` from the teacher. Two more
rows start from the channel-pruned teacher's own weights instead (how modelpress composes prune
and distill, ``student="auto"``): (c) fine-tuned on labels, (d) distilled. The same is done with
a Keras teacher. Printed side by side in one run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _reinit(model, seed: int):  # type: ignore[no-untyped-def]
    """The same graph with fresh random weights (He-style for weights, zero biases)."""
    import modelpress

    rng = np.random.default_rng(seed)
    fresh = model.clone()
    for layer in fresh.weighted_layers():
        w = layer.weight_array()
        fan_in = int(np.prod(w.shape)) // w.shape[layer.out_axis]
        fresh.replace_initializer(
            layer.weight.name,
            (rng.standard_normal(w.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32),
        )
        if layer.bias is not None:
            fresh.replace_initializer(
                layer.bias.name, np.zeros(layer.bias_array().shape, np.float32)
            )
    return modelpress.load(fresh.to_proto())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    from rich.console import Console
    from rich.table import Table

    import modelpress
    from modelpress.app.demo import digits_arrays, train_demo_model
    from modelpress.evaluation.criteria import score
    from modelpress.runtime.session import make_session, run

    epochs = 4 if args.quick else 12
    console = Console(width=180)
    table = Table(
        title=f"distillation on digits: same student, same {epochs} epochs and seed, from scratch vs kd"
    )
    for col in (
        "teacher",
        "student",
        "parameters",
        "fewer params",
        "accuracy",
        "agreement w/ teacher",
        "train s",
    ):
        table.add_column(col, justify="left" if col in ("teacher", "student") else "right")

    def evaluate(model, x, y, teacher_logits):  # type: ignore[no-untyped-def]
        logits = run(make_session(model), {model.signature.input_names[0]: x})[0]
        return score("accuracy", teacher_logits, logits, y), score(
            "agreement", teacher_logits, logits
        )

    for framework in ("torch", "tensorflow"):
        layout = "nchw" if framework == "torch" else "nhwc"
        data = digits_arrays(layout)
        try:
            trained = train_demo_model(framework, data, epochs=3 if args.quick else 8)
        except ImportError:
            continue
        teacher = (
            modelpress.load(trained, example_inputs=data["x_test"][:4])
            if framework == "torch"
            else modelpress.load(trained)
        )
        name = teacher.signature.input_names[0]
        teacher_logits = run(make_session(teacher), {name: data["x_test"]})[0]
        acc = score("accuracy", teacher_logits, teacher_logits, data["y_test"])
        label = f"{framework} CNN"
        table.add_row(
            label,
            "(teacher)",
            f"{teacher.parameter_count():,}",
            "1.0x",
            f"{acc:.4f}",
            "1.0000",
            "-",
        )
        train = {name: data["x_train"], "labels": data["y_train"]}
        for width in (0.5, 0.25):
            try:
                narrowed = modelpress.prune(
                    teacher, "channel", ratio=1 - width, show_progress=False
                )
            except (
                modelpress.ModelpressError
            ) as exc:  # e.g. a layout the channel analysis cannot follow
                table.add_row(label, f"width {width}", "-", "-", "-", "-", str(exc)[:40])
                continue
            student = _reinit(narrowed, seed=1)
            ratio = teacher.parameter_count() / student.parameter_count()
            start = time.perf_counter()
            module = modelpress.to_torch(student)
            modelpress.fit(
                module,
                [data["x_train"]],
                {"labels": data["y_train"]},
                epochs=epochs,
                lr=3e-3,
                seed=0,
                show_progress=False,
            )
            scratch = modelpress.update_weights(student, module)
            scratch_s = time.perf_counter() - start
            start = time.perf_counter()
            distilled = modelpress.distill(
                teacher,
                student,
                data=train,
                epochs=epochs,
                lr=3e-3,
                seed=0,
                temperature=4.0,
                alpha=0.3,
                validation_fraction=0.0,
                show_progress=False,
            )
            kd_s = time.perf_counter() - start
            # the way modelpress composes them: the narrowed teacher's own weights as the start
            start = time.perf_counter()
            module = modelpress.to_torch(narrowed)
            modelpress.fit(
                module,
                [data["x_train"]],
                {"labels": data["y_train"]},
                epochs=epochs,
                lr=3e-3,
                seed=0,
                show_progress=False,
            )
            pruned_tuned = modelpress.update_weights(narrowed, module)
            pruned_s = time.perf_counter() - start
            start = time.perf_counter()
            auto = modelpress.distill(
                teacher,
                "auto",
                data=train,
                width=width,
                epochs=epochs,
                lr=3e-3,
                seed=0,
                temperature=4.0,
                alpha=0.3,
                validation_fraction=0.0,
                show_progress=False,
            )
            auto_s = time.perf_counter() - start
            for how, model, seconds in (
                ("from scratch (labels)", scratch, scratch_s),
                ("kd from teacher", distilled, kd_s),
                ("pruned teacher + labels", pruned_tuned, pruned_s),
                ("pruned teacher + kd (student=auto)", auto, auto_s),
            ):
                a, g = evaluate(model, data["x_test"], data["y_test"], teacher_logits)
                table.add_row(
                    label,
                    f"width {width}, {how}",
                    f"{model.parameter_count():,}",
                    f"{ratio:.1f}x",
                    f"{a:.4f}",
                    f"{g:.4f}",
                    f"{seconds:.1f}",
                )
    console.print(table)


if __name__ == "__main__":
    main()
