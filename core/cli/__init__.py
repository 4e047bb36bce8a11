"""The ``modelpress`` command line.

Exit codes: 0 success; 1 a user error (bad input, bad options, bad command line: every
:class:`~modelpress.ModelpressError` and argparse's usage errors), printed as one line
``modelpress: error: ...``; 3 a bug in modelpress (any other exception), printed as one line that
says so, with the version; 130 interrupted (Ctrl-C). ``-v/--verbose`` adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from rich.markup import escape

from modelpress.app.report import figure_text
from modelpress.base.errors import ModelpressError, OptionsError, one_line

__all__ = ["main"]

EXIT_ERROR = 1  # a user error: bad input, options or command line (ModelpressError, argparse)
EXIT_USAGE = EXIT_ERROR  # NOTE: one code for every user error; argparse's own 2 is not used
EXIT_INTERNAL = 3  # a bug in modelpress: an exception that is not a ModelpressError
EXIT_CRITERIA = 4  # the result misses its accuracy criteria (quantize/apply without --accept-loss)
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = (
    "exit codes: 0 success; 1 user error (bad model, data, options or command line); "
    "3 internal error (a bug in modelpress: please report it with the -v traceback); "
    "4 the result misses its accuracy criteria (nothing written; --accept-loss keeps it); 130 interrupted."
)


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors exit with the same code as every other user error."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"modelpress: error: {message}\n")


class _SubParser(_Parser):
    """A command's parser: the exit codes in its --help, and ``-v`` accepted after the command too."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("epilog", EXIT_CODES_HELP)
        super().__init__(**kwargs)
        # NOTE: SUPPRESS keeps a command from resetting a `-v` given before it.
        self.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="print the full traceback on errors")


def _refuse_overwrite(args: argparse.Namespace, *inputs: str | None) -> None:
    """The output must not be any file the command reads (models are also checked by export)."""
    from modelpress.io.safety import refuse_overwrite

    refuse_overwrite([getattr(args, "output", None)], inputs, overwrite=args.overwrite)


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
    """``["bits=4", "exclude=[\\"a\\"]", "name=x"]`` -> ``{"bits": 4, "exclude": ["a"], "name": "x"}``.

    A name given more than once collects its values into a list (``-O exclude=a -O exclude=b``).
    """
    options: dict[str, Any] = {}
    repeated: set[str] = set()
    for pair in pairs or ():
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise OptionsError(f"option {pair!r} must look like NAME=VALUE")
        name = key.strip().replace("-", "_")
        value = _option_value(text)
        if name in options:
            if name not in repeated:
                options[name], repeated = [options[name]], repeated | {name}
            options[name].append(value)
        else:
            options[name] = value
    return options


def _option_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _list_options(schema: Any, options: dict[str, Any]) -> dict[str, Any]:
    """Options whose field in the method's schema is a list take ``a,b,c`` (or one plain value)."""
    fields = getattr(schema, "model_fields", {})
    for name, value in options.items():
        field = fields.get(name)
        if field is None or not isinstance(value, (str, int, float)) or isinstance(value, bool):
            continue
        if _field_is_list(field.annotation):
            options[name] = [_option_value(part.strip()) for part in str(value).split(",") if part.strip()] if isinstance(value, str) else [value]
    return options


# -- options generated from each method's schema ------------------------------------------------
_GENERATED = "method_option__"


def _method_in(argv: Sequence[str], command: str, default: str | None) -> tuple[str | None, str | None]:
    """The ``-m/--method`` and ``-k/--kind`` given after ``command`` in ``argv`` (before parsing)."""
    if command not in argv:
        return None, None
    rest = list(argv[argv.index(command) + 1:])
    found: dict[str, str | None] = {"method": default, "kind": None}
    for i, token in enumerate(rest):
        for flag, key in (("-m", "method"), ("--method", "method"), ("-k", "kind"), ("--kind", "kind")):
            if token == flag and i + 1 < len(rest):
                found[key] = rest[i + 1]
            elif token.startswith(flag + "=") and flag.startswith("--"):
                found[key] = token.split("=", 1)[1]
    return found["method"], found["kind"]


def _field_is_list(annotation: Any) -> bool:
    import typing

    # NOTE: the field itself (list[str]) or one arm of a union (list[str] | None)
    return any(typing.get_origin(k) in (list, tuple, set) for k in (annotation, *typing.get_args(annotation)))


