"""Cell colour statistics and per-slide colour normalisation (``smearscan/colour.py``) on
the committed C-NMC crops: the statistics, the reference's record, the slide sample, and the
shift suite measuring a shifted slide again before normalising it."""

from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np
import pytest
from conftest import CNMC, read_bgr

from smearscan.colour import (
    EDGE_MARGIN,
    SPREAD_FLOOR,
    ColourMoments,
    SlideColour,
    cell_lab,
    cell_mask,
    colour_stats,
    mean_stats,
    slide_sample,
)
from smearscan.preprocess import Recipe, preprocess, read_image, stored_uint8


def donor_crops() -> dict[str, list[np.ndarray]]:
    from export.data import discover_dataset

    crops: dict[str, list[np.ndarray]] = {}
    for sample in discover_dataset(CNMC):
        crops.setdefault(sample.patient, []).append(read_bgr(sample.path))
    return crops


def test_running_moments_give_the_statistics_of_all_cell_pixels_together():
    crops = [crop for donor in donor_crops().values() for crop in donor][:6]
    pixels = np.concatenate([lab[mask] for lab, mask in map(cell_lab, crops)]).astype(np.float64)
    mean, spread = colour_stats(crops)
    assert np.allclose(mean, pixels.mean(axis=0)) and np.allclose(spread, pixels.std(axis=0))
    halves = ColourMoments(), ColourMoments()
    for index, crop in enumerate(crops):
        halves[index % 2].add(crop)
    halves[0].absorb(halves[1])
    assert np.allclose(halves[0].stats()[0], mean) and np.allclose(halves[0].stats()[1], spread)
    with pytest.raises(ValueError, match="no cell pixels"):
        colour_stats([np.zeros((8, 8, 3), np.uint8)])


def test_every_slide_is_mapped_to_the_reference_and_its_background_stays_black():
    crops = donor_crops()
    stats = {donor: colour_stats(images) for donor, images in crops.items()}
    donors = sorted(stats)
    colour = SlideColour.fitted([stats[d] for d in donors[:4]])
    assert np.allclose(colour.mean, mean_stats([stats[d] for d in donors[:4]])[0])
    for donor in donors:  # the held-out donors too: from their own pixels
        normalised = [colour.normalise(image, stats[donor]) for image in crops[donor]]
        mean, spread = colour_stats(normalised)
        assert np.abs(mean - colour.mean).max() < 1.5
        assert np.allclose(spread, colour.spread, rtol=0.2)
        for image, out in zip(crops[donor], normalised, strict=True):
            assert (out[image.max(axis=2) <= 12] == 0).all()
    # before, the donors' means lay further apart than the rounding left them
    before = np.ptp([stats[d][0] for d in donors], axis=0).max()
    assert before > 3


