"""Decoding and preprocessing shared by training (export/) and scanning.

Training imports :func:`preprocess` from here and the recipe it used is stored in the ONNX
metadata, so a scan always applies exactly the transformation the model was trained with.
"""

from __future__ import annotations

import io
import json
import os
import struct
import sys
from dataclasses import asdict, dataclass

import numpy as np

from smearscan.limits import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS

# OpenCV reads its own pixel limit once, when cv2 loads: set it to ours first
_CV2_LOADED_EARLIER = "cv2" in sys.modules
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(DEFAULT_MAX_PIXELS))

import cv2  # noqa: E402  (must follow the environment variable above)

from smearscan.files import FileTooLarge, TargetError, read_regular  # noqa: E402


def _opencv_pixel_limit() -> int | None:
    """The header limit OpenCV enforces in this process, when we know it (None if cv2 was
    loaded before we could set it)."""
    if _CV2_LOADED_EARLIER:
        return None
    try:
        return int(os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"])
    except ValueError:
        return None


#: When set, decoding skips the Pillow header check for limits at or above it: OpenCV
#: refuses an oversized header itself, before any allocation (a decompression bomb).
OPENCV_PIXEL_LIMIT = _opencv_pixel_limit()

RECIPE_VERSION = 1
CROP_MODES = ("full", "bbox", "window")
INTERPOLATIONS = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR}


class ImageDecodeError(ValueError):
    """A file that cannot be turned into an RGB image; the message is shown to the user."""


#: Sane bounds of recipe numbers: a model file is input, and a recipe asking for a 40,000-px
#: input would make every scan allocate gigabytes before failing.
RECIPE_BOUNDS = {
    "input_size": (16, 1024),
    "window": (8, 8192),
    "margin": (0.0, 2.0),
    "background_threshold": (0, 254),
    "log_sigma": (0.1, 20.0),
    "log_weight": (0.0, 10.0),
}


@dataclass(frozen=True)
class Recipe:
    """Everything that turns a decoded crop into a model input.

    ``crop`` chooses how the cell is framed before resizing:
    ``full`` resizes the whole frame; ``bbox`` crops a square around the cell's bounding box
    plus ``margin`` (normalises cell size: the framed cell fills the input whatever its size
    in pixels); ``window`` crops a fixed ``window``-pixel square around the cell's centre
    (keeps absolute cell size, which differs between acquisition batches).
    """

    input_size: int = 128
    crop: str = "window"
    margin: float = 0.08
    window: int = 320
    background_threshold: int = 12
    interpolation: str = "area"
    log_enhance: bool = False
    log_sigma: float = 1.5
    log_weight: float = 1.0
    version: int = RECIPE_VERSION

    def __post_init__(self) -> None:
        if self.crop not in CROP_MODES:
            raise ValueError(f"crop must be one of {CROP_MODES}, not {self.crop!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}")
        if self.version > RECIPE_VERSION:
            raise ValueError(
                f"preprocessing recipe version {self.version} is newer than this smearscan "
                f"understands ({RECIPE_VERSION}); upgrade smearscan"
            )
        for name, (low, high) in RECIPE_BOUNDS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, not {value!r}")
            if not low <= value <= high:
                raise ValueError(f"{name} {value} is outside [{low}, {high}]")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("the preprocessing recipe must be a JSON object")
        if data.get("extra") == {}:  # written by smearscan 0.1 (always empty)
            del data["extra"]
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown preprocessing recipe keys: {sorted(unknown)}")
        return cls(**data)


def read_file_bytes(
    path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES, inside: str | None = None
) -> bytes:
    """The bytes of an image file, or :class:`ImageDecodeError` with the reason: the checks
    of :func:`smearscan.files.read_regular` (no blocking open, regular files only, size
    bounded before reading, still inside the scanned folder once opened)."""
    try:
        return read_regular(path, max_bytes, inside)
    except FileTooLarge as exc:
        raise ImageDecodeError(
            f"file too large ({exc.size} bytes > {exc.limit}; see --max-bytes)"
        ) from None
    except TargetError as exc:
        raise ImageDecodeError(str(exc)) from None