def _add_method_options(p: argparse.ArgumentParser, argv: Sequence[str], command: str, default: str | None, kind: str | None = None) -> None:
    """Add ``--<option>`` flags for every field of the chosen method's ``Options`` schema (a
    third-party method gets the same CLI as a built-in). Flags the command already has win."""
    method_name, kind_given = _method_in(argv, command, default)
    if not method_name:
        return
    try:
        from modelpress.plugin.registry import get_registry

        method = get_registry().method(method_name, kind_given or kind)
    except ModelpressError:
        return  # NOTE: the command reports the unknown method (with suggestions) when it runs
    fields = getattr(method.options, "model_fields", {})
    group = p.add_argument_group(f"options of {method.kind}/{method.name} ({method.plugin or 'built-in'}; also -O NAME=VALUE)")
    for name, field in fields.items():
        flag = "--" + name.replace("_", "-")
        if flag in p._option_string_actions:  # NOTE: argparse has no public lookup of a flag
            continue
        default_text = "" if field.is_required() else f" (default: {field.get_default(call_default_factory=True)!r})"
        text = (field.description or "").replace("%", "%%") + default_text.replace("%", "%%")
        dest = _GENERATED + name
        if field.annotation is bool:
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif _field_is_list(field.annotation):
            group.add_argument(flag, dest=dest, action="append", metavar="A,B", help=text + "; repeat the flag or give a,b,c")
        else:
            import typing

            choices = [str(c) for c in typing.get_args(field.annotation)] if typing.get_origin(field.annotation) is typing.Literal else None
            group.add_argument(flag, dest=dest, metavar=name.upper() if choices is None else None, choices=choices, help=text)


def _clear_generated(args: argparse.Namespace) -> None:
    for dest in [d for d in vars(args) if d.startswith(_GENERATED)]:
        delattr(args, dest)


def _generated_options(args: argparse.Namespace) -> dict[str, Any]:
    """The values of the generated ``--<option>`` flags that were given, as option values."""
    options: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if not dest.startswith(_GENERATED) or value is None:
            continue
        name = dest[len(_GENERATED):]
        if isinstance(value, list):
            options[name] = [_option_value(part.strip()) for item in value for part in str(item).split(",") if part.strip()]
        elif isinstance(value, bool):
            options[name] = value
        else:
            options[name] = _option_value(value)
    return options


# -- commands ---------------------------------------------------------------------------------


def _load_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"normalize": False} if getattr(args, "no_normalize", False) else {}


def cmd_inspect(args: argparse.Namespace) -> int:
    import modelpress

    model = modelpress.load(args.model, **_load_options(args))
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
    if info["nodes_in_subgraphs"]:
        console.print(f"subgraphs (If/Loop/Scan bodies): {info['nodes_in_subgraphs']} more nodes, {info['weighted_layers_in_subgraphs']} of the weighted layers")
    norm = info.get("normalize") or {}
    if norm and "skipped" not in norm:
        done = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in norm.items() if isinstance(v, int) and v and not k.startswith("nodes"))
        check = norm.get("check")
        checked = f"; outputs equal the original's in ONNX Runtime (max |diff| {check['max_abs_diff']:.3g})" if isinstance(check, dict) and check.get("equal") else f"; {check}" if check else ""
        console.print(f"normalised on import: {done or 'nothing to change'}{checked}")
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
    if args.entropy:
        _print_entropy(model, console)
    return 0


def _print_entropy(model: Any, console: Any) -> None:
    from rich.table import Table

    from modelpress.packing.container import tensor_report

    table = Table(title="tensors: order-0 entropy and the best lossless codec", title_justify="left")
    for i, col in enumerate(("tensor", "dtype", "shape", "role", "size", "entropy (bits/elem)", "best codec", "packed", "ratio")):
        table.add_column(col, justify="left" if i < 4 else "right")
    for row in tensor_report(model):
        entropy = "-" if row["entropy_bits"] is None else f"{row['entropy_bits']:.2f} of {row['bits']}"
        table.add_row(
            escape(row["name"]), row["dtype"], escape(str(row["shape"])), row["role"], _human_bytes(row["bytes"]), entropy,
            row["codec"], _human_bytes(row["packed_bytes"]), f"{row['ratio']:.2f}x",
        )
    console.print(table)


def cmd_pack(args: argparse.Namespace) -> int:
    import modelpress

    codecs = args.codecs.split(",") if args.codecs != "auto" else "auto"
    result = modelpress.pack(args.model, args.output, codecs=codecs, solid=not args.no_solid, prefer=args.prefer, strip=args.strip)
    console = _console()
    counts = ", ".join(f"{name} {n}" for name, n in sorted(result.codec_counts().items()))
    console.print(
        f"packed {escape(args.model)} ({_human_bytes(result.source_bytes)}) into {escape(str(result.path))} "
        f"({_human_bytes(result.size_bytes)}, {result.ratio:.2f}x smaller); tensors by codec: {counts or 'none'}"
    )
    if not result.bytes_identical:
        console.print("note: the input's protobuf encoding is not canonical: unpack restores every tensor and the graph exactly, not the same file bytes")
    for name, why in result.skipped_codecs.items():
        console.print(f"[dim]codec {escape(name)} skipped: {escape(why)}[/dim]")
    return 0


