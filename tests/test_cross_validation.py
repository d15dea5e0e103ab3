"""Cross-validation on the committed fixture crops (TensorFlow: the [train] extra): one tiny
cross-validation (``tiny_cv``) shared by the out-of-fold, shift-suite, rotation, promotion,
export, fine-tuning and distillation tests. Its own file, so that the test workers share the
training: ``test_train_export.py`` holds the single-run tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import CNMC, TINY, read_bgr, require_training_stack, rows, run, train_unchanged_child

require_training_stack()
pytestmark = pytest.mark.train

from export import cv, shift, summarize_runs, to_onnx, train  # noqa: E402
from smearscan.exitstatus import ExitStatus  # noqa: E402
from smearscan.inference import load_classifier  # noqa: E402


@pytest.fixture(scope="module")
def tiny_cv(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cv") / "cv-tiny"
    assert (
        cv.main(
            [
                "--data",
                str(CNMC),
                "--out",
                str(out),
                "--epochs",
                "1",
                *TINY,
                "--cache-dir",
                str(out.parent / "cache"),
            ]
        )
        == 0
    )
    return out


def test_cross_validation_predicts_every_donor_out_of_fold(tiny_cv):
    oof = rows(tiny_cv / "oof_predictions.csv")
    assert len(oof) == 24
    donors = {r["patient"]: r["fold"] for r in oof}
    assert len(donors) == 6 and set(donors.values()) == {"0", "1", "2"}
    for fold in range(3):
        config = json.loads((tiny_cv / f"fold_{fold}" / "config.json").read_text())
        held_out = {p for p, f in donors.items() if f == str(fold)}
        assert held_out == set(config["split"]["val_patients"])
        assert not held_out & set(config["split"]["train_patients"])
    report = json.loads((tiny_cv / "cv.json").read_text())
    fitted = report["cross_fitted"]
    assert fitted["donors"] == 6 and len(fitted["donor_rows"]) == 6
    assert len(report["per_fold_rules"]) == 3
    assert 0 <= fitted["macro_specificity"] <= 1 and fitted["worst_negative_donor"]
    assert "| donor | truth | fold |" in (tiny_cv / "cv.md").read_text()
    # every run says how far it reads the cells' size, from the crops it was scored on
    reading = report["size_reading"]
    assert set(reading["classes"]) == {"all", "hem"}
    assert sum(c["cells"] for c in reading["classes"].values()) == len(
        rows(tiny_cv / "oof_predictions.csv")
    )
    assert 0 <= reading["donor_weighted_roc_auc"] <= 1
    assert "once the classes are also matched in area" in (tiny_cv / "cv.md").read_text()


def test_predictions_of_crops_outside_data_leave_only_the_size_reading_out(
    tiny_cv, tmp_path, caplog
):
    """An averaged report over a --data that lacks a predicted crop still writes every other
    figure; the size reading, which needs each crop's area, is left out with a warning."""
    data = tmp_path / "cnmc"
    shutil.copytree(CNMC, data)
    predicted = sorted(Path(r["path"]).name for r in rows(tiny_cv / "oof_predictions.csv"))
    next(data.rglob(predicted[0])).unlink()
    out = tmp_path / "averaged"
    argv = ["--data", str(data), "--folds", "3", "--average-of", str(tiny_cv), str(tiny_cv)]
    with caplog.at_level("WARNING", logger="export.cv"):
        assert cv.main([*argv, "--out", str(out), "--quiet"]) == 0
    assert "size reading left out" in caplog.text
    report = json.loads((out / "cv.json").read_text())
    assert "size_reading" not in report and report["cross_fitted"]["donors"] == 6


def test_recipes_table_ranks_by_shortfall_from_the_targets(tiny_cv, capsys):
    assert summarize_runs.target_shortfall(0.85, 0.95, 0.91) == 0.0
    assert summarize_runs.target_shortfall(0.80, 0.85, 0.70) == pytest.approx(0.30)
    assert summarize_runs.main(["--recipes", str(tiny_cv)]) == 0
    table = capsys.readouterr().out
    header, _, row = table.strip().splitlines()[-3:]
    assert "shortfall from targets" in header and row.startswith("| `cv-tiny` |")
    report = json.loads((tiny_cv / "cv.json").read_text())
    shifts = json.loads((tiny_cv / "shift.json").read_text())["shifts"]
    expected = summarize_runs.target_shortfall(
        report["cross_fitted"]["macro_specificity"],
        min(shifts["scale 0.8x"]["agreement"], shifts["scale 1.25x"]["agreement"]),
        report["cross_fitted"]["pooled"]["weighted_f1"],
    )
    assert f"| {expected:.3f} |" in row


