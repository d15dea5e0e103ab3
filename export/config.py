"""What a training run trains, as one frozen, validated, versioned value.

Every trainer (``export.train``, ``export.cv``, ``export.train_jax``, ``export.gpu``) turns
its command line into a :class:`TrainConfig` in ``main()`` and passes that on; nothing
below ``main()`` sees argparse. A run folder's ``config.json`` stores the config as a flat
record (``args``, with ``config_version``); :meth:`TrainConfig.from_record` reads it back,
filling the options added since a run was made from :data:`LEGACY_DEFAULTS`, the one place
that says what older runs did. ``export.cv`` resumes a fold only when the stored config
trains the same model as the one asked for (:meth:`TrainConfig.differences`).

The defaults are the shipped default model's recipe (``export/default_model``, chosen by
donor-level cross-validation and the selection rule in docs/ablation.md), so that a lab
retraining on its own crops follows it; older recipes stay reachable by options
(``--crop window --scale-range 0.7,1.4 --augment full`` was the first one). A test
compares these defaults with the shipped run's ``config.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from export.augment import EXTRA_GROUPS, GROUPS, RANGES, RAW_GROUPS, Ranges, parse_groups
from export.data import SPLITS
from smearscan.colour import EDGE_MARGIN
from smearscan.preprocess import Recipe

log = logging.getLogger("export.config")

#: Version of the stored record (``config.json``'s ``config_version``); bump when a key
#: changes meaning.
CONFIG_VERSION = 1
BALANCING = ("none", "weights", "oversample", "donors", "donors-area")
SELECTIONS = ("last", "best")
SCALE_AT = ("raw", "input")
POOLINGS = ("global", "avg2")
DEPTHS = (13, 16, 19)
CROPS = ("full", "bbox", "window")
INTERPOLATIONS = ("area", "linear")
#: What a distillation teacher is shown: the student's augmented crop, or the crop before
#: the in-graph augmentations (flips, photometric, stain, focus, input-scale).
DISTILL_VIEWS = ("same", "clean")
DEFAULT_RECIPE = Recipe(crop="bbox")
DEFAULT_AUGMENT = "flips,scale,photometric,stain,focus"
#: Preprocessing options that ``--init-from`` takes from its parent unless they are given.
PREPROCESSING_OPTIONS = ("crop", "window", "margin", "interpolation", "log_enhance")
#: What runs made before an option existed did, by the option's record key. A stored run
#: that lacks any other key is refused when read back rather than guessed at.
LEGACY_DEFAULTS: dict[str, Any] = {
    "scale_at": "input",
    "augment_strength": 1.0,
    "stain_strength": None,
    "freeze_batch_norm": None,
    "distill_from": None,
    "distill_weight": 0.5,
    "distill_view": "same",
    "split": "donors",
    "warmup_epochs": 0,
    "consistency": 0.0,
    "slide_colour": False,
    "slide_colour_margin": 0,
}


#: Record keys that say where and how a run happens, not what it trains.
RUN_SETTINGS = ("out", "fold", "quiet", "workers", "cache_dir")


class ConfigError(ValueError):
    """An option value no trainer can use; the message names the option."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class Network:
    """The customized VGG (``export/vgg.py``): depth, channel width factor (1.0 = the
    paper's 64-128-256-512-512), pooling and the dense head."""

    depth: int = 13
    width: float = 0.125
    pooling: str = "global"
    dense: tuple[int, ...] = (256, 128)
    dropout: float = 0.3
    batch_norm: bool = True
    initializer: str = "he_normal"

    def __post_init__(self) -> None:
        _check(self.depth in DEPTHS, f"--depth must be one of {DEPTHS}, not {self.depth}")
        _check(self.width > 0 and math.isfinite(self.width), "--width must be above 0")
        _check(self.pooling in POOLINGS, f"--pooling must be one of {POOLINGS}")
        _check(all(units > 0 for units in self.dense), "--dense sizes must be above 0")
        _check(0.0 <= self.dropout < 1.0, "--dropout must be in [0, 1)")

    def build(self, num_classes: int, input_size: int):
        """The Keras model (either backend: the TF and the JAX trainers build the same)."""
        from export.vgg import build_vgg

        return build_vgg(
            num_classes,
            depth=self.depth,
            width=self.width,
            input_size=input_size,
            pooling=self.pooling,
            dense_units=self.dense,
            batch_norm=self.batch_norm,
            dropout=self.dropout,
            initializer=self.initializer,
        )

    def describe(self, name: str, params: int) -> dict:
        """The model file's ``smearscan.architecture``."""
        return {
            "name": name,
            "depth": self.depth,
            "width": self.width,
            "pooling": self.pooling,
            "dense": dense_text(self.dense),
            "batch_norm": self.batch_norm,
            "initializer": self.initializer,
            "params": params,
        }


