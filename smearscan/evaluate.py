"""Validate a model on a lab's own labelled crops, through the same pipeline as ``scan``.

Labels come from a CSV (``path,label``) or from the folder holding each crop. The scan's own
reports are written too; on top come cell-level metrics on the crops that passed quality
control (the others are counted as excluded), a per-slide table with the slide call's
accuracy, a ROC curve and a reliability diagram (SVG), ``metrics.json`` and
``evaluation.html``: a validation record that names the model, its sha256, the smearscan
version and the date.
"""

from __future__ import annotations

import csv
import io
import os
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from markupsafe import Markup, escape

from smearscan import __version__
from smearscan.exitstatus import ExitStatus
from smearscan.files import atomic_write, read_regular
from smearscan.inference import Classifier
from smearscan.metrics import (
    classification_metrics,
    expected_calibration_error,
    roc_auc,
    roc_curve,
    wilson_interval,
)
from smearscan.modelfile import INTENDED_USE
from smearscan.policy import NEGATIVE, DecisionPolicy, call_is_right
from smearscan.results import STATUS_OK, CellResult
from smearscan.runner import ScanOutcome, ScanRequest, run_scan
from smearscan.sinks.html import environment
from smearscan.sinks.summary import write_json

NO_SLIDES = (
    "no slides: the crops sit directly in label folders (all/, hem/), so slide calls are not "
    "scored; arrange them as <slide>/<label>/<crop> (or give --labels) to score them"
)
#: A labels list is a few MB at most; anything larger is not one.
MAX_LABELS_BYTES = 64 << 20


class LabelsError(ValueError):
    """A labels file that cannot be used; the message names the problem rows."""


@dataclass
class EvaluationOutcome:
    metrics: dict | None
    slide_metrics: dict | None
    report_dir: Path
    unlabelled: int
    excluded: int
    scan: ScanOutcome


def read_labels(path: Path, root: Path, known: list[str]) -> dict[str, str]:
    """``path,label`` rows -> {absolute file: label}; checks files exist and labels are the
    model's."""
    try:
        text = read_regular(path, MAX_LABELS_BYTES).decode("utf-8-sig")
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
            raise LabelsError(f"{path}: needs a header with columns 'path' and 'label'")
        rows = list(reader)
    except OSError as exc:
        raise LabelsError(f"cannot read labels file {path}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise LabelsError(
            f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8 CSV"
        ) from None
    except csv.Error as exc:
        raise LabelsError(f"{path}: not a readable CSV ({exc})") from None
    labels: dict[str, str] = {}
    conflicting: list[str] = []
    missing: list[str] = []
    unknown: Counter[str] = Counter()
    for number, row in enumerate(rows, start=2):
        name, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
        file = Path(name) if os.path.isabs(name) else root / name
        if not file.is_file():
            missing.append(f"line {number}: {name}")
        if label not in known:
            unknown[label] += 1
        key = os.path.abspath(file)
        if labels.get(key, label) != label:
            conflicting.append(f"line {number}: {name} ({labels[key]!r} and {label!r})")
        labels[key] = label
    problems = []
    if missing:
        shown = "; ".join(missing[:5]) + (
            f"; and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        problems.append(f"{len(missing)} listed file(s) not found ({shown})")
    if conflicting:
        problems.append(f"files listed twice with different labels ({'; '.join(conflicting[:5])})")
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
    *,
    stop: threading.Event | None = None,
    stop_status: Callable[[], ExitStatus] | None = None,
    on_result: Callable[[CellResult], None] | None = None,
) -> EvaluationOutcome:
    """Scan ``root`` into ``report_dir`` and score the predictions against the labels."""
    model_labels = classifier.labels
    truth = read_labels(labels_csv, root, model_labels) if labels_csv else None
    collected: list[CellResult] = []
    request = request or ScanRequest()
    request.inputs = [root]
    request.out = report_dir / "predictions.csv"

    def keep(result: CellResult) -> None:
        collected.append(result)
        if on_result:
            on_result(result)

    outcome = run_scan(request, classifier, stop=stop, stop_status=stop_status, on_result=keep)
    if outcome.status == ExitStatus.NOTHING_TO_SCAN or (stop is not None and stop.is_set()):
        return EvaluationOutcome(None, None, report_dir, 0, 0, outcome)
    policy = outcome.policy
    y_true, probabilities, slides = [], [], []
    unlabelled = excluded = 0
    for result in collected:
        if result.status != STATUS_OK:
            excluded += 1
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
        slides.append(_slide_key(result, truth is None))
    if not y_true:
        raise LabelsError(
            "no classified crop has a label: give --labels or keep crops in folders named "
            f"after the model's labels ({', '.join(model_labels)})"
        )
    y_true_a, probs_a = np.array(y_true), np.array(probabilities)
    positive = policy.positive or model_labels[0]
    predicted = policy.label_indices(probs_a)
    metrics = classification_metrics(y_true_a, probs_a, model_labels, positive, predicted)
    metrics["expected_calibration_error"] = expected_calibration_error(y_true_a, probs_a)
    metrics["decision"] = policy.to_dict()
    metrics["tta"] = request.options.tta
    metrics["excluded"] = {
        "count": excluded,
        "why": "failed quality control or unreadable; not scored (see predictions.csv)",
        "qc_rate": outcome.summary.get("overall", {}).get("qc_rate"),
    }
    slide_table = _slide_table(slides, y_true_a, probs_a, predicted, policy)
    report_dir.mkdir(parents=True, exist_ok=True)
    pos = model_labels.index(positive)
    roc = roc_svg(y_true_a == pos, probs_a[:, pos], metrics["roc_auc"], positive)
    reliability = reliability_svg(y_true_a, probs_a)
    for name, svg in (("roc.svg", roc), ("reliability.svg", reliability)):
        with atomic_write(report_dir / name) as handle:
            handle.write(str(svg))
    record = {
        "intended_use": INTENDED_USE,
        "model": {
            "name": classifier.info.name,
            "sha256": classifier.info.sha256,
            "path": str(classifier.info.path),
        },
        "smearscan_version": __version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "root": str(root),
        "labels_from": str(labels_csv) if labels_csv else "folder names",
    }
    document = {
        **record,
        "cells": metrics,
        "slides": slide_table,
        "unlabelled_cells": unlabelled,
        "scan_summary": str(request.summary_path()),
    }
    write_json(report_dir / "metrics.json", document)
    page = (
        environment()
        .get_template("evaluation.html.j2")
        .render(
            record=record,
            metrics=metrics,
            slides=slide_table,
            roc=roc,
            reliability=reliability,
            unlabelled=unlabelled,
            labels=model_labels,
            fmt=_fmt,
        )
    )
    with atomic_write(report_dir / "evaluation.html") as handle:
        handle.write(page)
    return EvaluationOutcome(metrics, slide_table, report_dir, unlabelled, excluded, outcome)