def test_an_interrupted_cv_resumes_with_the_same_recipe_only(tiny_cv, tmp_path, caplog):
    """Rerunning the same command reuses finished folds (a killed run resumes); other
    training options refuse rather than mix recipes in one report."""
    again = tmp_path / "cv-again"
    shutil.copytree(tiny_cv, again)
    shutil.rmtree(again / "fold_2")
    before = (again / "fold_0" / "model.keras").stat().st_mtime_ns
    base = [
        "--data",
        str(CNMC),
        "--out",
        str(again),
        "--epochs",
        "1",
        *TINY,
        "--no-shift",
        "--cache-dir",
        str(tiny_cv.parent / "cache"),
    ]
    with caplog.at_level("INFO", logger="export.cv"):
        assert cv.main(base) == 0
    assert "fold 0: reusing" in caplog.text and "fold 1: reusing" in caplog.text
    assert (again / "fold_0" / "model.keras").stat().st_mtime_ns == before
    assert (again / "fold_2" / "metrics.json").is_file()
    assert len(rows(again / "oof_predictions.csv")) == len(rows(tiny_cv / "oof_predictions.csv"))
    assert cv.main([*base, "--ema", "0.5"]) == 2


def test_the_shift_suite_covers_every_shift_and_checks_the_targets(tiny_cv):
    report = json.loads((tiny_cv / "shift.json").read_text())
    names = set(report["shifts"])
    expected = {"none", "scale 0.8x", "scale 1.25x", "scale 1.4x", "blur sigma 1"}
    expected |= {"blur sigma 2", "unsharp mask", "brightness +15%", "brightness -15%"}
    expected |= {"gamma 0.8", "gamma 1.25", "stain jitter", "hue +8 degrees"}
    assert expected | {"jpeg quality 75", "donor colour swap"} == names
    assert "same slide calls" in report["targets"]["donor colour swap"]["rule"]
    assert report["shifts"]["none"]["agreement"] == 1.0
    assert report["targets"]["scale 0.8x"]["rule"].startswith("agreement >= 0.9")
    assert "| shift |" in (tiny_cv / "shift.md").read_text()
    import cv2
    from conftest import fixture_images

    cell = read_bgr(fixture_images()[0])
    smaller = shift.rescale(cell, 0.8)
    assert smaller.shape == cell.shape
    area = lambda im: int((im.max(axis=2) > 12).sum())  # noqa: E731
    assert area(smaller) == pytest.approx(area(cell) * 0.64, rel=0.05)
    assert (shift.photometric(cell, 1.15)[cell.max(axis=2) <= 12] == 0).all()
    compressed = shift.jpeg_roundtrip(cell, 75)
    assert compressed.shape == cell.shape
    assert 0 < np.abs(compressed.astype(int) - cell).mean() < 5  # lossy, but the same cell
    # the colour swap moves a donor's cell statistics onto the target's, background black
    crops = [read_bgr(p) for p in fixture_images()]
    source, target = shift.colour_stats(crops[:6]), shift.colour_stats(crops[12:18])
    swapped = [shift.colour_transfer(c, source, target) for c in crops[:6]]
    mean, spread = shift.colour_stats(swapped)
    assert np.abs(mean - target[0]).max() < 1.5 < np.abs(source[0] - target[0]).max()
    assert np.allclose(spread, target[1], rtol=0.15)
    assert all((s[c.max(axis=2) <= 12] == 0).all() for s, c in zip(swapped, crops, strict=False))
    del cv2


