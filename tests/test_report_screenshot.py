"""report.html as a browser shows it: a real compressed digits model's report rendered in headless
Chromium (tests/browser.py) is not blank, and shows its table, its chart and its coloured flags.

Skipped with the reason when no Chromium is installed (CI installs Debian's ``chromium``).
``python docs/make_screenshots.py`` writes the same page into ``docs/img/report.png``.
"""

import numpy as np
import pytest

from tests.browser import NO_BROWSER, chromium, screenshot
from tests.docs_files import compressed_report

pytestmark = pytest.mark.skipif(chromium() is None, reason=NO_BROWSER)

NO_GAIN = (0x6B, 0x1B, 0x9A)  # .flag-no-gain's background in core/app/report.py's CSS
CHART_POINT = (0xD0, 0x55, 0x3F)  # the chart's stage markers


def _pixels(png):
    image = pytest.importorskip(
        "PIL.Image", reason="pillow reads the screenshot (pip install pillow)"
    )
    with image.open(png) as img:
        return np.asarray(img.convert("RGB")).astype(np.int16)


def _share(pixels, colour, tolerance=12):
    return float(np.mean(np.all(np.abs(pixels - np.array(colour)) <= tolerance, axis=-1)))


def test_report_html_renders_with_its_table_chart_and_flag_colours(tmp_path):
    report = compressed_report(tmp_path / "run")
    text = report.read_text(encoding="utf-8")
    assert "flag-no-gain" in text and "<svg" in text and "quantize (int8 static)" in text
    assert (
        "<code>.mpk</code>" in text and "`" not in text.split("<pre>")[0]
    )  # Markdown code spans rendered, not raw
    pixels = _pixels(screenshot(report, tmp_path / "report.png", (1100, 1400)))
    assert pixels.shape == (1400, 1100, 3)
    grey = pixels.mean(axis=-1)
    assert grey.std() > 20, "the page rendered blank"
    assert (
        _share(pixels, (255, 255, 255), 3) > 0.5
    )  # a white page with text on it, not a dark error page
    assert _share(pixels, NO_GAIN) > 1e-4, "the NO GAIN flag is not coloured"
    assert _share(pixels, CHART_POINT) > 1e-5, "the chart's points are not drawn"
    dark_rows = np.flatnonzero((grey < 100).sum(axis=1) > 3)
    assert len(dark_rows) > 100, "too little text on the page"  # title, table rows, notes, details
