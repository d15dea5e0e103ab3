"""Donor-level cross-validation of a training recipe: the protocol every recipe decision uses.

    python -m export.cv --data ../shared/data/cnmc --folds 4 --out runs/cv-NAME [train options]

Trains one model per patient-disjoint fold (grouped by donor, stratified by class; any
``python -m export.train`` option sets the recipe), keeps each fold's weights, pools the
out-of-fold predictions of every donor and reports, per donor and macro over donors, with
calibration, operating threshold and slide cut-off cross-fitted (fitted on the other folds).
Then it runs the shift suite (``export.shift``) and the rotation-consistency measurement
(``export.rotation``) on the same out-of-fold donors. Folds already trained with the same
options are reused, so an interrupted run resumes.

Writes to ``--out``: ``fold_K/`` (training runs), ``oof_predictions.csv``, ``cv.json``,
``cv.md`` and, with the shift suite, ``shift.json``, ``shift.md`` and ``rotation.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from export import train as training
from export.config import TrainConfig, config_from_options
from export.donors import (
    Predictions,
    cross_fitted,
    fit_rules,
    number,
    parse_operating_point,
    read_predictions,
    write_predictions,
)
from export.size_reading import cell_areas, size_reading
from smearscan.policy import call_is_right

log = logging.getLogger("export.cv")

#: Normal donors whose median segmented cell area is at least this are "large-cell" donors:
#: in the training set normal cells are mostly small (about 23,000 px) and blasts large
#: (about 36,000 px), while in other acquisition batches normal cells measure 31,000-36,000
#: px. Specificity on these donors is where a model that reads size as malignancy fails.
LARGE_CELL_AREA = 29_000

DEFAULT_OPERATING_POINT = "balanced"


def build_parser() -> argparse.ArgumentParser:
    parser = training.build_parser(prog="python -m export.cv")
    parser.description = __doc__.split("\n")[0]
    parser.add_argument(
        "--operating-point",
        default=DEFAULT_OPERATING_POINT,
        help="how the cell threshold on P(positive) is fitted: 'balanced' (best donor-weighted "
        "mean of sensitivity and specificity) or 'sensitivity:0.95'",
    )
    parser.add_argument(
        "--slide-rule",
        default="mean",
        choices=("mean", "fraction"),
        help="slide score: mean P(positive) of the cells, or the fraction labelled positive",
    )
    parser.add_argument(
        "--shift",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the shift suite and the rotation consistency on the out-of-fold donors",
    )
    parser.add_argument(
        "--average-of",
        nargs="+",
        type=Path,
        metavar="CV_DIR",
        help="train nothing: evaluate the average of these runs' out-of-fold predictions "
        "(the same folds, other seeds), to measure what averaging models buys",
    )
    return parser


def fold_config(config: TrainConfig, out: Path, fold: int) -> TrainConfig:
    return config.for_fold(fold, out / f"fold_{fold}")


def train_fold(config: TrainConfig) -> None:
    """Train one fold unless a finished run that trains the same model is already there."""
    if (config.out / "metrics.json").exists():
        differing = TrainConfig.of_run(config.out).differences(config)
        if differing:
            raise ValueError(
                f"{config.out} was trained with other options ({', '.join(differing)}); "
                "use a new --out"
            )
        log.info("fold %d: reusing %s", config.split.fold, config.out)
        return
    import keras

    keras.backend.clear_session()
    log.info("fold %d: training into %s", config.split.fold, config.out)
    training.train(config)


def pooled_predictions(out: Path, folds: int, labels: list[str] | None = None) -> Predictions:
    parts = []
    for fold in range(folds):
        part = read_predictions(out / f"fold_{fold}" / "val_predictions.csv", labels)
        part.folds[:] = fold
        parts.append(part)
    first = parts[0]
    return Predictions(
        first.labels,
        [p for part in parts for p in part.paths],
        np.concatenate([p.patients for p in parts]),
        np.concatenate([p.y for p in parts]),
        np.concatenate([p.folds for p in parts]),
        np.concatenate([p.probabilities for p in parts]),
    )


def averaged_predictions(folders: list[Path]) -> Predictions:
    """The mean of several CV runs' out-of-fold probabilities, crop by crop; the runs must
    have held out each donor in the same fold."""
    runs = [read_predictions(folder / "oof_predictions.csv") for folder in folders]
    first = runs[0]
    for folder, other in zip(folders[1:], runs[1:], strict=True):
        if other.paths != first.paths or not np.array_equal(other.folds, first.folds):
            raise ValueError(f"{folder} did not hold out the same donors in the same folds")
    return Predictions(
        first.labels,
        first.paths,
        first.patients,
        first.y,
        first.folds,
        np.mean([r.probabilities for r in runs], axis=0),
    )


def crop_cell_areas(data: Path, workers: int) -> dict[str, tuple[str, float]]:
    """Every crop's donor and segmented cell area (pixels, the QC measurement), by the
    crop's real path."""
    from export.data import discover_dataset

    samples = discover_dataset(data)
    areas = cell_areas([s.path for s in samples], workers)
    return {
        os.path.realpath(sample.path): (sample.patient, float(area))
        for sample, area in zip(samples, areas, strict=True)
    }


