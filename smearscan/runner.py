"""A whole scan run: discovery, classification and the three reports, with its exit status.

This is the library behind ``smearscan scan`` (and ``evaluate``); the CLI only parses
options, handles signals, shows progress and maps the outcome to an exit code. Without a
state file, rows stream straight into the report; with one (``--state``), results go to the
SQLite state batch by batch and the report is written from it at the end, merging earlier
runs' results for unchanged files. Labels and slide calls are decided here, at report
time, by the run's one :class:`~smearscan.policy.DecisionPolicy`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from smearscan.discover import Found, Skipped, discover, explicit_files, unique_files
from smearscan.engines import Engine
from smearscan.exitstatus import ExitStatus
from smearscan.files import ReportSet, TargetError, check_target, remove_dead_temporaries
from smearscan.inference import CUDA, BatchPredictor, Classifier
from smearscan.limits import (
    CPU_BATCH_SIZE,
    CUDA_BATCH_SIZE,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    RAY_BATCH_SIZE,
)
from smearscan.modelfile import KEY_QC
from smearscan.policy import DecisionPolicy, policy_for_model
from smearscan.qc import EMBEDDING_OUTPUT, QC_VERSION, QCError, QualityControl
from smearscan.results import (
    STATUS_ERROR,
    STATUS_OK,
    STATUS_QC,
    STATUSES,
    CellResult,
)
from smearscan.sinks.html import write_html
from smearscan.sinks.rows import FORMATS, RowWriter, write_labelled
from smearscan.sinks.summary import SummaryBuilder, run_details, write_json
from smearscan.stages import StageConfig

log = logging.getLogger(__name__)


#: --out extensions that say the report's format (no extension: CSV)
REPORT_SUFFIXES = ("", ".csv", ".txt", ".jsonl", ".ndjson")


class RequestError(ValueError):
    """Options that contradict each other (a usage error: exit 2)."""


class NothingToScan(Exception):
    """Raised inside a report write to discard it: an empty run keeps the last report."""


@dataclass
class ScanOptions:
    """Tuning knobs of a scan; the defaults suit a 2-core machine."""

    batch_size: int | None = None  # None: CPU_BATCH_SIZE, or CUDA_BATCH_SIZE on CUDA
    workers: int = 0  # 0: one per core; each decodes a batch and runs the model on it
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES
    tta: bool = False
    decode: str = "auto"  # the CPU stage in "threads" or "processes"; auto: processes on CUDA


@dataclass
class ScanRequest:
    """What to scan, how to decide, and where the reports go."""

    inputs: list[Path] = field(default_factory=list)
    files: list[str] | None = None  # explicit list (--files-from)
    out: Path = Path("report.csv")
    fmt: str | None = None  # None: from the extension of ``out`` (.jsonl/.ndjson, else csv)
    summary: Path | None = None  # default: <out stem>.summary.json
    html: Path | None = None  # default: <out stem>.html
    write_html: bool = True
    recursive: bool = True
    pattern: str | None = None
    case_sensitive_glob: bool = False
    include_hidden: bool = False  # dot files/folders, @eaDir/...: skipped by default
    slide_depth: int = 0
    options: ScanOptions = field(default_factory=ScanOptions)
    # decision: None keeps the model's own rule
    threshold: float | None = None
    slide_rule: str | None = None
    slide_cutoff: float | None = None
    min_cells: int | None = None
    qc_mode: str = "default"
    state: Path | None = None  # SQLite state for incremental runs
    lock_wait: float | None = None  # seconds to wait for another run's lock; None: fail at once
    min_age: float = 10.0  # with a state: files younger than this wait for the next run
    new_only: bool = False  # with a state: report only files scanned in this run
    verify: str = "stat"  # with a state: "content" also compares the bytes' sha256
    anonymize_key: bytes | None = None  # replace path components by a keyed hash
    num_parts: int = 1  # scan only the files whose stable hash falls in part ``part_id``
    part_id: int = 0
    #: QC failures up to this share of the read files still exit 0 (None: any exits 3)
    max_qc_rate: float | None = None

    def format(self) -> str:
        if self.fmt is not None:
            return self.fmt
        return "jsonl" if self.out.suffix.lower() in (".jsonl", ".ndjson") else "csv"

    def summary_path(self) -> Path:
        return self.summary or self.out.with_name(self.out.stem + ".summary.json")

    def html_path(self) -> Path | None:
        if not self.write_html:
            return None
        if self.html is not None:
            return self.html
        return self.out.with_name(self.out.stem + ".html")

    def validate(self) -> None:
        """Refuse contradictory options before anything is read or written."""
        if self.format() not in FORMATS:
            raise RequestError(f"format must be one of {FORMATS}")
        targets = [
            ("--out", self.out),
            ("--summary", self.summary_path()),
            ("--html", self.html_path()),
        ]
        resolved: dict[Path, str] = {}
        for option, path in targets:
            if path is None:
                continue
            key = path.resolve()
            if key in resolved:
                raise RequestError(
                    f"{option} and {resolved[key]} both name {path}: one would overwrite "
                    "the other (give --summary/--html explicitly, or another --out name)"
                )
            resolved[key] = option
        if self.fmt is None and self.out.suffix.lower() not in REPORT_SUFFIXES:
            raise RequestError(
                f"--out {self.out}: unknown report type {self.out.suffix!r}; name it .csv, "
                ".jsonl or .ndjson, or give --format"
            )
        if self.out.suffix.lower() in (".html", ".htm", ".json"):
            raise RequestError(
                f"--out {self.out}: the per-image report is CSV or JSONL; the summary JSON "
                "and HTML are written beside it"
            )
        if self.state is not None and self.state.resolve() in resolved:
            raise RequestError(f"--state {self.state} is also a report file")
        for option, path in [*targets, ("--state", self.state)]:
            if path is not None:
                try:
                    check_target(path)
                except TargetError as exc:
                    raise RequestError(f"{option}: {exc}") from None
        if self.num_parts < 1 or not 0 <= self.part_id < self.num_parts:
            raise RequestError("--part-id must be in [0, --num-parts)")
        if self.max_qc_rate is not None and not 0 <= self.max_qc_rate <= 1:
            raise RequestError("--max-qc-rate must be in [0, 1]")

    def found(self, skipped: Skipped | None = None) -> Iterator[Found]:
        """The files to report, lazily; ``skipped`` counts the hidden ones left out."""
        items: Iterable[Found] = ()
        if self.inputs:
            items = discover(
                self.inputs,
                recursive=self.recursive,
                pattern=self.pattern,
                slide_depth=self.slide_depth,
                case_sensitive=self.case_sensitive_glob,
                include_hidden=self.include_hidden,
                skipped=skipped,
            )
        if self.files is not None:
            items = _chain(items, explicit_files(self.files))
        if self.num_parts > 1:
            items = (item for item in items if in_part(item.rel, self.num_parts, self.part_id))
        return unique_files(items)


def _chain(*parts: Iterable[Found]) -> Iterator[Found]:
    for part in parts:
        yield from part


def in_part(rel: str, parts: int, part: int) -> bool:
    """Stable sharding by the report path: the same file lands in the same part on every
    machine and every run (SLURM array jobs, labs without a cluster)."""
    digest = hashlib.sha256(rel.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % parts == part


@dataclass
class ScanOutcome:
    files: int
    ok: int
    qc: int
    errors: int
    pending: int
    reused: int
    seconds: float
    status: ExitStatus
    summary: dict
    #: The decision policy the run used (``evaluate`` scores with it).
    policy: DecisionPolicy


class PathAnonymizer:
    """Replaces every path component by HMAC-SHA256(key, component), keeping the extension:
    stable across runs with the same key, not reversible without it."""

    def __init__(self, key: bytes) -> None:
        self.key = key

    def component(self, name: str) -> str:
        return hmac.new(
            self.key, name.encode("utf-8", "surrogateescape"), hashlib.sha256
        ).hexdigest()[:16]

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


@dataclass
class RunPlan:
    """What a run decided before reading any file: policy, QC and the engine's inputs."""

    policy: DecisionPolicy
    qc: QualityControl | None
    qc_text: str
    config: StageConfig


