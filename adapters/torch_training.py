"""A small training engine for lowered models: pruning recovery, distillation and QAT use it.

``fit`` trains any ``torch.nn.Module`` (usually a :class:`GraphModule` from ``to_torch``) on
numpy arrays: deterministic (seeded shuffling and initialisation), with a progress bar, early
stopping on a validation metric, gradient masks (pruned weights stay exactly zero) and a clean
stop on Ctrl-C that keeps the best weights seen so far.

**The loss follows what the model outputs** (:func:`choose_loss`, ``loss="auto"``):

* *probabilities* (the output comes from a Softmax or Sigmoid node, or its values are
  non-negative and sum to 1 per row, e.g. Keras ``Dense(10, activation="softmax")``): the
  negative log-likelihood of ``log(clamp(p, 1e-7))`` (``"nll"``; binary cross-entropy for a
  single column);
* *log-probabilities* (a LogSoftmax node, or rows whose ``exp`` sums to 1): ``"nll"`` of the
  outputs as they are;
* *logits* (anything else, with class-index labels): ``"cross_entropy"``;
* *regression* (float labels that are not class indices, or labels shaped like the output):
  ``"mse"``.

``loss="cross_entropy"``, ``"nll"``, ``"mse"`` or ``"huber"`` overrides the choice (and how the
outputs are read: as logits, probabilities, or values).

**One knowledge-distillation loss** (:func:`kd_loss`), with ``teacher_weight = w``::

    (1 - w) * hard(labels, s) + w * T^2 * KL(softmax(t / T) || softmax(s / T))

``hard`` is the loss above; ``s`` and ``t`` are logits, or the *log*-probabilities when a model
outputs probabilities (the tempered softmax of ``log p``, never of ``p``). For regression outputs
the teacher term is the MSE to the teacher's outputs (no temperature). ``w = 1`` needs no labels.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from modelpress.plugin_api import DataError, OptionsError, progress_bar

__all__ = [
    "FitResult",
    "LossChoice",
    "accuracy",
    "choose_loss",
    "fit",
    "held_out_scores",
    "kd_loss",
    "predict",
    "seed_everything",
]

LossFn = Callable[[Any, Mapping[str, torch.Tensor]], torch.Tensor]
"""``loss(outputs, batch) -> scalar``; ``batch`` holds every target array for the batch (``labels``, ...)."""


@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    best_metric: float | None = None
    interrupted: bool = False
    stopped_early: bool = False
    loss: str = ""
    """The loss trained on (``"cross_entropy"``, ``"nll"``, ``"mse"``, ``"huber"``, with ``"kd+"`` in
    front when distilling; ``"custom"`` for a callable)."""
    loss_reason: str = ""
    """Why that loss: what the model's output was read as."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _first(outputs: Any) -> torch.Tensor:
    return outputs[0] if isinstance(outputs, (tuple, list)) else outputs


LOSS_NAMES = ("auto", "cross_entropy", "nll", "mse", "huber")
"""What ``fit(loss=...)`` and the methods' ``loss`` option accept."""

Reads = Literal["logits", "probabilities", "log_probabilities", "values"]
"""How a model's output is read: class scores, class probabilities, their log, or plain values."""

_EPS = 1e-7
_LOSS_FOR: dict[str, str] = {
    "logits": "cross_entropy",
    "probabilities": "nll",
    "log_probabilities": "nll",
    "values": "mse",
}
# Ops that only move, copy or (de)quantize values: the output's meaning is that of their input.
_PASS_THROUGH = frozenset(
    {
        "Identity",
        "Reshape",
        "Flatten",
        "Squeeze",
        "Unsqueeze",
        "Cast",
        "Dropout",
        "QuantizeLinear",
        "DequantizeLinear",
    }
)
_PRODUCED = {
    "Softmax": "probabilities",
    "Sigmoid": "probabilities",
    "LogSoftmax": "log_probabilities",
}


