"""Training-time augmentations (TensorFlow ops on preprocessed [0, 1] crops).

Each group attacks one nuisance factor that moved the shipped model's decisions on new donors
(docs/model-card.md): ``scale`` the absolute cell size, ``photometric`` exposure and
contrast, ``stain`` the haematoxylin/eosin balance and the hue, ``focus`` blur and
sharpening; ``flips`` are the symmetries of a cell. The black background stays black under
every photometric change, as it is in real crops, so the cell mask the scanner computes is
not disturbed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from smearscan.colour import BACKGROUND_LEVEL, ColourStats, colour_stats, colour_transfer

GROUPS = ("flips", "scale", "photometric", "stain", "focus")
#: Groups outside ``full`` (asked for by name, e.g. ``full,jpeg``): ``jpeg`` saves half the
#: drawn raw crops as JPEG at a random quality and reads them back, the codec many labs
#: export with (the shipped model's worst shift); ``colour`` gives every drawn crop the cell
#: colour statistics of a training donor drawn so that colour says nothing of the label
#: (:class:`DonorColours`).
EXTRA_GROUPS = ("jpeg", "colour")
#: The groups that act on the decoded raw crop, before the scanner's preprocessing.
RAW_GROUPS = ("jpeg", "colour")
JPEG_QUALITY = (50, 95)

#: Ruifrok & Johnston's haematoxylin/eosin/DAB stain vectors (rows: optical density per RGB).
RGB_FROM_HED = np.array(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float32
)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED).astype(np.float32)
#: Pixels darker than this (max channel, [0, 1]) are background, as the scanner's
#: ``background_threshold`` of 12/255.
BACKGROUND = BACKGROUND_LEVEL / 255.0


@dataclass(frozen=True)
class Ranges:
    """What each group draws at strength 1: the one definition of the recipe's nuisance
    ranges. The TF trainer (:func:`make_augmenter`), the JAX trainer
    (``export.train_jax.make_augment``) and the shift suite (its shifts inside the training
    range are these ranges' ends) all read it."""

    gain: float = 0.15  # exposure: the crop's values times 1 +- gain
    log_gamma: float = float(np.log(1.25))  # gamma exp(+-log_gamma): 0.8 .. 1.25
    contrast: float = 0.15  # around the cell's mean value: times 1 +- contrast
    stain_scale: float = 0.07  # each haematoxylin/eosin/DAB optical density times 1 +- this
    stain_shift: float = 0.03  # ... plus +- this
    hue_turn: float = 1 / 30  # the stain's hue turned by +- this share of the circle (12 deg)
    blur_sigma: tuple[float, float] = (0.4, 1.1)  # the focus kernel's sigma: low + [0, span]
    focus_amount: tuple[float, float] = (-1.0, 1.5)  # < 0 blurs (-1: the Gaussian), > 0 sharpens
    focus_chance: float = 0.5  # the share of crops whose focus changes

    def at(self, strength: float, stain: float | None = None) -> Ranges:
        """These ranges ``strength`` times as wide (the blur's smallest sigma stays); the
        stain group's (stain and hue) ``stain`` times as wide where given."""
        k = float(strength)
        c = k if stain is None else float(stain)
        return Ranges(
            gain=self.gain * k,
            log_gamma=self.log_gamma * k,
            contrast=self.contrast * k,
            stain_scale=self.stain_scale * c,
            stain_shift=self.stain_shift * c,
            hue_turn=self.hue_turn * c,
            blur_sigma=(self.blur_sigma[0], self.blur_sigma[1] * k),
            focus_amount=(self.focus_amount[0] * k, self.focus_amount[1] * k),
            focus_chance=self.focus_chance,
        )

    @property
    def gamma(self) -> tuple[float, float]:
        """The gamma's extremes (0.8 and 1.25 at strength 1)."""
        return float(np.exp(-self.log_gamma)), float(np.exp(self.log_gamma))

    @property
    def hue_degrees(self) -> float:
        return 360.0 * self.hue_turn


#: The recipe's ranges at strength 1.
RANGES = Ranges()


def rescale(image: np.ndarray, factor: float) -> np.ndarray:
    """The whole decoded frame scaled by ``factor`` around its centre, cropped or padded
    (black) back to its size: the same cell seen at another magnification. Training applies
    it to the raw crop before the scanner's preprocessing, as a microscope would; zooming
    the small model input instead changes the texture's sharpness with the size, so a model
    can still read size from sharpness."""
    import cv2

    height, width = image.shape[:2]
    interpolation = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
    scaled = cv2.resize(image, None, fx=factor, fy=factor, interpolation=interpolation)
    sh, sw = scaled.shape[:2]
    out = np.zeros_like(image)
    # overlap of the scaled frame and the original frame, both centred
    y0, x0 = max(0, (sh - height) // 2), max(0, (sw - width) // 2)
    ty, tx = max(0, (height - sh) // 2), max(0, (width - sw) // 2)
    h, w = min(height, sh), min(width, sw)
    out[ty : ty + h, tx : tx + w] = scaled[y0 : y0 + h, x0 : x0 + w]
    return out


def parse_groups(text: str) -> tuple[str, ...]:
    """``none``, ``full`` (every group of :data:`GROUPS`) or a comma-separated list of groups,
    where ``full`` may stand for those and :data:`EXTRA_GROUPS` be added (``full,jpeg``)."""
    text = text.strip().lower()
    if text == "none":
        return ()
    groups: list[str] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        for group in GROUPS if part == "full" else (part,):
            if group not in groups:
                groups.append(group)
    known = GROUPS + EXTRA_GROUPS
    unknown = sorted(set(groups) - set(known))
    if unknown:
        raise ValueError(f"unknown augmentation(s) {unknown}: use none, full or {known}")
    return tuple(groups)


def jpeg_roundtrip(image: np.ndarray, quality: int) -> np.ndarray:
    """A decoded crop saved as JPEG at ``quality`` and read back (same channel order)."""
    import cv2

    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("JPEG encoding failed")
    decoded = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if decoded is None:
        raise ValueError("JPEG decoding failed")
    return decoded


class DonorColours:
    """The ``colour`` group: each training donor's cell colour statistics, and for each
    drawn crop the donor whose colour it takes, drawn as a class (uniformly) and then one
    of that class's donors. Over the draws a crop's colour is then independent of its label:
    C-NMC labels are per donor, and the shipped model partly read the donor's colour (the
    shift suite's donor colour swap, issue 26). The statistics come from up to
    ``per_donor`` crops of each donor, as the shift suite measures them."""

    def __init__(self, stats: dict[str, ColourStats], labels: dict[str, str]) -> None:
        self.stats = stats
        self.labels = labels
        self.by_class: dict[str, list[str]] = {}
        for donor in sorted(labels):
            self.by_class.setdefault(labels[donor], []).append(donor)
        self.classes = sorted(self.by_class)

    @classmethod
    def measure(cls, samples: list, per_donor: int = 40, workers: int = 2) -> DonorColours:
        """The statistics of the donors of ``samples`` (training donors only)."""
        from concurrent.futures import ThreadPoolExecutor

        from export.data import donor_sample
        from smearscan.preprocess import read_image

        chosen = donor_sample(samples, per_donor)
        with ThreadPoolExecutor(max(1, workers)) as pool:
            images = list(pool.map(lambda s: read_image(s.path, order="bgr"), chosen))
        by_donor: dict[str, list[np.ndarray]] = {}
        labels: dict[str, str] = {}
        for sample, image in zip(chosen, images, strict=True):
            by_donor.setdefault(sample.patient, []).append(image)
            labels[sample.patient] = sample.label
        return cls({d: colour_stats(crops) for d, crops in by_donor.items()}, labels)

    def draw(self, rng: np.random.Generator) -> str:
        """The donor whose colour a crop takes."""
        members = self.by_class[self.classes[int(rng.integers(len(self.classes)))]]
        return members[int(rng.integers(len(members)))]

    def apply(self, image: np.ndarray, donor: str, rng: np.random.Generator) -> np.ndarray:
        """A crop of ``donor`` given the colour of a drawn donor."""
        return colour_transfer(image, self.stats[donor], self.stats[self.draw(rng)])


def mixup_blend(share, images, onehot, partner_images, partner_onehot):
    """Mixup (either trainer, either array library): every image and its target blended
    with its partner's (the batch in a drawn order) by one drawn ``share`` per batch."""
    return (
        share * images + (1 - share) * partner_images,
        share * onehot + (1 - share) * partner_onehot,
    )


def turned_copy(tf, image):
    """The crop flipped and/or turned by 90-degree steps, never left as it is: one of the
    seven other views of the eight the scanner's ``--tta`` averages."""
    view = tf.random.uniform([], 1, 8, dtype=tf.int32)
    turned = tf.image.rot90(image, k=view % 4)
    return tf.cond(view >= 4, lambda: tf.image.flip_left_right(turned), lambda: turned)


def consistency_loss(keras, weight: float):
    """Cross-entropy plus ``weight`` times the mean squared difference between the outputs
    for each crop and its turned copy. The batch holds the crops in its first half and their
    turned copies, in the same order, in its second (``pipeline.make_dataset``): training
    draws every orientation, yet a single view agreed with the eight-view mean on only
    89-94 % of labels (docs/ablation.md)."""
    ops = keras.ops

    def loss(y_true, y_pred):
        # per image (class weights still apply): its cross-entropy and its pair's gap
        half = ops.shape(y_pred)[0] // 2
        gap = ops.sum(ops.square(y_pred[:half] - y_pred[half:]), axis=-1)
        gaps = ops.concatenate([gap, gap], axis=0)
        return keras.losses.categorical_crossentropy(y_true, y_pred) + weight * gaps

    return loss


def _gaussian_kernel(tf, sigma):
    radius = 5
    x = tf.cast(tf.range(-radius, radius + 1), tf.float32)
    kernel = tf.exp(-(x**2) / (2.0 * sigma**2))
    return kernel / tf.reduce_sum(kernel)


def gaussian_blur(tf, image, sigma):
    """Separable Gaussian blur of one HWC image (edge pixels reflected)."""
    kernel = _gaussian_kernel(tf, sigma)
    channels = 3
    horizontal = tf.tile(tf.reshape(kernel, [1, -1, 1, 1]), [1, 1, channels, 1])
    vertical = tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]), [1, 1, channels, 1])
    batch = tf.pad(image[tf.newaxis], [[0, 0], [5, 5], [5, 5], [0, 0]], mode="REFLECT")
    batch = tf.nn.depthwise_conv2d(batch, horizontal, [1, 1, 1, 1], "VALID")
    batch = tf.nn.depthwise_conv2d(batch, vertical, [1, 1, 1, 1], "VALID")
    return batch[0]