def donor_cell_areas(crops: dict[str, tuple[str, float]]) -> dict[str, float]:
    """Median segmented cell area per donor."""
    by_donor: dict[str, list[float]] = {}
    for patient, area in crops.values():
        by_donor.setdefault(patient, []).append(area)
    return {donor: float(np.median(values)) for donor, values in by_donor.items()}


def large_cell_specificity(report: dict, areas: dict[str, float], key: str) -> dict:
    """Specificity of the normal donors with large cells (>= LARGE_CELL_AREA) and of the
    others, donor by donor (macro)."""
    positive = report["positive_class"]
    normal = [r for r in report[key]["donor_rows"] if r["truth"] != positive]
    large = [r["cell_accuracy"] for r in normal if areas.get(r["patient"], 0) >= LARGE_CELL_AREA]
    small = [r["cell_accuracy"] for r in normal if areas.get(r["patient"], 0) < LARGE_CELL_AREA]
    return {
        "threshold_px": LARGE_CELL_AREA,
        "large_cell_donors": len(large),
        "large_cell_macro_specificity": float(np.mean(large)) if large else None,
        "small_cell_donors": len(small),
        "small_cell_macro_specificity": float(np.mean(small)) if small else None,
    }


def evaluate_oof(
    predictions: Predictions, positive: str, operating_point: str, slide_rule: str
) -> dict:
    """Uncalibrated argmax numbers, cross-fitted operating-point numbers and the rules
    fitted on every donor (what a shipped model would store)."""
    from export.donors import summarize
    from smearscan.policy import DecisionPolicy

    rule = parse_operating_point(operating_point)
    argmax = summarize(
        predictions,
        predictions.probabilities,
        DecisionPolicy(tuple(predictions.labels), positive, None, "fraction", 0.5, 1),
    )
    _, fitted, per_fold = cross_fitted(predictions, positive, rule, slide_rule)
    final = fit_rules(predictions, positive, rule, slide_rule)
    return {
        "positive_class": positive,
        "operating_point": operating_point,
        "slide_rule": slide_rule,
        "argmax": argmax,
        "cross_fitted": fitted,
        "per_fold_rules": [vars(r) for r in per_fold],
        "rules_on_all_donors": vars(final),
    }


def calls_right(summary: dict) -> str:
    accuracy = summary["slide_call_accuracy"]
    return number(None if accuracy is None else round(accuracy * summary["donors"]), "d")