def test_a_colourless_slide_takes_the_references_mean_colour_not_saturated_noise():
    """Grey cells have no chroma spread: without a floor the transfer divides by almost
    nothing and paints every cell pixel 0 or 255 in a and b."""
    crops = donor_crops()
    colour = SlideColour.fitted([colour_stats(images) for images in crops.values()])
    grey = [
        cv2.cvtColor(cv2.cvtColor(c, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
        for c in next(iter(crops.values()))
    ]
    stats = colour_stats(grey)
    assert stats[1][1] == stats[1][2] == SPREAD_FLOOR  # a and b: no spread at all
    normalised = [colour.normalise(image, stats) for image in grey]
    mean, spread = colour_stats(normalised)
    assert np.abs(mean[1:] - colour.mean[1:]).max() < 1.5
    assert spread[1:].max() < 2  # the reference's mean colour, not a and b at 0 or 255


def test_the_reference_writes_and_reads_its_own_record_and_refuses_nonsense():
    colour = SlideColour((60.0, 150.0, 110.0), (12.0, 3.5, 4.0), per_slide=25)
    assert SlideColour.from_record(colour.to_record()) == colour
    assert SlideColour.from_record(None) is None
    with pytest.raises(ValueError, match="positive spreads"):
        SlideColour((60.0, 150.0, 110.0), (12.0, 0.0, 4.0))
    with pytest.raises(ValueError, match="three Lab channels"):
        SlideColour((60.0, 150.0), (12.0, 3.0))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="version 3"):
        SlideColour.from_record({**colour.to_record(), "version": 3})
    with pytest.raises(ValueError, match="margin"):
        SlideColour((60.0, 150.0, 110.0), (12.0, 3.5, 4.0), margin=-1)
    rimless = SlideColour((60.0, 150.0, 110.0), (12.0, 3.5, 4.0), margin=8)
    assert SlideColour.from_record(rimless.to_record()) == rimless
    # a version 1 record (before the margin) measured the whole cell
    first = {k: v for k, v in rimless.to_record().items() if k != "margin"} | {"version": 1}
    assert SlideColour.from_record(first) == replace(rimless, margin=0, version=1)


def test_a_slide_sample_is_evenly_spaced_and_the_same_whatever_else_a_run_holds():
    items = [f"crop_{i:03d}" for i in range(100)]
    chosen = slide_sample(items, 5)
    assert chosen == ["crop_000", "crop_025", "crop_050", "crop_074", "crop_099"]
    assert slide_sample(items[:3], 5) == items[:3]
    with pytest.raises(ValueError):
        slide_sample(items, 0)


def test_the_shift_suite_measures_each_shifted_slide_again_before_normalising_it():
    """A slide darkened as a whole is measured darkened, so normalising it gives nearly
    the unshifted slide's normalised crops; blur is not a colour change and stays."""
    from export.data import discover_dataset
    from export.shift import shifted_inputs, shifted_slide_stats

    samples = discover_dataset(CNMC)
    donor = samples[0].patient
    paths = sorted(str(s.path) for s in samples if s.patient == donor)
    colour = SlideColour.fitted([colour_stats([read_bgr(p) for p in paths])])
    measured = shifted_slide_stats(paths, None, workers=2)
    rimless = shifted_slide_stats(paths, None, workers=2, margin=EDGE_MARGIN)
    plain_rimless = colour_stats([read_bgr(p) for p in paths], EDGE_MARGIN)
    assert np.allclose(rimless["none"][0], plain_rimless[0])
    assert np.allclose(rimless["none"][1], plain_rimless[1])
    assert set(measured) >= {"none", "brightness -15%", "blur sigma 2"}
    darker = measured["brightness -15%"][0][0]
    assert darker < measured["none"][0][0] - 3  # the darkened slide's lightness, measured
    recipe = Recipe()
    inputs = shifted_inputs(paths, recipe, 2, None, colour, [measured] * len(paths))
    plain = shifted_inputs(paths, recipe, 2)
    expected = stored_uint8(
        preprocess(
            colour.normalise(read_image(paths[0], order="bgr"), measured["none"]), recipe, "bgr"
        )
    )
    assert np.array_equal(inputs["none"][0], expected)
    gap = lambda a, b: np.abs(a.astype(int) - b).mean()  # noqa: E731
    # normalised, the darkened slide is close to the unshifted one; plain, it is not
    assert (
        gap(inputs["brightness -15%"], inputs["none"])
        < gap(plain["brightness -15%"], plain["none"]) / 3
    )
    assert gap(inputs["blur sigma 2"], inputs["none"]) > 1


def test_leaving_out_the_cells_rim_keeps_the_statistics_under_blur_and_compression():
    """Blur and JPEG mix the rim with the black background: the whole cell's chroma spread
    grows (so the transfer would fade the cell); without the rim it holds."""
    from export.augment import jpeg_roundtrip

    crops = [crop for donor in donor_crops().values() for crop in donor]
    damaged = {
        "blur sigma 2": [cv2.GaussianBlur(c, (0, 0), 2.0) for c in crops],
        "jpeg quality 75": [jpeg_roundtrip(c, 75) for c in crops],
    }
    whole, rimless = colour_stats(crops), colour_stats(crops, EDGE_MARGIN)
    assert (rimless[1] < whole[1]).all()  # the rim is where the spread came from
    blurred = colour_stats(damaged["blur sigma 2"])
    assert (blurred[1][1:] > 1.2 * whole[1][1:]).all()
    for images in damaged.values():
        mean, spread = colour_stats(images, EDGE_MARGIN)
        assert np.abs(mean - rimless[0]).max() < 1.5
        assert np.allclose(spread[1:], rimless[1][1:], rtol=0.08)
    mask = cell_mask(crops[0], EDGE_MARGIN)
    assert mask.sum() < cell_mask(crops[0]).sum() and (mask <= cell_mask(crops[0])).all()
