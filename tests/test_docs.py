"""Every code block of the documentation runs (``docs/**/*.md`` and ``README.md``).

Each ``python`` and ``bash`` block is one test. The blocks of a page run in order in one folder
(a copy of the files ``tests/docs_files.py`` makes: ``model.onnx``, ``calib.npz``, ``train.npz``,
``test.npz``, ``data.npz``) and the Python blocks of a page share one namespace, as a reader
following the page would. Shell blocks run line by line, stopping at the first failure: plain
``modelpress ARGS`` lines through ``modelpress.cli.main`` in this process (what the console
script calls), other lines in ``bash -euo pipefail`` with this environment's ``modelpress`` on
the PATH (``MODELPRESS_DOCS_SUBPROCESS=1``: every line in bash). Other languages (``text``, ``yaml``, ``toml``) are shown, not run.

A block may be preceded by a directive comment (invisible on the site)::

    <!-- test: requires=torch,tensorflow -->   skipped, with the reason, when a module is missing
    <!-- test: skip="why" -->                   never run (installs packages, runs for minutes...)
    <!-- test: file=recipe.yaml -->            the block is written to that file for later blocks
    <!-- test: exit=4 -->                       a shell block expected to exit with that code
    <!-- test: plugins -->                      a shell block that installs a plugin: third-party autoload stays on
    <!-- test: slow -->                         trains a model or installs packages: marked slow, with the
                                                rest of its page (left out by the fast tier, ``-m "not slow"``)

Directives combine: ``<!-- test: requires=torch slow -->``. When a block is skipped, the rest of its
page is skipped too (it may build on it). The tests may run in any order (pytest-randomly) or alone:
a block's test first runs the blocks above it that have not run yet, in page order, and each block
runs once; its test reports what its run did.
Also here: ``mkdocs build --strict`` (warnings, broken links and unresolved references fail).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
RUN = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash"}
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)")
DIRECTIVE = re.compile(r"^\s*<!--\s*test:\s*(?P<body>.*?)\s*-->\s*$")


@dataclass
class Block:
    page: Path
    line: int
    lang: str
    code: str
    directives: dict[str, str]

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def parse_directives(body: str) -> dict[str, str]:
    out = {}
    for token in shlex.split(body):
        key, _, value = token.partition("=")
        out[key] = value
    return out


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of a page, with the directive just above each (if any)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    i, pending = 0, {}
    while i < len(lines):
        directive = DIRECTIVE.match(lines[i])
        if directive:
            pending = parse_directives(directive.group("body"))
            i += 1
            continue
        fence = FENCE.match(lines[i])
        if fence:
            indent, marker, lang = (
                fence.group("indent"),
                fence.group("fence"),
                fence.group("lang").lower(),
            )
            start, body = i + 1, []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith(marker):
                line = lines[i]
                body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
                i += 1
            found.append(Block(page, start, lang, "\n".join(body) + "\n", pending))
            pending = {}
        elif lines[i].strip():
            pending = {}
        i += 1
    return found


CASES = [b for page in PAGES for b in blocks(page) if b.lang in RUN or "file" in b.directives]


def _params(cases: list[Block]) -> list[Any]:
    """The cases as parameters; a ``slow`` block and the blocks after it on its page are marked slow."""
    slow_from: dict[Path, int] = {}
    for b in cases:
        if "slow" in b.directives:
            slow_from.setdefault(b.page, b.line)
    return [
        pytest.param(
            b, id=b.id, marks=[pytest.mark.slow] if b.line >= slow_from.get(b.page, 1 << 30) else []
        )
        for b in cases
    ]


@dataclass
class PageState:
    folder: Path
    namespace: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None
    # NOTE: by block line, what each block's run did, in page order: None passed, a str was skipped (why), else what it raised
    outcomes: dict[int, BaseException | str | None] = field(default_factory=dict)


PAGE_CASES: dict[Path, list[Block]] = {}
for _case in CASES:
    PAGE_CASES.setdefault(_case.page, []).append(_case)


@pytest.fixture(scope="session")
def docs_files(tmp_path_factory) -> Path:
    pytest.importorskip(
        "sklearn", reason="the docs' examples use scikit-learn's digits (the test extra)"
    )
    from tests.docs_files import make_docs_files

    folder = tmp_path_factory.mktemp("docs-files")
    assert make_docs_files(folder)["accuracy"] > 0.9
    return folder


@pytest.fixture(scope="session")
def page_states() -> dict[Path, PageState]:
    return {}


def _state(
    block: Block, states: dict[Path, PageState], files: Path, tmp_path_factory: Any
) -> PageState:
    if block.page not in states:
        folder = tmp_path_factory.mktemp(block.page.stem)
        for item in files.iterdir():
            shutil.copy(item, folder / item.name)
        states[block.page] = PageState(folder)
    return states[block.page]


SHELL_META = re.compile(r"[|&;<>$`()*?\\]")


def _commands(code: str) -> list[str]:
    """The block's commands, one per line (comment-only and blank lines dropped)."""
    return [line for line in code.splitlines() if line.strip() and not line.strip().startswith("#")]


def _in_process(argv: list[str]) -> tuple[int, str]:
    """``modelpress ARGS`` through ``modelpress.cli.main`` (what the console script calls)."""
    import contextlib
    import io

    from modelpress.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse: --help, --version, usage errors
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return int(code or 0), out.getvalue()


