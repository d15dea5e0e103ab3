"""How far a run's P(positive) follows the cell's size, from its out-of-fold predictions.

    python -m export.size_reading export/default_model export/ablation_runs/cv-NAME ...

The bounding-box crop makes every cell fill the input, yet size can reach the network
through resolution (a small cell enlarged looks softer). In the C-NMC training release
blasts are the larger cells, so size is a label cue here, and one that a batch where
normal cells are larger would turn around. Per class, this reports the Spearman
correlation of a cell's segmented area (the QC measurement) with P(positive), pooled and
within donors (each donor's mean removed), how well area alone ranks the cells, and the
run's ROC AUC with the cells weighted so that both classes have the same area distribution
and every donor of a class the same weight (``area_matched_weights``: what the run tells
apart beyond size; the ``donors-area`` training draws use the same weights).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from export.config import default_positive
from export.donors import Predictions, read_predictions

#: The out-of-fold predictions inside a run folder.
OOF_FILE = "oof_predictions.csv"

#: Area bins (quantiles of the crops weighed) within which the classes are made equal.
AREA_BINS = 10


def cell_area(path: str | Path) -> float:
    """The cell's segmented area in pixels of the decoded crop (as QC measures it)."""
    from smearscan.preprocess import Recipe, framed_and_resized, gray_of, read_image
    from smearscan.qc import measure

    image = read_image(Path(path), order="bgr")
    gray = gray_of(image, "bgr")
    return measure(gray, framed_and_resized(image, Recipe(), "bgr", gray), 12).area


def cell_areas(paths: Sequence[str | Path], workers: int) -> np.ndarray:
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return np.array(list(pool.map(cell_area, paths)), dtype=float)


def area_matched_weights(
    patients: np.ndarray, y: np.ndarray, areas: np.ndarray, bins: int = AREA_BINS
) -> np.ndarray:
    """Per crop, a weight under which every donor of a class weighs the same and every
    class has the same distribution of cell area, so that size no longer tells the class.

    Areas are binned at the quantiles of all crops; the distribution every class is
    brought to is the classes' common part (in each bin, the least of their donor-weighted
    shares). A crop outside that common part weighs nothing. Each class sums to one.
    """
    edges = np.quantile(areas, np.linspace(0, 1, bins + 1)[1:-1])
    bin_of = np.searchsorted(edges, areas, side="right")
    donor_share = np.zeros(len(y))
    for patient, label in set(zip(patients.tolist(), y.tolist(), strict=True)):
        members = (patients == patient) & (y == label)
        donor_share[members] = 1.0 / members.sum()
    classes = np.unique(y)
    shares = np.array(
        [np.bincount(bin_of[y == c], donor_share[y == c], minlength=bins) for c in classes]
    )
    shares /= shares.sum(axis=1, keepdims=True)
    common = shares.min(axis=0)
    weights = np.zeros(len(y))
    for c, share in zip(classes, shares, strict=True):
        members = y == c
        ratio = np.divide(common, share, out=np.zeros(bins), where=share > 0)
        weights[members] = donor_share[members] * ratio[bin_of[members]]
        total = weights[members].sum()
        if total > 0:
            weights[members] /= total
    return weights


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b)[0]) if len(a) > 2 else float("nan")


def _less_donor_mean(values: np.ndarray, patients: np.ndarray) -> np.ndarray:
    out = values.astype(float).copy()
    for patient in np.unique(patients):
        members = patients == patient
        out[members] -= values[members].mean()
    return out


def size_reading(predictions: Predictions, areas: np.ndarray) -> dict:
    """Per class, how P(positive) follows cell area; and area alone as a score."""
    from sklearn.metrics import roc_auc_score

    positive = predictions.labels.index(default_positive(predictions.labels))
    scores = predictions.probabilities[:, positive]
    is_positive = predictions.y == positive
    report: dict = {"positive_class": predictions.labels[positive], "classes": {}}
    for index, label in enumerate(predictions.labels):
        members = predictions.y == index
        patients = predictions.patients[members]
        report["classes"][label] = {
            "cells": int(members.sum()),
            "median_area": float(np.median(areas[members])),
            "pooled_spearman": _spearman(areas[members], scores[members]),
            "within_donor_spearman": _spearman(
                _less_donor_mean(areas[members], patients),
                _less_donor_mean(scores[members], patients),
            ),
        }
    report["area_alone_roc_auc"] = float(roc_auc_score(is_positive, areas))
    # how well the run ranks cells when every donor of a class weighs the same, and when
    # size moreover cannot tell the classes apart (one area bin: donor weights alone)
    for key, bins in (("donor_weighted_roc_auc", 1), ("area_matched_roc_auc", AREA_BINS)):
        weights = area_matched_weights(predictions.patients, predictions.y, areas, bins)
        sides_weighed = weights[is_positive].sum() > 0 and weights[~is_positive].sum() > 0
        report[key] = (
            float(roc_auc_score(is_positive, scores, sample_weight=weights))
            if sides_weighed
            else float("nan")  # the classes share no area bin: nothing to rank
        )
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m export.size_reading", description=__doc__.split("\n")[0]
    )
    parser.add_argument("runs", nargs="+", type=Path, help="folders with " + OOF_FILE)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    measured: dict[str, float] = {}  # each crop measured once, however a run names it
    reports = {}
    for run in args.runs:
        predictions = read_predictions(run / OOF_FILE)
        crops = [os.path.realpath(path) for path in predictions.paths]
        missing = sorted(set(crops) - set(measured))
        measured.update(zip(missing, cell_areas(missing, args.workers).tolist(), strict=True))
        reports[str(run)] = size_reading(predictions, np.array([measured[c] for c in crops]))
    print(json.dumps(reports, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
