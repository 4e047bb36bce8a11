"""Function-preserving rewrites of the float graph that leave fewer float ops beside ONNX Runtime's
integer kernels (each is exact in real arithmetic; results differ by float rounding only).

- A decomposed LayerNorm (``ReduceMean -> Sub -> square -> ReduceMean -> Add eps -> Sqrt -> Div ->
  Mul gamma -> Add beta``, as older exporters write it) becomes one ``LayerNormalization`` (opset 17+):
  ORT fuses only its ``Pow`` form itself, and runs the nine element-wise ops otherwise.
- Attention biases ORT does not fuse into its integer MatMul (``MatMulIntegerToFloat`` from QDQ
  takes no bias): the key projection's bias is dropped (it adds ``q . b_k`` to every score of a
  query row, a shift Softmax over the keys ignores), and the value projection's bias moves into the
  output projection's (each row of a softmax sums to 1, so ``P (V + b_v) = P V + b_v``, and
  ``(c + b_v) W_o + b_o = c W_o + (b_v W_o + b_o)``).
- SmoothQuant's ``Mul`` by ``1/s`` (:func:`fold_scale`) goes into what computes its input where
  every step between commutes with per-channel scaling: a weight's output columns (and bias), a
  LayerNorm's gamma and beta, a constant Mul/Div/Add, through Reshape/Transpose and an attention
  ``P . V`` product (into V's projection). A value something else also reads stops the fold, as in
  SmoothQuant: scaling it would change that reader too.

Per-channel vectors are carried as arrays broadcast against the tensor (rank kept, 1 on the axes
they do not vary on); a Reshape is crossed only where it splits or merges trailing axes of known size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod

import numpy as np
import onnx_ir as ir

from modelpress.plugin_api import Model, Out

__all__ = [
    "fold_scale",
    "fuse_layer_norms",
    "may_fold",
    "move_attention_biases",
    "move_residual_biases",
]

_MAX_STEPS = 32


# -- per-channel vectors through layout ops ------------------------------------------------------
def may_fold(model: Model) -> bool:
    """Whether one of this module's graph rewrites may apply to ``model``: each starts from a node of
    these types (:func:`fuse_layer_norms` a ReduceMean at opset 17+, :func:`move_attention_biases` a
    Softmax, :func:`move_residual_biases` a LayerNormalization), so a caller need not clone a graph
    without them to find nothing. A new rewrite adds the op it starts from here."""
    kinds = {"Softmax", "LayerNormalization"} | ({"ReduceMean"} if model.opset >= 17 else set())
    return any(node.op_type in kinds for node in model.graph)


def _tail(shape: ir.Shape | None, k: int) -> list[int] | None:
    if shape is None or k > len(shape):
        return None
    dims = list(shape)[len(shape) - k :]
    return [int(d) for d in dims] if all(isinstance(d, int) for d in dims) else None  # type: ignore[arg-type]


def _reshaped(v: np.ndarray, src: ir.Shape | None, dst: ir.Shape | None) -> np.ndarray | None:
    """``v`` (broadcast against a tensor of shape ``src``) for the same data reshaped to ``dst``; None
    where the reshape mixes the axes ``v`` varies on with others, or the sizes are not known."""
    if src is None or dst is None or v.ndim != len(src):
        return None
    varying = [i for i, n in enumerate(v.shape) if n != 1]
    first = min(varying) if varying else v.ndim - 1
    for k_in in range(v.ndim - first, v.ndim + 1):
        tail = _tail(src, k_in)
        if tail is None:
            return None
        for k_out in range(1, len(dst) + 1):
            out_tail = _tail(dst, k_out)
            if out_tail is None or prod(out_tail) > prod(tail):
                break
            if prod(out_tail) == prod(tail):
                block = np.broadcast_to(v.reshape(v.shape[v.ndim - k_in :]), tail)
                return block.reshape([1] * (len(dst) - k_out) + out_tail)
    return None


def _through(node: ir.Node, v: np.ndarray, *, forward: bool) -> np.ndarray | None:
    """``v`` carried across a Reshape/Transpose ``node``, forward (input -> output) or back."""
    src, dst = node.inputs[0], node.outputs[0]
    if node.op_type == "Transpose" and src is not None:
        attr = node.attributes.get("perm")
        perm = list(attr.value) if attr is not None else list(range(v.ndim))[::-1]
        if len(perm) != v.ndim:
            return None
        return v.transpose(perm) if forward else v.transpose(np.argsort(perm))
    if node.op_type == "Reshape" and src is not None:
        return _reshaped(v, src.shape, dst.shape) if forward else _reshaped(v, dst.shape, src.shape)
    return None


def _const(value: ir.Value | None) -> np.ndarray | None:
    return (
        value.const_value.numpy() if value is not None and value.const_value is not None else None
    )


def _only_reader(value: ir.Value | None, reader: ir.Node) -> bool:
    """Whether ``reader`` is the one node reading ``value`` (and it is no graph output)."""
    if value is None or value.is_graph_output():
        return False
    users = Model.consumers(value)
    return len(users) == 1 and users[0] is reader


def _last_axis(v: np.ndarray) -> np.ndarray | None:
    """``v`` as a vector over the last axis; None where it varies on another axis too."""
    return v.reshape(-1) if all(n == 1 for n in v.shape[:-1]) else None


def _set_const(model: Model, node: ir.Node, index: int, array: np.ndarray) -> None:
    """Give ``node``'s constant input ``index`` the values ``array`` (a new initializer where others read the old one)."""
    value = node.inputs[index]
    assert value is not None and value.const_value is not None
    old = value.const_value.numpy()
    array = np.asarray(array, old.dtype)
    if array.size == old.size:
        array = array.reshape(old.shape)
    if value.name and value.is_initializer() and len(list(value.uses())) == 1:
        model.replace_initializer(value.name, array)
    else:
        node.replace_input_with(index, model.add_initializer(f"{value.name or 'c'}_folded", array))


