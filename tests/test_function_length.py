"""No function in core/, adapters/ or plugins/ is longer than LIMIT lines (issue 13: long functions
are split along their natural seams into well-named helpers).

A function's length is the physical lines of its body, as written (or as ``ruff format`` lays it
out), from its first statement to its last line, nested functions included; not its signature nor
its docstring: documentation is never a reason to split, and a signature laid out one parameter
a line (the formatter's way once it is long) is no reason either. Parameters have their own
limit (tests/test_parameters.py).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("core", "adapters", "plugins")
LIMIT = 60

# NOTE: empty since round 4 merged every split; a function added here needs a reason beside it.
ALLOWED: set[str] = set()


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the first statement after the docstring to the function's last line."""
    body = node.body
    first = body[0]
    if (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    ):
        body = body[1:]
    if not body:
        return 0
    return (node.end_lineno or node.lineno) - body[0].lineno + 1


def function_lengths(tree: ast.AST, prefix: str = "") -> Iterator[tuple[str, int]]:
    """``(qualified name, length)`` of every function and method in ``tree``, nested ones too."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            name = prefix + node.name
            yield name, _body_lines(node)
            yield from function_lengths(node, name + ".<locals>.")
        elif isinstance(node, ast.ClassDef):
            yield from function_lengths(node, prefix + node.name + ".")
        else:
            yield from function_lengths(node, prefix)


def test_the_length_is_counted_without_the_signature_and_docstring():
    source = (
        'def f(\n    a,\n):\n    """Doc\n\n    more doc.\n    """\n    return a\n\n\n'
        "class C:\n    def m(self):\n        def inner():\n            pass\n        return inner\n"
    )
    assert dict(function_lengths(ast.parse(source))) == {"f": 1, "C.m": 3, "C.m.<locals>.inner": 1}


def test_the_body_counts_as_laid_out():
    """A call split over lines by the formatter counts every line: the body is measured as it reads."""
    one = "def f(a, b):\n    x = g(a, b, c=1)\n    return x\n"
    laid_out = "def f(\n    a,\n    b,\n):\n    x = g(\n        a,\n        b,\n        c=1,\n    )\n    return x\n"
    assert dict(function_lengths(ast.parse(one))) == {"f": 2}
    assert dict(function_lengths(ast.parse(laid_out))) == {"f": 6}


def test_no_function_is_longer_than_the_limit():
    too_long = []
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            for name, length in function_lengths(ast.parse(path.read_text(encoding="utf-8"))):
                if length > LIMIT and f"{relative}::{name}" not in ALLOWED:
                    too_long.append(f"{relative}::{name} ({length} lines)")
    assert not too_long, (
        f"functions over {LIMIT} lines (body lines: signature and docstring not counted): {', '.join(too_long)}; "
        "split each along its natural seams into well-named helpers"
    )
