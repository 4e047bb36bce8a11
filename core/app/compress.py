"""``modelpress.compress``: run a recipe stage by stage, evaluating after the source and each stage."""

from __future__ import annotations

import os
import time
import uuid
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modelpress.app.pipeline import apply
from modelpress.app.recipe import PassSpec, Recipe, load_recipe, resolve_callable
from modelpress.app.report import Report, looks_slower, side_by_side
from modelpress.base.errors import AccuracyLossError, ModelpressError, NoGainError, OptionsError
from modelpress.data.samples import (
    Dataset,
    declared_axis_sizes,
    index_limits,
    load_dataset,
    sample_inputs,
)
from modelpress.evaluation.criteria import EVALUATE_METRICS, score
from modelpress.evaluation.text import TextEvaluation, is_decoder, text_floor, text_misses
from modelpress.io.export import export
from modelpress.io.safety import model_files, refuse_overwrite
from modelpress.ir.model import Model
from modelpress.plugin.registry import HELD_OUT, Registry, get_registry

__all__ = [
    "CompressResult",
    "PassData",
    "StageMetrics",
    "compress",
    "latency_runs",
    "measure_latency",
    "read_data",
    "run_pass",
]


@dataclass
class StageMetrics:
    """What one stage produced, measured the same way for every stage."""

    stage: str
    metric: str
    value: float | None
    size_bytes: int
    zip_bytes: int
    parameters: int
    sparsity: float
    latency_ms: dict[str, float]
    seconds: float
    path: str
    figures: dict[str, Any] = field(default_factory=dict)
    packed_bytes: int | None = None
    kind: str = ""  # the pass kind that made the stage ("" for the source)
    # NOTE: per latency key, the interquartile range (ms) of the timed runs: the noise band a
    # slowdown must exceed before the report flags it (empty: not measured, 5 % alone decides)
    latency_iqr_ms: dict[str, float] = field(default_factory=dict)
    # NOTE: where the stage looked slower than the one before it: both files re-timed side by side,
    # {key: [before's median, this stage's median, noise band]}; the report flags only what this confirms
    latency_recheck_ms: dict[str, list[float]] = field(default_factory=dict)
    # NOTE: a text decoder's figures on the evaluation text (modelpress.evaluation.text.TextEvaluation.measure):
    # perplexity, perplexity_increase, token_agreement, decode_tokens_per_s; empty for other models
    text: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CompressResult:
    model: Model
    stages: list[StageMetrics]
    report: Report
    output: Path | None
    interrupted: bool = False
    packed: Path | None = None


def _pack_stage(recipe: Recipe, stage: StageMetrics, path: Path, registry: Registry) -> Path | None:
    """With a recipe ``pack`` stage: pack the stage's file to ``.mpk`` beside it and record the size."""
    if recipe.pack is None:
        return None
    from modelpress.packing.container import pack

    result = pack(path, path.with_suffix(".mpk"), codecs=recipe.pack.codecs, registry=registry)
    stage.packed_bytes = result.size_bytes
    return result.path


def measure_latency(
    path: str | os.PathLike[str], feeds: dict[str, np.ndarray], *, threads: int, repeats: int
) -> float:
    """Median wall time (ms) of ``repeats`` ORT runs after 2 warm-ups, on ``threads`` intra-op threads."""
    return float(np.median(latency_runs(path, feeds, threads=threads, repeats=repeats)))


def latency_runs(
    path: str | os.PathLike[str], feeds: dict[str, np.ndarray], *, threads: int, repeats: int
) -> list[float]:
    """Wall time (ms) of each of ``repeats`` ORT runs after 2 warm-ups, on ``threads`` intra-op
    threads: :func:`measure_latency` is their median, their interquartile range the noise band."""
    from modelpress.runtime.session import make_session

    session = make_session(
        path, threads=threads
    )  # NOTE: session.run below, not runtime.run: no timer in the timing
    for _ in range(2):
        session.run(None, feeds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - start) * 1000)
    return times


def latency_side_by_side(
    before: str | os.PathLike[str],
    stage: str | os.PathLike[str],
    feeds: dict[str, np.ndarray],
    *,
    threads: int,
    repeats: int,
) -> list[float]:
    """Time two files in turns, 3 rounds of ``repeats`` runs each, so a busy moment of the machine
    falls on both: ``[before's median, stage's median, noise band]`` (see :func:`side_by_side`)."""
    rounds: tuple[list[list[float]], list[list[float]]] = ([], [])
    for _ in range(3):
        for runs, path in zip(rounds, (before, stage), strict=True):
            runs.append(latency_runs(path, feeds, threads=threads, repeats=repeats))
    return side_by_side(*rounds)