def cmd_unpack(args: argparse.Namespace) -> int:
    import modelpress

    path = modelpress.unpack(args.pack, args.output)
    _console().print(f"unpacked {escape(args.pack)} into {escape(str(path))} (every tensor matched its checksum)")
    return 0


def cmd_plugins_new(args: argparse.Namespace) -> int:
    from modelpress.app.scaffold import new_plugin

    target = new_plugin(args.name, args.dir)
    _console().print(f"wrote {target}/ (pyproject.toml, src/, tests/); next: pip install -e {target} && pytest {target}/tests")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from modelpress.plugin.registry import get_registry

    registry = get_registry()
    if args.json:
        data = [
            {
                "name": p.name,
                "distribution": p.distribution,
                "version": p.version,
                "builtin": p.builtin,
                "adapters": [a.name for a in p.adapters],
                "codecs": [{"name": c.name, "summary": c.summary} for c in p.codecs],
                "methods": [
                    {"kind": m.kind, "name": m.name, "summary": m.summary, "mutates": m.mutates, "options": m.option_rows()}
                    for m in p.methods
                ],
            }
            for p in registry.plugins.values()
        ]
        kinds = [{"name": k.name, "description": k.description, "columns": list(k.columns), "smaller": k.smaller, "plugin": k.plugin} for k in registry.kinds()]
        print(json.dumps({"plugins": data, "kinds": kinds, "skipped": registry.skipped, "failed": registry.failed}, indent=2))
        return 0
    from rich.table import Table

    console = _console()
    table = Table(title="installed plugins", title_justify="left")
    for col in ("plugin", "distribution", "version", "provides"):
        table.add_column(col)
    for p in registry.plugins.values():
        provides = [f"adapter {a.name}" for a in p.adapters] + [m.qualname for m in p.methods] + [f"codec {c.name}" for c in p.codecs]
        table.add_row(p.name + (" (built-in)" if p.builtin else ""), p.distribution, p.version, ", ".join(provides) or "-")
    console.print(table)
    for kind_info in registry.kinds():
        kind = kind_info.name
        methods = registry.methods(kind)
        if not methods:
            continue
        about = f" - {escape(kind_info.description)}" if kind_info.description else ""
        columns = f" [dim](reports {escape(', '.join(kind_info.columns))})[/dim]" if kind_info.columns else ""
        console.print(f"\n[bold]{kind}[/bold] methods{about}{columns}")
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
    if registry.failed:
        console.print("\n[bold red]failed to load[/bold red]")
        for name, why in registry.failed.items():
            console.print(f"  [bold]{escape(name)}[/bold]: {escape(why)}")
    return 0


def _capped_sample(path: str | None, limit: int = 256) -> Any:
    """The first ``limit`` samples of a data file, for the verification run (labels dropped)."""
    if not path:
        return None
    from modelpress.data.samples import LABELS, read_arrays

    data = read_arrays(Path(path), "sample")
    if isinstance(data, dict):
        return {k: v[:limit] for k, v in data.items() if k != LABELS}
    return data[:limit]


def cmd_apply(args: argparse.Namespace) -> int:
    import modelpress

    options = {**parse_option_pairs(args.option), **_generated_options(args)}
    _refuse_overwrite(args, args.model, args.calib, args.data, args.sample)
    model = modelpress.load(args.model, **_load_options(args))  # NOTE: a bad model is reported before a bad method
    options = _list_options(modelpress.get_registry().method(args.method, args.kind).options, options)
    result = modelpress.apply(
        model,
        args.method,
        kind=args.kind,
        options=options,
        calibration=args.calib,
        train=args.data,
        show_progress=not args.quiet,
        allow_no_gain=args.allow_no_gain,
    )
    record = result.provenance.passes[-1]
    if record.figures.get("criteria_met") is False and not getattr(args, "accept_loss", False):
        print(
            f"modelpress: error: {record.method} missed its accuracy criteria: {' '.join(str(record.figures.get('criteria')).split())}; "
            f"nothing written (rerun with --accept-loss to keep it)", file=sys.stderr,
        )
        return EXIT_CRITERIA
    sample = args.sample or _capped_sample(args.calib or args.data)
    exported = modelpress.export(result, args.output, verify=not args.no_verify, sample=sample, overwrite=args.overwrite,
                                 external_data=_EXTERNAL[args.external_data], show_progress=not args.quiet,
                                 accept_loss=getattr(args, "accept_loss", False))
    _print_result(result, exported)
    return 0


