"""Built-in prune methods, registered through the ``modelpress`` entry-point group like any plugin.

* ``magnitude``: unstructured; zeros the smallest weights (per layer or globally), or those under
  a threshold rule (``median`` of |W| per layer, or a fixed value). Sparsity is *masked*: the
  tensors keep their shape, the zeros are in them.
* ``n:m``: semi-structured; in every group of M consecutive weights along the input dimension,
  keeps the N largest (2:4 by default). Masked too.
* ``channel``: structured; removes whole output channels of Conv/Gemm/MatMul layers and the
  matching input channels of every consumer, following the dependency chain (see
  :mod:`.channels`). Sparsity is *physical*: the tensors shrink and ONNX Runtime runs faster.

All three can fine-tune to recover (``fine_tune_epochs``) through the IR -> torch training engine,
on labelled data (``labels``) or, without labels, on the unpruned model's outputs; masks hold the
pruned weights at exactly zero. The label loss fits the model's output (``loss="auto"``: NLL of
the log for probabilities, e.g. a model ending in softmax, cross-entropy for logits, MSE for
regression); the figures ``loss`` and ``loss_reason`` say which and why. ``schedule="iterative"`` prunes in ``steps`` steps along a
polynomial (cubic) ramp from ``initial`` to the final sparsity, fine-tuning between steps, and judges
every step against ``stop_below`` (the verification floor export applies, by default): it stops
at the first step that makes the target unreachable and returns the best step (see :mod:`.schedule`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from modelpress.plugin_api import (
    BUILTIN_KINDS,
    DataError,
    Dataset,
    Method,
    Model,
    Options,
    OptionsError,
    PassContext,
    TuneStage,
    Tuning,
    WeightedLayer,
    hookimpl,
    load_dataset,
)
from modelpress.plugins.prune.channels import ChannelSpace, find_spaces, remove_channels
from modelpress.plugins.prune.importance import CRITERIA, channel_scores
from modelpress.plugins.prune.schedule import StepJudge, held_out_split

__all__ = ["ChannelOptions", "MagnitudeOptions", "NMOptions"]


# NOTE: the verification floor magnitude and n:m results are exported with (export's default min_cosine):
# the iterative schedule judges its steps against the same number
PRUNE_FLOOR = 0.5


class _Recovery(Options):
    fine_tune_epochs: int = Field(
        0, ge=0, description="epochs of fine-tuning after pruning (needs data=...)"
    )
    lr: float = Field(1e-3, gt=0, description="fine-tuning learning rate")
    batch_size: int = Field(64, ge=1, description="fine-tuning batch size")
    schedule: Literal["oneshot", "iterative"] = Field(
        "oneshot", description="prune at once, or in steps with fine-tuning between"
    )
    steps: int = Field(3, ge=1, description="iterative: number of pruning steps")
    initial: float = Field(
        0.0, ge=0, lt=1, description="iterative: sparsity of the first step's ramp start"
    )
    op_types: list[str] = Field(
        default_factory=lambda: ["Conv", "Gemm", "MatMul"], description="layer op types to prune"
    )
    layers: list[str] = Field(
        default_factory=list, description="prune only these layers (node names); default: all"
    )
    exclude: list[str] = Field(
        default_factory=list, description="layers (node names) to leave alone"
    )
    distill: float = Field(
        0.0,
        ge=0,
        le=1,
        description="with labels: weight of knowledge distillation from the unpruned model's soft outputs in the "
        "fine-tuning loss (0: labels only, 1: teacher only)",
    )
    temperature: float = Field(
        4.0, gt=0, description="distill: softmax temperature of the soft targets"
    )
    loss: Literal["auto", "cross_entropy", "nll", "mse", "huber"] = Field(
        "auto",
        description="fine-tuning label loss; auto: NLL of the log for probability outputs (softmax), cross-entropy for logits, MSE for regression",
    )
    stop_below: float | None = Field(
        PRUNE_FLOOR,
        ge=-1,
        le=1,
        description="iterative: stop at the first step whose cosine to the unpruned model falls below this, "
        "and return the best step (default: the verification floor export applies; None: never stop)",
    )


class MagnitudeOptions(_Recovery):
    sparsity: float = Field(0.5, ge=0, lt=1, description="fraction of weights to zero, in [0, 1)")
    scope: Literal["layer", "global"] = Field(
        "layer", description="each layer to `sparsity`, or one threshold across layers"
    )
    rule: Literal["fraction", "median", "threshold"] = Field(
        "fraction",
        description="fraction: `sparsity`; median: |w| below the layer's median; threshold: |w| < `threshold`",
    )
    threshold: float = Field(
        0.0, ge=0, description="rule=threshold: absolute value below which weights are zeroed"
    )
    min_elements: int = Field(64, ge=1, description="skip weights smaller than this")


class NMOptions(_Recovery):
    n: int = Field(2, ge=1, description="weights kept per group")
    m: int = Field(4, ge=2, description="group size along the input dimension")
    min_elements: int = Field(64, ge=1, description="skip weights smaller than this")

    @model_validator(mode="after")
    def _n_below_m(self) -> NMOptions:
        if self.n >= self.m:
            raise ValueError(f"n ({self.n}) must be smaller than m ({self.m})")
        return self


class ChannelOptions(_Recovery):
    ratio: float = Field(
        0.5,
        ge=0,
        lt=1,
        description="fraction of output channels to remove per channel group, in [0, 1)",
    )
    criterion: Literal["l1", "l2", "bn-scale", "taylor", "activation"] = Field(
        "l1", description="channel importance: " + ", ".join(CRITERIA)
    )
    # NOTE: removing channels changes outputs by design: export has no default floor, so neither does the schedule
    stop_below: float | None = Field(
        None,
        ge=-1,
        le=1,
        description="iterative: stop at the first step whose cosine to the unpruned model "
        "falls below this, and return the best step (default None: never stop)",
    )
    round_to: int = Field(
        1,
        ge=1,
        description="keep a multiple of this many channels (e.g. 8 for SIMD-friendly shapes)",
    )


# -- shared helpers ---------------------------------------------------------------------------------
def _select(
    model: Model, opts: _Recovery, min_elements: int = 1, *, subgraphs: bool = False
) -> tuple[list[WeightedLayer], dict[str, str]]:
    names = {n.name for n in model.nodes()}
    unknown = sorted(set(opts.layers) - names) + sorted(set(opts.exclude) - names)
    if unknown:
        raise OptionsError(
            f"no layer named {', '.join(map(repr, unknown))} in {model.name!r}; layers: {', '.join(x.name for x in model.weighted_layers())}"
        )
    skipped: dict[str, str] = {}
    if not subgraphs:
        skipped.update(
            model.subgraph_refusals(
                frozenset(opts.op_types),
                "channel pruning",
                "cannot change tensor shapes inside control flow; left as is",
            )
        )
    chosen = []
    for layer in model.weighted_layers(frozenset(opts.op_types), subgraphs=subgraphs):
        if opts.layers and layer.name not in opts.layers:
            continue
        if layer.name in opts.exclude:
            skipped[layer.name] = "excluded by option"
        elif layer.weight.const_value is None or layer.weight.const_value.size < min_elements:
            skipped[layer.name] = f"fewer than {min_elements} weights"
        else:
            chosen.append(layer)
    if not chosen:
        raise OptionsError(
            f"{model.name!r} has no prunable layers ({', '.join(opts.op_types)} with constant weights){': ' + str(skipped) if skipped else ''}"
        )
    return chosen, skipped


def _ramp(final: float, opts: _Recovery) -> list[float]:
    if opts.schedule == "oneshot":
        return [final]
    start = min(opts.initial, final)
    return [final + (start - final) * (1 - (t + 1) / opts.steps) ** 3 for t in range(opts.steps)]


def _training_data(model: Model, ctx: PassContext, opts: _Recovery) -> Dataset | None:
    if not opts.fine_tune_epochs:
        return None
    # NOTE: training data is declared (requires_if fine_tune_epochs): the host refuses a call without it
    return load_dataset(ctx.train, model.signature, what="training")


def _teacher_outputs(teacher: Model, data: Dataset) -> np.ndarray:
    """The unpruned model's first output on the training data (ONNX Runtime)."""
    from modelpress.plugin_api import make_session, run_dataset

    return np.asarray(run_dataset(make_session(teacher), data.batches(256))[0])


