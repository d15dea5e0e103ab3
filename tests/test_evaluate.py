"""smearscan evaluate on real crops: metrics match a hand computation from the scan rows,
QC exclusions are counted, and the page is a validation record."""

from __future__ import annotations

import json
import os
import time
import xml.etree.ElementTree as ElementTree

import cv2
import numpy as np
import pytest
from conftest import CNMC, fixture_images, read_bgr, rows, run

from smearscan.exitstatus import ExitStatus
from smearscan.metrics import roc_auc
from smearscan.modelfile import default_model_path, file_sha256


def test_evaluate_with_folder_labels_matches_the_scan_rows(tmp_path):
    out = tmp_path / "eval"
    result = run(["evaluate", str(CNMC), "--out", str(out)])
    predictions = rows(out / "predictions.csv")
    assert len(predictions) == 24
    truth = [r["path"].split("/")[0] for r in predictions]
    called = [r["label"] for r in predictions]
    tp = sum(t == "all" and c == "all" for t, c in zip(truth, called, strict=True))
    tn = sum(t == "hem" and c == "hem" for t, c in zip(truth, called, strict=True))
    metrics = json.loads((out / "metrics.json").read_text())["cells"]
    assert metrics["n"] == 24 and metrics["excluded"]["count"] == 0
    assert metrics["sensitivity"] == pytest.approx(tp / 12)
    assert metrics["specificity"] == pytest.approx(tn / 12)
    assert metrics["accuracy"] == pytest.approx((tp + tn) / 24)
    scores = np.array([float(r["p_all"]) for r in predictions])
    assert metrics["roc_auc"] == pytest.approx(roc_auc(np.array(truth) == "all", scores))
    for name in ["roc.svg", "reliability.svg"]:
        svg = ElementTree.parse(out / name).getroot()
        texts = [t.text for t in svg.iter("{http://www.w3.org/2000/svg}text")]
        assert any("rate" in (t or "") or "accuracy" in (t or "") for t in texts), texts
        assert svg.get("viewBox")
    page = (out / "evaluation.html").read_text()
    assert file_sha256(default_model_path()) in page and "Research use only" in page
    assert "smearscan" in page and "date (UTC)" in page
    assert f"sensitivity {metrics['sensitivity']:.4f}" in result.output
    # a flat all/, hem/ layout has no slides: said so, never scored as two "slides"
    slides = json.loads((out / "metrics.json").read_text())["slides"]
    assert slides["slides"] == {} and slides["accuracy"] is None
    assert "no slides" in slides["note"] and "no slides" in result.output
    assert 'id="no-slides"' in page
    # 95 % Wilson intervals on every proportion
    low, high = metrics["intervals"]["sensitivity"]
    assert 0 <= low <= metrics["sensitivity"] <= high <= 1 and high - low > 0.2  # 12 cells
    assert "95 % CI" in page


def test_evaluate_with_labels_csv_and_slide_accuracy(tmp_path, slide_tree):
    lines = ["path,label"]
    for path in sorted(slide_tree.rglob("*.*")):
        lines.append(
            f"{path.relative_to(slide_tree)},{'all' if 'patient_A' in str(path) else 'hem'}"
        )
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join(lines) + "\n")
    out = tmp_path / "eval"
    run(
        [
            "evaluate",
            str(slide_tree),
            "--labels",
            str(labels),
            "--out",
            str(out),
            "--min-cells",
            "2",
        ]
    )
    document = json.loads((out / "metrics.json").read_text())
    slides = document["slides"]["slides"]
    assert set(slides) == {"patient_A", "patient_B"}
    assert slides["patient_A"]["true_label"] == "all"
    correct = [s["correct"] for s in slides.values()]
    assert document["slides"]["accuracy"] == pytest.approx(sum(correct) / 2)
    # each slide (donor) counted once, and the slide scores ranked
    summary = document["slides"]
    assert summary["macro_sensitivity"] == slides["patient_A"]["cell_accuracy"]
    assert summary["macro_specificity"] == slides["patient_B"]["cell_accuracy"]
    expected_auc = float(slides["patient_A"]["score"] > slides["patient_B"]["score"])
    assert summary["slide_auc"] == pytest.approx(expected_auc)
    assert "Each slide counted once" in (out / "evaluation.html").read_text()
    # with the default minimum of 10 usable cells, 4-cell slides are not called or scored
    run(["evaluate", str(slide_tree), "--labels", str(labels), "--out", str(out)])
    document = json.loads((out / "metrics.json").read_text())
    assert {s["call"] for s in document["slides"]["slides"].values()} == {"insufficient"}
    assert document["slides"]["accuracy"] is None


