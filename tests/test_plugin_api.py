"""Built-ins use only the public plugin API, so a third-party plugin can do what a built-in does."""

import ast
import importlib
from pathlib import Path

import modelpress
import modelpress.plugin_api

ROOT = Path(__file__).resolve().parent.parent
PUBLIC_MODULES = {"modelpress": modelpress, "modelpress.plugin_api": modelpress.plugin_api}


def _modelpress_imports(path: Path) -> list[tuple[str, str, int]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.split(".")[0] == "modelpress"
        ):
            found += [(node.module, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [
                (alias.name, "", node.lineno)
                for alias in node.names
                if alias.name.startswith("modelpress.")
            ]
    return found


def test_builtins_import_only_public_names():
    bad = []
    checked = 0
    for folder in ("plugins", "adapters"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for module, name, line in _modelpress_imports(path):
                checked += 1
                if module.startswith(("modelpress.plugins", "modelpress.adapters")):
                    continue  # a plugin's own modules
                public = PUBLIC_MODULES.get(module)
                if public is None or (name and name not in public.__all__):
                    bad.append(f"{rel}:{line}: from {module} import {name}")
    assert checked > 50
    assert not bad, "built-ins import non-public names:\n" + "\n".join(bad)


def test_plugin_api_names_resolve_and_are_documented():
    api = importlib.import_module("modelpress.plugin_api")
    for name in api.__all__:
        obj = getattr(api, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, modelpress.ModelpressError), name
        elif name != "WEIGHTED_OPS":
            assert name in (api.__doc__ or ""), (
                f"{name} is not described in modelpress.plugin_api's docstring"
            )


def test_no_hand_built_nodes_outside_the_builder():
    """Every new node comes from the graph-building toolkit (unique names, inferred types)."""
    found = []
    for folder in ("core", "adapters", "plugins"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel == "core/ir/builder.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(), rel)):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("node", "Node")
                    and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "ir"
                ):
                    found.append(f"{rel}:{node.lineno}")
    assert not found, "nodes built by hand (use model.builder()):\n" + "\n".join(found)
