"""Hook specifications: the plugin author's reference.

A modelpress plugin is a Python module (or object) with functions decorated by
``modelpress.hookimpl`` and named after the specs below. Expose it under the ``modelpress``
entry-point group of your distribution::

    [project.entry-points.modelpress]
    my-plugin = "my_package.plugin"

modelpress's own adapters and methods are plugins registered through this same group, so
everything they do, a third-party plugin can do too.

Rules that hold for every hook:

* hooks are always called with keyword arguments, through pluggy's hook callers:
  implementations may accept any subset of the documented arguments (pluggy matches them by
  name), and ``@hookimpl(wrapper=True)``, ``tryfirst=True`` and ``trylast=True`` work;
* a misspelt ``modelpress_*`` function is an error at load time, not silently ignored, and so is
  a ``modelpress_*`` function without ``@modelpress.hookimpl``;
* an exception raised by a registration hook becomes a :class:`modelpress.PluginError` naming
  the plugin; for an installed (entry-point) plugin that means it is skipped with a
  :class:`modelpress.PluginWarning` and listed by ``modelpress plugins`` under "failed to load";
* an exception raised by an observer hook (``modelpress_pass_start``, ``_pass_finish``,
  ``_pass_error``, ``modelpress_export_finish``) is a :class:`modelpress.PluginWarning` naming
  the plugin, and the run goes on;
* ``modelpress_load_data`` answers a question: the first non-None result wins, a
  :class:`modelpress.ModelpressError` it raises is the answer, any other exception a
  :class:`modelpress.PluginError` naming the plugin;
* ``MODELPRESS_STRICT_PLUGINS=1`` turns every such warning into a :class:`modelpress.PluginError`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from modelpress.io.export import ExportResult
    from modelpress.ir.model import Model
    from modelpress.ir.provenance import PassRecord
    from modelpress.plugin.adapter import Adapter
    from modelpress.plugin.codec import Codec
    from modelpress.plugin.methods import Kind, Method

__all__ = ["PROJECT_NAME", "hookimpl", "hookspec"]

PROJECT_NAME = "modelpress"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# -- discovery -----------------------------------------------------------------------------


@hookspec
def modelpress_register_kinds(register: Callable[[Kind], None]) -> None:
    """Register pass kinds by calling ``register(kind)`` (since modelpress 0.2, issue 13).

    Kinds are open: besides the built-in ``quantize``, ``prune`` and ``distill``, a plugin can
    add ``factorize``, ``fuse``, ``pack-for-x``... ``kind`` is a :class:`modelpress.Kind`: a
    ``name`` (lowercase letters, digits, ``-``/``_``), a ``description`` (shown by ``modelpress
    plugins``), ``columns`` (the figure keys its methods report, e.g. ``("rank",)``) and
    ``smaller`` (``True``: a result that is not a smaller file is "no gain").

    A method may also just declare a new kind in ``Method(kind=...)``; it then exists with no
    description. ``modelpress apply -k`` accepts every registered kind. Two plugins registering
    the same kind name identically is fine; differently, a :class:`modelpress.DuplicateMethodError`.
    """


@hookspec
def modelpress_register_methods(register: Callable[[Method], None]) -> None:
    """Register compression methods by calling ``register(method)`` once per method.

    ``method`` is a :class:`modelpress.Method`: a ``name`` (unique within its ``kind``), a
    ``kind`` (``"quantize"``, ``"prune"``, ``"distill"`` or any kind a plugin registers, see
    ``modelpress_register_kinds``), an ``options`` schema (a subclass of
    :class:`modelpress.Options`, a pydantic model: its fields, types, defaults and descriptions
    are what ``modelpress plugins`` shows and what recipes are validated against), an ``apply``
    callable and ``mutates``:

    * ``mutates=True``: ``apply(model, options, context)`` edits ``model`` in place and returns
      ``None`` (or the same model). The host hands it a clone, so the caller's model is never
      changed; the clone shares weight tensors, so replace tensors, never write into them.
    * ``mutates=False``: ``apply`` must leave ``model`` untouched and return a new
      :class:`modelpress.Model`. The host checks both.

    ``context`` is a :class:`modelpress.PassContext`: the data the caller gave (``calibration``,
    ``train``, ``eval``), ``figures`` (a dict the method fills with what it measured, e.g.
    ``{"sparsity": 0.5}``; it ends up in the report and in the model's provenance),
    ``progress(...)`` for progress bars, and ``registry`` (pass it as ``registry=`` when your
    method applies another method, so a custom registry is used throughout).

    What the host needs to know about a method is declared on it, for built-in and third-party
    methods alike: ``requires`` / ``requires_if`` (the data it needs; :func:`modelpress.apply`
    refuses a call without it before the method runs), ``min_cosine`` (its verification floor:
    the lowest cosine of a result's outputs against the reference that :func:`modelpress.export`
    accepts without ``accept_loss``; unset, the kind's ``Kind.min_cosine``; ``None``, the method
    changes outputs by design) and ``kind_default`` (the method the kind's shortcut runs when none
    is named). Every result is checked before it is returned (ONNX checker per node, topological
    order, no dangling input, no dead node); a failure is a :class:`modelpress.PluginError` naming
    the plugin.

    Registering two methods with the same kind and name, from the same or different plugins,
    is a :class:`modelpress.DuplicateMethodError` naming both plugins.
    """


@hookspec
def modelpress_register_adapters(register: Callable[[Adapter], None]) -> None:
    """Register importers for source frameworks by calling ``register(adapter)``.

    ``adapter`` is a :class:`modelpress.Adapter`: a ``name``, an ``accepts(source) -> bool``
    predicate (a path, bytes or an in-memory object from the framework) and a
    ``load(source, **options) -> Model``. ``modelpress.load`` asks adapters in descending
    ``priority`` order and uses the first that accepts the source. ``accepts`` must return a
    bool and never raise for a source it does not know; ``load`` must return a Model or raise a
    :class:`modelpress.ModelpressError` saying why it refuses. Any other exception or return type
    is a :class:`modelpress.PluginError` naming the plugin, and the next adapters still get
    their turn. An adapter must import its
    framework lazily, inside ``accepts``/``load``, and only when the source could be one of its
    objects: ``import modelpress`` never imports torch or TensorFlow.
    """


@hookspec
def modelpress_register_codecs(register: Callable[[Codec], None]) -> None:
    """Register lossless tensor codecs for ``modelpress pack`` by calling ``register(codec)``.

    ``codec`` is a :class:`modelpress.Codec`: a ``name`` (unique across plugins; it is written
    into every ``.mpk`` manifest, so never rename a codec once files exist), ``encode(data,
    info) -> bytes | None``, ``decode(blob, info) -> bytes`` and ``applies(info) -> bool``.
    ``data`` is one tensor's raw little-endian bytes (int4/uint4 packed two to a byte, as ONNX
    stores them) and ``info`` a :class:`modelpress.TensorInfo` (``name``, ONNX ``dtype``,
    ``shape`` and ``role``: ``"weight"``, ``"bias"``, ``"quantized"``, ``"indices"``, ``"table"``
    or ``"other"``). ``decode`` must return exactly ``data``; ``encode`` returns ``None`` when it
    cannot code a tensor.

    The packer tries every codec whose ``applies`` accepts the tensor and keeps the smallest blob
    that decodes back to the same bytes; a codec that raises or decodes wrongly is skipped for
    that tensor (and named in the pack figures), so a faulty codec never corrupts a file. A
    ``.mpk`` file can only be unpacked where the codecs it names are installed. Two plugins
    registering the same codec name is a :class:`modelpress.DuplicateMethodError`.
    """


# -- data ------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def modelpress_load_data(path: Path, model: Model, what: str, sequence_length: int | None) -> Any:
    """Read a data file of a type modelpress does not read itself (anything but ``.npz``/``.npy``)
    as inputs of ``model`` (since modelpress 0.2, issue 26).

    ``path`` is the file given as data (``calibration=``, ``train=``, ``eval=``, the CLI's
    ``--calib``/``--data``/``--eval``); ``what`` says its role (``"calibration"``, ``"training"``,
    ``"evaluation"``, or ``"held-out"``: the part of a calibration file that its ``"calibration"``
    reading leaves out, for evaluation when no evaluation data was given; answer ``None`` when
    nothing is left out). ``sequence_length`` is the length of each sample the user asked for
    (``--seq-len``, a recipe's ``data.sequence_length``) where data is cut into sequences (a text
    corpus), ``None`` for your default. Return the data in the usual convention (a dict of arrays named after the
    model's inputs, a list of samples, ...; see :func:`modelpress.load_dataset`), or ``None`` when
    the file or the model is not yours (e.g. a text corpus for a model your adapter did not
    import: look at ``model.provenance``). The first non-None answer wins; when none answers, the
    file is refused as data modelpress cannot read. A :class:`modelpress.ModelpressError` raised
    here (a :class:`modelpress.DataError` saying what is wrong with the file) reaches the caller
    as it is; any other exception is a :class:`modelpress.PluginError` naming the plugin.
    """


# -- observation (logging, experiment tracking) -----------------------------------------------


@hookspec
def modelpress_pass_start(
    method: Method, model: Model, options: Any, pass_id: str, stage: str | None
) -> None:
    """Called before a method runs. ``options`` is the validated options object. ``pass_id``
    identifies this run of the method (the same in its ``pass_finish``/``pass_error``);
    ``stage`` is the recipe stage's name when :func:`modelpress.compress` (or a tune trial) runs
    it, else None. Take only the arguments you need (pluggy matches them by name).

    Observers must not change ``model``. Every implementation is called; return values are
    ignored.
    """


@hookspec
def modelpress_pass_finish(
    method: Method, model: Model, record: PassRecord, pass_id: str, stage: str | None
) -> None:
    """Called after a method succeeded, with the resulting ``model`` and its ``record``
    (options, wall time in ``record.seconds`` and the method's ``record.figures``, already
    checked to be JSON-serialisable); ``pass_id``/``stage`` as in ``modelpress_pass_start``."""


@hookspec
def modelpress_pass_error(
    method: Method, model: Model, error: BaseException, pass_id: str, stage: str | None
) -> None:
    """Called when a method raised (or was interrupted); ``model`` is the input model."""


@hookspec
def modelpress_run_start(run_id: str, model: Model, recipe: Any) -> None:
    """Called when :func:`modelpress.compress` starts a recipe run on ``model`` (the loaded
    source), after the recipe was validated. ``recipe`` is the :class:`modelpress.Recipe`."""


@hookspec
def modelpress_run_finish(run_id: str, result: Any, error: BaseException | None) -> None:
    """Called when a recipe run ends: ``result`` is the :class:`modelpress.CompressResult` (its
    ``interrupted`` says whether Ctrl-C stopped it) and ``error`` None, or ``result`` None and
    ``error`` what stopped it."""


@hookspec
def modelpress_trial_start(
    trial_id: str, config: dict[str, Any], passes: list[dict[str, Any]]
) -> None:
    """Called by ``modelpress tune`` when a trial starts (on the driver, before it is sent to a
    worker). ``trial_id`` is ``"<study name>/<trial number>"``, the same in ``trial_finish``;
    ``config`` the sampled configuration, ``passes`` the recipe passes it runs."""


@hookspec
def modelpress_trial_finish(trial_id: str, status: str, figures: dict[str, Any]) -> None:
    """Called when a trial ended: ``status`` is ``"ok"``, ``"pruned"`` (cut early) or ``"failed"``;
    ``figures`` what the study recorded (metric, size_bytes, latency_ms, error...)."""


@hookspec
def modelpress_pack_finish(pack_id: str, source: str, result: Any) -> None:
    """Called after :func:`modelpress.pack` wrote a ``.mpk``: ``pack_id`` is the pack's path,
    ``source`` what was packed (a path, or the model's name), ``result`` the :class:`modelpress.PackResult`."""


@hookspec
def modelpress_unpack_finish(pack_id: str, output: Path) -> None:
    """Called after :func:`modelpress.unpack` restored the ONNX file ``output`` from the pack ``pack_id``,
    on the plugins of the registry it decoded with: the one given (``registry=``), else the
    process's when something already loaded it; else (a fresh ``modelpress unpack``) only the
    plugins the pack records as providing its codecs are loaded, and only they are told (since
    modelpress 0.2: unpacking no longer imports every plugin). To observe every unpack, pass
    ``registry=modelpress.get_registry()``."""


@hookspec
def modelpress_export_finish(model: Model, result: ExportResult) -> None:
    """Called after a model was written and verified; ``result.path`` is the final file and
    ``result.verification`` holds the numerical check's figures."""