def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _slide_key(result: CellResult, labels_from_folders: bool) -> str | None:
    """The slide a labelled crop belongs to; None in a flat ``all/``, ``hem/`` layout, where
    the label folders are not slides."""
    if labels_from_folders:  # .../<slide>/<label>/<crop>: the slide is above the label folder
        parent = str(Path(result.path).parent.parent)
        return parent if parent != "." else None
    return result.slide


def _slide_table(slides, y_true, probabilities, predicted, policy: DecisionPolicy) -> dict:
    """Per slide: its true label (majority of its cells), its score and call by the run's
    policy, and whether the call is right (slides without a call are not scored)."""
    positive = policy.positive
    labels = policy.labels
    table: dict[str, dict] = {}
    if positive is None:
        return {"rule": None, "accuracy": None, "slides": table}
    if all(slide is None for slide in slides):
        return {"rule": None, "accuracy": None, "slides": table, "note": NO_SLIDES}
    for slide in sorted({s for s in slides if s is not None}):
        members = np.array([s == slide for s in slides])
        true_label = labels[np.bincount(y_true[members], minlength=len(labels)).argmax()]
        cells, positives, positive_sum = policy.slide_tally(members, predicted, probabilities)
        call = policy.slide_call(cells, positives, positive_sum)
        called = call in (policy.suspect_call, NEGATIVE)
        right = int((predicted[members] == y_true[members]).sum())
        table[slide] = {
            "cells": cells,
            "true_label": true_label,
            "cell_accuracy": round(right / cells, 4),
            f"fraction_called_{positive}": round(positives / cells, 4),
            "score": round(policy.slide_score(cells, positives, positive_sum) or 0.0, 4),
            "call": call,
            "correct": call_is_right(call, true_label, positive)
            if called and call is not None
            else None,
        }
    scored = [row["correct"] for row in table.values() if row["correct"] is not None]
    rows = list(table.values())
    positive_rows = [r["cell_accuracy"] for r in rows if r["true_label"] == positive]
    other_rows = [r["cell_accuracy"] for r in rows if r["true_label"] != positive]
    truth = np.array([r["true_label"] == positive for r in rows])
    auc = roc_auc(truth, np.array([r["score"] for r in rows])) if len(set(truth)) == 2 else None
    return {
        "rule": policy.slide_rule_text(),
        "accuracy": round(float(np.mean(scored)), 4) if scored else None,
        "accuracy_interval": wilson_interval(int(sum(scored)), len(scored)),
        # each slide (donor) weighing the same: a few large slides cannot carry the figure
        "macro_sensitivity": round(float(np.mean(positive_rows)), 4) if positive_rows else None,
        "macro_specificity": round(float(np.mean(other_rows)), 4) if other_rows else None,
        "slide_auc": None if auc is None or not np.isfinite(auc) else round(float(auc), 4),
        "slides": table,
    }


