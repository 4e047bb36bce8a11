"""Plugin discovery and the registry of methods, adapters and codecs.

Plugins are found through the ``modelpress`` entry-point group. modelpress's own adapters and
methods are entry points of the ``modelpress`` distribution and go through exactly the same
path as third-party ones; the only difference is that the switches below never turn them off
(they are what makes modelpress work), though ``MODELPRESS_BLOCK_PLUGINS`` can.

Environment switches:

``MODELPRESS_DISABLE_PLUGIN_AUTOLOAD=1``
    load no third-party plugin (built-ins still load).
``MODELPRESS_PLUGINS=name[,name...]``
    allowlist: load only these third-party plugins (entry-point or distribution names).
``MODELPRESS_BLOCK_PLUGINS=name[,name...]``
    never load these plugins (entry-point or distribution names), built-ins included.
``MODELPRESS_STRICT_PLUGINS=1``
    plugin faults are errors instead of warnings: a plugin that fails to load stops the run
    (every failure is listed in one :class:`PluginError`), and an observer hook that raises
    (``modelpress_pass_start``/``finish``/``error``, ``modelpress_export_finish``) fails the
    operation instead of being reported as a warning.

Plugin faults are contained by default: an installed plugin that fails to import or to register
is skipped with a :class:`PluginWarning` naming it (``modelpress plugins`` lists it under
"failed to load" with the reason), an observer that raises is reported as a warning naming the
plugin and the run goes on, and an unknown name in ``MODELPRESS_PLUGINS`` or
``MODELPRESS_BLOCK_PLUGINS`` is a warning.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.metadata as importlib_metadata
import os
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

from modelpress.base.errors import (
    STRICT_ENV,
    DuplicateMethodError,
    ModelpressError,
    PluginError,
    PluginWarning,
    UnknownMethodError,
    one_line,
    strict_plugins,
)
from modelpress.base.errors import (
    env_flag as _truthy,
)
from modelpress.plugin import hookspecs
from modelpress.plugin.adapter import Adapter
from modelpress.plugin.codec import Codec
from modelpress.plugin.methods import BUILTIN_KINDS, Kind, Method

if TYPE_CHECKING:
    from modelpress.ir.model import Model

__all__ = [
    "ALLOW_ENV",
    "BLOCK_ENV",
    "DISABLE_AUTOLOAD_ENV",
    "ENTRY_POINT_GROUP",
    "HELD_OUT",
    "OBSERVER_HOOKS",
    "STRICT_ENV",
    "DuplicateKindError",
    "PluginInfo",
    "PluginWarning",
    "Registry",
    "create_registry",
    "current_registry",
    "get_registry",
    "loaded_registry",
    "reset_registry",
    "strict_plugins",
    "using_registry",
]

ENTRY_POINT_GROUP = "modelpress"
DISABLE_AUTOLOAD_ENV = "MODELPRESS_DISABLE_PLUGIN_AUTOLOAD"
ALLOW_ENV = "MODELPRESS_PLUGINS"
BLOCK_ENV = "MODELPRESS_BLOCK_PLUGINS"
_BUILTIN_DISTRIBUTION = "modelpress"
_HOOK_PREFIX = "modelpress_"
# Hooks whose implementations only observe: a failure there never aborts the run (unless strict).
OBSERVER_HOOKS = frozenset(
    {
        "modelpress_pass_start",
        "modelpress_pass_finish",
        "modelpress_pass_error",
        "modelpress_export_finish",
        "modelpress_run_start",
        "modelpress_run_finish",
        "modelpress_trial_start",
        "modelpress_trial_finish",
        "modelpress_pack_finish",
        "modelpress_unpack_finish",
    }
)
# Hooks whose implementations answer a question: a ModelpressError is the plugin's answer, anything else its fault.
ANSWER_HOOKS = frozenset({"modelpress_load_data"})
# NOTE: the data files modelpress reads itself; others are offered to modelpress_load_data.
NUMPY_SUFFIXES = (".npz", ".npy")
# The role of modelpress_load_data that asks for the part of a calibration file its calibration reading leaves out
HELD_OUT = "held-out"
_REGISTER_HOOKS = (
    "modelpress_register_kinds",
    "modelpress_register_methods",
    "modelpress_register_adapters",
    "modelpress_register_codecs",
)


def _observer_fault(exc: Exception, plugin: str, hook_name: str) -> None:
    """An observer's exception as a warning naming ``plugin`` (an error when strict)."""
    message = f"plugin {plugin!r} failed in {hook_name}: {type(exc).__name__}: {one_line(exc)}"
    if strict_plugins():
        raise PluginError(f"{message} ({STRICT_ENV}=1 makes this an error)", plugin=plugin) from exc
    warnings.warn(
        f"{message}; ignored (the run goes on; {STRICT_ENV}=1 makes this an error)",
        PluginWarning,
        stacklevel=3,
    )