def plan(request: ScanRequest, classifier: Classifier) -> RunPlan:
    """Resolve the decision policy and QC of a run; raises PolicyError or QCError."""
    info = classifier.info
    policy = policy_for_model(
        info.labels,
        info.positive_class,
        info.metadata,
        threshold=request.threshold,
        slide_rule=request.slide_rule,
        slide_cutoff=request.slide_cutoff,
        min_cells=request.min_cells,
    )
    qc_metadata = info.metadata.get(KEY_QC)
    qc = QualityControl.from_metadata(qc_metadata, request.qc_mode)
    if request.qc_mode == "off":
        qc_text = "off (--qc off): every decodable crop was classified"
    elif qc is None:
        qc_text = "off: this model file has no quality-control limits"
        log.warning(
            "quality control is off: %s has no QC limits (export it again with "
            "python -m export.to_onnx to add them)",
            info.name,
        )
    else:
        qc_text = f"{request.qc_mode} limits of the model file"
        if qc.outdated:
            qc_text += f" (fitted with QC measurement version {qc.fitted_version})"
            log.warning(
                "%s's quality-control limits were fitted with measurement version %d; "
                "they are applied to version %d's measurements, which differ slightly "
                "(export the model again with python -m export.to_onnx to refit them)",
                info.name,
                qc.fitted_version,
                QC_VERSION,
            )
    if qc is not None and qc.max_embedding_distance is not None:
        if not classifier.has_embedding_distance:
            raise QCError(
                f"{info.name}'s QC limits check the embedding distance, but its graph has no "
                f"{EMBEDDING_OUTPUT!r} output (scan with --qc off, or export it again)"
            )
        qc_text += ", with the embedding distance"
    config = StageConfig(info.recipe, qc, request.options.max_pixels, request.options.max_bytes)
    return RunPlan(policy, qc, qc_text, config)