def photometric_tf(tf, image, cell, gain, gamma, contrast):
    """Exposure, gamma, then contrast around the cell's mean value (one drawn set)."""
    image = tf.clip_by_value(image * gain, 0.0, 1.0) ** gamma
    mean = tf.reduce_sum(image * cell) / tf.maximum(tf.reduce_sum(cell) * 3.0, 1.0)
    return (image - mean) * contrast + mean


def stain_tf(tf, image, scales, shifts, turn):
    """The H/E/D optical densities scaled and shifted, then the whole stain's hue turned by
    ``turn`` (a share of the circle: another scanner's colour balance)."""
    density = -tf.math.log(tf.clip_by_value(image, 1.0 / 255.0, 1.0))
    hed = tf.reshape(density, [-1, 3]) @ tf.constant(HED_FROM_RGB)
    hed = hed * scales + shifts
    image = tf.reshape(tf.exp(-(hed @ tf.constant(RGB_FROM_HED))), tf.shape(image))
    return tf.image.adjust_hue(tf.clip_by_value(image, 0.0, 1.0), turn)


def focus_tf(tf, image, sigma, amount):
    """``amount`` < 0 blurs (-1: the Gaussian itself), > 0 sharpens (unsharp mask)."""
    return image + amount * (image - gaussian_blur(tf, image, sigma))


