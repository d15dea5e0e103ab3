"""The shift suite's photometric shifts are written for speed (a lookup table, float32,
OpenCV's per-pixel matrix product); on real crops they must equal their definitions written
plainly, and leave the black background black."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import fixture_images, read_bgr

from export.augment import HED_FROM_RGB, RGB_FROM_HED
from export.shift import photometric, shifts, stain_jitter
from smearscan.colour import BACKGROUND_LEVEL


@pytest.fixture(scope="module")
def crops() -> list[np.ndarray]:
    return [read_bgr(path) for path in fixture_images()[:6]]


def _cell(image: np.ndarray) -> np.ndarray:
    return (image.max(axis=2, keepdims=True) > BACKGROUND_LEVEL).astype(np.float64)


def test_exposure_and_gamma_equal_their_per_pixel_definition(crops):
    for gain, gamma in [(1.15, 1.0), (0.85, 1.0), (1.0, 0.8), (1.0, 1.25), (1.1, 0.9)]:
        for image in crops:
            values = np.clip(image.astype(np.float32) / 255.0 * gain, 0, 1) ** gamma
            expected = np.round(values * 255 * _cell(image)).astype(np.uint8)
            assert np.array_equal(photometric(image, gain, gamma), expected)


def test_the_stain_jitter_equals_its_definition_in_double_precision(crops):
    for seed, image in enumerate(crops):
        draws = np.random.default_rng(seed)
        scale, offset = draws.uniform(0.9, 1.1, 3), draws.uniform(-0.05, 0.05, 3)
        rgb = image[:, :, ::-1].astype(np.float64) / 255.0
        density = -np.log(np.clip(rgb, 1 / 255, 1)) @ HED_FROM_RGB.astype(np.float64)
        shifted = np.exp(-((density * scale + offset) @ RGB_FROM_HED.astype(np.float64)))
        expected = np.round(np.clip(shifted, 0, 1)[:, :, ::-1] * 255 * _cell(image))
        fast = stain_jitter(image, np.random.default_rng(seed)).astype(np.float64)
        difference = np.abs(fast - expected)
        assert difference.max() <= 1 and (difference > 0).mean() < 1e-3  # float32 rounding
        assert np.abs(fast - image).max() >= 2  # it did shift the stain


def test_every_shift_keeps_a_crops_shape_and_type(crops):
    image = crops[0]
    for name, shift in shifts(0).items():
        out = shift(image)
        assert out.dtype == np.uint8 and out.shape == image.shape, name
