"""Train the customized VGG on a folder tree whose leaf folders are class labels.

    python -m export.train --data ../shared/data/cnmc --out runs/NAME [--width 0.25 ...]

Writes to the run folder: ``model.keras`` (best epoch by validation weighted F1), ``config.json``
(recipe, labels, split), ``history.csv`` (one row per epoch), ``curves.png`` (loss and accuracy
per epoch, the paper's Fig. 5), ``metrics.json`` and ``val_predictions.csv`` (validation patients).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from export.data import Sample, discover_dataset, load_arrays, split_by_patient
from smearscan.metrics import classification_metrics
from smearscan.preprocess import Recipe

log = logging.getLogger("export.train")

AUGMENTATIONS = ("none", "flips", "full")
BALANCING = ("none", "weights", "oversample")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m export.train", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, type=Path, help="folder tree: .../<label>/<image>")
    p.add_argument("--out", required=True, type=Path, help="run folder to create")
    p.add_argument("--width", type=float, default=0.125, help="channel width factor (1.0 = paper)")
    p.add_argument("--depth", type=int, default=13, choices=(13, 16, 19))
    p.add_argument("--pooling", default="global", choices=("global", "avg2"))
    p.add_argument("--dense", default="256,128", help="dense layer sizes, comma separated")
    p.add_argument("--dropout", type=float, default=0.3)
    p.add_argument(
        "--batch-norm",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="BatchNorm after each conv (without it, training did not start on C-NMC)",
    )
    p.add_argument("--init", default="he_normal", help="Keras kernel initializer name")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="peak Adam learning rate (cosine decay)")
    p.add_argument("--seed", type=int, default=0, help="initialisation and sampling seed")
    p.add_argument(
        "--split-seed",
        type=int,
        default=0,
        help="seed of the patient split (kept apart from "
        "--seed so that several initialisations can be compared on the same patients)",
    )
    p.add_argument("--folds", type=int, default=4, help="patient-disjoint folds")
    p.add_argument("--fold", type=int, default=0, help="which fold validates")
    p.add_argument("--crop", default="window", choices=("full", "bbox", "window"))
    p.add_argument("--window", type=int, default=320, help="window side for --crop window")
    p.add_argument("--interpolation", default="area", choices=("area", "linear"))
    p.add_argument("--log-enhance", action="store_true", help="Laplacian-of-Gaussian enhancement")
    p.add_argument("--augment", default="flips", choices=AUGMENTATIONS)
    p.add_argument("--balance", default="weights", choices=BALANCING)
    p.add_argument(
        "--per-patient",
        type=int,
        default=100,
        help="images drawn per patient per epoch (0 = all); evens out patients' influence",
    )
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--cache-dir", type=Path, default=Path(".cache/arrays"))
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    return Recipe(
        crop=args.crop,
        window=args.window,
        interpolation=args.interpolation,
        log_enhance=args.log_enhance,
    )


def cached_arrays(
    samples: list[Sample], recipe: Recipe, cache_dir: Path, workers: int
) -> tuple[np.ndarray, list[int]]:
    """Preprocess once per (file list, recipe) and keep the uint8 arrays on disk."""
    key = hashlib.sha256(
        (
            recipe.to_json() + "\n".join(f"{s.path}:{s.path.stat().st_size}" for s in samples)
        ).encode()
    ).hexdigest()[:20]
    path = cache_dir / f"{key}.npz"
    if path.exists():
        with np.load(path) as cached:
            return cached["x"], cached["kept"].tolist()
    x, kept = load_arrays(samples, recipe, workers=workers)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, x=x, kept=np.asarray(kept, np.int64))
    os.replace(tmp, path)
    return x, kept


@dataclass
class SplitArrays:
    """A patient-disjoint split, preprocessed; unreadable images are already dropped."""

    labels: list[str]
    samples: list[Sample]
    train_samples: list[Sample]
    val_samples: list[Sample]
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray


def load_split(
    data: Path, recipe: Recipe, folds: int, fold: int, seed: int, cache_dir: Path, workers: int
) -> SplitArrays:
    """Discover, split by patient and preprocess (cached) a training folder."""
    samples = discover_dataset(data)
    labels = sorted({s.label for s in samples})
    train_samples, val_samples = split_by_patient(samples, folds, fold, seed)
    x_train, kept_train = cached_arrays(train_samples, recipe, cache_dir, workers)
    x_val, kept_val = cached_arrays(val_samples, recipe, cache_dir, workers)
    train_samples = [train_samples[i] for i in kept_train]
    val_samples = [val_samples[i] for i in kept_val]
    return SplitArrays(
        labels, samples, train_samples, val_samples,
        x_train, np.array([labels.index(s.label) for s in train_samples], dtype=np.int64),
        x_val, np.array([labels.index(s.label) for s in val_samples], dtype=np.int64),
    )  # fmt: skip


def make_dataset(tf, x, y, args, training: bool, rng: np.random.Generator, patients=None):
    """tf.data pipeline: uint8 -> float in [0, 1] exactly as ``preprocess`` scales, then
    augmentation (training only)."""
    autotune = tf.data.AUTOTUNE

    def scale(image):
        return tf.cast(image, tf.float32) * (1.0 / 255.0)

    def flips(image):
        image = tf.image.random_flip_left_right(image)
        image = tf.image.random_flip_up_down(image)
        return tf.image.rot90(image, k=tf.random.uniform([], 0, 4, dtype=tf.int32))

    def colour(image):
        image = tf.image.random_brightness(image, 0.08)
        image = tf.image.random_contrast(image, 0.85, 1.15)
        image = tf.image.random_saturation(image, 0.85, 1.15)
        image = tf.image.random_hue(image, 0.03)
        return tf.clip_by_value(image, 0.0, 1.0)

    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if training:
        ds = ds.shuffle(len(x), seed=int(rng.integers(1 << 31)), reshuffle_each_iteration=True)
    ds = ds.map(lambda image, label: (scale(image), label), num_parallel_calls=autotune)
    if training and args.augment in ("flips", "full"):
        ds = ds.map(lambda image, label: (flips(image), label), num_parallel_calls=autotune)
    if training and args.augment == "full":
        import keras

        zoom = keras.layers.RandomZoom(0.1, fill_mode="constant", seed=args.seed)
        rotate = keras.layers.RandomRotation(0.05, fill_mode="constant", seed=args.seed)
        ds = ds.batch(args.batch_size).map(
            lambda image, label: (colour(rotate(zoom(image, training=True), training=True)), label),
            num_parallel_calls=autotune,
        )
        return ds.prefetch(autotune)
    return ds.batch(args.batch_size).prefetch(autotune)


def epoch_indices(
    patients: np.ndarray, y: np.ndarray, args, rng: np.random.Generator
) -> np.ndarray:
    """Indices for one training epoch: all images, a per-patient draw, and/or oversampling."""
    indices = np.arange(len(y))
    if args.per_patient:
        chosen = []
        for patient in np.unique(patients):
            members = indices[patients == patient]
            take = min(len(members), args.per_patient)
            chosen.append(rng.choice(members, size=take, replace=False))
        indices = np.concatenate(chosen)
    if args.balance == "oversample":
        classes, counts = np.unique(y[indices], return_counts=True)
        target = counts.max()
        parts = [rng.choice(indices[y[indices] == c], size=target, replace=True) for c in classes]
        indices = np.concatenate(parts)
    return rng.permutation(indices)


def plot_curves(history: list[dict], path: Path) -> None:
    """Training and validation loss and accuracy per epoch (the paper's Fig. 5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["loss"] for h in history], label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], label="validation")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_acc.plot(epochs, [h["accuracy"] for h in history], label="train")
    ax_acc.plot(epochs, [h["val_accuracy"] for h in history], label="validation")
    ax_acc.plot(epochs, [h["val_weighted_f1"] for h in history], label="validation weighted F1")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Accuracy", ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(args: argparse.Namespace) -> dict:
    """Run one training; returns the validation metrics of the best epoch."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    from export.vgg import build_vgg

    keras.utils.set_random_seed(args.seed)
    tf.config.experimental.enable_op_determinism()
    rng = np.random.default_rng(args.seed)
    started = time.time()

    recipe = recipe_from_args(args)
    split = load_split(args.data, recipe, args.folds, args.fold, args.split_seed, args.cache_dir,
                       args.workers)  # fmt: skip
    labels, samples = split.labels, split.samples
    train_samples, val_samples = split.train_samples, split.val_samples
    x_train, y_train, x_val, y_val = split.x_train, split.y_train, split.x_val, split.y_val
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
    if len(set(y_val.tolist())) < 2:
        raise ValueError("validation patients cover fewer than two classes: use fewer --folds")

    model = build_vgg(
        len(labels),
        depth=args.depth,
        width=args.width,
        input_size=recipe.input_size,
        pooling=args.pooling,
        dense_units=tuple(int(u) for u in args.dense.split(",") if u),
        batch_norm=args.batch_norm,
        dropout=args.dropout,
        initializer=args.init,
    )
    steps_per_epoch = max(
        1, len(epoch_indices(patients_train, y_train, args, rng)) // args.batch_size
    )
    schedule = keras.optimizers.schedules.CosineDecay(
        args.lr, decay_steps=steps_per_epoch * args.epochs, alpha=0.05
    )
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    class_weight = None
    if args.balance == "weights":
        counts = np.bincount(y_train, minlength=len(labels))
        class_weight = {i: len(y_train) / (len(labels) * max(c, 1)) for i, c in enumerate(counts)}

    args.out.mkdir(parents=True, exist_ok=True)
    config = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "labels": labels,
        "recipe": asdict(recipe),
        "architecture": {
            "name": model.name,
            "depth": args.depth,
            "width": args.width,
            "pooling": args.pooling,
            "dense": args.dense,
            "batch_norm": args.batch_norm,
            "initializer": args.init,
            "params": int(model.count_params()),
        },
        "split": {
            "method": f"patient-disjoint, stratified by class, {args.folds} folds, fold {args.fold}"
            f" validates, split seed {args.split_seed}",
            "train_patients": sorted({s.patient for s in train_samples}),
            "val_patients": sorted({s.patient for s in val_samples}),
            "train_images": len(train_samples),
            "val_images": len(val_samples),
        },
        "data": str(args.data),
    }
    (args.out / "config.json").write_text(json.dumps(config, indent=2))

    val_ds = make_dataset(tf, x_val, y_val, args, training=False, rng=rng)
    history: list[dict] = []
    best = {"val_weighted_f1": -1.0}
    best_probabilities = None
    for epoch in range(1, args.epochs + 1):
        tick = time.time()
        idx = epoch_indices(patients_train, y_train, args, rng)
        train_ds = make_dataset(tf, x_train[idx], y_train[idx], args, training=True, rng=rng)
        fit = model.fit(
            train_ds,
            epochs=1,
            class_weight=class_weight,
            verbose=0 if args.quiet else 1,
        )
        probabilities = model.predict(val_ds, verbose=0)
        metrics = classification_metrics(y_val, probabilities, labels, positive="all")
        eps = 1e-7
        val_loss = float(
            -np.mean(np.log(np.clip(probabilities[np.arange(len(y_val)), y_val], eps, 1.0)))
        )
        row = {
            "epoch": epoch,
            "loss": float(fit.history["loss"][-1]),
            "accuracy": float(fit.history["accuracy"][-1]),
            "val_loss": val_loss,
            "val_accuracy": metrics["accuracy"],
            "val_weighted_f1": metrics["weighted_f1"],
            "val_roc_auc": metrics["roc_auc"],
            "val_sensitivity": metrics["sensitivity"],
            "val_specificity": metrics["specificity"],
            "seconds": round(time.time() - tick, 1),
        }
        history.append(row)
        log.info(
            "epoch %d/%d loss %.4f acc %.4f | val loss %.4f acc %.4f wF1 %.4f AUC %.4f (%.0fs)",
            epoch, args.epochs, row["loss"], row["accuracy"], val_loss, row["val_accuracy"],
            row["val_weighted_f1"], row["val_roc_auc"], row["seconds"],
        )  # fmt: skip
        with open(args.out / "history.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(row))
            writer.writeheader()
            writer.writerows(history)
        if metrics["weighted_f1"] > best["val_weighted_f1"]:
            best = {**metrics, "val_weighted_f1": metrics["weighted_f1"], "epoch": epoch}
            best_probabilities = probabilities
            model.save(args.out / "model.keras")
    plot_curves(history, args.out / "curves.png")
    with open(args.out / "val_predictions.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "patient", "label", *[f"p_{c}" for c in labels]])
        for sample, probs in zip(val_samples, best_probabilities, strict=False):
            writer.writerow(
                [str(sample.path), sample.patient, sample.label, *[f"{p:.6f}" for p in probs]]
            )
    summary = {
        "best_epoch": best["epoch"],
        "validation": {k: v for k, v in best.items() if k not in ("val_weighted_f1", "epoch")},
        "train_seconds": round(time.time() - started, 1),
        "selection": "best epoch by validation weighted F1 (argmax)",
    }
    (args.out / "metrics.json").write_text(json.dumps(summary, indent=2))
    log.info(
        "best epoch %d: validation weighted F1 %.4f, AUC %.4f; wrote %s",
        best["epoch"], best["weighted_f1"], best["roc_auc"], args.out,
    )  # fmt: skip
    return summary


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        train(args)
    except (ValueError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
