"""The one decision policy: cell labels, thresholds, slide scores and calls."""

from __future__ import annotations

import json

import numpy as np
import pytest

from smearscan.modelfile import KEY_CALIBRATION, KEY_DECISION
from smearscan.policy import DecisionPolicy, PolicyError, policy_for_model

LABELS = ("all", "hem")


def test_threshold_rule_labels_by_p_positive_and_argmax_otherwise():
    p = np.array([[0.30, 0.70], [0.45, 0.55], [0.9, 0.1]])
    assert DecisionPolicy(LABELS, "all", 0.4).cell_labels(p) == ["hem", "all", "all"]
    assert DecisionPolicy(LABELS, "all", None).cell_labels(p) == ["hem", "hem", "all"]
    assert DecisionPolicy(LABELS, "all", 0.45).cell_label([0.45, 0.55]) == "all"  # >= cut-off
    three = DecisionPolicy(("all", "aml", "hem"), None)
    assert three.cell_labels(np.array([[0.2, 0.5, 0.3]])) == ["aml"]


def test_a_threshold_on_a_model_it_cannot_apply_to_is_refused():
    with pytest.raises(PolicyError, match="two-class"):
        DecisionPolicy(("all", "aml", "hem"), "all", 0.5)
    with pytest.raises(PolicyError, match="two-class"):
        DecisionPolicy(LABELS, None, 0.5)
    with pytest.raises(PolicyError):
        DecisionPolicy(LABELS, "all", float("nan"))
    with pytest.raises(PolicyError):
        DecisionPolicy(LABELS, "blast")


@pytest.mark.parametrize(
    ("rule", "cells", "positives", "positive_sum", "call"),
    [
        ("fraction", 20, 10, 5.0, "all-suspect"),  # 0.5 >= 0.5
        ("fraction", 20, 9, 15.0, "not-flagged"),
        ("mean", 20, 0, 10.0, "all-suspect"),  # mean P 0.5
        ("mean", 20, 20, 9.0, "not-flagged"),  # mean P 0.45
        ("mean", 9, 9, 9.0, "insufficient"),  # too few usable cells
    ],
)
def test_slide_calls(rule, cells, positives, positive_sum, call):
    policy = DecisionPolicy(LABELS, "all", 0.5, rule, 0.5, 10)
    assert policy.slide_call(cells, positives, positive_sum) == call


def test_no_positive_class_makes_no_slide_call():
    policy = DecisionPolicy(("a", "b", "c"), None)
    assert policy.slide_call(50, 0, 0.0) is None and policy.slide_rule_text() is None


def test_model_rule_with_overrides_and_older_files():
    decision = {
        "cell": {"rule": "threshold", "threshold": 0.37},
        "slide": {"rule": "mean", "cutoff": 0.42, "min_cells": 12},
    }
    policy = policy_for_model(LABELS, "all", {KEY_DECISION: json.dumps(decision)})
    assert (policy.threshold, policy.slide_rule, policy.slide_cutoff, policy.min_cells) == (
        0.37,
        "mean",
        0.42,
        12,
    )
    changed = policy_for_model(
        LABELS,
        "all",
        {KEY_DECISION: json.dumps(decision)},
        threshold=0.6,
        slide_rule="fraction",
        min_cells=3,
    )
    assert (changed.threshold, changed.slide_rule, changed.min_cells) == (0.6, "fraction", 3)
    older = policy_for_model(LABELS, "all", {KEY_CALIBRATION: json.dumps({"threshold": 0.3})})
    assert older.threshold == 0.3 and older.slide_rule == "fraction" and older.slide_cutoff == 0.5
    text = policy.to_dict()
    assert text["cell_rule_text"] == "a cell is 'all' when P(all) >= 0.37, else 'hem'"
    assert "mean P(all)" in text["slide_rule_text"] and "fewer than 12" in text["slide_rule_text"]


@pytest.mark.parametrize(
    "policy",
    [
        DecisionPolicy(LABELS, "all", 0.5745, "mean", 0.5717, 10),
        DecisionPolicy(LABELS, "all", None, "fraction", 0.0, 1),
        DecisionPolicy(("all", "aml", "hem"), "all", None, "mean", 0.3, 25),
        DecisionPolicy(("all", "aml", "hem"), None),
    ],
)
def test_a_policy_writes_and_reads_itself_through_model_metadata_and_a_summary(policy):
    """One home for the rule's stored form: what the export writes, a scan reads back, and
    what a summary says, merge rebuilds (a cut-off of 0 stays 0)."""
    text = policy.to_metadata(fitted_on="somewhere")
    stored = json.loads(text)
    assert stored["version"] == 1 and stored["fitted_on"] == "somewhere"
    assert (
        DecisionPolicy.from_metadata(policy.labels, policy.positive, {KEY_DECISION: text}) == policy
    )
    assert DecisionPolicy.from_summary(policy.to_dict()) == replace_defaults(policy)


def replace_defaults(policy: DecisionPolicy) -> DecisionPolicy:
    """A summary of a model without a positive class leaves the slide rule empty."""
    if policy.positive is not None:
        return policy
    return DecisionPolicy(policy.labels, None, policy.threshold)


def test_a_newer_decision_rule_is_refused_not_guessed():
    text = json.dumps({"version": 2, "cell": {"rule": "argmax"}, "slide": {}})
    with pytest.raises(PolicyError, match="version 2"):
        DecisionPolicy.from_metadata(LABELS, "all", {KEY_DECISION: text})