def batch_size_for(options: ScanOptions, classifier: Classifier, engine: str = "local") -> int:
    """The batch size asked for, or the default of the engine and the provider really in use."""
    if options.batch_size is not None:
        return max(1, options.batch_size)
    if engine == "ray":
        return RAY_BATCH_SIZE
    return CUDA_BATCH_SIZE if classifier.provider == CUDA else CPU_BATCH_SIZE


def make_engine(
    name: str,
    plan_: RunPlan,
    classifier: Classifier,
    request: ScanRequest,
    ray_address: str | None = None,
    on_lost: Callable[[str], None] | None = None,
) -> Engine:
    """The engine that runs the stages; ``on_lost(reason)`` ends the run when a cluster
    vanishes under it in a way no exception reports (the Ray engine's local raylet)."""
    options = request.options
    batch_size = batch_size_for(options, classifier, name)
    if name == "ray":
        from smearscan.engines.ray import RayEngine

        lost = {"on_lost": on_lost} if on_lost is not None else {}
        return RayEngine(
            plan_.config, classifier, batch_size, options.tta, address=ray_address, **lost
        )
    from smearscan.engines.local import LocalEngine

    predictor = BatchPredictor(
        classifier=classifier,
        tta=options.tta,
        pad_to=batch_size,
        distances=plan_.qc is not None and plan_.qc.max_embedding_distance is not None,
    )
    decode = decode_for(options, classifier)
    log.debug(
        "local engine: batch %d, CPU stage in %s, %s workers",
        batch_size,
        decode,
        options.workers or "one per core",
    )
    return LocalEngine(plan_.config, predictor, batch_size, options.workers, decode)


def decode_for(options: ScanOptions, classifier: Classifier) -> str:
    """Where the local engine runs the CPU stage: as asked, else in worker processes on
    CUDA (the model is cheap there and threads stop scaling at a few cores) and in the
    workers' threads on CPU (each thread runs the model on its own batch)."""
    if options.decode != "auto":
        return options.decode
    return "processes" if classifier.provider == CUDA else "threads"


def qc_rate(counts: dict[str, int]) -> float | None:
    """QC failures as a share of the files read and judged (classified or refused by QC)."""
    judged = counts[STATUS_OK] + counts[STATUS_QC]
    return counts[STATUS_QC] / judged if judged else None


def qc_tolerated(max_qc_rate: float | None, counts: dict[str, int]) -> bool:
    """Whether the run's QC failures are within ``--max-qc-rate`` (a normal night's few
    refused crops need not fail cron; more than that still exits 3)."""
    rate = qc_rate(counts)
    return max_qc_rate is not None and rate is not None and rate <= max_qc_rate


