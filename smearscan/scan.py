"""The scanning pipeline: discovered files -> parallel decode/preprocess -> batched inference.

Decoding runs in a thread pool (OpenCV and onnxruntime release the GIL), with a bounded
window of files in flight, so memory stays flat however many files there are. Inference runs
in the calling thread on full batches while the pool decodes the next ones. Results come out
in discovery order, one :class:`CellResult` per input file, errors included.
"""

from __future__ import annotations

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
    workers: int = 0  # 0: half the cores (the other half run onnxruntime)
    max_pixels: int = DEFAULT_MAX_PIXELS
    threshold: float | None = None  # P(positive) cut-off; None: the model's, else argmax
    tta: bool = False

    def resolved_workers(self) -> int:
        return self.workers if self.workers > 0 else max(1, (os.cpu_count() or 1) // 2)


@dataclass
class CellResult:
    """One row of the per-image report."""

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


def scan_paths(
    found: Iterable[Found],
    classifier: Classifier,
    options: ScanOptions | None = None,
    stop: threading.Event | None = None,
) -> Iterator[CellResult]:
    """Classify every discovered file, yielding results in input order.

    ``stop`` (for SIGINT/SIGTERM) stops submitting files; the few already in flight are
    finished and reported, the rest are left for the next run.
    """
    options = options or ScanOptions()
    recipe = classifier.info.recipe
    labels = classifier.labels
    threshold = options.threshold
    if threshold is None:
        threshold = classifier.info.calibration().get("threshold")
    positive = classifier.info.positive_class
    if classifier.provider == "CUDAExecutionProvider" and classifier.pad_to is None:
        classifier.pad_to = options.batch_size
    workers = options.resolved_workers()
    window = max(options.batch_size * 2, workers * 4)

    def work(item: Found) -> tuple[CellResult, np.ndarray | None]:
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

    pending: deque[Future] = deque()
    chunk: list[tuple[CellResult, np.ndarray | None]] = []
    ready = 0

    def flush() -> Iterator[CellResult]:
        nonlocal chunk, ready
        images = [image for _, image in chunk if image is not None]
        if images:
            probabilities = predict_batch(classifier, np.stack(images), options.tta)
            decided = decide(probabilities, labels, positive, threshold)
            rows = iter(zip(probabilities, decided, strict=False))
        for result, image in chunk:
            if image is not None:
                probs, label = next(rows)
                result.probabilities = [float(p) for p in probs]
                result.label = label
            yield result
        chunk, ready = [], 0

    iterator = iter(found)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        exhausted = False
        while True:
            while not exhausted and len(pending) < window:
                if stop is not None and stop.is_set():
                    exhausted = True
                    break
                item = next(iterator, None)
                if item is None:
                    exhausted = True
                    break
                pending.append(pool.submit(work, item))
            if not pending:
                break
            result, image = pending.popleft().result()
            chunk.append((result, image))
            if image is not None:
                ready += 1
            if ready >= options.batch_size:
                yield from flush()
        if chunk:
            yield from flush()
