"""``apply``, ``quantize``, ``prune``, ``distill``: one command that applies a method and exports
verified ONNX. ``quantize``/``prune``/``distill`` are ``apply`` with the kind fixed and a default
method; every method option is a flag generated from the chosen method's schema (see
:mod:`modelpress.cli.options`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from modelpress.base.errors import AccuracyLossError, ModelpressError
from modelpress.cli.common import (
    EXTERNAL,
    Command,
    add_output_arguments,
    add_seq_len_argument,
    add_task_argument,
    capped_sample,
    console,
    escape,
    human_bytes,
    load_options,
    print_wrapped,
    refuse_overwrite,
)
from modelpress.cli.options import add_method_flags, method_options, method_probe

__all__ = ["COMMANDS"]


@dataclass(frozen=True)
class MethodCommand:
    """What differs between apply/quantize/prune/distill: the kind (None: ``-k`` picks it), the
    default method and the data flag (``--calib`` for calibration, ``--data`` for training)."""

    kind: str | None
    data_flags: tuple[str, ...] = ("calib", "data")

    @property
    def default(self) -> str | None:
        """The method the kind's plugins declare its default (``kind_default``); none for ``apply``."""
        if self.kind is None:
            return None
        from modelpress.app.pipeline import default_method

        return default_method(self.kind).name

    def arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "model",
            metavar="TEACHER" if self.kind == "distill" else "MODEL",
            help="input model (any format modelpress loads)",
        )
        p.add_argument(
            "-o", "--output", required=True, help="output .onnx path (written atomically)"
        )
        # NOTE: the default is read from the installed plugins when the command runs (not to build --help)
        default = (
            f" (default: the {self.kind} method its plugin declares the default)"
            if self.kind
            else ""
        )
        p.add_argument(
            "-m",
            "--method",
            required=self.kind is None,
            help=f"method name{default}; see `modelpress plugins`",
        )
        if self.kind is None:
            p.add_argument(
                "-k",
                "--kind",
                help="method kind, when a name exists in several (see `modelpress plugins`)",
            )
        if "calib" in self.data_flags:
            p.add_argument(
                "--calib",
                help=".npz calibration data (arrays named after the model inputs), or a file an installed "
                "plugin reads (a .txt/.jsonl corpus for a Hugging Face checkpoint)",
            )
        add_seq_len_argument(p)
        if "data" in self.data_flags:
            p.add_argument(
                "--data",
                required=self.kind == "distill",
                help=".npz training data: arrays named after the inputs, optionally `labels`",
            )
        if self.kind == "distill":
            p.add_argument(
                "--student",
                default="auto",
                help="'auto' (the teacher narrowed to --width) or a student model file",
            )
        add_output_arguments(
            p,
            sample_help="default: the calibration or training data, else random inputs from the signature",
        )
        add_task_argument(p)

    def extend(self, p: argparse.ArgumentParser, argv: Sequence[str]) -> None:
        """Stage two of the parse: the chosen method's options as flags (and ``-k``'s installed kinds)."""
        from modelpress.plugin.registry import get_registry

        registry = get_registry()
        name, kind = method_probe(argv, default=self.default, kind=self.kind)
        kinds = [k.name for k in registry.kinds()]
        if (
            self.kind is None and kind is not None and kind not in kinds
        ):  # NOTE: the kinds are open: the installed plugins' kinds
            p.error(
                f"argument -k/--kind: invalid choice: {kind!r} (choose from {', '.join(kinds)})"
            )
        if not name:
            return
        try:
            method = registry.method(name, kind)
        except ModelpressError:
            return  # NOTE: the command reports the unknown method (with suggestions) when it runs
        add_method_flags(p, method)


def _run_method(
    args: argparse.Namespace, model: Any, method: Any, options: dict[str, Any], calib: Any
) -> Any:
    """The method on the model: distill with its student (auto, or the model --student names), else apply."""
    import modelpress

    common = {"show_progress": not args.quiet, "allow_no_gain": args.allow_no_gain}
    if SPECS[args.command].kind == "distill":
        student = getattr(args, "student", "auto")
        given: Any = (
            "auto" if student == "auto" else modelpress.load(student, show_progress=not args.quiet)
        )
        options.pop("student", None)  # NOTE: --student says it (auto, or the model given)
        return modelpress.distill(
            model, given, data=args.data, method=method.name, **common, **options
        )
    return modelpress.apply(
        model,
        method,
        options=options,
        calibration=calib,
        train=getattr(args, "data", None),
        **common,
    )


def run(args: argparse.Namespace) -> int:
    """Load, apply the method with the options of the command line, export verified, print the result."""
    import modelpress

    spec = SPECS[args.command]
    student = getattr(args, "student", "auto")
    refuse_overwrite(
        args,
        args.model,
        getattr(args, "calib", None),
        getattr(args, "data", None),
        args.sample,
        None if student == "auto" else student,
    )
    model = modelpress.load(
        args.model, **load_options(args)
    )  # NOTE: a bad model is reported before a bad method
    kind = spec.kind or args.kind
    method = modelpress.get_registry().method(args.method or spec.default, kind)
    options = method_options(method.options, args.option, args)
    # NOTE: read once (a text corpus is tokenised by its plugin), for the method and the verification sample
    calib = modelpress.get_registry().load_data(
        getattr(args, "calib", None), model, "calibration", args.seq_len
    )
    result = _run_method(args, model, method, options, calib)
    _refuse_missed_criteria(result, args.accept_loss)
    text = _judge_text(model, result, args)
    sample = args.sample or capped_sample(
        calib if calib is not None else getattr(args, "data", None)
    )
    exported = modelpress.export(
        result,
        args.output,
        verify=not args.no_verify,
        sample=sample,
        overwrite=args.overwrite,
        external_data=EXTERNAL[args.external_data],
        show_progress=not args.quiet,
        accept_loss=args.accept_loss,
    )
    print_result(result, exported, quiet=args.quiet)
    if text and not args.quiet:  # NOTE: -q keeps its one line
        from modelpress.evaluation.text import text_summary

        print_wrapped(
            console(),
            "text (held-out calibration text, ONNX Runtime): " + text_summary(text),
            indent=2,
        )
    return 0


