"""Fast, size-aware sensitivity for ``int8-static``: O(1) ONNX Runtime sessions, not one per node.

1. **Local error, one pass.** One session runs the float model with, beside every candidate node,
   a *shadow* copy that reads the same float inputs through their Q/DQ and uses the quantized
   weights (and Q/DQ on its output when that gets quantized). The relative noise power
   ``||y_q - y||^2 / ||y||^2`` (1/SQNR) of each shadow output over the calibration samples scores
   every node at once.
2. **Size-aware ranking.** A node's priority for leaving full int8 is its noise per byte of float
   weight it would keep (nodes without weights cost nothing to leave), so a large Conv that is only
   a little noisy stays int8 while small noisy ops fall back first.
3. **Confirmation by bisection.** Whole-model evaluations over the ranked list find the fewest
   top-ranked nodes to move to the next-best integer form (per-channel int8 weight-only DQ: weights
   stay 8-bit, activations float) that meets the criteria; if that form misses too (the weights
   themselves are the problem), a second bisection moves the top-ranked ones to float instead. At most ``max_evaluations`` models
   are scored. When none of them meets the criteria, the best one judged (the smallest shortfall,
   :attr:`Judgement.loss`) is returned, marked ``met=False``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace

import numpy as np
import onnx_ir as ir

from modelpress.plugin_api import (
    Dataset,
    GraphBuilder,
    Judgement,
    Model,
    Out,
    PassContext,
    make_session,
)
from modelpress.plugin_api import run as run_session
from modelpress.plugins.quantize.evaluate import Unfinished
from modelpress.plugins.quantize.qdq import Planned

__all__ = ["Decision", "Ranking", "local_errors", "search"]

_SHADOW_SAMPLES = 32
# The bisection stops once the nodes it has not decided on hold at most this share of the weight bytes.
TOLERANCE = 0.02
# NOTE: one sample a run: the doubled graph's activations of a batch were the sensitivity pass's peak
# memory (PP-OCR-cls: +20 MB at 3 samples, +45 MB at 8), and per-run overhead is small beside them.
_SHADOW_BATCH = 1


@dataclass
class Decision:
    int8: list[str]
    weight_only: list[str]
    float_: list[str]
    judgement: Judgement
    model: Model
    evaluations: int
    errors: dict[str, float] = field(default_factory=dict)
    met: bool = True  # False: nothing judged met the criteria; this is the best candidate judged


def _qdq(
    b: GraphBuilder, value: ir.Value, scale: np.ndarray, zero: np.ndarray, tag: str
) -> ir.Value:
    s = b.initializer(np.asarray(scale, np.float32), f"{tag}_s")
    z = b.initializer(np.asarray(zero), f"{tag}_z")
    q = b.op("QuantizeLinear", [value, s, z], name=f"{tag}_Q", out=Out(f"{tag}_q"))
    return b.op(
        "DequantizeLinear", [q, s, z], name=f"{tag}_DQ", out=Out(f"{tag}_dq", ir.DataType.FLOAT)
    )


def _shadow_inputs(
    b: GraphBuilder, node: ir.Node, planned: Planned, tag: str
) -> list[ir.Value | None]:
    """``node``'s inputs as its shadow reads them: planned activations through Q/DQ, quantized
    constants and the quantized weight dequantized."""
    plan, act, per_channel = planned.plans[node.name], planned.act, planned.per_channel
    inputs = list(node.inputs)
    for index, value in enumerate(inputs):
        if value is None:
            continue
        if value.name in plan.act_ins and value.name in act:
            inputs[index] = _qdq(b, value, *act[value.name], f"{tag}_in{index}")  # type: ignore[call-arg]
        elif plan.constants and index in plan.constants:
            cq, cs, cz = plan.constants[index]
            c = [
                b.initializer(t, f"{tag}_{suffix}{index}")
                for t, suffix in ((cq, "c"), (cs, "cs"), (cz, "cz"))
            ]
            inputs[index] = b.op(
                "DequantizeLinear", c, name=f"{tag}_cdq{index}", out=Out(f"{tag}_c{index}_dq")
            )
    layer = plan.layer
    if layer is not None and plan.weight_q is not None:
        scale = np.asarray(plan.weight_scale, np.float32)
        zero = np.asarray(plan.weight_zero)
        w = [
            b.initializer(plan.weight_q, f"{tag}_w"),
            b.initializer(scale if per_channel else scale.reshape(()), f"{tag}_ws"),
            b.initializer(zero if per_channel else zero.reshape(()), f"{tag}_wz"),
        ]
        inputs[layer.weight_input] = b.op(
            "DequantizeLinear",
            w,
            {"axis": layer.out_axis} if per_channel else {},
            name=f"{tag}_wdq",
            out=Out(f"{tag}_w_dq"),
        )
    return inputs


def _error_powers(
    b: GraphBuilder, out: ir.Value, reference: ir.Value, tag: str
) -> tuple[ir.Value, ir.Value]:
    """The two scalars ``sum(reference^2)`` and ``sum((out - reference)^2)``.

    NOTE: the error is reduced in the graph (two scalars per node): the session never hands back, or holds
    for the caller, every node's full float and shadow activations (that was the sensitivity pass's peak RSS)."""
    diff = b.op(
        "Sub", [out, reference], name=f"{tag}_diff", out=Out(f"{tag}_diff", ir.DataType.FLOAT)
    )
    noise = b.op(
        "ReduceSumSquare",
        [diff],
        {"keepdims": 0},
        name=f"{tag}_noise",
        out=Out(f"{tag}_noise", ir.DataType.FLOAT),
    )
    signal = b.op(
        "ReduceSumSquare",
        [reference],
        {"keepdims": 0},
        name=f"{tag}_signal",
        out=Out(f"{tag}_signal", ir.DataType.FLOAT),
    )
    return signal, noise


def _shadow_model(planned: Planned, names: list[str]) -> tuple[Model, dict[str, tuple[str, str]]]:
    """The float model plus one quantized shadow per node; returns (model, {node: (signal power, noise power)}),
    the names of two scalar outputs per node: ``sum(y^2)`` and ``sum((y_q - y)^2)`` over the batch."""
    act = planned.act
    probe = planned.model.clone()
    graph = probe.ir.graph
    by_name = {n.name: n for n in graph}
    pairs: dict[str, tuple[str, str]] = {}
    placed: list[tuple[ir.Node, GraphBuilder]] = []
    for i, name in enumerate(names):
        node, plan = by_name[name], planned.plans[name]
        tag = f"__shadow{i}"
        b = probe.builder(prefix=tag)
        inputs = _shadow_inputs(b, node, planned, tag)
        attrs = {k: a.value for k, a in node.attributes.items()}
        out = b.op(
            node.op_type,
            inputs,
            attrs,
            domain=node.domain,
            name=f"{tag}_{node.op_type}",
            out=Out(f"{tag}_out", node.outputs[0].dtype),
        )
        reference = node.outputs[0]
        if plan.act_out == node.outputs[0].name and plan.act_out in act:
            out = _qdq(b, out, *act[plan.act_out], f"{tag}_out")  # type: ignore[call-arg]
        signal, noise = _error_powers(b, out, reference, tag)
        pairs[name] = (signal.name or "", noise.name or "")
        graph.outputs.extend([signal, noise])
        # NOTE: right after the node it shadows, so ORT runs it while the node's inputs and output are live
        # anyway (appended at the end, every activation of the model would stay live until then). The
        # constants are graph-level initializers (the builder adds them), so the shadow can sit anywhere.
        placed.append((node, b))
    for node, b in placed:
        b.insert(after=node)
    return probe, pairs


def local_errors(
    planned: Planned,
    names: list[str],
    data: Dataset,
    ctx: PassContext,
    *,
    batch_size: int = _SHADOW_BATCH,
) -> dict[str, float]:
    """Relative noise power (1/SQNR) of each node quantized alone, from one ORT session, run ``batch_size``
    samples at a time (at most ``_SHADOW_BATCH``: the peak memory of a run grows with it, its speed hardly)."""
    batch_size = max(1, min(batch_size, _SHADOW_BATCH))
    probe, pairs = _shadow_model(planned, names)
    session = make_session(probe, spin=False)
    index = {o.name: i for i, o in enumerate(session.get_outputs())}
    signal = dict.fromkeys(names, 0.0)
    noise = dict.fromkeys(names, 0.0)
    sample = data.take(min(len(data), _SHADOW_SAMPLES))
    with ctx.progress("layer sensitivity", total=-(-len(sample) // batch_size)) as advance:
        for feeds in sample.batches(batch_size):
            outs = run_session(session, feeds)
            for name, (power, error) in pairs.items():
                signal[name] += float(outs[index[power]])
                noise[name] += (
                    float(outs[index[error]]) if np.isfinite(outs[index[error]]) else float("inf")
                )
            advance(1)
    return {n: noise[n] / max(signal[n], 1e-30) for n in names}


@dataclass(frozen=True)
class Ranking:
    """What the search ranks: the candidate nodes in graph order, each one's local error (1/SQNR) and
    the bytes of float weight it would keep off int8."""

    order: list[str]
    errors: dict[str, float]
    weight_bytes: dict[str, int]


def search(
    ranking: Ranking,
    build: Callable[[list[str], list[str]], Model],
    score: Callable[[Model], Judgement],
    ctx: PassContext,
    *,
    max_evaluations: int = 12,
    weight_only_first: Collection[str] | None = None,
    finish: Callable[[Model], Judgement] | None = None,
) -> Decision | None:
    """The fewest top-ranked nodes to move out of full int8 that meets the criteria: first the weighted
    nodes of ``weight_only_first`` (None: every weighted node) to int8 weight-only and the others to
    float, then all to float; ``build(int8_nodes, weight_only_nodes)`` makes a candidate. If nothing
    met, the best candidate judged (``met=False``); None if none was judged.

    With ``finish``, candidates are scored with ``score(candidate, stop_early=True)``: a sweep ends
    once its first samples decide a miss (:class:`.evaluate.Unfinished`). Only when no candidate
    meets the criteria are those finished (``finish``, on the candidate built again), so the best
    one judged is the one a full sweep of every candidate would have returned."""
    order, errors, weight_bytes = ranking.order, ranking.errors, ranking.weight_bytes
    # NOTE: 1 KiB floor: a node without weights is not free to leave (its int8 kernel saves time), just cheap.
    ranked = sorted(order, key=lambda n: errors[n] / (weight_bytes.get(n, 0) + 1024), reverse=True)
    bisection = _Bisection(ranked, errors, weight_bytes, build, score, ctx, finish)
    weighted = {n for n in ranked if weight_bytes.get(n, 0) > 0}
    if weight_only_first is not None:
        weighted &= set(weight_only_first)
    best: Decision | None = None
    if weighted:

        def stage1(k: int) -> tuple[list[str], list[str], list[str]]:
            top = set(ranked[:k])
            return (
                [n for n in order if n not in top],
                [n for n in order if n in top and n in weighted],
                [n for n in order if n in top and n not in weighted],
            )

        best = bisection.run(stage1, max_evaluations // 2, known_met=False)
    if best is None:

        def stage2(k: int) -> tuple[list[str], list[str], list[str]]:
            top = set(ranked[:k])
            return [n for n in order if n not in top], [], [n for n in order if n in top]

        best = bisection.run(stage2, max_evaluations - bisection.evaluations, known_met=True)
    if best is None and bisection.best is not None:
        best = replace(bisection.settled(), met=False)
    bisection.best = None
    if best is not None:
        best.evaluations = bisection.evaluations
    return best


Split = Callable[
    [int], tuple[list[str], list[str], list[str]]
]  # k -> (int8, weight-only, float) nodes


class _Bisection:
    """Bisection over the length k of the ranked list's prefix that leaves full int8."""

    def __init__(
        self,
        ranked: list[str],
        errors: dict[str, float],
        weight_bytes: dict[str, int],
        build: Callable[[list[str], list[str]], Model],
        score: Callable[..., Judgement],
        ctx: PassContext,
        finish: Callable[[Model], Judgement] | None = None,
    ):
        self.ranked, self.errors, self.build, self.score, self.ctx = (
            ranked,
            errors,
            build,
            score,
            ctx,
        )
        self.finish = finish
        # NOTE: every candidate that missed, in order, without its model: (int8, weight-only, float, judgement)
        self.missed: list[tuple[list[str], list[str], list[str], Judgement]] = []
        self.total = max(sum(weight_bytes.values()), 1)
        self.cost = np.cumsum(
            [0] + [weight_bytes.get(n, 0) for n in ranked]
        )  # cost[k]: weight bytes of the top k
        self.evaluations = 0
        self.best: Decision | None = (
            None  # NOTE: the candidate judged closest to the criteria (kept only while none met)
        )

    def judge(self, make: Split, k: int) -> Decision | None:
        int8, wo, flt = make(k)
        candidate = self.build(int8, wo)
        judgement = (
            self.score(candidate) if self.finish is None else self.score(candidate, stop_early=True)
        )
        self.evaluations += 1
        decision = Decision(int8, wo, flt, judgement, candidate, 0, self.errors)
        if judgement.met:
            self.best = None
            return decision
        self.missed.append((int8, wo, flt, judgement))
        if self.best is None or (
            not self.best.judgement.met and judgement.loss < self.best.judgement.loss
        ):
            self.best = decision
        return None

    def settled(self) -> Decision:
        """The best candidate judged, when none met: :attr:`best` once the candidates whose sweep
        stopped early are finished (built again), the first of the smallest loss as :meth:`judge` keeps it."""
        assert self.best is not None
        if self.finish is None or not any(isinstance(m[3], Unfinished) for m in self.missed):
            return self.best
        best: tuple[list[str], list[str], list[str], Judgement] | None = None
        best_model: Model | None = None
        for int8, wo, flt, judgement in self.missed:
            model = None
            if isinstance(judgement, Unfinished):
                model = self.build(int8, wo)
                judgement = self.finish(model)
            if best is None or judgement.loss < best[3].loss:
                best, best_model = (int8, wo, flt, judgement), model
        assert best is not None
        if best[3] is self.best.judgement:
            return self.best
        model = best_model if best_model is not None else self.build(best[0], best[1])
        return Decision(best[0], best[1], best[2], best[3], model, 0, self.errors)

    def run(self, make: Split, budget: int, known_met: bool) -> Decision | None:
        """The smallest k whose candidate meets the criteria, in at most ``budget`` judgements. Unless
        ``known_met`` the whole list is judged first: if even that misses, this form cannot meet the
        criteria (and the budget goes to the next form). ``known_met``: the whole list in this form is the
        float model, judged only if nothing smaller meets."""
        low, high, found = 1, len(self.ranked), None
        start = self.evaluations
        with self.ctx.progress("confirming", total=budget) as advance:
            if not known_met:
                found = self.judge(make, high)
                advance(1)
                if found is None:
                    return None
            high -= 1
            while low <= high and self.evaluations - start < budget - (
                0 if found is not None or not known_met else 1
            ):
                # NOTE: size-aware stop: once the nodes still undecided hold <= TOLERANCE of the weight bytes,
                # more whole-model runs could only move those few bytes back to int8
                if (
                    found is not None
                    and self.cost[high + 1] - self.cost[low - 1] <= TOLERANCE * self.total
                ):
                    break
                k = (low + high) // 2
                decision = self.judge(make, k)
                advance(1)
                if decision is not None:
                    found, high = decision, k - 1
                else:
                    low = k + 1
            if found is None and known_met and self.evaluations - start < budget:
                found = self.judge(make, len(self.ranked))
                advance(1)
        return found
