"""Training data as arrays and tf.data pipelines: the patient split preprocessed once (and
cached), crops decoded again for raw-crop augmentation, and the batches a trainer sees."""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.augment import DonorColours, make_augmenter, mixup_blend, turned_copy
from export.config import TrainConfig
from export.data import Sample, discover_dataset, load_arrays, split_by_patient
from smearscan.colour import ColourStats, SlideColour, colour_stats, slide_sample
from smearscan.preprocess import Recipe, read_image


@dataclass(frozen=True)
class DonorNormaliser:
    """Per-slide colour normalisation in training, where a donor is a slide: each donor's
    crops mapped from its own statistics to the reference (``SlideColour``)."""

    colour: SlideColour
    stats: dict[str, ColourStats]

    @classmethod
    def measure(
        cls, samples: list[Sample], workers: int, per_slide: int = 40, margin: int = 0
    ) -> dict:
        """Every donor's statistics, from up to ``per_slide`` of its crops (in path order,
        :func:`smearscan.colour.slide_sample`) less their cells' rim ``margin`` pixels wide:
        its own unlabelled pixels, as a scan of the slide would measure them."""
        by_donor: dict[str, list[Path]] = {}
        for sample in samples:
            by_donor.setdefault(sample.patient, []).append(sample.path)

        def one(paths: list[Path]) -> ColourStats:
            chosen = slide_sample(sorted(paths), per_slide)
            return colour_stats((read_image(path, order="bgr") for path in chosen), margin)

        donors = sorted(by_donor)
        with ThreadPoolExecutor(max(1, workers)) as pool:
            return dict(zip(donors, pool.map(one, [by_donor[d] for d in donors]), strict=True))

    @classmethod
    def of_run(cls, stored: dict, samples: list[Sample], workers: int) -> DonorNormaliser | None:
        """The normalisation a run (its ``config.json``) was trained with, for the donors
        of ``samples``; None for a run without one."""
        colour = SlideColour.from_record(stored.get("slide_colour"))
        if colour is None:
            return None
        return cls(colour, cls.measure(samples, workers, colour.per_slide, colour.margin))

    def __call__(self, donor: str, image: np.ndarray) -> np.ndarray:
        return self.colour.normalise(image, self.stats[donor])

    def key(self) -> str:
        """What the normalised arrays depend on (part of their cache key)."""
        stats = {d: [np.round(v, 4).tolist() for v in s] for d, s in sorted(self.stats.items())}
        return json.dumps([self.colour.to_record(), stats])


def cached_arrays(
    samples: list[Sample],
    recipe: Recipe,
    cache_dir: Path,
    workers: int,
    normalise: DonorNormaliser | None = None,
) -> tuple[np.ndarray, list[int]]:
    """Preprocess once per (file list, recipe, normalisation) and keep the uint8 arrays on
    disk."""
    key = hashlib.sha256(
        (
            recipe.to_json()
            + (normalise.key() if normalise else "")
            + "\n".join(f"{s.path}:{s.path.stat().st_size}" for s in samples)
        ).encode()
    ).hexdigest()[:20]
    path = cache_dir / f"{key}.npz"
    if path.exists():
        with np.load(path) as cached:
            return cached["x"], cached["kept"].tolist()
    x, kept = load_arrays(samples, recipe, workers=workers, normalise=normalise)
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
    normalise: DonorNormaliser | None = None


def load_split(config: TrainConfig) -> SplitArrays:
    """Discover, split by patient and preprocess (cached) a training folder; fold -1 puts
    every patient in training. With ``slide_colour``, every donor (validating ones
    included: a scan measures each slide's own pixels) is normalised to the mean of the
    training donors' statistics."""
    data, split, recipe = config.data, config.split, config.recipe
    cache_dir, workers = config.cache_dir, config.workers
    samples = discover_dataset(data)
    labels = sorted({s.label for s in samples})
    val_samples: list[Sample]
    if split.fold == -1:
        train_samples, val_samples = list(samples), []
    else:
        train_samples, val_samples = split_by_patient(
            samples, split.folds, split.fold, split.seed, split.method, data
        )
    normalise = None
    if config.slide_colour:
        margin = config.slide_colour_margin
        stats = DonorNormaliser.measure(samples, workers, margin=margin)
        training = sorted({s.patient for s in train_samples})
        reference = SlideColour.fitted([stats[d] for d in training], margin=margin)
        normalise = DonorNormaliser(reference, stats)
    x_train, kept_train = cached_arrays(train_samples, recipe, cache_dir, workers, normalise)
    x_val, kept_val = cached_arrays(val_samples, recipe, cache_dir, workers, normalise)
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
        normalise,
    )


