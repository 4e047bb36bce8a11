"""Channel dependency analysis and physical channel removal.

Removing output channel ``c`` of a Conv/Gemm/MatMul changes every tensor that carries that
channel, up to the layers that *consume* it. Tensors that must keep the same channels form a
*channel space*, found with a union-find over the graph:

* value-preserving ops (Relu and other activations, BatchNormalization, pooling, Dropout,
  depthwise Conv, Add/Sub/Mul with a per-channel constant) keep their input's channels;
* a residual ``Add``/``Sub``/``Mul`` of two activations joins both inputs and its output into one
  space: channels coupled across a residual are pruned together or not at all;
* a ``Concat`` along the channel axis makes each input a slice of its output's channels.

A space is prunable when every tensor in it is produced by a weighted layer (a *source*) or a
value-preserving op, and every other consumer is a *sink* that can drop input channels: a
Conv (group 1), a Gemm/MatMul with a constant weight, or Flatten/Reshape feeding one. Graph
inputs/outputs, other ops and Concat (conservatively) block a space.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from modelpress.plugin_api import Model, WeightedLayer

__all__ = ["ChannelSpace", "find_spaces", "remove_channels"]

_UNARY = {
    "Relu",
    "LeakyRelu",
    "Sigmoid",
    "Tanh",
    "HardSwish",
    "HardSigmoid",
    "Clip",
    "Elu",
    "Selu",
    "Gelu",
    "Erf",
    "Softplus",
    "Mish",
    "Identity",
    "Dropout",
    "Neg",
    "Abs",
}
_POOLS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"}
_BINARY = {"Add", "Sub", "Mul", "Div"}


@dataclass
class ChannelSpace:
    """Tensors sharing one set of channels, and what must change when channels are removed."""

    tensors: set[str] = field(default_factory=set)
    axis: int = 1
    sources: list[WeightedLayer] = field(default_factory=list)
    batchnorms: list[ir.Node] = field(default_factory=list)
    depthwise: list[ir.Node] = field(default_factory=list)
    channel_constants: list[tuple[ir.Node, int]] = field(default_factory=list)
    sinks: list[tuple[str, ir.Node, int]] = field(
        default_factory=list
    )  # (kind, node, spatial size)
    blockers: list[str] = field(default_factory=list)
    channels: int = 0

    @property
    def prunable(self) -> bool:
        return bool(self.sources) and not self.blockers and self.channels > 1

    @property
    def name(self) -> str:
        return "+".join(layer.name for layer in self.sources) or "?"


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)


def _dims(value: ir.Value) -> tuple[int, ...]:
    """The static shape of a constant (initializers always have one)."""
    assert value.const_value is not None
    return tuple(int(d) for d in value.const_value.shape.numpy())


def _is_depthwise(node: ir.Node) -> bool:
    w = node.inputs[1] if len(node.inputs) > 1 else None
    group = node.attributes.get("group")
    if w is None or w.const_value is None or group is None:
        return False
    shape = _dims(w)
    return int(group.as_int()) > 1 and shape[1] == 1 and shape[0] == int(group.as_int())


def _channel_const(
    value: ir.Value | None, channels: int | None, axis: int, rank: int | None
) -> bool:
    """A constant that broadcasts one value per channel (or one value for all)."""
    if value is None or value.const_value is None:
        return False
    shape = _dims(value)
    if int(np.prod(shape)) == 1:
        return True
    if channels is None or rank is None:
        return False
    target = [1] * rank
    target[axis] = channels
    return len(shape) <= rank and shape == tuple(target[rank - len(shape) :])


@dataclass
class _Index:
    """What channel analysis reads of the graph: each tensor's producer and rank, the candidate
    source layers by output tensor, the value-preserving outputs (joined to their inputs' spaces
    in ``uf``) and the graph's inputs and outputs."""

    producers: dict[str, ir.Node]
    rank_of: dict[str, int | None]
    source_of: dict[str, WeightedLayer]
    preserving: dict[str, str]  # output tensor -> the op that keeps its input's channels
    uf: _UnionFind
    graph_inputs: set[str]
    graph_outputs: set[str]
    layer_names: dict[int, str] = field(
        default_factory=dict
    )  # id(node) -> every weighted layer's name


