"""``int8-qat``: quantization-aware training on top of ``int8-static``.

1. ``int8-static`` calibrates and builds the QDQ graph (same options, same sensitivity guard).
2. Each int8 weight behind a DequantizeLinear becomes a float parameter behind a
   QuantizeLinear -> DequantizeLinear pair (*fake quantization*); each int32 bias becomes a float
   bias. The IR -> torch lowering runs QuantizeLinear with a straight-through estimator, so the
   float weights learn while the forward pass sees exactly the integer grid ORT will use.
3. Training uses labels, the float model as a distillation teacher (``teacher="source"``: the
   plugin API's ``kd_loss`` with ``temperature`` and teacher weight ``1 - alpha``), or both. The
   label loss fits the model's output (``loss="auto"``: NLL of the log for probabilities,
   cross-entropy for logits, MSE for regression); figures ``qat_loss`` / ``qat_loss_reason``.
4. The trained weights are quantized back to int8 (biases to int32 with their scales) and the
   QDQ graph is exported as usual.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import onnx_ir as ir
from pydantic import Field

from modelpress.plugin_api import DataError, Model, Out, PassContext, load_dataset
from modelpress.plugins.quantize.cpu import resolve_reduce_range
from modelpress.plugins.quantize.static import Int8StaticOptions, int8_static

__all__ = ["Int8QATOptions", "int8_qat"]


class Int8QATOptions(Int8StaticOptions):
    epochs: int = Field(3, ge=0, description="quantization-aware training epochs")
    lr: float = Field(
        1e-4, gt=0, description="learning rate (small: the weights start from a good point)"
    )
    train_batch_size: int = Field(64, ge=1, description="training batch size")
    teacher: Literal["source", "none"] = Field(
        "source", description="source: distil from the float model; none: labels only"
    )
    temperature: float = Field(2.0, gt=0, description="distillation temperature (teacher='source')")
    alpha: float = Field(
        0.5, ge=0, le=1, description="weight of the label loss when labels exist (teacher='source')"
    )
    seed: int = Field(0, description="random seed")
    loss: Literal["auto", "cross_entropy", "nll", "mse", "huber"] = Field(
        "auto",
        description="label loss; auto: NLL of the log for probability outputs (softmax), cross-entropy for logits, MSE for regression",
    )


def _constant(value: ir.Value | None) -> np.ndarray | None:
    """A DequantizeLinear's scale: an initializer, or a Mul of two (int8-static's bias scale,
    input scale x weight scale, as the float32 product ONNX computes)."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    mul = value.producer()
    if mul is None or mul.op_type != "Mul" or len(mul.inputs) != 2:
        return None
    a, b = mul.inputs
    if a is None or b is None or a.const_value is None or b.const_value is None:
        return None
    return np.multiply(a.const_value.numpy(), b.const_value.numpy(), dtype=np.float32)


def _unfold(
    model: Model,
) -> tuple[list[tuple[ir.Node, ir.Value]], list[tuple[ir.Node, str, np.ndarray]]]:
    """Turn int8 weights into float + QuantizeLinear, int32 biases into float initializers."""
    graph = model.ir.graph
    weights: list[tuple[ir.Node, ir.Value]] = []
    biases: list[tuple[ir.Node, str, np.ndarray]] = []
    for node in list(graph):
        if node.op_type != "DequantizeLinear" or not node.inputs or node.inputs[0] is None:
            continue
        source = node.inputs[0]
        tensor = source.const_value
        if tensor is None or not source.is_initializer():
            continue
        scale = _constant(node.inputs[1])
        if scale is None:
            continue
        zero = (
            node.inputs[2].const_value.numpy()
            if len(node.inputs) > 2 and node.inputs[2] is not None
            else np.zeros_like(scale, np.int8)
        )  # type: ignore[union-attr]
        axis = node.attributes["axis"].as_int() if "axis" in node.attributes else 1
        q = tensor.numpy()
        shape = [1] * q.ndim
        if scale.ndim:
            shape[axis % q.ndim] = -1
        real = ((q.astype(np.float64) - zero.reshape(shape)) * scale.reshape(shape)).astype(
            np.float32
        )
        if tensor.dtype == ir.DataType.INT8:
            float_v = model.add_initializer(f"{source.name}_qat", real)
            # NOTE: int8-static leaves out all-zero weight zero points; QuantizeLinear needs one to write int8
            zero_v = (
                node.inputs[2]
                if len(node.inputs) > 2 and node.inputs[2] is not None
                else model.add_initializer(f"{source.name}_qat_zero", zero.astype(np.int8))
            )
            quantized = model.builder().op(
                "QuantizeLinear",
                [float_v, node.inputs[1], zero_v],
                {"axis": axis} if scale.ndim else {},
                name=f"{source.name}_qat_QuantizeLinear",
                out=Out(f"{source.name}_qat_quantized", ir.DataType.INT8),
            )
            quant = quantized.producer()
            assert quant is not None
            graph.insert_before(node, quant)
            node.replace_input_with(0, quantized)
            weights.append((quant, source))
        elif tensor.dtype == ir.DataType.INT32:
            float_v = model.add_initializer(f"{source.name}_qat", real)
            out = node.outputs[0]
            out.replace_all_uses_with(float_v)
            biases.append((node, float_v.name or "", scale))
    return weights, biases


