"""Cell colour statistics, Reinhard's colour transfer and per-slide colour normalisation.

C-NMC labels are per donor, and the shipped model partly reads the donor's colour (the
shift suite's donor colour swap, issue 26). Three users share these functions: the donor
colour swap of the shift suite, the ``colour`` augmentation group and the per-slide colour
normalisation (:class:`SlideColour`), which maps each slide's cell pixels to reference
statistics before the one preprocessing function runs. Statistics are per-channel mean and
spread of cell pixels in Lab (OpenCV's 8-bit scaling); the black background stays black.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import cv2
import numpy as np

from smearscan.preprocess import Recipe

ColourStats = tuple[np.ndarray, np.ndarray]  # Lab mean and standard deviation of cell pixels
#: Pixels whose brightest channel is at most this (8-bit) are background: the scanner's
#: ``Recipe.background_threshold``.
BACKGROUND_LEVEL = Recipe().background_threshold
#: Crop pixels of the cell's rim that a slide's statistics leave out (``SlideColour.margin``).
#: Blur and compression mix the rim with the black background, which inflates the chroma
#: spread measured over the whole cell (a: 3.3 -> 5.1 under blur sigma 2 on the C-NMC crops);
#: 8 pixels in, the statistics hold within about 0.1 under blur and JPEG 75.
EDGE_MARGIN = 8
#: The least spread a statistic reports, in 8-bit Lab units. Real cells spread 2-5 in a and b
#: and more in L; a colourless slide (grey cells, spread 0) would otherwise divide by almost
#: nothing and map every pixel to 0 or 255, where with the floor it takes the target's mean.
SPREAD_FLOOR = 1.0
T = TypeVar("T")


def cell_mask(image: np.ndarray, margin: int = 0) -> np.ndarray:
    """The cell's pixels of a decoded uint8 crop, less a rim ``margin`` pixels wide."""
    # channel by channel: numpy's reduction over the last axis is 70x slower
    brightest = np.maximum(np.maximum(image[..., 0], image[..., 1]), image[..., 2])
    mask = brightest > BACKGROUND_LEVEL
    if margin <= 0:
        return mask
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin + 1, 2 * margin + 1))
    return cv2.erode(mask.astype(np.uint8), disc).astype(bool)


