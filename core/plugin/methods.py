"""Compression methods: what a plugin registers, and the context a method runs in."""

from __future__ import annotations

import difflib
import re
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import pydantic

from modelpress.base.errors import OptionsError
from modelpress.plugin.tuning import Tuning

if TYPE_CHECKING:
    from modelpress.ir.model import Model

__all__ = ["BUILTIN_KINDS", "DATA_NEEDS", "KINDS", "Kind", "Method", "Options", "PassContext", "check_kind_name"]

# NOTE: kinds are open (any registered name, see ``modelpress_register_kinds``); these are the
# built-in plugins' kinds, kept importable for compatibility. Use ``registry.kinds()`` for what exists.
KINDS: tuple[str, ...] = ("quantize", "prune", "distill")
# What a method can declare in ``requires`` / ``requires_if``: the data sources of a PassContext.
DATA_NEEDS: tuple[str, ...] = ("calibration", "train", "eval")
BuiltinKind = Literal["quantize", "prune", "distill"]
_KIND_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")


def check_kind_name(name: str, what: str) -> None:
    """A kind name is lowercase letters, digits, ``-`` and ``_``, starting with a letter."""
    if not isinstance(name, str) or not _KIND_NAME.match(name):
        raise ValueError(f"{what}: kind {name!r} is not a valid kind name (lowercase letters, digits, '-' and '_', starting with a letter)")


@dataclass(frozen=True)
class Kind:
    """A pass kind (``quantize``, ``prune``, ``factorize``, ...). See ``modelpress_register_kinds``.

    ``columns`` are the figure keys this kind's methods report (e.g. ``("sparsity",)``), shown by
    ``modelpress plugins``; ``smaller`` says whether a result must be a smaller file (if it is
    not, the pass is "no gain").
    """

    name: str
    description: str = ""
    columns: tuple[str, ...] = ()
    smaller: bool = False
    plugin: str = ""

    def __post_init__(self) -> None:
        check_kind_name(self.name, "Kind")
        object.__setattr__(self, "columns", tuple(self.columns))

    def attributed(self, plugin: str) -> Kind:
        return replace(self, plugin=plugin)


BUILTIN_KINDS: tuple[Kind, ...] = (
    Kind("quantize", "lower the precision of weights and activations (a smaller, faster file)", ("model_bytes_before", "model_bytes_after"), smaller=True),
    Kind("prune", "remove weights or channels (sparsity, fewer parameters)", ("sparsity",)),
    Kind("distill", "train a smaller student to match the model (the teacher)", ("agreement",)),
)


class Options(pydantic.BaseModel):
    """Base class of every method's options schema.

    Declare fields with types, defaults and ``pydantic.Field(description=...)``; the
    description is the help text ``modelpress plugins`` prints. Unknown options are errors.
    """

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


