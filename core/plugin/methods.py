"""Compression methods: what a plugin registers, and the context a method runs in."""

from __future__ import annotations

import re
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import pydantic

from modelpress.base.errors import OptionsError, validation_problems
from modelpress.plugin.tuning import Tuning

if TYPE_CHECKING:
    from modelpress.ir.model import Model

__all__ = [
    "BUILTIN_KINDS",
    "DATA_NEEDS",
    "DEFAULT_FLOOR",
    "KINDS",
    "KIND_FLOOR",
    "Kind",
    "Method",
    "Options",
    "PassContext",
    "TextFloor",
    "check_kind_name",
]

# NOTE: kinds are open (any registered name, see ``modelpress_register_kinds``); these are the
# built-in plugins' kinds, kept importable for compatibility. Use ``registry.kinds()`` for what exists.
KINDS: tuple[str, ...] = ("quantize", "prune", "distill")
# What a method can declare in ``requires`` / ``requires_if``: the data sources of a PassContext.
DATA_NEEDS: tuple[str, ...] = ("calibration", "train", "eval")
BuiltinKind = Literal["quantize", "prune", "distill"]
_KIND_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")
# The verification floor of a kind that declares none: the lowest cosine of a result's outputs against
# its reference that export accepts without ``accept_loss``. Conservative on purpose: a method whose
# results legitimately drift further says so (``Method(min_cosine=...)`` or ``Kind(min_cosine=...)``).
DEFAULT_FLOOR = 0.9
# ``Method(min_cosine=KIND_FLOOR)`` (the default): the method inherits its kind's floor.
KIND_FLOOR = "kind"


def _check_floor(value: object, what: str, *, inherit: bool) -> None:
    """A floor is a cosine in [-1, 1], ``None`` (no default floor) or, for a method (``inherit``), :data:`KIND_FLOOR`."""
    if value is None or (inherit and value == KIND_FLOOR):
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not -1.0 <= float(value) <= 1.0
    ):
        allowed = f"None or {KIND_FLOOR!r}" if inherit else "or None"
        raise ValueError(
            f"{what}: min_cosine must be a cosine between -1 and 1, {allowed}, not {value!r}"
        )


def check_kind_name(name: str, what: str) -> None:
    """A kind name is lowercase letters, digits, ``-`` and ``_``, starting with a letter."""
    if not isinstance(name, str) or not _KIND_NAME.match(name):
        raise ValueError(
            f"{what}: kind {name!r} is not a valid kind name (lowercase letters, digits, '-' and '_', starting with a letter)"
        )


@dataclass(frozen=True)
class TextFloor:
    """What a text decoder's result must keep (see :attr:`Method.text_floor`): the share of greedy
    tokens it generates as the reference does from a few prompts, and the largest relative increase
    of its perplexity on held-out text (0.05: +5 %)."""

    min_token_agreement: float
    max_perplexity_increase: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_token_agreement <= 1.0 or self.max_perplexity_increase < 0:
            raise ValueError(
                f"TextFloor: min_token_agreement in [0, 1] and max_perplexity_increase >= 0, not {self!r}"
            )


@dataclass(frozen=True)
class Kind:
    """A pass kind (``quantize``, ``prune``, ``factorize``, ...). See ``modelpress_register_kinds``.

    ``columns`` are the figure keys this kind's methods report (e.g. ``("sparsity",)``), shown by
    ``modelpress plugins``; ``smaller`` says whether a result must be a smaller file (if it is
    not, the pass is "no gain"). ``min_cosine`` is the verification floor of the kind's methods
    that declare none (:data:`DEFAULT_FLOOR` unless the kind says otherwise; ``None``: its
    methods change outputs by design, see :attr:`Method.min_cosine`).
    """

    name: str
    description: str = ""
    columns: tuple[str, ...] = ()
    smaller: bool = False
    plugin: str = ""
    min_cosine: float | None = DEFAULT_FLOOR

    def __post_init__(self) -> None:
        check_kind_name(self.name, "Kind")
        object.__setattr__(self, "columns", tuple(self.columns))
        _check_floor(self.min_cosine, f"kind {self.name!r}", inherit=False)

    def attributed(self, plugin: str) -> Kind:
        return replace(self, plugin=plugin)


BUILTIN_KINDS: tuple[Kind, ...] = (
    Kind(
        "quantize",
        "lower the precision of weights and activations (a smaller, faster file)",
        ("model_bytes_before", "model_bytes_after"),
        smaller=True,
    ),
    Kind(
        "prune",
        "remove weights or channels (sparsity, fewer parameters)",
        ("sparsity",),
        min_cosine=0.5,
    ),
    # NOTE: a student is trained to match, not to stay close: no default floor (explicit thresholds or criteria judge it)
    Kind(
        "distill",
        "train a smaller student to match the model (the teacher)",
        ("agreement",),
        min_cosine=None,
    ),
)


class Options(pydantic.BaseModel):
    """Base class of every method's options schema.

    Declare fields with types, defaults and ``pydantic.Field(description=...)``; the
    description is the help text ``modelpress plugins`` prints. Unknown options are errors.
    """

    # NOTE: defer_build: a schema's validator is built on its first use, not when the plugin is
    # imported (every method's options class is made at registry load; one run uses one or two)
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True, defer_build=True)


