"""A whole scan run: discovery, classification and the three reports, with its exit status.

This is the library behind ``smearscan scan``; the CLI only parses options, shows progress
and maps the outcome to an exit code. Without a state file, rows stream straight into the
report; with one (``--state``), results go to the SQLite state batch by batch and the report
is written from it at the end, merging earlier runs' results for unchanged files.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from smearscan.discover import Found, discover, explicit_files
from smearscan.exitstatus import ExitStatus
from smearscan.inference import Classifier
from smearscan.reports import (
    RowWriter,
    SummaryBuilder,
    atomic_write,
    run_details,
    write_html,
    write_summary,
)
from smearscan.scan import CellResult, ScanOptions, scan_paths

log = logging.getLogger(__name__)


@dataclass
class ScanRequest:
    """What to scan and where the reports go."""

    inputs: list[Path] = field(default_factory=list)
    files: list[str] | None = None  # explicit list (--files-from)
    out: Path = Path("report.csv")
    fmt: str = "csv"
    summary: Path | None = None  # default: <out stem>.summary.json
    html: Path | None = None  # default: <out stem>.html
    write_html: bool = True
    recursive: bool = True
    pattern: str | None = None
    slide_depth: int = 0
    slide_threshold: float = 0.5
    options: ScanOptions = field(default_factory=ScanOptions)
    state: Path | None = None  # SQLite state for incremental runs
    lock_wait: float | None = None  # seconds to wait for another run's lock; None: fail at once
    min_age: float = 10.0  # with a state: files younger than this are left for the next run
    new_only: bool = False  # with a state: report only files scanned in this run
    anonymize_key: bytes | None = None  # replace path components by a keyed hash

    def summary_path(self) -> Path:
        return self.summary or self.out.with_name(self.out.stem + ".summary.json")

    def html_path(self) -> Path | None:
        if not self.write_html:
            return None
        if self.html is not None:
            return self.html
        return self.out.with_name(self.out.stem + ".html")

    def found(self) -> Iterable[Found]:
        if self.inputs:
            yield from discover(
                self.inputs,
                recursive=self.recursive,
                pattern=self.pattern,
                slide_depth=self.slide_depth,
            )
        if self.files is not None:
            yield from explicit_files(self.files)


@dataclass
class ScanOutcome:
    files: int
    ok: int
    errors: int
    pending: int
    reused: int
    seconds: float
    status: ExitStatus
    summary: dict


class PathAnonymizer:
    """Replaces every path component by HMAC-SHA256(key, component), keeping the extension:
    stable across runs with the same key, not reversible without it."""

    def __init__(self, key: bytes) -> None:
        self.key = key

    def component(self, name: str) -> str:
        return hmac.new(self.key, name.encode("utf-8"), hashlib.sha256).hexdigest()[:16]

    def path(self, path: str, keep_suffix: bool = True) -> str:
        parts = PurePosixPath(path).parts
        if not parts:
            return path
        *folders, name = parts
        suffix = PurePosixPath(name).suffix if keep_suffix else ""
        stem = name[: -len(suffix)] if suffix else name
        return "/".join([*(self.component(p) for p in folders), self.component(stem) + suffix])

    def __call__(self, result: CellResult) -> CellResult:
        return replace(
            result, path=self.path(result.path), slide=self.path(result.slide, keep_suffix=False)
        )


def run_scan(
    request: ScanRequest,
    classifier: Classifier,
    *,
    stop: threading.Event | None = None,
    stop_status: Callable[[], ExitStatus] | None = None,
    on_result: Callable[[CellResult], None] | None = None,
) -> ScanOutcome:
    """Scan and write the reports. A set ``stop`` event ends the run early; the reports are
    still written, marked partial, and the status is ``stop_status()``.

    Raises :class:`smearscan.state.StateLocked` when another run holds the state lock.
    """
    started = time.time()

    def notify(result: CellResult) -> CellResult:
        if on_result:
            on_result(result)
        return result

    if request.state is None:
        results = (notify(r) for r in scan_paths(request.found(), classifier, request.options,
                                                 stop=stop))  # fmt: skip
        return _report(request, classifier, results, started, stop, stop_status, 0, 0, None)

    from smearscan.state import Counters, RunLock, StateStore

    lock_path = request.state.with_name(request.state.name + ".lock")
    with RunLock(lock_path, request.lock_wait):
        _remove_stale_temporaries(request)
        store = StateStore(request.state, classifier.info.sha256)
        try:
            counters = Counters()
            selected = store.select(request.found(), request.min_age, counters)
            batch = max(request.options.batch_size, 1)
            for index, result in enumerate(
                scan_paths(selected, classifier, request.options, stop=stop), start=1
            ):
                store.record(notify(result))
                if index % batch == 0:
                    store.commit()
            store.commit()
            partial = bool(stop is not None and stop.is_set())
            outcome = _report(
                request, classifier, store.results(request.new_only), started, stop,
                stop_status, counters.pending, counters.reused, counters.to_scan,
            )  # fmt: skip
            store.finish("partial" if partial else outcome.status.name.lower())
            return outcome
        finally:
            store.close()


def _remove_stale_temporaries(request: ScanRequest) -> None:
    """Temporary report files left by a killed run (safe to remove: we hold the lock)."""
    for target in (request.out, request.summary_path(), request.html_path()):
        if target is None:
            continue
        for stale in target.parent.glob(f".{target.name}.*.tmp"):
            stale.unlink(missing_ok=True)


def _report(
    request: ScanRequest,
    classifier: Classifier,
    results: Iterator[CellResult],
    started: float,
    stop: threading.Event | None,
    stop_status: Callable[[], ExitStatus] | None,
    pending: int,
    reused: int,
    scanned: int | None,
) -> ScanOutcome:
    """Write rows, summary and HTML from ``results``; ``scanned`` counts files decoded in
    this run (None: every result)."""
    started_iso = datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds")
    labels = classifier.labels
    builder = SummaryBuilder(labels, classifier.info.positive_class, request.slide_threshold)
    anonymize = PathAnonymizer(request.anonymize_key) if request.anonymize_key else None
    ok = errors = 0
    with atomic_write(request.out) as handle:
        writer = RowWriter(handle, labels, request.fmt)
        for result in results:
            if anonymize:
                result = anonymize(result)
            writer.write(result)
            builder.add(result)
            if result.ok:
                ok += 1
            else:
                errors += 1
    seconds = time.time() - started
    partial = bool(stop is not None and stop.is_set())
    threshold = request.options.threshold
    if threshold is None:
        threshold = classifier.info.calibration().get("threshold")
    details = run_details(
        classifier,
        seconds,
        ok + errors if scanned is None else scanned,
        partial,
        {
            "started": started_iso,
            "threshold": threshold,
            "tta": request.options.tta,
            "inputs": ["<anonymized>" if anonymize else str(p) for p in request.inputs],
            "incremental": {
                "state": str(request.state) if request.state else None,
                "reused_from_earlier_runs": reused,
                "pending_too_young": pending,
                "report_covers": "this run's new or changed files"
                if request.new_only
                else "every file present",
            },
            "anonymized_paths": bool(anonymize),
        },
    )
    summary = builder.to_dict(details)
    write_summary(request.summary_path(), summary)
    html_path = request.html_path()
    if html_path is not None:
        write_html(html_path, summary, builder, classifier.info.recipe)
    if partial:
        status = stop_status() if stop_status else ExitStatus.INTERRUPTED_INT
    elif errors:
        status = ExitStatus.SOME_UNREADABLE
    else:
        status = ExitStatus.SUCCESS
    return ScanOutcome(ok + errors, ok, errors, pending, reused, seconds, status, summary)
