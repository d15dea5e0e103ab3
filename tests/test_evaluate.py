"""smearscan evaluate on real crops: metrics match a hand computation from the scan rows."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from conftest import CNMC
from test_scan_cli import rows, run

from smearscan.exitstatus import ExitStatus
from smearscan.metrics import roc_auc


def test_evaluate_with_folder_labels_matches_the_scan_rows(tmp_path):
    out = tmp_path / "eval"
    result = run(["evaluate", str(CNMC), "--out", str(out)])
    assert result.exit_code == 0, result.output + result.log
    predictions = rows(out / "predictions.csv")
    assert len(predictions) == 24
    truth = [r["path"].split("/")[0] for r in predictions]
    called = [r["label"] for r in predictions]
    tp = sum(t == "all" and c == "all" for t, c in zip(truth, called, strict=True))
    tn = sum(t == "hem" and c == "hem" for t, c in zip(truth, called, strict=True))
    metrics = json.loads((out / "metrics.json").read_text())["cells"]
    assert metrics["n"] == 24
    assert metrics["sensitivity"] == pytest.approx(tp / 12)
    assert metrics["specificity"] == pytest.approx(tn / 12)
    assert metrics["accuracy"] == pytest.approx((tp + tn) / 24)
    scores = np.array([float(r["p_all"]) for r in predictions])
    assert metrics["roc_auc"] == pytest.approx(roc_auc(np.array(truth) == "all", scores))
    for name in ["roc.png", "reliability.png"]:
        image = cv2.imread(str(out / name))
        assert image is not None and image.shape[0] > 300
    assert "sensitivity" in (out / "evaluation.html").read_text()
    assert f"sensitivity {metrics['sensitivity']:.4f}" in result.output


def test_evaluate_with_labels_csv_and_slide_accuracy(tmp_path, slide_tree):
    lines = ["path,label"]
    for path in sorted(slide_tree.rglob("*.*")):
        lines.append(
            f"{path.relative_to(slide_tree)},{'all' if 'patient_A' in str(path) else 'hem'}"
        )
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join(lines) + "\n")
    out = tmp_path / "eval"
    result = run(["evaluate", str(slide_tree), "--labels", str(labels), "--out", str(out)])
    assert result.exit_code == 0, result.output
    document = json.loads((out / "metrics.json").read_text())
    slides = document["slides"]["slides"]
    assert set(slides) == {"patient_A", "patient_B"}
    assert slides["patient_A"]["true_label"] == "all"
    correct = [s["correct"] for s in slides.values()]
    assert document["slides"]["accuracy"] == pytest.approx(sum(correct) / 2)


def test_labels_csv_problems_are_clear(tmp_path, slide_tree):
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\npatient_A/missing.png,all\n")
    some = next(p for p in slide_tree.rglob("*.*"))
    labels.write_text(
        f"path,label\npatient_A/missing.png,all\n{some.relative_to(slide_tree)},blast\n"
    )
    result = run(
        ["evaluate", str(slide_tree), "--labels", str(labels), "--out", str(tmp_path / "e")]
    )
    assert result.exit_code == ExitStatus.USAGE
    assert "not found (line 2: patient_A/missing.png)" in result.output
    assert "unknown label(s) 'blast'" in result.output
    labels.write_text("file,class\nx,all\n")
    result = run(
        ["evaluate", str(slide_tree), "--labels", str(labels), "--out", str(tmp_path / "e")]
    )
    assert "columns 'path' and 'label'" in result.output


def test_tta_changes_probabilities_but_not_shape(tmp_path, slide_tree):
    plain, tta = tmp_path / "a.csv", tmp_path / "b.csv"
    run(["scan", str(slide_tree), "--out", str(plain), "--no-html"])
    run(["scan", str(slide_tree), "--out", str(tta), "--no-html", "--tta"])
    a, b = rows(plain), rows(tta)
    assert [r["path"] for r in a] == [r["path"] for r in b]
    assert any(r["p_all"] != s["p_all"] for r, s in zip(a, b, strict=True))