def test_crops_failing_qc_are_excluded_and_counted(tmp_path):
    root = tmp_path / "labelled"
    for label in ("all", "hem"):
        folder = root / label
        folder.mkdir(parents=True)
        for source in (p for p in fixture_images() if p.parent.name == label):
            cv2.imwrite(str(folder / f"{source.stem}.png"), read_bgr(source))
        blank = np.full((450, 450, 3), 255, np.uint8)
        cv2.imwrite(str(folder / "blank.png"), blank)
    out = tmp_path / "eval"
    result = run(["evaluate", str(root), "--out", str(out)], expect=ExitStatus.SOME_UNUSABLE)
    metrics = json.loads((out / "metrics.json").read_text())["cells"]
    assert metrics["n"] == 24 and metrics["excluded"]["count"] == 2
    assert "(2 excluded by QC or unreadable)" in result.output
    assert "2 crops excluded" in (out / "evaluation.html").read_text()


def test_labels_csv_problems_are_clear(tmp_path, slide_tree):
    labels = tmp_path / "labels.csv"
    some = next(p for p in slide_tree.rglob("*.*"))
    labels.write_text(
        f"path,label\npatient_A/missing.png,all\n{some.relative_to(slide_tree)},blast\n"
    )
    result = run(
        ["evaluate", str(slide_tree), "--labels", str(labels), "--out", str(tmp_path / "e")],
        expect=ExitStatus.USAGE,
    )
    assert "not found (line 2: patient_A/missing.png)" in result.log
    assert "unknown label(s) 'blast'" in result.log
    labels.write_text("file,class\nx,all\n")
    result = run(
        ["evaluate", str(slide_tree), "--labels", str(labels), "--out", str(tmp_path / "e")],
        expect=ExitStatus.USAGE,
    )
    assert "columns 'path' and 'label'" in result.log


def test_labels_files_that_are_not_plain_utf8_csv_are_refused_not_hung_on(tmp_path, slide_tree):
    """Issue 22: a FIFO as --labels blocked for ever; cp1252 text, a huge field and a file
    listed twice with two labels gave tracebacks or a silent winner."""
    args = ["evaluate", str(slide_tree), "--out", str(tmp_path / "e"), "--labels"]
    pipe = tmp_path / "labels.fifo"
    os.mkfifo(pipe)
    started = time.monotonic()
    result = run([*args, str(pipe)], expect=ExitStatus.USAGE)
    assert time.monotonic() - started < 30 and "not a regular file" in result.log
    some = sorted(p for p in slide_tree.rglob("*.*"))[0].relative_to(slide_tree)
    labels = tmp_path / "labels.csv"
    labels.write_bytes(f"path,label\n{some},all\n".encode() + b"caf\xe9.png,hem\n")
    assert "not UTF-8" in run([*args, str(labels)], expect=ExitStatus.USAGE).log
    labels.write_text(f"path,label\n{some},{'a' * 200_000}\n")
    assert "not a readable CSV" in run([*args, str(labels)], expect=ExitStatus.USAGE).log
    labels.write_text(f"path,label\n{some},all\n{some},hem\n")
    result = run([*args, str(labels)], expect=ExitStatus.USAGE)
    assert "listed twice with different labels" in result.log


def test_tta_changes_probabilities_but_not_shape(tmp_path, slide_tree):
    plain, tta = tmp_path / "a.csv", tmp_path / "b.csv"
    run(["scan", str(slide_tree), "--out", str(plain), "--no-html"])
    run(["scan", str(slide_tree), "--out", str(tta), "--no-html", "--tta"])
    a, b = rows(plain), rows(tta)
    assert [r["path"] for r in a] == [r["path"] for r in b]
    assert any(r["p_all"] != s["p_all"] for r, s in zip(a, b, strict=True))
