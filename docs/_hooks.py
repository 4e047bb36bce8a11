"""MkDocs hook: pages are generated from the code where the code is the source of truth.

A page writes a marker (an HTML comment, invisible where the Markdown is read raw) and this hook
replaces it at build time:

* ``<!-- mp:options KIND/NAME -->``: a table of a built-in method's options, from its ``Options``
  schema (name, type, default, help), and the data it needs (``Method.requires``/``requires_if``);
* ``<!-- mp:methods -->``: every built-in method by kind, with its one-line summary;
* ``<!-- mp:help COMMAND -->``: the command's ``--help`` (``<!-- mp:help -->`` for the top level).

The docstrings are written with Sphinx roles (``:class:`Model```, ``:func:`~modelpress.export```),
which mkdocstrings leaves as text: :func:`on_page_content` turns each into code, linked to the
object's entry where the page documents it (``~`` shows the last name only, as in Sphinx).

Only modelpress's own plugins are documented: third-party autoload is switched off here, as in
the test suite. An unknown method or command in a marker fails the build.
"""

from __future__ import annotations

import html
import os
import re
from typing import Any

MARKER = re.compile(r"<!--\s*mp:(options|methods|help)\s*([^>]*?)\s*-->")


def _registry() -> Any:
    os.environ["MODELPRESS_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    import modelpress

    modelpress.reset_registry()
    return modelpress.get_registry()


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    """Inline code in a table cell: HTML, since a pipe escaped inside backticks shows its backslash."""
    return "<code>" + html.escape(text).replace("|", "&#124;").replace("\n", " ") + "</code>"


def method_options(spec: str) -> str:
    kind, _, name = spec.partition("/")
    method = _registry().method(name, kind=kind)
    rows = ["| option | type | default | what it does |", "|---|---|---|---|"]
    for row in method.option_rows():
        rows.append(f"| `{row['name']}` | {_code(row['type'])} | {_code(row['default'])} | {_cell(row['help'])} |")
    needs = sorted(method.requires)
    conditional = [f"`{data}` when `{option}` is set" for option, data in method.requires_if]
    lines = ["\n".join(rows), ""]
    if needs or conditional:
        lines.append("Data it needs: " + ", ".join([f"`{n}`" for n in needs] + conditional) + ".")
    else:
        lines.append("Data it needs: none (data-free).")
    lines.append(f"\n*Generated from `{method.options.__module__}.{method.options.__name__}` (plugin `{method.plugin}`).*")
    return "\n".join(lines)


def method_table() -> str:
    rows = ["| kind | method | what it does |", "|---|---|---|"]
    for method in sorted(_registry().methods(), key=lambda m: (m.kind, m.name)):
        page = method.name.replace(":", "-")
        rows.append(f"| {method.kind} | [`{method.name}`]({page}.md) | {_cell(method.summary)} |")
    return "\n".join(rows)


def command_help(command: str) -> str:
    os.environ["COLUMNS"] = "100"
    from modelpress.cli import build_parser

    parser = build_parser()
    if command:
        sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        if command not in sub.choices:  # type: ignore[operator]
            raise ValueError(f"docs: <!-- mp:help {command} -->: no such command")
        parser = sub.choices[command]  # type: ignore[index]
    return "```text\n" + parser.format_help().rstrip() + "\n```"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    def expand(match: re.Match[str]) -> str:
        what, arg = match.group(1), match.group(2).strip()
        if what == "options":
            return method_options(arg)
        if what == "methods":
            return method_table()
        return command_help(arg)

    return MARKER.sub(expand, markdown)


ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|data|exc|mod|obj|const):<code>(~?)([^<]+)</code>")
ANCHOR = re.compile(r'id="(modelpress\.[\w.]+)"')


def _resolve(name: str, anchors: set[str]) -> str | None:
    """The page's anchor for a role's target: ``modelpress.X``, ``X`` as written, or a unique suffix."""
    name = name.rstrip("()")
    for candidate in (name, f"modelpress.{name}"):
        if candidate in anchors:
            return candidate
    found = [a for a in anchors if a.endswith("." + name)]
    return found[0] if len(found) == 1 else None


def on_page_content(html_text: str, page: Any, config: Any, files: Any) -> str:
    anchors = set(ANCHOR.findall(html_text))

    def link(match: re.Match[str]) -> str:
        short, target = match.group(1) == "~", match.group(2)
        shown = target.rsplit(".", 1)[-1] if short else target
        anchor = _resolve(target, anchors)
        code = f"<code>{shown}</code>"
        return f'<a href="#{anchor}">{code}</a>' if anchor else code

    return ROLE.sub(link, html_text)