def test_rotation_consistency_compares_each_view_with_the_eight_view_mean(tiny_cv):
    """Issue 26.5: per flip/rotation, how many labels agree with the eight-view mean's."""
    from export import rotation

    written = json.loads((tiny_cv / "rotation.json").read_text())  # by export.cv itself
    assert rotation.main([str(tiny_cv), "--data", str(CNMC), "--per-donor", "4"]) == 0
    report = json.loads((tiny_cv / "rotation.json").read_text())
    # the same crops (the fixture has 4 a donor), so the same figures
    assert {**report, "crops_per_donor": 40} == written
    assert report["crops"] == 24 and len(report["view_agreement"]) == 8
    assert report["plain_view_agreement"] == report["view_agreement"][0]
    assert 0 <= report["all_views_agree"] <= report["worst_view_agreement"] <= 1
    assert report["mean_abs_difference"] > 0  # an untrained network is not symmetric
    assert 0 <= report["plain_roc_auc"] <= 1 and 0 <= report["eight_view_roc_auc"] <= 1


def test_a_promoted_cv_folder_exports_as_one_ensemble_graph(tiny_cv, tmp_path, slide_tree):
    """What ``export/default_model`` holds (a promoted CV run) exports the shipped way."""
    from export import promote

    kept = tmp_path / "default_model"
    assert promote.main([str(tiny_cv), "--into", str(kept)]) == 0
    assert promote.main([str(tmp_path), "--into", str(tmp_path / "nothing")]) == 2
    for fold in ("fold_0", "fold_1", "fold_2"):
        weights = kept / fold / "model.keras"
        assert 0 < weights.stat().st_size <= (tiny_cv / fold / "model.keras").stat().st_size
    assert (kept / "oof_predictions.csv").read_bytes() == (
        tiny_cv / "oof_predictions.csv"
    ).read_bytes()
    model = tmp_path / "ensemble.onnx"
    assert to_onnx.main([str(kept), "--out", str(model), "--parity-images", "6"]) == 0
    classifier = load_classifier(model, device="cpu")
    ensemble = classifier.info.json_field("smearscan.ensemble")
    assert ensemble["members"] == 3 and len(ensemble["member_sha256"]) == 3
    report = json.loads((tiny_cv / "cv.json").read_text())
    assert classifier.temperature == pytest.approx(
        round(report["rules_on_all_donors"]["temperature"], 4)
    )
    metrics = classifier.info.json_field("smearscan.metrics")
    assert "out_of_fold" in metrics and "cross-validation" in metrics["evaluated_on"]
    assert classifier.info.json_field("smearscan.qc")["crops"] == 24  # every donor's crops
    out = tmp_path / "r.csv"
    run(
        ["scan", str(slide_tree), "--out", str(out), "--model", str(model)],
        expect=(0, ExitStatus.SOME_UNUSABLE),
    )
    summary = json.loads(out.with_name("r.summary.json").read_text())
    assert summary["decision"]["slide_rule"] == report["slide_rule"]


def test_one_network_on_every_donor_exports_with_the_cross_validations_rules(tiny_cv, tmp_path):
    """``--weights RUN`` (a lab's one-network model, and tests/fixtures/make_tiny_model.py):
    the cut-offs come from the cross-validation, the weights and the QC limits from the run
    that saw every donor, and the file says so (it once said "fold 0 validates")."""
    everyone = tmp_path / "all"
    args = ["--data", str(CNMC), "--out", str(everyone), "--epochs", "1", "--fold", "-1"]
    assert train.main([*args, *TINY, "--cache-dir", str(tiny_cv.parent / "cache")]) == 0
    model = tmp_path / "one.onnx"
    exported = [str(tiny_cv), "--weights", str(everyone), "--out", str(model)]
    assert to_onnx.main([*exported, "--parity-images", "6"]) == 0
    info = load_classifier(model, device="cpu").info
    assert info.json_field("smearscan.ensemble") is None
    training = info.json_field("smearscan.training_data")
    assert training["crops"] == 24 and training["donors"] == 6
    assert "one network trained on every donor" in training["split"]
    assert "validates" not in training["split"] and training["val_patients"] == []
    report = json.loads((tiny_cv / "cv.json").read_text())
    decision = info.json_field("smearscan.decision")
    assert decision["slide"]["rule"] == report["slide_rule"]
    assert "out-of-fold" in decision["fitted_on"]
    assert info.json_field("smearscan.qc")["crops"] == 24


