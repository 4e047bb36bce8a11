"""``modelpress inspect``: what a model is made of (reads no weight unless ``--entropy``)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from modelpress.cli.common import (
    Command,
    add_task_argument,
    capped_sample,
    console,
    escape,
    human_bytes,
    load_options,
    print_wrapped,
)

__all__ = ["COMMANDS"]


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        help="model file (.onnx; .mpk: also lists the codecs the pack needs and who provides them; other formats with their extras)",
    )
    p.add_argument(
        "--no-normalize",
        action="store_true",
        help="show the ONNX graph as stored, without normalisation on import",
    )
    p.add_argument(
        "--sample",
        help=".npz inputs (named after the model inputs) for the normalisation check (default: random inputs from the signature)",
    )
    p.add_argument(
        "--layers",
        action="store_true",
        help="list the weighted layers (the names --exclude and -O layers= take; LSTM/GRU and embedding tables included): op, weight shape, parameters",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument(
        "--entropy",
        action="store_true",
        help="per tensor: order-0 entropy and the best lossless codec's ratio (runs every codec: slow on big models)",
    )
    add_task_argument(p)


def run(args: argparse.Namespace) -> int:
    model, info = _read(args)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    out = console()
    _print_summary(info, out)
    _print_signature(info, out)
    if args.layers:
        _print_layers(info, out)
    if args.entropy:
        _print_entropy(model, out)
    return 0


def light_info(args: argparse.Namespace) -> dict[str, Any] | None:
    """What ``inspect`` shows of a plain ``.onnx`` file, from the light reader (no onnx, onnx-ir or
    plugins imported); None when only loading the model can tell (see
    :mod:`modelpress.io.onnx_view`), or when the options need the loaded model, or when
    ``MODELPRESS_STRICT_PLUGINS`` asks for plugin faults to be errors (the plugins are loaded)."""
    from modelpress.base.errors import strict_plugins

    if args.sample or args.entropy or getattr(args, "task", None) or strict_plugins():
        return None
    import modelpress
    from modelpress.io.onnx_view import CannotAnswer, read_onnx

    try:
        return modelpress.describe(read_onnx(args.model, normalize=not args.no_normalize))
    except CannotAnswer:
        return None


def _read(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """The model (None when the light reader answered) and what ``inspect`` shows of it."""
    info = light_info(args)
    if info is not None:
        return None, info
    import modelpress

    codecs = _pack_codecs(args)
    options = load_options(args)
    if args.sample:
        options["sample"] = _feeds(args.sample)
    model = modelpress.load(args.model, **options)
    info = modelpress.describe(model)
    if codecs is not None:
        info["codecs"] = codecs
    return model, info


def _pack_codecs(args: argparse.Namespace) -> list[dict[str, Any]] | None:
    """For a pack: the codecs it needs, shown first (a table; JSON only when loading will fail),
    and one error naming every one not installed and what to install."""
    from modelpress.packing.needs import missing_codecs_error, pack_needs

    codecs = pack_needs(args.model)
    if codecs is None:
        return None
    error = missing_codecs_error(args.model, codecs)
    if not args.json:
        _print_codecs(codecs, console())
    elif error is not None:
        print(json.dumps({"file": args.model, "codecs": codecs}, indent=2))
    if error is not None:
        raise error
    return codecs


def _feeds(path: str) -> dict[str, Any]:
    from modelpress.base.errors import DataError

    data = capped_sample(path)
    if not isinstance(data, dict):
        raise DataError(
            f"--sample {path!r}: give an .npz whose arrays are named after the model inputs"
        )
    return data


def _print_summary(info: dict[str, Any], out: Any) -> None:
    out.print(
        f"[bold]{escape(info['name'])}[/bold]  (opset {info['opset']}, IR v{info['ir_version']}, from "
        f"{info['source_framework']}, producer {escape(info['producer'] or '?')})"
    )
    _print_items(
        out,
        [
            f"parameters {info['parameters']:,}",
            f"weights {human_bytes(info['weight_bytes'])}",
            f"on disk {human_bytes(info['size_on_disk'])}",
            f"nodes {info['nodes']}",
            f"weighted layers {info['weighted_layers']}",
        ],
    )
    if info["nodes_in_subgraphs"]:
        out.print(
            f"subgraphs (If/Loop/Scan bodies): {info['nodes_in_subgraphs']} more nodes, {info['weighted_layers_in_subgraphs']} of the weighted layers"
        )
    norm = info.get("normalize") or {}
    if norm and "skipped" not in norm:
        done = ", ".join(
            f"{v} {k.replace('_', ' ')}"
            for k, v in norm.items()
            if isinstance(v, int) and v and not k.startswith("nodes")
        )
        check = norm.get("check")
        if isinstance(check, dict) and check.get("equal"):
            checked = f"; outputs equal the original's in ONNX Runtime (max |diff| {check['max_abs_diff']:.3g})"
        else:
            checked = f"; check {check}" if check else ""
        print_wrapped(
            out, f"normalised on import: {done or 'nothing to change'}{checked}", indent=2
        )
    if info["passes"]:
        out.print("passes applied: " + " -> ".join(info["passes"]))


def _print_items(out: Any, items: list[str], gap: str = "  ") -> None:
    """``items`` on one line, wrapped between items (never inside one: ``weighted layers`` / ``3``)."""
    lines = [""]
    for item in items:
        if lines[-1] and len(lines[-1]) + len(gap) + len(item) > out.width:
            lines.append("")
        lines[-1] += (gap if lines[-1] else "") + item
    out.print("\n".join(lines), markup=False, highlight=False, soft_wrap=True)


def _print_signature(info: dict[str, Any], out: Any) -> None:
    from rich.table import Table

    io = Table(title="inputs / outputs", title_justify="left")
    for col in ("", "name", "dtype", "shape"):
        io.add_column(col, overflow="fold")
    for role in ("inputs", "outputs"):
        for spec in info[role]:
            shape = (
                "?"
                if spec["shape"] is None
                else "[" + ", ".join("?" if d is None else str(d) for d in spec["shape"]) + "]"
            )
            io.add_row(role[:-1], escape(spec["name"]), spec["dtype"], escape(shape))
    out.print(io)
    ops = Table(title="ops", title_justify="left")
    ops.add_column("op", overflow="fold")
    ops.add_column("count", justify="right")
    for op, count in info["ops"].items():
        ops.add_row(escape(op), str(count))
    out.print(ops)


def _print_codecs(rows: list[dict[str, Any]], out: Any) -> None:
    """The codecs a pack needs, laid out as the report table (no borders) so that a distribution's name
    stays whole at 80 columns; ``installed`` names what is installed only when it differs from the pack's."""
    from rich import box
    from rich.table import Table

    table = Table(
        title="codecs this pack needs",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
    )
    for i, col in enumerate(("codec", "tensors", "plugin", "packed with", "installed")):
        table.add_column(col, justify="right" if i == 1 else "left", overflow="fold")
    for row in rows:
        recorded = " ".join(filter(None, [row["distribution"], row["version"]])) or "?"
        if not row["installed"]:
            installed = "[red]no[/red]"
        elif row["installed_from"] in (None, recorded):
            installed = "yes"
        else:
            installed = f"yes ({escape(row['installed_from'])})"
        table.add_row(
            escape(row["codec"]),
            str(row["tensors"]),
            escape(row["plugin"] or "?"),
            escape(recorded),
            installed,
        )
    out.print(table)