# The figures a method that judged its own result writes through PassContext.report_criteria
CRITERIA_MET = "criteria_met"
CRITERIA = "criteria"


@dataclass
class PassContext:
    """What a running method can use besides the model and its options.

    Attributes:
        calibration / train / eval: data sources as the caller gave them (a path, a dict of
            arrays, a :class:`~modelpress.data.samples.Dataset`, ...; ``None`` when not given).
            ``load_dataset(context.calibration, model.signature, what="calibration")`` (from
            ``modelpress.plugin_api``) validates one against the model's inputs and returns a
            ``Dataset``: ``.take(n)`` keeps the first ``n`` samples, ``.batches(batch_size)``
            yields feed dicts ``{input name: array}`` of at most ``batch_size`` samples (never
            more than the model takes, never mixing shapes) and ``.batch_count(batch_size)``
            says how many (for :meth:`progress`).
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
    def progress(
        self, description: str, total: int | None = None
    ) -> Iterator[Callable[[int], None]]:
        """``with ctx.progress("calibrating", total=n) as advance: ... advance(1)``."""
        from modelpress.base.progress import progress_bar

        with progress_bar(description, total=total, enabled=self.show_progress) as advance:
            yield advance

    def report_criteria(self, met: bool, summary: str) -> None:
        """For a method that judges its own result against accuracy criteria (int8-static's search,
        mixed precision): say whether the result met them, and how (``summary``, one line). A result
        that missed them is refused by the CLI with exit 4 (``--accept-loss`` keeps it); the figures
        ``criteria_met`` / ``criteria`` record it in the report (:attr:`PassRecord.criteria_missed`)."""
        self.figures.update({CRITERIA_MET: bool(met), CRITERIA: summary})


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

    Declared verification floor: ``min_cosine`` is the lowest cosine of a result's outputs against
    its reference that :func:`modelpress.export` accepts without ``accept_loss`` (loose enough for a
    healthy result of the method, tight enough that a broken one fails). Left at :data:`KIND_FLOOR`
    the method inherits its kind's (:attr:`Kind.min_cosine`, :data:`DEFAULT_FLOOR` for a kind
    that declares none). ``None`` says the method changes outputs by design (structural pruning,
    distillation): a chain of passes containing it has no default floor. A chain's floor is the
    loosest of its passes' floors. ``text_floor`` (a :class:`TextFloor`) is the same for text
    decoders, judged by :func:`modelpress.compress` on held-out text: greedy-token agreement and
    perplexity increase (int8 methods declare tighter ones than int4).

    ``kind_default=True`` makes the method its kind's default: the one the kind's shortcut
    (:func:`modelpress.quantize`, :func:`modelpress.prune`, :func:`modelpress.distill`) runs when
    no method is named. At most one installed method of a kind may say so.
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
    # -- how its results are verified (export reads this; no table of method names in the core)
    min_cosine: float | str | None = KIND_FLOOR
    # -- for text decoders: the token agreement / perplexity increase its results keep (None: a loose default, see
    # modelpress.evaluation.text.DEFAULT_TEXT_FLOOR, unless min_cosine is None)
    text_floor: TextFloor | None = None
    # -- the method ``modelpress.quantize()`` / ``prune()`` / ``distill()`` (and ``apply`` of the kind) use when none is named
    kind_default: bool = False

    def __post_init__(self) -> None:
        check_kind_name(self.kind, f"method {self.name!r}")
        _check_floor(self.min_cosine, f"method {self.name!r}", inherit=True)
        # NOTE: mappings are stored as tuples of pairs so that a Method stays hashable
        object.__setattr__(self, "requires", frozenset(self.requires))
        for attr in ("requires_if", "reference_options"):
            value = getattr(self, attr)
            object.__setattr__(self, attr, tuple(sorted(dict(value).items())))
        unknown = [
            d for d in (*self.requires, *(d for _, d in self.requires_if)) if d not in DATA_NEEDS
        ]
        if unknown:
            raise ValueError(
                f"method {self.name!r}: requires {', '.join(map(repr, unknown))}; data needs are {', '.join(DATA_NEEDS)}"
            )
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
            import difflib

            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, fields, n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            valid = ", ".join(fields) or "none"
            raise OptionsError(
                f"{self.qualname}: unknown option {', '.join(hints)}; valid options: {valid}"
            )
        try:
            return self.options(**raw)
        except pydantic.ValidationError as exc:
            raise OptionsError(
                f"{self.qualname}: {validation_problems(exc, what='option', show_input=True)}"
            ) from None

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
                type_name = getattr(annotation, "__name__", None) or str(annotation).replace(
                    "typing.", ""
                )
            default = (
                "required"
                if info.is_required()
                else repr(info.get_default(call_default_factory=True))
            )
            rows.append(
                {
                    "name": name,
                    "type": type_name,
                    "default": default,
                    "help": info.description or "",
                }
            )
        return rows
