"""Validate a model on a lab's own labelled crops, through the same pipeline as ``scan``.

Labels come from a CSV (``path,label``) or from the folder holding each crop. The scan's own
reports are written too; on top come cell-level metrics, a per-slide table with the slide
call's accuracy, a ROC curve and a reliability diagram (PNG, drawn with OpenCV so no plotting
library is needed), ``metrics.json`` and a self-contained HTML page.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from smearscan.inference import Classifier
from smearscan.metrics import classification_metrics, expected_calibration_error, roc_curve
from smearscan.reports import atomic_write
from smearscan.runner import ScanRequest, run_scan
from smearscan.scan import CellResult


class LabelsError(ValueError):
    """A labels file that cannot be used; the message names the problem rows."""


@dataclass
class EvaluationOutcome:
    metrics: dict
    slide_metrics: dict
    report_dir: Path
    unlabelled: int


def read_labels(path: Path, root: Path, known: list[str]) -> dict[str, str]:
    """``path,label`` rows -> {absolute file: label}; checks files exist and labels are the
    model's."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
                raise LabelsError(f"{path}: needs a header with columns 'path' and 'label'")
            rows = list(reader)
    except OSError as exc:
        raise LabelsError(f"cannot read labels file {path}: {exc.strerror}") from None
    labels: dict[str, str] = {}
    missing, unknown = [], Counter()
    for number, row in enumerate(rows, start=2):
        name, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
        file = Path(name) if os.path.isabs(name) else root / name
        if not file.is_file():
            missing.append(f"line {number}: {name}")
        if label not in known:
            unknown[label] += 1
        labels[os.path.abspath(file)] = label
    problems = []
    if missing:
        shown = "; ".join(missing[:5]) + (f"; and {len(missing) - 5} more" if len(missing) > 5
                                           else "")  # fmt: skip
        problems.append(f"{len(missing)} listed file(s) not found ({shown})")
    if unknown:
        names = ", ".join(f"{k!r} ({v})" for k, v in unknown.most_common())
        problems.append(f"unknown label(s) {names}; the model knows {', '.join(known)}")
    if problems:
        raise LabelsError(f"{path}: " + "; ".join(problems))
    if not labels:
        raise LabelsError(f"{path}: no rows")
    return labels


def evaluate(
    root: Path,
    classifier: Classifier,
    report_dir: Path,
    labels_csv: Path | None = None,
    request: ScanRequest | None = None,
) -> EvaluationOutcome:
    """Scan ``root`` into ``report_dir`` and score the predictions against the labels."""
    model_labels = classifier.labels
    truth = read_labels(labels_csv, root, model_labels) if labels_csv else None
    collected: list[CellResult] = []
    request = request or ScanRequest()
    request.inputs = [root]
    request.out = report_dir / "predictions.csv"
    outcome = run_scan(request, classifier, on_result=collected.append)

    y_true, probabilities, predicted, slides = [], [], [], []
    unlabelled = 0
    for result in collected:
        if not result.ok:
            continue
        if truth is not None:
            label = truth.get(os.path.abspath(result.file))
        else:
            label = Path(result.file).parent.name
            label = label if label in model_labels else None
        if label is None:
            unlabelled += 1
            continue
        y_true.append(model_labels.index(label))
        probabilities.append(result.probabilities)
        predicted.append(model_labels.index(result.label))
        slides.append(_slide_key(result, truth is None))
    if not y_true:
        raise LabelsError(
            "no classified crop has a label: give --labels or keep crops in folders named "
            f"after the model's labels ({', '.join(model_labels)})"
        )
    y_true_a, probs_a = np.array(y_true), np.array(probabilities)
    positive = classifier.info.positive_class or model_labels[0]
    metrics = classification_metrics(y_true_a, probs_a, model_labels, positive, np.array(predicted))
    metrics["expected_calibration_error"] = expected_calibration_error(y_true_a, probs_a)
    metrics["threshold"] = outcome.summary.get("threshold")
    metrics["tta"] = request.options.tta
    slide_table = _slide_table(slides, y_true_a, np.array(predicted), model_labels, positive,
                               request.slide_threshold)  # fmt: skip
    report_dir.mkdir(parents=True, exist_ok=True)
    pos = model_labels.index(positive)
    roc_png = roc_curve_png(y_true_a == pos, probs_a[:, pos], metrics["roc_auc"], positive)
    reliability_png = reliability_png_bytes(y_true_a, probs_a)
    with atomic_write(report_dir / "roc.png", "wb") as handle:
        handle.write(roc_png)
    with atomic_write(report_dir / "reliability.png", "wb") as handle:
        handle.write(reliability_png)
    document = {"cells": metrics, "slides": slide_table, "unlabelled_cells": unlabelled,
                "scan_summary": str(request.summary_path())}  # fmt: skip
    with atomic_write(report_dir / "metrics.json") as handle:
        json.dump(document, handle, indent=2)
    _write_html(report_dir / "evaluation.html", metrics, slide_table, roc_png, reliability_png)
    return EvaluationOutcome(metrics, slide_table, report_dir, unlabelled)


