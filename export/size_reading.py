"""How far a run's P(positive) follows the cell's size, from its out-of-fold predictions.

    python -m export.size_reading export/default_model export/ablation_runs/cv-NAME ...

The bounding-box crop makes every cell fill the input, yet size can reach the network
through resolution (a small cell enlarged looks softer). In the C-NMC training release
blasts are the larger cells, so size is a label cue here, and one that a batch where
normal cells are larger would turn around. Per class, this reports the Spearman
correlation of a cell's segmented area (the QC measurement) with P(positive), pooled and
within donors (each donor's mean removed), and how well area alone ranks the cells.
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
