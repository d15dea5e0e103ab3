"""Classification metrics in plain numpy (no scikit-learn at scan time).

Used by training (model selection), export (metadata) and evaluation, so every number a
user sees is computed by the same code.
"""

from __future__ import annotations

import math

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true, int), np.asarray(y_pred, int)), 1)
    return matrix


def roc_auc(y_true_binary: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic (ties count one half)."""
    y = np.asarray(y_true_binary, bool)
    scores = np.asarray(scores, float)
    positives, negatives = int(y.sum()), int((~y).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), float)
    sorted_scores = scores[order]
    # average ranks over ties
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [len(scores)]))
    for start, end in zip(starts, ends, strict=False):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    u = ranks[y].sum() - positives * (positives + 1) / 2.0
    return float(u / (positives * negatives))


def classification_metrics(
    y_true: np.ndarray,
    probabilities: np.ndarray,
    labels: list[str],
    positive: str | None = None,
    y_pred: np.ndarray | None = None,
) -> dict:
    """Sensitivity/specificity (for ``positive`` vs the rest), accuracy, weighted F1, ROC AUC,
    confusion matrix and a per-class report. ``y_pred`` defaults to the argmax."""
    y_true = np.asarray(y_true, int)
    probabilities = np.asarray(probabilities, float)
    num_classes = len(labels)
    if y_pred is None:
        y_pred = probabilities.argmax(axis=1)
    y_pred = np.asarray(y_pred, int)
    matrix = confusion_matrix(y_true, y_pred, num_classes)
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    true_positive = np.diag(matrix).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, true_positive / predicted, 0.0)
        recall = np.where(support > 0, true_positive / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    total = int(support.sum())
    positive = positive if positive in labels else labels[0]
    pos = labels.index(positive)
    tp = matrix[pos, pos]
    fn = support[pos] - tp
    fp = predicted[pos] - tp
    tn = total - tp - fn - fp
    result = {
        "n": total,
        "positive_class": positive,
        "sensitivity": float(tp / (tp + fn)) if tp + fn else float("nan"),
        "specificity": float(tn / (tn + fp)) if tn + fp else float("nan"),
        "accuracy": float(true_positive.sum() / total) if total else float("nan"),
        "weighted_f1": float((f1 * support).sum() / total) if total else float("nan"),
        "macro_f1": float(f1.mean()),
        "roc_auc": roc_auc(y_true == pos, probabilities[:, pos]),
        "confusion_matrix": matrix.tolist(),
        # 95 % Wilson intervals: labs validate on a few slides, where a proportion alone
        # says little
        "intervals": {
            "sensitivity": wilson_interval(int(tp), int(tp + fn)),
            "specificity": wilson_interval(int(tn), int(tn + fp)),
            "accuracy": wilson_interval(int(true_positive.sum()), total),
        },
        "labels": list(labels),
        "per_class": {
            label: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, label in enumerate(labels)
        },
    }
    return result


def wilson_interval(successes: int, trials: int, z: float = 1.959964) -> list[float] | None:
    """The Wilson score interval of a proportion (95 % by default): unlike the normal
    approximation it stays inside [0, 1] and is usable for a handful of trials."""
    if trials <= 0:
        return None
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def roc_curve(y_true_binary: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) over all thresholds, from (0,0) to (1,1)."""
    y = np.asarray(y_true_binary, bool)
    order = np.argsort(-np.asarray(scores, float), kind="mergesort")
    y = y[order]
    tps = np.concatenate(([0], np.cumsum(y)))
    fps = np.concatenate(([0], np.cumsum(~y)))
    return fps / max(fps[-1], 1), tps / max(tps[-1], 1)


def expected_calibration_error(
    y_true: np.ndarray, probabilities: np.ndarray, bins: int = 10
) -> float:
    """ECE of the top-class confidence over equal-width bins."""
    probabilities = np.asarray(probabilities, float)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(y_true, int)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            error += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(error)