def _recovery_loss(
    data: Dataset, opts: _Recovery, teacher: Model
) -> tuple[dict[str, np.ndarray], Any, float]:
    """``(targets, loss, teacher weight)`` for fine-tuning: the label loss that fits the output
    (``opts.loss``), distilled from the unpruned model with weight ``distill``; without labels,
    the MSE to the unpruned model's outputs."""
    if data.labels is not None:
        if opts.distill > 0:
            return (
                {"labels": data.labels, "teacher": _teacher_outputs(teacher, data)},
                opts.loss,
                opts.distill,
            )
        return {"labels": data.labels}, opts.loss, 0.0

    def loss(outputs: Any, batch: Any) -> Any:
        import torch.nn.functional as F

        out = outputs[0] if isinstance(outputs, tuple) else outputs
        return F.mse_loss(out, batch["teacher"])

    return {"teacher": _teacher_outputs(teacher, data)}, loss, 0.0


def _fine_tune(
    model: Model,
    data: Dataset,
    opts: _Recovery,
    ctx: PassContext,
    masks: dict[str, np.ndarray] | None,
    teacher: Model,
) -> tuple[Model, dict[str, Any]]:
    """Recover accuracy: train the lowered model (masks hold pruned weights at zero), write back."""
    from modelpress.plugin_api import fit, held_out_scores, to_torch, update_weights

    module = to_torch(model)
    inputs = [data.inputs[n] for n in model.signature.input_names]
    train_idx, val_idx = held_out_split(len(inputs[0]))
    targets, loss, teacher_weight = _recovery_loss(data, opts, teacher)
    held_out = (
        ([a[val_idx] for a in inputs], data.labels[val_idx]) if data.labels is not None else None
    )
    attr_masks = {
        module.attribute_name(name): mask
        for name, mask in (masks or {}).items()
        if name in module.onnx_names.values()
    }
    result = fit(
        module,
        [a[train_idx] for a in inputs],
        {k: v[train_idx] for k, v in targets.items()},
        loss=loss,
        epochs=opts.fine_tune_epochs,
        lr=opts.lr,
        batch_size=opts.batch_size,
        teacher_weight=teacher_weight,
        temperature=opts.temperature,
        metric=(lambda m: -held_out_scores(m, *held_out, loss=opts.loss)[0]) if held_out else None,
        masks=attr_masks,
        show_progress=ctx.show_progress,
    )
    figures: dict[str, Any] = {
        "fine_tune_epochs": len(result.history),
        "interrupted": result.interrupted,
        "loss": result.loss,
        "loss_reason": result.loss_reason,
    }
    if data.labels is None:
        figures["loss"], figures["loss_reason"] = (
            "mse",
            "no labels: the unpruned model's outputs are the targets",
        )
    if held_out is not None:
        scores = held_out_scores(module, *held_out, loss=opts.loss)
        figures["validation_loss"] = round(scores[0], 4)
        if not math.isnan(scores[1]):
            figures["validation_accuracy"] = round(scores[1], 4)
        figures["best_epoch"] = result.best_epoch
    return _positive_zeros(update_weights(model, module), masks), figures