def _index(graph: ir.Graph, layers: list[WeightedLayer]) -> _Index:
    producers: dict[str, ir.Node] = {}
    for node in graph:
        for out in node.outputs:
            if out.name:
                producers[out.name] = node
    source_of = {
        layer.node.outputs[0].name: layer
        for layer in layers
        if layer.op_type in ("Conv", "Gemm", "MatMul")
    }
    source_of = {
        k: v for k, v in source_of.items() if k and not (v.op_type == "Conv" and v.group != 1)
    }
    rank_of: dict[str, int | None] = {}
    for node in graph:
        for v in [*node.inputs, *node.outputs]:
            if v is not None and v.name:
                rank_of[v.name] = len(v.shape) if v.shape is not None else None
    uf = _UnionFind()
    preserving = _join_preserving(graph, uf)
    return _Index(
        producers,
        rank_of,
        source_of,
        preserving,
        uf,
        {v.name for v in graph.inputs if v.name},
        {v.name for v in graph.outputs if v.name},
    )


def _join_preserving(graph: ir.Graph, uf: _UnionFind) -> dict[str, str]:
    """Join the output of every value-preserving op to its input's space (both activations of a
    residual Add/Sub/Mul/Div); returns {output tensor: op}."""
    preserving: dict[str, str] = {}
    for node in graph:
        if not node.outputs or not node.outputs[0].name:
            continue
        out = node.outputs[0].name
        first = node.inputs[0] if node.inputs else None
        if first is None or not first.name:
            continue
        op = node.op_type
        if (
            op in _UNARY
            or op in _POOLS
            or op == "BatchNormalization"
            or (op == "Conv" and _is_depthwise(node))
        ):
            uf.union(first.name, out)
            preserving[out] = op
        elif op in _BINARY and len(node.inputs) == 2:
            a, b = node.inputs
            if (
                a is not None
                and b is not None
                and a.const_value is None
                and b.const_value is None
                and a.name
                and b.name
            ):
                uf.union(a.name, out)
                uf.union(b.name, out)
                preserving[out] = op
            elif (
                a is not None
                and a.const_value is None
                and a.name
                and b is not None
                and b.const_value is not None
            ):
                uf.union(a.name, out)
                preserving[out] = op
    return preserving


def find_spaces(model: Model, layers: list[WeightedLayer]) -> list[ChannelSpace]:
    """The channel spaces of the model whose sources are among ``layers``."""
    index = _index(model.graph, layers)
    index.layer_names = {id(x.node): x.name for x in model.weighted_layers()}
    uf = index.uf
    spaces: dict[str, ChannelSpace] = {}
    for tensor, layer in index.source_of.items():
        root = uf.find(tensor)
        space = spaces.setdefault(root, ChannelSpace(axis=1 if layer.op_type == "Conv" else -1))
        space.sources.append(layer)
    if not spaces:
        return []
    members: dict[str, set[str]] = {}
    for name in set(uf.parent) | set(index.source_of):
        members.setdefault(uf.find(name), set()).add(name)
    for root, space in spaces.items():
        space.tensors = members.get(root, set())
        _check_sources(space)
        for tensor in space.tensors:
            _check_tensor(space, tensor, index)
            _check_consumers(space, root, tensor, index, model)
    return list(spaces.values())


def _check_sources(space: ChannelSpace) -> None:
    """The space's channel count (its first source's); sources that disagree on it, or that mix
    convolution and matrix channels, block it."""
    first = space.sources[0]
    w = first.weight.const_value
    assert w is not None
    space.channels = int(w.shape[first.out_axis])
    for layer in space.sources:
        lw = layer.weight.const_value
        if lw is not None and int(lw.shape[layer.out_axis]) != space.channels:
            space.blockers.append(
                f"{layer.name} has a different channel count"
            )  # NOTE: a layer: its own name
        if (layer.op_type == "Conv") != (space.axis == 1):
            space.blockers.append("mixes convolution and matrix channels")