def _print_layers(info: dict[str, Any], out: Any) -> None:
    from rich.table import Table

    table = Table(title="weighted layers (names for --exclude, -O layers=)", title_justify="left")
    for i, col in enumerate(("layer", "op", "weight shape", "parameters", "where")):
        table.add_column(col, justify="right" if i == 3 else "left", overflow="fold")
    for layer in info["layers"]:
        shape = (
            "?"
            if layer["weight_shape"] is None
            else "x".join("?" if d is None else str(d) for d in layer["weight_shape"])
        )
        table.add_row(
            escape(layer["name"]),
            escape(layer["op"]),
            shape,
            f"{layer['parameters']:,}",
            escape(layer["scope"] or "main graph"),
        )
    out.print(table)


def _print_entropy(model: Any, out: Any) -> None:
    """Per tensor: entropy and the best codec. Laid out as the report table (no borders, short cells:
    ``32x16x3x3``, ``12.17/32``) so that it fits 80 columns with a tensor name of 20 characters; a long
    name folds, a number never does. The packed size shows from 100 columns (the ratio says it)."""
    from rich import box
    from rich.table import Table

    from modelpress.packing.container import tensor_report

    table = Table(
        title="tensors: order-0 entropy (bits/element) and the best lossless codec",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        padding=(0, 0),
    )
    wide = out.width >= 100
    table.add_column("tensor", overflow="fold", ratio=1)
    for col in ("dtype", "shape", "role"):
        table.add_column(col, no_wrap=True)
    for col in ("size", "entropy", "codec", *(("packed",) if wide else ()), "ratio"):
        table.add_column(col, justify="right", no_wrap=True)
    for row in tensor_report(model):
        entropy = (
            "-"
            if row["entropy_bits"] is None
            else f"{max(row['entropy_bits'], 0.0) + 0.0:.2f}/{row['bits']}"
        )  # NOTE: not -0.00
        packed = (human_bytes(row["packed_bytes"]),) if wide else ()
        table.add_row(
            escape(row["name"]),
            row["dtype"],
            "x".join(str(d) for d in row["shape"]) or "scalar",
            row["role"],
            human_bytes(row["bytes"]),
            entropy,
            escape(row["codec"]),
            *packed,
            f"{row['ratio']:.2f}x",
        )
    out.print(table)


COMMANDS = (
    Command(
        "inspect",
        "op histogram, parameters, size, opset, inputs/outputs (--layers: the weighted layers) of a model",
        arguments,
        run,
    ),
)