_EXTERNAL: dict[str, bool | str] = {"auto": "auto", "always": True, "never": False}
def _print_result(result: Any, exported: Any) -> None:
    console = _console()
    record = result.provenance.passes[-1]
    console.print(f"{record.kind}/{record.method} ({record.plugin} {record.plugin_version}) in {record.seconds:.2f}s")
    for key, value in record.figures.items():
        console.print(f"  {key}: {figure_text(value)}")
    data = f" + {exported.external_data.name}" if exported.external_data is not None else ""
    console.print(f"wrote {exported.path}{data} ({_human_bytes(exported.size_bytes)})")
    if record.figures.get("no_gain"):
        console.print(f"NO GAIN (written because of --allow-no-gain): {escape(str(record.figures['no_gain']))}")
    if exported.verification is not None:
        console.print(f"verified in ONNX Runtime against the input model in {exported.verification_seconds:.1f}s: {exported.verification.summary()}")


def cmd_quantize(args: argparse.Namespace) -> int:
    options = {**parse_option_pairs(args.option), **_generated_options(args)}
    if args.calibrator:
        options["calibrator"] = args.calibrator
    if args.per_tensor:
        options["per_channel"] = False
    if args.exclude:
        options["exclude"] = args.exclude
    args.kind, args.data = "quantize", None
    args.option = [f"{k}={json.dumps(v)}" for k, v in options.items()]
    _clear_generated(args)
    return cmd_apply(args)


def cmd_prune(args: argparse.Namespace) -> int:
    options = {**parse_option_pairs(args.option), **_generated_options(args)}
    for name in ("ratio", "sparsity", "criterion", "fine_tune_epochs"):
        value = getattr(args, name)
        if value is not None:
            options[name] = value
    args.kind, args.calib = "prune", None
    args.option = [f"{k}={json.dumps(v)}" for k, v in options.items()]
    _clear_generated(args)
    return cmd_apply(args)


def cmd_distill(args: argparse.Namespace) -> int:
    import modelpress

    options = parse_option_pairs(args.option)
    for name in ("width", "epochs", "temperature", "alpha", "lr"):
        value = getattr(args, name)
        if value is not None:
            options[name] = value
    _refuse_overwrite(args, args.model, None if args.student == "auto" else args.student, args.data, args.sample)
    teacher = modelpress.load(args.model, **_load_options(args))
    student: Any = "auto" if args.student == "auto" else modelpress.load(args.student)
    result = modelpress.distill(teacher, student, data=args.data, show_progress=not args.quiet, allow_no_gain=args.allow_no_gain, **options)
    sample = args.sample or _capped_sample(args.data)
    exported = modelpress.export(result, args.output, verify=not args.no_verify, sample=sample, overwrite=args.overwrite,
                                 external_data=_EXTERNAL[args.external_data], show_progress=not args.quiet)
    _print_result(result, exported)
    return 0


def _print_report(result: Any) -> None:
    console = _console()
    console.print(result.report.table())
    if result.interrupted:
        console.print("interrupted: the completed stages' files and a partial report were kept")


def cmd_compress(args: argparse.Namespace) -> int:
    import modelpress

    if len(args.model) > 1 or args.workers is not None or args.address is not None:
        return _cmd_compress_batch(args)
    args.model = args.model[0]
    _refuse_overwrite(args, args.model, args.recipe, args.sample)
    result = modelpress.compress(
        args.model, args.recipe, output=args.output, report_dir=args.report_dir, show_progress=not args.quiet,
        allow_imports=not args.no_imports, overwrite=args.overwrite,
        verify=not args.no_verify, sample=args.sample, external_data=_EXTERNAL[args.external_data],
        allow_no_gain=args.allow_no_gain,
    )
    _print_report(result)
    target = args.report_dir or str(Path(args.output).parent)
    _console().print(f"wrote {args.output} and report.md/.json/.html in {target}")
    return EXIT_INTERRUPTED if result.interrupted else 0


def _cmd_compress_batch(args: argparse.Namespace) -> int:
    from modelpress.app.tuning import compress_batch

    if Path(args.output).suffix.lower() == ".onnx":
        raise OptionsError(f"with several models (or --workers/--address) -o is a folder, not {args.output!r}")
    result = compress_batch(args.model, args.recipe, args.output, workers=args.workers, address=args.address, show_progress=not args.quiet)
    _console().print(result.table())
    _console().print(f"wrote one folder per model and summary.md/.json in {args.output}")
    if result.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_ERROR if result.failed else 0