def _bypass(model: Model, node: ir.Node, keep: ir.Value) -> None:
    """Remove the one-output ``node``: its readers read ``keep`` instead."""
    out = node.outputs[0]
    name = out.name
    out.replace_all_uses_with(keep, replace_graph_outputs=True)
    model.graph.remove(node, safe=True)
    if keep.is_graph_output():
        keep.name = name


# -- SmoothQuant's scale into its producer -------------------------------------------------------
@dataclass
class _Fold:
    """A scale fold being planned: the per-channel factor ``v`` at the current value, and the
    constant edits ``(node, input index, new values)`` applied once the whole chain qualifies."""

    model: Model
    frozen: frozenset[str]
    v: np.ndarray
    edits: list[tuple[ir.Node, int, np.ndarray]] = field(default_factory=list)

    def weight(self, node: ir.Node, columns_axis: int) -> bool:
        w, last = _const(node.inputs[1]), _last_axis(self.v)
        name = node.inputs[1].name if node.inputs[1] is not None else None
        if w is None or w.ndim != 2 or last is None or name in self.frozen:
            return False
        if last.size not in (1, w.shape[columns_axis]):
            return False
        shape = [1, 1]
        shape[columns_axis] = -1
        self.edits.append(
            (node, 1, w * np.broadcast_to(last, [w.shape[columns_axis]]).reshape(shape))
        )
        if len(node.inputs) > 2 and (c := _const(node.inputs[2])) is not None:
            self.edits.append((node, 2, c * last))
        return True

    def absorb(self, node: ir.Node) -> bool | ir.Value:
        """Fold into ``node`` (True), step back to the value it reads (that value), or refuse (False)."""
        op, inputs = node.op_type, node.inputs
        consts = [i for i, x in enumerate(inputs) if _const(x) is not None]
        if op in ("Transpose", "Reshape"):
            back = _through(node, self.v, forward=False)
            if back is None:
                return False
            self.v = back
            return inputs[0] or False
        if op == "MatMul":
            if consts == [1]:
                return self.weight(node, 1)
            if consts or self.v.ndim < 2 or self.v.shape[-2] != 1 or inputs[1] is None:
                return False
            return (
                inputs[1]
                if inputs[1].shape is not None and len(inputs[1].shape) == self.v.ndim
                else False
            )
        if op == "Gemm" and 1 in consts:
            trans = node.attributes.get("transB")
            return self.weight(node, 0 if trans is not None and trans.value else 1)
        if op == "LayerNormalization":
            return self._layer_norm(node)
        if op in ("Mul", "Div", "Add", "Sub") and len(consts) == 1 and len(inputs) == 2:
            c = _const(inputs[consts[0]])
            assert c is not None
            if op == "Div" and consts == [0]:
                return False
            self.edits.append((node, consts[0], c / self.v if op == "Div" else c * self.v))
            return True if op in ("Mul", "Div") else inputs[1 - consts[0]] or False
        return False

    def _layer_norm(self, node: ir.Node) -> bool:
        axis = node.attributes.get("axis")
        rank = len(node.outputs[0].shape) if node.outputs[0].shape is not None else None
        last = _last_axis(self.v)
        if last is None or (axis is not None and axis.value not in (-1, (rank or 0) - 1)):
            return False
        for index in (1, 2):
            if len(node.inputs) > index and (c := _const(node.inputs[index])) is not None:
                self.edits.append((node, index, c * last))
        return True