def qc_tolerance(max_qc_rate: float | None, counts: dict[str, int]) -> dict:
    rate = qc_rate(counts)
    return {
        "max_qc_rate": max_qc_rate,
        "qc_rate": None if rate is None else round(rate, 6),
        "within": qc_tolerated(max_qc_rate, counts),
    }


def run_scan(
    request: ScanRequest,
    classifier: Classifier,
    *,
    stop: threading.Event | None = None,
    stop_status: Callable[[], ExitStatus] | None = None,
    on_result: Callable[[CellResult], None] | None = None,
    on_kept: Callable[[], None] | None = None,
    engine: Engine | None = None,
    run_plan: RunPlan | None = None,
) -> ScanOutcome:
    """Scan and write the reports. A set ``stop`` event ends the run early; the reports are
    still written, marked partial, and the status is ``stop_status()``.

    Raises :class:`RequestError`, :class:`~smearscan.policy.PolicyError` or
    :class:`~smearscan.qc.QCError` for unusable options,
    :class:`smearscan.state.StateLocked` when another run holds the state lock, and
    :class:`InterruptedError` when stopped while waiting for it. ``run_plan`` is the plan
    an ``engine`` was built from (planned once: its warnings are said once). ``on_result``
    is called for each file classified, ``on_kept`` for each file a ``--state`` run keeps
    without reading it (unchanged or pending): together they count every file found.
    """
    request.validate()
    started = time.time()
    run_plan = run_plan or plan(request, classifier)
    engine = engine or make_engine("local", run_plan, classifier, request)
    remove_dead_temporaries([request.out, request.summary_path(), request.html_path()])

    def notify(results: Iterable[CellResult]) -> Iterator[CellResult]:
        for result in results:
            if on_result:
                on_result(result)
            yield result

    skipped = Skipped()
    if request.state is None:
        results = notify(engine.run(request.found(skipped), stop))
        return _report(
            request,
            classifier,
            run_plan,
            engine,
            results,
            started,
            stop,
            stop_status,
            0,
            0,
            None,
            skipped,
        )

    from smearscan.state import Counters, RunLock, StateStore, fingerprint

    lock_path = request.state.with_name(request.state.name + ".lock")
    with RunLock(lock_path, request.lock_wait, stop):
        qc_limits = classifier.info.metadata.get(KEY_QC) if run_plan.qc else None
        store = StateStore(
            request.state,
            fingerprint(classifier.info.sha256, request.options.tta, request.qc_mode, qc_limits),
            request.verify,
            tuple(classifier.info.labels),
        )
        try:
            counters = Counters()
            found = request.found(skipped)
            selected = store.select(found, request.min_age, counters, on_kept)
            batch = engine.batch_size  # commit once per batch of the engine in use
            for index, result in enumerate(notify(engine.run(selected, stop)), start=1):
                store.record(result)
                if index % batch == 0:
                    store.commit()
            selected.close()  # type: ignore[attr-defined]  # a generator: its bookkeeping lands now
            store.commit()
            partial = bool(stop is not None and stop.is_set())
            outcome = _report(
                request,
                classifier,
                run_plan,
                engine,
                store.results(request.new_only),
                started,
                stop,
                stop_status,
                counters.pending,
                counters.reused,
                counters.to_scan,
                skipped,
            )
            store.finish("partial" if partial else outcome.status.name.lower())
            return outcome
        finally:
            store.close()