def _fold(
    model: Model,
    weights: list[tuple[ir.Node, ir.Value]],
    biases: list[tuple[ir.Node, str, np.ndarray]],
    qmax: int = 127,
) -> None:
    """Quantize the trained float weights back into the int8/int32 initializers (weights in
    ``[-qmax, qmax]``: 63 where int8-static chose 7-bit weights)."""
    graph = model.ir.graph
    for quant, int_value in weights:
        float_v = quant.inputs[0]
        assert float_v is not None and float_v.const_value is not None
        scale = quant.inputs[1].const_value.numpy()  # type: ignore[union-attr]
        zero = quant.inputs[2].const_value.numpy()  # type: ignore[union-attr]
        w = float_v.const_value.numpy()
        axis = quant.attributes["axis"].as_int() if "axis" in quant.attributes else 1
        shape = [1] * w.ndim
        if scale.ndim:
            shape[axis % w.ndim] = -1
        q = np.clip(np.round(w / scale.reshape(shape)) + zero.reshape(shape), -qmax, qmax).astype(
            np.int8
        )
        model.replace_initializer(int_value.name or "", q)
        out = quant.outputs[0]
        out.replace_all_uses_with(int_value)
        graph.remove(quant, safe=True)
        graph.initializers.pop(float_v.name or "")
    for dq, float_name, scale in biases:
        bias = model.initializer(float_name).const_value.numpy()  # type: ignore[union-attr]
        bias_q = dq.inputs[0]
        assert bias_q is not None
        model.replace_initializer(
            bias_q.name or "", np.clip(np.round(bias / scale), -(2**31), 2**31 - 1).astype(np.int32)
        )
        model.initializer(float_name).replace_all_uses_with(dq.outputs[0])
        graph.initializers.pop(float_name)


def _static_start(
    model: Model, opts: Int8QATOptions, ctx: PassContext
) -> tuple[Model, dict[str, Any]]:
    """The int8-static model training starts from (calibrated on the calibration data, else the
    training data), and int8-static's figures."""
    # NOTE: one weight grid for every layer (training fake-quantizes on it): 7 bits where the CPU's
    # u8 x s8 kernels saturate, not int8-static's 8-bit scales kept from saturating on calibrated inputs
    reduce, why = resolve_reduce_range(opts.reduce_range)
    static_options = Int8StaticOptions(
        **{
            **{k: v for k, v in opts.model_dump().items() if k in Int8StaticOptions.model_fields},
            "reduce_range": reduce,
        }
    )
    calibration_ctx = PassContext(
        calibration=ctx.calibration if ctx.calibration is not None else ctx.train,
        show_progress=ctx.show_progress,
    )
    quantized = int8_static(model, static_options, calibration_ctx)
    return quantized, {**calibration_ctx.figures, "reduce_range": why}


def int8_qat(model: Model, opts: Int8QATOptions, ctx: PassContext) -> Model:
    from modelpress.plugin_api import fit, make_session, run_dataset, to_torch, update_weights

    data = load_dataset(ctx.train, model.signature, what="training")
    if opts.teacher == "none" and data.labels is None:
        raise DataError("int8-qat with teacher='none' needs labels (an array named 'labels')")
    quantized, before = _static_start(model, opts, ctx)
    work = quantized.clone()
    weights, biases = _unfold(work)
    module = to_torch(work)
    inputs = [data.inputs[n] for n in model.signature.input_names]
    targets: dict[str, np.ndarray] = {}
    if data.labels is not None:
        targets["labels"] = data.labels
    alpha = opts.alpha if data.labels is not None else 0.0
    if opts.teacher == "source":
        targets["teacher"] = run_dataset(make_session(model), data.batches(256))[0]
    result = fit(
        module,
        inputs,
        targets,
        loss=opts.loss,
        teacher_weight=1 - alpha if opts.teacher == "source" else 0.0,
        temperature=opts.temperature,
        epochs=opts.epochs,
        lr=opts.lr,
        batch_size=opts.train_batch_size,
        seed=opts.seed,
        show_progress=ctx.show_progress,
    )
    trained = update_weights(work, module)
    # NOTE: the QuantizeLinear trained through saturates at int8's range; 7-bit weights are clipped back to theirs
    _fold(
        trained,
        weights_in(trained, weights),
        biases_in(trained, biases),
        qmax=63 if resolve_reduce_range(opts.reduce_range)[0] else 127,
    )
    ctx.figures.update(
        {
            **{k: v for k, v in before.items() if k != "float_nodes"},
            "float_nodes": before.get("float_nodes", {}),
            "qat_epochs": len(result.history),
            "qat_interrupted": result.interrupted,
            "qat_first_loss": result.history[0]["loss"] if result.history else None,
            "qat_last_loss": result.history[-1]["loss"] if result.history else None,
            "qat_loss": result.loss,
            "qat_loss_reason": result.loss_reason,
            "trained_weights": len(weights),
            "trained_biases": len(biases),
        }
    )
    return Model(
        trained.ir, provenance=model.provenance, path=model.path, reference=model.reference or model
    )


def weights_in(
    model: Model, weights: list[tuple[ir.Node, ir.Value]]
) -> list[tuple[ir.Node, ir.Value]]:
    """The same (QuantizeLinear, int8 initializer) pairs, looked up in a copy of the model."""
    nodes = {n.name: n for n in model.nodes()}
    return [(nodes[q.name], model.initializer(v.name or "")) for q, v in weights]


def biases_in(
    model: Model, biases: list[tuple[ir.Node, str, np.ndarray]]
) -> list[tuple[ir.Node, str, np.ndarray]]:
    nodes = {n.name: n for n in model.nodes()}
    return [(nodes[dq.name], name, scale) for dq, name, scale in biases]
