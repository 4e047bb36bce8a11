"""``modelpress plugins``: the installed plugins, their methods by kind and the methods' options;
``plugins new NAME`` scaffolds a plugin package."""

from __future__ import annotations

import argparse
import json
from typing import Any

from modelpress.cli.common import Command, SubParser, console, escape

__all__ = ["COMMANDS"]


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    actions = p.add_subparsers(dest="plugins_action", metavar="ACTION", parser_class=SubParser)
    new = actions.add_parser(
        "new",
        help="scaffold a plugin package (pyproject entry point, a method, its test) that installs and passes its test",
        description="Write the package modelpress-NAME: pip install it and `modelpress plugins` lists its method.",
    )
    new.add_argument(
        "name",
        help="plugin and method name: lower-case letters, digits, single hyphens (e.g. my-method)",
    )
    new.add_argument("--dir", help="folder to create (default ./modelpress-NAME)")
    new.add_argument(
        "--kind",
        default="prune",
        help="the method's kind (default prune); a kind no installed plugin defines is declared by the new package",
    )
    new.set_defaults(run=run_new)


def run_new(args: argparse.Namespace) -> int:
    from modelpress.app.scaffold import new_plugin

    target = new_plugin(args.name, args.dir, kind=args.kind)
    console().print(
        f"wrote {target}/ (pyproject.toml, src/, tests/); next: pip install -e {target} && pytest {target}/tests"
    )
    return 0


def _as_json(registry: Any) -> dict[str, Any]:
    data = [
        {
            "name": p.name,
            "distribution": p.distribution,
            "version": p.version,
            "builtin": p.builtin,
            "adapters": [a.name for a in p.adapters],
            "codecs": [{"name": c.name, "summary": c.summary} for c in p.codecs],
            "methods": [
                {
                    "kind": m.kind,
                    "name": m.name,
                    "summary": m.summary,
                    "mutates": m.mutates,
                    "options": m.option_rows(),
                }
                for m in p.methods
            ],
        }
        for p in registry.plugins.values()
    ]
    kinds = [
        {
            "name": k.name,
            "description": k.description,
            "columns": list(k.columns),
            "smaller": k.smaller,
            "plugin": k.plugin,
        }
        for k in registry.kinds()
    ]
    return {"plugins": data, "kinds": kinds, "skipped": registry.skipped, "failed": registry.failed}


def run(args: argparse.Namespace) -> int:
    from modelpress.plugin.registry import get_registry

    registry = get_registry()
    if args.json:
        print(json.dumps(_as_json(registry), indent=2))
        return 0
    from rich.table import Table

    out = console()
    table = Table(title="installed plugins", title_justify="left")
    provided = {
        name: [f"adapter {a.name}" for a in p.adapters]
        + [m.qualname for m in p.methods]
        + [f"codec {c.name}" for c in p.codecs]
        for name, p in registry.plugins.items()
    }
    # NOTE: a method name is never cut (`quantize/int4-weight-onl…` at 80 columns): "provides" is
    # at least as wide as the longest name and its comma; the plugin column wraps to make room
    longest = max((len(n) + 1 for names in provided.values() for n in names), default=0)
    plugins = registry.plugins.values()
    fixed = [
        max([len(col), *(len(str(getattr(p, col))) for p in plugins)])
        for col in ("distribution", "version")
    ]
    table.add_column("plugin", max_width=max(12, out.width - 13 - longest - sum(fixed)))
    table.add_column("distribution", overflow="fold")
    table.add_column("version", overflow="fold")
    table.add_column("provides", min_width=longest)
    for name, p in registry.plugins.items():
        provides = provided[name]
        table.add_row(
            p.name + (" (built-in)" if p.builtin else ""),
            p.distribution,
            p.version,
            ", ".join(provides) or "-",
        )
    out.print(table)
    _print_methods(registry, out)
    for name, why in registry.skipped.items():
        out.print(f"[dim]skipped plugin {name}: {why}[/dim]")
    if registry.failed:
        out.print("\n[bold red]failed to load[/bold red]")
        for name, why in registry.failed.items():
            out.print(f"  [bold]{escape(name)}[/bold]: {escape(why)}")
    return 0


def _print_method_line(out: Any, name: str, about: str) -> None:
    """``  NAME  (plugin version) summary``, NAME in bold, wrapped under the summary (not flush left,
    where a continuation read as another method at 80 columns: ``+ float codebook``)."""
    import textwrap

    from rich.text import Text

    lines = textwrap.wrap(f"  {name}  {about}", width=out.width, subsequent_indent="      ")
    text = Text("\n".join(lines))
    text.stylize("bold", 2, 2 + len(name))
    out.print(text, soft_wrap=True)


def _print_methods(registry: Any, out: Any) -> None:
    from rich.table import Table

    for kind_info in registry.kinds():
        methods = registry.methods(kind_info.name)
        if not methods:
            continue
        about = f" - {escape(kind_info.description)}" if kind_info.description else ""
        columns = (
            f" [dim](reports {escape(', '.join(kind_info.columns))})[/dim]"
            if kind_info.columns
            else ""
        )
        out.print(f"\n[bold]{kind_info.name}[/bold] methods{about}{columns}")
        for m in methods:
            _print_method_line(out, m.name, f"({m.plugin} {m.plugin_version}) {m.summary}")
            rows = m.option_rows()
            if rows:
                opts = Table(show_header=True, box=None, pad_edge=False, padding=(0, 2))
                # NOTE: an option's name is never cut (it is what users type); a long type or
                # default folds, the help wraps
                longest = max(len(row["name"]) for row in rows) + 4
                opts.add_column("option", no_wrap=True, min_width=longest)
                for col in ("type", "default", "help"):
                    opts.add_column(col, overflow="fold")
                for row in rows:
                    opts.add_row(
                        "    " + row["name"],
                        escape(row["type"]),
                        escape(row["default"]),
                        escape(row["help"]),
                    )
                out.print(opts)


COMMANDS = (
    Command(
        "plugins",
        "installed plugins, their methods by kind and the methods' options; `plugins new NAME` scaffolds one",
        arguments,
        run,
    ),
)
