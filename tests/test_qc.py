"""Quality control: crops the model cannot judge get no label, and the reason.

The synthetic unusable crops are generated from a real fixture crop; each must come back
with status ``qc`` (never ``ok`` with a label) under the embedded model's limits.
"""

from __future__ import annotations

import colorsys
import json
from dataclasses import replace

import cv2
import numpy as np
import pytest
from conftest import SHARED_CNMC, TINY_3CLASS, fixture_images, read_bgr, rows, run

from smearscan.exitstatus import ExitStatus
from smearscan.inference import load_classifier
from smearscan.modelfile import KEY_QC, default_model_path
from smearscan.preprocess import Recipe, framed_and_resized, gray_of
from smearscan.qc import FITTED, QCFeatures, QualityControl, fit, measure


def _two_cells(image: np.ndarray) -> np.ndarray:
    small = cv2.resize(image, None, fx=0.55, fy=0.55, interpolation=cv2.INTER_AREA)
    out = np.zeros_like(image)
    h, w = small.shape[:2]
    out[:h, :w] = small
    out[-h:, -w:] = np.maximum(out[-h:, -w:], small)
    return out


def _speck(image: np.ndarray) -> np.ndarray:
    out = np.zeros_like(image)
    cy, cx = image.shape[0] // 2, image.shape[1] // 2
    out[cy - 6 : cy + 6, cx - 6 : cx + 6] = (120, 40, 110)
    return out