def _run_shell(block: Block, folder: Path) -> None:
    """Run a shell block line by line, stopping at the first failing line (as ``bash -e`` does).

    A line that is a plain ``modelpress ARGS`` (no pipes, redirections or other shell syntax)
    runs in this process through ``modelpress.cli.main`` — the function the ``modelpress``
    script calls — which saves a Python start and a fresh import of modelpress (and torch or
    TensorFlow) per command; every other line runs in ``bash -euo pipefail``.
    ``MODELPRESS_DOCS_SUBPROCESS=1`` runs every line in bash instead.
    """
    env = {
        **os.environ,
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "MODELPRESS_PROGRESS": "0",
        "MODELPRESS_DISABLE_PLUGIN_AUTOLOAD": "1",
        "COLUMNS": "120",
    }
    if (
        "plugins" in block.directives
    ):  # NOTE: `<!-- test: plugins -->`: the block installs a plugin and opts in to autoload
        env.pop("MODELPRESS_DISABLE_PLUGIN_AUTOLOAD")
    subprocess_only = os.environ.get("MODELPRESS_DOCS_SUBPROCESS") == "1"
    expected = int(block.directives.get("exit", "0"))
    code, output, line = 0, "", ""
    for line in _commands(block.code):
        argv = shlex.split(line, comments=True)
        command_part = line.split("#", 1)[0]
        if (
            not subprocess_only
            and argv
            and argv[0] == "modelpress"
            and not SHELL_META.search(command_part)
        ):
            code, output = _in_process(argv[1:])
        else:
            done = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", line],
                cwd=folder,
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            code, output = done.returncode, done.stdout + done.stderr
        if code != 0:
            break
    assert code == expected, (
        f"{block.id}: exit {code} (expected {expected}) at\n  {line}\n--- output\n{output[-4000:]}"
    )


def _run_block(block: Block, state: PageState) -> None:
    """Run one block in its page's folder and namespace (the working directory is the folder)."""
    if state.skipped:
        pytest.skip(f"an earlier block of this page was skipped ({state.skipped})")
    if "skip" in block.directives:
        pytest.skip(block.directives["skip"] or "marked skip in the page")
    missing = [
        m
        for m in filter(None, block.directives.get("requires", "").split(","))
        if importlib.util.find_spec(m) is None
    ]
    if missing:
        state.skipped = f"needs {', '.join(missing)}"
        pytest.skip(f"{block.id} needs {', '.join(missing)} (install the extra that provides it)")
    if "file" in block.directives:
        (state.folder / block.directives["file"]).write_text(block.code, encoding="utf-8")
        return
    try:
        if RUN[block.lang] == "python":
            state.namespace.setdefault("__name__", "__docs__")
            exec(compile(block.code, block.id, "exec"), state.namespace)
        else:
            _run_shell(block, state.folder)
    except BaseException:
        state.skipped = f"{block.id} failed"
        raise


def _outcome(block: Block, state: PageState) -> BaseException | str | None:
    """What ``block`` did, running first the blocks above it on its page that have not run yet."""
    for earlier in PAGE_CASES[block.page]:
        if earlier.line > block.line:
            break
        if earlier.line in state.outcomes:
            continue
        try:
            _run_block(earlier, state)
            state.outcomes[earlier.line] = None
        except KeyboardInterrupt:
            raise
        except pytest.skip.Exception as exc:
            state.outcomes[earlier.line] = str(exc.msg)
        except BaseException as exc:
            state.outcomes[earlier.line] = exc
    return state.outcomes[block.line]


@pytest.mark.parametrize("block", _params(CASES))
def test_docs_block(
    block: Block,
    docs_files: Path,
    page_states: dict[Path, PageState],
    tmp_path_factory,
    monkeypatch,
):
    state = _state(block, page_states, docs_files, tmp_path_factory)
    monkeypatch.chdir(state.folder)
    monkeypatch.setenv("MODELPRESS_PROGRESS", "0")
    outcome = _outcome(block, state)
    if isinstance(outcome, str):
        pytest.skip(outcome)
    if outcome is not None:
        raise outcome


def test_no_page_skips_all_its_examples():
    """A page whose Python/shell blocks are all marked skip is a page nobody checks."""
    for page in PAGES:
        runnable = [b for b in blocks(page) if b.lang in RUN]
        if runnable:
            assert any("skip" not in b.directives for b in runnable), (
                f"{page}: every code block is skipped"
            )


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    """The site builds with warnings as errors: broken links, unknown pages, unresolved API references."""
    if (
        importlib.util.find_spec("mkdocs") is None
        or importlib.util.find_spec("mkdocstrings") is None
    ):
        pytest.skip("needs the docs extra: pip install -c constraints.txt -e '.[docs]'")
    env = {**os.environ, "MODELPRESS_PROGRESS": "0", "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-5000:]
    assert (tmp_path / "site" / "methods" / "int8-static" / "index.html").exists()
    # Sphinx roles in docstrings render as code, linked to the entry (docs/_hooks.py), never as raw text
    api = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    assert '<a href="#modelpress.Model"><code>Model</code></a>' in api
    for page in (tmp_path / "site").rglob("*.html"):
        raw = re.findall(r":(?:class|func|meth|attr|exc|mod):", page.read_text(encoding="utf-8"))
        assert not raw, f"{page.relative_to(tmp_path)}: {len(raw)} raw Sphinx roles"


def test_every_builtin_method_has_a_page_with_its_generated_options():
    """A built-in method added without a page (or a page without its options table) fails here."""
    import modelpress

    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for method in modelpress.get_registry().methods():
        page = DOCS / "methods" / f"{method.name.replace(':', '-')}.md"
        assert page.exists(), (
            f"built-in method {method.qualname} has no page {page.relative_to(ROOT)}"
        )
        assert f"<!-- mp:options {method.kind}/{method.name} -->" in page.read_text(
            encoding="utf-8"
        ), page
        assert f"methods/{page.name}" in nav, f"{page.relative_to(ROOT)} is not in mkdocs.yml's nav"
