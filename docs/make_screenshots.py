"""Regenerate the screenshots of the HTML report in ``docs/img/`` from a real run.

    python docs/make_screenshots.py [--demo-dir DIR] [--fast]

Runs ``modelpress demo`` (torch or Keras needed; ``--demo-dir`` reuses the output of an earlier
run instead) and renders its ``report.html`` with a headless Chromium (Debian: ``apt-get install
chromium``; ``chrome``/``chromium-browser`` work too, or set ``CHROMIUM=/path``) into
``docs/img/report.png`` (the whole page: the stage table and the accuracy-vs-size chart). The PNG
is committed: the docs build and CI need no browser. It prints the run's ``report.md`` table, to
paste into ``docs/recipes-and-reports.md`` beside the image.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


def browser() -> str:
    for name in (os.environ.get("CHROMIUM"), *BROWSERS):
        if name and shutil.which(name):
            return shutil.which(name)  # type: ignore[return-value]
    raise SystemExit("no headless Chromium found: apt-get install chromium (or set CHROMIUM=/path/to/chrome)")


def screenshot(html: Path, png: Path, *, width: int = 1100, height: int = 760) -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}",
             f"--window-size={width},{height}", f"--screenshot={png}", html.resolve().as_uri()],
            check=True, capture_output=True, timeout=120,
        )
    if not png.exists() or png.stat().st_size == 0:
        raise SystemExit(f"the browser wrote no image for {html}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-dir", type=Path, help="use the report of an earlier `modelpress demo --out DIR`")
    parser.add_argument("--fast", action="store_true", help="run the demo with --fast")
    args = parser.parse_args()
    folder = args.demo_dir
    with tempfile.TemporaryDirectory() as tmp:
        if folder is None:
            folder = Path(tmp) / "demo"
            cmd = [sys.executable, "-m", "modelpress.cli", "demo", "--out", str(folder), "-q", *(["--fast"] if args.fast else [])]
            subprocess.run(cmd, check=True)
        report = folder / "report.html"
        if not report.exists():
            raise SystemExit(f"{report} does not exist: run `modelpress demo --out {folder}` first")
        out = HERE / "img"
        out.mkdir(exist_ok=True)
        screenshot(report, out / "report.png")
        print(f"wrote {out / 'report.png'} from {report}\n")
        print("\n".join(line for line in (folder / "report.md").read_text().splitlines() if line.startswith("|")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
