"""Regenerate the screenshot of the HTML report in ``docs/img/report.png`` from a real run.

    python docs/make_screenshots.py [--keep DIR]

Compresses the docs' digits CNN (``tests/docs_files.py``: numpy and ONNX Runtime, no framework)
with ``REPORT_RECIPE`` there, then renders its ``report.html`` in headless Chromium
(``tests/browser.py``; Debian: ``apt-get install chromium``, or set ``CHROMIUM=/path``). The same
run is checked by ``tests/test_report_screenshot.py``. The PNG is committed: building the site
needs no browser. It prints the run's ``report.md`` table, to paste beside the image in
``docs/recipes-and-reports.md``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # NOTE: the repository root, for tests.browser and tests.docs_files

from tests.browser import screenshot  # noqa: E402
from tests.docs_files import compressed_report  # noqa: E402

SIZE = (1100, 1250)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp) / "run"
        report = compressed_report(folder)
        png = screenshot(report, HERE / "img" / "report.png", SIZE)
        print(f"wrote {png} from {report}\n")
        print("\n".join(line for line in (folder / "report.md").read_text().splitlines() if line.startswith("|")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
