"""README "Retraining on your own crops", run as written (with ``--folds 2 --epochs 1
--per-patient 20`` added to keep it short) on a small lab-layout set made from the fixture
crops: 4 ALL and 4 normal donors, 12 crops each (enough for a slide call),
``DATA/<patient>/<label>/``. Real processes, real training."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CNMC, ROOT, require_training_stack, rows

require_training_stack()
pytestmark = pytest.mark.train

from export import cv, train  # noqa: E402
from export.config import TrainConfig  # noqa: E402
from smearscan.inference import load_classifier  # noqa: E402
from smearscan.preprocess import Recipe  # noqa: E402

SHORT = ["--folds", "2", "--epochs", "1", "--per-patient", "20"]
CROPS = 12


def lab_layout(root: Path, donors_per_class: int = 4, crops: int = CROPS) -> Path:
    """``DATA/<patient>/<label>/<image>`` as a lab would arrange its own crops."""
    data = root / "DATA"
    for label in ("all", "hem"):
        sources = sorted((CNMC / label).glob("*.webp"))
        for donor in range(donors_per_class):
            folder = data / f"{label}_patient_{donor}" / label
            folder.mkdir(parents=True)
            for index in range(crops):
                source = sources[(index + donor) % len(sources)]
                shutil.copy(source, folder / f"crop_{index:03d}.webp")
    return data


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    """One README line, as a lab runs it: from the repository root, its own process."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", *args],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
    )


def finish(process: subprocess.Popen) -> tuple[int, str]:
    """Its exit code and stderr (killed after 15 minutes)."""
    try:
        _, stderr = process.communicate(timeout=900)
    finally:
        process.kill()
    return process.returncode, stderr


def _check_step(step: list[str], returncode: int, stderr: str) -> None:
    allowed = (0, 3) if step[0] == "smearscan" else (0,)
    assert returncode in allowed, " ".join(step) + "\n" + stderr[-3000:]
    if step[0] == "export.cv":
        folder = Path(step[step.index("--out") + 1])
        report = (folder / "cv.md").read_text()
        assert "n/a" in report or "large cells" in report  # no large-cell donor: n/a
        assert (folder / "oof_predictions.csv").exists()
        assert (folder / "shift.md").exists() != ("--no-shift" in step)


def test_the_readme_retraining_commands_work_on_a_lab_layout(tmp_path):
    data = lab_layout(tmp_path)
    runs = tmp_path / "runs"
    mylab = tmp_path / "mylab.onnx"
    steps = [
        ["export.cv", "--data", str(data), "--folds", "4", "--out", str(runs / "cv-mylab")],
        ["export.to_onnx", str(runs / "cv-mylab"), "--out", str(mylab)],
        ["smearscan", "scan", str(data), "--out", str(tmp_path / "r.csv"), "--model", str(mylab)],
        [
            "export.cv",
            "--data",
            str(data),
            "--out",
            str(runs / "cv-finetune"),
            "--init-from",
            "default",
            "--epochs",
            "5",
        ],
    ]
    for step in steps:
        if step[0] == "export.cv":  # SHORT added, the last value wins
            step += SHORT
        if "--init-from" in step:  # the shift suite already ran on the first model
            step.append("--no-shift")
    # the fine-tuning needs nothing from the first model: it runs beside the other steps
    *chain, finetune = steps
    beside = start(finetune, ROOT)
    try:
        for step in chain:
            _check_step(step, *finish(start(step, ROOT)))
    finally:
        code, stderr = finish(beside)
    _check_step(finetune, code, stderr)
    # the defaults are the shipped recipe: the retrained file prepares crops as the shipped one
    shipped, retrained = load_classifier(device="cpu").info, load_classifier(mylab, "cpu").info
    assert retrained.recipe == shipped.recipe
    assert len(rows(tmp_path / "r.csv")) == 8 * CROPS
    finetuned = json.loads((runs / "cv-finetune" / "fold_0" / "config.json").read_text())
    assert finetuned["recipe"] == json.loads(shipped.recipe.to_json())
    assert finetuned["parent"] is not None


def test_the_training_defaults_are_the_shipped_recipe():
    """export.cv's defaults and the shipped model's recipe cannot drift apart."""
    shipped = json.loads((ROOT / "export" / "default_model" / "fold_0" / "config.json").read_text())
    defaults = train.parse_config(["--data", shipped["args"]["data"], "--out", "runs/x"])
    stored = TrainConfig.of_run(ROOT / "export" / "default_model" / "fold_0")
    assert stored.differences(defaults) == []
    assert defaults.recipe == Recipe.from_json(json.dumps(shipped["recipe"]))


def test_init_from_takes_the_parents_preprocessing_and_refuses_a_conflicting_one(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    config = train.parse_config(["--data", "DATA", "--out", "runs/x", "--init-from", "default"])
    assert config.recipe == load_classifier(device="cpu").info.recipe
    assert "preprocessing taken from the parent" in caplog.text
    data = lab_layout(tmp_path, donors_per_class=2, crops=4)
    code = cv.main(
        [
            "--data",
            str(data),
            "--out",
            str(tmp_path / "cv"),
            "--init-from",
            "default",
            "--crop",
            "window",
            "--folds",
            "2",
            "--epochs",
            "1",
            "--no-shift",
        ]
    )
    assert code == 2
    assert "leave out --crop" in caplog.text


def test_report_renderers_write_n_a_for_every_absent_figure():
    """Issue 25: a lab set without large-cell normal donors (or with one class, or one donor
    in a fold) leaves figures undefined; the Markdown reports must say n/a, not crash."""
    from export import shift

    empty = {
        "pooled": dict.fromkeys(("weighted_f1", "roc_auc", "sensitivity", "specificity")),
        "macro_sensitivity": None,
        "macro_specificity": None,
        "worst_positive_donor": None,
        "worst_sensitivity": None,
        "worst_negative_donor": None,
        "worst_specificity": None,
        "slide_call_accuracy": None,
        "donors": 2,
        "donor_rows": [
            {
                "patient": "P1",
                "truth": "all",
                "cells": 3,
                "called_positive": None,
                "mean_p": None,
                "call": "insufficient",
            }
        ],
    }
    report = {
        "positive_class": "all",
        "argmax": empty,
        "cross_fitted": empty,
        "cell_size": {
            "threshold_px": 29000,
            "large_cell_donors": 0,
            "small_cell_donors": 1,
            "large_cell_macro_specificity": None,
            "small_cell_macro_specificity": None,
        },
        "rules_on_all_donors": {
            "temperature": None,
            "threshold": None,
            "slide_rule": "mean",
            "slide_cutoff": None,
        },
        "operating_point": "balanced",
    }
    text = cv.render_markdown(report, "empty")
    assert "n/a" in text
    figures = dict.fromkeys(
        (
            "weighted_f1",
            "roc_auc",
            "sensitivity",
            "specificity",
            "macro_specificity",
            "agreement",
            "slide_call_accuracy",
        )
    )
    shifted = shift.render_markdown({"shifts": {"none": figures}, "targets": {}}, "empty")
    assert "| none | n/a | n/a |" in shifted
