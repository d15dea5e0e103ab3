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

from export.augment import EXTRA_GROUPS, GROUPS, make_augmenter, parse_groups
from export.data import SPLITS, Sample, discover_dataset, load_arrays, split_by_patient
from smearscan.metrics import classification_metrics
from smearscan.preprocess import Recipe

log = logging.getLogger("export.train")

BALANCING = ("none", "weights", "oversample", "donors")
SELECTIONS = ("last", "best")
SCALE_AT = ("raw", "input")
DEFAULT_EPOCHS = 10
#: The recipe of the shipped default model (``export/default_model``, chosen by donor-level
#: cross-validation and the selection rule in docs/ablation.md) is every trainer's default,
#: so that a lab retraining on its own crops follows it; older recipes stay reachable by
#: flags (``--crop window --scale-range 0.7,1.4 --augment full`` was the first one). A test
#: compares these defaults with the shipped run's config.json.
DEFAULT_RECIPE = Recipe(crop="bbox")
DEFAULT_AUGMENT = "flips,scale,photometric,stain,focus"
DEFAULT_SCALE_RANGE = "0.8,1.1"
#: Preprocessing options that ``--init-from`` takes from its parent unless they are given.
PREPROCESSING_OPTIONS = ("crop", "window", "margin", "interpolation", "log_enhance")
#: Where the default model's Keras weights live, for --init-from default.
DEFAULT_PARENT = Path(__file__).parent / "default_model"


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def scale_range(text: str) -> tuple[float, float]:
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("give two factors, e.g. 0.7,1.4") from None
    if not 0.2 <= low <= high <= 5:
        raise argparse.ArgumentTypeError("need 0.2 <= low <= high <= 5")
    return low, high


