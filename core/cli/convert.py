"""``modelpress convert``: between frameworks (torch / Keras / SavedModel / ONNX in; ONNX or PyTorch out)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from modelpress.cli.common import (
    EXTERNAL,
    Command,
    add_overwrite_argument,
    add_task_argument,
    add_writing_arguments,
    console,
    escape,
    human_bytes,
    print_wrapped,
    refuse_overwrite,
)

__all__ = ["COMMANDS"]


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="source model file or SavedModel folder")
    p.add_argument("-o", "--output", required=True, help="output path: .onnx, .pt2 or .pt")
    p.add_argument(
        "--to", choices=("onnx", "torch"), help="output format (default: from the output suffix)"
    )
    p.add_argument(
        "--input-shape",
        help="example input shape for sources without one, e.g. 1,3,32,32 (first axis: batch)",
    )
    p.add_argument(
        "--example",
        help=".npy/.npz example inputs (TorchScript sources need these or --input-shape)",
    )
    p.add_argument("--sample", help=".npz inputs for the output's verification run")
    add_writing_arguments(p)
    p.add_argument("--opset", type=int, help="ONNX opset for the import")
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow .pt files holding a pickled full module (unpickling runs code)",
    )
    add_task_argument(p)
    add_overwrite_argument(p)


def _shape(text: str) -> tuple[int, ...]:
    from modelpress.base.errors import OptionsError

    try:
        return tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        raise OptionsError(
            f"--input-shape {text!r} must be comma-separated integers, e.g. 1,3,32,32"
        ) from None


def _import_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if args.input_shape:
        import numpy as np

        shape = _shape(args.input_shape)
        options["input_shape"] = (None, *shape[1:])
        options["example_inputs"] = (
            np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        )
    if args.example:
        from modelpress.data.samples import read_arrays

        data = read_arrays(Path(args.example), "example")
        options["example_inputs"] = tuple(data.values()) if isinstance(data, dict) else data
    if args.trust_pickle:
        options["trust_pickle"] = True
    if args.opset:
        options["opset"] = args.opset
    if args.task:
        options["task"] = args.task
    return options


def run(args: argparse.Namespace) -> int:
    import modelpress

    options = _import_options(args)
    refuse_overwrite(args, args.source, args.example, args.sample)
    result = modelpress.convert(
        args.source,
        args.output,
        to=args.to,
        sample=args.sample,
        overwrite=args.overwrite,
        verify=not args.no_verify,
        external_data=EXTERNAL[args.external_data],
        **options,
    )
    out = console()
    size = human_bytes(Path(result.path).stat().st_size)
    wrote = f"wrote {escape(result.path)} ({result.target}{', ' + escape(result.note) if result.note else ''}, {size})"
    if args.quiet:
        verified = (
            f"; verified in ONNX Runtime: {escape(result.verification.summary())}"
            if result.verification is not None
            else ""
        )
        out.print(wrote + verified, soft_wrap=True)  # NOTE: one line, however long
        return 0
    _print_import(out, args.source, result.model.provenance)
    print_wrapped(
        out,
        f"wrote {result.path} ({result.target}{', ' + result.note if result.note else ''}, {size})",
    )
    if result.verification is not None:
        print_wrapped(
            out,
            f"verified against the imported model in ONNX Runtime: {result.verification.summary()}",
            indent=2,
        )
    return 0


def _print_import(out: Any, source: str, prov: Any) -> None:
    """What this command did to read SOURCE: an ONNX file is read as it is (its provenance tells where it was first
    imported from, not what ran now); anything else was imported from its framework, and checked against it."""
    if Path(source).suffix.lower() == ".onnx":
        first = (
            f"; first imported from {prov.source_framework} ({prov.source_version}) with {prov.importer}"
            if prov.source_framework != "onnx" and prov.importer
            else ""
        )
        print_wrapped(out, f"read {source} (ONNX{first})", indent=4)
        return
    print_wrapped(
        out,
        f"imported {source} from {prov.source_framework} ({prov.source_version}) with {prov.importer}",
        indent=4,  # NOTE: under the "  import verified" line's 2
    )
    check = prov.extra.get("import_check")
    if check:
        out.print(
            f"  import verified against {prov.source_framework}: max |diff| {check['max_abs_diff']:.3g}"
        )


COMMANDS = (
    Command(
        "convert",
        "convert between frameworks: torch / Keras / SavedModel / ONNX in, ONNX or PyTorch out",
        arguments,
        run,
        "Import SRC (.onnx, .keras/.h5, a SavedModel folder, .pt2 torch.export program, .pt TorchScript) "
        "and write OUT: .onnx (verified in ONNX Runtime), .pt2 (torch.export program) or .pt (pickled "
        "nn.Module). Every import is checked against the source framework.",
    ),
)