def fold_scale(model: Model, mul: ir.Node, frozen: frozenset[str] = frozenset()) -> bool:
    """Fold ``mul`` (an activation times a constant per-channel vector over its last axis) into what
    computes the activation, and remove it. Refused (False, nothing changed) where a value on the
    way has another reader or the chain reaches no weight/LayerNorm/constant op; weights named in
    ``frozen`` are never rescaled."""
    consts = [i for i, x in enumerate(mul.inputs) if _const(x) is not None]
    x = mul.inputs[1 - consts[0]] if consts == [1] or consts == [0] else None
    if x is None or x.shape is None or not _only_reader(x, mul):
        return False
    scale = _const(mul.inputs[consts[0]])
    assert scale is not None
    if scale.ndim > len(x.shape) or np.any(scale <= 0):
        return False
    fold = _Fold(
        model, frozen, scale.reshape([1] * (len(x.shape) - scale.ndim) + list(scale.shape))
    )
    value, reader = x, mul
    for _ in range(_MAX_STEPS):
        producer = value.producer()
        if producer is None or not _only_reader(value, reader):
            return False
        step = fold.absorb(producer)
        if step is False:
            return False
        if step is True:
            for node, index, array in fold.edits:
                _set_const(model, node, index, array)
            _bypass(model, mul, x)
            return True
        assert isinstance(step, ir.Value)
        value, reader = step, producer
    return False


# -- attention biases ------------------------------------------------------------------------------
def _softmax_last(node: ir.Node, opset: int) -> bool:
    """Whether ``node`` is a Softmax over its last axis."""
    out = node.outputs[0]
    rank = len(out.shape) if out.shape is not None else None
    attr = node.attributes.get("axis")
    axis = attr.value if attr is not None else (-1 if opset >= 13 else 1)
    return node.op_type == "Softmax" and (axis == -1 or (rank is not None and axis == rank - 1))


def _bias_behind(value: ir.Value, reader: ir.Node) -> tuple[ir.Node, int, np.ndarray] | None:
    """The ``Add(y, bias)`` that ``value`` is computed from through Reshape/Transpose only, each step
    read by nothing else: ``(add, index of the bias input, the bias broadcast against value)``."""
    chain: list[ir.Node] = []
    for _ in range(_MAX_STEPS):
        producer = value.producer()
        if producer is None or not _only_reader(value, reader):
            return None
        if producer.op_type in ("Transpose", "Reshape"):
            chain.append(producer)
            value, reader = producer.inputs[0], producer  # type: ignore[assignment]
            if value is None:
                return None
            continue
        consts = [i for i, x in enumerate(producer.inputs) if _const(x) is not None]
        out = producer.outputs[0]
        if producer.op_type != "Add" or len(consts) != 1 or out.shape is None:
            return None
        bias = _const(producer.inputs[consts[0]])
        assert bias is not None
        if bias.ndim > len(out.shape):
            return None
        v: np.ndarray | None = bias.reshape([1] * (len(out.shape) - bias.ndim) + list(bias.shape))
        for node in reversed(chain):
            v = _through(node, v, forward=True) if v is not None else None
        return (producer, consts[0], v) if v is not None else None
    return None