def test_fine_tuning_a_cv_folder_starts_from_its_averaged_folds(tiny_cv, tmp_path):
    """``--init-from default`` names a CV folder like this one: the child starts from the
    fold models averaged in one graph (what ships) and exports as an ensemble."""
    child = tmp_path / "child"
    assert train_unchanged_child(tiny_cv, child, tiny_cv / "fold_0" / "cache") == 0
    config = json.loads((child / "config.json").read_text())
    assert config["parent"]["name"] == "cv-tiny" and config["parent"]["path"] == str(tiny_cv)
    import keras

    from export.keras_utils import all_layers

    child_model = keras.models.load_model(child / "model.keras")
    assert child_model.name == "ensemble_of_3"
    norms = [
        layer
        for layer in all_layers(child_model)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert norms and not any(layer.trainable for layer in norms)  # frozen by default
    fold_model = keras.models.load_model(tiny_cv / "fold_1" / "model.keras")
    member = child_model.get_layer("member_1")
    for mine, theirs in zip(member.weights, fold_model.weights, strict=True):
        assert np.abs(np.asarray(mine) - np.asarray(theirs)).max() < 1e-6
    model = tmp_path / "child.onnx"
    assert to_onnx.main([str(child), "--out", str(model), "--parity-images", "4"]) == 0
    info = load_classifier(model, device="cpu").info
    assert info.json_field("smearscan.ensemble")["members"] == 3
    assert info.json_field("smearscan.parent")["name"] == "cv-tiny"


def test_a_student_learns_from_the_teacher_that_never_saw_its_donors(tiny_cv, tmp_path, caplog):
    """Issue 26: distillation keeps the out-of-fold estimate honest (fold k's student learns
    only from the fold-k teacher) and a split whose teacher saw the validation donors is
    refused; the shipped student (--fold -1) learns from the fold models averaged."""
    import logging

    caplog.set_level(logging.INFO)
    base = [
        "--data",
        str(CNMC),
        "--epochs",
        "1",
        *TINY,
        "--distill-from",
        str(tiny_cv),
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    student = tmp_path / "student"  # shown the teacher's answer for the clean crop
    assert train.main([*base, "--out", str(student), "--fold", "1", "--distill-view", "clean"]) == 0
    config = json.loads((student / "config.json").read_text())
    assert config["args"]["distill_from"] == str(tiny_cv)
    assert config["args"]["distill_view"] == "clean"
    assert f"distilling from {tiny_cv / 'fold_1'} (weight 0.5, clean view)" in caplog.text
    assert (
        train.main([*base, "--out", str(tmp_path / "leak"), "--fold", "1", "--split-seed", "7"])
        == 2
    )
    assert "of this fold's validation donors" in caplog.text
    assert train.main([*base, "--out", str(tmp_path / "all"), "--fold", "-1"]) == 0
    assert "distilling from " + str(tiny_cv) + " " in caplog.text
    # several teachers (two seeds' folders): their fold-k models averaged in one graph
    from export.parents import load_teacher
    from smearscan.preprocess import Recipe

    val_patients = set(config["split"]["val_patients"])
    recipe = Recipe.from_json(json.dumps(config["recipe"]))
    teacher, taught = load_teacher(f"{tiny_cv},{tiny_cv}", 1, val_patients, recipe)
    assert taught == {"teacher": f"{tiny_cv / 'fold_1'},{tiny_cv / 'fold_1'}", "members": 2}
    crops = np.random.default_rng(0).random((3, *teacher.input_shape[1:]), dtype=np.float32)
    one, _ = load_teacher(str(tiny_cv), 1, val_patients, recipe)
    np.testing.assert_allclose(teacher(crops), one(crops), atol=1e-6)  # the same model twice
    caplog.clear()
    leaky = [*base[:-4], "--distill-from", f"{tiny_cv},{tiny_cv}", *base[-2:]]
    assert (
        train.main([*leaky, "--out", str(tmp_path / "l2"), "--fold", "1", "--split-seed", "7"]) == 2
    )
    assert "of this fold's validation donors" in caplog.text