@dataclass(frozen=True)
class Augmentation:
    """Which augmentation groups run (``export/augment.py`` says what each one does), how
    wide their ranges are (``strength``; the stain group's ``stain_strength`` where given),
    the cell rescaling, mixup and the weight of the rotation-consistency term
    (``augment.consistency_loss``)."""

    groups: tuple[str, ...] = parse_groups(DEFAULT_AUGMENT)
    strength: float = 1.0
    stain_strength: float | None = None
    scale_range: tuple[float, float] = (0.8, 1.1)
    scale_at: str = "raw"
    mixup: float = 0.0
    consistency: float = 0.0

    def __post_init__(self) -> None:
        unknown = set(self.groups) - set(GROUPS + EXTRA_GROUPS)
        _check(not unknown, f"unknown augmentation(s) {sorted(unknown)}")
        _check(self.strength >= 0 and math.isfinite(self.strength), "strength must be >= 0")
        _check(
            self.stain_strength is None
            or (self.stain_strength >= 0 and math.isfinite(self.stain_strength)),
            "--stain-strength must be >= 0",
        )
        low, high = self.scale_range
        _check(0.2 <= low <= high <= 5, "--scale-range needs 0.2 <= low <= high <= 5")
        _check(self.scale_at in SCALE_AT, f"--scale-at must be one of {SCALE_AT}")
        _check(self.mixup >= 0, "--mixup must be >= 0")
        _check(
            self.consistency >= 0 and math.isfinite(self.consistency), "--consistency must be >= 0"
        )
        _check(
            not (self.consistency and self.mixup),
            "--consistency pairs each crop with its own turned copy; mixup would blend the pair",
        )

    @property
    def ranges(self) -> Ranges:
        """The photometric, stain and focus ranges this run draws from."""
        return RANGES.at(self.strength, stain=self.stain_strength)

    @property
    def rescales_raw(self) -> bool:
        """The scale augmentation acts on the decoded crop (as a magnification would)."""
        return "scale" in self.groups and self.scale_at == "raw"

    @property
    def on_input(self) -> tuple[str, ...]:
        """The groups applied to the preprocessed model input (the rest act on raw crops)."""
        return tuple(
            g
            for g in self.groups
            if g not in RAW_GROUPS and not (g == "scale" and self.rescales_raw)
        )

    @property
    def decodes_raw(self) -> bool:
        """Training decodes every drawn crop again (a group acts on the raw crop)."""
        return self.rescales_raw or any(g in RAW_GROUPS for g in self.groups)


