"""Built-in distill method ``kd``: teacher -> student knowledge distillation for any source framework.

The teacher only runs inference, in ONNX Runtime, once over the training data (its outputs, and
any intermediate features asked for, are cached), so a TensorFlow teacher needs no TensorFlow at
training time. The student trains through the IR -> torch lowering with the training engine's
one distillation loss (``modelpress.plugin_api.kd_loss`` with teacher weight ``1 - alpha``)

    alpha * CE(labels, student) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))

where CE is the label loss fitting the student's output (``loss="auto"``: cross-entropy for
logits, NLL of the log for probabilities, whose tempered softmax is taken of ``log p``; MSE for
regression, whose teacher term is the MSE to the teacher's outputs), plus, optionally, ``feature_weight * MSE(proj(student_feature), teacher_feature)`` for each
``(teacher tensor, student tensor)`` pair in ``features`` (``proj`` is a learned 1x1 / linear
projection when the widths differ). With ``alpha = 0`` no labels are needed.

Example (the docstring example the tests check): logits ``s = [1, 2, 3]``, ``t = [3, 2, 1]``,
label 2, ``T = 2``, ``alpha = 0.5`` give ``0.5 * 0.40760596 + 0.5 * 4 * 0.32015667 = 0.84411632``.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field

from modelpress.plugin_api import (
    BUILTIN_KINDS,
    DataError,
    Dataset,
    Method,
    Model,
    Options,
    OptionsError,
    PassContext,
    Tuning,
    hookimpl,
    load_dataset,
)

__all__ = ["KDOptions", "kd"]


class KDOptions(Options):
    student: Literal["auto", "given"] = Field(
        "auto",
        description="auto: the teacher narrowed by channel pruning to `width`; given: the student passed to distill()",
    )
    width: float = Field(
        0.5, gt=0, le=1, description="auto student: fraction of the teacher's channels kept"
    )
    temperature: float = Field(4.0, gt=0, description="softmax temperature T for the soft targets")
    alpha: float = Field(
        0.3, ge=0, le=1, description="weight of the hard-label loss; 0 needs no labels"
    )
    epochs: int = Field(10, ge=0, description="training epochs")
    lr: float = Field(3e-3, gt=0, description="learning rate")
    optimizer: Literal["adam", "adamw", "sgd"] = Field("adam", description="optimizer")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="learning-rate schedule")
    weight_decay: float = Field(0.0, ge=0, description="weight decay")
    batch_size: int = Field(64, ge=1, description="batch size")
    seed: int = Field(0, description="random seed (initialisation order, shuffling)")
    patience: int | None = Field(
        None, ge=1, description="early stopping: epochs without validation improvement"
    )
    validation_fraction: float = Field(
        0.1, ge=0, lt=1, description="share of the data held out to pick the best epoch"
    )
    features: list[tuple[str, str]] = Field(
        default_factory=list,
        description="(teacher tensor, student tensor) pairs for feature distillation",
    )
    feature_weight: float = Field(1.0, ge=0, description="weight of the feature losses")
    loss: Literal["auto", "cross_entropy", "nll", "mse", "huber"] = Field(
        "auto",
        description="label loss; auto: NLL of the log for probability outputs (softmax), cross-entropy for logits, MSE for regression",
    )


def _teacher_outputs(
    teacher: Model, data: Dataset, names: list[str], ctx: PassContext
) -> dict[str, np.ndarray]:
    from modelpress.plugin_api import make_session, with_outputs
    from modelpress.plugin_api import run as run_session

    session = make_session(with_outputs(teacher, names) if names else teacher)
    outputs = [o.name for o in session.get_outputs()]
    wanted = [teacher.signature.output_names[0], *names]
    collected: dict[str, list[np.ndarray]] = {n: [] for n in wanted}
    batches = list(data.batches(256))
    with ctx.progress("teacher outputs", total=len(batches)) as advance:
        for feeds in batches:
            results = run_session(session, feeds)
            for n in wanted:
                collected[n].append(np.asarray(results[outputs.index(n)], np.float32))
            advance(1)
    return {n: np.concatenate(v) for n, v in collected.items()}


def _student(teacher: Model, opts: KDOptions, ctx: PassContext) -> Model:
    if opts.student == "given":
        student = ctx.extra.get("student", ctx.extra.get("current"))
        if not isinstance(student, Model):
            raise OptionsError(
                "kd: student='given' but no student model was passed (use modelpress.distill(teacher, student=...))"
            )
        return student
    if opts.width >= 1:
        return teacher.clone()
    from modelpress import apply

    return apply(
        teacher,
        "channel",
        kind="prune",
        ratio=1 - opts.width,
        show_progress=False,
        registry=ctx.registry,
    )


def _distilled(
    module: Any, opts: KDOptions, inputs: list[np.ndarray], cached: dict[str, np.ndarray]
) -> Any:
    """The student plus a projection per feature pair (1x1 conv or linear when widths differ);
    its forward returns ``(logits, *projected features)``."""
    import torch
    from torch import nn

    class Distilled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.student = module
            self.projections = nn.ModuleList()
            if opts.features:
                _, feats = module.run_with_intermediates(
                    *[torch.from_numpy(np.ascontiguousarray(a[:2])) for a in inputs],
                    names=[s for _, s in opts.features],
                )
                for t_name, s_name in opts.features:
                    t_feat, s_feat = cached[t_name], feats[s_name]
                    axis = 1 if s_feat.dim() == 4 else -1
                    t_width, s_width = t_feat.shape[axis], s_feat.shape[axis]
                    if s_feat.dim() == 4:
                        self.projections.append(
                            nn.Conv2d(s_width, t_width, 1, bias=False)
                            if s_width != t_width
                            else nn.Identity()
                        )
                    else:
                        self.projections.append(
                            nn.Linear(s_width, t_width, bias=False)
                            if s_width != t_width
                            else nn.Identity()
                        )

        def forward(self, *args: Any) -> Any:
            if not opts.features:
                return self.student(*args)
            out, feats = self.student.run_with_intermediates(
                *args, names=[s for _, s in opts.features]
            )
            out = out[0] if isinstance(out, tuple) else out
            return (
                out,
                *[
                    proj(feats[s])
                    for proj, (_, s) in zip(self.projections, opts.features, strict=True)
                ],
            )

    return Distilled()


def _targets(
    teacher_logits: np.ndarray, data: Dataset, opts: KDOptions, cached: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """What each batch is compared with: the teacher's logits, the labels, the teacher's features."""
    targets: dict[str, np.ndarray] = {"teacher": teacher_logits}
    if data.labels is not None:
        targets["labels"] = data.labels
    for i, (t_name, _) in enumerate(opts.features):
        targets[f"feature_{i}"] = cached[t_name]
    return targets


def _loss(opts: KDOptions, choice: Any, teacher_reads: str) -> Any:
    """The training loss: the plugin API's ``kd_loss`` (teacher weight ``1 - alpha``, the label loss
    ``choice`` picked for the student's output) plus ``feature_weight`` x MSE per feature pair."""
    import torch

    from modelpress.plugin_api import kd_loss

    def loss(outputs: Any, batch: Any) -> Any:
        logits = outputs[0] if isinstance(outputs, tuple) else outputs
        value = kd_loss(
            logits,
            batch["teacher"],
            batch.get("labels"),
            temperature=opts.temperature,
            teacher_weight=1 - opts.alpha,
            reads=choice.reads,
            teacher_reads=teacher_reads,
            loss=choice.name,
        )
        for i in range(len(opts.features)):
            value = value + opts.feature_weight * torch.nn.functional.mse_loss(
                outputs[1 + i], batch[f"feature_{i}"]
            )
        return value

    return loss