def _fraction(text: str) -> float:
    text = text.strip()
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise OptionsError(f"--max-drop {text!r}: give a fraction (0.01) or a percentage (1%)") from None


def _megabytes(text: str) -> float:
    units = {"k": 1 / 1024, "m": 1, "g": 1024}
    t = text.strip().lower().rstrip("b")
    try:
        return float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise OptionsError(f"--trial-memory {text!r}: give a size like 4GB or 1500MB") from None


def cmd_tune(args: argparse.Namespace) -> int:
    from modelpress.app.tuning import parse_budget, tune

    if args.trials is not None and args.time is not None:
        budget: dict[str, float] = {"trials": args.trials, **parse_budget(args.time)}
    elif args.time is not None:
        budget = parse_budget(args.time)
    else:
        budget = {"trials": args.trials if args.trials is not None else 20}
    data = None if args.recipe and not args.eval else {"eval": args.eval, "calibration": args.calib, "train": args.train}
    if data is not None and not args.eval:
        raise OptionsError("tune needs --eval data (arrays named after the model inputs, `labels` for accuracy), or a --recipe with data.eval")
    timeout = parse_budget(args.trial_timeout).get("seconds") if args.trial_timeout else None
    result = tune(
        args.model, objective=args.objective, data=data, recipe=args.recipe, max_drop=_fraction(args.max_drop), budget=budget,
        metric=args.metric, strategy=args.strategy, output=args.output, workers=args.workers, address=args.address, fresh_workers=args.fresh_workers, storage=args.storage,
        study_name=args.study_name, trial_timeout=timeout, trial_memory_mb=_megabytes(args.trial_memory) if args.trial_memory else None,
        keep_trial_models=args.keep_trial_models, show_progress=not args.quiet,
    )
    console = _console()
    console.print(result.report.table())
    if result.model_path is not None:
        console.print(f"best model: {result.model_path} ({'meets' if result.meets else 'does NOT meet'} the criterion); "
                      f"recipe: {result.recipe_path}; reports: {Path(args.output) / 'report.html'} (.md, .json)")
    else:
        console.print(f"no trial completed; reports: {Path(args.output) / 'report.html'}")
    return EXIT_INTERRUPTED if result.interrupted else 0


