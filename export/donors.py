"""Donor-level evaluation of out-of-fold predictions (numpy only, no TensorFlow).

Cells of one donor are near-duplicates, so a pooled cell-level number is dominated by the
donors with the most crops. Here every donor counts once: per-donor sensitivity (ALL donors)
and specificity (normal donors), their macro means, the worst donor, and the slide call of
each donor from its cells. Calibration, the operating threshold and the slide cut-off are
*cross-fitted*: the numbers reported for the donors of fold k come from rules fitted on the
other folds' donors only, so no donor helps choose the rule it is judged by.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from smearscan.inference import apply_temperature
from smearscan.metrics import classification_metrics
from smearscan.policy import DecisionPolicy, call_is_right


@dataclass
class Predictions:
    """Cell predictions with their donor, true class index and fold."""

    labels: list[str]
    paths: list[str]
    patients: np.ndarray
    y: np.ndarray
    folds: np.ndarray
    probabilities: np.ndarray

    def subset(self, mask: np.ndarray) -> Predictions:
        return Predictions(
            self.labels,
            [p for p, m in zip(self.paths, mask, strict=True) if m],
            self.patients[mask],
            self.y[mask],
            self.folds[mask],
            self.probabilities[mask],
        )

    def donor_weights(self) -> np.ndarray:
        """1 / (cells of the donor): each donor weighs the same in fitted rules."""
        _, inverse, counts = np.unique(self.patients, return_inverse=True, return_counts=True)
        return 1.0 / counts[inverse]


def number(value: float | int | None, spec: str = ".4f") -> str:
    """A report figure, or "n/a" where it does not exist (no large-cell normal donor, one
    class in a fold, one donor...): renderers never format None as a number."""
    if value is None or (isinstance(value, float) and value != value):
        return "n/a"
    return format(value, spec)


def read_predictions(path: Path, labels: list[str] | None = None) -> Predictions:
    """``path,patient,label[,fold],p_<class>...`` rows (a run's val_predictions.csv or the
    pooled out-of-fold file)."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if labels is None:
        labels = [name[2:] for name in rows[0] if name.startswith("p_")]
    return Predictions(
        labels,
        [r["path"] for r in rows],
        np.array([r["patient"] for r in rows]),
        np.array([labels.index(r["label"]) for r in rows]),
        np.array([int(r.get("fold") or 0) for r in rows]),
        np.array([[float(r[f"p_{c}"]) for c in labels] for r in rows]),
    )


def write_predictions(path: Path, predictions: Predictions) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["path", "patient", "label", "fold", *[f"p_{c}" for c in predictions.labels]]
        )
        for i, file in enumerate(predictions.paths):
            writer.writerow(
                [
                    file,
                    predictions.patients[i],
                    predictions.labels[predictions.y[i]],
                    int(predictions.folds[i]),
                    *[f"{p:.6f}" for p in predictions.probabilities[i]],
                ]
            )


# ---------------------------------------------------------------- fitted rules


def weighted_nll(y: np.ndarray, probabilities: np.ndarray, weights: np.ndarray) -> float:
    picked = np.clip(probabilities[np.arange(len(y)), y], 1e-12, 1.0)
    return float(-(weights * np.log(picked)).sum() / weights.sum())


def fit_temperature(
    y: np.ndarray, probabilities: np.ndarray, weights: np.ndarray | None = None
) -> float:
    """Temperature minimising the (donor-weighted) negative log-likelihood."""
    weights = np.ones(len(y)) if weights is None else weights

    def nll(t: float) -> float:
        return weighted_nll(y, apply_temperature(probabilities, t), weights)

    grid = np.exp(np.linspace(np.log(0.25), np.log(8.0), 61))
    best = min(grid, key=nll)
    fine = np.linspace(best * 0.93, best * 1.07, 29)
    return float(min(fine, key=nll))


def parse_operating_point(text: str) -> tuple[str, float]:
    """``balanced`` (maximise the donor-weighted mean of sensitivity and specificity) or
    ``sensitivity:0.95`` (the highest threshold keeping donor-weighted sensitivity)."""
    if text == "balanced":
        return "balanced", 0.0
    name, _, value = text.partition(":")
    if name == "sensitivity" and value:
        target = float(value)
        if 0 < target <= 1:
            return "sensitivity", target
    raise ValueError(f"operating point must be 'balanced' or 'sensitivity:X', not {text!r}")