class RawRescaler:
    """Training crops decoded again at every draw, rescaled by a random factor around the
    frame centre and then preprocessed by the scanner's own function: the scale
    augmentation acts where a different magnification would. With ``jpeg``, half the draws
    are also saved as JPEG (quality drawn from ``augment.JPEG_QUALITY``) and read back
    first, as a lab's export would. With ``colours``, every draw first takes the colour of a
    drawn training donor (the ``colour`` group); with ``normalise``, it is first put in the
    reference colour (per-slide colour normalisation). The encoded bytes stay in memory
    (about 25 kB a crop)."""

    def __init__(
        self,
        samples: list[Sample],
        recipe: Recipe,
        scale_range,
        jpeg: bool = False,
        colours: DonorColours | None = None,
        normalise: DonorNormaliser | None = None,
    ) -> None:
        self.data = [sample.path.read_bytes() for sample in samples]
        self.donors = [sample.patient for sample in samples]
        self.recipe = recipe
        self.low, self.high = np.log(scale_range[0]), np.log(scale_range[1])
        self.jpeg = jpeg
        self.colours = colours
        self.normalise = normalise

    def __call__(self, index, seed) -> np.ndarray:
        from export.augment import JPEG_QUALITY, jpeg_roundtrip, rescale
        from smearscan.preprocess import decode_image, preprocess, stored_uint8

        rng = np.random.default_rng(int(seed))
        image = decode_image(self.data[int(index)], order="bgr")
        if self.normalise is not None:
            image = self.normalise(self.donors[int(index)], image)
        if self.colours is not None:
            image = self.colours.apply(image, self.donors[int(index)], rng)
        factor = float(np.exp(rng.uniform(self.low, self.high)))
        if self.jpeg and rng.random() < 0.5:
            image = jpeg_roundtrip(image, int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1)))
        model_input = preprocess(rescale(image, factor), self.recipe, order="bgr")
        return stored_uint8(model_input)


def make_dataset(
    tf,
    x,
    y,
    num_classes: int,
    config: TrainConfig,
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
    ``(1 - w) * label + w * teacher(view)``, the view being the very image the student sees
    or, with ``distill_view`` "clean", that image before the in-graph augmentations."""
    autotune = tf.data.AUTOTUNE
    size = x.shape[1]
    augmentation = config.augmentation
    groups = augmentation.on_input  # jpeg, and scale at "raw", act on the raw crop
    augment = make_augmenter(tf, groups, augmentation.scale_range, size, augmentation.ranges)

    def scale(image, label):
        # smearscan.preprocess.unit_range, in TF
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
    clean_view = training and teacher is not None and config.distill_view == "clean"
    if clean_view:  # (augmented, label, clean): the teacher is shown the clean crop
        ds = ds.map(
            lambda image, label: (augment(image) if groups else image, label, image),
            num_parallel_calls=autotune,
        )
    elif training and groups:
        ds = ds.map(lambda image, label: (augment(image), label), num_parallel_calls=autotune)
    paired = training and augmentation.consistency > 0
    if paired:  # each crop and its turned copy (augment.consistency_loss)
        ds = ds.map(
            lambda image, label: (tf.stack([image, turned_copy(tf, image)]), label),
            num_parallel_calls=autotune,
        )
    ds = ds.batch(config.schedule.batch_size)
    if paired:  # the crops, then their copies in the same order
        ds = ds.map(
            lambda pairs, labels: (
                tf.concat([pairs[:, 0], pairs[:, 1]], axis=0),
                tf.concat([labels, labels], axis=0),
            )
        )
    if training and augmentation.mixup > 0:
        alpha = float(augmentation.mixup)

        def mixup(images, labels):
            first = tf.random.gamma([], alpha)
            second = tf.random.gamma([], alpha)
            share = first / (first + second)
            order = tf.random.shuffle(tf.range(tf.shape(images)[0]))
            return mixup_blend(
                share, images, labels, tf.gather(images, order), tf.gather(labels, order)
            )

        ds = ds.map(mixup, num_parallel_calls=autotune)
    if training and teacher is not None:
        share = float(config.distill_weight)

        def soften(images, labels, shown=None):
            shown = images if shown is None else shown
            return images, (1.0 - share) * labels + share * teacher(shown, training=False)

        ds = ds.map(soften)
    return ds.prefetch(autotune)