def _reading(
    module: Any,
    inputs: list[np.ndarray],
    data: Dataset,
    teacher_outputs: np.ndarray,
    opts: KDOptions,
) -> tuple[Any, str]:
    """The label loss fitting the student's output (``opts.loss``) and how the teacher's outputs
    read (logits, probabilities, ...), after checking both outputs have the same shape."""
    import torch

    from modelpress.plugin_api import choose_loss

    with torch.no_grad():
        probe = module(*[torch.from_numpy(np.ascontiguousarray(a[:2])) for a in inputs])
    probe = probe[0] if isinstance(probe, tuple) else probe
    if tuple(probe.shape[1:]) != tuple(teacher_outputs.shape[1:]):
        raise DataError(
            f"teacher output {tuple(teacher_outputs.shape[1:])} and student output {tuple(probe.shape[1:])} have different shapes"
        )
    choice = choose_loss(module, inputs, data.labels, opts.loss)
    return choice, "values" if choice.reads == "values" else choose_loss(
        outputs=teacher_outputs[:256]
    ).reads


def _held_out(inputs: list[np.ndarray], data: Dataset, opts: KDOptions) -> tuple[np.ndarray, Any]:
    """The training rows, and the held-out ``(inputs, labels)`` an epoch is kept by (``None`` without labels)."""
    n = len(inputs[0])
    held = int(n * opts.validation_fraction) if data.labels is not None else 0
    order = np.random.default_rng(opts.seed).permutation(n)
    val_idx, train_idx = order[:held], order[held:]
    validation = (
        ([a[val_idx] for a in inputs], data.labels[val_idx])
        if held and data.labels is not None
        else None
    )
    return train_idx, validation


