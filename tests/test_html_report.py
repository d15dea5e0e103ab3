"""The HTML report, rendered by a real headless browser (Debian's chromium)."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_scan_cli import run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not installed (.ci/run installs it)"
)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars"]  # fmt: skip


class Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def chromium(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    profile = tmp_path / "profile"
    return subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_report_renders_offline_with_tables_histogram_and_thumbnails(tmp_path, messy_tree):
    out = tmp_path / "r.csv"
    run(["scan", str(messy_tree), "--out", str(out)])
    page = tmp_path / "r.html"
    dom = chromium(["--dump-dom", page.as_uri()], tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    parsed = Collector()
    parsed.feed(dom.stdout)
    tags = [t for t, _ in parsed.tags]
    images = [a for t, a in parsed.tags if t == "img"]
    assert tags.count("svg") == 1
    assert len(images) >= 6 and all(a["src"].startswith("data:image/jpeg;base64,") for a in images)
    assert not any(a.get("href", "").startswith("http") for _, a in parsed.tags)
    assert "odd names" in dom.stdout and "patient_A" in dom.stdout
    assert "unreadable" in dom.stdout

    shot = tmp_path / "shot.png"
    result = chromium([f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri()],
                      tmp_path)  # fmt: skip
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    pixels = cv2.imread(str(shot))
    assert pixels.shape[:2] == (2400, 1200)
    b, g, r = (pixels[:, :, i].astype(int) for i in range(3))
    # cell thumbnails are stained purple: red and blue well above green
    purple = ((r - g) > 40) & ((b - g) > 40)
    assert purple.sum() > 2000
    # the histogram bars are drawn
    bar = (np.abs(r - 0x7B) < 10) & (np.abs(g - 0x3F) < 10) & (np.abs(b - 0xA0) < 10)
    assert bar.sum() > 200