@dataclass(frozen=True)
class Schedule:
    """Epochs, batch, Adam's peak learning rate (an optional linear warm-up, then cosine
    decay), the weight average and the batch-norm re-estimation before each evaluation, and
    which epoch is kept."""

    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    warmup_epochs: int = 0
    ema: float = 0.99
    bn_recalibrate: int = 1024
    select: str = "last"

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "--epochs must be at least 1")
        _check(self.batch_size >= 1, "--batch-size must be at least 1")
        _check(self.lr > 0 and math.isfinite(self.lr), "--lr must be above 0")
        _check(0 <= self.warmup_epochs < self.epochs, "--warmup-epochs must be in [0, --epochs)")
        _check(0.0 <= self.ema < 1.0, "--ema must be in [0, 1)")
        _check(self.bn_recalibrate >= 0, "--bn-recalibrate must be >= 0")
        _check(self.select in SELECTIONS, f"--select must be one of {SELECTIONS}")

    def ema_decay(self, step, minimum=min):
        """The weight average's decay after ``step`` updates (counted from 1): ``ema``, but
        smaller early (as TensorFlow's ExponentialMovingAverage with num_updates), so the
        average is not dominated by the initialisation. ``minimum`` is ``jnp.minimum`` in
        the JAX trainer's jitted step, where ``step`` is traced."""
        return minimum(self.ema, (1.0 + step) / (10.0 + step))

    @staticmethod
    def recalibration_momentum(index):
        """Batch-norm momentum for batch ``index`` (from 0) of the re-estimation on clean
        crops: the moving statistics become the plain mean over the batches so far."""
        return index / (index + 1)

    def learning_rate(self, keras, steps_per_epoch: int):
        """Adam's learning rate per step, one definition for the TF and the JAX trainer:
        with ``warmup_epochs``, a linear rise from lr/100 to lr over them, then cosine decay
        to 5 % of lr over the remaining epochs; without, cosine decay from lr."""
        total = steps_per_epoch * self.epochs
        schedules = keras.optimizers.schedules
        if not self.warmup_epochs:
            return schedules.CosineDecay(self.lr, decay_steps=total, alpha=0.05)
        warm = steps_per_epoch * self.warmup_epochs
        return schedules.CosineDecay(
            self.lr / 100,
            decay_steps=total - warm,
            alpha=0.05,
            warmup_target=self.lr,
            warmup_steps=warm,
        )


@dataclass(frozen=True)
class Sampling:
    """How each epoch draws its crops (``export.sampling.epoch_indices``)."""

    balance: str = "donors"
    per_patient: int = 100

    @property
    def needs_areas(self) -> bool:
        """Whether the draws need each crop's cell area (``export.size_reading``)."""
        return self.balance == "donors-area"

    def __post_init__(self) -> None:
        _check(self.balance in BALANCING, f"--balance must be one of {BALANCING}")
        _check(self.per_patient >= 0, "--per-patient must be >= 0")


@dataclass(frozen=True)
class Split:
    """Which patients validate: fold ``fold`` of ``folds`` (``-1``: none, every patient
    trains), dealt by ``method`` (``export.data.patient_folds``)."""

    method: str = "donors"
    folds: int = 4
    fold: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.method in SPLITS, f"--split must be one of {SPLITS}")
        _check(self.folds >= 1, "--folds must be at least 1")
        _check(-1 <= self.fold < self.folds, f"--fold must be -1 or in [0, {self.folds})")

    def describe(self, validating: bool) -> str:
        if not validating:
            return "every patient in training (no validation split)"
        if self.method == "folders":
            return (
                f"patient-disjoint, the data folder's {self.folds} top-level folders as folds, "
                f"fold {self.fold} validates"
            )
        return (
            f"patient-disjoint, stratified by class, {self.folds} folds, fold {self.fold} "
            f"validates, split seed {self.seed}"
        )