def notify_observers(pm: pluggy.PluginManager, hook_name: str, **kwargs: Any) -> list[Any]:
    """Call observer hook ``hook_name`` as pluggy would (its order: wrappers around the others,
    ``tryfirst`` first, the last registered first; each implementation given the arguments it
    names), each implementation on its own: an exception is a warning naming the plugin
    (:func:`_observer_fault`) and the others still run. Returns the non-``None`` results."""
    results: list[Any] = []
    teardowns: list[tuple[pluggy.HookImpl, Any]] = []
    for impl in reversed(getattr(pm.hook, hook_name).get_hookimpls()):
        args = [kwargs[name] for name in impl.argnames]
        try:
            out = impl.function(*args)
            if impl.wrapper or impl.hookwrapper:
                next(out)  # NOTE: a wrapper runs to its yield now, the rest after the others
                teardowns.append((impl, out))
            elif out is not None:
                results.append(out)
        except Exception as exc:
            _observer_fault(exc, impl.plugin_name, hook_name)
    for impl, wrapper in reversed(teardowns):
        try:
            wrapper.send(pluggy.Result(results, None) if impl.hookwrapper else results)
            raise RuntimeError("the wrapper yielded a second time")
        except StopIteration:
            pass
        except Exception as exc:
            _observer_fault(exc, impl.plugin_name, hook_name)
    return results


class _Hooks:
    """``registry.hook``: pluggy's hook callers, but observer hooks (:data:`OBSERVER_HOOKS`) are
    called by :func:`notify_observers`, so that an observer's fault never stops a run."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self._pm = pm

    def __getattr__(self, name: str) -> Any:
        if name in OBSERVER_HOOKS:
            return functools.partial(notify_observers, self._pm, name)
        return getattr(self._pm.hook, name)


def ask_first(pm: pluggy.PluginManager, hook_name: str, **kwargs: Any) -> Any:
    """Call answer hook ``hook_name`` (:data:`ANSWER_HOOKS`) as pluggy calls a ``firstresult`` hook
    (its order; each implementation given the arguments it names) and return the first non-``None``
    answer. A :class:`ModelpressError` an implementation raises is its answer (it propagates); any
    other exception is that plugin's fault, a :class:`PluginError` naming it."""
    for impl in reversed(getattr(pm.hook, hook_name).get_hookimpls()):
        if impl.wrapper or impl.hookwrapper:
            continue  # NOTE: answer hooks are asked, not wrapped
        try:
            answer = impl.function(*[kwargs[name] for name in impl.argnames])
        except ModelpressError:
            raise
        except Exception as exc:
            raise PluginError(
                f"plugin {impl.plugin_name!r} failed in {hook_name}: {type(exc).__name__}: {one_line(exc)}",
                plugin=impl.plugin_name,
            ) from exc
        if answer is not None:
            return answer
    return None


@dataclass
class PluginInfo:
    """One loaded plugin: where it came from and what it registered."""

    name: str
    distribution: str
    version: str
    builtin: bool
    module: str
    methods: list[Method] = field(default_factory=list)
    adapters: list[Adapter] = field(default_factory=list)
    codecs: list[Codec] = field(default_factory=list)
    kinds: list[Kind] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.distribution} {self.version})"