def cmd_recipe_schema(args: argparse.Namespace) -> int:
    from modelpress.app.recipe import recipe_schema

    print(json.dumps(recipe_schema(), indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from modelpress.app.demo import run_demo

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
        from modelpress.data.samples import read_arrays

        data = read_arrays(Path(args.example), "example")
        options["example_inputs"] = tuple(data.values()) if isinstance(data, dict) else data
    if args.trust_pickle:
        options["trust_pickle"] = True
    if args.opset:
        options["opset"] = args.opset
    _refuse_overwrite(args, args.source, args.example, args.sample)
    result = modelpress.convert(args.source, args.output, to=args.to, sample=args.sample, overwrite=args.overwrite,
                                verify=not args.no_verify, external_data=_EXTERNAL[args.external_data], **options)
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
    p.add_argument("-O", "--option", action="append", metavar="NAME=VALUE", help="any other method option; VALUE is JSON or a plain string; a list option takes a,b,c or the flag repeated (-O exclude=a -O exclude=b)")
    p.add_argument("--sample", help=f".npz inputs for the verification run ({sample_help})")
    _add_writing_arguments(p)
    _add_overwrite_argument(p)
    p.add_argument("--allow-no-gain", action="store_true", help="write the result even if it is not smaller than the input (quantize) or the method changed nothing (default: exit 1)")
    p.add_argument("--no-normalize", action="store_true", help="ONNX input: skip normalisation on import (Constant weights to initializers, folding, BatchNorm fusion)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _add_writing_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-verify", action="store_true", help="skip the numerical check (ORT still loads the file)")
    p.add_argument("--external-data", choices=("auto", "always", "never"), default="auto",
                   help="weights in <output>.data beside the file: auto (when the input had external data or weights exceed ~1.5 GB), always, never")


def _add_overwrite_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--overwrite", action="store_true",
        help="allow OUT to be an input file (the model, its external data, or a data file); refused by default",
    )


def _kind_choices() -> list[str]:
    """The kinds the installed plugins provide (open: a plugin can add one)."""
    from modelpress.plugin.registry import get_registry

    return [k.name for k in get_registry().kinds()]


def _add_inspect(sub: Any, argv: Sequence[str]) -> None:
    p = sub.add_parser("inspect", help="op histogram, parameters, size, opset, inputs/outputs of a model")
    p.add_argument("model", help="model file (.onnx; other formats with their extras)")
    p.add_argument("--no-normalize", action="store_true", help="show the ONNX graph as stored, without normalisation on import")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--entropy", action="store_true", help="per tensor: order-0 entropy and the best lossless codec's ratio (runs every codec: slow on big models)")
    p.set_defaults(func=cmd_inspect)


def _add_pack(sub: Any, argv: Sequence[str]) -> None:
    p = sub.add_parser(
        "pack",
        help="losslessly pack an ONNX model's weights with entropy codecs into a .mpk container",
        description="Pack MODEL (.onnx, external data included) into OUT (.mpk): the graph plus each tensor coded by the "
        "installed codec that makes it smallest, with a checksum per tensor. `modelpress unpack` restores the file bit-exactly; "
        "`modelpress.load('x.mpk')` decodes it in memory.",
    )
    p.add_argument("model", help="input .onnx model")
    p.add_argument("-o", "--output", required=True, help="output .mpk path (written atomically)")
    p.add_argument("--codecs", default="auto", help="'auto' (every installed codec, default) or a comma-separated list of codec names")
    p.add_argument("--no-solid", action="store_true", help="never code same-dtype tensors together as one stream (keeps every tensor separately decodable)")
    p.add_argument("--prefer", choices=("speed", "size"), default="speed", help="speed (default): slow-to-decode codecs (lzma) only where they save >= 10%%; size: always the smallest")
    p.add_argument("--strip", action="store_true", help="drop metadata properties (of the model, graphs, nodes, values, tensors), doc strings and value_info first (the unpacked model computes the same, but is not the same file)")
    p.set_defaults(func=cmd_pack)



def _add_unpack(sub: Any, argv: Sequence[str]) -> None:
    p = sub.add_parser("unpack", help="restore the ONNX model of a .mpk container bit-exactly", description="Decode PACK and write the original ONNX file (and its external data) to OUT; every tensor is checked against its checksum (CRC-32; SHA-256 in format-1 packs).")
    p.add_argument("pack", help="input .mpk file")
    p.add_argument("-o", "--output", required=True, help="output .onnx path (written atomically)")
    p.set_defaults(func=cmd_unpack)


def _add_plugins(sub: Any, argv: Sequence[str]) -> None:
    p = sub.add_parser("plugins", help="installed plugins, their methods by kind and the methods' options; `plugins new NAME` scaffolds one")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=cmd_plugins)
    actions = p.add_subparsers(dest="plugins_action", metavar="ACTION", parser_class=_SubParser)
    new = actions.add_parser("new", help="scaffold a plugin package (pyproject entry point, a method, its test) that installs and passes its test",
                             description="Write the package modelpress-NAME: pip install it and `modelpress plugins` lists its method.")
    new.add_argument("name", help="plugin and method name: lower-case letters, digits, single hyphens (e.g. my-method)")
    new.add_argument("--dir", help="folder to create (default ./modelpress-NAME)")
    new.set_defaults(func=cmd_plugins_new)


def _add_convert(sub: Any, argv: Sequence[str]) -> None:
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
    _add_writing_arguments(p)
    p.add_argument("--opset", type=int, help="ONNX opset for the import")
    p.add_argument("--trust-pickle", action="store_true", help="allow .pt files holding a pickled full module (unpickling runs code)")
    _add_overwrite_argument(p)
    p.set_defaults(func=cmd_convert)


def _add_quantize(sub: Any, argv: Sequence[str]) -> None:
    p = sub.add_parser(
        "quantize",
        help="quantize (int8-static, int8-dynamic, int4-weight-only, int8-weight-only, fp16, codebook, plugins')",
        description="Quantize MODEL and write OUT, verified in ONNX Runtime against MODEL. Options of each method: `modelpress plugins`.",
    )
    p.add_argument("model", help="input model")
    p.add_argument("-o", "--output", required=True, help="output .onnx path (written atomically)")
    p.add_argument("-m", "--method", default="int8-static", help="quantize method (default: int8-static)")
    p.add_argument("--calib", help=".npz calibration data (arrays named after the model inputs)")
    p.add_argument("--calibrator", choices=("minmax", "percentile", "entropy", "mse", "auto"), help="int8-static: activation range calibrator (auto: per tensor, by the error it causes)")
    p.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor instead of per channel")
    p.add_argument("--exclude", nargs="+", metavar="NODE", help="node names to keep in float")
    p.add_argument("--accept-loss", action="store_true",
                   help=f"write the result even when it misses its accuracy criteria (otherwise: one line with the figures, exit {EXIT_CRITERIA})")
    _add_output_arguments(p, sample_help="default: the calibration data, else random")
    _add_method_options(p, argv, "quantize", "int8-static", "quantize")
    p.set_defaults(func=cmd_quantize)