def _check_tensor(space: ChannelSpace, tensor: str, index: _Index) -> None:
    """Block the space at a model input/output or a tensor no source or value-preserving op
    produced; note the BatchNorms, depthwise Convs and per-channel constants that must be cut too."""
    if tensor in index.graph_inputs:
        space.blockers.append(f"the channels are those of the model input {tensor}")
    if tensor in index.graph_outputs:
        space.blockers.append(f"the channels are those of the model output {tensor}")
    producer = index.producers.get(tensor)
    if (
        tensor not in index.source_of
        and tensor not in index.preserving
        and tensor not in index.graph_inputs
    ):
        space.blockers.append(
            f"the channels also come from {_describe(producer, index) if producer else 'outside the graph'}, which cannot drop any"
        )
    if producer is None or tensor not in index.preserving:
        return
    op = producer.op_type
    if op == "BatchNormalization":
        space.batchnorms.append(producer)
    elif op == "Conv":
        space.depthwise.append(producer)
    elif op in _BINARY:
        rank = index.rank_of.get(tensor)
        for i, v in enumerate(producer.inputs):
            if v is not None and v.const_value is not None:
                if _channel_const(v, space.channels, space.axis % max(rank or 2, 1), rank):
                    if int(np.prod(_dims(v))) > 1:
                        space.channel_constants.append((producer, i))
                else:
                    space.blockers.append(
                        f"{_describe(producer, index)} has a constant that is not per-channel"
                    )


def _describe(node: ir.Node, index: _Index) -> str:
    """``node`` as the user knows it. A weighted layer by its name (the source framework's, given on
    import: ``conv2``, ``features.0``). Another op by what it is and the layers around it (``a Transpose
    between conv2 and fc1``, ``a Softmax after probs``): exporters name those nodes after themselves
    (``Transpose__30``, ``node_Softmax_12``), names the user never gave. Its own name when no layer is near."""
    name = index.layer_names.get(id(node))
    if name is not None:
        return f"{name} ({node.op_type})"
    before, after = _layer_before(node, index), _layer_after(node, index)
    if before and after:
        return f"a {node.op_type} between {before} and {after}"
    if before or after:
        return f"a {node.op_type} {'after ' + before if before else 'before ' + after}"  # type: ignore[operator]
    return f"{node.op_type} {node.name}"


_NEAR = 16  # NOTE: how many ops to walk looking for a layer (a flatten-reshape chain is 5-8)


def _layer_before(node: ir.Node, index: _Index) -> str | None:
    """The weighted layer whose output reaches ``node`` first, along each op's first non-constant input."""
    current = node
    for _ in range(_NEAR):
        value = next((v for v in current.inputs if v is not None and v.const_value is None), None)
        producer = index.producers.get(value.name or "") if value is not None else None
        if producer is None:
            return None
        if id(producer) in index.layer_names:
            return index.layer_names[id(producer)]
        current = producer
    return None


def _layer_after(node: ir.Node, index: _Index) -> str | None:
    """The first weighted layer ``node``'s outputs reach (breadth first)."""
    frontier, seen = [node], {id(node)}
    for _ in range(_NEAR):
        following = []
        for current in frontier:
            for out in current.outputs:
                for user, _position in out.uses():
                    if id(user) in index.layer_names:
                        return index.layer_names[id(user)]
                    if id(user) not in seen:
                        seen.add(id(user))
                        following.append(user)
        frontier = following
    return None


def _check_consumers(
    space: ChannelSpace, root: str, tensor: str, index: _Index, model: Model
) -> None:
    """Classify each reader of ``tensor`` outside the space as a sink or a blocker."""
    producer = index.producers.get(tensor)
    value = next(
        (v for v in (producer.outputs if producer is not None else []) if v.name == tensor), None
    )
    if value is None:
        value = next((v for v in model.graph.inputs if v.name == tensor), None)
    if value is None:
        return
    for user, position in value.uses():
        out = user.outputs[0].name if user.outputs else None
        if out in index.preserving and index.uf.find(out or "") == root:
            continue  # stays in the space
        _classify_sink(space, user, position, value, index)