def _positive_zeros(model: Model, masks: dict[str, np.ndarray] | None) -> Model:
    """Training writes masked weights as w * 0, which is -0.0 for negative w; store +0.0 (the same
    number) so pruned tensors have one zero bit pattern and entropy-code as sparse."""
    for name in masks or {}:
        value = model.ir.graph.initializers.get(name)
        if (
            value is None
            or value.const_value is None
            or not value.const_value.dtype.is_floating_point()
        ):
            continue
        w = value.const_value.numpy()
        if np.signbit(w[w == 0]).any():
            model.replace_initializer(name, np.where(w == 0, np.zeros((), w.dtype), w))
    return model


def _rebuild(model: Model) -> Model:
    """Re-validate after shapes changed: forget intermediate shapes and re-infer them in memory
    (strict; weights are not copied, so this works on models over 2 GB)."""
    model.infer_shapes(reset=True)
    return model


# -- masked pruning ---------------------------------------------------------------------------------
def _magnitude_masks(
    layers: list[WeightedLayer], opts: MagnitudeOptions, sparsity: float
) -> dict[str, np.ndarray]:
    masks: dict[str, np.ndarray] = {}
    if opts.rule == "median":
        for layer in layers:
            w = np.abs(layer.weight_array())
            masks[layer.weight.name or ""] = (w >= np.median(w)).astype(np.float32)
        return masks
    if opts.rule == "threshold":
        return {
            layer.weight.name or "": (np.abs(layer.weight_array()) >= opts.threshold).astype(
                np.float32
            )
            for layer in layers
        }
    if opts.scope == "global":
        flat = np.concatenate([np.abs(layer.weight_array()).ravel() for layer in layers])
        k = round(sparsity * flat.size)
        order = np.argsort(flat, kind="stable")
        global_mask = np.ones(flat.size, np.float32)
        global_mask[order[:k]] = 0
        offset = 0
        for layer in layers:
            size = layer.weight_array().size
            masks[layer.weight.name or ""] = global_mask[offset : offset + size].reshape(
                layer.weight_array().shape
            )
            offset += size
        return masks
    for layer in layers:
        w = np.abs(layer.weight_array()).ravel()
        k = round(sparsity * w.size)
        mask = np.ones(w.size, np.float32)
        mask[np.argsort(w, kind="stable")[:k]] = 0
        masks[layer.weight.name or ""] = mask.reshape(layer.weight_array().shape)
    return masks