def _figures(
    opts: KDOptions, teacher: Model, trained: Model, result: Any, reading: tuple[Any, str]
) -> dict[str, Any]:
    """What the pass reports: sizes, the training run, and the loss (``reading``: the loss choice, how the teacher is read)."""
    choice, teacher_reads = reading
    first_loss = result.history[0]["loss"] if result.history else None
    last_loss = result.history[-1]["loss"] if result.history else None
    return {
        "student": opts.student,
        "teacher_parameters": teacher.parameter_count(),
        "student_parameters": trained.parameter_count(),
        "compression": round(teacher.parameter_count() / max(trained.parameter_count(), 1), 3),
        "epochs_run": len(result.history),
        "best_epoch": result.best_epoch,
        "interrupted": result.interrupted,
        "stopped_early": result.stopped_early,
        "first_epoch_loss": first_loss,
        "last_epoch_loss": last_loss,
        "loss": f"kd+{choice.name}",
        "loss_reason": f"{choice.reason}; the teacher's outputs are read as {teacher_reads.replace('_', '-')}",
        **(
            {"validation_accuracy": round(float(result.best_metric), 4)}
            if result.best_metric is not None
            else {}
        ),
    }


def kd(teacher: Model, opts: KDOptions, ctx: PassContext) -> Model:
    from modelpress.plugin_api import fit, to_torch, update_weights

    data = load_dataset(ctx.train, teacher.signature, what="training")
    if opts.alpha > 0 and data.labels is None:
        raise DataError(
            f"kd with alpha={opts.alpha} needs labels (an array named 'labels'); use alpha=0 to distill from the teacher alone"
        )
    student = _student(teacher, opts, ctx)
    if student.signature.input_names != teacher.signature.input_names:
        raise DataError(
            f"teacher inputs {teacher.signature.input_names} and student inputs {student.signature.input_names} differ"
        )
    cached = _teacher_outputs(teacher, data, [t for t, _ in opts.features], ctx)
    teacher_logits = cached[teacher.signature.output_names[0]]

    module = to_torch(student)
    inputs = [data.inputs[n] for n in student.signature.input_names]
    choice, teacher_reads = _reading(module, inputs, data, teacher_logits, opts)
    wrapper = _distilled(module, opts, inputs, cached)
    targets = _targets(teacher_logits, data, opts, cached)
    loss = _loss(opts, choice, teacher_reads)

    train_idx, validation = _held_out(inputs, data, opts)
    result = fit(
        wrapper,
        [a[train_idx] for a in inputs],
        {k: v[train_idx] for k, v in targets.items()},
        loss=loss,
        epochs=opts.epochs,
        lr=opts.lr,
        optimizer=opts.optimizer,
        schedule=opts.schedule,
        weight_decay=opts.weight_decay,
        batch_size=opts.batch_size,
        seed=opts.seed,
        validation=validation,
        patience=opts.patience,
        show_progress=ctx.show_progress,
    )
    trained = update_weights(student, module)
    ctx.figures.update(_figures(opts, teacher, trained, result, (choice, teacher_reads)))
    return Model(
        trained.ir,
        provenance=trained.provenance,
        path=teacher.path,
        reference=teacher.reference or teacher,
    )


# How `modelpress tune` searches it: inside pipelines that narrow the model first (see prune/channel's); it trains,
# and without labels it learns from the teacher's outputs only.
_KD_TUNING = Tuning(
    alone=False, trains=True, search={"epochs": [10, 5]}, without={"labels": {"alpha": 0.0}}
)


@hookimpl
def modelpress_register_kinds(register):  # type: ignore[no-untyped-def]
    register(next(k for k in BUILTIN_KINDS if k.name == "distill"))


@hookimpl
def modelpress_register_methods(register):  # type: ignore[no-untyped-def]
    register(
        Method(
            name="kd",
            kind="distill",
            apply=kd,
            options=KDOptions,
            mutates=False,
            requires={"train"},
            min_cosine=None,
            kind_default=True,
            uses_reference=True,
            reference_option="teacher",
            reference_options={"student": "given"},
            summary="knowledge distillation: soft targets with temperature, hard labels, intermediate features",
            tuning=_KD_TUNING,
        )
    )
