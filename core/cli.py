"""The ``modelpress`` command line.

Every error a user can cause prints one line (``modelpress: error: ...``) and exits non-zero;
``--verbose`` prints the traceback too.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.markup import escape

from modelpress.errors import ModelpressError, OptionsError

__all__ = ["main"]

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CRITERIA = 3  # the result misses its accuracy criteria (quantize without --accept-loss)
EXIT_INTERRUPTED = 130


def _console(stderr: bool = False):  # type: ignore[no-untyped-def]
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # NOTE: piped output (CI logs, files) gets a wide fixed width instead of rich's 80 columns.
    width = None if stream.isatty() else 160
    return Console(stderr=stderr, highlight=False, width=width)


def _human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1000
    return f"{size:.1f} GB"


def parse_option_pairs(pairs: Sequence[str] | None) -> dict[str, Any]:
    """``["bits=4", "exclude=[\\"a\\"]", "name=x"]`` -> ``{"bits": 4, "exclude": ["a"], "name": "x"}``."""
    options: dict[str, Any] = {}
    for pair in pairs or ():
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise OptionsError(f"option {pair!r} must look like NAME=VALUE")
        try:
            value: Any = json.loads(text)
        except json.JSONDecodeError:
            value = text
        options[key.strip().replace("-", "_")] = value
    return options


# -- commands ---------------------------------------------------------------------------------


def cmd_inspect(args: argparse.Namespace) -> int:
    import modelpress

    model = modelpress.load(args.model)
    info = modelpress.describe(model)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    from rich.table import Table

    console = _console()
    console.print(f"[bold]{escape(info['name'])}[/bold]  (opset {info['opset']}, IR v{info['ir_version']}, from {info['source_framework']}, producer {info['producer'] or '?'})")
    console.print(
        f"parameters {info['parameters']:,}   weights {_human_bytes(info['weight_bytes'])}   "
        f"on disk {_human_bytes(info['size_on_disk'])}   nodes {info['nodes']}   weighted layers {info['weighted_layers']}"
    )
    io = Table(title="inputs / outputs", title_justify="left")
    io.add_column("")
    io.add_column("name")
    io.add_column("dtype")
    io.add_column("shape")
    for role in ("inputs", "outputs"):
        for spec in info[role]:
            shape = "?" if spec["shape"] is None else "[" + ", ".join("?" if d is None else str(d) for d in spec["shape"]) + "]"
            io.add_row(role[:-1], escape(spec["name"]), spec["dtype"], escape(shape))
    console.print(io)
    ops = Table(title="ops", title_justify="left")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, count in info["ops"].items():
        ops.add_row(escape(op), str(count))
    console.print(ops)
    if info["passes"]:
        console.print("passes applied: " + " -> ".join(info["passes"]))
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from modelpress.registry import get_registry

    registry = get_registry()
    if args.json:
        data = [
            {
                "name": p.name,
                "distribution": p.distribution,
                "version": p.version,
                "builtin": p.builtin,
                "adapters": [a.name for a in p.adapters],
                "methods": [
                    {"kind": m.kind, "name": m.name, "summary": m.summary, "mutates": m.mutates, "options": m.option_rows()}
                    for m in p.methods
                ],
            }
            for p in registry.plugins.values()
        ]
        print(json.dumps({"plugins": data, "skipped": registry.skipped}, indent=2))
        return 0
    from rich.table import Table

    console = _console()
    table = Table(title="installed plugins", title_justify="left")
    for col in ("plugin", "distribution", "version", "provides"):
        table.add_column(col)
    for p in registry.plugins.values():
        provides = [f"adapter {a.name}" for a in p.adapters] + [m.qualname for m in p.methods]
        table.add_row(p.name + (" (built-in)" if p.builtin else ""), p.distribution, p.version, ", ".join(provides) or "-")
    console.print(table)
    for kind in ("quantize", "prune", "distill"):
        methods = registry.methods(kind)
        if not methods:
            continue
        console.print(f"\n[bold]{kind}[/bold] methods")
        for m in methods:
            console.print(f"  [bold]{m.name}[/bold]  ({m.plugin} {m.plugin_version}) {m.summary}")
            rows = m.option_rows()
            if rows:
                opts = Table(show_header=True, box=None, pad_edge=False, padding=(0, 2))
                for col in ("option", "type", "default", "help"):
                    opts.add_column(col)
                for row in rows:
                    opts.add_row("    " + row["name"], escape(row["type"]), escape(row["default"]), escape(row["help"]))
                console.print(opts)
    for name, why in registry.skipped.items():
        console.print(f"[dim]skipped plugin {name}: {why}[/dim]")
    return 0


def _capped_sample(path: str | None, limit: int = 256) -> Any:
    """The first ``limit`` samples of a data file, for the verification run (labels dropped)."""
    if not path:
        return None
    from modelpress.data import LABELS, read_arrays

    data = read_arrays(Path(path), "sample")
    if isinstance(data, dict):
        return {k: v[:limit] for k, v in data.items() if k != LABELS}
    return data[:limit]


def cmd_apply(args: argparse.Namespace) -> int:
    import modelpress

    options = parse_option_pairs(args.option)
    model = modelpress.load(args.model)
    result = modelpress.apply(
        model,
        args.method,
        kind=args.kind,
        options=options,
        calibration=args.calib,
        train=args.data,
        show_progress=not args.quiet,
    )
    record = result.provenance.passes[-1]
    if record.figures.get("criteria_met") is False and not getattr(args, "accept_loss", False):
        _console().print(
            f"[red]{record.method} missed its accuracy criteria: {record.figures.get('criteria')}; "
            f"nothing written (rerun with --accept-loss to keep it)[/red]"
        )
        return EXIT_CRITERIA
    sample = args.sample or _capped_sample(args.calib or args.data)
    exported = modelpress.export(result, args.output, verify=not args.no_verify, sample=sample)
    _print_result(result, exported)
    return 0


def _figure_text(value: Any) -> str:
    """Figures for people: a {node: reason} dict as a count and its names grouped by reason."""
    if not isinstance(value, dict) or not value or not all(isinstance(v, str) for v in value.values()):
        return str(value)
    groups: dict[str, list[str]] = {}
    for name, reason in value.items():
        groups.setdefault(reason.split(":")[0], []).append(name)
    parts = [f"{reason} ({len(names)}): {', '.join(names[:6])}{', ...' if len(names) > 6 else ''}" for reason, names in groups.items()]
    return f"{len(value)} — " + "; ".join(parts)


def _print_result(result: Any, exported: Any) -> None:
    console = _console()
    record = result.provenance.passes[-1]
    console.print(f"{record.kind}/{record.method} ({record.plugin} {record.plugin_version}) in {record.seconds:.2f}s")
    for key, value in record.figures.items():
        console.print(f"  {key}: {_figure_text(value)}")
    console.print(f"wrote {exported.path} ({_human_bytes(exported.size_bytes)})")
    if exported.verification is not None:
        console.print(f"verified in ONNX Runtime against the input model: {exported.verification.summary()}")


def cmd_quantize(args: argparse.Namespace) -> int:
    options = parse_option_pairs(args.option)
    if args.calibrator:
        options["calibrator"] = args.calibrator
    if args.per_tensor:
        options["per_channel"] = False
    if args.exclude:
        options["exclude"] = args.exclude
    args.kind, args.data = "quantize", None
    args.option = [f"{k}={json.dumps(v)}" for k, v in options.items()]
    return cmd_apply(args)


def cmd_prune(args: argparse.Namespace) -> int:
    options = parse_option_pairs(args.option)
    for name in ("ratio", "sparsity", "criterion", "fine_tune_epochs"):
        value = getattr(args, name)
        if value is not None:
            options[name] = value
    args.kind, args.calib = "prune", None
    args.option = [f"{k}={json.dumps(v)}" for k, v in options.items()]
    return cmd_apply(args)


def cmd_distill(args: argparse.Namespace) -> int:
    import modelpress

    options = parse_option_pairs(args.option)
    for name in ("width", "epochs", "temperature", "alpha", "lr"):
        value = getattr(args, name)
        if value is not None:
            options[name] = value
    teacher = modelpress.load(args.model)
    student: Any = "auto" if args.student == "auto" else modelpress.load(args.student)
    result = modelpress.distill(teacher, student, data=args.data, show_progress=not args.quiet, **options)
    sample = args.sample or _capped_sample(args.data)
    exported = modelpress.export(result, args.output, verify=not args.no_verify, sample=sample)
    _print_result(result, exported)
    return 0


def _print_report(result: Any) -> None:
    console = _console()
    console.print(result.report.table())
    if result.interrupted:
        console.print("interrupted: the completed stages' files and a partial report were kept")


def cmd_compress(args: argparse.Namespace) -> int:
    import modelpress

    try:
        result = modelpress.compress(args.model, args.recipe, output=args.output, report_dir=args.report_dir, show_progress=not args.quiet)
    except KeyboardInterrupt:
        raise
    _print_report(result)
    target = args.report_dir or str(Path(args.output).parent)
    _console().print(f"wrote {args.output} and report.md/.json/.html in {target}")
    return EXIT_INTERRUPTED if result.interrupted else 0


def cmd_recipe_schema(args: argparse.Namespace) -> int:
    from modelpress.recipe import recipe_schema

    print(json.dumps(recipe_schema(), indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from modelpress.demo import run_demo

    result = run_demo(args.out, fast=args.fast, framework=args.framework, show_progress=not args.quiet)
    _print_report(result)
    _console().print(f"compressed model: {result.output}; reports: {Path(args.out) / 'report.html'} (.md, .json); recipe: {Path(args.out) / 'recipe.yaml'}")
    return EXIT_INTERRUPTED if result.interrupted else 0


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        raise OptionsError(f"--input-shape {text!r} must be comma-separated integers, e.g. 1,3,32,32") from None


def cmd_convert(args: argparse.Namespace) -> int:
    import numpy as np

    import modelpress

    options: dict[str, Any] = {}
    if args.input_shape:
        shape = _shape(args.input_shape)
        options["input_shape"] = (None, *shape[1:])
        options["example_inputs"] = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    if args.example:
        from modelpress.data import read_arrays

        data = read_arrays(Path(args.example), "example")
        options["example_inputs"] = tuple(data.values()) if isinstance(data, dict) else data
    if args.trust_pickle:
        options["trust_pickle"] = True
    if args.opset:
        options["opset"] = args.opset
    result = modelpress.convert(args.source, args.output, to=args.to, sample=args.sample, **options)
    console = _console()
    prov = result.model.provenance
    check = prov.extra.get("import_check")
    console.print(f"imported {escape(str(args.source))} from {prov.source_framework} ({escape(prov.source_version)}) with {escape(prov.importer)}")
    if check:
        console.print(f"  import verified against {prov.source_framework}: max |diff| {check['max_abs_diff']:.3g}")
    size = Path(result.path).stat().st_size
    console.print(f"wrote {escape(str(result.path))} ({result.target}{', ' + result.note if result.note else ''}, {_human_bytes(size)})")
    if result.verification is not None:
        console.print(f"verified against the imported model in ONNX Runtime: {result.verification.summary()}")
    return 0


# -- parser -------------------------------------------------------------------------------------


def _add_output_arguments(p: argparse.ArgumentParser, *, sample_help: str) -> None:
    """The arguments every command that writes a verified model shares."""
    p.add_argument("-O", "--option", action="append", metavar="NAME=VALUE", help="any other method option; VALUE is JSON or a plain string (repeatable)")
    p.add_argument("--sample", help=f".npz inputs for the verification run ({sample_help})")
    p.add_argument("--no-verify", action="store_true", help="skip the numerical check (ORT still loads the file)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    from modelpress import __version__

    parser = argparse.ArgumentParser(
        prog="modelpress",
        description="Compress PyTorch, Keras and ONNX models (quantize, prune, distill); every output is verified in ONNX Runtime.",
    )
    parser.add_argument("--version", action="version", version=f"modelpress {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="print the full traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("inspect", help="op histogram, parameters, size, opset, inputs/outputs of a model")
    p.add_argument("model", help="model file (.onnx; other formats with their extras)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("plugins", help="installed plugins, their methods by kind and the methods' options")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser(
        "convert",
        help="convert between frameworks: torch / Keras / SavedModel / ONNX in, ONNX or PyTorch out",
        description=(
            "Import SRC (.onnx, .keras/.h5, a SavedModel folder, .pt2 torch.export program, .pt TorchScript) "
            "and write OUT: .onnx (verified in ONNX Runtime), .pt2 (torch.export program) or .pt (pickled "
            "nn.Module). Every import is checked against the source framework."
        ),
    )
    p.add_argument("source", help="source model file or SavedModel folder")
    p.add_argument("-o", "--output", required=True, help="output path: .onnx, .pt2 or .pt")
    p.add_argument("--to", choices=("onnx", "torch"), help="output format (default: from the output suffix)")
    p.add_argument("--input-shape", help="example input shape for sources without one, e.g. 1,3,32,32 (first axis: batch)")
    p.add_argument("--example", help=".npy/.npz example inputs (TorchScript sources need these or --input-shape)")
    p.add_argument("--sample", help=".npz inputs for the output's verification run")
    p.add_argument("--opset", type=int, help="ONNX opset for the import")
    p.add_argument("--trust-pickle", action="store_true", help="allow .pt files holding a pickled full module (unpickling runs code)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "quantize",
        help="quantize (int8-static, int8-dynamic, int4-weight-only, int8-weight-only, fp16, codebook, plugins')",
        description="Quantize MODEL and write OUT, verified in ONNX Runtime against MODEL. Options of each method: `modelpress plugins`.",
    )
    p.add_argument("model", help="input model")
    p.add_argument("-o", "--output", required=True, help="output .onnx path (written atomically)")
    p.add_argument("-m", "--method", default="int8-static", help="quantize method (default: int8-static)")
    p.add_argument("--calib", help=".npz calibration data (arrays named after the model inputs)")
    p.add_argument("--calibrator", choices=("minmax", "percentile", "entropy", "mse"), help="int8-static: activation range calibrator")
    p.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor instead of per channel")
    p.add_argument("--exclude", nargs="+", metavar="NODE", help="node names to keep in float")
    p.add_argument("--accept-loss", action="store_true",
                   help=f"write the result even when it misses its accuracy criteria (otherwise: one line with the figures, exit {EXIT_CRITERIA})")
    _add_output_arguments(p, sample_help="default: the calibration data, else random")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser(
        "prune",
        help="prune (magnitude, n:m, channel, plugins')",
        description="Prune MODEL and write OUT, verified in ONNX Runtime against MODEL. Options of each method: `modelpress plugins`.",
    )
    p.add_argument("model", help="input model")
    p.add_argument("-o", "--output", required=True, help="output .onnx path (written atomically)")
    p.add_argument("-m", "--method", default="magnitude", help="prune method (default: magnitude)")
    p.add_argument("--ratio", type=float, help="channel: fraction of channels to remove")
    p.add_argument("--sparsity", type=float, help="magnitude: fraction of weights to zero")
    p.add_argument("--criterion", help="channel: l1, l2, bn-scale, taylor, activation")
    p.add_argument("--data", help=".npz training data: arrays named after the inputs, optionally `labels`")
    p.add_argument("--fine-tune-epochs", type=int, dest="fine_tune_epochs", help="fine-tune after pruning (needs --data)")
    _add_output_arguments(p, sample_help="default: the data, else random")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser(
        "distill",
        help="knowledge distillation: train a student (or an automatic narrower one) from TEACHER",
        description="Distill TEACHER into a student and write it to OUT, verified in ONNX Runtime against the teacher.",
    )
    p.add_argument("model", metavar="TEACHER", help="teacher model (any format modelpress loads)")
    p.add_argument("-o", "--output", required=True, help="output .onnx path for the student")
    p.add_argument("--student", default="auto", help="'auto' (the teacher narrowed to --width) or a student model file")
    p.add_argument("--width", type=float, help="auto student: fraction of the teacher's channels kept (default 0.5)")
    p.add_argument("--data", required=True, help=".npz training data: arrays named after the inputs, optionally `labels`")
    p.add_argument("--epochs", type=int, help="training epochs (default 10)")
    p.add_argument("--temperature", type=float, help="softmax temperature (default 4)")
    p.add_argument("--alpha", type=float, help="weight of the hard-label loss (default 0.3; 0 = no labels needed)")
    p.add_argument("--lr", type=float, help="learning rate")
    _add_output_arguments(p, sample_help="default: the data")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser(
        "compress",
        help="run a recipe (quantize / prune / distill passes) and report every stage",
        description="Run the passes of RECIPE on MODEL, evaluating after the source and each stage (metric, size, latency, time); "
        "write the final model to OUT and report.md/.json/.html.",
    )
    p.add_argument("model", help="input model")
    p.add_argument("-r", "--recipe", required=True, help="recipe file (.yaml or .json); see `modelpress recipe-schema`")
    p.add_argument("-o", "--output", required=True, help="final .onnx path; each stage goes to <stem>-stages/")
    p.add_argument("--report-dir", help="folder for report.md/.json/.html (default: the output's folder)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("recipe-schema", help="print the JSON Schema of recipes")
    p.set_defaults(func=cmd_recipe_schema)

    p = sub.add_parser(
        "demo",
        help="train a CNN on scikit-learn's digits, then prune -> distill -> quantize it and report (nothing downloaded)",
    )
    p.add_argument("--out", default="modelpress-demo", help="output folder (default ./modelpress-demo)")
    p.add_argument("--fast", action="store_true", help="fewer epochs (same code path)")
    p.add_argument("--framework", choices=("torch", "tensorflow"), help="framework to train with (default: torch if installed)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "apply",
        help="apply one method (built-in or from a plugin) and export verified ONNX",
        description="Apply one compression method to MODEL and write the result to OUT, verified in ONNX Runtime against MODEL.",
    )
    p.add_argument("model", help="input model")
    p.add_argument("-m", "--method", required=True, help="method name (see `modelpress plugins`)")
    p.add_argument("-k", "--kind", choices=("quantize", "prune", "distill"), help="method kind, when a name exists in several")
    p.add_argument("-o", "--output", required=True, help="output .onnx path (written atomically)")
    p.add_argument("--calib", help=".npz calibration data (arrays named after the model inputs)")
    p.add_argument("--data", help=".npz training data (inputs and optionally `labels`)")
    p.add_argument("--accept-loss", action="store_true", help=f"write the result even when it misses its accuracy criteria (otherwise exit {EXIT_CRITERIA})")
    _add_output_arguments(p, sample_help="default: the calibration or training data, else random inputs from the signature")
    p.set_defaults(func=cmd_apply)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except ModelpressError as exc:
        if args.verbose:
            traceback.print_exc()
        message = " ".join(str(exc).split())
        print(f"modelpress: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("modelpress: interrupted; nothing was written for the unfinished step", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # NOTE: a bug, not bad input: still one line unless --verbose
        if args.verbose:
            traceback.print_exc()
        message = " ".join(str(exc).split())
        print(f"modelpress: internal error: {type(exc).__name__}: {message} (run with --verbose for the traceback)", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
