"""Input quality control: crops the model cannot judge get no label, and the reason.

A classifier answers every input with confidence: a black frame, a white frame, noise, a
grayscale crop. Between decoding and inference, each crop is measured (cheaply, mostly on
the already-resized input) and compared with the range of the crops the model was trained
on. The ranges travel in the model file (``smearscan.qc``), fitted at export as robust
percentiles of the training crops, so a retrained model brings its own. A few rules hold
for every model: a frame with no cell, a cell filling the frame, and several cell-sized
objects in one crop.

A last check runs after the model: how far the crop's penultimate-layer embedding lies
from the training crops' (a whitened distance the exported graph computes as a second
output, :data:`EMBEDDING_OUTPUT`). A crop the network itself has never seen the like of
gets no label, whatever its simple measures say.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import cv2
import numpy as np

MODES = ("default", "strict", "off")
FEATURES = ("area", "fill", "objects", "chroma", "brightness", "clipped", "focus", "hue")
#: Feature ranges fitted on training crops (``objects`` and the empty frame are fixed rules).
FITTED = ("area", "chroma", "brightness", "clipped", "focus", "hue")
#: The measurement's version, stored with the limits fitted with it. Version 2 (0.12 ms a
#: crop instead of 0.22) takes the cell mask from the grey crop, chroma and brightness from
#: the cell's mean colour, and counts objects on an 8x subsampled mask; on the 7,529 C-NMC
#: training crops its fitted limits lie within 5 % of version 1's (docs/model-card.md).
#: Version 3 adds the hue of the cell's mean colour: a crop with swapped colour channels or
#: another stain passed every earlier check and got a label at chance (issue 22).
#: Version 4 adds the embedding distance, checked after inference (its limits under
#: ``embedding``), and the focus percentiles under validated shifts (``shifted``); the crop
#: measures are version 3's.
QC_VERSION = 4
#: What each version's limits cover (older files' limits have no hue range).
FITTED_IN = {1: FITTED[:5], 2: FITTED[:5], 3: FITTED, 4: FITTED}
#: The last version that changed how crops are measured (older limits are outdated).
LAST_MEASUREMENT_CHANGE = 3
#: The graph output holding each crop's embedding distance (a model without it is not
#: checked this way; one whose QC metadata asks for it but lacks it is refused).
EMBEDDING_OUTPUT = "embedding_distance"
#: The distance's limits: the same percentiles and margin as the other fitted measures,
#: upper bound only (a crop cannot be too typical).
EMBEDDING_PERCENTILES = {"default": 99.95, "strict": 99.5}
#: The hue range reaches this many degrees beyond the training crops' rarest (an angle:
#: margins add): the shift suite's validated hue shift, 8 degrees. C-NMC's cells lie at
#: 277-303 degrees (purple, blue above red); with red and blue swapped they move to
#: 302-322, so a wider margin would let the swap through.
HUE_MARGIN = {"default": 8.0, "strict": 3.0}
#: A training hue range wider than this (a set of several stains) gets no hue limit.
MAX_HUE_SPREAD = 120.0
#: A second object counts as a cell when its area is at least this share of the largest.
CELL_SIZED = 0.25
#: The mask is subsampled by this step for counting objects (64x fewer pixels to label; a
#: cell covers hundreds of samples, the smallest training cell about 120).
OBJECT_STEP = 8
MAX_FILL = 0.9
CLIP_LEVEL = 250
#: Percentiles stored in the model file, and the ones each mode's range starts from.
PERCENTILES = (0.05, 0.1, 0.5, 1, 5, 50, 95, 99, 99.5, 99.9, 99.95)
MODE_PERCENTILES = {"default": (0.05, 99.95), "strict": (0.5, 99.5)}
#: The default range reaches this factor beyond the training set's rarest crops (every
#: fitted feature is a positive quantity, so margins are ratios), so that an unusual but
#: real crop passes while a blank, burnt, grey or blurred one does not.
DEFAULT_MARGIN = 1.25
#: The magnifications the shift suite validates (at least 90 % of labels unchanged at 0.8x
#: and 1.25x, thanks to the size-normalising crop). The default area limits reach that far,
#: scaled by the square of the factor: QC must not refuse what the model is shown to judge
#: (with the plain limits QC refused 24 % of real crops at 1.25x; bench/qc_scale.py).
VALIDATED_SCALES = (0.8, 1.25)
#: The exposures the shift suite validates (brightness +-15 % and gamma 0.8 and 1.25: the
#: ends of the training ranges, ``export.augment.RANGES``; a test keeps the two equal). The
#: default brightness limits reach that far: with the plain limits QC refused 10.9 % of
#: real crops at gamma 1.25 ("too dark"), a shift the model is validated on.
VALIDATED_GAINS = (0.85, 1.15)
VALIDATED_GAMMAS = (0.8, 1.25)
#: Measures whose default range also reaches the training crops' under the shift suite's
#: validated focus shifts (blur sigma 1 and 2, the unsharp mask), measured at export and
#: stored as ``shifted`` percentiles: no formula maps a blur onto the Laplacian's variance.
#: The range reaches their default percentiles without the margin (the shift is the
#: allowance; with it, a crop blurred by sigma 6 passed).
#: With the plain limits QC refused 2.9 % of real crops under the unsharp mask ("too sharp
#: or noisy") and 1.0 % under blur sigma 1 ("out of focus"), shifts whose labels the
#: model keeps.
COVERED_BY_SHIFTS = ("focus",)
#: Floors of the upper limit of the clipped share (training crops have none clipped, and a
#: few saturated pixels do not make a crop unusable).
CLIPPED_FLOOR = {"default": 0.02, "strict": 0.005}


class QCError(ValueError):
    """QC metadata that cannot be used."""


@dataclass(frozen=True, slots=True)
class QCFeatures:
    """What quality control measures on one crop."""

    area: float  # pixels of the largest object in the decoded frame
    fill: float  # that area over the frame's area
    objects: int  # objects at least CELL_SIZED of the largest
    chroma: float  # max - min channel of the cell's mean colour (resized crop), 0-255
    brightness: float  # luma of the cell's mean colour (resized crop), 0-255
    clipped: float  # pixels with a channel >= CLIP_LEVEL over the cell's pixels
    focus: float  # variance of the Laplacian inside the cell (eroded), resized crop
    hue: float = float("nan")  # hue angle of the cell's mean colour, degrees in [0, 360)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


_ERODE = np.ones((5, 5), np.uint8)  # one 5x5 pass: two 3x3 erosions, in one call
_LUMA = (0.299, 0.587, 0.114)  # OpenCV's RGB -> grey weights


def measure(gray: np.ndarray, resized: np.ndarray, threshold: int) -> QCFeatures:
    """Measure a crop from its full-resolution grey image and its resized RGB input
    (uint8, :func:`smearscan.preprocess.framed_and_resized`).

    A dozen OpenCV calls on small arrays (numpy's per-pixel reductions over the channel
    axis cost ten times more): about 0.12 ms a crop on one core.
    """
    small = np.ascontiguousarray(gray[::OBJECT_STEP, ::OBJECT_STEP])
    _, mask = cv2.threshold(small, threshold, 1, cv2.THRESH_BINARY)
    # 16-bit labels (the subsampled mask has a few thousand pixels) halve the labelling time
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8, ltype=cv2.CV_16U)
    areas = stats[1:, cv2.CC_STAT_AREA]
    largest = int(areas.max()) if count > 1 else 0
    objects = int((areas >= CELL_SIZED * largest).sum()) if largest else 0
    area = float(largest * OBJECT_STEP * OBJECT_STEP)
    fill = largest / float(mask.size)
    grey = cv2.cvtColor(resized, cv2.COLOR_RGB2GRAY)
    _, cell = cv2.threshold(grey, threshold, 255, cv2.THRESH_BINARY)
    pixels = cv2.countNonZero(cell)
    if pixels == 0 or largest == 0:
        nan = float("nan")
        return QCFeatures(area, fill, objects, nan, nan, nan, nan)
    mean_colour = cv2.mean(resized, mask=cell)[:3]
    chroma = max(mean_colour) - min(mean_colour)
    hue = hue_of(*mean_colour)
    brightness = sum(w * c for w, c in zip(_LUMA, mean_colour, strict=True))
    # per channel, then any channel: the grey of a 0/255 image is 0 only where all are 0
    _, saturated = cv2.threshold(resized, CLIP_LEVEL - 1, 255, cv2.THRESH_BINARY)
    burnt = cv2.bitwise_and(cv2.cvtColor(saturated, cv2.COLOR_RGB2GRAY), cell)
    clipped = cv2.countNonZero(burnt) / pixels
    inner = cv2.erode(cell, _ERODE)
    if cv2.countNonZero(inner):
        laplacian = cv2.Laplacian(grey, cv2.CV_16S, ksize=3)  # |values| <= 2,040: exact
        _, deviation = cv2.meanStdDev(laplacian, mask=inner)
        focus = float(deviation[0, 0]) ** 2
    else:
        focus = 0.0
    return QCFeatures(
        area, fill, objects, float(chroma), float(brightness), float(clipped), focus, hue
    )


def hue_of(red: float, green: float, blue: float) -> float:
    """The hue angle (degrees, HSV's) of one RGB colour; NaN for a grey one."""
    high, low = max(red, green, blue), min(red, green, blue)
    spread = high - low
    if spread <= 0:
        return float("nan")
    if high == red:
        sector = ((green - blue) / spread) % 6
    elif high == green:
        sector = (blue - red) / spread + 2
    else:
        sector = (red - green) / spread + 4
    return float(60.0 * sector)


# ------------------------------------------------------------------ limits


def fit(
    features: Iterable[QCFeatures],
    description: str,
    embedding_distances: np.ndarray | None = None,
    embedding_method: str = "",
    shifted: Mapping[str, Iterable[QCFeatures]] | None = None,
) -> dict:
    """The ``smearscan.qc`` metadata from training crops' features: percentiles of every
    fitted feature and the range each mode applies; with the same crops' features under
    validated shifts (shift name -> features), the default range of each
    :data:`COVERED_BY_SHIFTS` measure reaches theirs too; with the training crops'
    embedding distances (the graph's :data:`EMBEDDING_OUTPUT`), their limits."""
    rows = [f.as_dict() for f in features]
    if not rows:
        raise QCError("no crops to fit quality-control limits on")
    stored = _percentiles(rows, FITTED)
    under_shifts = {
        name: _percentiles([f.as_dict() for f in found], COVERED_BY_SHIFTS)
        for name, found in (shifted or {}).items()
    }
    fitted: dict = {
        "version": QC_VERSION,
        "fitted_on": description,
        "crops": len(rows),
        "percentiles": stored,
        "limits": {mode: limits_for(stored, mode, under_shifts) for mode in ("default", "strict")},
        "fixed": {"max_objects": 1, "max_fill": MAX_FILL},
    }
    if under_shifts:
        fitted["shifted"] = under_shifts
    if embedding_distances is not None:
        fitted["embedding"] = fit_embedding(embedding_distances, embedding_method)
    return fitted


def _percentiles(rows: list[dict], names: Iterable[str]) -> dict[str, dict[str, float]]:
    """Measure -> the stored percentiles of its finite values in ``rows``."""
    if not rows:
        raise QCError("no crops to fit quality-control limits on")
    stored: dict[str, dict[str, float]] = {}
    for name in names:
        values = np.array([r[name] for r in rows], dtype=np.float64)
        values = values[np.isfinite(values)]
        stored[name] = {f"p{p:g}": float(np.percentile(values, p)) for p in PERCENTILES}
    return stored


def fit_embedding(distances: np.ndarray, method: str) -> dict:
    """The embedding distance's metadata: percentiles of the training crops' distances and
    each mode's upper limit (default: the 99.95th percentile with the usual margin;
    strict: the 99.5th)."""
    values = np.asarray(distances, np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        raise QCError("no embedding distances to fit a limit on")
    percentiles = {f"p{p:g}": float(np.percentile(values, p)) for p in PERCENTILES}
    return {
        "output": EMBEDDING_OUTPUT,
        "method": method,
        "crops": len(values),
        "percentiles": percentiles,
        "limits": {
            mode: percentiles[f"p{p:g}"] * (DEFAULT_MARGIN if mode == "default" else 1.0)
            for mode, p in EMBEDDING_PERCENTILES.items()
        },
    }


def limits_for(
    percentiles: Mapping[str, Mapping[str, float]],
    mode: str,
    shifted: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None,
) -> dict:
    """feature -> [low, high] for ``mode`` (None: unbounded on that side); ``shifted``
    (shift name -> measure -> percentiles) widens the default ranges it covers."""
    low_p, high_p = MODE_PERCENTILES[mode]
    margin = DEFAULT_MARGIN if mode == "default" else 1.0
    limits: dict[str, list[float | None]] = {}
    for name, values in percentiles.items():
        low: float | None = values[f"p{low_p:g}"] / margin
        high = values[f"p{high_p:g}"] * margin
        if name in COVERED_BY_SHIFTS and mode == "default" and low is not None:
            for under in (shifted or {}).values():
                if name in under:
                    low = min(low, under[name][f"p{low_p:g}"])
                    high = max(high, under[name][f"p{high_p:g}"])
        if name == "clipped":
            low, high = None, max(high, CLIPPED_FLOOR[mode])
        if name == "area" and mode == "default" and low is not None:
            low, high = low * VALIDATED_SCALES[0] ** 2, high * VALIDATED_SCALES[1] ** 2
        if name == "brightness" and mode == "default" and low is not None:
            low, high = min(exposed(low)), max(exposed(high))
        if name == "hue":
            low, high = values[f"p{low_p:g}"], values[f"p{high_p:g}"]
            if high - low > MAX_HUE_SPREAD:
                low, high = 0.0, 360.0  # several stains: no hue limit
            else:
                low = max(0.0, low - HUE_MARGIN[mode])
                high = min(360.0, high + HUE_MARGIN[mode])
        limits[name] = [low, high]
    return limits


def exposed(brightness: float) -> list[float]:
    """A brightness (0-255) under each validated exposure: the gains, then the gammas. For
    a cell's mean colour this is a bound: gamma acts on each pixel, and the mean of a
    convex function of the pixels is at least the function of their mean."""
    unit = brightness / 255.0
    return [255.0 * min(1.0, unit * gain) for gain in VALIDATED_GAINS] + [
        255.0 * min(1.0, unit) ** gamma for gamma in VALIDATED_GAMMAS
    ]


@dataclass(frozen=True)
class QualityControl:
    """The checks of one run: a mode and the model's ranges."""

    mode: str
    ranges: Mapping[str, tuple[float | None, float | None]]
    max_objects: int = 1
    max_fill: float = MAX_FILL
    #: The measurement version the limits were fitted with (see :data:`QC_VERSION`).
    fitted_version: int = QC_VERSION
    #: Upper limit of the graph's :data:`EMBEDDING_OUTPUT` (None: not checked).
    max_embedding_distance: float | None = None

    def __post_init__(self) -> None:
        """Limits that are consistent, not only well-typed: a model file whose QC would
        refuse every crop, or let grayscale crops through, is refused when it loads."""
        required = FITTED_IN.get(self.fitted_version, FITTED)
        missing = [name for name in required if name not in self.ranges]
        if missing:
            raise QCError(f"quality-control limits for {self.mode!r} lack {', '.join(missing)}")
        unknown = sorted(set(self.ranges) - set(FITTED))
        if unknown:
            raise QCError(f"unknown quality-control measure(s) {', '.join(unknown)}")
        for name, (low, high) in self.ranges.items():
            if low is None and high is None:
                raise QCError(f"quality-control range of {name} has no bound")
            if any(v is not None and v < 0 for v in (low, high)):
                raise QCError(f"quality-control range of {name} is negative: {[low, high]}")
            if low is not None and high is not None and low >= high:
                raise QCError(f"quality-control range of {name} is empty: {[low, high]}")
        if self.max_objects < 1:
            raise QCError(f"max_objects {self.max_objects} would refuse every crop")
        if not (math.isfinite(self.max_fill) and 0 < self.max_fill <= 1):
            raise QCError(f"max_fill {self.max_fill!r} must be in (0, 1]")
        limit = self.max_embedding_distance
        if limit is not None and not (math.isfinite(limit) and limit > 0):
            raise QCError(f"embedding distance limit {limit!r} must be a positive number")

    @classmethod
    def from_metadata(cls, text: str | None, mode: str) -> QualityControl | None:
        """None when QC is off or the model has no QC metadata (older files)."""
        if mode not in MODES:
            raise QCError(f"QC mode must be one of {MODES}, not {mode!r}")
        if mode == "off" or not text:
            return None
        try:
            data = json.loads(text)
            ranges = {
                name: (_bound(low), _bound(high))
                for name, (low, high) in data["limits"][mode].items()
            }
            fixed = data.get("fixed", {})
            version = int(data.get("version", 1))
            if version < 1:
                raise ValueError(f"version {version}")
            max_objects = fixed.get("max_objects", 1)
            if not isinstance(max_objects, int) or isinstance(max_objects, bool):
                raise ValueError(f"max_objects {max_objects!r} is not a whole number")
            control = cls(
                mode,
                ranges,
                max_objects,
                float(fixed.get("max_fill", MAX_FILL)),
                version,
                _embedding_limit(data.get("embedding"), mode),
            )
        except QCError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise QCError(f"invalid quality-control metadata: {exc}") from None
        if version > QC_VERSION:
            raise QCError(
                f"the model's quality-control limits are of version {version}; this "
                f"smearscan measures version {QC_VERSION} (upgrade smearscan, or "
                "scan with --qc off)"
            )
        return control

    @property
    def outdated(self) -> bool:
        """Limits fitted with an earlier measurement. They still apply (version 1's limits
        lie within 5 % of version 2's on the training crops), but exporting the model again
        refits them. Version 4 measures crops as version 3 does."""
        return self.fitted_version < LAST_MEASUREMENT_CHANGE

    def reasons(self, f: QCFeatures) -> list[str]:
        """Why this crop cannot be judged; empty when it passes."""
        if f.area <= 0 or not math.isfinite(f.brightness):
            return ["no cell found (nothing brighter than the background)"]
        if f.fill >= self.max_fill:
            return [f"the object fills the frame ({f.fill:.0%} of it): not a segmented cell"]
        found = []
        if f.objects > self.max_objects:
            found.append(f"{f.objects} cell-sized objects in one crop")
        for name in FITTED:
            low, high = self.ranges.get(name, (None, None))
            value = getattr(f, name)
            if low is not None and value < low:
                found.append(_describe(name, value, low, below=True))
            elif high is not None and value > high:
                found.append(_describe(name, value, high, below=False))
        return found

    def embedding_reason(self, distance: float) -> str | None:
        """Why the model's own view of this crop rules it out; None when it passes (or
        when this check is off)."""
        limit = self.max_embedding_distance
        if limit is None or distance <= limit:
            return None
        if not math.isfinite(distance):
            return "the model's embedding of this crop is not finite"
        return (
            f"unlike every training crop to the model (embedding distance {distance:.1f}, "
            f"training <= {limit:.1f}): another stain, scanner, cell type or artefact?"
        )


def _embedding_limit(embedding, mode: str) -> float | None:
    """The mode's embedding distance limit from the ``embedding`` metadata (None: none)."""
    if embedding is None:
        return None
    if not isinstance(embedding, dict) or embedding.get("output") != EMBEDDING_OUTPUT:
        raise ValueError(f"embedding limits must name the output {EMBEDDING_OUTPUT!r}")
    limit = _bound(embedding["limits"][mode])
    if limit is None:
        raise ValueError("the embedding distance limit is missing")
    return limit


def _bound(value) -> float | None:
    if value is None:
        return None
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"limit {value!r} is not finite")
    return number


_TEXT = {
    ("area", True): "cell too small ({value:,.0f} px, training crops >= {limit:,.0f})",
    ("area", False): "cell too large ({value:,.0f} px, training crops <= {limit:,.0f})",
    ("fill", True): "cell too small for the frame ({value:.1%} of it, training >= {limit:.1%})",
    ("fill", False): "cell too large for the frame ({value:.1%} of it, training <= {limit:.1%})",
    ("chroma", True): "grayscale or colourless (chroma {value:.1f}, training >= {limit:.1f})",
    ("chroma", False): "colours stronger than any training crop (chroma {value:.1f} > {limit:.1f})",
    ("brightness", True): "too dark (mean level {value:.0f}, training >= {limit:.0f})",
    ("brightness", False): "too bright (mean level {value:.0f}, training <= {limit:.0f})",
    ("clipped", False): "burnt out: {value:.0%} of the cell at full brightness "
    "(training <= {limit:.1%})",
    ("focus", True): "out of focus (sharpness {value:.1f}, training >= {limit:.1f})",
    ("focus", False): "too sharp or noisy (sharpness {value:.0f}, training <= {limit:.0f})",
    ("hue", True): "stain colour unlike the training crops (hue {value:.0f}°, training >= "
    "{limit:.0f}°: swapped colour channels or another stain?)",
    ("hue", False): "stain colour unlike the training crops (hue {value:.0f}°, training <= "
    "{limit:.0f}°: swapped colour channels or another stain?)",
}


def _describe(name: str, value: float, limit: float, below: bool) -> str:
    return _TEXT[(name, below)].format(value=value, limit=limit)