@dataclass(frozen=True)
class TrainConfig:
    """One training run. ``out``, the fold, ``workers``, ``cache_dir`` and ``quiet`` say
    where and how it runs; everything else what it trains."""

    data: Path
    out: Path
    recipe: Recipe = DEFAULT_RECIPE
    network: Network = field(default_factory=Network)
    augmentation: Augmentation = field(default_factory=Augmentation)
    schedule: Schedule = field(default_factory=Schedule)
    sampling: Sampling = field(default_factory=Sampling)
    split: Split = field(default_factory=Split)
    seed: int = 0
    init_from: str | None = None
    freeze_batch_norm: bool | None = None
    distill_from: str | None = None
    distill_weight: float = 0.5
    distill_view: str = "same"
    slide_colour: bool = False
    slide_colour_margin: int = EDGE_MARGIN
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    cache_dir: Path = Path(".cache/arrays")
    quiet: bool = False

    def __post_init__(self) -> None:
        _check(0.0 < self.distill_weight <= 1.0, "--distill-weight must be in (0, 1]")
        _check(
            self.distill_view in DISTILL_VIEWS,
            f"--distill-view must be one of {DISTILL_VIEWS}, not {self.distill_view}",
        )
        if self.distill_view == "clean":
            _check(bool(self.distill_from), "--distill-view clean needs --distill-from")
            _check(
                not self.augmentation.mixup and not self.augmentation.consistency,
                "--distill-view clean works without --mixup and --consistency (the teacher "
                "would need the blended or turned crop's clean twin)",
            )
        if self.slide_colour:
            _check(
                "colour" not in self.augmentation.groups,
                "--slide-colour maps every donor to one reference colour; the colour "
                "augmentation group would have nothing left to vary",
            )
            _check(
                not self.init_from and not self.distill_from,
                "--slide-colour trains from scratch: a parent or teacher saw crops in their "
                "donors' own colour",
            )
        _check(self.slide_colour_margin >= 0, "--slide-colour-margin must be at least 0")
        _check(self.workers >= 1, "--workers must be at least 1")

    @property
    def freezes_batch_norm(self) -> bool:
        """Batch norm of a fine-tuned model stays as it is unless asked otherwise: a few
        hundred crops from a few donors are too few to estimate it again."""
        return bool(self.init_from) if self.freeze_batch_norm is None else self.freeze_batch_norm

    def for_fold(self, fold: int, out: Path) -> TrainConfig:
        return replace(self, split=replace(self.split, fold=fold), out=out, quiet=True)

    # ------------------------------------------------------------------ the stored record

    def to_record(self) -> dict[str, Any]:
        """The flat record ``config.json`` keeps under ``args`` (the option names)."""
        net, aug, sched = self.network, self.augmentation, self.schedule
        return {
            "data": str(self.data),
            "out": str(self.out),
            "width": net.width,
            "depth": net.depth,
            "pooling": net.pooling,
            "dense": dense_text(net.dense),
            "dropout": net.dropout,
            "batch_norm": net.batch_norm,
            "init": net.initializer,
            "epochs": sched.epochs,
            "batch_size": sched.batch_size,
            "lr": sched.lr,
            "seed": self.seed,
            "split_seed": self.split.seed,
            "folds": self.split.folds,
            "split": self.split.method,
            "fold": self.split.fold,
            "crop": self.recipe.crop,
            "window": self.recipe.window,
            "margin": self.recipe.margin,
            "interpolation": self.recipe.interpolation,
            "log_enhance": self.recipe.log_enhance,
            "augment": ",".join(aug.groups) or "none",
            "scale_at": aug.scale_at,
            "augment_strength": aug.strength,
            "stain_strength": aug.stain_strength,
            "scale_range": list(aug.scale_range),
            "balance": self.sampling.balance,
            "per_patient": self.sampling.per_patient,
            "mixup": aug.mixup,
            "consistency": aug.consistency,
            "ema": sched.ema,
            "warmup_epochs": sched.warmup_epochs,
            "bn_recalibrate": sched.bn_recalibrate,
            "select": sched.select,
            "init_from": self.init_from,
            "distill_from": self.distill_from,
            "distill_weight": self.distill_weight,
            "distill_view": self.distill_view,
            "slide_colour": self.slide_colour,
            "slide_colour_margin": self.slide_colour_margin,
            "freeze_batch_norm": self.freeze_batch_norm,
            "workers": self.workers,
            "cache_dir": str(self.cache_dir),
            "quiet": self.quiet,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any], version: int = CONFIG_VERSION) -> TrainConfig:
        """A stored run's config; options it predates take :data:`LEGACY_DEFAULTS`."""
        if version > CONFIG_VERSION:
            raise ConfigError(
                f"the run's config is version {version}; this code reads up to {CONFIG_VERSION}"
            )
        values = {**LEGACY_DEFAULTS, **record}
        missing = sorted(set(TrainConfig(Path(), Path()).to_record()) - set(values))
        if missing:
            raise ConfigError(
                f"the run predates option(s) {', '.join(missing)} and no legacy value is known"
            )
        recipe = replace(DEFAULT_RECIPE, **{name: values[name] for name in PREPROCESSING_OPTIONS})
        return cls(
            data=Path(values["data"]),
            out=Path(values["out"]),
            recipe=recipe,
            network=Network(
                depth=int(values["depth"]),
                width=float(values["width"]),
                pooling=values["pooling"],
                dense=parse_dense(str(values["dense"])),
                dropout=float(values["dropout"]),
                batch_norm=bool(values["batch_norm"]),
                initializer=values["init"],
            ),
            augmentation=Augmentation(
                groups=parse_groups(values["augment"]),
                strength=float(values["augment_strength"]),
                stain_strength=(
                    None if values["stain_strength"] is None else float(values["stain_strength"])
                ),
                scale_range=(float(values["scale_range"][0]), float(values["scale_range"][1])),
                scale_at=values["scale_at"],
                mixup=float(values["mixup"]),
                consistency=float(values["consistency"]),
            ),
            schedule=Schedule(
                epochs=int(values["epochs"]),
                batch_size=int(values["batch_size"]),
                lr=float(values["lr"]),
                warmup_epochs=int(values["warmup_epochs"]),
                ema=float(values["ema"]),
                bn_recalibrate=int(values["bn_recalibrate"]),
                select=values["select"],
            ),
            sampling=Sampling(values["balance"], int(values["per_patient"])),
            split=Split(
                values["split"],
                int(values["folds"]),
                int(values["fold"]),
                int(values["split_seed"]),
            ),
            seed=int(values["seed"]),
            init_from=values["init_from"],
            freeze_batch_norm=values["freeze_batch_norm"],
            distill_from=values["distill_from"],
            distill_weight=float(values["distill_weight"]),
            distill_view=values["distill_view"],
            slide_colour=bool(values["slide_colour"]),
            slide_colour_margin=int(values["slide_colour_margin"]),
            workers=int(values["workers"]),
            cache_dir=Path(values["cache_dir"]),
            quiet=bool(values["quiet"]),
        )

    @classmethod
    def of_run(cls, folder: Path) -> TrainConfig:
        """The config a run folder was trained with."""
        stored = json.loads((folder / "config.json").read_text())
        return cls.from_record(stored["args"], int(stored.get("config_version", 1)))

    def signature(self) -> dict[str, Any]:
        """The record without where and how the run happens: two runs with equal
        signatures train the same model (``cv.json`` keeps it as the recipe)."""
        record = {k: v for k, v in self.to_record().items() if k not in RUN_SETTINGS}
        record["freeze_batch_norm"] = self.freezes_batch_norm
        # the margin means nothing without the normalisation
        record["slide_colour_margin"] = self.slide_colour_margin if self.slide_colour else None
        # a stain strength left out is the augmentation strength
        stain = self.augmentation.stain_strength
        record["stain_strength"] = self.augmentation.strength if stain is None else stain
        return record

    def differences(self, other: TrainConfig) -> list[str]:
        """The record keys whose values make ``other`` train another model than this."""
        mine, theirs = self.signature(), other.signature()
        return sorted(k for k in mine if mine[k] != theirs[k])


