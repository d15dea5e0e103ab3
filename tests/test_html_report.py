"""The HTML reports, rendered by a real headless browser (Debian's chromium)."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import CNMC, IN_CI, read_bgr, run

from smearscan.exitstatus import ExitStatus
from smearscan.preprocess import Recipe

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None and IN_CI:
    raise RuntimeError("CI must render the HTML reports: .ci/run installs chromium")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not installed (.ci/run installs it)"
)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--disable-quic",
]


class Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def chromium(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    assert CHROMIUM, "chromium is not installed"  # the module skips (or fails in CI) first
    profile = tmp_path / "profile"
    return subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def rendered(page: Path, tmp_path: Path) -> Collector:
    dom = chromium(["--dump-dom", page.as_uri()], tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    parsed = Collector()
    parsed.feed(dom.stdout)
    return parsed


def screenshot(page: Path, tmp_path: Path, height: int = 2400) -> np.ndarray:
    shot = tmp_path / f"{page.stem}.png"
    result = chromium(
        [f"--screenshot={shot}", f"--window-size=1200,{height}", page.as_uri()], tmp_path
    )
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    return read_bgr(shot)


def test_report_renders_offline_with_rule_tables_thumbnails_and_problems(tmp_path, messy_tree):
    (messy_tree / "patient_A" / "blank.png").write_bytes(
        cv2.imencode(".png", np.full((450, 450, 3), 255, np.uint8))[1].tobytes()
    )
    (messy_tree / "patient_A" / "cell.gif").write_bytes(b"GIF89a")  # a type not read
    out = tmp_path / "r.csv"
    run(["scan", str(messy_tree), "--out", str(out)], expect=ExitStatus.SOME_UNUSABLE)
    parsed = rendered(tmp_path / "r.html", tmp_path)
    text = " ".join(parsed.text)
    tags = [t for t, _ in parsed.tags]
    images = [a for t, a in parsed.tags if t == "img"]
    assert tags.count("svg") == 1
    assert len(images) >= 6 and all(a["src"].startswith("data:image/jpeg;base64,") for a in images)
    assert not any(a.get("href", "").startswith("http") for _, a in parsed.tags)
    assert "Research use only" in text and "Not for diagnostic use" in text
    assert "cells labelled all (share of usable)" in text and "cells labelled hem" in text
    assert "margin to the cut-off" in text
    assert re.search(r"a cell is 'all' when P\(all\) >= 0\.\d+", text)
    assert "failed quality control" in text and "grayscale or colourless" in text
    assert "Unreadable files (3)" in text and "empty.png" in text and "notes.jpg" in text
    assert "odd names" in text and "patient_A" in text
    assert "1 files of image types smearscan does not read were left out (1 .gif)" in text

    pixels = screenshot(tmp_path / "r.html", tmp_path)
    assert pixels.shape[:2] == (2400, 1200)
    b, g, r = (pixels[:, :, i].astype(int) for i in range(3))
    purple = ((r - g) > 40) & ((b - g) > 40)  # stained cells in the thumbnails
    assert purple.sum() > 2000
    bar = (np.abs(r - 0x7B) < 10) & (np.abs(g - 0x3F) < 10) & (np.abs(b - 0xA0) < 10)
    assert bar.sum() > 200  # the histogram bars are drawn
    cutoff = (np.abs(r - 0xC0) < 12) & (np.abs(g - 0x39) < 12) & (np.abs(b - 0x2B) < 12)
    assert cutoff.sum() > 40  # and the cell threshold across them, in red
    assert "threshold 0." in text


def test_an_empty_new_only_report_says_no_images_found(tmp_path, slide_tree):
    state, out = tmp_path / "state.db", tmp_path / "r.csv"
    args = ["scan", str(slide_tree), "--out", str(out), "--state", str(state), "--min-age", "0"]
    run(args)
    run([*args, "--new-only"])
    assert "No images found in this run" in " ".join(rendered(tmp_path / "r.html", tmp_path).text)


def test_evaluation_page_is_a_crisp_validation_record(tmp_path):
    out = tmp_path / "eval"
    run(["evaluate", str(CNMC), "--out", str(out)])
    parsed = rendered(out / "evaluation.html", tmp_path)
    text = " ".join(parsed.text)
    for needed in (
        "Validation record",
        "model sha256",
        "date (UTC)",
        "smearscan",
        "false positive rate",
        "true positive rate",
        "observed accuracy",
        "Research use only",
    ):
        assert needed in text, needed
    assert [t for t, _ in parsed.tags].count("svg") == 2
    pixels = screenshot(out / "evaluation.html", tmp_path, height=1800)
    b, g, r = (pixels[:, :, i].astype(int) for i in range(3))
    assert (((r - g) > 40) & ((b - g) > 40)).sum() > 500  # the ROC curve and the bars


def test_plot_labels_never_overlap():
    """Title above the axes, x label below the tick labels, y label left of them."""
    import xml.etree.ElementTree as ElementTree

    from smearscan.evaluate import reliability_svg, roc_svg

    y = np.array([0, 1, 0, 1, 1])
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7], [0.45, 0.55]])
    for svg in (
        roc_svg(y == 1, probabilities[:, 1], 0.9, "all"),
        reliability_svg(y, probabilities),
    ):
        root = ElementTree.fromstring(str(svg))
        ns = "{http://www.w3.org/2000/svg}"
        boxes = []
        for node in root.iter(f"{ns}text"):
            size = float(node.get("font-size", 12))
            width = 0.6 * size * len(node.text or "")
            transform = node.get("transform") or ""
            if "rotate" in transform:
                x, y_ = map(float, re.findall(r"translate\(([\d.]+) ([\d.]+)\)", transform)[0])
                boxes.append((x - size, y_ - width / 2, x, y_ + width / 2))
                continue
            x, y_ = float(node.attrib["x"]), float(node.attrib["y"])
            anchor = node.get("text-anchor", "start")
            left = x - width / 2 if anchor == "middle" else x - width if anchor == "end" else x
            boxes.append((left, y_ - size, left + width, y_))
        for i, a in enumerate(boxes):
            for b_ in boxes[i + 1 :]:
                overlap = a[0] < b_[2] and b_[0] < a[2] and a[1] < b_[3] and b_[1] < a[3]
                assert not overlap, (a, b_)


def test_file_names_wrap_at_separators_never_inside_an_extension():
    from smearscan.sinks.html import breakable

    shown = str(breakable("site_A/slide-1/<b>UID_3_1_1_all.png"))
    assert "&lt;b&gt;" in shown and "<b>" not in shown  # still escaped
    assert shown.endswith("all.png") and "<wbr>.png" not in shown
    assert shown.count("<wbr>") == 8  # after each of the 2 "/", 1 "-" and 5 "_"


def test_thumbnails_stay_inside_the_scanned_folder(tmp_path, slide_tree):
    """Issue 22: the report's thumbnails read files again without the scan's containment
    check: a file swapped for a link to outside the folder after the scan was shown."""
    import os
    import shutil

    from smearscan.sinks.html import thumbnail_data_uri

    recipe = Recipe()
    crop = sorted(p for p in slide_tree.rglob("*.png"))[0]
    root = os.path.realpath(slide_tree)
    thumbnail = thumbnail_data_uri(str(crop), recipe, inside=root)
    assert thumbnail is not None and thumbnail.startswith("data:image/jpeg")
    outside = tmp_path / "private.png"
    shutil.copy(crop, outside)
    crop.unlink()
    crop.symlink_to(outside)  # swapped after the scan found it
    assert thumbnail_data_uri(str(crop), recipe, inside=root) is None