def _add_prune(sub: Any, argv: Sequence[str]) -> None:
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
    _add_method_options(p, argv, "prune", "magnitude", "prune")
    p.set_defaults(func=cmd_prune)


def _add_distill(sub: Any, argv: Sequence[str]) -> None:
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


def _add_compress(sub: Any, argv: Sequence[str]) -> None:
    p = sub.add_parser(
        "compress",
        help="run a recipe (quantize / prune / distill passes) and report every stage",
        description="Run the passes of RECIPE on MODEL, evaluating after the source and each stage (metric, size, latency, time); "
        "write the final model to OUT and report.md/.json/.html. A recipe is code: its pkg.module:function entries "
        "import and run Python; use --no-imports for a recipe you did not write.",
    )
    p.add_argument("model", nargs="+", help="input model; several models (or --workers) make a batch job: -o is then a folder")
    p.add_argument("-r", "--recipe", required=True, help="recipe file (.yaml or .json); see `modelpress recipe-schema`")
    p.add_argument("-o", "--output", required=True, help="final .onnx path; each stage goes to <stem>-stages/ (batch: an output folder, one subfolder per model)")
    p.add_argument("--report-dir", help="folder for report.md/.json/.html (default: the output's folder)")
    p.add_argument(
        "--no-imports", action="store_true",
        help="for recipes you did not write: a recipe is code (pkg.module:function entries are imported and run); "
        "refuse such entries and data paths outside the recipe's folder",
    )
    p.add_argument("--sample", help=".npz inputs for each stage's verification run (default: the recipe's evaluation data, else generated)")
    _add_writing_arguments(p)
    _add_overwrite_argument(p)
    p.add_argument("--allow-no-gain", action="store_true", help="continue past a stage whose result is not smaller / unchanged (flagged in the report; default: stop, exit 1)")
    p.add_argument("--workers", type=int, help="batch: models compressed in parallel (Ray local, default: the machine's cores)")
    p.add_argument("--address", help="batch: attach to a Ray cluster (ray://HOST:PORT) instead of starting one")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_compress)


def _add_tune(sub: Any, argv: Sequence[str]) -> None:
    p = sub.add_parser(
        "tune",
        help="search compression configurations for the smallest/fastest model within an accuracy drop (on Ray)",
        description="Try compression configurations (a default space from the installed methods that fit MODEL and the data, or a "
        "recipe with `search:` options) as Ray tasks; keep the best that loses at most --max-drop of the metric. Always writes the best "
        "so far (labelled meets / does not meet), its recipe, the Pareto front and every trial to OUT_DIR. Rerun to resume.",
    )
    p.add_argument("model", help="input model")
    p.add_argument("--eval", help=".npz evaluation data (`labels` for the accuracy metric)")
    p.add_argument("--calib", help=".npz calibration data (default: the evaluation data)")
    p.add_argument("--train", help=".npz training data: enables fine-tuning, distillation")
    p.add_argument("--recipe", help="recipe whose options may be {search: [choices]} or {search: {low, high, step}} (replaces the default space)")
    p.add_argument("--max-drop", default="1%", help="largest allowed metric drop: 1%% or 0.01 (default 1%%)")
    p.add_argument("--metric", help="accuracy (default with labels), agreement (default without), cosine, mse or pkg.module:function")
    p.add_argument("--objective", choices=("size", "latency", "both"), default="size", help="what to minimise (default size)")
    p.add_argument("--strategy", choices=("pareto", "accuracy-first"), default="pareto",
                   help="pareto: Optuna TPE (NSGA-II for both) over the space; accuracy-first: most aggressive first, then fall back")
    p.add_argument("--trials", type=int, help="trial budget (default 20; counts trials of a resumed study)")
    p.add_argument("--time", help="time budget for this run, e.g. 90s, 20m, 1.5h")
    p.add_argument("--workers", type=int, help="trials in parallel (Ray local CPUs; default: the machine's cores)")
    p.add_argument("--address", help="attach to a Ray cluster (ray://HOST:PORT) instead of starting one")
    p.add_argument("--fresh-workers", action="store_true", help="run every trial in a new worker process (default: workers are kept between trials, imports paid once)")
    p.add_argument("--storage", help="Optuna storage URL (default sqlite:///OUT_DIR/study.db)")
    p.add_argument("--study-name", default="modelpress-tune", help="study name inside the storage")
    p.add_argument("--trial-timeout", help="time limit per trial (e.g. 10m); a trial over it is recorded as failed")
    p.add_argument("--trial-memory", help="memory limit per trial (e.g. 4GB); a trial over it is recorded as failed")
    p.add_argument("--keep-trial-models", action="store_true", help="keep every trial's model (default: the Pareto front and the best)")
    p.add_argument("-o", "--output", required=True, help="output folder (best.onnx, best-recipe.yaml, report.md/.json/.html, study.db)")
    p.add_argument("-q", "--quiet", action="store_true", help="no live table / log lines")
    p.set_defaults(func=cmd_tune)