def dense_text(units: tuple[int, ...]) -> str:
    return ",".join(str(u) for u in units)


def parse_dense(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(u) for u in text.split(",") if u.strip())
    except ValueError:
        raise ConfigError(f"--dense takes comma-separated sizes, not {text!r}") from None


# ---------------------------------------------------------------------- command line


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


def add_training_options(p: argparse.ArgumentParser, data_required: bool = True) -> None:
    """The training options, their defaults taken from the config types above."""
    net, aug, sched, sampling, split = Network(), Augmentation(), Schedule(), Sampling(), Split()
    p.add_argument(
        "--data", required=data_required, type=Path, help="folder tree: .../<label>/<image>"
    )
    p.add_argument("--out", required=True, type=Path, help="run folder to create")
    p.add_argument("--width", type=float, default=net.width, help="channel width (1.0 = paper)")
    p.add_argument("--depth", type=int, default=net.depth, choices=DEPTHS)
    p.add_argument("--pooling", default=net.pooling, choices=POOLINGS)
    p.add_argument("--dense", default=dense_text(net.dense), help="dense layer sizes, a,b")
    p.add_argument("--dropout", type=float, default=net.dropout)
    p.add_argument(
        "--batch-norm",
        action=argparse.BooleanOptionalAction,
        default=net.batch_norm,
        help="BatchNorm after each conv (without it, training did not start on C-NMC)",
    )
    p.add_argument("--init", default=net.initializer, help="Keras kernel initializer name")
    p.add_argument("--epochs", type=positive_int, default=sched.epochs)
    p.add_argument("--batch-size", type=positive_int, default=sched.batch_size)
    p.add_argument("--lr", type=float, default=sched.lr, help="peak Adam learning rate (cosine)")
    p.add_argument("--seed", type=int, default=0, help="initialisation and sampling seed")
    p.add_argument(
        "--split-seed",
        type=int,
        default=split.seed,
        help="seed of the patient split (kept apart from --seed so that several "
        "initialisations can be compared on the same patients)",
    )
    p.add_argument("--folds", type=positive_int, default=split.folds, help="patient folds")
    p.add_argument(
        "--split",
        choices=SPLITS,
        default=split.method,
        help="donors: patients dealt at random into --folds folds, stratified by class; "
        "folders: the data folder's top-level folders are the folds (C-NMC's release "
        "folds, one acquisition batch each: leave one batch out)",
    )
    p.add_argument(
        "--fold",
        type=int,
        default=split.fold,
        help="which fold validates; -1 trains on every patient (no validation: the "
        "recipe must have been chosen by cross-validation, python -m export.cv)",
    )
    from_parent = "[default: with --init-from, the parent's; else {}]"
    p.add_argument(
        "--crop",
        choices=CROPS,
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
        choices=INTERPOLATIONS,
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
        default=",".join(aug.groups),
        help=f"none, full, or a comma-separated list of {','.join(GROUPS + EXTRA_GROUPS)} "
        f"('full' stands for all but the extras {', '.join(EXTRA_GROUPS)}: 'full,jpeg' adds one)",
    )
    p.add_argument(
        "--scale-at",
        default=aug.scale_at,
        choices=SCALE_AT,
        help="where the scale augmentation acts: on the decoded crop before preprocessing "
        "(raw: as another magnification would; decodes every drawn crop again) or on the "
        "small model input (input: cheaper, but a model can then read size from sharpness)",
    )
    p.add_argument(
        "--augment-strength",
        type=float,
        default=aug.strength,
        help="scales the photometric, stain and focus ranges (0.5: half as wide)",
    )
    p.add_argument(
        "--stain-strength",
        type=float,
        default=aug.stain_strength,
        help="scales the stain group's ranges (stain and hue) instead (default: as "
        "--augment-strength)",
    )
    p.add_argument(
        "--scale-range",
        type=scale_range,
        default=",".join(f"{f:g}" for f in aug.scale_range),
        help="cell rescaling factors drawn log-uniformly by the scale augmentation",
    )
    p.add_argument(
        "--balance",
        default=sampling.balance,
        choices=BALANCING,
        help="donors: each class gets the same draws per epoch, shared equally by its "
        "donors (with replacement for small donors); donors-area: as donors, drawn so that "
        "the classes have the same distribution of cell area (size no longer tells the "
        "class); weights: class weights in the loss; oversample: resample the minority class",
    )
    p.add_argument(
        "--per-patient",
        type=int,
        default=sampling.per_patient,
        help="images drawn per patient per epoch (0 = all); with --balance donors, the "
        "epoch size is this times the number of patients",
    )
    p.add_argument("--mixup", type=float, default=aug.mixup, help="mixup Beta(a, a); 0 = off")
    p.add_argument(
        "--consistency",
        type=float,
        default=aug.consistency,
        help="weight of a rotation-consistency term: each drawn crop is also seen flipped or "
        "turned by 90-degree steps, and the squared difference of the two outputs is added to "
        "the loss (twice the images per step; 0 = off, the shipped recipe)",
    )
    p.add_argument(
        "--warmup-epochs",
        type=int,
        default=sched.warmup_epochs,
        help="raise the learning rate linearly from lr/100 to --lr over this many epochs "
        "before its cosine decay (0 = none, the shipped recipe)",
    )
    p.add_argument(
        "--ema",
        type=float,
        default=sched.ema,
        help="exponential moving average of the weights, per step (0 = off); the "
        "evaluated and saved model uses the average",
    )
    p.add_argument(
        "--bn-recalibrate",
        type=int,
        default=sched.bn_recalibrate,
        help="re-estimate batch-norm statistics on this many un-augmented training crops "
        "before each evaluation (0 = off): statistics gathered under augmentation do not "
        "match real crops",
    )
    p.add_argument(
        "--select",
        default=sched.select,
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
        "donors; with --fold -1 its fold models averaged), or a run folder or .keras file; "
        "several, comma-separated (for example two seeds' folders), are averaged",
    )
    p.add_argument(
        "--distill-weight",
        type=float,
        default=0.5,
        help="with --distill-from: the teacher's share of each training target (the rest is "
        "the true label)",
    )
    p.add_argument(
        "--distill-view",
        default="same",
        choices=DISTILL_VIEWS,
        help="with --distill-from: the teacher sees the student's augmented crop (same) or "
        "the crop before flips and photometric, stain, focus and input-scale jitter "
        "(clean), so that the student learns the clean crop's answer under every shift",
    )
    p.add_argument(
        "--slide-colour",
        action="store_true",
        help="per-slide colour normalisation: every donor's cell pixels (measured on up to "
        "40 of its crops) mapped to the training donors' mean Lab statistics before "
        "preprocessing (smearscan/colour.py); an ablation: the scanner does not run it yet",
    )
    p.add_argument(
        "--slide-colour-margin",
        type=int,
        default=EDGE_MARGIN,
        help="with --slide-colour: crop pixels of the cell's rim left out of the statistics "
        "(blur and compression move them) [default: %(default)s; 0 measures the whole cell, "
        "as runs before it did]",
    )
    p.add_argument(
        "--freeze-batch-norm",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep the batch-norm layers of an --init-from model as they are (inference mode, "
        "no re-estimation) [default: on with --init-from, else off]",
    )
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--cache-dir", type=Path, default=Path(".cache/arrays"))
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def resolved_recipe(options: argparse.Namespace) -> Recipe:
    """The preprocessing the options describe. Options left unset come from the
    ``--init-from`` parent (a model must be fine-tuned on inputs prepared as its own were;
    the log says so), else from the shipped recipe. An explicit option that contradicts
    the parent is kept, and training refuses it with the reason."""
    from export.parents import parent_config_of, resolve_parent

    parent = None
    if options.init_from:
        parent = Recipe.from_json(
            json.dumps(parent_config_of(resolve_parent(options.init_from))["recipe"])
        )
    given = {name: getattr(options, name) for name in PREPROCESSING_OPTIONS}
    taken = {
        name: getattr(parent or DEFAULT_RECIPE, name) for name, v in given.items() if v is None
    }
    if parent is not None and taken:
        log.info(
            "--init-from %s: preprocessing taken from the parent (%s)",
            options.init_from,
            ", ".join(f"{n}={v}" for n, v in taken.items()),
        )
    return replace(DEFAULT_RECIPE, **{**given, **taken})


def config_from_options(options: argparse.Namespace) -> TrainConfig:
    """The typed config of parsed training options (the one place argparse meets it).
    Raises :class:`ConfigError` (a ValueError) for unusable values."""
    return TrainConfig(
        data=options.data,
        out=options.out,
        recipe=resolved_recipe(options),
        network=Network(
            depth=options.depth,
            width=options.width,
            pooling=options.pooling,
            dense=parse_dense(options.dense),
            dropout=options.dropout,
            batch_norm=options.batch_norm,
            initializer=options.init,
        ),
        augmentation=Augmentation(
            groups=tuple(options.augment),
            strength=options.augment_strength,
            stain_strength=options.stain_strength,
            scale_range=tuple(options.scale_range),
            scale_at=options.scale_at,
            mixup=options.mixup,
            consistency=options.consistency,
        ),
        schedule=Schedule(
            epochs=options.epochs,
            batch_size=options.batch_size,
            lr=options.lr,
            warmup_epochs=options.warmup_epochs,
            ema=options.ema,
            bn_recalibrate=options.bn_recalibrate,
            select=options.select,
        ),
        sampling=Sampling(options.balance, options.per_patient),
        split=Split(options.split, options.folds, options.fold, options.split_seed),
        seed=options.seed,
        init_from=options.init_from,
        freeze_batch_norm=options.freeze_batch_norm,
        distill_from=options.distill_from,
        distill_weight=options.distill_weight,
        distill_view=options.distill_view,
        slide_colour=options.slide_colour,
        slide_colour_margin=options.slide_colour_margin,
        workers=options.workers,
        cache_dir=options.cache_dir,
        quiet=options.quiet,
    )


def default_positive(labels: list[str]) -> str:
    """The class a run's metrics call positive: ``all`` (leukaemia) when the labels have it."""
    return "all" if "all" in labels else labels[0]
