"""The one parser of method options: flags generated from the method's options schema, and
``-O NAME=VALUE`` pairs, both feeding one dict that the method's schema validates.

A field ``fine_tune_epochs`` is the flag ``--fine-tune-epochs``; a list field takes ``a,b,c``,
a JSON list or the flag repeated; a bool is ``--x/--no-x``; a ``Literal`` shows its choices; the
field's description is the help. Nothing here knows a method by name: a third-party method gets
the same flags as a built-in one. A flag the command itself has (``--data``, ``--student``) wins
over a field of the same name (``-O`` still reaches the field).
"""

from __future__ import annotations

import argparse
import json
import typing
from collections.abc import Sequence
from typing import Any

__all__ = [
    "OptionPairs",
    "add_method_flags",
    "method_options",
    "method_probe",
    "parse_option_pairs",
]

_DEST = "method_option__"  # NOTE: the namespace prefix of the generated flags' values
OptionPairs = Sequence[str]


def _decoded(text: Any) -> Any:
    """A command-line value: JSON when it parses (numbers, lists, true/false), else the string."""
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def is_list_field(annotation: Any) -> bool:
    """Whether a field (``list[str]``, ``list[str] | None``, ``tuple[...]``) takes several values."""
    return any(
        typing.get_origin(a) in (list, tuple, set, frozenset)
        for a in (annotation, *typing.get_args(annotation))
    )


def _scalar(annotation: Any, text: Any) -> Any:
    """One value as its type wants it: a ``str`` field keeps the text (``--name 123`` is "123"), a
    ``Literal`` takes the choice its text names, anything else is read as JSON when it parses."""
    if not isinstance(text, str):
        return text
    arms = [arm for arm in typing.get_args(annotation) if arm is not type(None)]
    if (
        annotation is not None
        and typing.get_origin(annotation) is not typing.Literal
        and len(arms) == 1
    ):
        return _scalar(arms[0], text)  # NOTE: `str | None` is a str
    if annotation is str:
        return text
    if typing.get_origin(annotation) is typing.Literal:
        return next((choice for choice in typing.get_args(annotation) if str(choice) == text), text)
    return _decoded(text)


def _item_type(annotation: Any) -> Any:
    """``list[str] | None`` -> ``str``; the element type of a list field (None when not one type)."""
    for arm in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(arm) in (list, set, frozenset):
            args = typing.get_args(arm)
            return args[0] if len(args) == 1 else None
    return None


def _list_value(annotation: Any, texts: Sequence[Any]) -> list[Any]:
    """Every value given for a list option, flattened: ``a,b`` -> [a, b]; ``["a","b"]`` -> [a, b]."""
    item = _item_type(annotation)
    values: list[Any] = []
    for text in texts:
        value = _decoded(text)
        if isinstance(value, list):
            values.extend(value)
        elif isinstance(text, str):
            values.extend(_scalar(item, part.strip()) for part in text.split(",") if part.strip())
        else:
            values.append(text)
    return values


def _value(annotation: Any, texts: Sequence[Any]) -> Any:
    """The value of one option from the texts given for it (the schema validates it afterwards)."""
    if annotation is not None and is_list_field(annotation):
        return _list_value(annotation, texts)
    values = [_scalar(annotation, t) for t in texts]
    return (
        values[0] if len(values) == 1 else values
    )  # NOTE: a scalar given twice: the schema says so


def parse_option_pairs(pairs: OptionPairs | None) -> dict[str, list[str]]:
    """``["bits=4", "exclude=a", "exclude=b"]`` -> ``{"bits": ["4"], "exclude": ["a", "b"]}`` (texts, in order)."""
    from modelpress.base.errors import OptionsError

    texts: dict[str, list[str]] = {}
    for pair in pairs or ():
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise OptionsError(f"option {pair!r} must look like NAME=VALUE")
        texts.setdefault(key.strip().replace("-", "_"), []).append(text)
    return texts


def method_options(
    schema: Any, pairs: OptionPairs | None, args: argparse.Namespace
) -> dict[str, Any]:
    """One dict from ``-O`` pairs and the generated flags (a flag wins over a pair of the same name),
    each value read as its field in ``schema`` says; an unknown name is kept for the schema's error."""
    fields = getattr(schema, "model_fields", {})
    texts = parse_option_pairs(pairs)
    for dest, given in vars(args).items():
        if dest.startswith(_DEST) and given is not None:
            texts[dest[len(_DEST) :]] = given if isinstance(given, list) else [given]
    return {
        name: _value(fields[name].annotation if name in fields else None, given)
        for name, given in texts.items()
    }


def _help(field: Any, extra: str = "") -> str:
    default = (
        ""
        if field.is_required()
        else f" (default: {field.get_default(call_default_factory=True)!r})"
    )
    return ((field.description or "") + extra + default).replace("%", "%%")


def _add_flag(group: Any, name: str, field: Any) -> None:
    flag, dest, annotation = "--" + name.replace("_", "-"), _DEST + name, field.annotation
    if annotation is bool:
        group.add_argument(
            flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=_help(field)
        )
    elif is_list_field(annotation):
        group.add_argument(
            flag,
            dest=dest,
            action="append",
            metavar="A,B",
            help=_help(field, "; repeat the flag or give a,b,c"),
        )
    elif typing.get_origin(annotation) is typing.Literal:
        group.add_argument(
            flag,
            dest=dest,
            choices=[str(c) for c in typing.get_args(annotation)],
            help=_help(field),
        )
    else:
        group.add_argument(flag, dest=dest, metavar=name.upper(), help=_help(field))


def add_method_flags(parser: argparse.ArgumentParser, method: Any) -> None:
    """Add a ``--<field>`` flag for every field of ``method``'s options schema to ``parser``."""
    group = parser.add_argument_group(
        f"options of {method.qualname} ({method.plugin or 'built-in'}; also -O NAME=VALUE)"
    )
    for name, field in getattr(method.options, "model_fields", {}).items():
        try:
            _add_flag(group, name, field)
        except argparse.ArgumentError:
            continue  # NOTE: the command's own flag of that name wins (argparse refuses a second one)


class _ProbeError(Exception):
    pass


class _Probe(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        raise _ProbeError(message)


def method_probe(
    argv: Sequence[str], *, default: str | None, kind: str | None
) -> tuple[str | None, str | None]:
    """The first stage of the two-stage parse: the ``-m/--method`` and ``-k/--kind`` a command's
    arguments name (the command's parser, with the method's flags, parses them all afterwards)."""
    probe = _Probe(add_help=False)
    probe.add_argument("-m", "--method", default=default)
    if kind is None:
        probe.add_argument("-k", "--kind")
    try:
        known, _ = probe.parse_known_args(list(argv))
    except _ProbeError:
        return default, kind  # NOTE: the real parse reports the bad command line
    return known.method, getattr(known, "kind", None) or kind
