"""The sensitivity ranking a fallback search walks: measured once per study, per method that declares a fallback.

A method declares ``Tuning(fallback=<option>, ranking={...}, ranking_figure=<figure>)``: one run of it on
the source model with the ``ranking`` options reports ``{node: sensitivity}`` in that figure, and a
trial's fallback step ``k`` puts the ``k`` most sensitive nodes in that option (kept out of the method).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelpress.app.tuning.space import Fallback, SearchSpace
from modelpress.base.errors import OptionsError
from modelpress.plugin.tuning import Tuning

if TYPE_CHECKING:
    from modelpress.app.tuning.inputs import TuneRun
    from modelpress.plugin.registry import Registry

__all__ = ["collect_rankings", "fallback_methods", "measure_sensitivity", "start_rankings"]

_ATTR = (
    "fallback_rankings"  # NOTE: in the study: kind/name -> its ranking (a resumed run reuses it)
)


def measure_sensitivity(
    model: bytes,
    data: dict[str, bytes | None],
    method: str,
    kind: str | None = None,
    *,
    options: dict[str, Any] | None = None,
    figure: str | None = None,
    plugins: list[Any] | None = None,
) -> list[str]:
    """Nodes ranked by their sensitivity, most sensitive first: one run of ``method`` (its declared ``ranking``
    options unless ``options`` are given) on the model, read from its ``figure``. ``plugins``: the driver's
    registry's own plugin objects (see :func:`modelpress.app.tuning.trial.trial_registry`)."""
    import tempfile

    from modelpress.app.pipeline import apply
    from modelpress.app.tuning.trial import trial_registry
    from modelpress.plugin.loading import load

    registry = trial_registry(plugins)
    declared = registry.method(method, kind)
    tuning = declared.tuning
    if options is None:
        options = dict(tuning.ranking) if tuning is not None else {}
    figure = figure or (tuning.ranking_figure if tuning is not None else Tuning().ranking_figure)
    with tempfile.TemporaryDirectory(prefix="modelpress-sensitivity-") as tmp:
        paths: dict[str, Any] = {}
        for role, blob in data.items():
            if blob is not None:
                paths[role] = Path(tmp, f"{role}.npz")
                paths[role].write_bytes(blob)
        result = apply(
            load(model),
            declared,
            calibration=paths.get("calibration"),
            train=paths.get("train"),
            eval=paths.get("eval"),
            show_progress=False,
            allow_no_gain=True,
            options=options,
            registry=registry,
        )
    ranking = result.provenance.passes[-1].figures.get(figure, {})
    return sorted(ranking, key=lambda n: ranking[n], reverse=True)


def fallback_methods(space: SearchSpace, registry: Registry) -> dict[str, str]:
    """Pipeline name -> the ``kind/name`` of the method whose fallback it searches (pipelines with a fallback only)."""
    out = {}
    for pipeline in space.pipelines:
        for template in pipeline.passes:
            if any(isinstance(p, Fallback) for p in template.params().values()):
                out[pipeline.name] = registry.method(template.method, template.kind).qualname
                break
    return out


def start_rankings(
    run: TuneRun, model_ref: Any, data_refs: dict[str, Any], plugins: list[Any]
) -> dict[str, Any]:
    """Submit one ranking job per method whose fallback the space searches and the study has not measured yet."""
    measured = _stored(run.store.study.user_attrs.get(_ATTR))
    jobs = {}
    for qualname in dict.fromkeys(fallback_methods(run.space, run.registry).values()):
        if qualname in measured:
            continue
        kind, _, name = qualname.partition("/")
        method = run.registry.method(name, kind)
        tuning = method.tuning
        lacking = sorted(
            method.data_needs(dict(tuning.ranking) if tuning else {})
            - {r for r, ref in data_refs.items() if ref is not None}
        )
        if lacking:
            raise OptionsError(
                f"the search space falls back along {qualname}'s sensitivity ranking: it needs {' and '.join(lacking)} data"
            )
        run.board.log(f"measuring per-node sensitivity for {qualname} (once per study)")
        jobs[qualname] = run.executor.submit(
            ("ranking", qualname),
            measure_sensitivity,
            model_ref,
            data_refs,
            name,
            kind,
            plugins=plugins,
        )
    return jobs


def collect_rankings(run: TuneRun, jobs: dict[str, Any]) -> dict[str, list[str]]:
    """Wait for the ranking jobs; pipeline name -> its ranking (stored in the study for a resumed run)."""
    needs = fallback_methods(run.space, run.registry)
    if not needs:
        return {}
    measured = _stored(run.store.study.user_attrs.get(_ATTR))
    pending = {job.key: qualname for qualname, job in jobs.items()}
    while pending:
        for outcome in run.executor.wait(1.0):
            qualname = pending.pop(outcome.job.key)
            if not outcome.ok:
                run.board.log(
                    f"sensitivity measurement for {qualname} failed ({outcome.error}); fallback steps keep no node out"
                )
            measured[qualname] = outcome.value if outcome.ok else []
    if jobs:
        run.store.study.set_user_attr(_ATTR, measured)
    return {pipeline: list(measured.get(qualname, [])) for pipeline, qualname in needs.items()}


def _stored(value: Any) -> dict[str, list[str]]:
    return dict(value) if isinstance(value, dict) else {}
