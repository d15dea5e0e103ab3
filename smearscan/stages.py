"""The pipeline's stages as plain functions: decode -> QC -> preprocess -> predict.

Any engine runs them: the local engine in threads, the Ray engine in tasks and actors.
Nothing here holds global state; :class:`StageConfig` is small and picklable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from smearscan.discover import Found
from smearscan.inference import valid_rows
from smearscan.preprocess import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    Recipe,
    framed_and_resized,
    gray_of,
    read_image,
    to_model_input,
)
from smearscan.qc import QualityControl, measure
from smearscan.results import STATUS_ERROR, STATUS_OK, STATUS_QC, CellResult


@dataclass(frozen=True)
class StageConfig:
    """What a worker needs to turn a discovered file into a model input."""

    recipe: Recipe
    qc: QualityControl | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES


def _stat(path: str) -> tuple[int, int]:
    try:
        info = os.stat(path)
        return info.st_size, info.st_mtime_ns
    except OSError:
        return -1, -1


def prepare_item(item: Found, config: StageConfig) -> tuple[CellResult, np.ndarray | None]:
    """Decode, check and preprocess one file. Returns its result (status ``ok`` so far, or
    ``error``/``qc`` with the reason) and the model input when it is to be classified."""
    size, mtime = _stat(item.path)
    result = CellResult(item.rel, item.slide, STATUS_OK, size=size, mtime_ns=mtime,
                        file=item.path)  # fmt: skip
    if item.problem:
        result.status, result.reason = STATUS_ERROR, item.problem
        return result, None
    try:
        image = read_image(item.path, max_pixels=config.max_pixels, order="bgr",
                           max_bytes=config.max_bytes, inside=item.root)  # fmt: skip
        recipe = config.recipe
        gray = gray_of(image, "bgr")
        resized = framed_and_resized(image, recipe, "bgr", gray)
        if config.qc is not None:
            reasons = config.qc.reasons(measure(gray, resized, recipe.background_threshold))
            if reasons:
                result.status, result.reason = STATUS_QC, "; ".join(reasons)
                return result, None
        return result, to_model_input(resized, recipe)
    except ImageDecodeError as exc:
        result.status, result.reason = STATUS_ERROR, str(exc)
    except Exception as exc:  # a decoder bug must not stop a night's run
        result.status = STATUS_ERROR
        result.reason = f"unexpected error: {type(exc).__name__}: {exc}"
    return result, None


def attach_probabilities(
    results: list[CellResult], inputs: list[np.ndarray | None], probabilities: np.ndarray
) -> None:
    """Give each classified result its probabilities (in the order of the non-None inputs);
    rows the model answered with something that is not a distribution become errors."""
    valid = valid_rows(probabilities)
    rows = iter(zip(probabilities, valid, strict=True))
    for result, model_input in zip(results, inputs, strict=True):
        if model_input is None:
            continue
        row, ok = next(rows)
        if ok:
            result.probabilities = [float(p) for p in row]
        else:
            result.status = STATUS_ERROR
            result.reason = "the model returned an invalid output (not a probability distribution)"


def classify_items(items: list[Found], config: StageConfig, predictor) -> list[CellResult]:
    """The whole per-batch work of a worker: prepare every file, run the model once on the
    batch, attach the probabilities."""
    prepared = [prepare_item(item, config) for item in items]
    results = [result for result, _ in prepared]
    inputs = [model_input for _, model_input in prepared]
    stack = [x for x in inputs if x is not None]
    if stack:
        attach_probabilities(results, inputs, predictor(np.stack(stack)))
    return results