def cell_lab(image: np.ndarray, margin: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The crop in Lab (float32, OpenCV's 8-bit scaling) and its cell mask (less a rim
    ``margin`` pixels wide)."""
    lab = cv2.cvtColor(image, cv2.COLOR_BGR2LAB).astype(np.float32)
    return lab, cell_mask(image, margin)


class ColourMoments:
    """Running sums of cell pixels' Lab values, so a slide's statistics can be gathered one
    crop at a time without keeping the crops."""

    def __init__(self, margin: int = 0) -> None:
        self.margin = margin
        self.count = 0
        self.total = np.zeros(3)
        self.squares = np.zeros(3)

    def add(self, image: np.ndarray) -> None:
        lab, mask = cell_lab(image, self.margin)
        pixels = lab[mask].astype(np.float64)
        self.count += len(pixels)
        self.total += pixels.sum(axis=0)
        self.squares += np.square(pixels).sum(axis=0)

    def absorb(self, other: ColourMoments) -> None:
        """Add another crop set's sums to these."""
        self.count += other.count
        self.total += other.total
        self.squares += other.squares

    def stats(self) -> ColourStats:
        """Mean and spread (population standard deviation, at least :data:`SPREAD_FLOOR`)
        of the pixels added."""
        if not self.count:
            raise ValueError("no cell pixels: every crop was background")
        mean = self.total / self.count
        variance = np.maximum(self.squares / self.count - np.square(mean), 0.0)
        return mean, np.maximum(np.sqrt(variance), SPREAD_FLOOR)


def colour_stats(images: Iterable[np.ndarray], margin: int = 0) -> ColourStats:
    """Per-channel Lab mean and spread of the cell pixels of several crops (one donor),
    less a rim ``margin`` pixels wide."""
    moments = ColourMoments(margin)
    for image in images:
        moments.add(image)
    return moments.stats()


def colour_transfer(image: np.ndarray, source: ColourStats, target: ColourStats) -> np.ndarray:
    """Reinhard's colour transfer on the cell pixels of a decoded BGR crop: source
    statistics to target ones; the background stays black."""
    # per channel an affine map of 8-bit Lab values: a lookup table of the 256 values
    values = np.arange(256, dtype=np.float32)[:, None]
    mapped = (values - source[0]) / source[1] * target[1] + target[0]
    table = np.clip(np.round(mapped), 0, 255).astype(np.uint8)[:, None, :]
    lab = cv2.LUT(cv2.cvtColor(image, cv2.COLOR_BGR2LAB), table)
    return cv2.cvtColor(lab, cv2.COLOR_LAB2BGR) * cell_mask(image)[..., np.newaxis]


def mean_stats(stats: Iterable[ColourStats]) -> ColourStats:
    """The mean of several donors' statistics, each donor weighing the same."""
    listed = list(stats)
    if not listed:
        raise ValueError("no donors to average")
    return np.mean([s[0] for s in listed], axis=0), np.mean([s[1] for s in listed], axis=0)


def slide_sample(items: Sequence[T], per_slide: int) -> list[T]:
    """Up to ``per_slide`` of a slide's crops, evenly spaced over them in the given (sorted)
    order: the same crops whatever other slides a run holds."""
    if per_slide < 1:
        raise ValueError("per_slide must be at least 1")
    if len(items) <= per_slide:
        return list(items)
    picks = np.linspace(0, len(items) - 1, per_slide).round().astype(int)
    return [items[i] for i in picks]


#: Version of :meth:`SlideColour.to_record`; bump when a key changes meaning.
#: 2 added ``margin`` (version 1 records measured the whole cell: margin 0).
SLIDE_COLOUR_VERSION = 2


@dataclass(frozen=True)
class SlideColour:
    """Per-slide colour normalisation: a slide's statistics, measured on up to
    ``per_slide`` of its crops (its own unlabelled pixels, never its labels) less a rim
    ``margin`` pixels wide, are mapped to ``reference`` (the mean over the training donors,
    measured the same way) on every pixel of every crop of that slide before
    preprocessing. Normalising the input colour, not the output scores: normalising scores
    per slide destroys the signal (labels are per donor)."""

    mean: tuple[float, float, float]
    spread: tuple[float, float, float]
    per_slide: int = 40
    margin: int = 0
    version: int = SLIDE_COLOUR_VERSION

    def __post_init__(self) -> None:
        values = (*self.mean, *self.spread)
        if len(self.mean) != 3 or len(self.spread) != 3:
            raise ValueError("a colour reference has three Lab channels")
        if not all(np.isfinite(values)) or min(self.spread) <= 0:
            raise ValueError("a colour reference needs finite means and positive spreads")
        if self.per_slide < 1:
            raise ValueError("per_slide must be at least 1")
        if self.margin < 0:
            raise ValueError("margin must be at least 0")
        if self.version > SLIDE_COLOUR_VERSION:
            raise ValueError(
                f"slide colour version {self.version}; this code reads up to {SLIDE_COLOUR_VERSION}"
            )

    @classmethod
    def fitted(
        cls, donor_stats: Iterable[ColourStats], per_slide: int = 40, margin: int = 0
    ) -> SlideColour:
        """The reference of a training set: the mean over its donors' statistics (measured
        with ``per_slide`` and ``margin``)."""
        mean, spread = mean_stats(donor_stats)
        return cls(
            tuple(float(v) for v in mean),  # type: ignore[arg-type]
            tuple(float(v) for v in spread),  # type: ignore[arg-type]
            per_slide,
            margin,
        )

    @property
    def reference(self) -> ColourStats:
        return np.asarray(self.mean), np.asarray(self.spread)

    def normalise(self, image: np.ndarray, slide: ColourStats) -> np.ndarray:
        """A decoded BGR crop of a slide whose statistics are ``slide``, in the reference's
        colour."""
        return colour_transfer(image, slide, self.reference)

    def to_record(self) -> dict[str, Any]:
        return {
            "mean": list(self.mean),
            "spread": list(self.spread),
            "per_slide": self.per_slide,
            "margin": self.margin,
            "version": self.version,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any] | None) -> SlideColour | None:
        if record is None:
            return None
        return cls(
            tuple(float(v) for v in record["mean"]),  # type: ignore[arg-type]
            tuple(float(v) for v in record["spread"]),  # type: ignore[arg-type]
            int(record["per_slide"]),
            int(record.get("margin", 0)),
            int(record.get("version", 1)),
        )