def read_image(
    path: str | os.PathLike,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    order: str = "rgb",
    max_bytes: int = DEFAULT_MAX_BYTES,
    inside: str | None = None,
) -> np.ndarray:
    """Read a file and return a uint8 3-channel array (``order`` "rgb" or "bgr"), or raise
    :class:`ImageDecodeError`.

    Reads the bytes ourselves (not ``cv2.imread``) so that I/O errors keep their reason,
    odd file names work everywhere and the checks of :func:`read_file_bytes` apply.
    """
    data = read_file_bytes(path, max_bytes=max_bytes, inside=inside)
    return decode_image(data, max_pixels=max_pixels, order=order)


def decode_image(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, order: str = "rgb"
) -> np.ndarray:
    """Decode encoded image bytes into uint8 RGB (or BGR, OpenCV's native order, which
    saves a full-size channel swap), converting depth and channels as needed."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    if OPENCV_PIXEL_LIMIT is None or max_pixels < OPENCV_PIXEL_LIMIT:
        header_size = header_dimensions(data, max_pixels)
        if header_size is not None and header_size[0] * header_size[1] > max_pixels:
            width, height = header_size
            raise ImageDecodeError(f"image too large ({width}x{height} > {max_pixels} pixels)")
    if data[:4] in TIFF_MAGIC:
        pages = tiff_pages(data)
        if pages > 1:  # OpenCV would read the first and say nothing of the others
            raise ImageDecodeError(
                f"a TIFF of {pages} or more images: smearscan reads one cell per file; "
                "save each as a file of its own"
            )
    buffer = np.frombuffer(data, dtype=np.uint8)
    try:
        image = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        message = str(exc).strip().splitlines()[-1] if str(exc).strip() else "decoder error"
        if "CV_IO_MAX_IMAGE" in message or "limit" in message.lower():
            raise ImageDecodeError(
                "image too large (over OpenCV's pixel limit OPENCV_IO_MAX_IMAGE_PIXELS="
                f"{os.environ.get('OPENCV_IO_MAX_IMAGE_PIXELS', 'default')})"
            ) from None
        raise ImageDecodeError(f"not a decodable image ({message})") from None
    if image is None:
        raise ImageDecodeError("not a decodable image (unknown format, truncated or too large)")
    height, width = image.shape[:2]
    if height * width > max_pixels:
        raise ImageDecodeError(f"image too large ({width}x{height} > {max_pixels} pixels)")
    if height < 8 or width < 8:
        raise ImageDecodeError(f"image too small ({width}x{height})")
    return to_uint8_color(image, order)


def header_dimensions(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int] | None:
    """(width, height) from the file header without decoding pixels, so that a small file
    that expands to gigabytes (a decompression bomb) is refused before any allocation.
    None when the header is not recognised; the decoder then has the last word."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Image.DecompressionBombError:
        # Pillow refuses headers over twice its own limit before saying the size; that is
        # too large for us too unless the caller allows more than Pillow does
        if max_pixels < 2 * (Image.MAX_IMAGE_PIXELS or 0):
            side = int((2 * (Image.MAX_IMAGE_PIXELS or 0)) ** 0.5) + 1
            return side, side
        return None
    except Exception:  # unknown or damaged header: let OpenCV decide and explain
        return None


#: The first bytes of a TIFF (little- and big-endian, classic and BigTIFF).
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _links_a_second_directory(data: bytes) -> bool:
    """Whether a TIFF's first image directory points to another (TIFF 6.0 section 2: the
    entry count, the entries, then the next directory's offset, 0 for none; BigTIFF's
    fields are wider). A damaged header reads as False: the decoder explains."""
    order = "<" if data[:2] == b"II" else ">"
    classic = data[2:4] in (b"*\x00", b"\x00*")
    offset, count, entry = ("I", "H", 12) if classic else ("Q", "Q", 20)
    try:
        (first,) = struct.unpack_from(order + offset, data, 4 if classic else 8)
        (entries,) = struct.unpack_from(order + count, data, first)
        after = first + struct.calcsize(count) + entry * entries
        (following,) = struct.unpack_from(order + offset, data, after)
    except struct.error:
        return False
    return following != 0