def _nm_mask(layer: WeightedLayer, n: int, m: int) -> np.ndarray | None:
    w = np.abs(layer.weight_array())
    moved = np.moveaxis(w, layer.in_axis, -1)
    if moved.shape[-1] % m:
        return None
    groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)
    ranks = np.argsort(np.argsort(-groups, axis=-1, kind="stable"), axis=-1)
    mask = (ranks < n).astype(np.float32).reshape(moved.shape)
    return np.moveaxis(mask, -1, layer.in_axis)


def _apply_masks(model: Model, masks: dict[str, np.ndarray]) -> None:
    for name, mask in masks.items():
        model.replace_initializer(name, model.initializer(name).const_value.numpy() * mask)  # type: ignore[union-attr]


def _masked_sparsity(
    result: Model, opts: MagnitudeOptions | NMOptions, masks: dict[str, np.ndarray]
) -> tuple[dict[str, Any], float]:
    """Each masked layer's sparsity and size, and the sparsity over all of them."""
    per_layer = {}
    total = zeros = 0
    for layer in result.weighted_layers(frozenset(opts.op_types), subgraphs=True):
        if layer.weight.name in masks:
            w = layer.weight_array()
            per_layer[layer.name] = {
                "sparsity": round(float(np.mean(w == 0)), 4),
                "kind": "masked",
                "parameters": int(w.size),
            }
            total += w.size
            zeros += int(np.sum(w == 0))
    return per_layer, round(zeros / max(total, 1), 4)


def _masked(model: Model, opts: MagnitudeOptions | NMOptions, ctx: PassContext, make: Any) -> Model:
    layers, skipped = _select(model, opts, opts.min_elements, subgraphs=True)
    data = _training_data(model, ctx, opts)
    result = model.clone()
    masks: dict[str, np.ndarray] = {}
    figures: dict[str, Any] = {}
    targets = (
        _ramp(getattr(opts, "sparsity", 0.0), opts)
        if isinstance(opts, MagnitudeOptions)
        else [0.0] * (opts.steps if opts.schedule == "iterative" else 1)
    )
    judge = StepJudge.start(model, ctx, data, opts.stop_below, len(targets))
    for number, target in enumerate(targets, 1):
        current = {
            x.name: x for x in result.weighted_layers(frozenset(opts.op_types), subgraphs=True)
        }
        chosen = [current[x.name] for x in layers if x.name in current]
        masks = make(chosen, target)
        for name in [x.name for x in chosen]:
            if current[name].weight.name not in masks:
                skipped[name] = (
                    "its input dimension is not a multiple of m"
                    if isinstance(opts, NMOptions)
                    else "skipped"
                )
        _apply_masks(result, masks)
        if data is not None:
            result, figures = _fine_tune(result, data, opts, ctx, masks, model)
        if not judge.judge(
            result,
            number,
            target if isinstance(opts, MagnitudeOptions) else 1 - opts.n / opts.m,
            figures,
        ):
            break
    result, figures = judge.outcome(
        result, figures, ctx, "magnitude" if isinstance(opts, MagnitudeOptions) else "n:m"
    )
    if len(targets) > 1:
        ctx.figures["schedule"] = [round(t, 4) for t in targets]
    per_layer, sparsity = _masked_sparsity(result, opts, masks)
    ctx.figures.update(
        {
            "layers": per_layer,
            "sparsity": sparsity,
            "skipped": skipped,
            "parameters_before": model.parameter_count(),
            "parameters_after": result.parameter_count(),
            **figures,
        }
    )
    return result