@dataclass
class PassContext:
    """What a running method can use besides the model and its options.

    Attributes:
        calibration / train / eval: data sources as the caller gave them (see
            :func:`modelpress.data.samples.as_batches` to iterate them as feed dicts).
        figures: the method records what it measured here (sparsity, agreement, ...).
        show_progress: whether progress bars should be drawn.
        extra: objects the caller passed that are not options (e.g. a given student model).
        registry: the :class:`modelpress.Registry` running this pass; a method that applies
            another method (e.g. distillation pruning a student) passes it on, so a custom
            registry is used throughout (``None`` means the process-wide one).
    """

    calibration: Any = None
    train: Any = None
    eval: Any = None
    figures: dict[str, Any] = field(default_factory=dict)
    show_progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)
    registry: Any = None

    @contextmanager
    def progress(self, description: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
        """``with ctx.progress("calibrating", total=n) as advance: ... advance(1)``."""
        from modelpress.base.progress import progress_bar

        with progress_bar(description, total=total, enabled=self.show_progress) as advance:
            yield advance


@dataclass(frozen=True)
class Method:
    """A compression method a plugin provides. See ``modelpress_register_methods``.

    Declared needs (instead of the host knowing built-in names): ``requires`` is the data the
    method always needs (``{"calibration"}``, ``{"train"}``); ``requires_if`` maps an option to
    the data it needs when set (``{"fine_tune_epochs": "train"}``); ``uses_reference=True`` means
    that in a recipe the method runs on the recipe's source model (the reference, e.g. a teacher)
    and receives the current model as ``context.extra["current"]``, with ``reference_options``
    set by default (e.g. ``{"student": "given"}``) and the recipe option ``reference_option``
    (e.g. ``"teacher"``; its only value is ``"source"``) taken out before validation.
    """

    name: str
    kind: str
    apply: Callable[..., Model | None]
    options: type[Options] = Options
    mutates: bool = True
    summary: str = ""
    plugin: str = ""
    plugin_version: str = ""
    # -- what the method needs, declared (the host, recipes and tune read these; no built-in names in the core)
    requires: frozenset[str] = frozenset()
    requires_if: tuple[tuple[str, str], ...] = ()
    uses_reference: bool = False
    reference_option: str = "reference"
    reference_options: tuple[tuple[str, Any], ...] = ()
    # -- how `modelpress tune` searches it (see modelpress.plugin.tuning.Tuning)
    tuning: Tuning | None = None

    def __post_init__(self) -> None:
        check_kind_name(self.kind, f"method {self.name!r}")
        # NOTE: mappings are stored as tuples of pairs so that a Method stays hashable
        object.__setattr__(self, "requires", frozenset(self.requires))
        for attr in ("requires_if", "reference_options"):
            value = getattr(self, attr)
            object.__setattr__(self, attr, tuple(sorted(dict(value).items())))
        unknown = [d for d in (*self.requires, *(d for _, d in self.requires_if)) if d not in DATA_NEEDS]
        if unknown:
            raise ValueError(f"method {self.name!r}: requires {', '.join(map(repr, unknown))}; data needs are {', '.join(DATA_NEEDS)}")
        if not (isinstance(self.options, type) and issubclass(self.options, Options)):
            raise TypeError(f"method {self.name!r}: options must be a modelpress.Options subclass")
        if self.tuning is not None:
            self.tuning.check(self.name, set(self.options.model_fields))

    def data_needs(self, options: dict[str, Any] | Options | None = None) -> set[str]:
        """The data sources (``calibration``, ``train``, ``eval``) this method needs with ``options``:
        ``requires``, plus each ``requires_if`` data whose option is set (truthy)."""
        raw = options.model_dump() if isinstance(options, Options) else dict(options or {})
        return {*self.requires, *(data for option, data in self.requires_if if raw.get(option))}

    @property
    def qualname(self) -> str:
        return f"{self.kind}/{self.name}"

    def attributed(self, plugin: str, plugin_version: str) -> Method:
        return replace(self, plugin=plugin, plugin_version=plugin_version)

    def validate_options(self, options: dict[str, Any] | Options | None) -> Options:
        """Validate ``options`` against the schema; errors name the option and the closest valid one."""
        if isinstance(options, self.options):
            return options
        raw = dict(options or {})
        fields = list(self.options.model_fields)
        unknown = [k for k in raw if k not in fields]
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, fields, n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            valid = ", ".join(fields) or "none"
            raise OptionsError(f"{self.qualname}: unknown option {', '.join(hints)}; valid options: {valid}")
        try:
            return self.options(**raw)
        except pydantic.ValidationError as exc:
            problems = "; ".join(
                f"option {'.'.join(str(p) for p in err['loc'])!r}: {err['msg']} (got {err.get('input')!r})"
                for err in exc.errors()
            )
            raise OptionsError(f"{self.qualname}: {problems}") from None

    def option_rows(self) -> list[dict[str, str]]:
        """Name, type, default and help of each option, for listings."""
        rows = []
        for name, info in self.options.model_fields.items():
            annotation = info.annotation
            if typing.get_origin(annotation) is typing.Literal:
                type_name = "|".join(str(a) for a in typing.get_args(annotation))
            elif typing.get_origin(annotation) is not None:
                type_name = str(annotation).replace("typing.", "")
            else:
                type_name = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
            default = "required" if info.is_required() else repr(info.get_default(call_default_factory=True))
            rows.append({"name": name, "type": type_name, "default": default, "help": info.description or ""})
        return rows