def make_augmenter(
    tf,
    groups: tuple[str, ...],
    scale_range: tuple[float, float],
    size: int,
    ranges: Ranges = RANGES,
):
    """A function image -> image (one HWC float32 crop in [0, 1]) applying ``groups``.

    ``ranges``: the photometric, stain and focus ranges (:data:`RANGES` at the run's
    strengths, ``Augmentation.ranges``); the scale range is given separately. ``scale``
    here zooms the model input (``--scale-at input``); by default training rescales the raw
    crop instead (:func:`rescale`)."""
    low, high = np.log(scale_range[0]), np.log(scale_range[1])

    def uniform(lo, hi, shape=()):
        return tf.random.uniform(shape, lo, hi)

    def flips(image):
        image = tf.image.random_flip_left_right(image)
        return tf.image.rot90(image, k=tf.random.uniform([], 0, 4, dtype=tf.int32))

    def scale(image):
        # rescale the cell around the crop centre: the scanner's window keeps absolute size,
        # which differs between acquisition batches more than between cell types
        factor = tf.exp(uniform(low, high))
        side = tf.cast(tf.round(size * factor), tf.int32)
        resized = tf.image.resize(image, [side, side], method="area", antialias=True)
        return tf.image.resize_with_crop_or_pad(resized, size, size)

    def photometric(image, cell):
        gain = uniform(1 - ranges.gain, 1 + ranges.gain)
        gamma = tf.exp(uniform(-ranges.log_gamma, ranges.log_gamma))
        contrast = uniform(1 - ranges.contrast, 1 + ranges.contrast)
        return photometric_tf(tf, image, cell, gain, gamma, contrast)

    def stain(image):
        scales = uniform(1 - ranges.stain_scale, 1 + ranges.stain_scale, [3])
        shifts = uniform(-ranges.stain_shift, ranges.stain_shift, [3])
        return stain_tf(tf, image, scales, shifts, uniform(-ranges.hue_turn, ranges.hue_turn))

    def focus(image):
        low_sigma, span = ranges.blur_sigma
        sigma = uniform(low_sigma, low_sigma + span)
        return focus_tf(tf, image, sigma, uniform(*ranges.focus_amount))

    def augment(image):
        if "flips" in groups:
            image = flips(image)
        if "scale" in groups:
            image = scale(image)
        cell = tf.cast(tf.reduce_max(image, axis=-1, keepdims=True) > BACKGROUND, tf.float32)
        if "photometric" in groups:
            image = photometric(image, cell)
        if "stain" in groups:
            image = stain(image)
        image = tf.clip_by_value(image, 0.0, 1.0) * cell
        if "focus" in groups:
            image = tf.cond(
                tf.random.uniform([]) < ranges.focus_chance, lambda: focus(image), lambda: image
            )
        image = tf.clip_by_value(image, 0.0, 1.0)
        image.set_shape([size, size, 3])
        return image

    return augment