def _judge_text(model: Any, result: Any, args: argparse.Namespace) -> dict[str, Any] | None:
    """A text decoder calibrated on a corpus: its perplexity and greedy tokens on the held-out part of
    the corpus against the input's, held to the thresholds its method declares (exit 4 unless --accept-loss)."""
    import modelpress
    from modelpress.evaluation.text import (
        TextEvaluation,
        is_decoder,
        text_floor,
        text_misses,
        text_summary,
    )

    if not getattr(args, "calib", None) or not is_decoder(model.signature):
        return None
    held_out = modelpress.get_registry().load_data(args.calib, model, "held-out", args.seq_len)
    if held_out is None:
        return None
    figures: dict[str, Any] = TextEvaluation(model, held_out).measure(result)
    missed = text_misses(figures, text_floor(result.provenance))
    if missed is not None and not args.accept_loss:
        raise AccuracyLossError(
            f"{result.provenance.passes[-1].method} misses its text criteria on the held-out calibration text: {missed} "
            f"({text_summary(figures)}); nothing was written. Ways forward: a gentler method or options, "
            "more calibration text, or keep the result with --accept-loss"
        )
    return {**figures, "loss_accepted": missed} if missed else figures


def _refuse_missed_criteria(result: Any, accept_loss: bool) -> None:
    """A method that judged its own result and says it missed its criteria (``criteria_met`` False in
    its figures, the documented key) is refused like a missed floor at export: exit 4, the routes named."""
    record = result.provenance.passes[-1]
    if record.criteria_missed is not None and not accept_loss:
        raise AccuracyLossError(
            f"{record.method} missed its accuracy criteria: {record.criteria_missed}; "
            "nothing was written. Ways forward: give fine-tuning or more calibration data, loosen the criteria "
            "(-O criteria=...), or keep the result with --accept-loss"
        )


def print_result(result: Any, exported: Any, *, quiet: bool = False) -> None:
    """The pass, its figures, the file written and its verification; ``quiet``: the last two, one line."""
    from modelpress.app.report import figure_text

    out = console()
    record = result.provenance.passes[-1]
    data = f" + {exported.external_data.name}" if exported.external_data is not None else ""
    if quiet:  # NOTE: one line, however long
        verified = (
            f"; verified in ONNX Runtime: {exported.verification.summary()}"
            if exported.verification is not None
            else ""
        )
        no_gain = (
            f"; NO GAIN (written because of --allow-no-gain): {record.figures['no_gain']}"
            if record.figures.get("no_gain")
            else ""
        )
        out.print(
            f"{record.kind}/{record.method}: wrote {escape(exported.path)}{escape(data)} ({human_bytes(exported.size_bytes)})"
            f"{escape(verified)}{escape(no_gain)}",
            soft_wrap=True,
        )
        return
    out.print(
        f"{record.kind}/{record.method} ({record.plugin} {record.plugin_version}) in {record.seconds:.2f}s"
    )
    for key, value in record.figures.items():
        print_wrapped(out, f"  {key}: {figure_text(value)}", indent=6)
    out.print(f"wrote {escape(exported.path)}{escape(data)} ({human_bytes(exported.size_bytes)})")
    if record.figures.get("no_gain"):
        out.print(
            f"NO GAIN (written because of --allow-no-gain): {escape(record.figures['no_gain'])}"
        )
    if exported.verification is not None:
        print_wrapped(
            out,
            f"verified in ONNX Runtime against the input model in {exported.verification_seconds:.1f}s: "
            f"{exported.verification.summary()}",
            indent=2,
        )


SPECS = {
    "apply": MethodCommand(kind=None),
    "quantize": MethodCommand(kind="quantize", data_flags=("calib",)),
    "prune": MethodCommand(kind="prune", data_flags=("data",)),
    "distill": MethodCommand(kind="distill", data_flags=("data",)),
}

COMMANDS = (
    Command(
        "quantize",
        "quantize with an installed method (`modelpress plugins` lists them)",
        SPECS["quantize"].arguments,
        run,
        "Quantize MODEL and write OUT, verified in ONNX Runtime against MODEL. `modelpress quantize -m METHOD --help` lists the method's options.",
        SPECS["quantize"].extend,
    ),
    Command(
        "prune",
        "prune with an installed method (`modelpress plugins` lists them)",
        SPECS["prune"].arguments,
        run,
        "Prune MODEL and write OUT, verified in ONNX Runtime against MODEL. `modelpress prune -m METHOD --help` lists the method's options.",
        SPECS["prune"].extend,
    ),
    Command(
        "distill",
        "knowledge distillation: train a student (or an automatic narrower one) from TEACHER",
        SPECS["distill"].arguments,
        run,
        "Distill TEACHER into a student and write it to OUT, verified in ONNX Runtime against the teacher.",
        SPECS["distill"].extend,
    ),
    Command(
        "apply",
        "apply one method (built-in or from a plugin) and export verified ONNX",
        SPECS["apply"].arguments,
        run,
        "Apply one compression method to MODEL and write the result to OUT, verified in ONNX Runtime against MODEL. "
        "`modelpress apply -m METHOD --help` lists the method's options.",
        SPECS["apply"].extend,
    ),
)