class Registry:
    """Every loaded plugin, and the methods and adapters they registered."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self.skipped: dict[str, str] = {}
        self.failed: dict[str, str] = {}
        self._methods: dict[tuple[str, str], tuple[Method, PluginInfo]] = {}
        self._adapters: list[Adapter] = []
        self._codecs: dict[str, tuple[Codec, PluginInfo]] = {}
        self._kinds: dict[str, tuple[Kind, PluginInfo]] = {}

    # -- registration ----------------------------------------------------------------------
    def register(
        self,
        plugin: object,
        *,
        name: str | None = None,
        distribution: str = "local",
        version: str = "",
        builtin: bool = False,
    ) -> PluginInfo:
        """Register a plugin object (a module or any object with hook implementations)."""
        name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
        if name in self.plugins:
            raise PluginError(
                f"a plugin named {name!r} is already registered ({self.plugins[name].label})",
                plugin=name,
            )
        info = PluginInfo(
            name, distribution, version, builtin, getattr(plugin, "__name__", type(plugin).__name__)
        )
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self.pm.unregister(name=name)
            raise PluginError(
                f"plugin {info.label} is invalid: {one_line(exc)}", plugin=name
            ) from None
        unmarked = self._unmarked_hooks(plugin)
        if unmarked:
            self.pm.unregister(name=name)
            raise PluginError(
                f"plugin {info.label} defines {', '.join(unmarked)} without @modelpress.hookimpl, so modelpress would never "
                f"call it; decorate it with @modelpress.hookimpl (or rename it if it is not a hook)",
                plugin=name,
            )
        self.plugins[name] = info
        try:
            self._collect(name, info)
        except BaseException:
            self.unregister(name)
            raise
        return info

    def _unmarked_hooks(self, plugin: object) -> list[str]:
        """``modelpress_*`` functions of ``plugin`` that pluggy did not take as hook implementations."""
        found = []
        for attr in dir(plugin):
            if not attr.startswith(_HOOK_PREFIX):
                continue
            value = getattr(plugin, attr, None)
            if callable(value) and self.pm.parse_hookimpl_opts(plugin, attr) is None:
                found.append(attr)
        return found

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)
        info = self.plugins.pop(name, None)
        if info is None:
            return
        self._methods = {k: v for k, v in self._methods.items() if v[1] is not info}
        self._adapters = [a for a in self._adapters if a.plugin != name]
        self._codecs = {k: v for k, v in self._codecs.items() if v[1] is not info}
        self._kinds = {k: v for k, v in self._kinds.items() if v[1] is not info}

    def _collect(self, name: str, info: PluginInfo) -> None:
        """Call this plugin's register hooks with callbacks that attribute what it registers."""
        plugin = self.pm.get_plugin(name)
        others = [p for p in self.pm.get_plugins() if p is not plugin]
        callbacks: dict[str, Callable[[Any], None]] = {
            "modelpress_register_kinds": functools.partial(self._register_kind, name, info),
            "modelpress_register_methods": functools.partial(self._register_method, name, info),
            "modelpress_register_adapters": functools.partial(self._register_adapter, name, info),
            "modelpress_register_codecs": functools.partial(self._register_codec, name, info),
        }
        for hook_name in _REGISTER_HOOKS:
            # NOTE: called through pluggy's hook caller (restricted to this plugin, so that what
            # is registered is attributed to it): wrappers, tryfirst/trylast and argument
            # subsets work as in any pluggy host.
            caller = self.pm.subset_hook_caller(hook_name, remove_plugins=others)
            try:
                caller(register=callbacks[hook_name])
            except (PluginError, DuplicateMethodError):
                raise
            except Exception as exc:
                raise PluginError(
                    f"plugin {info.label} failed in {hook_name}: {type(exc).__name__}: {one_line(exc)}",
                    plugin=name,
                ) from exc

    def _register_method(self, name: str, info: PluginInfo, method: Method) -> None:
        if not isinstance(method, Method):
            raise PluginError(
                f"plugin {info.label} registered {method!r}, which is not a modelpress.Method",
                plugin=name,
            )
        method = method.attributed(info.name, info.version)
        key = (method.kind, method.name)
        if key in self._methods:
            _, other = self._methods[key]
            raise DuplicateMethodError(
                f"method {method.qualname!r} is registered by both {other.label} and {info.label}; "
                f"uninstall one, or block one with {BLOCK_ENV}=<plugin name>",
                plugin=name,
                method=method.name,
            )
        self._methods[key] = (method, info)
        info.methods.append(method)

    def _register_adapter(self, name: str, info: PluginInfo, adapter: Adapter) -> None:
        if not isinstance(adapter, Adapter):
            raise PluginError(
                f"plugin {info.label} registered {adapter!r}, which is not a modelpress.Adapter",
                plugin=name,
            )
        adapter = adapter.attributed(info.name, info.version)
        self._adapters.append(adapter)
        info.adapters.append(adapter)

    def _register_codec(self, name: str, info: PluginInfo, codec: Codec) -> None:
        if not isinstance(codec, Codec):
            raise PluginError(
                f"plugin {info.label} registered {codec!r}, which is not a modelpress.Codec",
                plugin=name,
            )
        if codec.name in self._codecs:
            other = self._codecs[codec.name][1]
            raise DuplicateMethodError(
                f"codec {codec.name!r} is registered by both {other.label} and {info.label}; "
                f"uninstall one, or block one with {BLOCK_ENV}=<plugin name>",
                plugin=name,
                method=codec.name,
            )
        codec = codec.attributed(info.name, info.version)
        self._codecs[codec.name] = (codec, info)
        info.codecs.append(codec)

    def _register_kind(self, name: str, info: PluginInfo, kind: Kind) -> None:
        if not isinstance(kind, Kind):
            raise PluginError(
                f"plugin {info.label} registered {kind!r}, which is not a modelpress.Kind",
                plugin=name,
            )
        kind = kind.attributed(info.name)
        if kind.name in self._kinds:
            other_kind, other = self._kinds[kind.name]
            if other_kind.attributed("") != kind.attributed(""):
                raise DuplicateKindError(
                    f"kind {kind.name!r} is registered differently by both {other.label} and {info.label} "
                    f"({_kind_text(other_kind)} vs {_kind_text(kind)}); make the two declarations the same, "
                    f"uninstall one, or block one with {BLOCK_ENV}=<plugin name>",
                    plugin=name,
                    method=kind.name,
                    plugins=(other.name, info.name),
                )
            # NOTE: the same declaration from two plugins sharing a kind: merged (the first plugin keeps the attribution)
            info.kinds.append(other_kind)
            return
        self._kinds[kind.name] = (kind, info)
        info.kinds.append(kind)

    # -- lookup ----------------------------------------------------------------------------
    def methods(self, kind: str | None = None) -> list[Method]:
        return [m for (k, _), (m, _) in sorted(self._methods.items()) if kind is None or k == kind]

    def kinds(self) -> list[Kind]:
        """Every kind: those registered by ``modelpress_register_kinds`` and those declared by a
        registered method (built-in kinds first, then by name)."""
        names = {*self._kinds, *(k for k, _ in self._methods)}
        order = [k.name for k in BUILTIN_KINDS]
        return [
            self.kind(n)
            for n in sorted(names, key=lambda n: (order.index(n) if n in order else len(order), n))
        ]

    def kind(self, name: str) -> Kind:
        """The :class:`Kind` called ``name`` (a kind only declared by a method has no description)."""
        if name in self._kinds:
            return self._kinds[name][0]
        for builtin in BUILTIN_KINDS:
            if builtin.name == name:
                return builtin
        if any(k == name for k, _ in self._methods):
            return Kind(name)
        known = ", ".join(k.name for k in self.kinds()) or "none"
        raise UnknownMethodError(
            f"unknown method kind {name!r}; installed kinds: {known} (see `modelpress plugins`)"
        )

    def method(self, name: str, kind: str | None = None) -> Method:
        """The method called ``name`` (of ``kind``, if given); a clear error lists what exists."""
        if kind is not None:
            self.kind(kind)
        matches = [m for m in self.methods(kind) if m.name == name]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            options = ", ".join(m.qualname for m in matches)
            raise UnknownMethodError(
                f"method {name!r} exists in several kinds ({options}); say which kind"
            )
        installed = ", ".join(m.qualname for m in self.methods(kind)) or "none"
        where = f" of kind {kind!r}" if kind else ""
        raise UnknownMethodError(
            f"no installed plugin provides a method {name!r}{where}; installed: {installed} "
            f"(see `modelpress plugins`)"
        )

    def local_plugins(self) -> list[object]:
        """The plugin objects registered directly (``create_registry(plugins=[...])``, ``register(obj)``), not from entry
        points: what another process needs besides its own entry points to have this registry's methods."""
        return [
            self.pm.get_plugin(name)
            for name, info in self.plugins.items()
            if info.distribution == "local"
        ]

    def adapters(self) -> list[Adapter]:
        return sorted(self._adapters, key=lambda a: -a.priority)

    def codecs(self) -> list[Codec]:
        return [c for _, (c, _) in sorted(self._codecs.items())]

    def codec(self, name: str) -> Codec | None:
        entry = self._codecs.get(name)
        return entry[0] if entry else None

    @property
    def hook(self) -> Any:
        """The hooks to call, ``registry.hook.modelpress_pass_start(method=..., ...)`` (keyword
        arguments only); an observer's exception is a warning naming the plugin (see :class:`_Hooks`)."""
        return _Hooks(self.pm)

    def load_data(
        self, source: Any, model: Model, what: str, sequence_length: int | None = None
    ) -> Any:
        """``source`` as data for ``model``: a path to a file that is not ``.npz``/``.npy`` read by the
        plugin that answers ``modelpress_load_data`` (a text corpus for a Hugging Face model, cut into
        samples of ``sequence_length`` tokens); anything else, or a file no plugin reads, is returned as
        it is (the data loader then says what it accepts). ``what="held-out"`` answers ``None`` unless a
        plugin holds part of the file out of its calibration reading (see the hook)."""
        if (
            not isinstance(source, (str, os.PathLike))
            or Path(source).suffix.lower() in NUMPY_SUFFIXES
            or not Path(source).is_file()
        ):
            return None if what == HELD_OUT else source
        answer = ask_first(
            self.pm,
            "modelpress_load_data",
            path=Path(source),
            model=model,
            what=what,
            sequence_length=sequence_length,
        )
        return source if answer is None and what != HELD_OUT else answer