def _slide_key(result: CellResult, labels_from_folders: bool) -> str:
    if labels_from_folders:  # .../<slide>/<label>/<crop>: the slide is above the label folder
        parent = str(Path(result.path).parent.parent)
        return parent if parent != "." else result.slide
    return result.slide


def _slide_table(slides, y_true, y_pred, labels, positive, slide_threshold) -> dict:
    """Per slide: its true label (majority of its cells), the fraction of cells called
    positive, the slide call by the scan's rule, and whether that call is right."""
    pos = labels.index(positive)
    table = {}
    for slide in sorted(set(slides)):
        members = np.array([s == slide for s in slides])
        true_label = labels[np.bincount(y_true[members], minlength=len(labels)).argmax()]
        fraction = float((y_pred[members] == pos).mean())
        call_positive = fraction >= slide_threshold
        table[slide] = {
            "cells": int(members.sum()),
            "true_label": true_label,
            f"fraction_called_{positive}": round(fraction, 4),
            "call": f"{positive}-suspect" if call_positive else "negative",
            "correct": call_positive == (true_label == positive),
        }
    correct = [row["correct"] for row in table.values()]
    return {"rule": f"fraction of cells called '{positive}' >= {slide_threshold}",
            "accuracy": round(float(np.mean(correct)), 4), "slides": table}  # fmt: skip


# ------------------------------------------------------------------ plots (OpenCV)

SIZE, MARGIN = 420, 50


