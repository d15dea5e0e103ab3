"""export.size_reading: how a run's P(positive) follows the cell's size, on real crops."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import CNMC, ROOT, SHARED_CNMC

pytest.importorskip("sklearn", reason="the training extra (pip install '.[train]')")

from export.donors import Predictions  # noqa: E402
from export.size_reading import area_matched_weights, cell_areas, size_reading  # noqa: E402

RUNS = ROOT / "export" / "ablation_runs"


def _predictions(labels: list[str], y: np.ndarray, positive_scores: np.ndarray) -> Predictions:
    probabilities = np.zeros((len(y), len(labels)))
    probabilities[:, 0] = positive_scores
    probabilities[:, 1] = 1 - positive_scores
    return Predictions(
        labels,
        [f"crop_{i}.webp" for i in range(len(y))],
        np.array([f"donor_{label}_{i % 3}" for i, label in enumerate(y)]),
        y,
        np.zeros(len(y), dtype=int),
        probabilities,
    )


def test_a_score_that_is_the_cells_size_is_read_as_size():
    paths = sorted(CNMC.rglob("*.webp"))
    areas = cell_areas(paths, workers=2)
    assert len(areas) == 24 and areas.min() > 1000  # a 450-px crop's cell, not the frame
    y = np.array([0 if path.parent.name == "all" else 1 for path in paths])
    by_size = (areas - areas.min()) / (areas.max() - areas.min())
    report = size_reading(_predictions(["all", "hem"], y, by_size), areas)
    assert report["positive_class"] == "all"
    for label in ("all", "hem"):
        assert report["classes"][label]["pooled_spearman"] == pytest.approx(1.0)
        assert report["classes"][label]["within_donor_spearman"] == pytest.approx(1.0)
    against = size_reading(_predictions(["all", "hem"], y, 1 - by_size), areas)
    assert against["classes"]["hem"]["within_donor_spearman"] == pytest.approx(-1.0)
    larger_all = np.mean([a > h for a in areas[y == 0] for h in areas[y == 1]])
    assert report["area_alone_roc_auc"] == pytest.approx(larger_all)
    # once the classes weigh the same in every area bin, a score that is the size ranks
    # them no better than chance would
    assert abs(report["area_matched_roc_auc"] - 0.5) < abs(report["donor_weighted_roc_auc"] - 0.5)


def test_area_matched_weights_leave_size_no_cue_and_every_class_one():
    rng = np.random.default_rng(0)
    patients = np.repeat([f"donor_{i}" for i in range(9)], 200)
    y = np.repeat([0, 0, 0, 1, 1, 1, 2, 2, 2], 200)  # three classes, three donors each
    areas = rng.normal(24_000, 5_000, size=len(y)) * np.where(y == 1, 1.5, 1.0)
    areas *= np.where(patients == "donor_7", 1.2, 1.0)  # one donor's cells larger
    from sklearn.metrics import roc_auc_score

    weights = area_matched_weights(patients, y, areas)
    assert (weights >= 0).all()
    for label in range(3):
        assert weights[y == label].sum() == pytest.approx(1.0)
    larger = y == 1
    assert roc_auc_score(larger, areas) > 0.85
    assert abs(roc_auc_score(larger, areas, sample_weight=weights) - 0.5) < 0.05
    # one bin: no area matching, each donor of a class carries the same weight
    donor_only = area_matched_weights(patients, y, areas, bins=1)
    per_donor = [donor_only[patients == p].sum() for p in np.unique(patients)]
    assert per_donor == pytest.approx([1 / 3] * 9)


def test_every_class_is_reported_not_two():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 6)
    areas = rng.uniform(20_000, 40_000, size=len(y))
    report = size_reading(_predictions(["all", "hem", "other"], y, rng.uniform(size=len(y))), areas)
    assert set(report["classes"]) == {"all", "hem", "other"}
    assert all(entry["cells"] == 6 for entry in report["classes"].values())


@pytest.mark.skipif(not SHARED_CNMC.is_dir(), reason="needs ../shared/data/cnmc")
def test_the_cross_validations_donor_areas_are_this_measurement():
    """The large-cell check of every CV report reads its donors' sizes from here."""
    from export.cv import crop_cell_areas, donor_cell_areas

    committed = json.loads((RUNS / "cv-distill-3seeds-clean-e20" / "cv.json").read_text())
    crops = crop_cell_areas(SHARED_CNMC, workers=2)
    assert donor_cell_areas(crops) == committed["donor_areas"]


@pytest.mark.skipif(not SHARED_CNMC.is_dir(), reason="needs ../shared/data/cnmc")
def test_the_model_cards_size_figures_are_the_shipped_predictions():
    """The card's size figures, recomputed from the shipped run's out-of-fold predictions."""
    import os

    from export.cv import crop_cell_areas
    from export.donors import read_predictions

    predictions = read_predictions(ROOT / "export" / "default_model" / "oof_predictions.csv")
    crops = crop_cell_areas(SHARED_CNMC, workers=2)
    by_name = {os.path.basename(path): area for path, (_, area) in crops.items()}
    areas = np.array([by_name[os.path.basename(path)] for path in predictions.paths])
    report = size_reading(predictions, areas)
    card = " ".join((ROOT / "docs" / "model-card.md").read_text().split())
    assert f"ROC AUC {report['area_alone_roc_auc']:.3f}" in card
    assert f"at ROC AUC {report['donor_weighted_roc_auc']:.3f} out of fold" in card
    matched = report["area_matched_roc_auc"]
    assert f"matched in cell area (`python -m export.size_reading`), at {matched:.3f}" in card
    assert f"(Spearman {report['classes']['hem']['within_donor_spearman']:.2f} " in card