def unusable_crops() -> dict[str, tuple[np.ndarray, str]]:
    """name -> (BGR crop, a word its reason must contain)."""
    cell = read_bgr(fixture_images()[0])
    rng = np.random.default_rng(0)
    return {
        "black": (np.zeros_like(cell), "no cell"),
        "white": (np.full_like(cell, 255), "fills the frame"),
        "uniform": (np.full_like(cell, 128), "fills the frame"),
        "noise": (rng.integers(0, 256, cell.shape, dtype=np.uint8), "fills the frame"),
        "grayscale": (
            cv2.cvtColor(cv2.cvtColor(cell, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR),
            "grayscale",
        ),
        "speck": (_speck(cell), "too small"),
        "heavy_blur": (cv2.GaussianBlur(cell, (0, 0), 6), "out of focus"),
        "burnt": (np.clip(cell.astype(np.int32) * 4, 0, 255).astype(np.uint8), "too bright"),
        "two_cells": (_two_cells(cell), "cell-sized objects"),
    }


@pytest.fixture
def unusable_tree(tmp_path):
    root = tmp_path / "unusable" / "slide"
    root.mkdir(parents=True)
    for name, (image, _) in unusable_crops().items():
        cv2.imwrite(str(root / f"{name}.png"), image)
    for index, source in enumerate(fixture_images()[:4]):
        cv2.imwrite(str(root / f"real_{index}.png"), read_bgr(source))
    return root.parent


def test_every_synthetic_unusable_crop_is_caught_with_its_reason(unusable_tree, tmp_path):
    out = tmp_path / "r.csv"
    result = run(["scan", str(unusable_tree), "--out", str(out)], expect=ExitStatus.SOME_UNUSABLE)
    table = {row["path"].rsplit("/", 1)[1].removesuffix(".png"): row for row in rows(out)}
    for name, (_, word) in unusable_crops().items():
        row = table[name]
        assert row["status"] == "qc", (name, row)
        assert row["label"] == "" and row["p_all"] == "" and word in row["reason"], (name, row)
    for index in range(4):
        assert table[f"real_{index}"]["status"] == "ok"
    assert "9 failed QC" in result.log.strip().splitlines()[-1]
    summary = json.loads(out.with_name("r.summary.json").read_text())
    assert summary["overall"]["qc_failed"] == 9
    assert summary["overall"]["qc_rate"] == pytest.approx(9 / 13, abs=1e-4)
    assert sum(summary["qc_reasons"].values()) >= 9
    # the HTML lists them by reason, with thumbnails
    page = out.with_name("r.html").read_text()
    assert "failed quality control (9)" in page and "grayscale or colourless" in page


def test_qc_off_restores_the_old_behaviour_and_says_so(unusable_tree, tmp_path):
    out = tmp_path / "r.csv"
    run(["scan", str(unusable_tree), "--out", str(out), "--qc", "off"])
    table = rows(out)
    assert all(r["status"] == "ok" and r["label"] for r in table)
    summary = json.loads(out.with_name("r.summary.json").read_text())
    assert summary["quality_control"].startswith("off (--qc off)")


def test_strict_refuses_at_least_what_default_refuses(unusable_tree, tmp_path):
    classifier = load_classifier(device="cpu")
    text = classifier.info.metadata[KEY_QC]
    default = QualityControl.from_metadata(text, "default")
    strict = QualityControl.from_metadata(text, "strict")
    assert default is not None and strict is not None
    for name, (low, high) in default.ranges.items():
        s_low, s_high = strict.ranges[name]
        assert low is None or s_low is None or s_low >= low, name
        assert high is None or (s_high is not None and s_high <= high), name


def test_qc_failures_are_left_out_of_the_slide_call(tmp_path):
    """A slide of 10 real normal cells and 10 burnt crops: the burnt ones neither count as
    cells nor move the call; with only 9 usable cells the call is 'insufficient'."""
    normal = [p for p in fixture_images() if p.parent.name == "hem"]
    slide = tmp_path / "slides" / "donor"
    slide.mkdir(parents=True)
    for index in range(10):
        cell = read_bgr(normal[index % len(normal)])
        cv2.imwrite(str(slide / f"cell_{index:02d}.png"), np.rot90(cell, index % 4))
        cv2.imwrite(str(slide / f"burnt_{index:02d}.png"), np.full_like(cell, 255))
    out = tmp_path / "r.csv"
    run(["scan", str(tmp_path / "slides"), "--out", str(out)], expect=ExitStatus.SOME_UNUSABLE)
    stats = json.loads(out.with_name("r.summary.json").read_text())["slides"]["donor"]
    assert stats["cells"] == 10 and stats["qc_failed"] == 10
    assert stats["call"] in ("not-flagged", "all-suspect")
    assert stats["counts"]["all"] + stats["counts"]["hem"] == 10
    (slide / "cell_00.png").unlink()
    run(["scan", str(tmp_path / "slides"), "--out", str(out)], expect=ExitStatus.SOME_UNUSABLE)
    stats = json.loads(out.with_name("r.summary.json").read_text())["slides"]["donor"]
    assert stats["cells"] == 9 and stats["call"] == "insufficient"


def test_an_old_model_without_qc_metadata_runs_with_a_warning(tmp_path, unusable_tree):
    out = tmp_path / "r.csv"
    result = run(["scan", str(unusable_tree), "--out", str(out), "--model", str(TINY_3CLASS)])
    assert "quality control is off" in result.log
    assert all(r["status"] == "ok" for r in rows(out))


def test_limits_round_trip_through_metadata():
    features = []
    for path in fixture_images():
        image = read_bgr(path)
        gray = gray_of(image, "bgr")
        from smearscan.preprocess import Recipe

        features.append(measure(gray, framed_and_resized(image, Recipe(), "bgr", gray), 12))
    metadata = fit(features, "24 fixture crops")
    text = json.dumps(metadata)
    control = QualityControl.from_metadata(text, "default")
    assert control is not None and QualityControl.from_metadata(text, "off") is None
    assert metadata["crops"] == 24 and set(metadata["limits"]) == {"default", "strict"}
    assert all(control.reasons(f) == [] for f in features)  # its own crops pass
    assert QualityControl.from_metadata(None, "default") is None


def _reference_features(gray: np.ndarray, resized: np.ndarray) -> tuple:
    """The QC features (measurement version 3) written plainly: numpy, default labelling,
    two 3x3 erosions, per-pixel masks, the standard library's HSV hue."""
    small = (gray[::8, ::8] > 12).astype(np.uint8)
    count, labels = cv2.connectedComponents(small, connectivity=8)
    areas = np.bincount(labels.ravel(), minlength=count)[1:]
    largest = int(areas.max())
    grey = cv2.cvtColor(resized, cv2.COLOR_RGB2GRAY)
    cell = grey > 12
    mean_colour = resized[cell].astype(np.float64).mean(axis=0)
    inner = cv2.erode(
        cv2.erode(cell.astype(np.uint8), np.ones((3, 3), np.uint8)), np.ones((3, 3), np.uint8)
    ).astype(bool)
    laplacian = cv2.Laplacian(grey, cv2.CV_32F, ksize=3)[inner].astype(np.float64)
    return (
        largest * 64.0,
        int((areas >= 0.25 * largest).sum()),
        mean_colour.max() - mean_colour.min(),
        float(mean_colour @ np.array([0.299, 0.587, 0.114])),
        ((resized >= 250).any(axis=2) & cell).sum() / cell.sum(),
        laplacian.var() if inner.any() else 0.0,  # a speck has no interior
        colorsys.rgb_to_hsv(*(mean_colour / 255.0))[0] * 360.0,
    )


def _burnt(image: np.ndarray) -> np.ndarray:
    return np.clip(image.astype(np.int32) * 3, 0, 255).astype(np.uint8)


def test_the_fast_measurement_matches_a_plain_reference():
    """The limits in the model file were fitted with this measurement: a faster one must
    give the same features (synthetic two-cell, speck and burnt crops included)."""
    images = [read_bgr(p) for p in fixture_images()]
    images += [_two_cells(images[0]), _speck(images[1]), _burnt(images[2])]
    for image in images:
        gray = gray_of(image, "bgr")
        resized = framed_and_resized(image, Recipe(), "bgr", gray)
        f = measure(gray, resized, 12)
        expected = _reference_features(gray, resized)
        got = (f.area, f.objects, f.chroma, f.brightness, f.clipped, f.focus, f.hue)
        assert got[:2] == expected[:2]
        assert np.allclose(got[2:], expected[2:], rtol=1e-4, atol=1e-6), (got, expected)
    assert measure(gray, resized, 12).clipped > 0.05  # the burnt crop exercised the share


def test_limits_fitted_with_the_first_measurement_still_apply_with_a_warning(tmp_path):
    """A model exported before measurement version 2 keeps its QC (its limits are close to
    version 2's), says so, and a version from a newer smearscan is refused."""
    import onnx

    from smearscan.qc import QC_VERSION, QCError

    model = onnx.load(str(default_model_path()))
    entry = next(p for p in model.metadata_props if p.key == KEY_QC)
    limits = json.loads(entry.value)
    limits["version"] = 1
    entry.value = json.dumps(limits)
    old = tmp_path / "old-qc.onnx"
    onnx.save(model, str(old))
    crops = tmp_path / "crops" / "slide"
    crops.mkdir(parents=True)
    cell = read_bgr(fixture_images()[0])
    cv2.imwrite(str(crops / "black.png"), np.zeros_like(cell))
    cv2.imwrite(str(crops / "cell.png"), cell)
    out = tmp_path / "r.csv"
    result = run(
        ["scan", str(crops.parent), "--out", str(out), "--model", str(old)],
        expect=ExitStatus.SOME_UNUSABLE,
    )
    assert "fitted with measurement version 1" in result.log
    table = {row["path"].rsplit("/", 1)[1]: row["status"] for row in rows(out)}
    assert table == {"black.png": "qc", "cell.png": "ok"}
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert "version 1" in json.dumps(summary)
    limits["version"] = QC_VERSION + 1
    with pytest.raises(QCError, match="upgrade smearscan"):
        QualityControl.from_metadata(json.dumps(limits), "default")


def test_deep_images_are_scaled_by_their_real_bit_depth(tmp_path):
    """12-bit data in a 16-bit PNG decodes to the same picture as the 8-bit original, not to
    an almost black image that QC (or the model) would misjudge."""
    from smearscan.preprocess import read_image

    cell = read_bgr(fixture_images()[0])
    twelve_bit = (cell.astype(np.uint16) << 4) | (cell.astype(np.uint16) >> 4)
    path = tmp_path / "deep12.png"
    cv2.imwrite(str(path), twelve_bit)
    decoded = read_image(path, order="bgr")
    assert np.abs(decoded.astype(int) - cell).max() <= 1
    out = tmp_path / "r.csv"
    run(["scan", str(path), "--out", str(out)])
    assert rows(out)[0]["status"] == "ok"


@pytest.mark.shared
@pytest.mark.skipif(not SHARED_CNMC.is_dir(), reason="needs ../shared/data/cnmc")
def test_real_crops_pass_at_the_documented_rate():
    """At most 0.5 % of the 7,529 real training crops may fail the default QC (the model
    card documents 3). The scan's own decode-QC-preprocess stage with the shipped model's
    limits, without inference: the QC decision does not depend on it."""
    from concurrent.futures import ThreadPoolExecutor

    from smearscan.inference import load_classifier
    from smearscan.runner import ScanRequest, plan
    from smearscan.stages import STATUS_QC, prepare_item

    request = ScanRequest(inputs=[SHARED_CNMC])
    config = plan(request, load_classifier(device="cpu")).config
    assert config.qc is not None and config.qc.mode == "default"
    items = list(request.found())
    assert len(items) == 7529
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = [result for result, _ in pool.map(lambda i: prepare_item(i, config), items)]
    failed = [r.reason for r in results if r.status == STATUS_QC]
    assert all(r.status in ("ok", STATUS_QC) for r in results)
    assert len(failed) / len(results) <= 0.005, failed


def test_size_limits_cover_the_validated_magnifications_and_still_refuse_far_ones():
    """Issue 21: cells at 1.25x the training magnification keep their labels (shift suite)
    but a quarter were refused as 'cell too large'; at 2x they are still refused."""
    from export.augment import rescale

    info = load_classifier(device="cpu").info
    qc = QualityControl.from_metadata(info.metadata[KEY_QC], "default")
    assert qc is not None

    def refused(scale: float) -> int:
        count = 0
        for path in fixture_images():
            image = rescale(read_bgr(path), scale)
            gray = gray_of(image, "bgr")
            resized = framed_and_resized(image, info.recipe, "bgr", gray)
            count += bool(qc.reasons(measure(gray, resized, info.recipe.background_threshold)))
        return count

    assert refused(0.8) == refused(1.25) == 0
    assert refused(2.0) >= len(fixture_images()) // 2


def test_brightness_limits_cover_the_validated_exposures_and_still_refuse_dark_crops():
    """Issue 22.5: the shift suite validates gamma 1.25 (labels kept), but QC refused 10.9 %
    of real crops there as 'too dark'; far darker exposures must still be refused."""
    from export.shift import photometric

    reasons = shipped_default_reasons()

    crops = [read_bgr(p) for p in fixture_images()]
    for gain, gamma in [(0.85, 1.0), (1.15, 1.0), (1.0, 0.8), (1.0, 1.25)]:
        assert [reasons(photometric(c, gain=gain, gamma=gamma)) for c in crops] == [[]] * len(
            crops
        ), (gain, gamma)
    for gain, gamma in [(1.0, 3.0), (0.5, 1.0), (0.6, 1.5)]:  # far darker: still refused
        assert all(reasons(photometric(c, gain=gain, gamma=gamma)) for c in crops), (gain, gamma)


def shipped_default_reasons():
    """The shipped model's default QC, as a function from a BGR crop to its refusal reasons."""
    info = load_classifier(device="cpu").info
    qc = QualityControl.from_metadata(info.metadata[KEY_QC], "default")
    assert qc is not None

    def reasons(image) -> list[str]:
        gray = gray_of(image, "bgr")
        resized = framed_and_resized(image, info.recipe, "bgr", gray)
        return qc.reasons(measure(gray, resized, info.recipe.background_threshold))

    return reasons


def test_focus_limits_cover_the_validated_focus_shifts_and_still_refuse_heavy_blur():
    """Issue 22.5: the shift suite validates the unsharp mask and blur sigma 1 (labels
    kept), but QC refused 2.9 % and 1.0 % of real crops there; a heavy blur must still be
    refused."""
    from export.shift import FOCUS_SHIFTS, shifts

    info = load_classifier(device="cpu").info
    metadata = json.loads(info.metadata[KEY_QC])
    assert tuple(metadata["shifted"]) == FOCUS_SHIFTS
    reasons = shipped_default_reasons()

    crops = [read_bgr(p) for p in fixture_images()]
    for name in FOCUS_SHIFTS:
        shift = shifts(0)[name]
        assert [reasons(shift(c)) for c in crops] == [[]] * len(crops), name
    # the Laplacian's variance is a weak blur detector (a blurred outline keeps it up), so
    # only the synthetic heavy blur is asserted, as before the limits widened
    heavy_blur, _ = unusable_crops()["heavy_blur"]
    assert any(r.startswith("out of focus") for r in reasons(heavy_blur))


def test_fitting_under_shifts_widens_only_the_default_focus_range():
    rng = np.random.default_rng(0)
    features = [
        QCFeatures(30_000.0, 0.2, 1, 60.0, 80.0, 0.0, float(f), 290.0)
        for f in rng.uniform(50, 150, 400)
    ]
    sharpened = [replace(f, focus=f.focus * 3) for f in features]
    plain = fit(features, "plain")
    widened = fit(features, "widened", shifted={"unsharp mask": sharpened})
    assert "shifted" not in plain and set(widened["shifted"]) == {"unsharp mask"}
    assert widened["limits"]["strict"] == plain["limits"]["strict"]
    for name in FITTED:
        if name != "focus":
            assert widened["limits"]["default"][name] == plain["limits"]["default"][name]
    low, high = widened["limits"]["default"]["focus"]
    assert low == plain["limits"]["default"]["focus"][0]
    assert high == widened["shifted"]["unsharp mask"]["focus"]["p99.95"]
    assert high > plain["limits"]["default"]["focus"][1] * 2


def test_qc_sees_the_stain_colour_and_keeps_the_validated_hue_shift():
    """Issue 22: crops of another stain colour (hue turned by 120 degrees) passed every check
    and got labels at chance; the shift suite's validated hue shift (8 degrees) must pass."""
    from export.shift import hue_shift

    info = load_classifier(device="cpu").info
    qc = QualityControl.from_metadata(info.metadata[KEY_QC], "default")
    assert qc is not None and "hue" in qc.ranges

    def reasons(image):
        gray = gray_of(image, "bgr")
        resized = framed_and_resized(image, info.recipe, "bgr", gray)
        return qc.reasons(measure(gray, resized, info.recipe.background_threshold))

    crops = [read_bgr(p) for p in fixture_images()]
    assert all(reasons(hue_shift(c, 8)) == [] for c in crops)
    turned = [reasons(hue_shift(c, 120)) for c in crops]
    assert all(
        any(r.startswith("stain colour unlike the training crops") for r in found)
        for found in turned
    )


def _with_qc(tmp_path, change, drop_output: bool = False):
    """The shipped model file with its QC metadata changed by ``change(dict)`` (and
    without its embedding-distance output, if asked)."""
    import onnx

    model = onnx.load(str(default_model_path()))
    entry = next(p for p in model.metadata_props if p.key == KEY_QC)
    limits = json.loads(entry.value)
    change(limits)
    entry.value = json.dumps(limits)
    if drop_output:
        kept = [o for o in model.graph.output if o.name != "embedding_distance"]
        del model.graph.output[:]
        model.graph.output.extend(kept)
    path = tmp_path / "changed.onnx"
    onnx.save(model, str(path))
    return path


def test_the_embedding_distance_refuses_what_the_network_has_not_seen_the_like_of(tmp_path):
    """Issue 22.5: the check after inference. With the limit set between the fixture crops'
    own distances, those above it get status ``qc``, the reason and no label; the others
    keep exactly the probabilities a scan without the check gives."""
    from smearscan.preprocess import load_and_preprocess

    classifier = load_classifier(device="cpu")
    paths = fixture_images()
    images = np.stack([load_and_preprocess(p, classifier.info.recipe) for p in paths])
    _, distances = classifier.run(images, distances=True)
    assert distances is not None and np.isfinite(distances).all()
    shipped = QualityControl.from_metadata(classifier.info.metadata[KEY_QC], "default")
    assert shipped is not None and shipped.max_embedding_distance is not None
    assert (distances < shipped.max_embedding_distance).all()  # real crops pass
    shown = f"embedding           - .. {shipped.max_embedding_distance:.4g}"
    assert shown in run(["model", "info"]).output
    limit = float(np.median(distances))

    def lower(limits):
        limits["embedding"]["limits"]["default"] = limit

    model = _with_qc(tmp_path, lower)
    crops = tmp_path / "crops" / "slide"
    crops.mkdir(parents=True)
    for path in paths:
        cv2.imwrite(str(crops / f"{path.stem}.png"), read_bgr(path))
    checked, plain = tmp_path / "checked.csv", tmp_path / "plain.csv"
    run(["scan", str(crops.parent), "--out", str(plain)])
    result = run(
        ["scan", str(crops.parent), "--out", str(checked), "--model", str(model)],
        expect=ExitStatus.SOME_UNUSABLE,
    )
    assert "with the embedding distance" in json.dumps(
        json.loads(checked.with_suffix(".summary.json").read_text())["quality_control"]
    )
    before = {row["path"].rsplit("/", 1)[1]: row for row in rows(plain)}
    after = {row["path"].rsplit("/", 1)[1]: row for row in rows(checked)}
    for path, distance in zip(paths, distances, strict=True):
        row = after[f"{path.stem}.png"]
        if distance > limit:
            assert row["status"] == "qc" and row["label"] == "" and row["p_all"] == ""
            assert row["reason"].startswith("unlike every training crop to the model")
        else:
            assert row == before[f"{path.stem}.png"]
    refused = int((distances > limit).sum())
    assert sum(row["status"] == "qc" for row in after.values()) == refused > 0
    assert f"{refused} failed QC" in result.log


def test_a_model_that_asks_for_the_embedding_distance_must_compute_it(tmp_path, slide_tree):
    """QC limits naming an output the graph lacks are refused with the reason, not skipped;
    ``--qc off`` still scans."""
    model = _with_qc(tmp_path, lambda limits: None, drop_output=True)
    out = tmp_path / "r.csv"
    result = run(
        ["scan", str(slide_tree), "--out", str(out), "--model", str(model)],
        expect=ExitStatus.ERROR,
    )
    assert "has no 'embedding_distance' output" in result.log
    assert not out.exists()
    run(["scan", str(slide_tree), "--out", str(out), "--model", str(model), "--qc", "off"])
    assert len(rows(out)) == 8


@pytest.mark.parametrize(
    "embedding",
    [
        {"output": "embedding_distance", "limits": {"default": -1.0, "strict": 1.0}},
        {"output": "embedding_distance", "limits": {"default": float("nan"), "strict": 1.0}},
        {"output": "embedding_distance", "limits": {"strict": 1.0}},
        {"output": "logits", "limits": {"default": 5.0, "strict": 1.0}},
        {"output": "embedding_distance", "limits": {"default": 0, "strict": 1.0}},
        "7",
    ],
)
def test_embedding_limits_are_validated_when_the_model_loads(embedding):
    from smearscan.qc import QCError

    metadata = json.loads(load_classifier(device="cpu").info.metadata[KEY_QC])
    metadata["embedding"] = embedding
    with pytest.raises(QCError):
        QualityControl.from_metadata(json.dumps(metadata), "default")
    assert QualityControl.from_metadata(json.dumps(metadata), "off") is None