def _add_recipe_schema(sub: Any, argv: Sequence[str]) -> None:
    p = sub.add_parser("recipe-schema", help="print the JSON Schema of recipes")
    p.set_defaults(func=cmd_recipe_schema)


def _add_demo(sub: Any, argv: Sequence[str]) -> None:
    p = sub.add_parser(
        "demo",
        help="train a CNN on scikit-learn's digits, then prune -> distill -> quantize it and report (nothing downloaded)",
    )
    p.add_argument("--out", default="modelpress-demo", help="output folder (default ./modelpress-demo)")
    p.add_argument("--fast", action="store_true", help="fewer epochs (same code path)")
    p.add_argument("--framework", choices=("torch", "tensorflow"), help="framework to train with (default: torch if installed)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)


def _add_apply(sub: Any, argv: Sequence[str]) -> None:
    p = sub.add_parser(
        "apply",
        help="apply one method (built-in or from a plugin) and export verified ONNX",
        description="Apply one compression method to MODEL and write the result to OUT, verified in ONNX Runtime against MODEL.",
    )
    p.add_argument("model", help="input model")
    p.add_argument("-m", "--method", required=True, help="method name (see `modelpress plugins`)")
    p.add_argument("-k", "--kind", choices=_kind_choices(), help="method kind, when a name exists in several (every installed kind; see `modelpress plugins`)")
    p.add_argument("-o", "--output", required=True, help="output .onnx path (written atomically)")
    p.add_argument("--calib", help=".npz calibration data (arrays named after the model inputs)")
    p.add_argument("--data", help=".npz training data (inputs and optionally `labels`)")
    p.add_argument("--accept-loss", action="store_true", help=f"write the result even when it misses its accuracy criteria (otherwise exit {EXIT_CRITERIA})")
    _add_output_arguments(p, sample_help="default: the calibration or training data, else random inputs from the signature")
    _add_method_options(p, argv, "apply", None)
    p.set_defaults(func=cmd_apply)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The command line; ``argv`` (default: ``sys.argv[1:]``) picks the method whose options become flags."""
    from modelpress import __version__

    parser = _Parser(
        prog="modelpress",
        description="Compress PyTorch, Keras and ONNX models (quantize, prune, distill); every output is verified in ONNX Runtime.",
        epilog=EXIT_CODES_HELP + " An output is never written over an input file unless --overwrite is given.",
    )
    parser.add_argument("--version", action="version", version=f"modelpress {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="print the full traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_SubParser)

    argv = list(sys.argv[1:] if argv is None else argv)
    _add_inspect(sub, argv)
    _add_pack(sub, argv)
    _add_unpack(sub, argv)
    _add_plugins(sub, argv)
    _add_convert(sub, argv)
    _add_quantize(sub, argv)
    _add_prune(sub, argv)
    _add_distill(sub, argv)
    _add_compress(sub, argv)
    _add_tune(sub, argv)
    _add_recipe_schema(sub, argv)
    _add_demo(sub, argv)
    _add_apply(sub, argv)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (see the module docstring)."""
    verbose = False
    warnings.showwarning = _show_warning
    try:
        parser = build_parser(argv)
        args = parser.parse_args(argv)
        verbose = bool(getattr(args, "verbose", False))
        if not getattr(args, "func", None):
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        return int(args.func(args) or 0)
    except ModelpressError as exc:
        if verbose:
            traceback.print_exc()
        print(f"modelpress: error: {one_line(exc, 2000)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("modelpress: interrupted; nothing was written for the unfinished step", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # NOTE: a bug, not bad input: still one line unless --verbose
        if verbose:
            traceback.print_exc()
        print(f"modelpress: internal error (a bug in modelpress {_version()}, please report it): "
              f"{type(exc).__name__}: {one_line(exc, 300)}; rerun with -v for the traceback", file=sys.stderr)
        return EXIT_INTERNAL


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None, line: str | None = None) -> None:
    """Warnings (a damaged optional metadata entry, ...) as one line, like errors."""
    print(f"modelpress: warning: {one_line(message, 2000)}", file=sys.stderr)


def _version() -> str:
    try:
        from modelpress import __version__

        return __version__
    except Exception:  # pragma: no cover - a broken install
        return "?"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