def fit_threshold(
    positive_true: np.ndarray, scores: np.ndarray, weights: np.ndarray, rule: tuple[str, float]
) -> float:
    """A cut-off on P(positive) by ``rule`` (see :func:`parse_operating_point`)."""
    candidates = np.unique(np.round(scores, 6))
    candidates = np.concatenate([candidates, [1.0 + 1e-9]])
    pos_w, neg_w = weights[positive_true], weights[~positive_true]
    pos_s, neg_s = scores[positive_true], scores[~positive_true]
    order_p, order_n = np.argsort(pos_s), np.argsort(neg_s)
    cum_p = np.concatenate([[0], np.cumsum(pos_w[order_p])])
    cum_n = np.concatenate([[0], np.cumsum(neg_w[order_n])])
    # sensitivity(t) = weight of positives with score >= t; specificity(t) = negatives < t
    below_p = cum_p[np.searchsorted(pos_s[order_p], candidates, side="left")]
    below_n = cum_n[np.searchsorted(neg_s[order_n], candidates, side="left")]
    sensitivity = 1 - below_p / max(cum_p[-1], 1e-12)
    specificity = below_n / max(cum_n[-1], 1e-12)
    name, target = rule
    if name == "sensitivity":
        ok = np.flatnonzero(sensitivity >= target - 1e-12)
        return float(candidates[ok[-1]]) if len(ok) else 0.0
    balanced = (sensitivity + specificity) / 2
    best = np.flatnonzero(balanced >= balanced.max() - 1e-12)
    # the middle of the best run of thresholds, not its edge
    return float(candidates[best[len(best) // 2]])


def fit_slide_cutoff(scores: np.ndarray, positive: np.ndarray) -> float:
    """The cut-off on the donors' slide scores with the best balanced accuracy, placed
    midway between neighbouring scores (the widest margin)."""
    values = np.sort(np.unique(scores))
    candidates = np.concatenate([[0.0], (values[1:] + values[:-1]) / 2, [1.0]])

    def balanced(cut: float) -> float:
        called = scores >= cut
        sens = called[positive].mean() if positive.any() else 1.0
        spec = (~called[~positive]).mean() if (~positive).any() else 1.0
        return (sens + spec) / 2

    results = np.array([balanced(c) for c in candidates])
    best = np.flatnonzero(results >= results.max() - 1e-12)
    return float(candidates[best[len(best) // 2]])


# ---------------------------------------------------------------- per donor


@dataclass
class Rules:
    """The fitted rules of one evaluation: what the shipped model file would store."""

    temperature: float
    threshold: float | None
    slide_rule: str
    slide_cutoff: float


def fit_rules(
    predictions: Predictions, positive: str, operating_point: tuple[str, float], slide_rule: str
) -> Rules:
    labels = predictions.labels
    weights = predictions.donor_weights()
    temperature = fit_temperature(predictions.y, predictions.probabilities, weights)
    calibrated = apply_temperature(predictions.probabilities, temperature)
    pos = labels.index(positive)
    threshold = None
    if len(labels) == 2:
        threshold = fit_threshold(
            predictions.y == pos, calibrated[:, pos], weights, operating_point
        )
    policy = DecisionPolicy(tuple(labels), positive, threshold, slide_rule, 0.5, 1)
    table = donor_rows(predictions.labels, predictions.patients, predictions.y, calibrated, policy)
    scores = np.array([row["score"] for row in table])
    truth = np.array([row["truth"] == positive for row in table])
    return Rules(temperature, threshold, slide_rule, fit_slide_cutoff(scores, truth))


def donor_rows(
    labels: Sequence[str],
    patients: np.ndarray,
    y: np.ndarray,
    calibrated: np.ndarray,
    policy: DecisionPolicy,
) -> list[dict]:
    """Per donor: truth, cells, share of cells called positive, mean P(positive), slide
    score and call under ``policy``, and whether each cell was right."""
    predicted = policy.label_indices(calibrated)
    rows = []
    for patient in sorted(set(patients.tolist()), key=_natural):
        members = patients == patient
        truth = labels[int(np.bincount(y[members], minlength=len(labels)).argmax())]
        cells, positives, positive_sum = policy.slide_tally(members, predicted, calibrated)
        rows.append(
            {
                "patient": patient,
                "truth": truth,
                "cells": cells,
                "called_positive": positives / cells,
                "mean_p": positive_sum / cells,
                "cell_accuracy": float((predicted[members] == y[members]).mean()),
                "score": policy.slide_score(cells, positives, positive_sum),
                "call": policy.slide_call(cells, positives, positive_sum),
            }
        )
    return rows


def _natural(patient: str) -> tuple:
    digits = "".join(ch for ch in patient if ch.isdigit())
    return (patient.rstrip("0123456789").upper(), int(digits) if digits else 0, patient)


def summarize(predictions: Predictions, calibrated: np.ndarray, policy: DecisionPolicy) -> dict:
    """Pooled cell metrics, donor macro metrics and slide-call accuracy under one policy."""
    predicted = policy.label_indices(calibrated)
    rows = donor_rows(predictions.labels, predictions.patients, predictions.y, calibrated, policy)
    return summary_of(predictions, calibrated, predicted, rows, policy.positive)  # type: ignore[arg-type]


def summary_of(
    predictions: Predictions,
    calibrated: np.ndarray,
    predicted: np.ndarray,
    rows: list[dict],
    positive: str,
) -> dict:
    pooled = classification_metrics(
        predictions.y, calibrated, predictions.labels, positive, predicted
    )
    rows = sorted(rows, key=lambda r: _natural(r["patient"]))
    malignant = [r for r in rows if r["truth"] == positive]
    normal = [r for r in rows if r["truth"] != positive]

    def worst(group: list[dict]) -> dict | None:
        return min(group, key=lambda r: r["cell_accuracy"]) if group else None

    def mean(group: list[dict]) -> float | None:
        return float(np.mean([r["cell_accuracy"] for r in group])) if group else None

    calls_right = [call_is_right(r["call"], r["truth"], positive) for r in rows]
    worst_positive, worst_negative = worst(malignant), worst(normal)
    return {
        "cells": len(predictions.y),
        "donors": len(rows),
        "pooled": {
            k: pooled[k]
            for k in ("weighted_f1", "roc_auc", "sensitivity", "specificity", "accuracy")
        },
        "macro_sensitivity": mean(malignant),
        "macro_specificity": mean(normal),
        "worst_positive_donor": worst_positive and worst_positive["patient"],
        "worst_sensitivity": worst_positive and worst_positive["cell_accuracy"],
        "worst_negative_donor": worst_negative and worst_negative["patient"],
        "worst_specificity": worst_negative and worst_negative["cell_accuracy"],
        "slide_call_accuracy": float(np.mean(calls_right)),
        "slide_calls_wrong": [
            r["patient"] for r, ok in zip(rows, calls_right, strict=True) if not ok
        ],
        "donor_rows": rows,
    }


def cross_fitted(
    predictions: Predictions, positive: str, operating_point: tuple[str, float], slide_rule: str
) -> tuple[np.ndarray, dict, list[Rules]]:
    """Calibrated probabilities, a donor-level summary and the per-fold rules, where the
    rules applied to fold k were fitted on the other folds only."""
    calibrated = np.zeros_like(predictions.probabilities)
    predicted = np.zeros(len(predictions.y), dtype=np.int64)
    per_fold: list[Rules] = []
    rows: list[dict] = []
    for fold in sorted(set(predictions.folds.tolist())):
        inside = predictions.folds == fold
        rules = fit_rules(predictions.subset(~inside), positive, operating_point, slide_rule)
        per_fold.append(rules)
        calibrated[inside] = apply_temperature(predictions.probabilities[inside], rules.temperature)
        policy = DecisionPolicy(
            tuple(predictions.labels), positive, rules.threshold, slide_rule, rules.slide_cutoff, 1
        )
        predicted[inside] = policy.label_indices(calibrated[inside])
        part = predictions.subset(inside)
        rows += donor_rows(part.labels, part.patients, part.y, calibrated[inside], policy)
    return calibrated, summary_of(predictions, calibrated, predicted, rows, positive), per_fold
