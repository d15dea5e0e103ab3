"""Rotation consistency (issue 26, item 5): how far one view of a crop is from the mean of
its eight flips and 90-degree rotations, each fold model on its own out-of-fold donors.

    python -m export.rotation runs/cv-NAME --data ../shared/data/cnmc

Training draws flips and rotations, so a model that learned the symmetry gives every view
of a cell the same label. Per view (``smearscan.inference.tta_views``, the scanner's
``--tta``), on the shift suite's fixed sample of crops (40 per donor), it reports how many
labels agree with the eight-view mean's, each fold judged by its own cross-fitted rule, and
the mean absolute difference in P(positive); and the pooled ROC AUC of the plain view and of
the eight-view mean. Writes ``rotation.json`` into the run folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np

from export.data import discover_dataset, donor_sample
from export.keras_utils import predict_sets
from export.pipeline import DonorNormaliser
from smearscan.inference import apply_temperature, tta_views
from smearscan.metrics import roc_auc
from smearscan.policy import DecisionPolicy
from smearscan.preprocess import (
    Recipe,
    load_and_preprocess,
    preprocess,
    read_image,
    stored_uint8,
)

log = logging.getLogger("export.rotation")
PER_DONOR = 40  # the shift suite's sample


def model_input(sample, recipe: Recipe, normalise: DonorNormaliser | None = None) -> np.ndarray:
    """One crop as the cross-validation evaluated it (its cached uint8 input)."""
    if normalise is None:
        return stored_uint8(load_and_preprocess(sample.path, recipe))
    image = normalise(sample.patient, read_image(sample.path, order="bgr"))
    return stored_uint8(preprocess(image, recipe, order="bgr"))


def rotation_report(cv_dir: Path, data: Path, workers: int = 2, per_donor: int = PER_DONOR):
    """Per-view agreement with the eight-view mean, over every fold's own donors."""
    import keras

    cv = json.loads((cv_dir / "cv.json").read_text())
    positive = cv["positive_class"]
    samples = discover_dataset(data)
    folds = len(cv["per_fold_rules"])
    agree: list[np.ndarray] = []  # per fold: (views, crops) label agreement
    moved: list[np.ndarray] = []
    plain_scores, mean_scores, truth = [], [], []
    for fold in range(folds):
        run = cv_dir / f"fold_{fold}"
        config = json.loads((run / "config.json").read_text())
        labels = config["labels"]
        donors = set(config["split"]["val_patients"])
        own = [s for s in samples if s.patient in donors]
        members = donor_sample(own, per_donor)
        recipe = Recipe(**config["recipe"])
        normalise = DonorNormaliser.of_run(config, own, workers)
        one = partial(model_input, recipe=recipe, normalise=normalise)
        with ThreadPoolExecutor(max(1, workers)) as pool:
            x = np.stack(list(pool.map(one, members)))
        model = keras.models.load_model(run / "model.keras", compile=False)
        rules = cv["per_fold_rules"][fold]
        policy = DecisionPolicy(tuple(labels), positive, rules["threshold"])
        column = labels.index(positive)
        views = [
            apply_temperature(raw.astype(np.float64), rules["temperature"])
            for raw in predict_sets(model, list(tta_views(x)))
        ]
        mean = np.mean(views, axis=0)
        reference = policy.label_indices(mean)
        agree.append(np.stack([policy.label_indices(v) == reference for v in views]))
        moved.append(np.stack([np.abs(v[:, column] - mean[:, column]) for v in views]))
        plain_scores.append(views[0][:, column])
        mean_scores.append(mean[:, column])
        truth.append(np.array([s.label == positive for s in members]))
        log.info("fold %d: %d crops, plain view agrees on %.3f", fold, len(x), agree[-1][0].mean())
    agreement = np.concatenate(agree, axis=1)
    difference = np.concatenate(moved, axis=1)
    y = np.concatenate(truth)
    per_view = agreement.mean(axis=1)
    report = {
        "crops": int(agreement.shape[1]),
        "crops_per_donor": per_donor,
        "plain_view_agreement": float(per_view[0]),
        "view_agreement": [float(a) for a in per_view],
        "mean_view_agreement": float(per_view.mean()),
        "worst_view_agreement": float(per_view.min()),
        "all_views_agree": float(agreement.all(axis=0).mean()),
        "mean_abs_difference": float(difference.mean()),
        "plain_roc_auc": roc_auc(y, np.concatenate(plain_scores)),
        "eight_view_roc_auc": roc_auc(y, np.concatenate(mean_scores)),
    }
    (cv_dir / "rotation.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cv_dirs", type=Path, nargs="+", help="cross-validation run folders")
    parser.add_argument("--data", type=Path, required=True, help="the training crops")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--per-donor", type=int, default=PER_DONOR)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for cv_dir in args.cv_dirs:
        report = rotation_report(cv_dir, args.data, args.workers, args.per_donor)
        print(
            f"{cv_dir.name}: plain view agrees {report['plain_view_agreement']:.3f} "
            f"(views {report['worst_view_agreement']:.3f}-{max(report['view_agreement']):.3f}, "
            f"all eight {report['all_views_agree']:.3f}); ROC AUC plain "
            f"{report['plain_roc_auc']:.4f}, eight views {report['eight_view_roc_auc']:.4f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
