"""The local engine: workers on this machine.

Two ways to run the CPU stage (decode, quality control, preprocessing):

- ``threads`` (the default on CPU): each worker thread takes a whole batch, prepares it and
  runs the model on it (OpenCV and onnxruntime release the GIL). With one onnxruntime thread
  per worker, every core works on its own batch from start to end: decoding and inference
  overlap without hand-offs (measured in docs/performance.md).
- ``processes`` (the default on CUDA): worker processes prepare the batches and send back
  uint8 pixels; two inference threads here run the model on each batch as it arrives (one
  waits on the GPU while the other converts the next batch). On a GPU the model is cheap
  and the CPU stage is the whole cost, and in threads it stops scaling at a few cores
  because the interpreter lock serialises its Python parts: on 16 cores threads prepared
  1,644 crops/s and processes 11,399 (bench/results-gpu.json).

At most two batches per worker are in flight, so memory stays flat however many files there
are.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import (
    CancelledError,
    Executor,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
)
from contextlib import ExitStack
from dataclasses import dataclass

from smearscan.discover import Found
from smearscan.results import CellResult
from smearscan.stages import (
    StageConfig,
    StageTimes,
    classify_items,
    classify_prepared,
    prepare_batch,
)

#: How the CPU stage runs: in the workers' threads or in worker processes.
DECODERS = ("threads", "processes")
#: Threads running the model on batches that worker processes prepared.
INFERENCE_THREADS = 2


@dataclass
class _InFlight:
    """A submitted batch: the future of its results and the one of its CPU stage (the same
    future when a worker thread does both)."""

    results: Future
    prepared: Future
    batch: list[Found]


def batches(items: Iterator[Found], size: int) -> Iterator[list[Found]]:
    while batch := list(itertools.islice(items, size)):
        yield batch


def _worker_process_setup() -> None:
    """In each worker process: signals are the scanning process's to handle (it finishes
    the batches in flight and writes a partial report; a worker killed by the terminal's
    Ctrl-C would break the pool instead), and OpenCV keeps to one thread per process."""
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        number = getattr(signal, name, None)
        if number is not None:
            signal.signal(number, signal.SIG_IGN)
    import cv2

    cv2.setNumThreads(1)


class LocalEngine:
    """Workers on this machine sharing one onnxruntime session."""

    name = "local"

    def __init__(
        self,
        config: StageConfig,
        predictor,
        batch_size: int = 32,
        workers: int = 0,
        decode: str = "threads",
    ) -> None:
        if decode not in DECODERS:
            raise ValueError(f"decode must be one of {DECODERS}")
        self.config, self.predictor = config, predictor
        self.batch_size = max(1, batch_size)
        self.workers = workers if workers > 0 else max(1, os.cpu_count() or 1)
        self.decode = decode
        self.unfinished_slides: set[str] = set()
        self.stage_times = StageTimes(self.workers)

    def describe(self) -> dict:
        return {
            "engine": self.name,
            "nodes": 1,
            "cpus": os.cpu_count(),
            "gpus": 1 if self.predictor.classifier.provider.startswith("CUDA") else 0,
            "workers": self.workers,
            "decode": self.decode,
            "batch_size": self.batch_size,
        }

    def _pools(self, stack: ExitStack) -> tuple[Executor, Executor | None]:
        """The workers' pool and, with worker processes, the inference threads' pool."""
        if self.decode == "threads":
            workers = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="scan")
            return stack.enter_context(workers), None
        # spawn: a fork would copy this process's threads and its CUDA context
        processes = ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_process_setup,
        )
        inference = ThreadPoolExecutor(INFERENCE_THREADS, thread_name_prefix="infer")
        return stack.enter_context(processes), stack.enter_context(inference)

    def _submit(self, workers: Executor, inference: Executor | None, batch: list[Found]):
        if inference is None:
            future = workers.submit(
                classify_items, batch, self.config, self.predictor, self.stage_times
            )
            return _InFlight(future, future, batch)
        prepared = workers.submit(prepare_batch, batch, self.config)
        return _InFlight(inference.submit(self._classify_when_ready, prepared), prepared, batch)

    def _classify_when_ready(self, prepared: Future) -> list[CellResult]:
        try:
            batch = prepared.result()
        except CancelledError:  # left for the next run by a stop
            return []
        return classify_prepared(batch, self.predictor, self.stage_times, self.config.qc)

    def run(
        self, items: Iterable[Found], stop: threading.Event | None = None
    ) -> Iterator[CellResult]:
        """Classify every file, yielding results in input order.

        A set ``stop`` stops submitting batches and cancels those not started; batches
        already running are finished and yielded, the rest are left for the next run.
        """
        iterator = iter(items)
        pending = batches(iterator, self.batch_size)
        in_flight: deque[_InFlight] = deque()
        stopped = False
        with ExitStack() as stack:
            workers, inference = self._pools(stack)
            while True:
                while len(in_flight) < 2 * self.workers and not (stop and stop.is_set()):
                    batch = next(pending, None)
                    if batch is None:
                        break
                    in_flight.append(self._submit(workers, inference, batch))
                if stop is not None and stop.is_set() and not stopped:
                    stopped = True
                    # not-yet-started batches are left for the next run (FIFO: a suffix)
                    for entry in list(in_flight):
                        if entry.prepared.cancel():
                            entry.results.cancel()
                            in_flight.remove(entry)
                            self.unfinished_slides.update(item.slide for item in entry.batch)
                    # the first file never submitted: its slide may be half-scanned
                    following = next(iterator, None)
                    if following is not None:
                        self.unfinished_slides.add(following.slide)
                if not in_flight:
                    break
                yield from in_flight.popleft().results.result()
