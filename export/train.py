"""Train the customized VGG on a folder tree whose leaf folders are class labels.

    python -m export.train --data ../shared/data/cnmc --out runs/NAME [--width 0.25 ...]

Writes to the run folder: ``model.keras`` (the kept epoch: the last by default),
``config.json`` (the typed config as a record, labels, preprocessing, split),
``history.csv`` (one row per epoch), ``curves.png`` (loss and accuracy per epoch, the
paper's Fig. 5), ``metrics.json`` and ``val_predictions.csv`` (validation patients).

The run is described by :class:`export.config.TrainConfig`; the data pipeline is
``export.pipeline``, the epoch's draws ``export.sampling``, the Keras helpers
``export.keras_utils``, parents and teachers ``export.parents``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import time
from dataclasses import asdict

import numpy as np

from export.augment import DonorColours
from export.config import (
    CONFIG_VERSION,
    TrainConfig,
    add_training_options,
    config_from_options,
    default_positive,
)
from export.data import Sample
from export.keras_utils import (
    WeightAverage,
    all_layers,
    compile_for_training,
    evaluated_weights,
    plot_curves,
    save_model,
)
from export.parents import load_parent, load_teacher, parent_config_of, resolve_parent
from export.pipeline import RawRescaler, load_split, make_dataset
from export.sampling import epoch_indices
from export.size_reading import cell_areas
from smearscan.metrics import classification_metrics
from smearscan.preprocess import Recipe

log = logging.getLogger("export.train")


def build_parser(
    prog: str = "python -m export.train", add_help: bool = True
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        add_help=add_help,
    )
    add_training_options(parser)
    return parser


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """The command line as a typed config: a malformed option exits with the usage, a value
    no trainer can use raises ValueError (:class:`export.config.ConfigError`)."""
    return config_from_options(build_parser().parse_args(argv))


def train(config: TrainConfig) -> dict:
    """Run one training; returns the validation metrics of the kept epoch."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()
    rng = np.random.default_rng(config.seed)
    started = time.time()
    schedule, sampling, augmentation = config.schedule, config.sampling, config.augmentation

    recipe = config.recipe
    if config.init_from:  # before any data is read: a mismatch should fail at once
        parent_path = resolve_parent(config.init_from)
        parent_config = parent_config_of(parent_path)
        parent_recipe = Recipe.from_json(json.dumps(parent_config["recipe"]))
        if parent_recipe != recipe:
            raise ValueError(
                f"--init-from {config.init_from}: its preprocessing differs from this training's "
                f"({parent_recipe.crop} crop, window {parent_recipe.window}, margin "
                f"{parent_recipe.margin}, {parent_recipe.interpolation} interpolation, LoG "
                f"{'on' if parent_recipe.log_enhance else 'off'}): leave out --crop/--window/"
                "--margin/--interpolation/--log-enhance to take the parent's"
            )
    split = load_split(config)
    labels, samples = split.labels, split.samples
    train_samples, val_samples = split.train_samples, split.val_samples
    x_train, y_train, x_val, y_val = split.x_train, split.y_train, split.x_val, split.y_val
    validating = len(val_samples) > 0
    log.info(
        "%d images, %d patients, classes %s; train %d images / %d patients, validation %d / %d",
        len(samples),
        len({s.patient for s in samples}),
        labels,
        len(train_samples),
        len({s.patient for s in train_samples}),
        len(val_samples),
        len({s.patient for s in val_samples}),
    )
    patients_train = np.array([s.patient for s in train_samples])
    areas_train = (
        cell_areas([s.path for s in train_samples], config.workers)
        if sampling.needs_areas
        else None
    )

    def draws(generator: np.random.Generator) -> np.ndarray:
        return epoch_indices(patients_train, y_train, sampling, generator, areas_train)

    if validating and len(set(y_val.tolist())) < 2:
        raise ValueError("validation patients cover fewer than two classes: use fewer --folds")
    positive = default_positive(labels)
    if config.init_from and parent_config["labels"] != labels:
        raise ValueError(
            f"--init-from {config.init_from}: its labels {parent_config['labels']} differ from "
            f"this training's {labels}"
        )

    teacher = None
    if config.distill_from:
        val_patients = {s.patient for s in val_samples}
        teacher, taught = load_teacher(config.distill_from, config.split.fold, val_patients, recipe)
        log.info(
            "distilling from %s (weight %g, %s view)",
            taught["teacher"],
            config.distill_weight,
            config.distill_view,
        )

    parent = None
    freeze = config.freezes_batch_norm
    bn_recalibrate = 0 if freeze else schedule.bn_recalibrate
    if config.init_from:
        model = load_parent(parent_path)
        parent = {
            "path": str(parent_path),
            "name": parent_config.get("name", parent_path.parent.name),
            "architecture": parent_config["architecture"],
        }
    else:
        model = config.network.build(len(labels), recipe.input_size)
    if freeze:
        for layer in all_layers(model):
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False  # Keras runs frozen batch norm in inference mode
    steps_per_epoch = max(
        1,
        len(draws(np.random.default_rng(0))) // schedule.batch_size,
    )
    compile_for_training(keras, model, schedule, steps_per_epoch, augmentation.consistency)
    class_weight = None
    if sampling.balance == "weights":
        counts = np.bincount(y_train, minlength=len(labels))
        class_weight = {i: len(y_train) / (len(labels) * max(c, 1)) for i, c in enumerate(counts)}

    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    architecture = (parent or {}).get("architecture") or config.network.describe(
        model.name, int(model.count_params())
    )
    stored = run_config(config, labels, architecture, parent, train_samples, val_samples)
    if split.normalise is not None:  # the reference a scan would map each slide to
        stored["slide_colour"] = split.normalise.colour.to_record()
    stored["trained_with"] = provenance()
    (out / "config.json").write_text(json.dumps(stored, indent=2))

    val_ds = make_dataset(tf, x_val, y_val, len(labels), config, training=False, rng=rng)
    rescaler = None
    if augmentation.decodes_raw:
        colours = None
        if "colour" in augmentation.groups:
            colours = DonorColours.measure(train_samples, workers=config.workers)
        rescaler = RawRescaler(
            train_samples,
            recipe,
            augmentation.scale_range if augmentation.rescales_raw else (1, 1),
            jpeg="jpeg" in augmentation.groups,
            colours=colours,
            normalise=split.normalise,
        )
    average = WeightAverage(model, schedule) if schedule.ema > 0 else None
    callbacks = [average.callback()] if average else []
    # a donor-balanced draw of clean crops (epoch_indices shuffles: the first N are a random
    # sample of every donor, not the first donors on disk)
    drawn = draws(np.random.default_rng(1))
    recalibration = x_train[drawn[: max(0, bn_recalibrate)]]

    history: list[dict] = []
    kept: dict = {}
    for epoch in range(1, schedule.epochs + 1):
        tick = time.time()
        idx = draws(rng)
        train_ds = make_dataset(
            tf,
            x_train[idx],
            y_train[idx],
            len(labels),
            config,
            training=True,
            rng=rng,
            rescaler=rescaler,
            indices=idx,
            teacher=teacher,
        )
        fit = model.fit(
            train_ds,
            epochs=1,
            class_weight=class_weight,
            callbacks=callbacks,
            verbose=0 if config.quiet else 1,
        )
        weights = evaluated_weights(model, average, recalibration)
        row = {
            "epoch": epoch,
            "loss": float(fit.history["loss"][-1]),
            "accuracy": float(fit.history["accuracy"][-1]),
        }
        metrics = None
        probabilities = None
        if validating:
            raw = [np.array(w.numpy()) for w in model.weights]
            model.set_weights(weights)
            probabilities = model.predict(val_ds, verbose=0)
            model.set_weights(raw)
            metrics = classification_metrics(y_val, probabilities, labels, positive=positive)
            row.update(
                val_loss=float(
                    -np.mean(
                        np.log(np.clip(probabilities[np.arange(len(y_val)), y_val], 1e-7, 1.0))
                    )
                ),
                val_accuracy=metrics["accuracy"],
                val_weighted_f1=metrics["weighted_f1"],
                val_roc_auc=metrics["roc_auc"],
                val_sensitivity=metrics["sensitivity"],
                val_specificity=metrics["specificity"],
            )
        row["seconds"] = round(time.time() - tick, 1)
        history.append(row)
        log.info(
            "epoch %d/%d %s",
            epoch,
            schedule.epochs,
            " ".join(f"{k} {v:.4f}" for k, v in row.items() if k not in ("epoch", "seconds"))
            + f" ({row['seconds']:.0f}s)",
        )
        with open(out / "history.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(row))
            writer.writeheader()
            writer.writerows(history)
        better = metrics is not None and metrics["weighted_f1"] > kept.get("weighted_f1", -1.0)
        if schedule.select == "last" or not validating or better:
            kept = {
                **(metrics or {}),
                "epoch": epoch,
                "weights": weights,
                "probabilities": probabilities,
            }
    model.set_weights(kept.pop("weights"))
    save_model(model, out / "model.keras")
    plot_curves(history, out / "curves.png")
    best_probabilities = kept.pop("probabilities")
    if validating:
        with open(out / "val_predictions.csv", "w", newline="") as handle:
            predictions = csv.writer(handle)
            predictions.writerow(["path", "patient", "label", *[f"p_{c}" for c in labels]])
            for sample, probs in zip(val_samples, best_probabilities, strict=True):
                predictions.writerow(
                    [str(sample.path), sample.patient, sample.label, *[f"{p:.6f}" for p in probs]]
                )
    summary = {
        "best_epoch": kept["epoch"],
        "validation": {k: v for k, v in kept.items() if k != "epoch"},
        "train_seconds": round(time.time() - started, 1),
        "selection": "last epoch"
        if schedule.select == "last"
        else "best epoch by validation weighted F1 (argmax)",
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    if validating:
        log.info(
            "kept epoch %d: validation weighted F1 %.4f, AUC %.4f; wrote %s",
            kept["epoch"],
            kept["weighted_f1"],
            kept["roc_auc"],
            out,
        )
    else:
        log.info("trained on every patient; wrote %s", out)
    return summary


def run_config(
    config: TrainConfig,
    labels: list[str],
    architecture: dict,
    parent: dict | None,
    train_samples: list[Sample],
    val_samples: list[Sample],
) -> dict:
    """A training run's config.json: the config (a record of its options), labels,
    preprocessing, network and split (what ``export.cv`` checks before reusing a fold and
    ``export.to_onnx`` reads)."""
    return {
        "name": config.out.name,
        "config_version": CONFIG_VERSION,
        "args": config.to_record(),
        "labels": labels,
        "positive_class": default_positive(labels),
        "recipe": asdict(config.recipe),
        "architecture": architecture,
        "parent": parent,
        "split": {
            "method": config.split.describe(bool(val_samples)),
            "train_patients": sorted({s.patient for s in train_samples}),
            "val_patients": sorted({s.patient for s in val_samples}),
            "train_images": len(train_samples),
            "val_images": len(val_samples),
        },
        "data": str(config.data),
    }


def provenance() -> dict:
    """The code and libraries that trained a run. The same options and seed give the same
    weights only with the same code: a refactor that draws the augmentations in another
    order, or another schedule's rounding, trains other weights (the shipped recipe's seed 1,
    retrained on 2026-12-07 from d05e470, differs from its 2026-12-05 run), and so can
    another machine: oneDNN picks its float kernels by instruction set (the same code
    trained seed 1's fold 0 to ROC AUC 0.744 on one machine and 0.782 on the next, one with
    AVX-512 and AMX; the first one's instruction sets and library versions were not kept).
    ``commit`` is None outside a git checkout; ``modified`` says whether ``export/`` or
    ``smearscan/`` had uncommitted changes."""
    import platform
    import subprocess
    from pathlib import Path

    import cv2
    import keras
    import tensorflow as tf

    root = Path(__file__).resolve().parents[1]
    commit, modified = None, None
    try:

        def git(*args: str) -> str:
            done = subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=20, check=True
            )
            return done.stdout.strip()

        commit = git("rev-parse", "HEAD")
        modified = bool(git("status", "--porcelain", "--", "export", "smearscan"))
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "commit": commit,
        "modified": modified,
        "machine": _machine(),
        "versions": {
            "python": platform.python_version(),
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "numpy": np.__version__,
            "opencv": cv2.__version__,
        },
    }


def _machine() -> dict:
    """The CPU (model name from /proc/cpuinfo on Linux), its cores and the vector instruction
    sets oneDNN chooses its kernels by, as far as they differ between machines here."""
    import os
    import platform
    from pathlib import Path

    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    return {
        "cpu": fields.get("model name") or platform.processor() or None,
        "cores": os.cpu_count(),
        "isa": [isa for isa in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if isa in flags],
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        config = parse_config(argv)
        train(config)
    except (ValueError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
