"""A whole scan run: discovery, classification and the three reports, with its exit status.

This is the library behind ``smearscan scan``; the CLI only parses options, shows progress
and maps the outcome to an exit code.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

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
    seconds: float
    status: ExitStatus
    summary: dict


def run_scan(
    request: ScanRequest,
    classifier: Classifier,
    *,
    stop: threading.Event | None = None,
    stop_status: Callable[[], ExitStatus] | None = None,
    on_result: Callable[[CellResult], None] | None = None,
) -> ScanOutcome:
    """Scan and write the reports. A set ``stop`` event ends the run early; the reports are
    still written, marked partial, and the status is ``stop_status()``."""
    started = time.time()
    started_iso = datetime.now(timezone.utc).isoformat(timespec="seconds")
    labels = classifier.labels
    builder = SummaryBuilder(labels, classifier.info.positive_class, request.slide_threshold)
    ok = errors = 0
    with atomic_write(request.out) as handle:
        writer = RowWriter(handle, labels, request.fmt)
        for result in scan_paths(request.found(), classifier, request.options, stop=stop):
            writer.write(result)
            builder.add(result)
            if result.ok:
                ok += 1
            else:
                errors += 1
            if on_result:
                on_result(result)
    seconds = time.time() - started
    partial = bool(stop is not None and stop.is_set())
    threshold = request.options.threshold
    if threshold is None:
        threshold = classifier.info.calibration().get("threshold")
    details = run_details(
        classifier,
        seconds,
        ok + errors,
        partial,
        {
            "started": started_iso,
            "threshold": threshold,
            "tta": request.options.tta,
            "inputs": [str(p) for p in request.inputs],
            "reports": {"rows": str(request.out)},
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
    return ScanOutcome(ok + errors, ok, errors, seconds, status, summary)