# ------------------------------------------------------------------ plots (SVG)

SIZE, LEFT, TOP, BOTTOM = 360, 64, 44, 56


def _svg_frame(title: str, x_label: str, y_label: str, body: str) -> Markup:
    """A square plot with ticks, axis labels below and left of the axes (never overlapping)
    and a title above: SVG, so it stays crisp at any zoom and in print."""
    width, height = LEFT + SIZE + 24, TOP + SIZE + BOTTOM
    ticks = []
    for step in range(6):
        value = step / 5
        x, y = LEFT + value * SIZE, TOP + SIZE - value * SIZE
        ticks.append(
            f'<line x1="{x:.1f}" y1="{TOP + SIZE}" x2="{x:.1f}" y2="{TOP + SIZE + 5}" '
            'stroke="#333"/>'
            f'<text x="{x:.1f}" y="{TOP + SIZE + 18}" text-anchor="middle">{value:.1f}</text>'
            f'<line x1="{LEFT - 5}" y1="{y:.1f}" x2="{LEFT}" y2="{y:.1f}" stroke="#333"/>'
            f'<text x="{LEFT - 8}" y="{y + 4:.1f}" text-anchor="end">{value:.1f}</text>'
        )
    return Markup(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12" role="img" '
        f'aria-label="{escape(title)}">'
        f'<text x="{LEFT + SIZE / 2}" y="22" text-anchor="middle" font-size="14" '
        f'font-weight="bold">{escape(title)}</text>'
        f'<rect x="{LEFT}" y="{TOP}" width="{SIZE}" height="{SIZE}" fill="none" stroke="#333"/>'
        f"{''.join(ticks)}"
        f'<line x1="{LEFT}" y1="{TOP + SIZE}" x2="{LEFT + SIZE}" y2="{TOP}" stroke="#bbb" '
        'stroke-dasharray="4 3"/>'
        f"{body}"
        f'<text x="{LEFT + SIZE / 2}" y="{TOP + SIZE + 42}" text-anchor="middle">'
        f"{escape(x_label)}</text>"
        f'<text transform="translate(18 {TOP + SIZE / 2}) rotate(-90)" text-anchor="middle">'
        f"{escape(y_label)}</text></svg>"
    )


def _point(x: float, y: float) -> str:
    return f"{LEFT + x * SIZE:.1f},{TOP + SIZE - y * SIZE:.1f}"


def roc_svg(positive_true: np.ndarray, scores: np.ndarray, auc: float, positive: str) -> Markup:
    fpr, tpr = roc_curve(positive_true, scores)
    points = " ".join(_point(x, y) for x, y in zip(fpr, tpr, strict=True))
    body = f'<polyline points="{points}" fill="none" stroke="#7b3fa0" stroke-width="2"/>'
    return _svg_frame(
        f"ROC for '{positive}' (AUC {_fmt(auc, 3)})",
        "false positive rate",
        "true positive rate",
        body,
    )


def reliability_svg(y_true: np.ndarray, probabilities: np.ndarray, bins: int = 10) -> Markup:
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == y_true
    ece = expected_calibration_error(y_true, probabilities, bins)
    edges = np.linspace(0, 1, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    bars = []
    for b in range(bins):
        members = index == b
        if not members.any():
            continue
        accuracy = float(correct[members].mean())
        x = LEFT + edges[b] * SIZE + 2
        y = TOP + SIZE - accuracy * SIZE
        bars.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{SIZE / bins - 4:.1f}" '
            f'height="{accuracy * SIZE:.1f}" fill="#7b3fa0" opacity="0.8">'
            f"<title>{edges[b]:.1f}-{edges[b + 1]:.1f}: {int(members.sum())} cells, "
            f"accuracy {accuracy:.2f}</title></rect>"
        )
    return _svg_frame(
        f"Reliability (ECE {ece:.3f})",
        "confidence (top-class probability)",
        "observed accuracy",
        "".join(bars),
    )