def augment_groups(text: str) -> tuple[str, ...]:
    try:
        return parse_groups(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser(
    prog: str = "python -m export.train", add_help: bool = True
) -> argparse.ArgumentParser:
    """The training options; ``export.cv``, ``export.train_jax`` and ``export.gpu`` reuse
    them."""
    p = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        add_help=add_help,
    )
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
    p.add_argument("--epochs", type=positive_int, default=DEFAULT_EPOCHS)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="peak Adam learning rate (cosine decay)")
    p.add_argument("--seed", type=int, default=0, help="initialisation and sampling seed")
    p.add_argument(
        "--split-seed",
        type=int,
        default=0,
        help="seed of the patient split (kept apart from --seed so that several "
        "initialisations can be compared on the same patients)",
    )
    p.add_argument("--folds", type=positive_int, default=4, help="patient-disjoint folds")
    p.add_argument(
        "--split",
        choices=SPLITS,
        default="donors",
        help="donors: patients dealt at random into --folds folds, stratified by class; "
        "folders: the data folder's top-level folders are the folds (C-NMC's release "
        "folds, one acquisition batch each: leave one batch out)",
    )
    p.add_argument(
        "--fold",
        type=int,
        default=0,
        help="which fold validates; -1 trains on every patient (no validation: the "
        "recipe must have been chosen by cross-validation, python -m export.cv)",
    )
    from_parent = "[default: with --init-from, the parent's; else {}]"
    p.add_argument(
        "--crop",
        choices=("full", "bbox", "window"),
        help="how the cell is framed " + from_parent.format(DEFAULT_RECIPE.crop),
    )
    p.add_argument(
        "--window",
        type=int,
        help="window side for --crop window " + from_parent.format(DEFAULT_RECIPE.window),
    )
    p.add_argument(
        "--margin",
        type=float,
        help="margin around the cell for --crop bbox (fraction of its side) "
        + from_parent.format(DEFAULT_RECIPE.margin),
    )
    p.add_argument(
        "--interpolation",
        choices=("area", "linear"),
        help="resize interpolation " + from_parent.format(DEFAULT_RECIPE.interpolation),
    )
    p.add_argument(
        "--log-enhance",
        action=argparse.BooleanOptionalAction,
        help="Laplacian-of-Gaussian enhancement " + from_parent.format("off"),
    )
    p.add_argument(
        "--augment",
        type=augment_groups,
        default=DEFAULT_AUGMENT,
        help=f"none, full, or a comma-separated list of {','.join(GROUPS + EXTRA_GROUPS)} "
        "('full' stands for all but the extra jpeg: 'full,jpeg' adds it)",
    )
    p.add_argument(
        "--scale-at",
        default="raw",
        choices=SCALE_AT,
        help="where the scale augmentation acts: on the decoded crop before preprocessing "
        "(raw: as another magnification would; decodes every drawn crop again) or on the "
        "small model input (input: cheaper, but a model can then read size from sharpness)",
    )
    p.add_argument(
        "--augment-strength",
        type=float,
        default=1.0,
        help="scales the photometric, stain and focus ranges (0.5: half as wide)",
    )
    p.add_argument(
        "--scale-range",
        type=scale_range,
        default=DEFAULT_SCALE_RANGE,
        help="cell rescaling factors drawn log-uniformly by the scale augmentation",
    )
    p.add_argument(
        "--balance",
        default="donors",
        choices=BALANCING,
        help="donors: each class gets the same draws per epoch, shared equally by its "
        "donors (with replacement for small donors); weights: class weights in the loss; "
        "oversample: resample the minority class",
    )
    p.add_argument(
        "--per-patient",
        type=int,
        default=100,
        help="images drawn per patient per epoch (0 = all); with --balance donors, the "
        "epoch size is this times the number of patients",
    )
    p.add_argument("--mixup", type=float, default=0.0, help="mixup Beta(a, a); 0 = off")
    p.add_argument(
        "--ema",
        type=float,
        default=0.99,
        help="exponential moving average of the weights, per step (0 = off); the "
        "evaluated and saved model uses the average",
    )
    p.add_argument(
        "--bn-recalibrate",
        type=int,
        default=1024,
        help="re-estimate batch-norm statistics on this many un-augmented training crops "
        "before each evaluation (0 = off): statistics gathered under augmentation do not "
        "match real crops",
    )
    p.add_argument(
        "--select",
        default="last",
        choices=SELECTIONS,
        help="which epoch to keep: last (no choice made on the validation patients) or "
        "best by validation weighted F1 (optimistic)",
    )
    p.add_argument(
        "--init-from",
        help="fine-tune: start from 'default' (the shipped model's weights in export/), a "
        "run folder or a .keras file; the parent is recorded in the run and the model file",
    )
    p.add_argument(
        "--distill-from",
        help="learn from a teacher's soft labels too: 'default' (the shipped fold models) or "
        "a cross-validation folder (with --fold k its fold-k model, which never saw fold k's "
        "donors; with --fold -1 its fold models averaged), or a run folder or .keras file",
    )
    p.add_argument(
        "--distill-weight",
        type=float,
        default=0.5,
        help="with --distill-from: the teacher's share of each training target (the rest is "
        "the true label); the teacher sees the same augmented crop as the student",
    )
    p.add_argument(
        "--freeze-batch-norm",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep the batch-norm layers of an --init-from model as they are (inference mode, "
        "no re-estimation): a few hundred crops from a few donors are too few to estimate "
        "them again [default: on with --init-from, else off]",
    )
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--cache-dir", type=Path, default=Path(".cache/arrays"))
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return resolve_preprocessing(build_parser().parse_args(argv))


def resolve_preprocessing(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the preprocessing options left unset: from the ``--init-from`` parent (a model
    must be fine-tuned on inputs prepared as its own were; the log says so), else from the
    shipped recipe. An explicit option that contradicts the parent is kept, and training
    refuses it with the reason. Raises ValueError for an unusable ``--init-from``."""
    parent = None
    if args.init_from:
        parent = Recipe.from_json(
            json.dumps(parent_config_of(resolve_parent(args.init_from))["recipe"])
        )
    taken = []
    for name in PREPROCESSING_OPTIONS:
        if getattr(args, name) is None:
            setattr(args, name, getattr(parent or DEFAULT_RECIPE, name))
            taken.append(name)
    if parent is not None and taken:
        log.info(
            "--init-from %s: preprocessing taken from the parent (%s)",
            args.init_from,
            ", ".join(f"{n}={getattr(args, n)}" for n in taken),
        )
    return args


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The recipe the options describe; options still unset take the shipped recipe's."""
    values = {name: getattr(args, name) for name in PREPROCESSING_OPTIONS}
    unset = {name: getattr(DEFAULT_RECIPE, name) for name, v in values.items() if v is None}
    return Recipe(**{**values, **unset})


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
    data: Path,
    recipe: Recipe,
    folds: int,
    fold: int,
    seed: int,
    cache_dir: Path,
    workers: int,
    split: str = "donors",
) -> SplitArrays:
    """Discover, split by patient and preprocess (cached) a training folder; ``fold`` -1
    puts every patient in training."""
    samples = discover_dataset(data)
    labels = sorted({s.label for s in samples})
    if fold == -1:
        train_samples, val_samples = list(samples), []
    else:
        train_samples, val_samples = split_by_patient(samples, folds, fold, seed, split, data)
    x_train, kept_train = cached_arrays(train_samples, recipe, cache_dir, workers)
    x_val, kept_val = cached_arrays(val_samples, recipe, cache_dir, workers)
    train_samples = [train_samples[i] for i in kept_train]
    val_samples = [val_samples[i] for i in kept_val]
    return SplitArrays(
        labels,
        samples,
        train_samples,
        val_samples,
        x_train,
        np.array([labels.index(s.label) for s in train_samples], dtype=np.int64),
        x_val,
        np.array([labels.index(s.label) for s in val_samples], dtype=np.int64),
    )


class RawRescaler:
    """Training crops decoded again at every draw, rescaled by a random factor around the
    frame centre and then preprocessed by the scanner's own function: the scale
    augmentation acts where a different magnification would. With ``jpeg``, half the draws
    are also saved as JPEG (quality drawn from ``augment.JPEG_QUALITY``) and read back
    first, as a lab's export would. The encoded bytes stay in memory (about 25 kB a crop)."""

    def __init__(
        self, samples: list[Sample], recipe: Recipe, scale_range, jpeg: bool = False
    ) -> None:
        self.data = [sample.path.read_bytes() for sample in samples]
        self.recipe = recipe
        self.low, self.high = np.log(scale_range[0]), np.log(scale_range[1])
        self.jpeg = jpeg

    def __call__(self, index, seed) -> np.ndarray:
        from export.augment import JPEG_QUALITY, jpeg_roundtrip, rescale
        from smearscan.preprocess import decode_image, preprocess

        rng = np.random.default_rng(int(seed))
        image = decode_image(self.data[int(index)], order="bgr")
        factor = float(np.exp(rng.uniform(self.low, self.high)))
        if self.jpeg and rng.random() < 0.5:
            image = jpeg_roundtrip(image, int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1)))
        model_input = preprocess(rescale(image, factor), self.recipe, order="bgr")
        return np.round(model_input * 255.0).astype(np.uint8)


