"""No function in core/, adapters/ or plugins/ takes more than LIMIT parameters (issue 22: long
parameter relays become small state objects, a dataclass the pieces share).

Counted: positional (``self``/``cls`` excluded), keyword-only, ``*args`` and ``**kwargs``.

The exception is the public API's options. The functions :data:`modelpress.__all__` exports
(``apply``, ``compress``, ``export``, ``tune``, ...) and, for plugin authors,
``modelpress.plugin_api.__all__`` (``kd_loss``, ...), the adapter functions the framework bridge
hands them to (``modelpress.fit`` is ``adapters/torch_training.py``'s ``fit``) and the adapters'
public ``load_*`` functions take user-facing options as keyword-only parameters, as ONNX Runtime's ``quantize_static`` or
``torch.onnx.export`` do: users call them with keywords, and a dataclass of options would only
make them build one first. On those only the positional parameters count.
"""

from __future__ import annotations

import ast
import inspect
import sys
from collections.abc import Iterator
from pathlib import Path

import modelpress
import modelpress.plugin_api

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("core", "adapters", "plugins")
LIMIT = 7

# NOTE: where each package's modules live in this tree (pyproject.toml's package-dir), longest name first
FOLDER_OF = {
    "modelpress.adapters": "adapters",
    "modelpress.plugins": "plugins",
    "modelpress": "core",
}

# Files whose functions still take more; each entry says which (REMAINING: a state object each).
ALLOWED_FILES: set[str] = set()


def _count(args: ast.arguments, *, options_free: bool) -> int:
    positional = [*args.posonlyargs, *args.args]
    count = len(positional) - (1 if positional and positional[0].arg in ("self", "cls") else 0)
    if options_free:
        return count
    return count + len(args.kwonlyargs) + bool(args.vararg) + bool(args.kwarg)


def _bridged(function: object) -> Iterator[str]:
    """``adapters/<part>.py::<name>`` of each adapter function ``function`` hands its call to
    through the framework bridge (``_torch_part("torch_training").fit(...)``)."""
    for node in ast.walk(ast.parse(inspect.getsource(function))):  # type: ignore[arg-type]
        if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Call)):
            continue
        call = node.value
        if (
            isinstance(call.func, ast.Name)
            and call.func.id == "_torch_part"
            and call.args
            and isinstance(call.args[0], ast.Constant)
        ):
            yield f"adapters/{call.args[0].value}.py::{node.attr}"


def _tree_path(obj: object) -> str | None:
    """``core/app/compress.py`` for a function of ``modelpress.app.compress``: read from the module's
    name, so it names this tree's file wherever modelpress was imported from (an installed copy, a
    formatted scratch copy of the tree); ``None`` outside modelpress."""
    module = getattr(obj, "__module__", None) or ""
    for package, folder in FOLDER_OF.items():
        if module == package or module.startswith(package + "."):
            parts = module[len(package) :].lstrip(".").split(".") if module != package else []
            is_package = (
                Path(getattr(sys.modules[module], "__file__", "") or "").name == "__init__.py"
            )
            return "/".join(
                [folder, *parts, "__init__.py"]
                if is_package
                else [folder, *parts[:-1], parts[-1] + ".py"]
            )
    return None


def _public_api() -> set[str]:
    """``path::name`` of every function :data:`modelpress.__all__` and ``modelpress.plugin_api.__all__``
    export (and of the adapter function it is bridged to), and of each adapter's ``load_*``."""
    public = set()
    exported = [
        getattr(module, name)
        for module in (modelpress, modelpress.plugin_api)
        for name in module.__all__
    ]
    for obj in map(inspect.unwrap, exported):
        path = _tree_path(obj) if inspect.isfunction(obj) else None
        if path is not None:
            public.add(f"{path}::{obj.__name__}")
            public.update(_bridged(obj))
    for path in sorted((ROOT / "adapters").glob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("load_"):
                public.add(f"adapters/{path.name}::{node.name}")
    return public


def parameter_counts(
    tree: ast.AST, public: set[str], relative: str, prefix: str = ""
) -> Iterator[tuple[str, int]]:
    """``(qualified name, parameter count)`` of every function in ``tree``, nested ones and methods too."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            name = prefix + node.name
            yield name, _count(node.args, options_free=f"{relative}::{name}" in public)
            yield from parameter_counts(node, public, relative, name + ".<locals>.")
        elif isinstance(node, ast.ClassDef):
            yield from parameter_counts(node, public, relative, prefix + node.name + ".")
        else:
            yield from parameter_counts(node, public, relative, prefix)


def test_the_count_skips_self_and_counts_star_args():
    source = "class C:\n    def m(self, a, b=1, *args, c, **kw):\n        pass\n\n\ndef f(a, /, b, *, c):\n    pass\n"
    assert dict(parameter_counts(ast.parse(source), set(), "x.py")) == {"C.m": 5, "f": 3}
    assert (
        dict(parameter_counts(ast.parse(source), {"x.py::f"}, "x.py"))["f"] == 2
    )  # public: keyword-only options free


def test_the_public_api_is_found():
    public = _public_api()
    assert {
        "core/app/pipeline.py::apply",
        "core/app/compress.py::compress",
        "core/io/export.py::export",
    } <= public
    assert "adapters/torch.py::load_torch" in public
    # modelpress.fit is defined in the framework bridge and implemented by the torch adapter
    assert {"core/io/framework_bridge.py::fit", "adapters/torch_training.py::fit"} <= public
    assert "adapters/torch_training.py::kd_loss" in public  # modelpress.plugin_api.kd_loss
    assert "adapters/torch_training.py::_train_epochs" not in public


def test_no_function_takes_more_than_the_limit():
    public = _public_api()
    too_many = []
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            if relative in ALLOWED_FILES:
                continue
            for name, count in parameter_counts(
                ast.parse(path.read_text(encoding="utf-8")), public, relative
            ):
                if count > LIMIT:
                    too_many.append(f"{relative}::{name} ({count})")
    assert not too_many, (
        f"functions with more than {LIMIT} parameters: {', '.join(too_many)}; "
        "group what travels together into a small state object (a dataclass) instead of relaying it"
    )


def test_the_allowed_files_still_need_it():
    """An allowed file whose functions all fit comes off the list."""
    public = _public_api()
    for relative in sorted(ALLOWED_FILES):
        path = ROOT / relative
        if not path.exists():
            continue
        counts = parameter_counts(ast.parse(path.read_text(encoding="utf-8")), public, relative)
        assert any(count > LIMIT for _, count in counts), (
            f"{relative} fits the limit now: take it off ALLOWED_FILES"
        )
