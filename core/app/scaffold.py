"""``modelpress plugins new NAME``: scaffold a plugin package that installs and passes its own test.

The package has a ``pyproject.toml`` with the ``modelpress`` entry point, a method of kind
``prune`` or the kind given (zero the weights below a fraction of each layer's largest magnitude)
written against :mod:`modelpress.plugin_api`, and a test using :func:`modelpress.testing.check_method`.
A kind no installed plugin defines is declared by the package itself (``modelpress_register_kinds``,
with the default verification floor). Rename and rewrite the method; the wiring stays.
"""

from __future__ import annotations

import re
from pathlib import Path

from modelpress.base.errors import OptionsError
from modelpress.plugin.methods import check_kind_name
from modelpress.plugin.registry import get_registry

__all__ = ["new_plugin"]

_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")

_PYPROJECT = """[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "modelpress-{name}"
version = "0.1.0"
description = "A modelpress plugin: the {name} method."
requires-python = ">=3.10"
dependencies = ["modelpress", "numpy"]

# This entry point is how modelpress finds the plugin.
[project.entry-points.modelpress]
{name} = "{package}"

[tool.setuptools.packages.find]
where = ["src"]
"""

_README = """# modelpress-{name}

A modelpress plugin. Install it and it is listed by `modelpress plugins`:

```shell
pip install -e .
modelpress apply model.onnx -k {kind} -m {name} --fraction 0.05 -o out.onnx
pytest tests
```

Guide: "Writing a plugin" in the modelpress documentation (`docs/writing-a-plugin.md`).
"""

_MODULE = '''"""modelpress-{name}: zero every weight below ``fraction`` of its layer's largest magnitude."""

from __future__ import annotations

import numpy as np
from pydantic import Field

from modelpress.plugin_api import {imports}Method, Model, Options, PassContext, hookimpl

__version__ = "0.1.0"


class {cls}Options(Options):
    fraction: float = Field(0.05, ge=0, lt=1, description="zero weights with |w| below this fraction of the layer's max |w|")
    exclude: list[str] = Field(default_factory=list, description="layers (node names) to leave alone")


def apply(model: Model, options: {cls}Options, context: PassContext) -> Model:
    zeroed = total = 0
    for layer in model.weighted_layers():
        if layer.name in options.exclude:
            continue
        w = layer.weight_array()
        keep = np.abs(w) >= options.fraction * float(np.max(np.abs(w)))
        model.replace_initializer(layer.weight.name or "", np.where(keep, w, np.zeros((), w.dtype)))
        zeroed += int(w.size - keep.sum())
        total += int(w.size)
    context.figures.update({{"sparsity": round(zeroed / max(total, 1), 6), "zeroed": zeroed}})
    return model


{kind_hook}@hookimpl
def modelpress_register_methods(register):  # type: ignore[no-untyped-def]
    register(Method(name="{name}", kind="{kind}", apply=apply, options={cls}Options, mutates=True,
                    summary="zero weights below a fraction of each layer's largest magnitude"))
'''

# NOTE: the package declares a kind no installed plugin defines (its floor: the default, 0.9)
_KIND_HOOK = """@hookimpl
def modelpress_register_kinds(register):  # type: ignore[no-untyped-def]
    register(Kind(name="{kind}", description="{kind} methods (modelpress-{name})", columns=("sparsity",)))


"""

_TEST = """import numpy as np

from modelpress.testing import check_method, tiny_cnn


def test_{ident}_zeroes_small_weights_and_keeps_the_model_valid():
    model = tiny_cnn(channels=8)
    result = check_method("{name}", model, kind="{kind}", fraction=0.2)
    figures = result.provenance.passes[-1].figures
    assert 0 < figures["sparsity"] < 1
    zeros = sum(int(np.sum(layer.weight_array() == 0)) for layer in result.weighted_layers())
    assert zeros == figures["zeroed"]
"""


def new_plugin(name: str, directory: str | Path | None = None, *, kind: str = "prune") -> Path:
    """Write the package ``modelpress-NAME`` into ``directory`` (default ``./modelpress-NAME``); returns it.

    ``NAME`` is lower case letters and digits with single hyphens (``my-method``); an existing,
    non-empty folder is refused. ``kind``: the method's kind; one no installed plugin defines is
    declared by the new package."""
    if not _NAME.match(name):
        raise OptionsError(
            f"plugin name {name!r}: use lower-case letters and digits with single hyphens, starting with a letter (e.g. 'my-method')"
        )
    target = Path(directory) if directory is not None else Path(f"modelpress-{name}")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise OptionsError(f"{target}: exists and is not an empty folder; choose another --dir")
    try:
        check_kind_name(kind, "--kind")
    except ValueError as exc:
        raise OptionsError(str(exc)) from None
    ident = name.replace("-", "_")
    package = f"modelpress_{ident}"
    new_kind = kind not in {k.name for k in get_registry().kinds()}
    values = {
        "name": name,
        "package": package,
        "ident": ident,
        "cls": "".join(part.title() for part in name.split("-")),
        "kind": kind,
        "imports": "Kind, " if new_kind else "",
        "kind_hook": _KIND_HOOK.format(kind=kind, name=name) if new_kind else "",
    }
    files = {
        "pyproject.toml": _PYPROJECT,
        "README.md": _README,
        f"src/{package}/__init__.py": _MODULE,
        f"tests/test_{ident}.py": _TEST,
    }
    for relative, template in files.items():
        path = target / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(template.format(**values), encoding="utf-8")
    return target
