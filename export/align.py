"""Align the members of a cross-validation before their outputs are averaged or judged.

    python -m export.align runs/cv-NAME [--out FILE]

The fold models of one recipe disagree in level: in the shipped run, fold 3's normal donors
average P(all) 0.48 against 0.35-0.38 in the others, and the slide cut-offs fitted on the
other folds vary from 0.51 to 0.60, so slide calls fail on offsets while each fold ranks its
own donors well (issue 26). Alignment gives each member a temperature and a bias on the
positive class's logit, fitted (donor-weighted) on donors that member never saw, so that
every member speaks on one scale.

Honestly evaluated: a donor's aligned predictions come from the member's alignment fitted
on the *other* donors of its fold (leave one donor out), and the decision rules are then
cross-fitted across folds as in ``export.cv``; no reported number is fitted on its own
donor. The report compares slide calls, slide AUC and the spread of the per-fold slide
cut-offs before and after.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from export.donors import Predictions, cross_fitted, number, read_predictions, weighted_nll
from smearscan.metrics import roc_auc

log = logging.getLogger("export.align")

TEMPERATURES = np.exp(np.linspace(np.log(0.5), np.log(2.0), 15))
BIASES = np.linspace(-2.0, 2.0, 41)


def shifted(probabilities: np.ndarray, positive: int, temperature: float, bias: float):
    """softmax(log p / T + bias on the positive class): any number of classes."""
    logits = np.log(np.clip(probabilities, 1e-12, 1.0)) / temperature
    logits[:, positive] += bias
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def balanced_weights(part: Predictions) -> np.ndarray:
    """Each class weighs the same, and each donor the same within its class: leaving one
    donor out must not move the fitted level towards the other class (with plain donor
    weights, a fold of 8 ALL and 4 normal donors shifts against whichever donor is left
    out, which reverses the ranking across donors)."""
    weights = part.donor_weights()
    for label in set(part.y.tolist()):
        members = part.y == label
        donors = len(set(part.patients[members].tolist()))
        weights[members] /= donors
    return weights


def fit_alignment(part: Predictions, positive: int) -> tuple[float, float]:
    """The temperature and positive-logit bias with the least class- and donor-balanced
    NLL."""
    weights = balanced_weights(part)
    best = (1.0, 0.0)
    best_loss = np.inf
    for temperature in TEMPERATURES:
        for bias in BIASES:
            loss = weighted_nll(
                part.y, shifted(part.probabilities, positive, temperature, bias), weights
            )
            if loss < best_loss:
                best, best_loss = (float(temperature), float(bias)), loss
    return best


def aligned(predictions: Predictions, positive: str) -> tuple[Predictions, dict]:
    """Each donor's predictions through its member's alignment fitted on the other donors
    of the member's fold; and each member's alignment on all its donors (what a shipped
    ensemble would store)."""
    pos = predictions.labels.index(positive)
    out = predictions.probabilities.copy()
    members = {}
    for fold in sorted(set(predictions.folds.tolist())):
        inside = predictions.folds == fold
        part = predictions.subset(inside)
        members[int(fold)] = fit_alignment(part, pos)
        for donor in sorted(set(part.patients.tolist())):
            rest = part.subset(part.patients != donor)
            if len(set(rest.y.tolist())) < 2:  # nothing to fit a level on: leave as is
                continue
            temperature, bias = fit_alignment(rest, pos)
            rows = inside & (predictions.patients == donor)
            out[rows] = shifted(predictions.probabilities[rows], pos, temperature, bias)
    result = Predictions(
        predictions.labels,
        predictions.paths,
        predictions.patients,
        predictions.y,
        predictions.folds,
        out,
    )
    return result, {f"fold_{k}": {"temperature": t, "bias": b} for k, (t, b) in members.items()}


def judged(predictions: Predictions, positive: str) -> dict:
    """Donor-level figures under cross-fitted rules, slide AUC and the cut-offs' spread."""
    _, summary, rules = cross_fitted(predictions, positive, ("balanced", 0.0), "mean")
    rows = summary["donor_rows"]
    truth = np.array([row["truth"] == positive for row in rows])
    scores = np.array([row["mean_p"] for row in rows])
    cutoffs = [rule.slide_cutoff for rule in rules]
    return {
        "roc_auc": summary["pooled"]["roc_auc"],
        "weighted_f1": summary["pooled"]["weighted_f1"],
        "macro_sensitivity": summary["macro_sensitivity"],
        "macro_specificity": summary["macro_specificity"],
        "slides_right": round(summary["slide_call_accuracy"] * summary["donors"]),
        "donors": summary["donors"],
        "slides_wrong": summary["slide_calls_wrong"],
        "slide_auc": roc_auc(truth, scores),
        "slide_cutoffs": [round(c, 4) for c in cutoffs],
        "cutoff_spread": round(max(cutoffs) - min(cutoffs), 4),
    }


def render(report: dict) -> str:
    lines = [
        "| | pooled ROC AUC | wF1 | donor-macro sens. | donor-macro spec. | slide AUC | "
        "slides right | per-fold slide cut-offs (spread) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ("as trained", "aligned"):
        r = report[name]
        lines.append(
            f"| {name} | {number(r['roc_auc'])} | {number(r['weighted_f1'])} | "
            f"{number(r['macro_sensitivity'])} | {number(r['macro_specificity'])} | "
            f"{number(r['slide_auc'])} | {r['slides_right']}/{r['donors']} | "
            f"{', '.join(number(c, '.3f') for c in r['slide_cutoffs'])} "
            f"({number(r['cutoff_spread'], '.3f')}) |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(
        prog="python -m export.align",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("cv_dir", type=Path, help="an export.cv folder (oof_predictions.csv)")
    parser.add_argument("--out", type=Path, help="align.json here (default: in the folder)")
    args = parser.parse_args(argv)
    try:
        cv = json.loads((args.cv_dir / "cv.json").read_text())
        predictions = read_predictions(args.cv_dir / "oof_predictions.csv")
    except (FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    positive = cv["positive_class"]
    after, members = aligned(predictions, positive)
    report = {
        "as trained": judged(predictions, positive),
        "aligned": judged(after, positive),
        "member_alignment_on_all_their_donors": members,
    }
    (args.out or args.cv_dir / "align.json").write_text(json.dumps(report, indent=2) + "\n")
    print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