def _classify_sink(
    space: ChannelSpace, user: ir.Node, index: int, value: ir.Value, graph: _Index
) -> None:
    op = user.op_type
    where = _describe(user, graph)
    weight = user.inputs[1] if len(user.inputs) > 1 else None
    if index != 0 or (
        op in ("Conv", "Gemm", "MatMul") and (weight is None or weight.const_value is None)
    ):
        space.blockers.append(f"{where} takes the channels as its input {index}")
        return
    if (
        op == "Conv"
        and user.attributes.get("group", ir.AttrInt64("group", 1)).as_int() == 1
        and space.axis == 1
    ):
        space.sinks.append(("conv", user, 1))
    elif op in ("Gemm", "MatMul") and space.axis == -1:
        if (
            op == "Gemm"
            and user.attributes.get("transA") is not None
            and user.attributes["transA"].as_int()
        ):
            space.blockers.append(f"{where} has transA")
        else:
            space.sinks.append(("fc", user, 1))
    elif op in ("Flatten", "Reshape") and space.axis == 1:
        out = user.outputs[0]
        consumers = list(out.uses())
        shape = value.shape
        if shape is None or any(not isinstance(d, int) for d in list(shape)[2:]):
            space.blockers.append(f"{where} flattens a spatial size that is not static")
            return
        spatial = int(np.prod(np.asarray(list(shape)[2:], np.int64))) if len(shape) > 2 else 1
        fcs = [
            u
            for u, i in consumers
            if u.op_type in ("Gemm", "MatMul")
            and i == 0
            and len(u.inputs) > 1
            and u.inputs[1] is not None
            and u.inputs[1].const_value is not None
        ]
        if (
            len(fcs) != len(consumers)
            or not fcs
            or (
                op == "Flatten"
                and user.attributes.get("axis", ir.AttrInt64("axis", 1)).as_int() != 1
            )
        ):
            space.blockers.append(f"{where} does not feed a dense (fully connected) layer")
            return
        for fc in fcs:
            space.sinks.append(("flat", fc, spatial))
        if op == "Reshape":
            space.sinks.append(("reshape", user, spatial))
    else:
        space.blockers.append(f"{where} needs every channel")


def _take(
    value: ir.Value, keep: np.ndarray, axis: int, model: Model, *, per_block: int = 1
) -> None:
    tensor = value.const_value
    assert tensor is not None
    array = tensor.numpy()
    if per_block > 1:
        index = (keep[:, None] * per_block + np.arange(per_block)[None, :]).reshape(-1)
    else:
        index = keep
    model.replace_initializer(value.name or "", np.take(array, index, axis=axis))


def remove_channels(model: Model, space: ChannelSpace, keep: np.ndarray) -> dict[str, int]:
    """Physically keep only channels ``keep`` in ``space`` (edits ``model`` in place)."""
    keep = np.sort(np.asarray(keep, np.int64))
    removed = space.channels - len(keep)
    for layer in space.sources:
        _take(layer.weight, keep, layer.out_axis, model)
        if layer.bias is not None:
            _take(layer.bias, keep, 0, model)
    for bn in space.batchnorms:
        for v in bn.inputs[1:5]:
            if v is not None and v.const_value is not None:
                _take(v, keep, 0, model)
    for conv in space.depthwise:
        _take(conv.inputs[1], keep, 0, model)  # type: ignore[arg-type]
        if len(conv.inputs) > 2 and conv.inputs[2] is not None:
            _take(conv.inputs[2], keep, 0, model)
        conv.attributes["group"] = ir.AttrInt64("group", len(keep))
    for node, index in space.channel_constants:
        value = node.inputs[index]
        assert value is not None and value.const_value is not None
        dims = _dims(value)
        axis = (
            next(i for i, d in enumerate(dims) if d == space.channels)
            if space.axis == 1
            else len(dims) - 1
        )
        _take(value, keep, axis, model)
    for kind, node, spatial in space.sinks:
        if kind == "conv":
            _take(node.inputs[1], keep, 1, model)  # type: ignore[arg-type]
        elif kind in ("fc", "flat"):
            layer = next(x for x in model.weighted_layers() if x.node is node)
            _take(layer.weight, keep, layer.in_axis, model, per_block=spatial)
        elif kind == "reshape":
            shape_v = node.inputs[1]
            if shape_v is not None and shape_v.const_value is not None:
                target = shape_v.const_value.numpy().copy()
                flat = np.where(target == space.channels * spatial)[0]
                if len(flat):
                    target[flat[0]] = len(keep) * spatial
                    model.replace_initializer(shape_v.name or "", target)
    return {"removed": removed, "kept": len(keep)}
