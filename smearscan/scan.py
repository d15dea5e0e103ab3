"""The scanning pipeline: discovered files -> batches -> (decode, preprocess, infer) in parallel.

Each worker thread takes a whole batch of files, decodes and preprocesses them and runs the
model on them (OpenCV and onnxruntime release the GIL). With one onnxruntime thread per
worker, every core works on its own batch from start to end: decoding and inference overlap
without the hand-offs and idle waits of a decode pool feeding a separate inference stage
(measured in docs/performance.md). At most a few batches per worker are in flight, so memory
stays flat however many files there are. Results come out in discovery order, one
:class:`CellResult` per input file, errors included.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from smearscan.discover import Found
from smearscan.inference import Classifier
from smearscan.preprocess import DEFAULT_MAX_PIXELS, ImageDecodeError, load_and_preprocess

STATUS_OK = "ok"
STATUS_ERROR = "error"


@dataclass
class ScanOptions:
    """Tuning knobs of a scan; the defaults suit a 2-core machine."""

    batch_size: int = 32
    workers: int = 0  # 0: one per core; each decodes a batch and runs the model on it
    max_pixels: int = DEFAULT_MAX_PIXELS
    threshold: float | None = None  # P(positive) cut-off; None: the model's, else argmax
    tta: bool = False

    def resolved_workers(self) -> int:
        return self.workers if self.workers > 0 else max(1, os.cpu_count() or 1)


@dataclass(slots=True)
class CellResult:
    """One row of the per-image report (slots: a merged nightly report builds one per file)."""

    path: str
    slide: str
    status: str
    error: str = ""
    label: str = ""
    probabilities: list[float] = field(default_factory=list)
    size: int = -1
    mtime_ns: int = -1
    file: str = ""  # the path on disk, for thumbnails and state (not written to reports)

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK


def decide(probabilities: np.ndarray, labels: list[str], positive: str | None,
           threshold: float | None) -> list[str]:  # fmt: skip
    """Labels from probabilities: P(positive) >= threshold for two-class models with a
    threshold, else the most probable class."""
    if threshold is not None and positive in labels and len(labels) == 2:
        pos = labels.index(positive)
        other = labels[1 - pos]
        return [positive if p[pos] >= threshold else other for p in probabilities]
    return [labels[i] for i in probabilities.argmax(axis=1)]


def tta_views(batch: np.ndarray) -> list[np.ndarray]:
    """Flips and 90-degree rotations of an NHWC batch (the training augmentations)."""
    views = []
    for k in range(4):
        rotated = np.rot90(batch, k, axes=(1, 2))
        views.append(rotated)
        views.append(rotated[:, :, ::-1])
    return [np.ascontiguousarray(v) for v in views]


def predict_batch(classifier: Classifier, batch: np.ndarray, tta: bool) -> np.ndarray:
    if not tta:
        return classifier.predict(batch)
    return np.mean([classifier.predict(view) for view in tta_views(batch)], axis=0)


def _stat(path) -> tuple[int, int]:
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return -1, -1


def _batches(items: Iterator[Found], size: int) -> Iterator[list[Found]]:
    while batch := list(itertools.islice(items, size)):
        yield batch


def scan_paths(
    found: Iterable[Found],
    classifier: Classifier,
    options: ScanOptions | None = None,
    stop: threading.Event | None = None,
) -> Iterator[CellResult]:
    """Classify every discovered file, yielding results in input order.

    ``stop`` (for SIGINT/SIGTERM) stops submitting batches and cancels those not started;
    batches already running are finished and reported, the rest are left for the next run.
    """
    options = options or ScanOptions()
    recipe = classifier.info.recipe
    labels = classifier.labels
    threshold = options.threshold
    if threshold is None:
        threshold = classifier.info.calibration().get("threshold")
    positive = classifier.info.positive_class
    batch_size = max(1, options.batch_size)
    if classifier.provider == "CUDAExecutionProvider" and classifier.pad_to is None:
        classifier.pad_to = batch_size
    workers = options.resolved_workers()

    def load(item: Found) -> tuple[CellResult, np.ndarray | None]:
        size, mtime = _stat(item.path)
        base = CellResult(item.rel, item.slide, STATUS_OK, size=size, mtime_ns=mtime,
                          file=str(item.path))  # fmt: skip
        if item.problem:
            base.status, base.error = STATUS_ERROR, item.problem
            return base, None
        try:
            image = load_and_preprocess(item.path, recipe, max_pixels=options.max_pixels)
        except ImageDecodeError as exc:
            base.status, base.error = STATUS_ERROR, str(exc)
            return base, None
        except Exception as exc:  # a decoder bug must not stop a night's run
            base.status, base.error = STATUS_ERROR, f"unexpected error: {type(exc).__name__}: {exc}"
            return base, None
        return base, image

    def work(items: list[Found]) -> list[CellResult]:
        loaded = [load(item) for item in items]
        images = [image for _, image in loaded if image is not None]
        if images:
            probabilities = predict_batch(classifier, np.stack(images), options.tta)
            decided = iter(zip(probabilities, decide(probabilities, labels, positive, threshold),
                               strict=True))  # fmt: skip
            for result, image in loaded:
                if image is not None:
                    probs, label = next(decided)
                    result.probabilities = [float(p) for p in probs]
                    result.label = label
        return [result for result, _ in loaded]

    batches = _batches(iter(found), batch_size)
    in_flight: deque[Future] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="scan") as pool:
        while True:
            while len(in_flight) < 2 * workers and not (stop is not None and stop.is_set()):
                batch = next(batches, None)
                if batch is None:
                    break
                in_flight.append(pool.submit(work, batch))
            if stop is not None and stop.is_set():
                # not-yet-started batches are left for the next run (FIFO: always a suffix)
                for future in list(in_flight):
                    if future.cancel():
                        in_flight.remove(future)
            if not in_flight:
                break
            yield from in_flight.popleft().result()
