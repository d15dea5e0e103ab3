"""Engines run the stages (:mod:`smearscan.stages`) over discovered files and yield one
:class:`~smearscan.results.CellResult` per file, in discovery order, to the same sinks.

``local`` runs them in threads on this machine; ``ray`` (the ``[ray]`` extra) on a Ray
cluster. Both finish the batches in flight and stop when their ``stop`` event is set,
leaving the rest for the next run, and record which slides they left half-scanned.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from typing import Protocol

from smearscan.discover import Found
from smearscan.results import CellResult
from smearscan.stages import StageTimes

ENGINES = ("local", "ray")


class EngineError(RuntimeError):
    """The engine cannot run this scan (cluster unreachable, paths not readable there)."""


class EngineMissing(EngineError):
    """The engine's extra is not installed (a usage error: the message says what to do)."""


class Engine(Protocol):
    """What the runner needs of an engine (``LocalEngine``, ``RayEngine``, a test double)."""

    name: str
    #: crops per model call: a --state run commits its results once per batch
    batch_size: int
    #: slides with files discovered but not classified when the run was stopped
    unfinished_slides: set[str]

    @property
    def stage_times(self) -> StageTimes | None:
        """Seconds per stage summed over the workers, when the engine measures them."""
        ...

    def run(
        self, items: Iterable[Found], stop: threading.Event | None = None
    ) -> Iterator[CellResult]: ...

    def describe(self) -> dict: ...
