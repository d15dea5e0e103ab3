"""The embedded default model describes itself completely, and its recorded numbers are the
ones its committed out-of-fold predictions give."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest
from conftest import ROOT, rows

from smearscan import modelfile
from smearscan.inference import apply_temperature, load_classifier
from smearscan.metrics import roc_auc
from smearscan.modelfile import (
    DEFAULT_MODEL_NAME,
    INTENDED_USE,
    KEY_DECISION,
    KEY_ENSEMBLE,
    KEY_METRICS,
    KEY_QC,
    default_model_path,
)
from smearscan.policy import policy_for_model


def test_default_model_describes_itself():
    model = load_classifier(default_model_path(), device="cpu")
    info = model.info
    assert info.name == DEFAULT_MODEL_NAME
    assert model.labels == ["all", "hem"] and info.positive_class == "all"
    data = info.json_field("smearscan.training_data")
    assert "C-NMC 2019" in data["description"] and "CC BY 3.0" in data["description"]
    assert info.metadata["smearscan.intended_use"] == INTENDED_USE
    decision = json.loads(info.metadata[KEY_DECISION])
    assert decision["cell"]["rule"] == "threshold" and 0 < decision["cell"]["threshold"] < 1
    assert decision["slide"]["rule"] in ("mean", "fraction")
    policy = policy_for_model(info.labels, info.positive_class, info.metadata)
    assert policy.threshold == decision["cell"]["threshold"]
    qc = json.loads(info.metadata[KEY_QC])
    assert qc["crops"] > 1000 and set(qc["limits"]) == {"default", "strict"}
    assert model.temperature > 0


def first_code_span(line: str) -> str:
    """The first `name` of a Markdown table row."""
    found = re.search(r"`([^`]+)`", line)
    assert found, line
    return found.group(1)


def documented_keys() -> set[str]:
    """The keys of docs/model-file.md's table (the contract a lab's tools may rely on)."""
    text = (ROOT / "docs" / "model-file.md").read_text(encoding="utf-8")
    return set(re.findall(r"^\| `(smearscan\.[a-z_]+)` \|", text, flags=re.MULTILINE))


def defined_keys() -> set[str]:
    return {value for name, value in vars(modelfile).items() if name.startswith("KEY_")}


def test_the_model_file_contract_lists_every_key_and_nothing_else():
    assert documented_keys() == defined_keys()
    assert len(defined_keys()) == 16
    shipped = set(load_classifier(default_model_path(), device="cpu").info.metadata)
    assert shipped <= documented_keys(), shipped - documented_keys()


KEPT = ROOT / "export" / "default_model"


def _out_of_fold() -> tuple[list[dict[str, str]], dict]:
    return rows(KEPT / "oof_predictions.csv"), json.loads((KEPT / "cv.json").read_text())


def test_the_shipped_weights_are_the_kept_fold_models():
    """The embedded model is the average of the fold models kept in export/default_model
    (what ``--init-from default`` fine-tunes), not some other run."""
    ensemble = load_classifier(device="cpu").info.json_field(KEY_ENSEMBLE)
    folds = sorted(KEPT.glob("fold_*/model.keras"))
    assert ensemble["members"] == len(folds) == 4
    kept = [hashlib.sha256(path.read_bytes()).hexdigest() for path in folds]
    assert ensemble["member_sha256"] == kept


def _cross_fitted(predictions: list[dict[str, str]], report: dict):
    """Each cell's calibrated P(all) and call under the rules of the fold that never saw it."""
    p_all = np.array([float(r["p_all"]) for r in predictions])
    calibrated = np.zeros(len(predictions))
    called = np.zeros(len(predictions), dtype=bool)
    for fold, rules in enumerate(report["per_fold_rules"]):
        mine = np.array([int(r["fold"]) == fold for r in predictions])
        probabilities = np.stack([p_all[mine], 1 - p_all[mine]], axis=1)
        calibrated[mine] = apply_temperature(probabilities, rules["temperature"])[:, 0]
        called[mine] = calibrated[mine] >= rules["threshold"]
    return calibrated, called


def _donor_specificity(predictions: list[dict[str, str]], called: np.ndarray) -> list[float]:
    donors = sorted({r["patient"] for r in predictions if r["label"] == "hem"})
    patients = np.array([r["patient"] for r in predictions])
    return [1 - called[patients == d].mean() for d in donors]