def make_dataset(
    tf,
    x,
    y,
    num_classes: int,
    args,
    training: bool,
    rng: np.random.Generator,
    rescaler: RawRescaler | None = None,
    indices: np.ndarray | None = None,
    teacher=None,
):
    """tf.data pipeline: uint8 -> float in [0, 1] exactly as ``preprocess`` scales, then
    augmentation and mixup (training only). Labels are one-hot (mixup blends them). With a
    ``rescaler``, the crops at ``indices`` are decoded, rescaled and preprocessed afresh
    instead of taken from ``x``. With a ``teacher`` (distillation), each target becomes
    ``(1 - w) * label + w * teacher(image)`` on the very image the student sees."""
    autotune = tf.data.AUTOTUNE
    size = x.shape[1]
    groups = tuple(g for g in args.augment if g != "jpeg")  # jpeg: on the raw crop
    if rescaler is not None and getattr(args, "scale_at", "raw") == "raw":
        groups = tuple(g for g in groups if g != "scale")  # done on the raw crop
    augment = make_augmenter(
        tf, groups, args.scale_range, size, getattr(args, "augment_strength", 1.0)
    )

    def scale(image, label):
        return tf.cast(image, tf.float32) * (1.0 / 255.0), tf.one_hot(label, num_classes)

    if rescaler is not None and indices is not None:
        seeds = rng.integers(1 << 31, size=len(indices))
        ds = tf.data.Dataset.from_tensor_slices((indices, seeds, y))

        def load(index, seed, label):
            image = tf.numpy_function(rescaler, [index, seed], tf.uint8, stateful=False)
            image.set_shape([size, size, 3])
            return image, label

        ds = ds.map(load, num_parallel_calls=autotune)
    else:
        ds = tf.data.Dataset.from_tensor_slices((x, y))
    if training:
        ds = ds.shuffle(len(y), seed=int(rng.integers(1 << 31)), reshuffle_each_iteration=True)
    ds = ds.map(scale, num_parallel_calls=autotune)
    if training and groups:
        ds = ds.map(lambda image, label: (augment(image), label), num_parallel_calls=autotune)
    ds = ds.batch(args.batch_size)
    if training and args.mixup > 0:
        alpha = float(args.mixup)

        def mixup(images, labels):
            first = tf.random.gamma([], alpha)
            second = tf.random.gamma([], alpha)
            share = first / (first + second)
            order = tf.random.shuffle(tf.range(tf.shape(images)[0]))
            return (
                share * images + (1 - share) * tf.gather(images, order),
                share * labels + (1 - share) * tf.gather(labels, order),
            )

        ds = ds.map(mixup, num_parallel_calls=autotune)
    if training and teacher is not None:
        share = float(args.distill_weight)

        def soften(images, labels):
            return images, (1.0 - share) * labels + share * teacher(images, training=False)

        ds = ds.map(soften)
    return ds.prefetch(autotune)


