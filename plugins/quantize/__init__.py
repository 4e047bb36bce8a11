"""Built-in quantize methods, registered through the ``modelpress`` entry-point group like any plugin."""

from __future__ import annotations

from functools import partial

from pydantic import Field

from modelpress.plugin_api import BUILTIN_KINDS, Method, TextFloor, Tuning, hookimpl
from modelpress.plugins.quantize.codebook import CodebookOptions, codebook
from modelpress.plugins.quantize.dynamic import Int8DynamicOptions, int8_dynamic
from modelpress.plugins.quantize.fp16 import Fp16Options, fp16
from modelpress.plugins.quantize.mixed import MixedPrecisionOptions, mixed_precision
from modelpress.plugins.quantize.qat import Int8QATOptions, int8_qat
from modelpress.plugins.quantize.static import Int8StaticOptions, int8_static_method
from modelpress.plugins.quantize.weight_only import WeightOnlyOptions, weight_only


class Int8WeightOnlyOptions(WeightOnlyOptions):
    bits: int = Field(8, ge=8, le=8, description="weight bits (8 for this method)")  # type: ignore[assignment]


# -- how `modelpress tune` searches each method (read by the tuner like any plugin's declaration)
_LINEAR = ("Conv", "Gemm", "MatMul")
_MATMUL = ("MatMul", "Gemm")
_INT8_STATIC_TUNING = Tuning(
    order=30,
    seed=True,
    ops=_LINEAR,
    weighted=False,  # NOTE: activations of layers whose weights are Constant nodes too
    search={
        "calibrator": ["percentile", "minmax", "entropy", "mse"],
        "per_channel": [True, False],
        "activation_type": ["uint8", "int8"],
        "exclude": "fallback",
    },
    # NOTE: the tuner owns the fallback (measured on the tune metric's ranking), not the method's own targets
    fixed={"sensitivity": False},
    # NOTE: unreachable targets make int8-static measure every node alone; the weighted layers only, on a few samples
    fallback="exclude",
    ranking={
        "min_cosine": 1.0,
        "min_agreement": 1.0,
        "max_samples": 16,
        "elementwise_ops": [],
        "activation_matmuls": False,
    },
)
_CODEBOOK_TUNING = Tuning(order=40, ops=_LINEAR, search={"bits": {"low": 2, "high": 8, "step": 1}})
_INT4_TUNING = Tuning(
    order=50,
    ops=_MATMUL,
    min_elements=1024,
    search={"block_size": [128, 64, 32], "algorithm": ["rtn", "mse", "gptq"]},
    without={"calibration": {"algorithm": {"search": ["rtn", "mse"]}}},
)
_INT8_DYNAMIC_TUNING = Tuning(
    order=60, ops=_MATMUL, min_elements=1024, search={"per_channel": [True, False]}
)
_FP16_TUNING = Tuning(order=80)
# NOTE: what a text decoder's result keeps (greedy-token agreement, perplexity increase on held-out text): 8 bits keep
# nearly every token, 4 bits drift further (fp16 tightest)
_TEXT_8BIT = TextFloor(min_token_agreement=0.9, max_perplexity_increase=0.05)
_TEXT_4BIT = TextFloor(min_token_agreement=0.7, max_perplexity_increase=0.2)
_TEXT_FP16 = TextFloor(min_token_agreement=0.95, max_perplexity_increase=0.01)


@hookimpl
def modelpress_register_kinds(register):  # type: ignore[no-untyped-def]
    register(next(k for k in BUILTIN_KINDS if k.name == "quantize"))


# NOTE: declared once at import: the hook hands the same Method objects to every registry
_METHODS = (
    Method(
        name="int8-static",
        kind="quantize",
        apply=int8_static_method,
        options=Int8StaticOptions,
        mutates=False,
        min_cosine=0.9,
        text_floor=_TEXT_8BIT,
        kind_default=True,
        requires={"calibration"},
        summary="QDQ INT8 with calibration; sensitive nodes stay float to keep the accuracy target",
        tuning=_INT8_STATIC_TUNING,
    ),
    Method(
        name="int8-qat",
        kind="quantize",
        apply=int8_qat,
        options=Int8QATOptions,
        mutates=False,
        min_cosine=0.9,
        text_floor=_TEXT_8BIT,
        requires={"train"},
        summary="int8-static, then quantization-aware training (straight-through fake quant), optionally distilled from the float model",
    ),
    Method(
        name="int8-dynamic",
        kind="quantize",
        apply=int8_dynamic,
        options=Int8DynamicOptions,
        mutates=True,
        min_cosine=0.98,
        text_floor=_TEXT_8BIT,
        summary="INT8 weights, activations quantized at run time (MatMul/Gemm)",
        tuning=_INT8_DYNAMIC_TUNING,
    ),
    Method(
        name="int4-weight-only",
        kind="quantize",
        apply=weight_only,
        options=WeightOnlyOptions,
        mutates=False,
        min_cosine=0.8,
        text_floor=_TEXT_4BIT,
        summary="block-wise INT4 MatMul/Gemm weights (RTN, MSE clipping search or GPTQ), DequantizeLinear or MatMulNBits",
        tuning=_INT4_TUNING,
    ),
    Method(
        name="int8-weight-only",
        kind="quantize",
        apply=partial(weight_only),
        options=Int8WeightOnlyOptions,
        mutates=False,
        min_cosine=0.98,
        text_floor=_TEXT_8BIT,
        summary="block-wise INT8 MatMul/Gemm weights, activations stay float",
    ),
    Method(
        name="mixed-precision",
        kind="quantize",
        apply=mixed_precision,
        options=MixedPrecisionOptions,
        mutates=False,
        min_cosine=0.8,
        text_floor=_TEXT_4BIT,
        requires={"calibration"},
        summary="per-layer int4 / int8 / float weights chosen by measured sensitivity per byte under target_size= or max_drop=",
    ),
    Method(
        name="fp16",
        kind="quantize",
        apply=fp16,
        options=Fp16Options,
        mutates=True,
        min_cosine=0.999,
        text_floor=_TEXT_FP16,
        summary="float16 compute and weights, fragile ops kept in float32",
        tuning=_FP16_TUNING,
    ),
    Method(
        name="codebook",
        kind="quantize",
        apply=codebook,
        options=CodebookOptions,
        mutates=True,
        requires_if={"fine_tune_epochs": "train"},
        min_cosine=0.8,
        text_floor=_TEXT_4BIT,
        summary="non-uniform: k-means weight sharing, uint8 indices + float codebook",
        tuning=_CODEBOOK_TUNING,
    ),
)


@hookimpl
def modelpress_register_methods(register):  # type: ignore[no-untyped-def]
    for method in _METHODS:
        register(method)