def test_recorded_out_of_fold_metrics_follow_from_the_kept_predictions():
    """Recompute the model card's headline numbers from the committed out-of-fold
    predictions with the cross-fitted rules: every donor judged by a model and a
    threshold that never saw it."""
    predictions, report = _out_of_fold()
    recorded = load_classifier(device="cpu").info.json_field(KEY_METRICS)["out_of_fold"]
    assert len({r["patient"] for r in predictions}) == 48 and len(predictions) == 7529
    truth = np.array([r["label"] == "all" for r in predictions])
    calibrated, called = _cross_fitted(predictions, report)
    assert roc_auc(truth, calibrated) == pytest.approx(recorded["roc_auc"], abs=1e-6)
    assert (called == truth).mean() == pytest.approx(recorded["accuracy"], abs=1e-6)
    specificity = _donor_specificity(predictions, called)
    assert len(specificity) == 16
    assert np.mean(specificity) == pytest.approx(recorded["macro_specificity"], abs=1e-3)
    assert min(specificity) == pytest.approx(recorded["worst_specificity"], abs=1e-3)


def test_the_model_card_states_the_shift_suites_sample_size():
    """The shift suite takes up to ``crops_per_donor`` crops of each donor (an audit found
    the card claiming 40 of every donor): the stated count follows from the kept reports."""
    per_donor = json.loads((KEPT / "shift.json").read_text())["crops_per_donor"]
    cells: dict[str, int] = {}
    for row in rows(KEPT / "oof_predictions.csv"):
        cells[row["patient"]] = cells.get(row["patient"], 0) + 1
    sampled = sum(min(count, per_donor) for count in cells.values())
    card = (ROOT / "docs" / "model-card.md").read_text()
    assert f"Up to {per_donor} crops per donor ({sampled:,} crops" in card
    assert sampled < per_donor * len(cells)  # some donors have fewer


RUNS = sorted(p.parent for p in (ROOT / "export" / "ablation_runs").glob("*/oof_predictions.csv"))


@pytest.mark.parametrize("run", RUNS, ids=[run.name for run in RUNS])
def test_every_committed_run_reports_what_its_predictions_say(run):
    """Issue 26.6: the figures docs/ablation.md cites come from each run's cv.json; they
    must follow from the out-of-fold predictions committed beside it."""
    predictions = rows(run / "oof_predictions.csv")
    recorded = json.loads((run / "cv.json").read_text())["cross_fitted"]
    assert len(predictions) == recorded["cells"] == 7529
    truth = np.array([r["label"] == "all" for r in predictions])
    calibrated, called = _cross_fitted(predictions, json.loads((run / "cv.json").read_text()))
    assert roc_auc(truth, calibrated) == pytest.approx(recorded["pooled"]["roc_auc"], abs=1e-6)
    assert (called == truth).mean() == pytest.approx(recorded["pooled"]["accuracy"], abs=1e-6)
    specificity = _donor_specificity(predictions, called)
    assert np.mean(specificity) == pytest.approx(recorded["macro_specificity"], abs=1e-3)


def test_the_two_seed_average_is_the_mean_of_the_two_seeds_predictions():
    """The averaging verdict in docs/ablation.md compares an average with its members: the
    committed average must be exactly theirs, cell by cell, on the same folds."""
    runs = ROOT / "export" / "ablation_runs"
    seed0 = {r["path"]: r for r in rows(KEPT / "oof_predictions.csv")}
    seed1 = {r["path"]: r for r in rows(runs / "cv-bbox-hue-seed1" / "oof_predictions.csv")}
    averaged = rows(runs / "cv-seeds-averaged" / "oof_predictions.csv")
    assert len(averaged) == len(seed0) == len(seed1) == 7529
    for row in averaged:
        assert row["fold"] == seed0[row["path"]]["fold"] == seed1[row["path"]]["fold"]
        mean = (float(seed0[row["path"]]["p_all"]) + float(seed1[row["path"]]["p_all"])) / 2
        assert float(row["p_all"]) == pytest.approx(mean, abs=2e-6)


def test_the_rotation_table_is_what_the_committed_reports_say():
    """Issue 26.5: docs/ablation.md's rotation-consistency rows come from each run's
    committed rotation.json."""
    text = (ROOT / "docs" / "ablation.md").read_text()
    section = text[text.index("### Rotation consistency") :]
    table = [line for line in section.split("\n\n")[2].splitlines() if line.startswith("| `")]
    named = {first_code_span(line) for line in table}
    committed = {p.parent.name for p in (ROOT / "export" / "ablation_runs").glob("*/rotation.json")}
    assert named == committed | {"cv-bbox-hue"}  # a row for every committed measurement
    for line in table:
        name = first_code_span(line)
        folder = KEPT if name == "cv-bbox-hue" else ROOT / "export" / "ablation_runs" / name
        report = json.loads((folder / "rotation.json").read_text())
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == f"{report['plain_view_agreement']:.3f}"
        assert cells[3] == f"{report['all_views_agree']:.3f}"
        assert cells[5] == f"{report['plain_roc_auc']:.4f}"
        assert cells[6] == f"{report['eight_view_roc_auc']:.4f}"