def render_markdown(report: dict, title: str) -> str:
    """The CV report as Markdown: headline numbers and the per-donor table."""
    positive = report["positive_class"]
    lines = [f"# {title}", ""]
    lines.append(
        "| decision | pooled wF1 | ROC AUC | sensitivity | specificity | donor-macro "
        "sensitivity | donor-macro specificity | worst ALL donor | worst normal donor | "
        "slide calls right |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for name, key in (("argmax, fraction ≥ 0.5", "argmax"), ("cross-fitted rules", "cross_fitted")):
        s = report[key]
        pooled = s["pooled"]
        lines.append(
            f"| {name} | {number(pooled['weighted_f1'])} | {number(pooled['roc_auc'])} | "
            f"{number(pooled['sensitivity'])} | {number(pooled['specificity'])} | "
            f"{number(s['macro_sensitivity'])} | {number(s['macro_specificity'])} | "
            f"{s['worst_positive_donor']} {number(s['worst_sensitivity'], '.3f')} | "
            f"{s['worst_negative_donor']} {number(s['worst_specificity'], '.3f')} | "
            f"{calls_right(s)}/{s['donors']} |"
        )
    final = report["rules_on_all_donors"]
    sizes = report.get("cell_size")
    if sizes:
        lines += [
            "",
            f"Normal donors with large cells (median area ≥ {sizes['threshold_px']:,} px, as "
            f"large as blasts; {sizes['large_cell_donors']} donors): donor-macro specificity "
            f"{number(sizes['large_cell_macro_specificity'])}; the other "
            f"{sizes['small_cell_donors']}: {number(sizes['small_cell_macro_specificity'])} "
            "(cross-fitted rules).",
        ]
    reading = report.get("size_reading")
    if reading:
        lines += [
            "",
            f"Size (`export.size_reading`): cell area alone ranks the cells at ROC AUC "
            f"{number(reading['area_alone_roc_auc'])}; this run at "
            f"{number(reading['donor_weighted_roc_auc'])} with every donor of a class "
            f"weighing the same, {number(reading['area_matched_roc_auc'])} once the classes "
            "are also matched in area; within a donor of "
            + ", ".join(
                f"'{label}', ρ(area, P({positive})) = {number(c['within_donor_spearman'], '.3f')}"
                for label, c in reading["classes"].items()
            )
            + ".",
        ]
    lines += [
        "",
        f"Rules fitted on all donors (what the model file stores): temperature "
        f"{number(final['temperature'], '.3f')}, threshold P({positive}) ≥ "
        f"{final['threshold'] if final['threshold'] is None else round(final['threshold'], 4)}"
        f" ({report['operating_point']}), slide rule {final['slide_rule']} ≥ "
        f"{number(final['slide_cutoff'])}.",
        "",
        f"Per donor (cross-fitted rules; 'called' = share of cells labelled '{positive}'):",
        "",
        "| donor | truth | fold | median cell area (px) | cells | called | mean P | slide call "
        "| right |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    folds = report.get("donor_folds", {})
    areas = report.get("donor_areas", {})
    for row in report["cross_fitted"]["donor_rows"]:
        right = call_is_right(row["call"], row["truth"], positive)
        area = areas.get(row["patient"])
        lines.append(
            f"| {row['patient']} | {row['truth']} | {folds.get(row['patient'], '')} | "
            f"{'' if area is None else f'{area:,.0f}'} | "
            f"{row['cells']} | {number(row['called_positive'], '.1%')} | "
            f"{number(row['mean_p'], '.3f')} | "
            f"{row['call']} | {'yes' if right else '**no**'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        config = config_from_options(args)
        parse_operating_point(args.operating_point)
        started = time.time()
        if args.average_of:
            stored = json.loads((args.average_of[0] / "fold_0" / "config.json").read_text())
            predictions = averaged_predictions(args.average_of)
            args.out.mkdir(parents=True, exist_ok=True)
        else:
            for fold in range(args.folds):
                train_fold(fold_config(config, args.out, fold))
            stored = json.loads((args.out / "fold_0" / "config.json").read_text())
            predictions = pooled_predictions(args.out, args.folds, stored["labels"])
    except (ValueError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 2
    write_predictions(args.out / "oof_predictions.csv", predictions)
    positive = stored["positive_class"]
    report = evaluate_oof(predictions, positive, args.operating_point, args.slide_rule)
    report["donor_folds"] = {
        str(p): int(f) for p, f in zip(predictions.patients, predictions.folds, strict=True)
    }
    crops = crop_cell_areas(args.data, args.workers)
    report["donor_areas"] = donor_cell_areas(crops)
    report["cell_size"] = large_cell_specificity(report, report["donor_areas"], "cross_fitted")
    scored = [crops.get(os.path.realpath(path)) for path in predictions.paths]
    if None in scored:  # predictions of crops outside --data: report the rest, not a KeyError
        log.warning("size reading left out: some predicted crops are not under %s", args.data)
    else:
        areas = np.array([entry[1] for entry in scored if entry is not None])
        report["size_reading"] = size_reading(predictions, areas)
    sources = args.average_of or [args.out]
    report["recipe"] = (
        {"average_of": [str(p) for p in args.average_of]}
        if args.average_of
        else fold_config(config, args.out, 0).signature()
    )
    report["train_minutes"] = round(
        sum(
            json.loads((source / f"fold_{k}" / "metrics.json").read_text())["train_seconds"]
            for source in sources
            for k in range(args.folds)
        )
        / 60,
        1,
    )
    (args.out / "cv.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "cv.md").write_text(render_markdown(report, f"Cross-validation: {args.out.name}"))
    log.info("wrote %s (%.0f min)", args.out / "cv.md", (time.time() - started) / 60)
    if args.shift and not args.average_of:
        from export import rotation, shift

        shift.run_suite(args.out, args.data, args.folds, args.workers)
        rotation.rotation_report(args.out, args.data, args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