def _kind_text(kind: Kind) -> str:
    return f"description={kind.description!r}, columns={list(kind.columns)}, smaller={kind.smaller}"


class DuplicateKindError(DuplicateMethodError):
    """Two plugins registered the same kind with different definitions; ``plugins`` names both.

    Not contained like other load failures: which plugin's methods would vanish would depend on the
    order entry points are read in, so loading stops and names both."""

    def __init__(
        self,
        message: str,
        *,
        plugin: str | None = None,
        method: str | None = None,
        plugins: tuple[str, str] = ("", ""),
    ):
        super().__init__(message, plugin=plugin, method=method)
        self.plugins = plugins


def _split_env(name: str) -> set[str]:
    return {part.strip() for part in os.environ.get(name, "").split(",") if part.strip()}


def _entry_points() -> Iterable[importlib_metadata.EntryPoint]:
    return importlib_metadata.entry_points(group=ENTRY_POINT_GROUP)


def create_registry(
    *,
    autoload: bool | None = None,
    allow: Iterable[str] | None = None,
    block: Iterable[str] | None = None,
    plugins: Iterable[object] = (),
    only: Iterable[str] | None = None,
) -> Registry:
    """Build a registry from the ``modelpress`` entry points and any extra ``plugins`` objects.

    ``autoload``/``allow``/``block`` default to the environment switches (module docstring).
    ``only``: import just the entry points of these names (the switches still apply), the others
    not at all: how ``unpack`` loads the plugins a pack records as providing its codecs.
    """
    if autoload is None:
        autoload = not _truthy(os.environ.get(DISABLE_AUTOLOAD_ENV))
    allowed = set(allow) if allow is not None else _split_env(ALLOW_ENV)
    blocked = set(block) if block is not None else _split_env(BLOCK_ENV)

    registry = Registry()
    seen: set[str] = set()
    known: set[str] = set()
    wanted = None if only is None else set(only)
    for ep in sorted(_entry_points(), key=lambda e: e.name):
        dist = ep.dist.name if ep.dist is not None else "unknown"
        version = ep.dist.version if ep.dist is not None else ""
        builtin = dist.lower() == _BUILTIN_DISTRIBUTION
        known.update((ep.name, dist))
        if wanted is not None and ep.name not in wanted:
            continue
        if ep.name in seen:
            # NOTE: the same distribution visible twice on sys.path (e.g. editable + --target).
            continue
        seen.add(ep.name)
        if ep.name in blocked or dist in blocked:
            registry.skipped[ep.name] = f"blocked by {BLOCK_ENV}"
            continue
        if not builtin:
            if not autoload:
                registry.skipped[ep.name] = f"autoload disabled by {DISABLE_AUTOLOAD_ENV}"
                continue
            if allowed and ep.name not in allowed and dist not in allowed:
                registry.skipped[ep.name] = f"not in {ALLOW_ENV}"
                continue
        _load_entry_point(registry, ep, dist, version, builtin)
    _check_switch_names(allowed, blocked, known)
    if registry.failed:
        problems = "; ".join(f"{name}: {why}" for name, why in registry.failed.items())
        if strict_plugins():
            raise PluginError(
                f"{len(registry.failed)} plugin(s) failed to load ({STRICT_ENV}=1): {problems}",
                plugin=", ".join(registry.failed),
            )
        for name, why in registry.failed.items():
            warnings.warn(
                f"plugin {name!r} failed to load and is skipped: {why}", PluginWarning, stacklevel=2
            )
    for obj in plugins:
        registry.register(obj)
    return registry