def tiff_pages(data: bytes, enough: int = 2) -> int:
    """How many full-resolution images a TIFF holds, counting up to ``enough``: reduced-
    resolution copies (thumbnails, pyramid levels: NewSubfileType bit 0) are not cells. 1
    when the file cannot be walked; the decoder then has the last word."""
    if not _links_a_second_directory(data):
        return 1  # nearly every crop: a glance at the header, a tenth of Pillow's open
    from PIL import TiffImagePlugin

    pages = 0
    try:
        with TiffImagePlugin.TiffImageFile(io.BytesIO(data)) as image:
            index = 0
            while pages < enough:
                image.seek(index)
                pages += not int(image.tag_v2.get(254, 0)) & 1
                index += 1
    except EOFError:
        pass  # no further page
    except Exception:  # a damaged directory: let OpenCV decide and explain
        return 1
    return max(pages, 1)


#: Bit depths cameras store in 16-bit files.
SENSOR_BITS = (8, 10, 12, 14, 16)


def sensor_bits(maximum: int) -> int:
    """The bit depth a 16-bit image's data really uses, from its largest value: 12-bit data
    in a 16-bit PNG would otherwise decode almost black (4095 >> 8 is 15). Rounded up to the
    depths cameras store, so 8-bit data scaled to 16 bits (x257) still reads as 16-bit."""
    used = maximum.bit_length()
    return next((bits for bits in SENSOR_BITS if bits >= used), 16)


_CONVERSIONS = {
    ("gray", "rgb"): cv2.COLOR_GRAY2RGB,
    ("gray", "bgr"): cv2.COLOR_GRAY2BGR,
    ("bgr", "rgb"): cv2.COLOR_BGR2RGB,
    ("bgra", "rgb"): cv2.COLOR_BGRA2RGB,
    ("bgra", "bgr"): cv2.COLOR_BGRA2BGR,
}


def to_uint8_color(image: np.ndarray, order: str = "rgb") -> np.ndarray:
    """Convert any decoded OpenCV array (BGR/BGRA/gray, 8/16-bit/float) to 3-channel uint8
    in ``order`` ("rgb" or "bgr")."""
    if order not in ("rgb", "bgr"):
        raise ValueError(f"order must be 'rgb' or 'bgr', not {order!r}")
    if image.dtype == np.uint16:
        image = (image >> (sensor_bits(int(image.max())) - 8)).astype(np.uint8)
    elif image.dtype in (np.float32, np.float64):
        peak = 1.0 if float(np.nanmax(image)) <= 1.0 else 255.0
        image = np.clip(np.nan_to_num(image) * (255.0 / peak), 0, 255).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ImageDecodeError(f"unsupported pixel type {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    channels = 1 if image.ndim == 2 else image.shape[2]
    source = {1: "gray", 3: "bgr", 4: "bgra"}.get(channels)
    if source is None:
        raise ImageDecodeError(f"unsupported channel count {channels}")
    if source == order:
        return image
    return cv2.cvtColor(image, _CONVERSIONS[(source, order)])


def gray_of(image: np.ndarray, order: str = "rgb") -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY if order == "rgb" else cv2.COLOR_BGR2GRAY)


def cell_box(
    image: np.ndarray, threshold: int, order: str = "rgb", gray: np.ndarray | None = None
) -> tuple[int, int, int, int] | None:
    """Bounding box (x, y, w, h) of the non-background pixels, or None for an empty frame."""
    if gray is None:
        gray = gray_of(image, order)
    _, mask = cv2.threshold(gray, threshold, 255, cv2.THRESH_BINARY)
    x, y, w, h = cv2.boundingRect(mask)
    if w == 0 or h == 0:
        return None
    return x, y, w, h


def _square_crop(image: np.ndarray, cx: float, cy: float, side: int) -> np.ndarray:
    """A side x side crop centred on (cx, cy), padded with black where it leaves the frame."""
    side = max(int(round(side)), 1)
    x0 = int(round(cx - side / 2))
    y0 = int(round(cy - side / 2))
    height, width = image.shape[:2]
    top, left = max(0, -y0), max(0, -x0)
    bottom, right = max(0, y0 + side - height), max(0, x0 + side - width)
    cropped = image[max(0, y0) : min(height, y0 + side), max(0, x0) : min(width, x0 + side)]
    if top or left or bottom or right:
        cropped = cv2.copyMakeBorder(
            cropped, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(0, 0, 0)
        )
    return cropped