def magnitude(model: Model, opts: MagnitudeOptions, ctx: PassContext) -> Model:
    return _masked(
        model, opts, ctx, lambda layers, sparsity: _magnitude_masks(layers, opts, sparsity)
    )


def n_m(model: Model, opts: NMOptions, ctx: PassContext) -> Model:
    def make(layers: list[WeightedLayer], _: float) -> dict[str, np.ndarray]:
        masks = {}
        for layer in layers:
            mask = _nm_mask(layer, opts.n, opts.m)
            if mask is not None:
                masks[layer.weight.name or ""] = mask
        return masks

    result = _masked(model, opts, ctx, make)
    ctx.figures["pattern"] = f"{opts.n}:{opts.m}"
    return result


# -- structured pruning -----------------------------------------------------------------------------
def _keep_count(channels: int, original: int, ratio: float, round_to: int) -> int:
    keep = max(1, math.ceil(original * (1 - ratio)))
    if round_to > 1:
        keep = max(round_to, round(keep / round_to) * round_to)
    return min(keep, channels)


@dataclass
class _ChannelRun:
    """The state of one channel-pruning pass across its steps: what is selected, skipped, removed."""

    opts: ChannelOptions
    names: set[str]
    skipped: dict[str, str]
    criterion_data: Dataset | None = None
    original: dict[str, int] = field(default_factory=dict)
    report: dict[str, dict[str, Any]] = field(default_factory=dict)

    def prunable(self, result: Model) -> list[ChannelSpace]:
        spaces = find_spaces(result, [x for x in result.weighted_layers() if x.name in self.names])
        chosen: list[ChannelSpace] = []
        for space in spaces:
            if not space.prunable:
                for layer in space.sources:
                    self.skipped[layer.name] = (
                        # NOTE: " and ": "; " separates the reasons of different layers in figure_text
                        " and ".join(dict.fromkeys(space.blockers)) or "a single channel"
                    )
            elif any(x.name not in self.names for x in space.sources):
                for layer in space.sources:
                    self.skipped[layer.name] = (
                        "coupled (residual) with a layer that is not selected"
                    )
            else:
                chosen.append(space)
        return chosen

    def step(self, result: Model, ratio: float) -> bool:
        """Remove channels down to ``ratio`` in place; ``False`` when nothing is prunable."""
        prunable = self.prunable(result)
        if not prunable:
            return False
        scores = channel_scores(result, prunable, self.opts.criterion, self.criterion_data)
        for index, space in enumerate(prunable):
            key = space.name
            self.original.setdefault(key, space.channels)
            keep_n = _keep_count(space.channels, self.original[key], ratio, self.opts.round_to)
            if keep_n >= space.channels:
                continue
            keep = np.sort(np.argsort(-scores[index], kind="stable")[:keep_n])
            remove_channels(result, space, keep)
            self.report[key] = {
                "kind": "physical",
                "channels_before": self.original[key],
                "channels_after": keep_n,
                "removed": self.original[key] - keep_n,
                "criterion": self.opts.criterion,
            }
        return True


def _criterion_data(model: Model, opts: ChannelOptions, ctx: PassContext) -> Dataset | None:
    if opts.criterion not in ("taylor", "activation"):
        return None
    source = ctx.train if ctx.train is not None else ctx.calibration
    if source is None:
        raise DataError(
            f"the {opts.criterion} criterion needs data (data=... / --data train.npz{' with labels' if opts.criterion == 'taylor' else ''})"
        )
    return load_dataset(source, model.signature, what="criterion").take(512)


