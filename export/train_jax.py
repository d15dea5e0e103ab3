"""Train a recipe's cross-validation folds on a GPU with Keras 3's JAX backend.

    KERAS_BACKEND=jax python -m export.train_jax --pack pack.npz --out DIR --width 1.0 \\
        [--crop bbox --scale-range 0.8,1.1 ... any python -m export.train option]

For a GPU machine that has JAX but not TensorFlow (whose wheel is too large to carry): the
crops arrive packed (``python -m export.gpu pack``: lossless, in one file or several parts,
with the folds of the CPU protocol's own split), and the recipe of ``export.train`` runs with its
augmentation inside the jitted training step: donor-balanced draws, flips, photometric,
HED stain and hue, focus, Adam with cosine decay, the weight average (EMA) and batch-norm
re-estimation before every evaluation. Differences from the CPU trainer are stated, not
hidden: the last partial batch of an epoch is dropped (one compiled shape), and the raw-crop
scale augmentation is emulated on the packed input (see :func:`resolution_loss`).

Writes to ``--out``: ``oof.csv`` (every fold's validation predictions, on the packed crops),
``summary.json`` (per-fold history, seconds, the device) and, per fold asked for with
``--save-weights``, ``<name>-fold<K>.npz`` (the kept weights by variable path; ``python -m
export.gpu import`` turns them into a CV folder that ``export.cv`` evaluates on the real
crops).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from export.augment import RAW_GROUPS, mixup_blend
from export.config import (
    Augmentation,
    Schedule,
    TrainConfig,
    config_from_options,
    default_positive,
)
from export.sampling import epoch_indices
from smearscan.preprocess import Recipe

log = logging.getLogger("export.train_jax")


def build_parser() -> argparse.ArgumentParser:
    from export.config import add_training_options

    parser = argparse.ArgumentParser(
        prog="python -m export.train_jax",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_training_options(parser, data_required=False)  # the pack replaces the data folder
    parser.add_argument(
        "--pack",
        required=True,
        type=Path,
        nargs="+",
        help="from python -m export.gpu pack (every part, in order)",
    )
    parser.add_argument("--name", help="prefix of the output files (default: w<width>)")
    parser.add_argument(
        "--fold-list", default="all", help="folds to train, comma separated, or 'all'"
    )
    parser.add_argument(
        "--save-weights",
        default="all",
        help="folds whose weights to write: comma separated, 'all' or 'none'",
    )
    parser.add_argument(
        "--weights-dtype",
        default="float32",
        choices=("float32", "float16"),
        help="float16 halves the files (for a transfer limit); arrays beyond its range stay "
        "float32",
    )
    parser.add_argument(
        "--max-file-mb",
        type=float,
        default=15.0,
        help="split a fold's weights into files of at most this size",
    )
    return parser


def save_weights(weights: dict[str, np.ndarray], stem: Path, dtype: str, max_mb: float) -> None:
    """``stem.npz``, or ``stem-partK.npz`` files of at most ``max_mb`` each (a transfer
    limit); float16 where the values fit its range."""
    stored = {}
    for path, value in weights.items():
        if dtype == "float16" and np.abs(value).max(initial=0) < 6e4:
            value = value.astype(np.float16)
        stored[path] = value
    parts: list[dict[str, Any]] = [{}]  # Any: np.savez's keywords
    size = 0
    for path, value in stored.items():
        if parts[-1] and size + value.nbytes > max_mb * 1e6:
            parts.append({})
            size = 0
        parts[-1][path] = value
        size += value.nbytes
    if len(parts) == 1:
        np.savez(stem.with_name(stem.name + ".npz"), **parts[0])
        return
    for index, part in enumerate(parts, start=1):
        np.savez(stem.with_name(f"{stem.name}-part{index}.npz"), **part)


def write_fold(
    out: Path,
    name: str,
    fold: int,
    pack: Pack,
    val_index: np.ndarray,
    probabilities: np.ndarray,
    record: dict,
    run: dict,
) -> None:
    """Append a fold's validation predictions to ``oof.csv`` and its record (seconds,
    history, parameter count) to ``summary.json``, as soon as the fold ends."""
    oof_path = out / "oof.csv"
    new = not oof_path.exists()
    with open(oof_path, "a", newline="") as handle:
        writer = csv.writer(handle)
        if new:
            writer.writerow(
                ["model", "fold", "path", "patient", "label", *[f"p_{c}" for c in pack.labels]]
            )
        for index, probs in zip(val_index, probabilities, strict=True):
            writer.writerow(
                [
                    name,
                    fold,
                    pack.paths[index],
                    pack.patients[index],
                    pack.labels[pack.y[index]],
                    *[f"{p:.6f}" for p in probs],
                ]
            )
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary.setdefault(name, {**run, "folds": {}})["folds"][str(fold)] = record
    summary_path.write_text(json.dumps(summary, indent=2, default=str))


def fold_selection(text: str, folds: int) -> list[int]:
    if text == "all":
        return list(range(folds))
    if text == "none":
        return []
    chosen = sorted({int(part) for part in text.split(",") if part.strip()})
    if any(not 0 <= k < folds for k in chosen):
        raise ValueError(f"folds must be in [0, {folds}): {text}")
    return chosen


class Pack:
    """The packed crops: uint8 model inputs, labels, donors, folds and the cell box side."""

    def __init__(self, files: Path | list[Path], workers: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        import cv2

        files = [files] if isinstance(files, Path) else files
        columns: dict[str, list[np.ndarray]] = {}
        chunks: list[np.ndarray] = []
        for path in files:
            with np.load(path) as data:
                self.labels = [str(x) for x in data["labels"]]
                self.meta = json.loads(str(data["meta"]))
                for name in ("paths", "patients", "y", "fold_of", "side"):
                    columns.setdefault(name, []).append(data[name])
                blob, offsets = data["encoded"], data["offsets"]
                chunks += [blob[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
        merged = {name: np.concatenate(parts) for name, parts in columns.items()}
        if len(chunks) != self.meta["crops"]:
            raise ValueError(
                f"the pack holds {len(chunks)} of {self.meta['crops']} crops: "
                "pass every part, in order"
            )
        self.paths = [str(x) for x in merged["paths"]]
        self.patients = merged["patients"].astype(str)
        self.y = merged["y"].astype(np.int64)
        self.fold_of = merged["fold_of"].astype(np.int64)
        self.side = merged["side"].astype(np.float32)

        def decode(chunk: np.ndarray) -> np.ndarray:
            image = cv2.imdecode(chunk, cv2.IMREAD_COLOR)
            if image is None:
                raise ValueError("a packed crop does not decode: the pack is damaged")
            return image[:, :, ::-1]

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            self.x = np.stack(list(pool.map(decode, chunks)))


def photometric_jax(image, cell, gain, gamma, contrast):
    """:func:`export.augment.photometric_tf` in JAX."""
    import jax.numpy as jnp

    image = jnp.clip(image * gain, 0.0, 1.0) ** gamma
    mean = (image * cell).sum() / jnp.maximum(cell.sum() * 3.0, 1.0)
    return (image - mean) * contrast + mean


def stain_jax(image, scales, shifts, turn):
    """:func:`export.augment.stain_tf` in JAX."""
    import jax.numpy as jnp

    from export.augment import HED_FROM_RGB, RGB_FROM_HED

    density = -jnp.log(jnp.clip(image, 1.0 / 255.0, 1.0))
    hed = density.reshape(-1, 3) @ jnp.asarray(HED_FROM_RGB)
    hed = hed * scales + shifts
    image = jnp.exp(-(hed @ jnp.asarray(RGB_FROM_HED))).reshape(image.shape)
    return adjust_hue(jnp.clip(image, 0.0, 1.0), turn)


def blur_jax(image, sigma):
    """:func:`export.augment.gaussian_blur` in JAX (radius 5, edges reflected)."""
    import jax.numpy as jnp

    radius, height, width = 5, image.shape[0], image.shape[1]
    taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    kernel = jnp.exp(-(taps**2) / (2.0 * sigma**2))
    kernel = kernel / kernel.sum()
    padded = jnp.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode="reflect")
    rows = kernel[0] * padded[:, 0:width]
    for i in range(1, 2 * radius + 1):
        rows = rows + kernel[i] * padded[:, i : i + width]
    blurred = kernel[0] * rows[0:height]
    for i in range(1, 2 * radius + 1):
        blurred = blurred + kernel[i] * rows[i : i + height]
    return blurred


def focus_jax(image, sigma, amount):
    """:func:`export.augment.focus_tf` in JAX."""
    return image + amount * (image - blur_jax(image, sigma))


def make_augment(augmentation: Augmentation, size: int):
    """A jittable function (key, uint8 batch, box sides) -> float32 batch in [0, 1]: the
    groups of ``export.augment.make_augmenter``, per crop (vmapped), in JAX, drawing from
    the same :data:`export.augment.RANGES`."""
    import jax
    import jax.numpy as jnp

    from export.augment import BACKGROUND

    groups, scale_range, scale_at = (
        augmentation.groups,
        augmentation.scale_range,
        augmentation.scale_at,
    )
    ranges = augmentation.ranges
    log_low, log_high = float(np.log(scale_range[0])), float(np.log(scale_range[1]))

    def one(key, image, side):
        keys = iter(jax.random.split(key, 16))

        def uniform(lo, hi, shape=()):
            return jax.random.uniform(next(keys), shape, minval=lo, maxval=hi)

        if "flips" in groups:
            image = jnp.where(jax.random.bernoulli(next(keys)), image[:, ::-1], image)
            turns = jax.random.randint(next(keys), (), 0, 4)
            image = jax.lax.switch(
                turns, [lambda im, r=r: jnp.rot90(im, r, axes=(0, 1)) for r in range(4)], image
            )
        if "scale" in groups:
            factor = jnp.exp(uniform(log_low, log_high))
            if scale_at == "raw":
                image = resolution_loss(image, side * factor, size)
            else:
                image = zoom(image, factor, size)
        cell = (image.max(axis=-1, keepdims=True) > BACKGROUND).astype(jnp.float32)
        if "photometric" in groups:
            gain = uniform(1 - ranges.gain, 1 + ranges.gain)
            gamma = jnp.exp(uniform(-ranges.log_gamma, ranges.log_gamma))
            contrast = uniform(1 - ranges.contrast, 1 + ranges.contrast)
            image = photometric_jax(image, cell, gain, gamma, contrast)
        if "stain" in groups:
            scales = uniform(1 - ranges.stain_scale, 1 + ranges.stain_scale, (3,))
            shifts = uniform(-ranges.stain_shift, ranges.stain_shift, (3,))
            image = stain_jax(image, scales, shifts, uniform(-ranges.hue_turn, ranges.hue_turn))
        image = jnp.clip(image, 0.0, 1.0) * cell
        if "focus" in groups:
            low_sigma, span = ranges.blur_sigma
            sigma = uniform(low_sigma, low_sigma + span)
            focused = focus_jax(image, sigma, uniform(*ranges.focus_amount))
            chosen = jax.random.bernoulli(next(keys), ranges.focus_chance)
            image = jnp.where(chosen, focused, image)
        return jnp.clip(image, 0.0, 1.0)

    def augment(key, batch, sides):
        images = batch.astype(jnp.float32) * (1 / 255)  # smearscan.preprocess.unit_range
        keys = jax.random.split(key, images.shape[0])
        return jax.vmap(one)(keys, images, sides)

    return augment


def adjust_hue(rgb, delta):
    """RGB -> HSV, hue + delta (a fraction of the circle, as tf.image.adjust_hue) -> RGB."""
    import jax.numpy as jnp

    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    value = rgb.max(axis=-1)
    chroma = value - rgb.min(axis=-1)
    saturation = jnp.where(value > 0, chroma / jnp.where(value > 0, value, 1.0), 0.0)
    safe = jnp.where(chroma > 0, chroma, 1.0)
    rc, gc, bc = (value - red) / safe, (value - green) / safe, (value - blue) / safe
    hue = jnp.where(red == value, bc - gc, jnp.where(green == value, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = jnp.where(chroma > 0, (hue / 6.0) % 1.0, 0.0)
    hue = (hue + delta) % 1.0
    sector = jnp.floor(hue * 6.0)
    f = hue * 6.0 - sector
    p = value * (1 - saturation)
    q = value * (1 - saturation * f)
    t = value * (1 - saturation * (1 - f))
    sector = sector.astype(jnp.int32) % 6
    pick = [sector == i for i in range(6)]
    r = jnp.select(pick, [value, q, p, p, t, value])
    g = jnp.select(pick, [t, value, value, q, p, p])
    b = jnp.select(pick, [p, p, t, value, value, q])
    return jnp.stack([r, g, b], axis=-1)


def resolution_loss(image, scaled_side, size: int):
    """The raw-crop scale augmentation, emulated on the packed input of a ``bbox`` crop.

    Rescaling the raw crop by f before a bounding-box crop leaves the framed cell's size
    unchanged; what changes is how many pixels the box had before its resize to ``size``. The
    packed input already went through a box of ``side`` pixels; when ``side * f`` falls below
    ``size``, the raw path would have upsampled a smaller box, so the input is resampled down
    to that size and back up. Above ``size`` both paths downsample and nothing changes.
    """
    import jax
    import jax.numpy as jnp

    ratio = jnp.minimum(1.0, scaled_side / size)
    zero = jnp.zeros(2, jnp.float32)
    down = jax.image.scale_and_translate(
        image, image.shape, (0, 1), jnp.stack([ratio, ratio]), zero, "linear", antialias=True
    )
    up = jax.image.scale_and_translate(
        down, image.shape, (0, 1), jnp.stack([1 / ratio, 1 / ratio]), zero, "linear"
    )
    return jnp.where(ratio < 1.0, up, image)


def zoom(image, factor, size: int):
    """``--scale-at input``: the model input zoomed around its centre by ``factor``."""
    import jax
    import jax.numpy as jnp

    scale = jnp.stack([factor, factor])
    shift = (size - size * scale) / 2.0
    return jax.image.scale_and_translate(
        image, image.shape, (0, 1), scale, shift, "linear", antialias=True
    )


class FoldTrainer:
    """One fold's training state and its jitted steps."""

    def __init__(self, config: TrainConfig, num_classes: int, steps_per_epoch: int) -> None:
        import jax
        import keras

        keras.utils.set_random_seed(config.seed)
        self.config = config
        self.model = config.network.build(num_classes, 128)
        self.optimizer = keras.optimizers.Adam(
            config.schedule.learning_rate(keras, steps_per_epoch)
        )
        self.optimizer.build(self.model.trainable_variables)
        # the starting point of every fold (the CPU trainer seeds each fold the same way)
        self.initial = (
            [v.value for v in self.model.trainable_variables],
            [v.value for v in self.model.non_trainable_variables],
            [v.value for v in self.optimizer.variables],
        )
        self.reset()
        self.batch_norms = [
            layer
            for layer in self.model.layers
            if isinstance(layer, keras.layers.BatchNormalization)
        ]
        self._train_step = jax.jit(self._train_step_impl)
        self._recalibrate = jax.jit(self._recalibrate_impl)
        self._predict = jax.jit(self._predict_impl)

    def start_from(self, weights: list[np.ndarray]) -> None:
        """Start every fold from ``weights`` (Keras ``get_weights`` order) instead of this
        backend's own initialisation: the TF-vs-JAX parity test gives both the same start."""
        self.model.set_weights(weights)
        self.initial = (
            [v.value for v in self.model.trainable_variables],
            [v.value for v in self.model.non_trainable_variables],
            self.initial[2],
        )
        self.reset()

    def reset(self) -> None:
        """Back to the initial weights and a fresh optimizer: one compiled step serves
        every fold."""
        self.trainable, self.non_trainable, self.optimizer_state = (
            list(part) for part in self.initial
        )
        self.average = list(self.trainable)
        self.step = 0

    def _train_step_impl(self, state, images, onehot, step, key):
        import jax
        import jax.numpy as jnp
        import keras

        trainable, non_trainable, optimizer_state, average = state
        mixup = self.config.augmentation.mixup
        if mixup > 0:  # one share per batch, as the CPU trainer's mixup
            first, second = jax.random.split(key)
            share = jax.random.beta(first, mixup, mixup)
            order = jax.random.permutation(second, images.shape[0])
            images, onehot = mixup_blend(share, images, onehot, images[order], onehot[order])

        def loss_of(trainable, non_trainable):
            predicted, non_trainable = self.model.stateless_call(
                trainable, non_trainable, images, training=True
            )
            loss = keras.ops.mean(keras.losses.categorical_crossentropy(onehot, predicted))
            return loss, (predicted, non_trainable)

        (loss, (predicted, non_trainable)), grads = jax.value_and_grad(loss_of, has_aux=True)(
            trainable, non_trainable
        )
        trainable, optimizer_state = self.optimizer.stateless_apply(
            optimizer_state, grads, trainable
        )
        decay = self.config.schedule.ema_decay(step, minimum=jnp.minimum)
        average = [decay * a + (1.0 - decay) * t for a, t in zip(average, trainable, strict=True)]
        accuracy = jnp.mean(jnp.argmax(predicted, -1) == jnp.argmax(onehot, -1))
        return (trainable, non_trainable, optimizer_state, average), loss, accuracy

    def train_step(self, images, onehot, key) -> tuple[float, float]:
        self.step += 1
        state = (self.trainable, self.non_trainable, self.optimizer_state, self.average)
        state, loss, accuracy = self._train_step(state, images, onehot, float(self.step), key)
        self.trainable, self.non_trainable, self.optimizer_state, self.average = state
        return loss, accuracy

    def _recalibrate_impl(self, trainable, non_trainable, images, momentum):
        # momentum is traced: one compiled step serves the whole cumulative average
        saved = [layer.momentum for layer in self.batch_norms]
        try:
            for layer in self.batch_norms:
                layer.momentum = momentum
            _, non_trainable = self.model.stateless_call(
                trainable, non_trainable, images, training=True
            )
        finally:
            for layer, value in zip(self.batch_norms, saved, strict=True):
                layer.momentum = value
        return non_trainable

    def evaluated_state(self, recalibration: np.ndarray, batch: int = 64):
        """The weights as they are kept: the average, batch norm re-estimated on clean
        crops (a cumulative mean over batches, as ``export.keras_utils.recalibrate_batch_norm``)."""
        import jax.numpy as jnp

        trainable = self.average if self.config.schedule.ema > 0 else self.trainable
        non_trainable = self.non_trainable
        if self.batch_norms and len(recalibration):
            usable = len(recalibration) // batch * batch
            for index, start in enumerate(range(0, usable, batch)):
                # smearscan.preprocess.unit_range, on the device (uint8 travels there)
                images = jnp.asarray(recalibration[start : start + batch], jnp.float32) * (1 / 255)
                non_trainable = self._recalibrate(
                    trainable,
                    non_trainable,
                    images,
                    jnp.float32(Schedule.recalibration_momentum(index)),
                )
        return trainable, non_trainable

    def _predict_impl(self, trainable, non_trainable, images):
        predicted, _ = self.model.stateless_call(
            trainable, non_trainable, images.astype("float32") * (1 / 255), training=False
        )
        return predicted

    def predict(self, state, x: np.ndarray, batch: int = 512) -> np.ndarray:
        out = []
        for start in range(0, len(x), batch):
            chunk = x[start : start + batch]
            padded = np.zeros((batch, *x.shape[1:]), x.dtype)
            padded[: len(chunk)] = chunk
            out.append(np.asarray(self._predict(*state, padded))[: len(chunk)])
        return np.concatenate(out) if out else np.zeros((0, 2), np.float32)

    def weights(self, state) -> dict[str, np.ndarray]:
        trainable, non_trainable = state
        for variable, value in zip(self.model.trainable_variables, trainable, strict=True):
            variable.assign(value)
        for variable, value in zip(self.model.non_trainable_variables, non_trainable, strict=True):
            variable.assign(value)
        return {variable.path: np.asarray(variable.value) for variable in self.model.weights}