def _scores_matmul(softmax: ir.Node) -> ir.Node | None:
    """The ``Q @ K^T`` MatMul whose scores ``softmax`` normalises: back through Adds (the mask) and
    Mul/Div by a scalar, each read by nothing else, which all keep a shift per row a shift per row."""
    value, reader = softmax.inputs[0], softmax
    for _ in range(8):
        producer = value.producer() if value is not None else None
        if producer is None or not _only_reader(value, reader):
            return None
        consts = [i for i, x in enumerate(producer.inputs) if _const(x) is not None]
        if producer.op_type == "MatMul" and not consts:
            return producer
        if producer.op_type == "Add" and len(producer.inputs) == 2:
            value = producer.inputs[0]  # NOTE: the mask comes second in exporters' graphs
        elif (
            producer.op_type in ("Mul", "Div")
            and consts == [1]
            and _const(producer.inputs[1]).size == 1  # type: ignore[union-attr]
        ):  # type: ignore[union-attr]
            value = producer.inputs[0]
        else:
            return None
        reader = producer
    return None


def _output_bias(value: ir.Value, v: np.ndarray) -> tuple[ir.Node, int, np.ndarray] | None:
    """Where a bias ``v`` added to ``value`` ends up: forward through Reshape/Transpose (each the one
    reader) into a MatMul with a constant 2-D weight followed by an Add of a constant bias:
    ``(that Add, its bias input index, v @ W)``."""
    for _ in range(_MAX_STEPS):
        users = Model.consumers(value)
        if len(users) != 1 or value.is_graph_output():
            return None
        node = users[0]
        if node.op_type in ("Transpose", "Reshape") and node.inputs[0] is value:
            moved = _through(node, v, forward=True)
            if moved is None:
                return None
            v, value = moved, node.outputs[0]
            continue
        w, last = _const(node.inputs[1]), _last_axis(v)
        if node.op_type != "MatMul" or node.inputs[0] is not value or w is None or w.ndim != 2:
            return None
        if last is None or last.size != w.shape[0]:
            return None
        adds = Model.consumers(node.outputs[0])
        if len(adds) != 1 or adds[0].op_type != "Add" or node.outputs[0].is_graph_output():
            return None
        consts = [i for i, x in enumerate(adds[0].inputs) if _const(x) is not None]
        return (adds[0], consts[0], last @ w) if len(consts) == 1 else None
    return None


def move_attention_biases(model: Model) -> dict[str, int]:
    """Drop key biases and move value biases into the output projection's bias, in every attention
    block where that is exact (module docstring). Returns ``{"key": n, "value": m}``."""
    done = {"key": 0, "value": 0}
    for softmax in [n for n in model.graph if _softmax_last(n, model.opset)]:
        scores = _scores_matmul(softmax)
        if scores is not None and scores.inputs[1] is not None:
            found = _bias_behind(scores.inputs[1], scores)
            # NOTE: the key bias may vary along the key's channels (axis -2 of K^T), never along the keys
            if found is not None and found[2].shape[-1] == 1:
                add, index = found[0], found[1]
                _bypass(model, add, add.inputs[1 - index])  # type: ignore[arg-type]
                done["key"] += 1
        for user in Model.consumers(softmax.outputs[0]):
            if (
                user.op_type != "MatMul"
                or user.inputs[0] is not softmax.outputs[0]
                or user.inputs[1] is None
            ):
                continue
            found = _bias_behind(user.inputs[1], user)
            if found is None or found[2].ndim < 2 or found[2].shape[-2] != 1:
                continue
            target = _output_bias(user.outputs[0], found[2])
            if target is None:
                continue
            add, index = found[0], found[1]
            old = _const(target[0].inputs[target[1]])
            assert old is not None
            _set_const(model, target[0], target[1], old + target[2])
            _bypass(model, add, add.inputs[1 - index])  # type: ignore[arg-type]
            done["value"] += 1
    return done


# -- LayerNorm ------------------------------------------------------------------------------------
def _last_axis_reduce(node: ir.Node | None, rank: int | None) -> bool:
    """Whether ``node`` is a ReduceMean over the last axis only, keeping dims."""
    if node is None or node.op_type != "ReduceMean" or rank is None:
        return False
    keep = node.attributes.get("keepdims")
    if keep is not None and not keep.value:
        return False
    attr = node.attributes.get("axes")
    axes = list(attr.value) if attr is not None else None
    if axes is None and len(node.inputs) > 1:
        const = _const(node.inputs[1])
        axes = const.reshape(-1).tolist() if const is not None else None
    return axes is not None and len(axes) == 1 and axes[0] in (-1, rank - 1)


