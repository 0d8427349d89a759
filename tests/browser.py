"""Headless Chromium screenshots for the page tests (report, galleries, find.html)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NEEDS_CHROMIUM = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")


def screenshot(url: str, shot: Path, profile: Path, width: int = 1280, height: int = 2000,
               extra_args: tuple[str, ...] = ()) -> np.ndarray:
    """The page at ``url`` rendered by headless Chromium as an RGB array (also saved at ``shot``).
    The browser runs in its own process group, so a hung one and its helpers can be stopped."""
    from PIL import Image

    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
           *extra_args, f"--user-data-dir={profile}", f"--screenshot={shot}",
           f"--window-size={width},{height}", url]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"chromium did not finish within 90 s: {err[-800:]}")
    assert shot.is_file(), f"no screenshot (rc={proc.returncode}): {err[-800:]}"
    return np.asarray(Image.open(shot).convert("RGB"), dtype=float)
