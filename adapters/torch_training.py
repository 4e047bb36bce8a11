"""A small training engine for lowered models: pruning recovery, distillation and QAT use it.

``fit`` trains any ``torch.nn.Module`` (usually a :class:`GraphModule` from ``to_torch``) on
numpy arrays: deterministic (seeded shuffling and initialisation), with a progress bar, early
stopping on a validation metric, gradient masks (pruned weights stay exactly zero) and a clean
stop on Ctrl-C that keeps the best weights seen so far.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from modelpress.plugin_api import DataError, OptionsError, progress_bar

__all__ = ["FitResult", "accuracy", "fit", "held_out_scores", "predict", "seed_everything"]

LossFn = Callable[[Any, Mapping[str, torch.Tensor]], torch.Tensor]
"""``loss(outputs, batch) -> scalar``; ``batch`` holds every target array for the batch (``labels``, ...)."""


@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    best_metric: float | None = None
    interrupted: bool = False
    stopped_early: bool = False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _first(outputs: Any) -> torch.Tensor:
    return outputs[0] if isinstance(outputs, (tuple, list)) else outputs


def cross_entropy(outputs: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    if "labels" not in batch:
        raise DataError("cross-entropy needs labels: add an array named 'labels' to the data")
    return F.cross_entropy(_first(outputs), batch["labels"].long())


def mse(outputs: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return F.mse_loss(_first(outputs), batch["labels"].to(_first(outputs).dtype))


LOSSES: dict[str, LossFn] = {"cross_entropy": cross_entropy, "mse": mse}


def predict(module: nn.Module, inputs: Sequence[np.ndarray], batch_size: int = 256) -> np.ndarray:
    """The first output of ``module`` over numpy inputs, in eval mode, batched."""
    was_training = module.training
    module.eval()
    outs = []
    n = len(inputs[0])
    with torch.no_grad():
        for start in range(0, n, batch_size):
            batch = [torch.from_numpy(np.ascontiguousarray(a[start : start + batch_size])) for a in inputs]
            outs.append(_first(module(*batch)).cpu().numpy())
    module.train(was_training)
    return np.concatenate(outs, axis=0)


def accuracy(module: nn.Module, inputs: Sequence[np.ndarray], labels: np.ndarray) -> float:
    return float(np.mean(predict(module, inputs).argmax(axis=1) == labels))


def held_out_scores(module: nn.Module, inputs: Sequence[np.ndarray], labels: np.ndarray) -> tuple[float, float]:
    """``(cross-entropy, accuracy)`` of ``module`` on labelled held-out samples.

    Fine-tuning after a compression step should keep the epoch with the lowest held-out *loss*
    (``fit(..., metric=lambda m: -held_out_scores(m, x, y)[0])``): on a split of the training
    data the accuracy is often already 100 % right after the step, and choosing by it keeps the
    untrained weights."""
    logits = torch.from_numpy(predict(module, inputs))
    y = torch.from_numpy(np.asarray(labels)).long()
    return float(F.cross_entropy(logits, y)), float((logits.argmax(dim=1) == y).float().mean())


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
    loss: str | LossFn = "cross_entropy",
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
        loss: ``"cross_entropy"``, ``"mse"`` or ``loss(outputs, batch) -> tensor``.
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
    loss_fn = LOSSES[loss] if isinstance(loss, str) else loss
    seed_everything(seed)
    params = list(parameters) if parameters is not None else [p for p in module.parameters() if p.requires_grad]
    opt = _optimizer(params, optimizer, lr, weight_decay)
    steps_per_epoch = math.ceil(n / batch_size)
    scheduler = _scheduler(opt, schedule, max(1, epochs * steps_per_epoch))
    mask_tensors = {k: torch.as_tensor(v, dtype=module.get_parameter(k).dtype) for k, v in (masks or {}).items()}
    _apply_masks(module, mask_tensors)
    step = _Step(module, loss_fn, extra_loss, opt, scheduler, mask_tensors)
    tensors_in = [torch.from_numpy(np.ascontiguousarray(a)) for a in inputs]
    tensors_t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in targets.items()}
    return _train_epochs(step, tensors_in, tensors_t, epochs=epochs, batch_size=batch_size, seed=seed, metric=_validation_metric(metric, validation),
                         patience=patience, callbacks=callbacks, show_progress=show_progress)


def _validation_metric(metric: Callable[[nn.Module], float] | None, validation: tuple[Sequence[np.ndarray], np.ndarray] | None) -> Callable[[nn.Module], float] | None:
    """``metric``, or accuracy on ``validation`` when only that is given."""
    if metric is None and validation is not None:
        val_inputs, val_labels = validation

        def metric(m: nn.Module) -> float:
            return accuracy(m, val_inputs, val_labels)

    return metric


def _train_epochs(
    step: _Step, tensors_in: list[torch.Tensor], tensors_t: dict[str, torch.Tensor], *, epochs: int, batch_size: int, seed: int,
    metric: Callable[[nn.Module], float] | None, patience: int | None, callbacks: Sequence[Callable[[int, dict[str, float]], None]], show_progress: bool,
) -> FitResult:
    """The epoch loop (seeded shuffling, scoring, callbacks, early stopping; Ctrl-C stops it):
    leaves the module holding the best epoch's weights, in eval mode."""
    module = step.module
    n = len(tensors_in[0])
    generator = torch.Generator().manual_seed(seed)
    result = FitResult()
    best_state = copy.deepcopy(module.state_dict())
    if metric is not None:
        result.best_metric, result.best_epoch = metric(module), 0
    since_best = 0
    try:
        with progress_bar("training", total=epochs * math.ceil(n / batch_size), enabled=show_progress) as advance:
            for epoch in range(1, epochs + 1):
                module.train()
                order = torch.randperm(n, generator=generator)
                logs = {"epoch": float(epoch), "loss": step.epoch(tensors_in, tensors_t, order, batch_size, advance)}
                improved = _score(module, metric, result, epoch, logs)
                if improved:
                    best_state, since_best = copy.deepcopy(module.state_dict()), 0
                else:
                    since_best += 1
                result.history.append(logs)
                for callback in callbacks:
                    callback(epoch, logs)
                if patience is not None and since_best >= patience:
                    result.stopped_early = True
                    break
    except KeyboardInterrupt:
        result.interrupted = True
    module.load_state_dict(best_state)
    module.eval()
    return result


def _check_data(inputs: Sequence[np.ndarray], targets: Mapping[str, np.ndarray], epochs: int) -> int:
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


def _optimizer(params: list[Any], optimizer: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if optimizer in ("adam", "adamw"):
        cls = torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam
        return cls(params, lr=lr, weight_decay=weight_decay)
    raise OptionsError(f"optimizer must be 'adam', 'adamw' or 'sgd', not {optimizer!r}")


def _scheduler(opt: torch.optim.Optimizer, schedule: str, total: int) -> Any:
    if schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


def _score(module: nn.Module, metric: Callable[[nn.Module], float] | None, result: FitResult, epoch: int, logs: dict[str, float]) -> bool:
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

    def __init__(self, module: nn.Module, loss_fn: LossFn, extra_loss: Any, opt: torch.optim.Optimizer, scheduler: Any, masks: dict[str, torch.Tensor]) -> None:
        self.module, self.loss_fn, self.extra_loss = module, loss_fn, extra_loss
        self.opt, self.scheduler, self.masks = opt, scheduler, masks

    def epoch(self, tensors_in: list[torch.Tensor], tensors_t: dict[str, torch.Tensor], order: torch.Tensor, batch_size: int, advance: Any) -> float:
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