def frame_cell(
    image: np.ndarray, recipe: Recipe, order: str = "rgb", gray: np.ndarray | None = None
) -> np.ndarray:
    """Apply the recipe's crop mode, returning a square region (not yet resized) in the
    channel order of the input."""
    if recipe.crop == "full":
        height, width = image.shape[:2]
        if height == width:
            return image
        return _square_crop(image, width / 2, height / 2, max(height, width))
    box = cell_box(image, recipe.background_threshold, order, gray)
    if box is None:
        height, width = image.shape[:2]
        box = (0, 0, width, height)
    x, y, w, h = box
    cx, cy = x + w / 2, y + h / 2
    side = max(w, h) * (1 + 2 * recipe.margin) if recipe.crop == "bbox" else recipe.window
    return _square_crop(image, cx, cy, int(side))


def log_enhance(rgb: np.ndarray, sigma: float, weight: float) -> np.ndarray:
    """Laplacian-of-Gaussian edge enhancement (the paper's): I - weight * LoG(I)."""
    image = rgb.astype(np.float32)
    blurred = cv2.GaussianBlur(image, (0, 0), sigma)
    laplacian = cv2.Laplacian(blurred, cv2.CV_32F, ksize=3)
    return np.clip(image - weight * laplacian, 0, 255).astype(np.uint8)


def framed_and_resized(
    image: np.ndarray, recipe: Recipe, order: str = "rgb", gray: np.ndarray | None = None
) -> np.ndarray:
    """The cell framed by the recipe and resized to the input size: uint8 RGB (S, S, 3).
    Quality control measures this array; :func:`to_model_input` finishes it."""
    framed = frame_cell(image, recipe, order, gray)
    size = recipe.input_size
    resized = cv2.resize(framed, (size, size), interpolation=INTERPOLATIONS[recipe.interpolation])
    if order == "bgr":
        resized = cv2.cvtColor(resized, cv2.COLOR_BGR2RGB)
    return resized


def model_pixels(resized: np.ndarray, recipe: Recipe) -> np.ndarray:
    """uint8 RGB (S, S, 3) from :func:`framed_and_resized` -> the model's pixels, still
    uint8 (with the recipe's LoG enhancement, if any): a quarter of float32's bytes, for a
    worker process to send back; :func:`unit_range` finishes them."""
    if recipe.log_enhance:
        return log_enhance(resized, recipe.log_sigma, recipe.log_weight)
    return resized


def unit_range(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels (one crop or a batch) -> float32 in [0, 1], the model's input scale."""
    scaled = pixels.astype(np.float32)
    scaled *= np.float32(1.0 / 255.0)
    return scaled


def stored_uint8(model_input: np.ndarray) -> np.ndarray:
    """A model input (float32 in [0, 1]) kept as uint8, as training caches and the shift
    suite keep crops; :func:`unit_range` gives it back exactly (preprocessing's output is
    a uint8 image scaled to [0, 1])."""
    return np.round(model_input * 255.0).astype(np.uint8)


def to_model_input(resized: np.ndarray, recipe: Recipe) -> np.ndarray:
    """uint8 RGB (S, S, 3) from :func:`framed_and_resized` -> float32 RGB in [0, 1]."""
    return unit_range(model_pixels(resized, recipe))


def preprocess(image: np.ndarray, recipe: Recipe, order: str = "rgb") -> np.ndarray:
    """Decoded uint8 crop (RGB, or BGR with ``order="bgr"``) -> model input: float32 RGB
    (size, size, 3) in [0, 1].

    This is the one preprocessing function; training and scanning both call it (scanning
    through its two halves, :func:`framed_and_resized` then :func:`to_model_input`, so
    that quality control can measure the resized crop in between). Every step is per
    channel except the cell mask, which uses the matching grey conversion, so both orders
    give identical inputs; BGR lets the channel swap run on the small resized image.
    """
    return to_model_input(framed_and_resized(image, recipe, order), recipe)


def load_and_preprocess(
    path: str | os.PathLike, recipe: Recipe, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Read a file and preprocess it; raises :class:`ImageDecodeError` for unusable files."""
    return preprocess(read_image(path, max_pixels=max_pixels, order="bgr"), recipe, order="bgr")
