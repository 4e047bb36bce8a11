"""Writing a model to ONNX atomically, and verifying it in ONNX Runtime."""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from modelpress.base.errors import (
    AccuracyLossError,
    DataError,
    ExportError,
    InvalidModelError,
    ModelpressError,
    VerificationError,
)
from modelpress.base.progress import progress_bar
from modelpress.data.samples import declared_axis_sizes, index_limits, load_dataset, sample_inputs
from modelpress.evaluation.comparison import Comparison, compare_outputs, method_floor
from modelpress.evaluation.criteria import infer_criteria
from modelpress.io.safety import model_files, refuse_overwrite
from modelpress.ir.model import Model
from modelpress.plugin.registry import Registry, get_registry
from modelpress.runtime.session import (
    FILE_FROM_BYTES,
    INLINE_LIMIT_BYTES,
    external_folders,
    in_memory_bytes,
    make_session,
    release_free_memory,
    run_dataset,
)

__all__ = ["ExportResult", "export", "verify"]


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export` wrote and measured (``verification_seconds``: time spent verifying)."""

    path: Path
    size_bytes: int
    external_data: Path | None
    verification: Comparison | None
    verification_seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "size_bytes": self.size_bytes,
            "external_data": str(self.external_data) if self.external_data else None,
            "verification": self.verification.to_dict() if self.verification else None,
            "verification_seconds": self.verification_seconds,
        }


def _feeds(
    model: Model, sample: Any, reference: Model | None = None
) -> list[dict[str, np.ndarray]]:
    """The verification batches: ``sample``'s (samples of one shape together, one at a time for a
    batch-1 model, no more per run than :data:`VERIFY_INPUT_BUDGET` of inputs allows), or one generated
    batch whose token ids index every table in range in both models
    and whose named axes have the sizes the model declares (:func:`declared_axis_sizes`)."""
    signature = model.signature
    if sample is not None:
        data = load_dataset(sample, signature, what="sample")
        return list(data.batches(_verification_batch(data)))
    limits = index_limits(model.ir.graph)
    if reference is not None and reference is not model:
        for name, limit in index_limits(reference.ir.graph).items():
            limits[name] = _narrower(limits.get(name), limit)
    feeds = sample_inputs(
        signature, batch=2, limits=limits, axis_sizes=declared_axis_sizes(model.provenance.extra)
    )
    for spec in signature.inputs:
        declared = spec.shape or ()
        got = feeds[spec.name].shape
        if any(
            isinstance(d, int) and d >= 0 and d != g for d, g in zip(declared, got, strict=False)
        ):
            raise DataError(
                f"input {spec.describe()} of model {model.name!r} is declared too large to generate a sample for "
                f"(a sample of shape {got} was capped from it); give verification data with sample=... / --sample "
                "FILE, or skip it with verify=False / --no-verify"
            )
    return [feeds]


# Bytes of model inputs one verification run may take: ORT's activations grow with the batch
# (PP-OCRv4 det: ~15 MB per 320x320 image), so a large sample set is judged a few samples at a time.
# A transformer's inputs are tiny beside its activations (MiniLM: 768 bytes of token ids, ~1.3 MB of
# activations per sentence), so a run also takes at most VERIFY_MAX_BATCH samples.
VERIFY_INPUT_BUDGET = 1 << 20
VERIFY_MAX_BATCH = 16


def _verification_batch(data: Any) -> int:
    """Samples per verification run: as many as fit :data:`VERIFY_INPUT_BUDGET` of inputs, at least
    one and at most :data:`VERIFY_MAX_BATCH`."""
    per_sample = sum(int(v.nbytes) for v in data.largest_sample().values())
    return max(1, min(VERIFY_MAX_BATCH, VERIFY_INPUT_BUDGET // max(per_sample, 1)))


def _narrower(a: int | tuple[int, int] | None, b: int | tuple[int, int]) -> int | tuple[int, int]:
    if a is None:
        return b
    (lo_a, hi_a), (lo_b, hi_b) = ((0, x) if isinstance(x, int) else x for x in (a, b))
    low, high = max(lo_a, lo_b), min(hi_a, hi_b)
    return high if low == 0 else (low, high)


def verify(
    model: Model,
    *,
    session: Any = None,
    reference: Model | None = None,
    sample: Mapping[str, np.ndarray] | Any = None,
    atol: float | None = None,
    min_cosine: float | None = None,
    min_agreement: float | None = None,
    criteria: Mapping[str, str] | None = None,
    accept_loss: bool = False,
    registry: Registry | None = None,
) -> Comparison:
    """Run ``model`` (or its ``session``) and ``reference`` in ORT on the same inputs and compare.

    ``reference`` defaults to ``model.reference`` (the model as imported, before any pass), or
    the model itself; it runs from its own weights (memory-mapped external data stays where it
    is; nothing is copied). ``sample`` is any data :func:`modelpress.data.samples.load_dataset` accepts;
    by default realistic inputs are generated from the signature (token ids within the embedding
    table, sequences of 16, batch 2). Non-finite outputs are always an error. Without explicit
    thresholds, the floor the applied methods declare is enforced (``Method.min_cosine``, or their
    kind's; the loosest over the passes; where a pass declares ``min_cosine=None``, only the floor every model has:
    a cosine above 0), so a broken
    result does not pass. Each output is also judged as :mod:`modelpress.evaluation.criteria` decides
    (agreement for classifiers, cosine for embeddings and maps, relative error for regression);
    ``criteria`` overrides it per output name, and an output the caller gave a criterion with a bound
    for (``{"logits": "cosine>=0.999"}``) must meet it. A miss (floor, explicit threshold or criterion)
    is an :class:`~modelpress.AccuracyLossError` naming the output, the figure, the bound and the ways
    forward; ``accept_loss=True`` (the CLI's ``--accept-loss``) keeps the result instead and records
    what it missed in :attr:`Comparison.loss_accepted`. ``registry`` (the process-wide one by default)
    is where the methods' declared floors are read.
    """
    reference = reference or model.reference or model
    feeds = _feeds(model, sample, reference)
    actual = run_dataset(session or make_session(model), feeds)
    session = None  # NOTE: the output's session is released before the reference's is built
    expected = actual if reference is model else _reference_outputs(reference, feeds)
    checks = Checks(
        atol=atol,
        min_cosine=min_cosine,
        min_agreement=min_agreement,
        criteria=criteria,
        accept_loss=accept_loss,
        registry=registry,
    )
    return replace(checks.judge(model, reference, expected, actual), random_inputs=sample is None)


def _reference_outputs(reference: Model, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """The reference's outputs, its session (its weights read from their own files) freed at once."""
    session = make_session(reference, prepack=False, spin=False, arena=True, fold=False)
    try:
        return run_dataset(session, feeds)
    finally:
        del session


@dataclass(frozen=True)
class Checks:
    """What an export's verification enforces: explicit thresholds, per-output criteria, the
    methods' declared floors (read from ``registry``) and whether a miss is accepted."""

    atol: float | None = None
    min_cosine: float | None = None
    min_agreement: float | None = None
    criteria: Mapping[str, str] | None = None
    accept_loss: bool = False
    registry: Registry | None = None

    def judge(
        self,
        model: Model,
        reference: Model,
        expected: list[np.ndarray],
        actual: list[np.ndarray],
        *,
        where: str = "",
    ) -> Comparison:
        """Compare ``actual`` with ``expected``; raise on non-finite outputs, and on a miss unless
        ``accept_loss`` (``where``: what the error adds after the figures, e.g. that nothing was written)."""
        judged_by = infer_criteria(
            model.signature.output_names, expected, model=reference, overrides=self.criteria
        )
        comparison = compare_outputs(model.signature.output_names, expected, actual, judged_by)
        if not comparison.finite:
            raise VerificationError(
                f"model {model.name!r} fails verification against its reference: outputs contain NaN or infinite values{where}"
            )
        misses = self._misses(model, reference, comparison)
        if not misses:
            return comparison
        if self.accept_loss:
            return replace(comparison, loss_accepted="; ".join(misses))
        raise AccuracyLossError(
            f"model {model.name!r} misses its accuracy {'; '.join(misses)}{where}{self._routes(model)}"
        )

    def _misses(self, model: Model, reference: Model, comparison: Comparison) -> list[str]:
        misses = []
        if self.atol is not None and comparison.max_abs_diff > self.atol:
            misses.append(
                f"threshold: max |diff| {comparison.max_abs_diff:.3g} > atol {self.atol:g}"
            )
        if self.min_cosine is not None and comparison.cosine < self.min_cosine:
            misses.append(
                f"threshold: cosine {comparison.cosine:.6f} < min_cosine {self.min_cosine:g}"
            )
        if (
            self.min_agreement is not None
            and (comparison.top1_agreement or 0.0) < self.min_agreement
        ):
            misses.append(
                f"threshold: top-1 agreement {comparison.top1_agreement} < min_agreement {self.min_agreement:g}"
            )
        given = set(self.criteria or {})
        for out in comparison.outputs:
            if out.passed is False and (out.name in given or "*" in given):
                spec = (self.criteria or {}).get(out.name, (self.criteria or {}).get("*"))
                misses.append(
                    f"criterion: output {out.name!r} ({out.criterion}) {out.value:.5g} misses {spec!r}"
                )
        explicit = (
            self.atol is not None or self.min_cosine is not None or self.min_agreement is not None
        )
        if not explicit and reference is not model:
            floor, by = self._floor(model)
            worst = min(comparison.outputs, key=lambda o: o.cosine, default=None)
            if worst is not None and floor is not None and floor > 0 and comparison.cosine < floor:
                misses.append(
                    f"floor: output {worst.name!r} cosine {worst.cosine:.6f} < {floor:g} (the floor {by} declares)"
                )
            elif worst is not None and worst.cosine <= 0:
                # NOTE: even where a pass changes outputs by design (no declared floor), outputs unrelated to or opposite of
                # the reference's are broken, never a compression result
                waived = f"; {by} declares no floor, but" if floor is None or floor <= 0 else ";"
                misses.append(
                    f"floor: output {worst.name!r} cosine {worst.cosine:.6f} <= 0{waived} a cosine <= 0 means outputs "
                    "unrelated to (or opposite of) the reference's, which no method's result may have"
                )
        return misses

    def _floor(self, model: Model) -> tuple[float | None, str]:
        """The loosest floor the passes declared, and which pass declared it (``None``: no default floor)."""
        registry = self.registry or get_registry()
        floors = [
            (method_floor(p, registry), f"{p.kind}/{p.method}") for p in model.provenance.passes
        ]
        if not floors:
            return None, ""
        if any(f is None for f, _ in floors):
            return None, next(by for f, by in floors if f is None)
        return min(floors, key=lambda pair: pair[0])  # type: ignore[arg-type,return-value]

    def _routes(self, model: Model) -> str:
        """The ways forward, from what the applied methods declare (the options that fine-tune with training data)."""
        registry = self.registry or get_registry()
        tuning: list[str] = []
        for record in model.provenance.passes:
            try:
                method = registry.method(record.method, record.kind)
            except ModelpressError:
                continue
            tuning += [
                f"{method.qualname} with {opt}=N and training data, train=... / data=... (CLI: --{opt.replace('_', '-')} N --data FILE)"
                for opt, need in method.requires_if
                if need == "train"
            ]
        recover = (
            f"give fine-tuning data ({'; '.join(dict.fromkeys(tuning))})"
            if tuning
            else "recover accuracy with training data (a method option that fine-tunes, or distillation)"
        )
        return (
            f". Ways forward: {recover}; or a looser criterion (min_cosine=... / criteria={{OUTPUT: 'cosine>=X'}}, or milder method "
            "options); or keep it anyway with accept_loss=True (CLI: --accept-loss)"
        )


def _output_session(staged: Path, target: Path, *, prepack: bool) -> Any:
    # NOTE: not spinning: verification sweeps the samples, where busy-waiting threads only burn CPU
    # (a fifth of an export's); with the arena, which verification's peak memory was measured with.
    # NOTE: with constant folding, as a user's session runs the file: an int8 bias's scale is a Mul of
    # two scales that ORT folds before its QDQ fusions; unfolded, the Convs stay DQ -> Conv -> Q
    try:
        return make_session(staged, prepack=prepack, spin=False, arena=True)
    except InvalidModelError as exc:
        raise ExportError(f"{exc} — nothing was written to {str(target)!r}") from exc.__cause__


def _raw_tensor(external: ir.ExternalTensor) -> ir.TensorProtocol:
    """An in-memory copy of an external tensor, stored as before (4-bit types packed two per byte)."""
    raw = np.frombuffer(external.tobytes(), np.uint8)
    external.release()
    if external.dtype.bitwidth == 4:
        return ir.PackedTensor(raw, external.dtype, shape=external.shape, name=external.name)
    array = raw.view(external.dtype.numpy()).reshape(external.shape.numpy())
    return ir.Tensor(array, dtype=external.dtype, name=external.name)


@contextlib.contextmanager
def _held_on_disk(model: Model, staged: Path | None, *others: Model | None) -> Iterator[None]:
    """For the block's duration, the model's big in-memory initializers are the copies just
    written to ``staged``'s external data (read lazily), their arrays freed; afterwards they are
    read back into memory, so the model is as it was. ``staged=None``: nothing to do."""
    if staged is None:
        yield
        return
    written = {
        name: v.const_value
        for name, v in ir.load(staged).graph.initializers.items()
        if isinstance(v.const_value, ir.ExternalTensor)
    }
    # NOTE: a tensor the model shares with another (its reference: weights no pass touched) stays:
    # reading it back would leave two copies where there was one.
    shared = {
        id(v.const_value)
        for m in (model.reference, *others)
        if m is not None and m is not model
        for v in m.ir.graph.initializers.values()
    }
    swapped: list[tuple[ir.Value, ir.ExternalTensor]] = []
    for name, value in model.ir.graph.initializers.items():
        tensor, external = value.const_value, written.get(name)
        if (
            tensor is None
            or isinstance(tensor, ir.ExternalTensor)
            or external is None
            or tensor.nbytes <= 1024
            or id(tensor) in shared
            or external.dtype != tensor.dtype
            or external.nbytes != tensor.nbytes
        ):
            continue
        value.const_value = external
        swapped.append((value, external))
    tensor = None  # NOTE: the last array swapped out is freed too
    release_free_memory()
    try:
        yield
    finally:
        for value, external in swapped:
            value.const_value = _raw_tensor(external)


_verify = verify  # NOTE: export's `verify` flag shadows the function inside export().


def _use_external(model: Model, reference: Model | None, external_data: bool | str | None) -> bool:
    if external_data in (None, "auto"):
        sources = [model.ir] + [m.ir for m in (reference, model.reference) if m is not None]
        return model.weight_bytes() >= INLINE_LIMIT_BYTES or any(
            external_folders(m) for m in sources
        )
    if isinstance(external_data, bool):
        return external_data
    raise ExportError(f"external_data must be 'auto', True or False, not {external_data!r}")


def _save(
    model: Model, staged: Path, data_name: str, use_external: bool, show_progress: bool
) -> None:
    with model.stamped() as stamped:
        if use_external:
            # NOTE: onnx_ir streams every tensor (untouched external ones included, read from their
            # memory maps) into the output's own data file, so the output never points at the source's.
            count = sum(
                1
                for g in stamped.graphs()
                for v in g.initializers.values()
                if v.const_value is not None and v.const_value.nbytes > 1024
            )
            with progress_bar(
                f"saving {staged.name}", total=count, enabled=show_progress
            ) as advance:
                ir.save(
                    stamped,
                    staged,
                    external_data=data_name,
                    size_threshold_bytes=1024,
                    callback=lambda _t, _i: advance(1),
                )
        else:
            if (
                in_memory_bytes(model)
                + sum(
                    int(v.const_value.nbytes)
                    for g in stamped.graphs()
                    for v in g.initializers.values()
                    if isinstance(v.const_value, ir.ExternalTensor)
                )
                >= 2**31 - 2**24
            ):
                raise ExportError(
                    f"cannot write {staged.name!r} without external data: its weights exceed protobuf's 2 GB limit; use "
                    "external_data=True / --external-data always"
                )
            with model.inlined(), progress_bar(f"saving {staged.name}", enabled=show_progress):
                ir.save(stamped, staged)


def _checked_target(model: Model, target: Path, overwrite: bool) -> Path:
    """The folder ``target`` goes into, once the target is known to be writable there (no
    overwriting the model's own files, not a folder, its folder exists)."""
    refuse_overwrite(
        [target, target.with_name(target.name + ".data")], model_files(model), overwrite=overwrite
    )
    if target.is_dir():
        raise ExportError(
            f"cannot export to {str(target)!r}: it is a folder; give a file path ending in .onnx"
        )
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise ExportError(
            f"cannot export to {str(target)!r}: folder {str(parent)!r} does not exist"
        )
    return parent


def _staging_folder(target: Path, parent: Path) -> Path:
    """A fresh temporary folder beside ``target`` (same file system: the final move is a rename)."""
    try:
        return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    except OSError as exc:
        raise ExportError(
            f"cannot export to {str(target)!r}: cannot create a file in folder {str(parent)!r} ({exc.strerror}); check it is a writable folder"
        ) from None


def _write_staged(
    model: Model, staged: Path, target: Path, use_external: bool, show_progress: bool
) -> None:
    """Save the model to ``staged`` (its external data, if any, beside it as ``<target name>.data``)."""
    try:
        _save(model, staged, target.name + ".data", use_external, show_progress)
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot write {str(target)!r}: {exc}") from exc


def _verify_staged(
    model: Model,
    staged: Path,
    target: Path,
    *,
    sample: Any,
    reference: Model | None,
    show_progress: bool,
    checks: Checks,
) -> Comparison:
    """Run the staged file and its reference on the same inputs and judge the outputs (``checks``:
    the thresholds and criteria of :func:`verify`); a failure says nothing was written."""
    try:
        with progress_bar(f"verifying {target.name}", total=2, enabled=show_progress) as advance:
            chosen = reference or model.reference or model
            feeds = _feeds(model, sample, chosen)
            expected = None if chosen is model else _reference_outputs(chosen, feeds)
            advance(1)
            # NOTE: pre-packed: ORT's int4 MatMulNBits kernel is ~10x slower without it, and the
            # quantized weights are small; the fp32 reference is the one not worth packing. After
            # the reference's (the fp32 run is the larger: its outputs are held while this one runs)
            actual = run_dataset(_output_session(staged, target, prepack=True), feeds)
            comparison = checks.judge(
                model,
                chosen,
                actual if expected is None else expected,
                actual,
                where=f" — nothing was written to {str(target)!r}",
            )
            advance(1)
            return replace(comparison, random_inputs=sample is None)
    except ModelpressError as exc:
        if "nothing was written" in str(exc):  # NOTE: the output's session says so already
            raise
        raise type(exc)(f"{exc} — nothing was written to {str(target)!r}") from exc


def _move_into_place(tmp: Path, staged: Path, target: Path, use_external: bool) -> Path | None:
    """Rename the staged file (and its external data, if any) to ``target``; returns the data file."""
    data_name = target.name + ".data"
    data_target = None
    if use_external and (tmp / data_name).exists():
        data_target = target.with_name(data_name)
        os.replace(tmp / data_name, data_target)
    os.replace(staged, target)
    return data_target


def _report(
    model: Model,
    target: Path,
    data_target: Path | None,
    comparison: Comparison | None,
    seconds: float | None,
    registry: Registry,
) -> ExportResult:
    """What was written and measured, told to ``registry``'s ``modelpress_export_finish`` observers."""
    result = ExportResult(
        path=target,
        size_bytes=target.stat().st_size + (data_target.stat().st_size if data_target else 0),
        external_data=data_target,
        verification=comparison,
        verification_seconds=seconds,
    )
    registry.hook.modelpress_export_finish(model=model, result=result)
    return result


def export(
    model: Model,
    path: str | os.PathLike[str],
    *,
    verify: bool = True,
    sample: Any = None,
    reference: Model | None = None,
    external_data: bool | str | None = "auto",
    atol: float | None = None,
    min_cosine: float | None = None,
    min_agreement: float | None = None,
    criteria: Mapping[str, str] | None = None,
    accept_loss: bool = False,
    overwrite: bool = False,
    show_progress: bool = True,
    registry: Registry | None = None,
) -> ExportResult:
    """Write ``model`` to ``path`` as ONNX, load it back in ONNX Runtime and check it numerically.

    The file is first written into a temporary folder beside ``path``; only when ORT loaded it
    (and the checks passed) is it moved into place with an atomic rename. On any failure nothing
    is left at ``path`` (an older file there stays untouched). The output is self-contained:
    with ``external_data="auto"`` (default) its weights go to ``<name>.data`` beside it when the
    source model had external data or the weights exceed ~1.5 GB, else they are inlined;
    ``True``/``False`` force either. Weights no pass touched are streamed from the source's
    files into the output's; nothing in the output refers to the source's files. Verification
    (see :func:`verify`) runs the reference from its own file. The provenance (source, passes,
    options, plugin versions) goes into ``metadata_props``. Writing over the file the model was
    loaded from (or its external data) is refused unless ``overwrite=True``. ``registry`` (the
    process-wide one by default) is the one whose ``modelpress_export_finish`` observers are told;
    an observer that raises is a warning naming its plugin, the written file stays.
    """
    target = Path(path)
    parent = _checked_target(model, target, overwrite)
    use_external = _use_external(model, reference, external_data)
    checks = Checks(
        atol=atol,
        min_cosine=min_cosine,
        min_agreement=min_agreement,
        criteria=criteria,
        accept_loss=accept_loss,
        registry=registry,
    )

    tmp: Path | None = None
    comparison: Comparison | None = None
    seconds: float | None = None
    # NOTE: what the passes left behind (sessions and arrays in reference cycles, freed malloc blocks)
    # goes back before the file is written and two models run (MiniLM int8-static: 40 MB off the peak);
    # only for models of some size: a full collection in a process holding many objects costs ~0.1 s
    # (the fast test tier's exports took twice as long with it on every one)
    if not isinstance(model, Model) or model.weight_bytes() >= FILE_FROM_BYTES:
        gc.collect()
    release_free_memory()
    try:
        tmp = _staging_folder(target, parent)
        staged = tmp / target.name
        _write_staged(model, staged, target, use_external, show_progress)
        start = time.perf_counter()
        # NOTE: while ORT holds a session, the weights this process holds for the model (a pass's
        # results) are read back lazily from the file just written; one big thing at a time.
        with _held_on_disk(model, staged if use_external else None, reference):
            if verify:  # NOTE: its session of the written file is the check that ORT loads it
                comparison = _verify_staged(
                    model,
                    staged,
                    target,
                    sample=sample,
                    reference=reference,
                    show_progress=show_progress,
                    checks=checks,
                )
                seconds = round(time.perf_counter() - start, 3)
            else:  # NOTE: ORT must load what was written (in ms: no pre-packing)
                _output_session(staged, target, prepack=False)
        data_target = _move_into_place(tmp, staged, target, use_external)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    return _report(model, target, data_target, comparison, seconds, registry or get_registry())