def _report(
    request: ScanRequest,
    classifier: Classifier,
    run_plan: RunPlan,
    engine: Engine,
    results: Iterator[CellResult],
    started: float,
    stop: threading.Event | None,
    stop_status: Callable[[], ExitStatus] | None,
    pending: int,
    reused: int,
    scanned: int | None,
    skipped: Skipped,
) -> ScanOutcome:
    """Write rows, summary and HTML from ``results``, labelling them by the run's policy;
    ``scanned`` counts files decoded in this run (None: every result). A run with no row at
    all writes nothing and keeps the previous reports."""
    started_iso = datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds")
    policy = run_plan.policy
    builder = SummaryBuilder(policy)
    anonymize = PathAnonymizer(request.anonymize_key) if request.anonymize_key else None
    counts = dict.fromkeys(STATUSES, 0)
    rule = policy.cell_rule_short()
    # the per-image report, summary and page are one set: renamed into place together,
    # once all are written (a full disk leaves the previous set, not a mix)
    with ReportSet() as reports:
        try:
            with reports.write(request.out) as handle:
                writer = RowWriter(handle, list(policy.labels), request.format(), rule)
                write_labelled(writer, results, policy, builder, counts, anonymize)
                # (one part of a --num-parts run may own no file: its empty report is still
                # written, so that merge finds every part)
                nothing = sum(counts.values()) == 0 and not (request.new_only and reused)
                if nothing and request.num_parts == 1:
                    raise NothingToScan  # (an empty --new-only report is news: nothing new)
        except NothingToScan:
            seconds = time.time() - started
            partial = bool(stop is not None and stop.is_set())
            status = (
                (stop_status() if stop_status else ExitStatus.INTERRUPTED_INT)
                if partial
                else ExitStatus.NOTHING_TO_SCAN
            )
            return ScanOutcome(0, 0, 0, 0, pending, reused, seconds, status, {}, run_plan.policy)
        files = sum(counts.values())
        seconds = time.time() - started
        partial = bool(stop is not None and stop.is_set())
        details = run_details(
            classifier,
            seconds,
            files if scanned is None else scanned,
            partial,
            {
                "started": started_iso,
                "tta": request.options.tta,
                "quality_control": run_plan.qc_text,
                "engine": engine.describe(),
                "inputs": ["<anonymized>" if anonymize else str(p) for p in request.inputs],
                "part": {"num_parts": request.num_parts, "part_id": request.part_id}
                if request.num_parts > 1
                else None,
                "incremental": {
                    "state": str(request.state) if request.state else None,
                    "reused_from_earlier_runs": reused,
                    "pending_too_young": pending,
                    "pending_rows": "every file present has a row; files still being written "
                    "are 'pending', with no label, and their slides have no call",
                    "report_covers": "this run's new or changed files"
                    if request.new_only
                    else "every file present",
                },
                "anonymized_paths": bool(anonymize),
                "skipped": {**skipped.to_dict(), "include_hidden": request.include_hidden},
                "qc_tolerance": qc_tolerance(request.max_qc_rate, counts),
                "profile": engine.stage_times.to_dict(seconds)
                if engine.stage_times is not None
                else None,
            },
        )
        summary = builder.to_dict(details, engine.unfinished_slides if partial else set())
        if builder.jpeg_files:
            measured = (
                "the default model, trained on lossless crops, missed about a quarter more blasts "
                "at JPEG quality 75"
                if summary["model"]["is_default"]
                else "this model's JPEG behaviour is unmeasured; the default model missed about a "
                "quarter more blasts at JPEG quality 75"
            )
            log.warning(
                "%d of %d files are JPEG: compression changes what the model sees (%s); prefer "
                "lossless crops or validate on your own JPEG cases",
                builder.jpeg_files,
                files,
                measured,
            )
        unread = skipped.unread_images()
        if unread:
            log.warning(
                "%d files of image types smearscan does not read were left out (%s): save the "
                "crops as PNG, TIFF, BMP or lossless WebP to have them scanned",
                sum(unread.values()),
                ", ".join(f"{count} {suffix}" for suffix, count in unread.items()),
            )
        write_json(request.summary_path(), summary, reports)
        html_path = request.html_path()
        if html_path is not None:
            roots = [os.path.realpath(p) for p in request.inputs if p.is_dir()]
            write_html(
                html_path,
                summary,
                builder,
                classifier.info.recipe,
                run_plan.qc_text,
                roots,
                reports,
            )
    interrupted = None
    if partial:
        interrupted = stop_status() if stop_status else ExitStatus.INTERRUPTED_INT
    status = ExitStatus.for_report(counts, interrupted, qc_tolerated(request.max_qc_rate, counts))
    return ScanOutcome(
        files,
        counts[STATUS_OK],
        counts[STATUS_QC],
        counts[STATUS_ERROR],
        pending,
        reused,
        seconds,
        status,
        summary,
        run_plan.policy,
    )
