"""What a tune works on: the source model, its data as ``.npz`` bytes per role, the evaluation settings,
and the state one run shares between its steps (:class:`TuneRun`)."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from modelpress.app.recipe import DataSources, Evaluate, Recipe
from modelpress.base.errors import OptionsError, UnsupportedModelError

if TYPE_CHECKING:
    from modelpress.app.tuning.executor import RayExecutor
    from modelpress.app.tuning.progress import TrialBoard
    from modelpress.app.tuning.space import SearchSpace
    from modelpress.app.tuning.store import Objective, StudyStore
    from modelpress.app.tuning.strategy import Strategy
    from modelpress.plugin.registry import Registry

__all__ = [
    "DATA_ROLES",
    "Inputs",
    "Settings",
    "TuneRun",
    "atomic_write",
    "eval_data",
    "gather_inputs",
]

DATA_ROLES = ("eval", "calibration", "train")


def atomic_write(path: Path, blob: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(blob)
    os.replace(tmp, path)


def _npz_bytes(source: Any, signature: Any, role: str) -> bytes:
    """Any accepted data source -> .npz bytes (validated against the model's signature)."""
    from modelpress.data.samples import LABELS, load_dataset

    if isinstance(source, (str, os.PathLike)) and str(source).endswith(".npz"):
        load_dataset(source, signature, what=role)  # validate before any work
        return Path(source).read_bytes()
    data = load_dataset(source, signature, what=role)
    buffer = io.BytesIO()
    arrays = dict(data.inputs)
    if data.labels is not None:
        arrays[LABELS] = data.labels
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


# NOTE: the role of each source as modelpress_load_data names it (a text corpus is read by its plugin)
_LOAD_ROLES = {"eval": "evaluation", "calibration": "calibration", "train": "training"}
_NO_EVAL = (
    "tune needs evaluation data: data={'eval': 'eval.npz', ...} (--eval): the metric is measured on it "
    "(a text corpus given as calibration data alone lends its held-out part)"
)


def _read_sources(sources: dict[str, Any], source: Any) -> dict[str, Any]:
    """Each role's data for ``source``, a file only a plugin reads (a text corpus) read by it; without
    evaluation data, the part of the calibration corpus its plugin held out of the calibration."""
    from modelpress.plugin.registry import HELD_OUT, get_registry

    registry = get_registry()
    length = sources.pop("sequence_length")
    read = {
        role: registry.load_data(src, source, _LOAD_ROLES[role], length)
        for role, src in sources.items()
    }
    if read["eval"] is None and sources["calibration"] is not None:
        read["eval"] = registry.load_data(sources["calibration"], source, HELD_OUT, length)
        if read["eval"] is None:
            raise OptionsError(_NO_EVAL)
    return read


def _data_sources(data: Any, recipe: Recipe | None) -> dict[str, Any]:
    """The sources per role (``sequence_length``: tokens per sample of a text corpus, None: the plugin's default)."""
    if recipe is not None and data is None:
        return {
            **{role: recipe.resolve(getattr(recipe.data, role)) for role in DATA_ROLES},
            "sequence_length": recipe.data.sequence_length,
        }
    if isinstance(data, DataSources):
        data = data.model_dump()
    if isinstance(data, dict) and set(data) <= {*DATA_ROLES, "sequence_length"} and data:
        out = {role: data.get(role) for role in DATA_ROLES}
        length = data.get("sequence_length")
    else:
        out, length = {"eval": data, "calibration": None, "train": None}, None
    if out["eval"] is None and out["calibration"] is None:
        raise OptionsError(_NO_EVAL)
    if out["calibration"] is None:
        out["calibration"] = out[
            "eval"
        ]  # NOTE: as ORT's and INC's tools do when no calibration set is given
    return {**out, "sequence_length": length}


@dataclass
class Inputs:
    """The source model, the data as .npz bytes per role and the evaluation settings: what every trial gets."""

    source: Any
    blobs: dict[str, bytes | None]
    evaluate: Evaluate

    def write(self, out: Path) -> bytes:
        """Copies in ``out`` (the data under ``data/``, the model as ``source.onnx``) for the winning recipe; the model's bytes."""
        data_dir = out / "data"
        data_dir.mkdir(exist_ok=True)
        for role, blob in self.blobs.items():
            if blob is not None:
                atomic_write(data_dir / f"{role}.npz", blob)
        model_bytes: bytes = _inlined(self.source).to_proto().SerializeToString()
        atomic_write(out / "source.onnx", model_bytes)
        return model_bytes

    def has_labels(self, role: str) -> bool:
        return _has_labels(self.blobs.get(role))


_PROTO_LIMIT = 2**31 - 1  # NOTE: protobuf's limit on one message


def _inlined(source: Any) -> Any:
    """``source`` with every weight in memory: the trials get the model as one ONNX protobuf
    (``source.onnx``), which a weight left in an external-data file beside the loaded model would
    point out of (a model over 256 MB loads that way). Refused, by name, above protobuf's 2 GB."""
    import onnx_ir as ir

    weights = source.weight_bytes()
    if weights > _PROTO_LIMIT:
        raise UnsupportedModelError(
            f"{source.name}: tune ships the model to its trials as one ONNX protobuf, and its "
            f"{weights / 1e9:.1f} GB of weights are over protobuf's 2 GB; compress it "
            "with `modelpress quantize` / `compress` and a recipe instead"
        )
    external = any(
        isinstance(v.const_value, ir.ExternalTensor)
        for g in source.ir.graphs()
        for v in g.initializers.values()
    )
    if not external:
        return source
    inlined = source.clone()
    ir.external_data.load_to_model(inlined.ir)
    return inlined


def _has_labels(blob: bytes | None) -> bool:
    if blob is None:
        return False
    with np.load(io.BytesIO(blob)) as npz:
        return "labels" in npz.files


def gather_inputs(
    model: Any,
    data: Any,
    recipe: Recipe | None,
    metric: str | None,
    evaluate: dict[str, Any] | None,
) -> Inputs:
    from modelpress.plugin.loading import load

    source = load(model)
    sources = _data_sources(data, recipe)
    settings = {
        "metric": metric or (recipe.evaluate.metric if recipe else None),
        "batch_size": 1,
        "repeats": 10,
        "threads": 1,
        "max_samples": 2048,
    }
    if recipe is not None:
        settings.update(recipe.evaluate.model_dump(exclude={"metric"}))
    settings.update(evaluate or {})
    sources = _read_sources(sources, source)
    blobs = {
        role: _npz_bytes(src, source.signature, role) if src is not None else None
        for role, src in sources.items()
    }
    if settings["metric"] is None:
        settings["metric"] = "accuracy" if _has_labels(blobs["eval"]) else "agreement"
    return Inputs(source, blobs, Evaluate(**settings))


def eval_data(out: Path, evaluate_spec: Evaluate) -> tuple[Any, Any]:
    """The source model and the evaluation data, from the copies in ``out``."""
    from modelpress.data.samples import load_dataset
    from modelpress.plugin.loading import load

    source = load(out / "source.onnx")
    return source, load_dataset(
        out / "data" / "eval.npz", source.signature, what="evaluation"
    ).take(evaluate_spec.max_samples)


@dataclass
class Settings:
    """How this run's trials run and are judged, and what its output keeps."""

    objective: Objective
    strategy: Strategy
    max_drop: float
    hopeless_drop: float
    trial_timeout: float | None
    trial_memory_mb: float | None
    torch: bool
    keep_trial_models: bool = False
    accept_loss: bool = (
        False  # NOTE: the best model is written even if it misses its verification floor
    )
    trial_retries: int = 1  # NOTE: how many times a trial lost with its node runs again


@dataclass
class TuneRun:
    """One tune run's state, shared by its steps (prepare, loop, finish) instead of long parameter lists."""

    out: Path
    inputs: Inputs
    settings: Settings
    space: SearchSpace
    store: StudyStore
    executor: RayExecutor
    board: TrialBoard
    registry: Registry
    limits: dict[str, float]
    model_bytes: bytes = b""
    dashboard: str = (
        ""  # NOTE: the address of the live dashboard when one runs (the report links to it)
    )