def _canvas(title: str, x_label: str, y_label: str) -> np.ndarray:
    image = np.full((SIZE + 2 * MARGIN, SIZE + 2 * MARGIN, 3), 255, np.uint8)
    cv2.rectangle(image, (MARGIN, MARGIN), (MARGIN + SIZE, MARGIN + SIZE), (0, 0, 0), 1)
    for tick in np.linspace(0, 1, 6):
        x = int(MARGIN + tick * SIZE)
        y = int(MARGIN + SIZE - tick * SIZE)
        cv2.line(image, (x, MARGIN + SIZE), (x, MARGIN + SIZE + 5), (0, 0, 0), 1)
        cv2.line(image, (MARGIN - 5, y), (MARGIN, y), (0, 0, 0), 1)
        cv2.putText(image, f"{tick:.1f}", (x - 10, MARGIN + SIZE + 20), cv2.FONT_HERSHEY_SIMPLEX,
                    0.4, (0, 0, 0), 1, cv2.LINE_AA)  # fmt: skip
        cv2.putText(image, f"{tick:.1f}", (MARGIN - 35, y + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                    (0, 0, 0), 1, cv2.LINE_AA)  # fmt: skip
    cv2.putText(image, title, (MARGIN, MARGIN - 15), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0),
                1, cv2.LINE_AA)  # fmt: skip
    cv2.putText(image, x_label, (MARGIN + SIZE // 2 - 60, MARGIN + SIZE + 40),
                cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)  # fmt: skip
    cv2.putText(image, y_label, (5, MARGIN - 25), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1,
                cv2.LINE_AA)  # fmt: skip
    diagonal = [(MARGIN, MARGIN + SIZE), (MARGIN + SIZE, MARGIN)]
    cv2.line(image, *diagonal, (180, 180, 180), 1, cv2.LINE_AA)
    return image


def _points(xs, ys) -> np.ndarray:
    return np.array(
        [[int(MARGIN + x * SIZE), int(MARGIN + SIZE - y * SIZE)] for x, y in zip(xs, ys,
                                                                               strict=True)],
        np.int32,
    )  # fmt: skip


def _png(image: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", image)
    return encoded.tobytes()


def roc_curve_png(
    positive_true: np.ndarray, scores: np.ndarray, auc: float, positive: str
) -> bytes:
    image = _canvas(f"ROC, class '{positive}' (AUC {auc:.3f})", "false positive rate",
                    "true positive rate")  # fmt: skip
    fpr, tpr = roc_curve(positive_true, scores)
    cv2.polylines(image, [_points(fpr, tpr)], False, (160, 63, 123), 2, cv2.LINE_AA)
    return _png(image)


def reliability_png_bytes(y_true: np.ndarray, probabilities: np.ndarray, bins: int = 10) -> bytes:
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == y_true
    ece = expected_calibration_error(y_true, probabilities, bins)
    image = _canvas(f"Reliability (ECE {ece:.3f})", "confidence", "accuracy")
    edges = np.linspace(0, 1, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    for b in range(bins):
        members = index == b
        if not members.any():
            continue
        accuracy = correct[members].mean()
        top_left = _points([edges[b]], [accuracy])[0]
        bottom_right = _points([edges[b + 1]], [0])[0]
        cv2.rectangle(image, tuple(top_left + [2, 0]), tuple(bottom_right - [2, 0]),
                      (160, 63, 123), -1)  # fmt: skip
    return _png(image)


def _write_html(path: Path, metrics: dict, slides: dict, roc: bytes, reliability: bytes) -> None:
    esc = html.escape
    labels = metrics["labels"]

    def img(data: bytes, alt: str) -> str:
        return f"<img alt='{alt}' src='data:image/png;base64,{base64.b64encode(data).decode()}'>"

    rows = "".join(
        f"<tr><td>{esc(k)}</td><td>{metrics[k]:.4f}</td></tr>"
        for k in (
            "sensitivity",
            "specificity",
            "accuracy",
            "weighted_f1",
            "roc_auc",
            "expected_calibration_error",
        )  # fmt: skip
    )
    matrix = "".join(
        f"<tr><th>{esc(labels[i])}</th>" + "".join(f"<td>{v}</td>" for v in row) + "</tr>"
        for i, row in enumerate(metrics["confusion_matrix"])
    )
    per_class = "".join(
        f"<tr><td>{esc(name)}</td><td>{c['precision']:.3f}</td><td>{c['recall']:.3f}</td>"
        f"<td>{c['f1']:.3f}</td><td>{c['support']}</td></tr>"
        for name, c in metrics["per_class"].items()
    )
    slide_rows = "".join(
        f"<tr><td>{esc(name)}</td><td>{row['cells']}</td><td>{esc(row['true_label'])}</td>"
        f"<td>{esc(row['call'])}</td><td>{'yes' if row['correct'] else 'NO'}</td></tr>"
        for name, row in slides["slides"].items()
    )
    page = f"""<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">
<title>smearscan evaluation</title><style>body{{font-family:system-ui,sans-serif;margin:24px}}
table{{border-collapse:collapse;margin-bottom:16px}}td,th{{border:1px solid #ccc;padding:4px 8px}}
</style></head><body><h1>smearscan evaluation</h1>
<p>{metrics["n"]} labelled cells; positive class '{esc(metrics["positive_class"])}';
threshold {metrics.get("threshold")}; TTA {metrics.get("tta")}.</p>
<h2>Cell-level metrics</h2><table id="metrics">{rows}</table>
<h2>Confusion matrix (rows: truth, columns: predicted)</h2>
<table><tr><th></th>{"".join(f"<th>{esc(x)}</th>" for x in labels)}</tr>{matrix}</table>
<h2>Per class</h2><table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th>
<th>support</th></tr>{per_class}</table>
<h2>Slides</h2><p>Rule: {esc(slides["rule"])}; slide-level accuracy {slides["accuracy"]:.3f}</p>
<table id="slides"><tr><th>slide</th><th>cells</th><th>truth</th><th>call</th><th>correct</th>
</tr>{slide_rows}</table>
{img(roc, "ROC curve")} {img(reliability, "reliability diagram")}
</body></html>"""
    with atomic_write(path) as handle:
        handle.write(page)
