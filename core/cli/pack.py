"""``modelpress pack`` / ``unpack``: the lossless ``.mpk`` container of an ONNX model."""

from __future__ import annotations

import argparse
from pathlib import Path

from modelpress.cli.common import (
    Command,
    console,
    escape,
    human_bytes,
    print_result_line,
    print_wrapped,
)

__all__ = ["COMMANDS"]


def pack_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model", help="input .onnx model (convert other formats first: modelpress convert)"
    )
    p.add_argument("-o", "--output", required=True, help="output .mpk path (written atomically)")
    p.add_argument(
        "--codecs",
        default="auto",
        help="'auto' (every installed codec, default) or a comma-separated list of codec names",
    )
    p.add_argument(
        "--no-solid",
        action="store_true",
        help="never code same-dtype tensors together as one stream (keeps every tensor separately decodable)",
    )
    p.add_argument(
        "--prefer",
        choices=("speed", "size"),
        default="speed",
        help="speed (default): slow-to-decode codecs (lzma) only where they save >= 10%%; size: always the smallest",
    )
    p.add_argument(
        "--strip",
        action="store_true",
        help="drop metadata properties (of the model, graphs, nodes, values, tensors), doc strings and value_info first "
        "(the unpacked model computes the same, but is not the same file)",
    )


def _onnx_only(path: str) -> None:
    """pack reads ONNX protobuf; any other format would be "corrupt wire format" deep inside it."""
    from modelpress.base.errors import OptionsError

    source = Path(path)
    if source.is_dir() or (source.exists() and source.suffix.lower() != ".onnx"):
        target = source.with_suffix(".onnx").name
        raise OptionsError(
            f"{path}: pack takes an ONNX file (.onnx); convert it first: modelpress convert {path} -o {target}"
        )


def run_pack(args: argparse.Namespace) -> int:
    import modelpress

    _onnx_only(args.model)
    codecs = args.codecs.split(",") if args.codecs != "auto" else "auto"
    result = modelpress.pack(
        args.model,
        args.output,
        codecs=codecs,
        solid=not args.no_solid,
        prefer=args.prefer,
        strip=args.strip,
    )
    out = console()
    counts = ", ".join(f"{name} {n}" for name, n in sorted(result.codec_counts().items()))
    print_result_line(
        out,
        f"packed {args.model} ({human_bytes(result.source_bytes)}) into {result.path} "
        f"({human_bytes(result.size_bytes)}, {result.ratio:.2f}x smaller); tensors by codec: {counts or 'none'}",
        quiet=args.quiet,
    )
    if args.quiet:
        return 0
    if not result.bytes_identical:
        print_wrapped(
            out,
            "note: the input's protobuf encoding is not canonical: unpack restores every tensor and the graph exactly, not the same file bytes",
            indent=2,
        )
    for name, why in result.skipped_codecs.items():
        out.print(f"[dim]codec {escape(name)} skipped: {escape(why)}[/dim]")
    return 0


def unpack_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pack", help="input .mpk file")
    p.add_argument("-o", "--output", required=True, help="output .onnx path (written atomically)")


def run_unpack(args: argparse.Namespace) -> int:
    import modelpress

    path = modelpress.unpack(args.pack, args.output)
    print_result_line(
        console(),
        f"unpacked {args.pack} into {path} (every tensor matched its checksum)",
        quiet=args.quiet,
    )
    return 0


COMMANDS = (
    Command(
        "pack",
        "losslessly pack an ONNX model's weights with entropy codecs into a .mpk container",
        pack_arguments,
        run_pack,
        "Pack MODEL (.onnx, external data included) into OUT (.mpk): the graph plus each tensor coded by the "
        "installed codec that makes it smallest, with a checksum per tensor. `modelpress unpack` restores the file bit-exactly; "
        "`modelpress.load('x.mpk')` decodes it in memory.",
    ),
    Command(
        "unpack",
        "restore the ONNX model of a .mpk container bit-exactly",
        unpack_arguments,
        run_unpack,
        "Decode PACK and write the original ONNX file (and its external data) to OUT; every tensor is checked against its "
        "checksum (XXH3-64, or CRC-32 where xxhash was not installed; SHA-256 in format-1 packs).",
    ),
)
