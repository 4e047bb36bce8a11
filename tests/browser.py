"""A headless Chromium for tests and docs scripts: one function, :func:`screenshot`.

    from tests.browser import chromium, screenshot
    if chromium() is None: pytest.skip(NO_BROWSER)
    screenshot("report.html", "report.png", (1100, 760))

The browser is found as ``$CHROMIUM``, then ``chromium``, ``chromium-browser``, ``google-chrome``,
``chrome`` on the PATH (Debian: ``apt-get install chromium``). It runs headless with a throw-away
profile and everything that would reach the network switched off, so it works on a closed machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["NO_BROWSER", "chromium", "dump_dom", "screenshot"]

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")
NO_BROWSER = (
    "no headless Chromium found (apt-get install chromium, or set CHROMIUM=/path/to/chrome)"
)
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--disable-dev-shm-usage",
)


def chromium() -> str | None:
    """The browser's path, or ``None`` when there is none (tests skip with :data:`NO_BROWSER`)."""
    for name in (os.environ.get("CHROMIUM"), *BROWSERS):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _url(target: str | os.PathLike[str]) -> str:
    text = os.fspath(target)
    if "://" in text:
        return text
    return Path(text).resolve().as_uri()


def _run(
    target: str | os.PathLike[str], action: list[str], budget_ms: int, timeout: float
) -> subprocess.CompletedProcess[str]:
    """Chromium on one page with ``action`` (--screenshot=..., --dump-dom); ``budget_ms`` of virtual time lets a
    JavaScript app fetch and render first (0: none)."""
    browser = chromium()
    if browser is None:
        raise RuntimeError(NO_BROWSER)
    budget = [f"--virtual-time-budget={budget_ms}"] if budget_ms else []
    with tempfile.TemporaryDirectory(prefix="mp-chromium-") as profile:
        return subprocess.run(
            [browser, *FLAGS, f"--user-data-dir={profile}", *budget, *action, _url(target)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def screenshot(
    url_or_file: str | os.PathLike[str],
    png: str | os.PathLike[str],
    size: tuple[int, int] = (1100, 760),
    *,
    timeout: float = 120,
    budget_ms: int = 0,
) -> Path:
    """Render a page (a URL or a local file) into ``png`` at ``size`` = (width, height) pixels.

    Returns the PNG's path. Raises ``RuntimeError`` when no browser is found or it wrote no image
    (its stderr is in the message).
    """
    out = Path(png).resolve()
    out.unlink(missing_ok=True)
    width, height = size
    done = _run(
        url_or_file, [f"--window-size={width},{height}", f"--screenshot={out}"], budget_ms, timeout
    )
    if not out.exists() or out.stat().st_size == 0:
        raise RuntimeError(
            f"chromium wrote no image for {url_or_file} (exit {done.returncode}): {done.stderr[-2000:]}"
        )
    return out


def dump_dom(
    url_or_file: str | os.PathLike[str], *, budget_ms: int = 15000, timeout: float = 120
) -> str:
    """The page's DOM (HTML) once its scripts have had ``budget_ms`` of virtual time."""
    done = _run(url_or_file, ["--dump-dom"], budget_ms, timeout)
    if done.returncode != 0:
        raise RuntimeError(
            f"chromium could not render {url_or_file} (exit {done.returncode}): {done.stderr[-2000:]}"
        )
    return done.stdout