def _single(value: ir.Value, op_types: tuple[str, ...]) -> ir.Node | None:
    users = Model.consumers(value)
    if len(users) != 1 or value.is_graph_output() or users[0].op_type not in op_types:
        return None
    return users[0]


@dataclass
class _Norm:
    x: ir.Value
    eps: float
    nodes: list[ir.Node]
    gamma: ir.Value | None = None
    beta: ir.Value | None = None


def _match_norm(mean: ir.Node) -> _Norm | None:
    """The decomposed LayerNorm starting at ``mean`` (its ``ReduceMean(x)``), if it is one."""
    x = mean.inputs[0]
    rank = len(x.shape) if x is not None and x.shape is not None else None
    if x is None or not _last_axis_reduce(mean, rank):
        return None
    sub = _single(mean.outputs[0], ("Sub",))
    if sub is None or sub.inputs[0] is not x or sub.inputs[1] is not mean.outputs[0]:
        return None
    d = sub.outputs[0]
    users = Model.consumers(d)
    square = next((u for u in users if u.op_type in ("Mul", "Pow")), None)
    div = next((u for u in users if u.op_type == "Div" and u.inputs[0] is d), None)
    if len(users) != 2 or square is None or div is None or d.is_graph_output():
        return None
    exponent = _const(square.inputs[1]) if square.op_type == "Pow" else None
    if square.inputs[0] is not d or (
        square.inputs[1] is not d
        and (exponent is None or exponent.size != 1 or float(exponent.reshape(-1)[0]) != 2.0)
    ):
        return None
    var = _single(square.outputs[0], ("ReduceMean",))
    add = (
        _single(var.outputs[0], ("Add",))
        if var is not None and _last_axis_reduce(var, rank)
        else None
    )
    eps = _const(add.inputs[1]) if add is not None else None
    sqrt = (
        _single(add.outputs[0], ("Sqrt",))
        if add is not None and eps is not None and eps.size == 1
        else None
    )
    if (
        sqrt is None
        or _single(sqrt.outputs[0], ("Div",)) is not div
        or div.inputs[1] is not sqrt.outputs[0]  # type: ignore[union-attr]
    ):
        return None
    norm = _Norm(x, float(eps.reshape(-1)[0]), [mean, sub, square, var, add, sqrt, div])  # type: ignore[union-attr, list-item]
    return _affine(norm, x.shape[-1] if x.shape is not None else None)  # type: ignore[index]


def _affine(norm: _Norm, channels: object) -> _Norm | None:
    """Take the trailing ``Mul(gamma)`` and ``Add(beta)`` (constant vectors over the last axis) into ``norm``."""
    if not isinstance(channels, int):
        return None
    for op in ("Mul", "Add"):
        nxt = _single(norm.nodes[-1].outputs[0], (op,))
        c = (
            _const(nxt.inputs[1])
            if nxt is not None and nxt.inputs[0] is norm.nodes[-1].outputs[0]
            else None
        )
        if (
            nxt is None
            or c is None
            or c.size not in (1, channels)
            or c.size != max(c.shape or (1,))
        ):
            continue
        norm.nodes.append(nxt)
        if op == "Mul":
            norm.gamma = nxt.inputs[1]
        else:
            norm.beta = nxt.inputs[1]
    return norm