def channel(model: Model, opts: ChannelOptions, ctx: PassContext) -> Model:
    layers, skipped = _select(model, opts)
    data = _training_data(model, ctx, opts)
    run = _ChannelRun(opts, {x.name for x in layers}, skipped, _criterion_data(model, opts, ctx))
    result = model.clone()
    figures: dict[str, Any] = {}
    ratios = _ramp(opts.ratio, opts)
    judge = StepJudge.start(model, ctx, data, opts.stop_below, len(ratios))
    for number, ratio in enumerate(ratios, 1):
        if not run.step(result, ratio):
            break
        result = _rebuild(result)
        if data is not None:
            result, figures = _fine_tune(result, data, opts, ctx, None, model)
        if not judge.judge(result, number, ratio, (figures, copy.deepcopy(run.report))):
            break
    result, (figures, report) = judge.outcome(result, (figures, run.report), ctx, "channel")
    if not report:
        raise OptionsError(f"channel: nothing could be pruned in {model.name!r}: {skipped}")
    for name in list(skipped):
        if any(name in key.split("+") for key in report):
            skipped.pop(name)
    ctx.figures.update(
        {
            "layers": report,
            "skipped": skipped,
            "parameters_before": model.parameter_count(),
            "parameters_after": result.parameter_count(),
            **figures,
        }
    )
    return result


@hookimpl
def modelpress_register_kinds(register):  # type: ignore[no-untyped-def]
    register(next(k for k in BUILTIN_KINDS if k.name == "prune"))


# Fine-tuning trains: with fine_tune_epochs set, a method needs training data.
_FINE_TUNE = {"fine_tune_epochs": "train"}
# How `modelpress tune` searches them: fine-tuning recovers accuracy (searched with training data and torch), and a
# trial that fine-tunes is first measured without it and cut when already hopeless.
_LINEAR = ("Conv", "Gemm", "MatMul")
_CHANNEL_TUNING = Tuning(
    order=10,
    alone=False,
    ops=_LINEAR,
    recovery="fine_tune_epochs",
    probe=True,
    search={"ratio": {"low": 0.1, "high": 0.6, "step": 0.05}, "fine_tune_epochs": [3, 1, 0]},
    without={"recovery": {"ratio": {"search": {"low": 0.05, "high": 0.3, "step": 0.05}}}},
    # NOTE: the distillation student's width is 1 - ratio: the channel pass narrows the model, kd trains it from the source
    pipelines=(
        ("prune/channel", "quantize/int8-static"),
        (
            TuneStage(
                "prune/channel", {"ratio": {"search": {"low": 0.25, "high": 0.75, "step": 0.05}}}
            ),
            "distill/kd",
            "quantize/int8-static",
        ),
    ),
)
_MAGNITUDE_TUNING = Tuning(
    order=70,
    ops=_LINEAR,
    recovery="fine_tune_epochs",
    probe=True,
    search={"sparsity": {"low": 0.3, "high": 0.9, "step": 0.1}, "fine_tune_epochs": [3, 0]},
)
_NM_TUNING = Tuning(
    alone=False, recovery="fine_tune_epochs", probe=True
)  # NOTE: no pipeline of its own: tuned in a recipe only


@hookimpl
def modelpress_register_methods(register):  # type: ignore[no-untyped-def]
    register(
        Method(
            name="magnitude",
            kind="prune",
            apply=magnitude,
            options=MagnitudeOptions,
            mutates=False,
            requires_if=_FINE_TUNE,
            min_cosine=PRUNE_FLOOR,
            kind_default=True,
            summary="unstructured: zero the smallest weights (masked sparsity)",
            tuning=_MAGNITUDE_TUNING,
        )
    )
    register(
        Method(
            name="n:m",
            kind="prune",
            apply=n_m,
            options=NMOptions,
            mutates=False,
            requires_if=_FINE_TUNE,
            min_cosine=PRUNE_FLOOR,
            summary="semi-structured N:M sparsity along the input dimension (2:4 default)",
            tuning=_NM_TUNING,
        )
    )
    register(
        Method(
            name="channel",
            kind="prune",
            apply=channel,
            options=ChannelOptions,
            mutates=False,
            requires_if=_FINE_TUNE,
            min_cosine=None,
            summary="structured: remove channels and their consumers' inputs (smaller, faster model)",
            tuning=_CHANNEL_TUNING,
        )
    )