def _load_entry_point(
    registry: Registry, ep: importlib_metadata.EntryPoint, dist: str, version: str, builtin: bool
) -> None:
    """Import and register one entry point; a failure is recorded in ``registry.failed``, not raised."""
    try:
        module = ep.load()
    except Exception as exc:
        registry.failed[ep.name] = (
            f"from {dist} {version}, {ep.value} failed to import: {type(exc).__name__}: {one_line(exc)}; "
            f"fix or uninstall it, or skip it with {BLOCK_ENV}={ep.name}"
        )
        return
    try:
        registry.register(module, name=ep.name, distribution=dist, version=version, builtin=builtin)
    except DuplicateKindError:
        raise  # NOTE: a conflict between two plugins, not one plugin's fault to contain (see DuplicateKindError)
    except PluginError as exc:
        registry.failed[ep.name] = (
            f"{one_line(exc)}; fix or uninstall it, or skip it with {BLOCK_ENV}={ep.name}"
        )


def _check_switch_names(allowed: set[str], blocked: set[str], known: set[str]) -> None:
    """Warn about names in the allow/block switches that no installed plugin has (typos)."""
    for env, names in ((ALLOW_ENV, allowed), (BLOCK_ENV, blocked)):
        unknown = sorted(names - known)
        if unknown:
            warnings.warn(
                f"{env} names {', '.join(map(repr, unknown))}, which no installed plugin is called "
                f"(installed: {', '.join(sorted(known)) or 'none'}); check the spelling",
                PluginWarning,
                stacklevel=3,
            )


_lock = threading.Lock()
_default: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, created on first use."""
    global _default
    with _lock:
        if _default is None:
            _default = create_registry()
        return _default


_current: contextvars.ContextVar[Registry | None] = contextvars.ContextVar(
    "modelpress_registry", default=None
)


def loaded_registry() -> Registry | None:
    """The registry :func:`current_registry` would return, if it exists already (else ``None``:
    nothing in this process has loaded the plugins yet)."""
    return _current.get() or _default


def current_registry() -> Registry:
    """The registry of the ``modelpress.load`` in progress (an adapter that decodes a ``.mpk`` or
    loads another model through it then uses the caller's codecs and adapters), else the
    process-wide one."""
    return _current.get() or get_registry()


@contextlib.contextmanager
def using_registry(registry: Registry) -> Iterator[Registry]:
    """Make ``registry`` the :func:`current_registry` inside the block (this thread/task only)."""
    token = _current.set(registry)
    try:
        yield registry
    finally:
        _current.reset(token)


def reset_registry() -> None:
    """Forget the process-wide registry (after installing a plugin, or in tests)."""
    global _default
    with _lock:
        _default = None
