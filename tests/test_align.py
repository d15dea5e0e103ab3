"""Member alignment (issue 26): each fold model's level fitted on donors it never saw, leave
one donor out, before the cross-fitted rules. Synthetic predictions with a known offset."""

from __future__ import annotations

import numpy as np

from export.align import aligned, judged
from export.donors import Predictions


def _offset_folds(rng: np.random.Generator) -> Predictions:
    """Two folds of 4 ALL and 4 normal donors, 30 cells each; every member ranks its donors
    well, but fold 1's member says P(all) about 0.25 higher than fold 0's."""
    patients, y, folds, p_all = [], [], [], []
    for fold in (0, 1):
        for donor in range(8):
            label = 0 if donor < 4 else 1  # 0: all, 1: hem
            centre = (0.65 if label == 0 else 0.35) + 0.25 * fold - 0.1
            values = np.clip(rng.normal(centre, 0.08, 30), 0.01, 0.99)
            patients += [f"{fold}-{donor}"] * 30
            y += [label] * 30
            folds += [fold] * 30
            p_all += values.tolist()
    p = np.array(p_all)
    return Predictions(
        ["all", "hem"],
        [f"c{i}" for i in range(len(p))],
        np.array(patients),
        np.array(y),
        np.array(folds),
        np.stack([p, 1 - p], axis=1),
    )


def test_alignment_removes_a_members_offset_without_using_the_donors_own_labels():
    predictions = _offset_folds(np.random.default_rng(0))
    before = judged(predictions, "all")
    after_predictions, members = aligned(predictions, "all")
    after = judged(after_predictions, "all")
    assert before["cutoff_spread"] > 0.15  # the offset moves the fitted slide cut-offs
    assert after["cutoff_spread"] < before["cutoff_spread"] / 2
    assert after["slides_right"] >= before["slides_right"]
    assert members["fold_1"]["bias"] < members["fold_0"]["bias"]  # fold 1 pulled down
    # leave one donor out: changing one donor's labels does not move its own predictions
    flipped = Predictions(
        predictions.labels,
        predictions.paths,
        predictions.patients,
        np.where(predictions.patients == "0-0", 1, predictions.y),
        predictions.folds,
        predictions.probabilities,
    )
    again, _ = aligned(flipped, "all")
    rows = predictions.patients == "0-0"
    assert np.allclose(again.probabilities[rows], after_predictions.probabilities[rows])