def steps_per_epoch(pack: Pack, config: TrainConfig, fold: int) -> int:
    train_index = np.flatnonzero(pack.fold_of != fold)
    drawn = epoch_indices(
        pack.patients[train_index], pack.y[train_index], config.sampling, np.random.default_rng(0)
    )
    return len(drawn) // config.schedule.batch_size


def train_fold(
    pack: Pack,
    config: TrainConfig,
    fold: int,
    rng: np.random.Generator,
    trainer: FoldTrainer,
    augment,
):
    """Train one fold; returns (kept weights, validation probabilities, history)."""
    import jax
    import jax.numpy as jnp

    from smearscan.metrics import classification_metrics

    schedule, sampling = config.schedule, config.sampling
    train_index = np.flatnonzero(pack.fold_of != fold)
    val_index = np.flatnonzero(pack.fold_of == fold)
    patients, y = pack.patients[train_index], pack.y[train_index]
    steps = steps_per_epoch(pack, config, fold)
    trainer.reset()
    images = jnp.asarray(pack.x[train_index])
    sides = jnp.asarray(pack.side[train_index])
    onehot = jnp.asarray(np.eye(len(pack.labels), dtype=np.float32)[y])
    drawn = epoch_indices(patients, y, sampling, np.random.default_rng(1))
    recalibration = pack.x[train_index][drawn[: max(0, schedule.bn_recalibrate)]]
    key = jax.random.PRNGKey(config.seed)
    positive = default_positive(pack.labels)
    history = []
    state = None
    for epoch in range(1, schedule.epochs + 1):
        tick = time.time()
        order = epoch_indices(patients, y, sampling, rng)
        losses, accuracies = [], []
        size = schedule.batch_size
        for start in range(0, steps * size, size):
            batch = jnp.asarray(order[start : start + size])
            key, sub, mix = jax.random.split(key, 3)
            inputs = augment(sub, images[batch], sides[batch])
            loss, accuracy = trainer.train_step(inputs, onehot[batch], mix)
            losses.append(loss)
            accuracies.append(accuracy)
        state = trainer.evaluated_state(recalibration)
        probabilities = trainer.predict(state, pack.x[val_index])
        metrics = classification_metrics(
            pack.y[val_index], probabilities, pack.labels, positive=positive
        )
        row = {
            "epoch": epoch,
            "loss": float(np.mean(jax.device_get(losses))),
            "accuracy": float(np.mean(jax.device_get(accuracies))),
            "val_weighted_f1": metrics["weighted_f1"],
            "val_roc_auc": metrics["roc_auc"],
            "seconds": round(time.time() - tick, 1),
        }
        history.append(row)
        log.info(
            "fold %d epoch %d %s",
            fold,
            epoch,
            " ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "epoch"),
        )
    return trainer.weights(state), probabilities, history


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    os.environ.setdefault("KERAS_BACKEND", "jax")
    args = build_parser().parse_args(argv)
    import jax
    import keras

    if keras.backend.backend() != "jax":
        log.error("set KERAS_BACKEND=jax (this is %s)", keras.backend.backend())
        return 2
    started = time.time()
    pack = Pack(args.pack, args.workers)
    args.data = args.data or Path(pack.meta["data"])
    try:
        config = config_from_options(args)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    augmentation = config.augmentation
    raw = [g for g in augmentation.groups if g in RAW_GROUPS]
    if raw:
        log.error("--augment %s acts on raw crops, which a pack does not carry", ",".join(raw))
        return 2
    if augmentation.consistency:
        log.error("the JAX trainer has no --consistency term (the TF trainer has)")
        return 2
    if config.init_from or config.distill_from or config.sampling.balance != "donors":
        log.error(
            "the JAX trainer supports neither --init-from, --distill-from nor --balance "
            "other than donors"
        )
        return 2
    if config.slide_colour:
        log.error("the JAX trainer has no --slide-colour (a pack holds preprocessed inputs)")
        return 2
    if config.schedule.ema <= 0:
        log.error("the JAX trainer keeps the weight average: --ema must be above 0")
        return 2
    packed = Recipe.from_json(json.dumps(pack.meta["recipe"]))
    if packed != config.recipe:
        log.error(
            "the pack was made with crop %s, margin %s, window %s; pass the same "
            "--crop/--margin/--window/--interpolation/--log-enhance",
            packed.crop,
            packed.margin,
            packed.window,
        )
        return 2
    folds = fold_selection(args.fold_list, pack.meta["folds"])
    saved = fold_selection(args.save_weights, pack.meta["folds"])
    name = args.name or f"w{config.network.width:g}"
    config.out.mkdir(parents=True, exist_ok=True)
    log.info(
        "%d crops, %d donors; %s on %s",
        len(pack.paths),
        len(set(pack.patients)),
        name,
        jax.devices(),
    )
    rng = np.random.default_rng(config.seed)
    steps = {steps_per_epoch(pack, config, fold) for fold in folds}
    if len(steps) != 1:
        log.error("folds differ in steps per epoch %s; train them one at a time", steps)
        return 2
    trainer = FoldTrainer(config, len(pack.labels), steps.pop())
    augment = jax.jit(make_augment(augmentation, pack.x.shape[1]))
    for fold in folds:
        tick = time.time()
        weights, probabilities, history = train_fold(pack, config, fold, rng, trainer, augment)
        seconds = round(time.time() - tick, 1)
        val_index = np.flatnonzero(pack.fold_of == fold)
        write_fold(
            config.out,
            name,
            fold,
            pack,
            val_index,
            probabilities,
            {
                "train_seconds": seconds,
                "history": history,
                "params": int(sum(v.size for v in weights.values())),
            },
            {"args": config.to_record(), "device": str(jax.devices()[0])},
        )
        if fold in saved:
            save_weights(
                weights, config.out / f"{name}-fold{fold}", args.weights_dtype, args.max_file_mb
            )
        log.info("fold %d done in %.0f s", fold, seconds)
    log.info("%s: %d fold(s) in %.0f s", name, len(folds), time.time() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