def _sparsity(model: Model) -> float:
    total = zeros = 0
    for layer in model.weighted_layers():
        tensor = layer.weight.const_value
        if tensor is not None and tensor.dtype.is_floating_point():
            w = tensor.numpy()
            total += w.size
            zeros += int(np.count_nonzero(w == 0))
    return zeros / total if total else 0.0


class _Evaluator:
    def __init__(self, recipe: Recipe, source: Model, eval_data: Dataset | None):
        from modelpress.runtime.session import make_session, run_dataset

        self.recipe = recipe
        self.settings = recipe.evaluate
        self.data = eval_data
        metric = self.settings.metric
        self.custom = resolve_callable(metric) if metric not in EVALUATE_METRICS else None
        if metric == "accuracy" and (eval_data is None or eval_data.labels is None):
            raise OptionsError(
                "metric 'accuracy' needs evaluation data with an array named 'labels'"
            )
        # NOTE: generated inputs have the sizes the model declares for named axes (a KV cache's mask spans past + new tokens)
        self.batches = (
            list(eval_data.batches(256))
            if eval_data is not None
            else [
                sample_inputs(
                    source.signature,
                    batch=16,
                    limits=index_limits(source.ir.graph),
                    axis_sizes=declared_axis_sizes(source.provenance.extra),
                )
            ]
        )
        self.reference = run_dataset(make_session(source), self.batches)
        feeds = self.batches[0]
        self.latency_feeds = {
            "b1": {k: v[:1] for k, v in feeds.items()},
            f"b{self.settings.batch_size}": {
                k: np.resize(v, (self.settings.batch_size, *v.shape[1:])) for k, v in feeds.items()
            },
        }

    def metric(self, path: Path) -> float:
        from modelpress.runtime.session import make_session, run_dataset

        outputs = run_dataset(make_session(path), self.batches)
        labels = self.data.labels if self.data is not None else None
        if self.custom is not None:
            return float(self.custom(outputs, labels, self.reference))
        return score(self.settings.metric, self.reference[0], outputs[0], labels)

    def measure(
        self,
        stage: str,
        model: Model,
        path: Path,
        seconds: float,
        figures: dict[str, Any],
        kind: str = "",
    ) -> StageMetrics:
        data = path.read_bytes()
        data_file = path.with_name(path.name + ".data")
        if data_file.exists():
            data += data_file.read_bytes()
        runs = {
            f"{name} ({self.settings.threads}t)": latency_runs(
                path, feeds, threads=self.settings.threads, repeats=self.settings.repeats
            )
            for name, feeds in self.latency_feeds.items()
        }
        latency = {key: float(np.median(times)) for key, times in runs.items()}
        iqr = {
            key: float(np.subtract(*np.percentile(times, [75, 25]))) for key, times in runs.items()
        }
        return StageMetrics(
            stage=stage,
            metric=self.settings.metric,
            value=self.metric(path),
            size_bytes=len(data),
            zip_bytes=len(zlib.compress(data, 6)),
            parameters=model.parameter_count(),
            sparsity=round(_sparsity(model), 4),
            latency_ms=latency,
            seconds=round(seconds, 3),
            path=str(path),
            figures=figures,
            kind=kind,
            latency_iqr_ms=iqr,
        )

    def recheck(self, before: StageMetrics, stage: StageMetrics) -> None:
        """Where ``stage`` looks slower than ``before``, time both files again side by side (in
        turns, so a busy moment of the machine falls on both) and keep that in ``latency_recheck_ms``."""
        threads, repeats = self.settings.threads, max(3, self.settings.repeats // 3)
        for name, feeds in self.latency_feeds.items():
            key = f"{name} ({threads}t)"
            if key not in stage.latency_ms or not looks_slower(before, stage, key):
                continue
            stage.latency_recheck_ms[key] = latency_side_by_side(
                before.path, stage.path, feeds, threads=threads, repeats=repeats
            )


@dataclass(frozen=True)
class PassData:
    """What every recipe pass of one run is given besides the model: the recipe's data sources
    (resolved), the registry, and whether to show progress."""

    calibration: Any = None
    train: Any = None
    eval_source: Any = None
    show_progress: bool = True
    registry: Registry | None = None


def read_data(
    recipe: Recipe, source: Model, registry: Registry, *, show_progress: bool = True
) -> PassData:
    """The recipe's data for ``source``, read once: a file only a plugin reads (a text corpus) becomes
    arrays (``data.sequence_length`` tokens per sample). Without evaluation data, the part of a
    calibration file its plugin held out of the calibration is the evaluation data."""
    length = recipe.data.sequence_length
    calibration_path = recipe.resolve(recipe.data.calibration)
    calibration = registry.load_data(calibration_path, source, "calibration", length)
    evaluation = registry.load_data(recipe.resolve(recipe.data.eval), source, "evaluation", length)
    if evaluation is None and calibration_path is not None:
        evaluation = registry.load_data(calibration_path, source, HELD_OUT, length)
    return PassData(
        calibration=calibration,
        train=registry.load_data(recipe.resolve(recipe.data.train), source, "training", length),
        eval_source=evaluation,
        show_progress=show_progress,
        registry=registry,
    )


def run_pass(
    spec: PassSpec,
    index: int,
    current: Model,
    source: Model,
    data: PassData,
    *,
    allow_no_gain: bool = False,
    stage: str | None = None,
) -> Model:
    """Apply recipe pass ``index`` to ``current`` (a distill pass trains it with ``source`` as teacher).

    The one place a recipe pass runs: ``compress`` and each ``tune`` trial call it, so a tuned
    configuration written as a recipe reproduces the same model.
    """
    registry = data.registry or get_registry()
    options = dict(spec.options)
    extra: dict[str, Any] = {}
    model_in = current
    method = registry.method(spec.method, spec.kind)
    if (
        method.uses_reference
    ):  # e.g. distillation: the source is the teacher, the current model the student
        reference = options.pop(method.reference_option, "source")
        if reference != "source":
            raise OptionsError(
                f"recipe pass {index}: {method.reference_option} must be 'source' (the model the recipe started from)"
            )
        for key, value in method.reference_options:
            options.setdefault(key, value)
        extra["current"] = current
        model_in = source
    result = apply(
        model_in,
        method,
        kind=spec.kind,
        options=options,
        calibration=data.calibration,
        train=data.train,
        eval=data.eval_source,
        show_progress=data.show_progress,
        registry=registry,
        extra=extra,
        allow_no_gain=allow_no_gain,
        stage=stage or spec.name or f"{spec.kind}/{spec.method}",
    )
    if method.uses_reference:  # NOTE: the result's history continues the current model's
        result.provenance = current.provenance.with_pass(result.provenance.passes[-1])
    return result


@dataclass(frozen=True)
class _Outputs:
    """Where a :func:`compress` run writes (``output``, ``report_dir``), what verifies its
    exports (``sample``) and the options every export of the run gets."""

    output: str | os.PathLike[str] | None
    report_dir: str | os.PathLike[str] | None
    sample: Any
    export_options: dict[str, Any]


class _Run:
    """One :func:`compress` run: where its files go, its data, evaluator and report, the stages so far."""

    def __init__(
        self,
        recipe: Recipe,
        source: Model,
        registry: Registry,
        outputs: _Outputs,
        *,
        show_progress: bool,
    ) -> None:
        self.recipe, self.source, self.registry, self.show_progress = (
            recipe,
            source,
            registry,
            show_progress,
        )
        output, report_dir, sample = outputs.output, outputs.report_dir, outputs.sample
        self.out_path = Path(output) if output is not None else None
        base = self.out_path.parent if self.out_path is not None else Path(report_dir or ".")
        stem = self.out_path.stem if self.out_path is not None else "model"
        self.stages_dir = base / f"{stem}-stages"
        self.stages_dir.mkdir(parents=True, exist_ok=True)
        self.reports_at = Path(report_dir) if report_dir is not None else base
        self.reports_at.mkdir(parents=True, exist_ok=True)

        self.data = read_data(recipe, source, registry, show_progress=show_progress)
        self.eval_source = self.data.eval_source
        eval_data = (
            load_dataset(self.eval_source, source.signature, what="evaluation").take(
                recipe.evaluate.max_samples
            )
            if self.eval_source is not None
            else None
        )
        # NOTE: verification data for every export after the source's: the caller's, or the evaluation data's first 64
        self.sample = (
            sample if sample is not None else eval_data.take(64) if eval_data is not None else None
        )
        self.evaluator = _Evaluator(recipe, source, eval_data)
        # NOTE: a text decoder is also judged on its text (perplexity, greedy tokens) when there is evaluation text
        self.text = (
            TextEvaluation(source, eval_data.inputs)
            if eval_data is not None and not eval_data.ragged and is_decoder(source.signature)
            else None
        )
        self.report = Report(
            title=f"modelpress: {source.name}",
            metric=recipe.evaluate.metric,
            kind_columns={k.name: k.columns for k in registry.kinds()},
        )
        # NOTE: verify, external_data, overwrite: the same for every export of the run
        self.export_options = {
            **outputs.export_options,
            "show_progress": show_progress,
            "registry": registry,
        }
        self.stages: list[StageMetrics] = []

    def record(
        self,
        label: str,
        model: Model,
        path: Path,
        seconds: float,
        figures: dict[str, Any],
        kind: str = "",
        text: dict[str, Any] | None = None,
    ) -> None:
        """Measure a stage's exported file, pack it if the recipe says so and add it to the report."""
        self.stages.append(self.evaluator.measure(label, model, path, seconds, figures, kind))
        self.stages[-1].text = dict(text or {})
        if len(self.stages) > 1:
            self.evaluator.recheck(self.stages[-2], self.stages[-1])
        _pack_stage(self.recipe, self.stages[-1], path, self.registry)
        self.report.add(self.stages[-1])

    def source_stage(self) -> None:
        """Export the source as stage 0 (not verified: it is the reference) and measure it."""
        path = self.stages_dir / "00-source.onnx"
        export(self.source, path, **{**self.export_options, "verify": False})
        self.record(
            "source",
            self.source,
            path,
            0.0,
            {},
            text=self.text.reference_figures(path) if self.text is not None else None,
        )

    def judge_text(self, index: int, label: str, result: Model) -> dict[str, Any] | None:
        """A text decoder's figures on the evaluation text, judged against the thresholds its passes
        declared (:attr:`Method.text_floor`): a miss stops the run (report written, nothing exported
        for the stage) with :class:`AccuracyLossError`, unless ``accept_loss``."""
        if self.text is None:
            return None
        figures = self.text.measure(result)
        missed = text_misses(figures, text_floor(result.provenance, self.registry))
        if missed is None:
            return figures
        if self.export_options.get("accept_loss"):
            return {**figures, "loss_accepted": missed}
        self.report.status = (
            f"stopped at stage {index} ({label}): misses its text criteria: {missed}"
        )
        self.report.write(self.reports_at)
        raise AccuracyLossError(
            f"{label} misses its text criteria on the evaluation text: {missed}; nothing was written for it. "
            f"Ways forward: a gentler method or options, more calibration text, or keep it with --accept-loss; report in {self.reports_at}"
        )

    def stage(self, index: int, spec: PassSpec, current: Model, *, allow_no_gain: bool) -> Model:
        """Run recipe pass ``index`` on ``current``, export and measure its result; a result with
        no gain stops the run (after the report is written) unless ``allow_no_gain``."""
        label = spec.name or f"{spec.kind}/{spec.method}"
        start = time.perf_counter()
        # NOTE: no gain is judged below, after the stage is measured and reported.
        result = run_pass(spec, index, current, self.source, self.data, allow_no_gain=True)
        seconds = time.perf_counter() - start
        text = self.judge_text(index, label, result)
        path = self.stages_dir / f"{index:02d}-{spec.kind}-{spec.method.replace(':', '-')}.onnx"
        export(result, path, sample=self.sample, reference=self.source, **self.export_options)
        figures = result.provenance.passes[-1].figures if result.provenance.passes else {}
        self.record(label, result, path, seconds, figures, spec.kind, text)
        if figures.get("no_gain") and not allow_no_gain:
            self.report.status = (
                f"stopped at stage {index} ({label}): no gain: {figures['no_gain']}"
            )
            self.report.write(self.reports_at)
            raise NoGainError(
                f"{label}: no gain: {figures['no_gain']}; report in {self.reports_at} (allow_no_gain=True / --allow-no-gain continues)"
            )
        return result

    def stages_in_turn(self, *, allow_no_gain: bool) -> tuple[Model, bool]:
        """Every recipe pass in order; returns the last model and whether Ctrl-C stopped the run.
        The report's status says how far it got; a failed stage writes the report and raises."""
        current = self.source
        for index, spec in enumerate(self.recipe.passes, 1):
            label = spec.name or f"{spec.kind}/{spec.method}"
            self.report.status = f"running stage {index} ({label})"
            try:
                current = self.stage(index, spec, current, allow_no_gain=allow_no_gain)
            except KeyboardInterrupt:
                self.report.status = (
                    f"interrupted during stage {index} ({label}); stages before it are complete"
                )
                return current, True
            except ModelpressError as exc:
                # NOTE: a stage that stopped the run on purpose (no gain, text criteria missed) already says why in the status
                if not isinstance(exc, NoGainError) and not self.report.status.startswith(
                    f"stopped at stage {index} "
                ):
                    self.report.status = f"failed at stage {index} ({label})"
                self.report.write(self.reports_at)
                raise
        self.report.status = "complete"
        return current, False

    def finish(self, current: Model, interrupted: bool) -> CompressResult:
        """Write the last model to the output (unless interrupted), pack it if asked, and the reports."""
        final = packed = None
        if self.out_path is not None and not interrupted:
            export(
                current,
                self.out_path,
                sample=self.sample,
                reference=self.source,
                **self.export_options,
            )
            final = self.out_path
            if self.recipe.pack is not None:
                from modelpress.packing.container import pack

                packed = pack(
                    self.out_path,
                    self.out_path.with_suffix(".mpk"),
                    codecs=self.recipe.pack.codecs,
                    registry=self.registry,
                ).path
        self.report.write(self.reports_at)
        return CompressResult(
            model=current,
            stages=self.stages,
            report=self.report,
            output=final,
            interrupted=interrupted,
            packed=packed,
        )


def compress(
    model: Model | Any,
    recipe: str | os.PathLike[str] | dict[str, Any] | Recipe,
    *,
    output: str | os.PathLike[str] | None = None,
    report_dir: str | os.PathLike[str] | None = None,
    show_progress: bool = True,
    registry: Registry | None = None,
    allow_imports: bool = True,
    overwrite: bool = False,
    verify: bool = True,
    sample: Any = None,
    external_data: bool | str = "auto",
    allow_no_gain: bool = False,
    accept_loss: bool = False,
) -> CompressResult:
    """Run ``recipe`` on ``model``; evaluate after the source and every stage; write reports.

    Each stage's model is exported (atomically, verified in ORT) to
    ``<output stem>-stages/NN-kind-method.onnx``; the last one is also written to ``output``.
    Reports (``report.md``, ``report.json``, ``report.html``) go to ``report_dir`` (default: the
    output's folder). ``verify``, ``sample`` and ``external_data`` go to every
    :func:`~modelpress.export` (``sample`` defaults to the recipe's evaluation data). Ctrl-C stops
    after the stage in progress is abandoned: completed stages' files stay and the report says
    where it stopped. A stage with no gain (see :func:`modelpress.apply`) is flagged in the report
    and stops the run with :class:`NoGainError` after the report is written, unless
    ``allow_no_gain``. A stage that misses its accuracy floor or criteria stops the run with
    :class:`~modelpress.AccuracyLossError` unless ``accept_loss`` (see :func:`~modelpress.export`).

    A recipe is code: ``allow_imports=False`` refuses its ``pkg.module:function`` entries and
    data paths outside its folder (see :func:`modelpress.load_recipe`). Writing over the input
    model is refused unless ``overwrite=True``. ``registry`` (the process-wide one by default)
    loads ``model``, runs every stage and is told of every export.
    """
    from modelpress.plugin.loading import load

    registry = registry or get_registry()
    recipe = load_recipe(recipe, allow_imports=allow_imports)
    recipe.validate_against(registry)
    source = load(model, registry=registry)
    if output is not None:
        refuse_overwrite([output], model_files(source), overwrite=overwrite)
    run_id = uuid.uuid4().hex[:12]
    registry.hook.modelpress_run_start(run_id=run_id, model=source, recipe=recipe)
    try:
        outputs = _Outputs(
            output,
            report_dir,
            sample,
            {
                "verify": verify,
                "external_data": external_data,
                "overwrite": overwrite,
                "accept_loss": accept_loss,
            },
        )
        run = _Run(recipe, source, registry, outputs, show_progress=show_progress)
        run.source_stage()
        current, interrupted = run.stages_in_turn(allow_no_gain=allow_no_gain)
        outcome = run.finish(current, interrupted)
    except BaseException as exc:
        registry.hook.modelpress_run_finish(run_id=run_id, result=None, error=exc)
        raise
    registry.hook.modelpress_run_finish(run_id=run_id, result=outcome, error=None)
    return outcome
