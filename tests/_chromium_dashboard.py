"""Headless Chromium for the dashboard tests: a page's DOM after its scripts ran, and its screenshot.

Debian's ``/usr/bin/chromium``, offline (no sync, no component updates, no background networking, no
QUIC), in a throw-away profile. ``--virtual-time-budget`` lets a JavaScript app fetch and render before
the DOM is dumped or the screenshot taken. (tests/browser.py's ``screenshot()`` of another branch may
replace this when the branches meet.)
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
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
    "--mute-audio",
)


def available() -> bool:
    return Path(CHROMIUM).is_file()


def _run(
    url: str, action: list[str], budget_ms: int, timeout_s: float
) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="modelpress-chromium-") as profile:
        return subprocess.run(
            [
                CHROMIUM,
                *FLAGS,
                f"--user-data-dir={profile}",
                f"--virtual-time-budget={budget_ms}",
                *action,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )


def dump_dom(url: str, *, budget_ms: int = 15000, timeout_s: float = 120) -> str:
    """The page's DOM (HTML) once its scripts have had ``budget_ms`` of virtual time."""
    proc = _run(url, ["--dump-dom"], budget_ms, timeout_s)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def screenshot(
    url: str,
    path: Path,
    *,
    size: tuple[int, int] = (1400, 900),
    budget_ms: int = 15000,
    timeout_s: float = 120,
) -> Path:
    """A PNG of the page at ``size`` after ``budget_ms`` of virtual time."""
    proc = _run(
        url,
        [f"--screenshot={Path(path).resolve()}", f"--window-size={size[0]},{size[1]}"],
        budget_ms,
        timeout_s,
    )
    assert proc.returncode == 0 and Path(path).is_file(), proc.stderr[-2000:]
    return Path(path)
