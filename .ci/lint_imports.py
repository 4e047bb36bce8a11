"""Check the import-linter contracts in pyproject.toml (``[tool.importlinter]``).

modelpress is three source folders mapped into one package (``core/`` -> ``modelpress``,
``adapters/`` -> ``modelpress.adapters``, ``plugins/`` -> ``modelpress.plugins``); import-linter
(grimp) reads one folder per package. This script copies the three into one temporary package
tree, puts it first on ``PYTHONPATH`` and runs ``lint-imports`` with the repository's config.
Exit status: lint-imports' (0: every contract kept). Usage: ``python .ci/lint_imports.py``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc")


def assemble(target: Path) -> Path:
    """``target/modelpress`` with core/, adapters/ and plugins/ laid out as the installed package."""
    package = target / "modelpress"
    shutil.copytree(ROOT / "core", package, ignore=_IGNORE)
    shutil.copytree(ROOT / "adapters", package / "adapters", ignore=_IGNORE)
    shutil.copytree(ROOT / "plugins", package / "plugins", ignore=_IGNORE)
    return package


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="modelpress-layers-") as tmp:
        assemble(Path(tmp))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [tmp, os.environ.get("PYTHONPATH")]))}
        code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
        return subprocess.run(
            [sys.executable, "-c", code, str(ROOT / "pyproject.toml"), "--no-cache"], cwd=tmp, env=env, check=False
        ).returncode


if __name__ == "__main__":
    sys.exit(main())
