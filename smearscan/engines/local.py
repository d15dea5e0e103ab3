"""The local engine: worker threads on this machine.

Each worker thread takes a whole batch of files, decodes, checks and preprocesses them and
runs the model on them (OpenCV and onnxruntime release the GIL). With one onnxruntime thread
per worker, every core works on its own batch from start to end: decoding and inference
overlap without the hand-offs and idle waits of a decode pool feeding a separate inference
stage (measured in docs/performance.md). At most two batches per worker are in flight, so
memory stays flat however many files there are.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from smearscan.discover import Found
from smearscan.results import CellResult
from smearscan.stages import StageConfig, classify_items


def batches(items: Iterator[Found], size: int) -> Iterator[list[Found]]:
    while batch := list(itertools.islice(items, size)):
        yield batch


class LocalEngine:
    """Threads on this machine, sharing one onnxruntime session."""

    name = "local"

    def __init__(self, config: StageConfig, predictor, batch_size: int = 32,
                 workers: int = 0) -> None:  # fmt: skip
        self.config, self.predictor = config, predictor
        self.batch_size = max(1, batch_size)
        self.workers = workers if workers > 0 else max(1, os.cpu_count() or 1)
        self.unfinished_slides: set[str] = set()

    def describe(self) -> dict:
        return {"engine": self.name, "nodes": 1, "cpus": os.cpu_count(),
                "gpus": 1 if self.predictor.classifier.provider.startswith("CUDA") else 0,
                "workers": self.workers}  # fmt: skip

    def run(
        self, items: Iterable[Found], stop: threading.Event | None = None
    ) -> Iterator[CellResult]:
        """Classify every file, yielding results in input order.

        A set ``stop`` stops submitting batches and cancels those not started; batches
        already running are finished and yielded, the rest are left for the next run.
        """
        iterator = iter(items)
        pending = batches(iterator, self.batch_size)
        in_flight: deque[tuple[Future, list[Found]]] = deque()
        stopped = False
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="scan") as pool:
            while True:
                while len(in_flight) < 2 * self.workers and not (stop and stop.is_set()):
                    batch = next(pending, None)
                    if batch is None:
                        break
                    future = pool.submit(classify_items, batch, self.config, self.predictor)
                    in_flight.append((future, batch))
                if stop is not None and stop.is_set() and not stopped:
                    stopped = True
                    # not-yet-started batches are left for the next run (FIFO: a suffix)
                    for entry in list(in_flight):
                        if entry[0].cancel():
                            in_flight.remove(entry)
                            self.unfinished_slides.update(item.slide for item in entry[1])
                    # the first file never submitted: its slide may be half-scanned
                    following = next(iterator, None)
                    if following is not None:
                        self.unfinished_slides.add(following.slide)
                if not in_flight:
                    break
                future, _ = in_flight.popleft()
                yield from future.result()