def fuse_layer_norms(model: Model) -> int:
    """Replace each decomposed LayerNorm over the last axis by one ``LayerNormalization`` (opset 17+;
    float inputs); returns how many."""
    if model.opset < 17:
        return 0
    count = 0
    for mean in [n for n in model.graph if n.op_type == "ReduceMean"]:
        if mean.graph is None:
            continue  # NOTE: removed with an earlier match
        norm = _match_norm(mean)
        if norm is None or norm.x.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
            continue
        channels = norm.x.shape[-1]  # type: ignore[index]
        b = model.builder(mean.name or "LayerNorm")
        gamma = _vector(model, norm.gamma, channels, 1.0, norm.x.dtype)  # type: ignore[arg-type]
        beta = _vector(model, norm.beta, channels, 0.0, norm.x.dtype)  # type: ignore[arg-type]
        last = norm.nodes[-1]
        y = b.op(
            "LayerNormalization",
            [norm.x, gamma, beta],
            {"axis": -1, "epsilon": norm.eps},
            name=f"{mean.name or 'LayerNorm'}_LayerNormalization",
            out=Out(f"{last.outputs[0].name}_ln", norm.x.dtype),
        )
        model.replace_node(last, list(b.nodes), y)
        for node in reversed(norm.nodes[:-1]):
            model.graph.remove(node, safe=True)
        count += 1
    return count


def _vector(
    model: Model, value: ir.Value | None, channels: int, fill: float, dtype: ir.DataType
) -> ir.Value:
    """``value`` as a vector of ``channels`` (a scalar repeated; ``fill`` where there is none)."""
    array = _const(value)
    if array is not None and array.size == channels:
        if array.ndim == 1 and value is not None:
            return value
        data = array.reshape(-1).astype(dtype.numpy())
    else:
        fill = fill if array is None else float(array.reshape(-1)[0])
        data = np.full(channels, fill, dtype.numpy())
    name = value.name if value is not None and value.name else "layer_norm"
    return model.add_initializer(f"{name}_vector", data)


# -- a bias before a residual Add ------------------------------------------------------------------
def _compensations(
    y: ir.Value, residual: ir.Node, bias: np.ndarray
) -> list[tuple[ir.Node, int, np.ndarray]] | None:
    """For each reader of ``y`` but ``residual``, a MatMul with a constant 2-D weight ``W`` followed
    by an Add of a constant bias: ``(that Add, bias index, its bias - bias @ W)``; None where another reader exists."""
    found = []
    for user in Model.consumers(y):
        if user is residual:
            continue
        w = _const(user.inputs[1]) if user.op_type == "MatMul" and user.inputs[0] is y else None
        adds = Model.consumers(user.outputs[0]) if w is not None else []
        if w is None or w.ndim != 2 or w.shape[0] != bias.size or len(adds) != 1:
            return None
        consts = [i for i, x in enumerate(adds[0].inputs) if _const(x) is not None]
        if adds[0].op_type != "Add" or len(consts) != 1 or user.outputs[0].is_graph_output():
            return None
        old = _const(adds[0].inputs[consts[0]])
        assert old is not None
        found.append((adds[0], consts[0], old - (bias @ w).reshape(old.shape[-1:] or (1,))))
    return found


def move_residual_biases(model: Model) -> int:
    """``LN(mm + b + y)`` where ``y = LayerNormalization(.., B)``: ``b`` moves into ``B`` (one Add
    fewer), and each other reader of ``y`` (a MatMul with a bias Add after it) subtracts ``b W`` from
    its bias, so it computes what it did. Returns how many biases moved."""
    moved = 0
    for residual in [n for n in model.graph if n.op_type == "Add" and len(n.inputs) == 2]:
        for side in (0, 1):
            t, y = residual.inputs[side], residual.inputs[1 - side]
            add, norm = (t.producer() if t else None), (y.producer() if y else None)
            if add is None or norm is None or y is None or y.is_graph_output():
                continue
            consts = [i for i, x in enumerate(add.inputs) if _const(x) is not None]
            if add.op_type != "Add" or len(consts) != 1 or not _only_reader(t, residual):
                continue
            bias = _const(add.inputs[consts[0]])
            if norm.op_type != "LayerNormalization" or len(norm.inputs) < 3 or bias is None:
                continue
            beta = _const(norm.inputs[2])
            if (
                beta is None
                or beta.ndim != 1
                or bias.size != beta.size
                or bias.size != bias.shape[-1]
            ):
                continue
            edits = _compensations(y, residual, bias.reshape(-1))
            if edits is None:
                continue
            _set_const(model, norm, 2, beta + bias.reshape(-1))
            for node, index, array in edits:
                _set_const(model, node, index, array)
            _bypass(model, add, add.inputs[1 - consts[0]])  # type: ignore[arg-type]
            moved += 1
            break
    return moved
