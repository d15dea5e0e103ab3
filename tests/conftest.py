"""Shared fixtures: real C-NMC crops committed under tests/fixtures, and files made on disk."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"
CNMC = FIXTURES / "cnmc"
TINY_3CLASS = FIXTURES / "models" / "tiny-3class.onnx"
SHARED_CNMC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cnmc"


def fixture_images() -> list[Path]:
    return sorted(CNMC.rglob("*.webp"))


def read_bgr(path: Path) -> np.ndarray:
    return cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR)


@pytest.fixture
def slide_tree(tmp_path: Path) -> Path:
    """Two slides of real crops saved as BMP, PNG, TIFF and JPEG (the formats labs have)."""
    root = tmp_path / "slides"
    images = fixture_images()
    formats = [".bmp", ".png", ".tif", ".jpg"]
    for index, source in enumerate(images[::3]):
        slide = root / ("patient_A" if "all" in source.parent.name else "patient_B")
        slide.mkdir(parents=True, exist_ok=True)
        target = slide / f"{source.stem}{formats[index % len(formats)]}"
        cv2.imwrite(str(target), read_bgr(source))
    return root


@pytest.fixture
def messy_tree(slide_tree: Path) -> Path:
    """The slide tree plus every kind of bad or odd file a lab folder collects."""
    slide = slide_tree / "patient_A"
    good = read_bgr(fixture_images()[0])
    (slide / "empty.png").write_bytes(b"")
    data = (slide / next(p.name for p in slide.iterdir() if p.suffix == ".png")).read_bytes()
    (slide / "truncated.png").write_bytes(data[: len(data) // 3])
    (slide / "notes.jpg").write_text("this is not an image\n")
    cv2.imwrite(str(slide / "deep16.png"), good.astype(np.uint16) * 257)
    cv2.imwrite(str(slide / "gray.png"), cv2.cvtColor(good, cv2.COLOR_BGR2GRAY))
    cv2.imwrite(str(slide / "alpha.png"), cv2.cvtColor(good, cv2.COLOR_BGR2BGRA))
    odd = slide_tree / "odd names"
    odd.mkdir()
    for name in ["ünïcødé 細胞.png", 'comma, "quote".png', "=HYPERLINK(1).png", "new\nline.png"]:
        cv2.imwrite(str(odd / "tmp.png"), good)
        os.replace(odd / "tmp.png", odd / name)
    (slide_tree / "README.txt").write_text("not scanned: not an image type")
    return slide_tree


@pytest.fixture
def cnmc_copy(tmp_path: Path) -> Path:
    target = tmp_path / "cnmc"
    shutil.copytree(CNMC, target)
    return target