@dataclass(frozen=True)
class LossChoice:
    """The training loss for a model's output: ``name`` (``cross_entropy``, ``nll``, ``mse``,
    ``huber``), how the output is read (``reads``) and why (``reason``). Called as
    ``choice(outputs, batch)`` it is the label loss on ``batch["labels"]``."""

    name: str
    reads: str
    reason: str

    def __call__(self, outputs: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if "labels" not in batch:
            raise DataError(
                f"the {self.name} loss needs labels: add an array named 'labels' to the data"
            )
        return _hard_loss(_first(outputs), batch["labels"], self.name, self.reads)


def _log_probs(out: torch.Tensor, reads: str) -> torch.Tensor:
    if reads == "probabilities":
        return torch.log(out.clamp_min(_EPS))
    if reads == "log_probabilities":
        return out
    return F.log_softmax(out, dim=-1)


def _tempered(out: torch.Tensor, reads: str, temperature: float) -> torch.Tensor:
    """``log softmax(z / T)`` with ``z`` the logits, or ``log p`` for probability outputs."""
    return F.log_softmax(
        (out if reads == "logits" else _log_probs(out, reads)) / temperature, dim=-1
    )


def _like(labels: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    labels = labels.to(out.dtype)
    return (
        labels.reshape(out.shape)
        if labels.shape != out.shape and labels.numel() == out.numel()
        else labels
    )


def _hard_loss(out: torch.Tensor, labels: torch.Tensor, name: str, reads: str) -> torch.Tensor:
    """The label loss ``name`` on outputs read as ``reads``; a single-column classifier is binary."""
    if name in ("mse", "huber"):
        return (F.mse_loss if name == "mse" else F.huber_loss)(out, _like(labels, out))
    binary = out.dim() >= 1 and out.shape[-1] == 1
    if name == "cross_entropy":
        return (
            F.binary_cross_entropy_with_logits(out, _like(labels, out))
            if binary
            else F.cross_entropy(out, labels.long())
        )
    if binary:
        p = out.exp() if reads == "log_probabilities" else out
        return F.binary_cross_entropy(p.clamp(_EPS, 1 - _EPS), _like(labels, out))
    return F.nll_loss(_log_probs(out, reads), labels.long())


def kd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    teacher_weight: float = 1.0,
    reads: str = "logits",
    teacher_reads: str | None = None,
    loss: str | None = None,
) -> torch.Tensor:
    """The one knowledge-distillation loss (Hinton et al. 2015), ``w = teacher_weight``::

        (1 - w) * hard(labels, s) + w * T^2 * KL(softmax(t / T) || softmax(s / T))

    ``reads`` / ``teacher_reads`` say what ``student`` / ``teacher`` hold (``"logits"``,
    ``"probabilities"``, ``"log_probabilities"``; the teacher defaults to the student's): for
    probabilities the tempered softmax is taken of ``log p`` (clamped). ``hard`` is ``loss`` (by
    default the one :func:`choose_loss` picks for ``reads``). With ``reads="values"``
    (regression) the teacher term is the MSE (Huber with ``loss="huber"``) to the teacher's outputs.
    ``labels`` may be ``None`` when ``w = 1``.

    Example: logits ``s = [1, 2, 3]``, ``t = [3, 2, 1]``, label 2, ``T = 2``, ``w = 0.5`` give
    ``0.5 * 0.40760596 + 0.5 * 4 * 0.32015667 = 0.84411632``.
    """
    if not 0 <= teacher_weight <= 1:
        raise OptionsError(f"teacher_weight must be in [0, 1], got {teacher_weight}")
    name = loss or _LOSS_FOR[reads]
    if reads == "values":
        soft = (F.huber_loss if name == "huber" else F.mse_loss)(student, teacher.to(student.dtype))
    else:
        soft = (
            F.kl_div(
                _tempered(student, reads, temperature),
                _tempered(teacher, teacher_reads or reads, temperature),
                log_target=True,
                reduction="batchmean",
            )
            * temperature**2
        )
    if teacher_weight >= 1:
        return teacher_weight * soft
    if labels is None:
        raise DataError(
            f"distillation with teacher weight {teacher_weight} < 1 needs labels (an array named 'labels')"
        )
    return (1 - teacher_weight) * _hard_loss(student, labels, name, reads) + teacher_weight * soft


def _graph_module(module: nn.Module | None) -> Any:
    """The lowered graph inside ``module`` (itself, or a wrapped one), or ``None``."""
    for m in module.modules() if module is not None else ():
        if hasattr(m, "_nodes") and hasattr(m, "output_names"):
            return m
    return None


def _output_producer(module: nn.Module | None) -> tuple[str, str] | None:
    """``(op type, node name)`` of the node computing the first output, looking through
    reshapes, casts and (de)quantization; ``None`` outside a lowered graph."""
    graph = _graph_module(module)
    if graph is None or not graph.output_names:
        return None
    producers = {out: node for node in graph._nodes for out in node.outputs}
    name, seen = graph.output_names[0], set()
    while (
        (node := producers.get(name)) is not None
        and node.op_type in _PASS_THROUGH
        and name not in seen
    ):
        seen.add(name)
        name = node.inputs[0]
    return (node.op_type, _after_layer(node, producers)) if node is not None else None


_LAYER_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose"})


def _after_layer(node: Any, producers: dict[str, Any]) -> str:
    """How a user names ``node``: "after layer 'probs'" (the nearest weighted layer feeding it, which
    the adapters named after the source's layer) rather than the exporter's node name
    (``functional_1/probs_1/Softmax``); the node name where no layer feeds it."""
    current, seen = node, set()
    while current.inputs and current.inputs[0] not in seen:
        seen.add(current.inputs[0])
        current = producers.get(current.inputs[0])
        if current is None:
            break
        if current.op_type in _LAYER_OPS:
            return f"after layer {current.name!r}"
    return repr(node.name)


def _read_values(outputs: np.ndarray | None) -> tuple[str, str] | None:
    """Probabilities or log-probabilities, told by the values of a sample of outputs."""
    if (
        outputs is None
        or outputs.ndim < 2
        or outputs.shape[-1] < 2
        or outputs.size == 0
        or not np.all(np.isfinite(outputs))
    ):
        return None
    values = outputs.astype(np.float64)
    if values.min() >= 0 and np.allclose(values.sum(-1), 1.0, atol=1e-3):
        return "probabilities", "its values are non-negative and sum to 1 per row"
    if values.max() <= 0 and np.allclose(np.exp(values).sum(-1), 1.0, atol=1e-3):
        return "log_probabilities", "its values are log-probabilities (exp sums to 1 per row)"
    return None


def _regression(labels: np.ndarray | None, outputs: np.ndarray | None) -> str | None:
    """Why ``labels`` are regression targets rather than class indices (``None``: they are classes)."""
    if labels is None:
        return None
    labels = np.asarray(labels)
    if labels.dtype.kind == "f" and not np.all(np.equal(np.mod(labels, 1), 0)):
        return "the labels are float values, not class indices"
    if outputs is not None and outputs.ndim >= 2 and labels.ndim == 1 and labels.size:
        width = outputs.shape[-1]
        if width == 1 and not np.isin(labels, (0, 1)).all():
            return "the output has one column and the labels are not 0/1"
        if width > 1 and (labels.min() < 0 or labels.max() >= width):
            return f"the labels are not class indices of the output's {width} columns"
    return None


def choose_loss(
    module: nn.Module | None = None,
    inputs: Sequence[np.ndarray] | None = None,
    labels: np.ndarray | None = None,
    loss: str = "auto",
    *,
    outputs: np.ndarray | None = None,
) -> LossChoice:
    """The loss that fits what ``module``'s first output holds (see the module docstring).

    Reads the graph (a Softmax/Sigmoid or LogSoftmax making the output), else the values of
    ``outputs`` (or of ``module`` run on the first 32 ``inputs``), and the ``labels``. ``loss``
    other than ``"auto"`` overrides the choice."""
    if loss not in LOSS_NAMES:
        raise OptionsError(f"loss must be one of {', '.join(map(repr, LOSS_NAMES))}, not {loss!r}")
    if outputs is None and module is not None and inputs is not None:
        outputs = predict(module, [a[:32] for a in inputs])
    reads, why = _read_output(module, outputs, labels)
    if loss == "auto":
        return LossChoice(_LOSS_FOR[reads], reads, why)
    if loss in ("mse", "huber"):
        forced = "values"
    elif loss == "nll":
        forced = reads if reads in ("probabilities", "log_probabilities") else "probabilities"
    else:
        forced = "logits"
    return LossChoice(
        loss,
        forced,
        f"loss={loss!r} was asked for (the output looks like {reads.replace('_', '-')}: {why})",
    )


def _read_output(
    module: nn.Module | None, outputs: np.ndarray | None, labels: np.ndarray | None
) -> tuple[str, str]:
    """``(reads, reason)`` for the first output of ``module`` (see :func:`choose_loss`)."""
    why = _regression(labels, outputs)
    if why is not None:
        return "values", why
    producer = _output_producer(module)
    if producer is not None and producer[0] in _PRODUCED:
        return _PRODUCED[producer[0]], f"the output comes from a {producer[0]} {producer[1]}"
    by_value = _read_values(outputs)
    if by_value is not None:
        return by_value
    return (
        "logits",
        "the output is unnormalised scores (no Softmax/Sigmoid makes it, its rows do not sum to 1)",
    )


def predict(module: nn.Module, inputs: Sequence[np.ndarray], batch_size: int = 256) -> np.ndarray:
    """The first output of ``module`` over numpy inputs, in eval mode, batched."""
    was_training = module.training
    module.eval()
    outs = []
    n = len(inputs[0])
    with torch.no_grad():
        for start in range(0, n, batch_size):
            batch = [
                torch.from_numpy(np.ascontiguousarray(a[start : start + batch_size]))
                for a in inputs
            ]
            outs.append(_first(module(*batch)).cpu().numpy())
    module.train(was_training)
    return np.concatenate(outs, axis=0)


def accuracy(module: nn.Module, inputs: Sequence[np.ndarray], labels: np.ndarray) -> float:
    return float(np.mean(predict(module, inputs).argmax(axis=1) == labels))


def held_out_scores(
    module: nn.Module, inputs: Sequence[np.ndarray], labels: np.ndarray, loss: str = "auto"
) -> tuple[float, float]:
    """``(loss, accuracy)`` of ``module`` on labelled held-out samples, with the loss
    :func:`choose_loss` picks for the output (cross-entropy for logits, NLL for probabilities,
    MSE for regression, whose accuracy is NaN); ``loss`` overrides it.

    Fine-tuning after a compression step should keep the epoch with the lowest held-out *loss*
    (``fit(..., metric=lambda m: -held_out_scores(m, x, y)[0])``): on a split of the training
    data the accuracy is often already 100 % right after the step, and choosing by it keeps the
    untrained weights."""
    predictions = predict(module, inputs)
    choice = choose_loss(module, labels=labels, loss=loss, outputs=predictions)
    out, y = torch.from_numpy(predictions), torch.from_numpy(np.asarray(labels))
    value = float(_hard_loss(out, y, choice.name, choice.reads))
    if choice.reads == "values":
        return value, float("nan")
    threshold = {"logits": 0.0, "probabilities": 0.5, "log_probabilities": math.log(0.5)}[
        choice.reads
    ]
    hits = (
        (out[..., 0] > threshold).long()
        if out.dim() >= 2 and out.shape[-1] == 1
        else out.argmax(dim=-1)
    )
    return value, float((hits == y.long()).float().mean())


def _apply_masks(module: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, mask in masks.items():
            param = module.get_parameter(name)
            param.mul_(mask)


def fit(
    module: nn.Module,
    inputs: Sequence[np.ndarray],
    targets: Mapping[str, np.ndarray],
    *,
    loss: str | LossFn = "auto",
    teacher_weight: float = 0.0,
    temperature: float = 1.0,
    epochs: int = 5,
    batch_size: int = 64,
    lr: float = 1e-3,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    schedule: str = "cosine",
    seed: int = 0,
    validation: tuple[Sequence[np.ndarray], np.ndarray] | None = None,
    metric: Callable[[nn.Module], float] | None = None,
    patience: int | None = None,
    masks: Mapping[str, np.ndarray | torch.Tensor] | None = None,
    callbacks: Sequence[Callable[[int, dict[str, float]], None]] = (),
    extra_loss: Callable[[nn.Module, list[torch.Tensor], Any], torch.Tensor] | None = None,
    parameters: Sequence[nn.Parameter] | None = None,
    show_progress: bool = True,
) -> FitResult:
    """Train ``module`` in place and leave it holding the best weights (by validation metric).

    Args:
        inputs: one array per module input (same number of samples).
        targets: arrays indexed like the inputs and passed to ``loss`` per batch
            (``labels``, teacher logits, ...).
        loss: ``"auto"`` (what :func:`choose_loss` picks for the model's output: NLL of the log
            for probabilities, cross-entropy for logits, MSE for regression), ``"cross_entropy"``,
            ``"nll"``, ``"mse"``, ``"huber"``, or ``loss(outputs, batch) -> tensor``. The result's
            ``loss`` and ``loss_reason`` say which and why.
        teacher_weight, temperature: above 0, distil from ``targets["teacher"]`` (the teacher's
            outputs) with :func:`kd_loss`: ``teacher_weight`` on the teacher term, the rest on the
            label loss.
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"`` (momentum 0.9); ``schedule``:
            ``"cosine"`` or ``"constant"``.
        validation: ``(inputs, labels)`` for the default metric (accuracy), or give ``metric``
            (higher is better). The best epoch's weights are kept.
        patience: stop after this many epochs without improvement.
        masks: ``{parameter name: 0/1 array}``; masked weights are zeroed after every step.
        callbacks: ``callback(epoch, logs)`` after each epoch.
        extra_loss: ``extra_loss(module, batch_inputs, outputs)`` added to the loss (feature
            distillation uses it).
    """
    n = _check_data(inputs, targets, epochs)
    loss_fn, loss_name, loss_reason = _loss_function(
        module, inputs, targets, loss, teacher_weight, temperature
    )
    seed_everything(seed)
    params = (
        list(parameters)
        if parameters is not None
        else [p for p in module.parameters() if p.requires_grad]
    )
    opt = _optimizer(params, optimizer, lr, weight_decay)
    steps_per_epoch = math.ceil(n / batch_size)
    scheduler = _scheduler(opt, schedule, max(1, epochs * steps_per_epoch))
    mask_tensors = {
        k: torch.as_tensor(v, dtype=module.get_parameter(k).dtype) for k, v in (masks or {}).items()
    }
    _apply_masks(module, mask_tensors)
    step = _Step(module, loss_fn, extra_loss, opt, scheduler, mask_tensors)
    tensors_in = [torch.from_numpy(np.ascontiguousarray(a)) for a in inputs]
    tensors_t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in targets.items()}
    loop = _Loop(
        epochs,
        batch_size,
        seed,
        _validation_metric(metric, validation),
        patience,
        callbacks,
        show_progress,
    )
    result = _train_epochs(step, tensors_in, tensors_t, loop)
    result.loss, result.loss_reason = loss_name, loss_reason
    return result


def _loss_function(
    module: nn.Module,
    inputs: Sequence[np.ndarray],
    targets: Mapping[str, np.ndarray],
    loss: str | LossFn,
    teacher_weight: float,
    temperature: float,
) -> tuple[LossFn, str, str]:
    """``(loss function, its name, why)`` for :func:`fit`."""
    if not isinstance(loss, str):
        return loss, "custom", "a loss function was given"
    choice = choose_loss(module, inputs, targets.get("labels"), loss)
    if not teacher_weight:
        return choice, choice.name, choice.reason
    if not 0 < teacher_weight <= 1 or temperature <= 0:
        raise OptionsError(
            f"distillation needs 0 < teacher_weight <= 1 and temperature > 0, got {teacher_weight} and {temperature}"
        )
    if "teacher" not in targets:
        raise DataError("distillation needs the teacher's outputs: a target array named 'teacher'")
    teacher_reads = (
        "values"
        if choice.reads == "values"
        else (_read_values(np.asarray(targets["teacher"][:256])) or ("logits", ""))[0]
    )

    def distillation(outputs: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return kd_loss(
            _first(outputs),
            batch["teacher"],
            batch.get("labels"),
            temperature=temperature,
            teacher_weight=teacher_weight,
            reads=choice.reads,
            teacher_reads=teacher_reads,
            loss=choice.name,
        )

    return (
        distillation,
        f"kd+{choice.name}",
        f"{choice.reason}; the teacher's outputs are read as {teacher_reads.replace('_', '-')}",
    )


def _validation_metric(
    metric: Callable[[nn.Module], float] | None,
    validation: tuple[Sequence[np.ndarray], np.ndarray] | None,
) -> Callable[[nn.Module], float] | None:
    """``metric``, or accuracy on ``validation`` when only that is given."""
    if metric is None and validation is not None:
        val_inputs, val_labels = validation

        def metric(m: nn.Module) -> float:
            return accuracy(m, val_inputs, val_labels)

    return metric


@dataclass(frozen=True)
class _Loop:
    """How :func:`fit`'s epoch loop runs: ``epochs`` of ``batch_size`` samples shuffled from
    ``seed``, scored by ``metric`` (higher is better; ``None``: every epoch is kept), stopped after
    ``patience`` epochs without improvement, ``callbacks`` after each epoch, a progress bar with
    ``show_progress``."""

    epochs: int
    batch_size: int
    seed: int
    metric: Callable[[nn.Module], float] | None
    patience: int | None
    callbacks: Sequence[Callable[[int, dict[str, float]], None]]
    show_progress: bool


def _train_epochs(
    step: _Step, tensors_in: list[torch.Tensor], tensors_t: dict[str, torch.Tensor], loop: _Loop
) -> FitResult:
    """The epoch loop (seeded shuffling, scoring, callbacks, early stopping; Ctrl-C stops it):
    leaves the module holding the best epoch's weights, in eval mode."""
    module = step.module
    n = len(tensors_in[0])
    generator = torch.Generator().manual_seed(loop.seed)
    result = FitResult()
    best_state = copy.deepcopy(module.state_dict())
    if loop.metric is not None:
        result.best_metric, result.best_epoch = loop.metric(module), 0
    since_best = 0
    try:
        with progress_bar(
            "training",
            total=loop.epochs * math.ceil(n / loop.batch_size),
            enabled=loop.show_progress,
        ) as advance:
            for epoch in range(1, loop.epochs + 1):
                module.train()
                order = torch.randperm(n, generator=generator)
                logs = {
                    "epoch": float(epoch),
                    "loss": step.epoch(tensors_in, tensors_t, order, loop.batch_size, advance),
                }
                improved = _score(module, loop.metric, result, epoch, logs)
                if improved:
                    best_state, since_best = copy.deepcopy(module.state_dict()), 0
                else:
                    since_best += 1
                result.history.append(logs)
                for callback in loop.callbacks:
                    callback(epoch, logs)
                if loop.patience is not None and since_best >= loop.patience:
                    result.stopped_early = True
                    break
    except KeyboardInterrupt:
        result.interrupted = True
    module.load_state_dict(best_state)
    module.eval()
    return result


def _check_data(
    inputs: Sequence[np.ndarray], targets: Mapping[str, np.ndarray], epochs: int
) -> int:
    """The number of training samples, after checking every array has that many."""
    if epochs < 0:
        raise OptionsError(f"epochs must be >= 0, got {epochs}")
    n = len(inputs[0])
    if n == 0:
        raise DataError("no training samples")
    for name, array in targets.items():
        if len(array) != n:
            raise DataError(f"training data has {n} samples but {len(array)} {name}")
    return n


def _optimizer(
    params: list[Any], optimizer: str, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if optimizer in ("adam", "adamw"):
        cls = torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam
        return cls(params, lr=lr, weight_decay=weight_decay)
    raise OptionsError(f"optimizer must be 'adam', 'adamw' or 'sgd', not {optimizer!r}")


def _scheduler(opt: torch.optim.Optimizer, schedule: str, total: int) -> Any:
    if schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
        )
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


def _score(
    module: nn.Module,
    metric: Callable[[nn.Module], float] | None,
    result: FitResult,
    epoch: int,
    logs: dict[str, float],
) -> bool:
    """Score the epoch into ``logs`` and ``result``; whether its weights are the best so far
    (without a metric, the latest epoch always is)."""
    if metric is None:
        result.best_epoch = epoch
        return True
    score = metric(module)
    logs["metric"] = score
    if result.best_metric is None or score > result.best_metric:
        result.best_metric, result.best_epoch = score, epoch
        return True
    return False


class _Step:
    """One optimisation step per batch: forward, loss (+ extra), backward, step, re-apply masks."""

    def __init__(
        self,
        module: nn.Module,
        loss_fn: LossFn,
        extra_loss: Any,
        opt: torch.optim.Optimizer,
        scheduler: Any,
        masks: dict[str, torch.Tensor],
    ) -> None:
        self.module, self.loss_fn, self.extra_loss = module, loss_fn, extra_loss
        self.opt, self.scheduler, self.masks = opt, scheduler, masks

    def epoch(
        self,
        tensors_in: list[torch.Tensor],
        tensors_t: dict[str, torch.Tensor],
        order: torch.Tensor,
        batch_size: int,
        advance: Any,
    ) -> float:
        """Train one epoch over ``order``; returns the mean loss."""
        running, seen = 0.0, 0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch_in = [t[idx] for t in tensors_in]
            outputs = self.module(*batch_in)
            value = self.loss_fn(outputs, {k: v[idx] for k, v in tensors_t.items()})
            if self.extra_loss is not None:
                value = value + self.extra_loss(self.module, batch_in, outputs)
            self.opt.zero_grad(set_to_none=True)
            value.backward()
            self.opt.step()
            self.scheduler.step()
            _apply_masks(self.module, self.masks)
            running += float(value.detach()) * len(idx)
            seen += len(idx)
            advance(1)
        return running / max(seen, 1)