def epoch_indices(
    patients: np.ndarray, y: np.ndarray, args, rng: np.random.Generator
) -> np.ndarray:
    """Indices for one training epoch.

    ``--balance donors``: every class gets the same number of draws and each of its donors
    the same share of them, drawn with replacement where a donor has fewer crops, so a
    donor with 20 crops weighs as much as one with 400 and the classes are even. Otherwise
    up to ``--per-patient`` crops per patient without replacement, then ``oversample``
    evens the classes if asked.
    """
    indices = np.arange(len(y))
    if args.balance == "donors":
        donors = sorted(set(zip(patients.tolist(), y.tolist(), strict=True)))
        classes = sorted({label for _, label in donors})
        per_patient = args.per_patient or max(1, len(y) // max(len(donors), 1))
        per_class = per_patient * len({p for p, _ in donors}) // len(classes)
        chosen = []
        for label in classes:
            members_of_class = [p for p, c in donors if c == label]
            per_donor = max(1, int(np.ceil(per_class / len(members_of_class))))
            for patient in members_of_class:
                members = indices[(patients == patient) & (y == label)]
                replace = len(members) < per_donor
                chosen.append(rng.choice(members, size=per_donor, replace=replace))
        return rng.permutation(np.concatenate(chosen))
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
    ax_acc.plot(epochs, [h["accuracy"] for h in history], label="train")
    if history and history[0].get("val_loss") is not None:
        ax_loss.plot(epochs, [h["val_loss"] for h in history], label="validation")
        ax_acc.plot(epochs, [h["val_accuracy"] for h in history], label="validation")
        ax_acc.plot(epochs, [h["val_weighted_f1"] for h in history], label="validation weighted F1")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Accuracy", ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class WeightAverage:
    """Exponential moving average of the trainable weights, updated after every step.

    The averaged weights are what gets evaluated and saved: they swing far less from epoch
    to epoch than the raw weights under strong augmentation. Early steps use a smaller
    decay (as TensorFlow's ExponentialMovingAverage with num_updates) so that the average
    is not dominated by the initialisation.
    """

    def __init__(self, model, decay: float) -> None:
        self.model, self.decay, self.steps = model, decay, 0
        self.shadow = [np.array(v.numpy()) for v in model.trainable_weights]

    def callback(self):
        import keras

        average = self

        class Update(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                average.update()

        return Update()

    def update(self) -> None:
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for shadow, variable in zip(self.shadow, self.model.trainable_weights, strict=True):
            shadow *= decay
            shadow += (1 - decay) * variable.numpy()

    def apply(self) -> None:
        for shadow, variable in zip(self.shadow, self.model.trainable_weights, strict=True):
            variable.assign(shadow)


def recalibrate_batch_norm(model, images: np.ndarray, batch_size: int = 64) -> None:
    """Replace every batch-norm layer's moving statistics by their average over ``images``
    (un-augmented training crops, uint8): a cumulative mean, batch by batch."""
    import keras

    layers = [
        layer for layer in all_layers(model) if isinstance(layer, keras.layers.BatchNormalization)
    ]
    if not layers or len(images) == 0:
        return
    momenta = [layer.momentum for layer in layers]
    try:
        for index, start in enumerate(range(0, len(images), batch_size)):
            for layer in layers:
                layer.momentum = index / (index + 1)
            batch = images[start : start + batch_size].astype(np.float32) / np.float32(255.0)
            model(batch, training=True)
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum


def resolve_parent(spec: str) -> Path:
    """The training run, cross-validation folder or Keras file that ``--init-from`` names."""
    path = DEFAULT_PARENT if spec == "default" else Path(spec)
    if path.is_dir() and (path / "cv.json").is_file():
        return path  # the fold models, averaged as shipped
    if path.is_dir():
        path = path / "model.keras"
    if path.suffix != ".keras" or not path.is_file():
        raise ValueError(
            f"--init-from {spec}: need 'default', a training run or cross-validation folder, "
            f"or a .keras file ({path} not found)"
        )
    return path


def cv_folds(folder: Path) -> list[Path]:
    return sorted(folder.glob("fold_*"), key=lambda p: int(p.name.split("_")[1]))


def parent_config_of(parent: Path) -> dict:
    """The training config that describes a parent's weights (labels, recipe, architecture)."""
    if parent.is_dir():
        config = json.loads((cv_folds(parent)[0] / "config.json").read_text())
        return {**config, "name": parent.name}
    return json.loads((parent.parent / "config.json").read_text())


def load_parent(parent: Path):
    """The parent's weights as one Keras model: a CV folder's fold models are averaged in one
    graph, exactly as ``export.to_onnx`` ships them."""
    import keras

    if not parent.is_dir():
        return keras.models.load_model(parent, compile=False)
    from export.to_onnx import ensemble_model

    members = [keras.models.load_model(f / "model.keras", compile=False) for f in cv_folds(parent)]
    return ensemble_model(members, members[0].input_shape[1])


def load_teacher(spec: str, fold: int, val_patients: set[str], recipe: Recipe):
    """The teacher of a distillation, and what it is: for a cross-validation folder and a
    validating fold k, only its fold-k model, after checking that this model never saw
    the donors this training validates on (the out-of-fold estimate stays honest); for
    ``--fold -1`` the fold models averaged, as shipped. Raises ValueError otherwise."""
    import keras

    path = resolve_parent(spec)
    config = parent_config_of(path)
    if Recipe.from_json(json.dumps(config["recipe"])) != recipe:
        raise ValueError(f"--distill-from {spec}: the teacher prepares crops another way")
    if not path.is_dir():
        if fold >= 0:
            log.warning(
                "--distill-from %s: a single model; nothing checks that it never saw this "
                "fold's validation donors",
                spec,
            )
        return keras.models.load_model(path, compile=False), {"teacher": str(path)}
    if fold < 0:
        return load_parent(path), {"teacher": str(path), "members": len(cv_folds(path))}
    member = path / f"fold_{fold}"
    seen = set(json.loads((member / "config.json").read_text())["split"]["train_patients"])
    if seen & val_patients:
        overlap = len(seen & val_patients)
        raise ValueError(
            f"--distill-from {spec}: its fold {fold} model saw {overlap} of this fold's "
            "validation donors"
        )
    model = keras.models.load_model(member / "model.keras", compile=False)
    return model, {"teacher": str(member), "members": 1}


def all_layers(model) -> list:
    """Every layer, inside nested models too (an ensemble holds its members as layers)."""
    found = []
    for layer in model.layers:
        found.append(layer)
        if hasattr(layer, "layers"):
            found.extend(all_layers(layer))
    return found


def train(args: argparse.Namespace) -> dict:
    """Run one training; returns the validation metrics of the kept epoch."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    from export.vgg import build_vgg

    keras.utils.set_random_seed(args.seed)
    tf.config.experimental.enable_op_determinism()
    rng = np.random.default_rng(args.seed)
    started = time.time()

    recipe = recipe_from_args(args)
    if args.init_from:  # before any data is read: a mismatch should fail at once
        parent_path = resolve_parent(args.init_from)
        parent_config = parent_config_of(parent_path)
        parent_recipe = Recipe.from_json(json.dumps(parent_config["recipe"]))
        if parent_recipe != recipe:
            raise ValueError(
                f"--init-from {args.init_from}: its preprocessing differs from this training's "
                f"({parent_recipe.crop} crop, window {parent_recipe.window}, margin "
                f"{parent_recipe.margin}, {parent_recipe.interpolation} interpolation, LoG "
                f"{'on' if parent_recipe.log_enhance else 'off'}): leave out --crop/--window/"
                "--margin/--interpolation/--log-enhance to take the parent's"
            )
    split = load_split(
        args.data,
        recipe,
        args.folds,
        args.fold,
        args.split_seed,
        args.cache_dir,
        args.workers,
        args.split,
    )
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
    if validating and len(set(y_val.tolist())) < 2:
        raise ValueError("validation patients cover fewer than two classes: use fewer --folds")
    positive = default_positive(labels)
    if args.init_from and parent_config["labels"] != labels:
        raise ValueError(
            f"--init-from {args.init_from}: its labels {parent_config['labels']} differ from "
            f"this training's {labels}"
        )

    teacher = None
    if args.distill_from:
        if not 0.0 < args.distill_weight <= 1.0:
            raise ValueError("--distill-weight must be in (0, 1]")
        val_patients = {s.patient for s in val_samples}
        teacher, taught = load_teacher(args.distill_from, args.fold, val_patients, recipe)
        log.info("distilling from %s (weight %g)", taught["teacher"], args.distill_weight)

    parent = None
    freeze = bool(args.init_from) if args.freeze_batch_norm is None else args.freeze_batch_norm
    bn_recalibrate = 0 if freeze else args.bn_recalibrate
    if args.init_from:
        model = load_parent(parent_path)
        parent = {
            "path": str(parent_path),
            "name": parent_config.get("name", parent_path.parent.name),
            "architecture": parent_config["architecture"],
        }
    else:
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
    if freeze:
        for layer in all_layers(model):
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False  # Keras runs frozen batch norm in inference mode
    steps_per_epoch = max(
        1,
        len(epoch_indices(patients_train, y_train, args, np.random.default_rng(0)))
        // args.batch_size,
    )
    schedule = keras.optimizers.schedules.CosineDecay(
        args.lr, decay_steps=steps_per_epoch * args.epochs, alpha=0.05
    )
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
    )
    class_weight = None
    if args.balance == "weights":
        counts = np.bincount(y_train, minlength=len(labels))
        class_weight = {i: len(y_train) / (len(labels) * max(c, 1)) for i, c in enumerate(counts)}

    args.out.mkdir(parents=True, exist_ok=True)
    architecture = (parent or {}).get("architecture") or architecture_of(
        args, model.name, int(model.count_params())
    )
    config = run_config(args, labels, recipe, architecture, parent, train_samples, val_samples)
    (args.out / "config.json").write_text(json.dumps(config, indent=2))

    val_ds = make_dataset(tf, x_val, y_val, len(labels), args, training=False, rng=rng)
    rescaler = None
    raw_scale = "scale" in args.augment and args.scale_at == "raw"
    if raw_scale or "jpeg" in args.augment:
        rescaler = RawRescaler(
            train_samples,
            recipe,
            args.scale_range if raw_scale else (1, 1),
            jpeg="jpeg" in args.augment,
        )
    average = WeightAverage(model, args.ema) if args.ema > 0 else None
    callbacks = [average.callback()] if average else []
    # a donor-balanced draw of clean crops (epoch_indices shuffles: the first N are a random
    # sample of every donor, not the first donors on disk)
    drawn = epoch_indices(patients_train, y_train, args, np.random.default_rng(1))
    recalibration = x_train[drawn[: max(0, bn_recalibrate)]]

    def evaluated_weights() -> list[np.ndarray]:
        """The model as it will be saved (averaged, batch norm re-estimated)."""
        raw = [np.array(w.numpy()) for w in model.weights]
        if average:
            average.apply()
        recalibrate_batch_norm(model, recalibration)
        final = [np.array(w.numpy()) for w in model.weights]
        for variable, value in zip(model.weights, raw, strict=True):
            variable.assign(value)
        return final

    history: list[dict] = []
    kept: dict = {}
    for epoch in range(1, args.epochs + 1):
        tick = time.time()
        idx = epoch_indices(patients_train, y_train, args, rng)
        train_ds = make_dataset(
            tf,
            x_train[idx],
            y_train[idx],
            len(labels),
            args,
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
            verbose=0 if args.quiet else 1,
        )
        weights = evaluated_weights()
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
            args.epochs,
            " ".join(f"{k} {v:.4f}" for k, v in row.items() if k not in ("epoch", "seconds"))
            + f" ({row['seconds']:.0f}s)",
        )
        with open(args.out / "history.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(row))
            writer.writeheader()
            writer.writerows(history)
        better = metrics is not None and metrics["weighted_f1"] > kept.get("weighted_f1", -1.0)
        if args.select == "last" or not validating or better:
            kept = {
                **(metrics or {}),
                "epoch": epoch,
                "weights": weights,
                "probabilities": probabilities,
            }
    model.set_weights(kept.pop("weights"))
    save_model(model, args.out / "model.keras")
    plot_curves(history, args.out / "curves.png")
    best_probabilities = kept.pop("probabilities")
    if validating:
        with open(args.out / "val_predictions.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "patient", "label", *[f"p_{c}" for c in labels]])
            for sample, probs in zip(val_samples, best_probabilities, strict=True):
                writer.writerow(
                    [str(sample.path), sample.patient, sample.label, *[f"{p:.6f}" for p in probs]]
                )
    summary = {
        "best_epoch": kept["epoch"],
        "validation": {k: v for k, v in kept.items() if k != "epoch"},
        "train_seconds": round(time.time() - started, 1),
        "selection": "last epoch"
        if args.select == "last"
        else "best epoch by validation weighted F1 (argmax)",
    }
    (args.out / "metrics.json").write_text(json.dumps(summary, indent=2))
    if validating:
        log.info(
            "kept epoch %d: validation weighted F1 %.4f, AUC %.4f; wrote %s",
            kept["epoch"],
            kept["weighted_f1"],
            kept["roc_auc"],
            args.out,
        )
    else:
        log.info("trained on every patient; wrote %s", args.out)
    return summary


def default_positive(labels: list[str]) -> str:
    """The class a run's metrics call positive: ``all`` (leukaemia) when the labels have it."""
    return "all" if "all" in labels else labels[0]


def architecture_of(args: argparse.Namespace, name: str, params: int) -> dict:
    return {
        "name": name,
        "depth": args.depth,
        "width": args.width,
        "pooling": args.pooling,
        "dense": args.dense,
        "batch_norm": args.batch_norm,
        "initializer": args.init,
        "params": params,
    }


def run_config(
    args: argparse.Namespace,
    labels: list[str],
    recipe: Recipe,
    architecture: dict,
    parent: dict | None,
    train_samples: list[Sample],
    val_samples: list[Sample],
) -> dict:
    """A training run's config.json: options, labels, preprocessing, network and split (what
    ``export.cv`` checks before reusing a fold and ``export.to_onnx`` reads)."""
    arguments = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    arguments["augment"] = ",".join(args.augment) or "none"
    arguments["scale_range"] = list(args.scale_range)
    validating = bool(val_samples)
    return {
        "name": args.out.name,
        "args": arguments,
        "labels": labels,
        "positive_class": default_positive(labels),
        "recipe": asdict(recipe),
        "architecture": architecture,
        "parent": parent,
        "split": {
            "method": (
                (
                    f"patient-disjoint, the data folder's {args.folds} top-level folders as "
                    f"folds, fold {args.fold} validates"
                    if args.split == "folders"
                    else f"patient-disjoint, stratified by class, {args.folds} folds, fold "
                    f"{args.fold} validates, split seed {args.split_seed}"
                )
                if validating
                else "every patient in training (no validation split)"
            ),
            "train_patients": sorted({s.patient for s in train_samples}),
            "val_patients": sorted({s.patient for s in val_samples}),
            "train_images": len(train_samples),
            "val_images": len(val_samples),
        },
        "data": str(args.data),
    }


def save_model(model, path: Path) -> None:
    """The weights and architecture without the optimizer state (a third of the size), so
    runs can be kept in the repository and fine-tuned from."""
    import keras

    bare = keras.models.clone_model(model)
    bare.set_weights(model.get_weights())
    bare.save(path)


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
