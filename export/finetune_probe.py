"""How much does a lab gain by fine-tuning on a few labelled cells of its own donors?

    python -m export.finetune_probe runs/cv-NAME --fold 0 --cells 50 --out runs/finetune-probe

Simulates a lab with new donors: the donors that fold ``--fold`` held out are split in two
halves (by donor, stratified by class). From the first half ("the lab's labelled donors")
``--cells`` crops per class are drawn; the fold's model is fine-tuned on them
(``python -m export.train --init-from``, batch norm frozen), and the models are scored on
the second half, donors no model ever saw: the fold's model with its cross-fitted rules; the
same model with temperature and threshold refitted on the lab's labelled crops; the
fine-tuned model, likewise refitted. Writes ``probe.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from export import train as training
from export.data import discover_dataset
from export.donors import Predictions, fit_temperature, fit_threshold, summarize
from smearscan.inference import apply_temperature
from smearscan.policy import DecisionPolicy
from smearscan.preprocess import Recipe, load_and_preprocess

log = logging.getLogger("export.finetune_probe")


def split_donors(donors: dict[str, str], seed: int) -> tuple[set[str], set[str]]:
    """Half of each class's donors to label, the other half to judge on."""
    rng = np.random.default_rng(seed)
    labelled, held = set(), set()
    for label in sorted(set(donors.values())):
        members = sorted(d for d, lab in donors.items() if lab == label)
        rng.shuffle(members)
        half = max(1, len(members) // 2)
        labelled.update(members[:half])
        held.update(members[half:])
    return labelled, held


def raw_predictions(model, samples, recipe) -> np.ndarray:
    x = np.stack([load_and_preprocess(s.path, recipe) for s in samples])
    return model.predict(x, batch_size=128, verbose=0).astype(np.float64)


def refit(model, samples, labels, recipe, rules, positive) -> dict:
    """Temperature and cell threshold refitted on the lab's labelled crops (what a lab with
    those crops would do); the slide cut-off stays (a few donors cannot set it)."""
    raw = raw_predictions(model, samples, recipe)
    y = np.array([labels.index(s.label) for s in samples])
    weights = Predictions(
        labels, [], np.array([s.patient for s in samples]), y, np.zeros(len(y), int), raw
    ).donor_weights()
    temperature = fit_temperature(y, raw, weights)
    calibrated = apply_temperature(raw, temperature)
    pos = labels.index(positive)
    threshold = fit_threshold(y == pos, calibrated[:, pos], weights, ("balanced", 0.0))
    return {**rules, "temperature": temperature, "threshold": threshold}


def score(model, samples, labels, recipe, rules, positive) -> dict:
    raw = raw_predictions(model, samples, recipe)
    calibrated = apply_temperature(raw, rules["temperature"])
    y = np.array([labels.index(s.label) for s in samples])
    predictions = Predictions(
        labels,
        [str(s.path) for s in samples],
        np.array([s.patient for s in samples]),
        y,
        np.zeros(len(y), int),
        calibrated,
    )
    policy = DecisionPolicy(
        tuple(labels), positive, rules["threshold"], rules["slide_rule"], rules["slide_cutoff"], 1
    )
    summary = summarize(predictions, calibrated, policy)
    return {
        k: summary[k]
        for k in (
            "pooled",
            "macro_sensitivity",
            "macro_specificity",
            "slide_call_accuracy",
            "donors",
            "cells",
        )
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(
        prog="python -m export.finetune_probe",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("cv_dir", type=Path, help="a python -m export.cv output folder")
    parser.add_argument("--fold", type=int, default=0, help="whose held-out donors play the lab")
    parser.add_argument("--cells", type=int, default=50, help="labelled crops per class")
    parser.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs")
    parser.add_argument("--lr", type=float, default=3e-4, help="fine-tuning peak learning rate")
    parser.add_argument("--seed", type=int, default=0, help="donor halves and cell draws")
    parser.add_argument("--out", type=Path, required=True, help="folder for probe.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    run = args.cv_dir / f"fold_{args.fold}"
    config = json.loads((run / "config.json").read_text())
    cv = json.loads((args.cv_dir / "cv.json").read_text())
    rules = cv["per_fold_rules"][args.fold]
    labels, positive = config["labels"], config["positive_class"]
    recipe = Recipe.from_json(json.dumps(config["recipe"]))
    samples = discover_dataset(Path(config["data"]))
    held_out = [s for s in samples if s.patient in set(config["split"]["val_patients"])]
    donors = {s.patient: s.label for s in held_out}
    labelled_donors, judged_donors = split_donors(donors, args.seed)
    rng = np.random.default_rng(args.seed)
    data = args.out / "labelled"
    shutil.rmtree(data, ignore_errors=True)
    for label in labels:
        pool = [s for s in held_out if s.patient in labelled_donors and s.label == label]
        chosen = rng.choice(len(pool), size=min(args.cells, len(pool)), replace=False)
        for index in chosen:
            sample = pool[index]
            target = data / sample.patient / label / sample.path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(sample.path, target)
    judged = [s for s in held_out if s.patient in judged_donors]
    lab_cells = discover_dataset(data)
    parent_model = keras.models.load_model(run / "model.keras", compile=False)
    before = score(parent_model, judged, labels, recipe, rules, positive)
    recalibrated = score(
        parent_model,
        judged,
        labels,
        recipe,
        refit(parent_model, lab_cells, labels, recipe, rules, positive),
        positive,
    )
    tuned = args.out / "tuned"
    argv_train = [
        "--data",
        str(data),
        "--out",
        str(tuned),
        "--init-from",
        str(run),
        "--fold",
        "-1",
        "--epochs",
        str(args.epochs),
        "--lr",
        str(args.lr),
        "--per-patient",
        str(-(-args.cells * len(labels) // len(labelled_donors))),
        "--crop",
        recipe.crop,
        "--window",
        str(recipe.window),
        "--margin",
        str(recipe.margin),
        "--quiet",
        "--seed",
        str(args.seed),
        "--cache-dir",
        str(args.out / "cache"),
    ]
    if training.main(argv_train) != 0:
        return 1
    tuned_model = keras.models.load_model(tuned / "model.keras", compile=False)
    after = score(
        tuned_model,
        judged,
        labels,
        recipe,
        refit(tuned_model, lab_cells, labels, recipe, rules, positive),
        positive,
    )
    report = {
        "fold": args.fold,
        "cells_per_class": args.cells,
        "labelled_donors": sorted(labelled_donors),
        "judged_donors": sorted(judged_donors),
        "shipped_rules": before,
        "recalibrated_on_lab_cells": recalibrated,
        "fine_tuned_and_recalibrated": after,
        "command": "python -m export.finetune_probe " + " ".join(argv or sys.argv[1:]),
    }
    (args.out / "probe.json").write_text(json.dumps(report, indent=2) + "\n")
    shown = ("shipped_rules", "recalibrated_on_lab_cells", "fine_tuned_and_recalibrated")
    print(json.dumps({k: report[k] for k in shown}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
