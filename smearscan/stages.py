"""The pipeline's stages as plain functions: decode -> QC -> preprocess -> predict.

Any engine runs them: the local engine in threads, the Ray engine in tasks and actors.
Nothing here holds global state; :class:`StageConfig` is small and picklable.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from smearscan.discover import Found
from smearscan.inference import Answers, valid_rows
from smearscan.limits import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from smearscan.preprocess import (
    ImageDecodeError,
    Recipe,
    framed_and_resized,
    gray_of,
    model_pixels,
    read_image,
    unit_range,
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


#: The stages a file goes through, in order; ``decode`` includes reading the bytes.
STAGES = ("decode", "qc", "preprocess", "infer")


class StageTimes:
    """Seconds spent in each stage, summed over every worker (the scan's per-stage profile,
    as ultralytics' predictor keeps one): it says whether a run waits on decoding or on the
    model. Workers add one batch's figures at a time, under a lock."""

    def __init__(self, workers: int = 1) -> None:
        self._lock = threading.Lock()
        self.workers = max(1, workers)
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.files = 0
        self.inferred = 0

    def add(self, seconds: dict[str, float], files: int, inferred: int) -> None:
        with self._lock:
            for stage, value in seconds.items():
                self.seconds[stage] += value
            self.files += files
            self.inferred += inferred

    def to_dict(self, wall_seconds: float) -> dict:
        """Busy seconds per stage, milliseconds per file (per classified crop for
        ``infer``), and the share of the workers' time each stage took."""
        capacity = max(wall_seconds * self.workers, 1e-9)
        stages = {}
        for stage, seconds in self.seconds.items():
            count = self.inferred if stage == "infer" else self.files
            stages[stage] = {
                "seconds": round(seconds, 4),
                "ms_per_file": round(1000 * seconds / count, 4) if count else None,
                "share_of_worker_time": round(seconds / capacity, 4),
            }
        return {
            "files": self.files,
            "classified": self.inferred,
            "workers": self.workers,
            "stages": stages,
        }


def _stat(path: str) -> tuple[int, int]:
    try:
        info = os.stat(path)
        return info.st_size, info.st_mtime_ns
    except (OSError, ValueError):  # ValueError: a NUL byte in a listed name
        return -1, -1


def prepare_item(
    item: Found, config: StageConfig, seconds: dict[str, float] | None = None, scaled: bool = True
) -> tuple[CellResult, np.ndarray | None]:
    """Decode, check and preprocess one file. Returns its result (status ``ok`` so far, or
    ``error``/``qc`` with the reason) and the model input when it is to be classified
    (float32, or with ``scaled=False`` the uint8 pixels :func:`unit_range` turns into it).
    ``seconds`` (stage -> seconds), when given, is added each stage's time."""
    clock = seconds if seconds is not None else dict.fromkeys(STAGES, 0.0)
    size, mtime = _stat(item.path)
    result = CellResult(item.rel, item.slide, STATUS_OK, size=size, mtime_ns=mtime, file=item.path)
    if item.problem:
        result.status, result.reason = STATUS_ERROR, item.problem
        return result, None
    try:
        start = time.perf_counter()
        image = read_image(
            item.path,
            max_pixels=config.max_pixels,
            order="bgr",
            max_bytes=config.max_bytes,
            inside=item.root,
        )
        lap = time.perf_counter()
        clock["decode"] += lap - start
        recipe = config.recipe
        gray = gray_of(image, "bgr")
        resized = framed_and_resized(image, recipe, "bgr", gray)
        start, lap = lap, time.perf_counter()
        clock["preprocess"] += lap - start
        if config.qc is not None:
            reasons = config.qc.reasons(measure(gray, resized, recipe.background_threshold))
            start, lap = lap, time.perf_counter()
            clock["qc"] += lap - start
            if reasons:
                result.status, result.reason = STATUS_QC, "; ".join(reasons)
                return result, None
        pixels = model_pixels(resized, recipe)
        model_input = unit_range(pixels) if scaled else pixels
        clock["preprocess"] += time.perf_counter() - lap
        return result, model_input
    except ImageDecodeError as exc:
        result.status, result.reason = STATUS_ERROR, str(exc)
    except Exception as exc:  # a decoder bug must not stop a night's run
        result.status = STATUS_ERROR
        result.reason = f"unexpected error: {type(exc).__name__}: {exc}"
    return result, None


def attach_answers(
    results: list[CellResult],
    classified: Sequence[bool],
    answers: Answers,
    qc: QualityControl | None = None,
) -> None:
    """Give each classified result its probabilities (rows in the order of the results
    marked ``classified``). Rows the model answered with something that is not a
    distribution become errors; crops whose embedding distance QC rules out get no label
    and the reason (the check after inference)."""
    probabilities = answers.probabilities
    valid = valid_rows(probabilities)
    distances = answers.distances if answers.distances is not None else [None] * len(valid)
    rows = iter(zip(probabilities, valid, distances, strict=True))
    for result, has_input in zip(results, classified, strict=True):
        if not has_input:
            continue
        row, ok, distance = next(rows)
        if not ok:
            result.status = STATUS_ERROR
            result.reason = "the model returned an invalid output (not a probability distribution)"
            continue
        unlike = None if qc is None or distance is None else qc.embedding_reason(float(distance))
        if unlike:
            result.status, result.reason = STATUS_QC, unlike
        else:
            result.probabilities = [float(p) for p in row]


@dataclass
class PreparedBatch:
    """A batch after the CPU stage: its results so far, which of them go to the model, their
    pixels (uint8, stacked; None when no file is usable) and the seconds each stage took."""

    results: list[CellResult]
    classified: list[bool]
    pixels: np.ndarray | None
    seconds: dict[str, float]


def prepare_batch(items: list[Found], config: StageConfig) -> PreparedBatch:
    """The CPU stage of a whole batch, in a worker process: picklable in and out, and the
    pixels stay uint8 so that a quarter of the bytes cross back to the inference process."""
    seconds = dict.fromkeys(STAGES, 0.0)
    prepared = [prepare_item(item, config, seconds, scaled=False) for item in items]
    pixels = [model_input for _, model_input in prepared if model_input is not None]
    return PreparedBatch(
        results=[result for result, _ in prepared],
        classified=[model_input is not None for _, model_input in prepared],
        pixels=np.stack(pixels) if pixels else None,
        seconds=seconds,
    )


def classify_prepared(
    batch: PreparedBatch,
    predictor,
    times: StageTimes | None = None,
    qc: QualityControl | None = None,
) -> list[CellResult]:
    """Run the model once on a prepared batch and attach its answers."""
    if batch.pixels is not None:
        start = time.perf_counter()
        answers = predictor(unit_range(batch.pixels))
        batch.seconds["infer"] += time.perf_counter() - start
        attach_answers(batch.results, batch.classified, answers, qc)
    if times is not None:
        times.add(batch.seconds, len(batch.results), sum(batch.classified))
    return batch.results


def classify_items(
    items: list[Found], config: StageConfig, predictor, times: StageTimes | None = None
) -> list[CellResult]:
    """The whole per-batch work of a worker thread: prepare every file, run the model once
    on the batch, attach its answers (adding each stage's time to ``times``)."""
    return classify_prepared(prepare_batch(items, config), predictor, times, config.qc)
