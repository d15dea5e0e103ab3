"""Command line: a thin click layer over the smearscan library.

Heavy modules (numpy, OpenCV, onnxruntime) are imported inside commands so that
``smearscan --help`` stays fast. Every command that reads crops follows one contract for
signals and failures (see :class:`SignalGuard` and :func:`_final_line`): the last line on
stderr always summarises the run, whatever happened.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TextIO

import click

from smearscan import __version__
from smearscan.exitstatus import ExitStatus

log = logging.getLogger("smearscan")
INTENDED_USE_LINE = "Research use only; not for diagnostic use."


@dataclass
class Environment:
    """The process surroundings, injectable for tests (after httpie)."""

    stdin: TextIO = field(default_factory=lambda: sys.stdin)
    stderr: TextIO = field(default_factory=lambda: sys.stderr)
    stderr_isatty: bool = field(default_factory=lambda: sys.stderr.isatty())
    verbose: bool = False  # -v: debug messages too


class _Formatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(message)s")


def _setup_logging(env: Environment, quiet: bool, log_file: Path | None) -> None:
    """Messages to stderr (errors only with -q) and, in full, to ``log_file`` (created
    owner-only with its folder: it names slides)."""
    root = logging.getLogger("smearscan")
    for handler in root.handlers:
        handler.close()
    root.handlers.clear()
    root.propagate = False
    handler = logging.StreamHandler(env.stderr)
    handler.setFormatter(_Formatter())
    handler.setLevel(logging.ERROR if quiet else logging.DEBUG if env.verbose else logging.INFO)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if env.verbose else logging.INFO)
    if log_file:
        from smearscan.files import open_private

        try:
            fd = open_private(log_file)
        except OSError as exc:
            raise click.BadParameter(str(exc), param_hint="--log-file") from None
        file_handler = _LogFileHandler(os.fdopen(fd, "a", encoding="utf-8"))
        file_handler.setFormatter(_Formatter())
        root.addHandler(file_handler)


class _NamesHidden(logging.Filter):
    """With --anonymize-key-file, log lines that would name a folder or file (discovery's)
    say that a name was hidden instead: the reports hash every name, so must the logs."""

    HIDDEN = "<name hidden: --anonymize-key-file>"

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(self.HIDDEN if isinstance(a, str) else a for a in record.args)
        return True


def _hide_names_in_logs(hide: bool) -> None:
    """Discovery names folders and files in its log lines; in anonymised runs it must not."""
    discovery = logging.getLogger("smearscan.discover")
    for existing in [f for f in discovery.filters if isinstance(f, _NamesHidden)]:
        discovery.removeFilter(existing)
    if hide:
        discovery.addFilter(_NamesHidden())


class _LogFileHandler(logging.StreamHandler):
    """``--log-file``: a stream on the descriptor :func:`smearscan.files.open_private`
    opened (logging's own FileHandler would open the path again, following links)."""

    def close(self) -> None:
        try:
            self.stream.close()
        finally:
            super().close()


@contextlib.contextmanager
def _native_stderr_silenced(env: Environment, quiet: bool):
    """With -q, native libraries (libpng, libjpeg, Ray's C++ core) that write to file
    descriptor 2 themselves are sent to /dev/null; smearscan's own errors and final line go
    to a duplicate of the real stderr. Every such decode problem is an error row anyway."""
    try:
        fd = env.stderr.fileno() if quiet else -1
    except (AttributeError, OSError, ValueError):
        fd = -1
    if fd != 2:
        yield
        return
    env.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    original = env.stderr
    ours = os.fdopen(
        saved,
        "w",
        buffering=1,
        encoding=getattr(original, "encoding", "utf-8"),
        errors="backslashreplace",
    )
    handlers = [
        h
        for h in log.handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, _LogFileHandler)
    ]
    os.dup2(devnull, 2)
    os.close(devnull)
    env.stderr = ours
    for handler in handlers:
        handler.setStream(ours)
    try:
        yield
    finally:
        ours.flush()
        os.dup2(saved, 2)
        env.stderr = original
        for handler in handlers:
            handler.setStream(original)
        ours.close()


def _quiet_opencv() -> None:
    """OpenCV's own warnings go straight to stderr and would get through -q; every decode
    problem already becomes an error row with its reason."""
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")


class SignalGuard:
    """One signal contract for every command.

    The first SIGINT, SIGTERM or SIGHUP sets ``stop``: the batches in flight are finished,
    a report marked partial is written, and the exit code is 128 + the signal (130, 143,
    129). A signal while waiting for the state lock ends the wait at once, with the same
    code and no report. A second signal exits at once (same code), writing nothing more:
    temporary files it leaves are removed by the next run.
    """

    #: those this platform has (Windows has no SIGHUP)
    SIGNALS = tuple(
        getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
    )

    def __init__(self, env: Environment, on_abort: Callable[[ExitStatus, str], None]) -> None:
        self.env, self.on_abort = env, on_abort
        self.stop = threading.Event()
        self.received: list[int] = []
        self.previous: dict = {}

    def __enter__(self) -> SignalGuard:
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, _frame) -> None:
        self.received.append(signum)
        if len(self.received) > 1:
            self.abort(self.status(), "aborted (second signal; no report written)")
        self.stop.set()
        log.warning(
            "signal %d: finishing the batches in flight, then writing a partial report "
            "(signal again to stop at once)",
            signum,
        )

    def abort(self, status: ExitStatus, state: str) -> NoReturn:
        """End the process now, from any thread: the final line, then ``status``; nothing
        more is written (a second signal; a cluster that vanished under the run)."""
        self.on_abort(status, state)
        os._exit(int(status))

    def status(self) -> ExitStatus:
        if not self.received:
            return ExitStatus.INTERRUPTED_INT
        return ExitStatus.for_signal(self.received[0])


def _final_line(
    env: Environment,
    state: str,
    status: ExitStatus,
    files: int = 0,
    ok: int = 0,
    qc: int = 0,
    errors: int = 0,
    seconds: float = 0.0,
    pending: int = 0,
    reused: int = 0,
) -> None:
    """One line for cron mail, printed even with --quiet, always last."""
    line = (
        f"smearscan {state}: {files} files, {ok} ok, {qc} failed QC, {errors} errors, "
        f"{pending} pending, {reused} unchanged in {seconds:.1f} s; exit {int(status)} "
        f"({status.name.lower()})"
    )
    with contextlib.suppress(OSError, ValueError):
        print(line, file=env.stderr, flush=True)
    record = log.makeRecord(log.name, logging.INFO, __file__, 0, line, (), None)
    for handler in log.handlers:
        if isinstance(handler, _LogFileHandler):
            try:
                handler.emit(record)
                handler.flush()
            except Exception:  # noqa: BLE001  (the log's disk may be full; stderr has it)
                pass


def _check_device(device: str) -> None:
    import re

    if not re.match(r"^(auto|cpu|cuda(:\d+)?)$", device.strip().lower()):
        raise click.BadParameter(
            f"{device!r}: use auto, cpu, cuda or cuda:N", param_hint="--device"
        )


model_option = click.option(
    "--model",
    "-m",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="SMEARSCAN_MODEL",
    show_envvar=True,
    help="ONNX model [default: the embedded model].",
)
device_option = click.option(
    "--device",
    default="auto",
    envvar="SMEARSCAN_DEVICE",
    show_envvar=True,
    show_default=True,
    help="auto, cpu, cuda or cuda:N.",
)
threshold_option = click.option(
    "--threshold",
    type=click.FloatRange(0, 1),
    help="Cut-off on P(positive class) for two-class models [default: the model's "
    "operating point]. A usage error for models without a positive class.",
)
slide_options = [
    click.option(
        "--slide-rule",
        type=click.Choice(["mean", "fraction"]),
        help="Slide score: mean P(positive) of its usable cells, or the fraction of them "
        "labelled positive [default: the model's rule].",
    ),
    click.option(
        "--slide-threshold",
        "slide_cutoff",
        type=click.FloatRange(0, 1),
        help="Cut-off on the slide score that flags a slide [default: the model's].",
    ),
    click.option(
        "--min-cells",
        type=click.IntRange(min=1),
        help="Fewer usable cells than this: the slide call is 'insufficient' [default: the "
        "model's, 10].",
    ),
]
qc_option = click.option(
    "--qc",
    "qc_mode",
    type=click.Choice(["default", "strict", "off"]),
    default="default",
    envvar="SMEARSCAN_QC",
    show_envvar=True,
    show_default=True,
    help="Quality control against the model's training range: 'strict' refuses more "
    "borderline crops, 'off' classifies every decodable crop (marked in the summary).",
)


def _apply(options: list):
    def decorate(function):
        for option in reversed(options):
            function = option(function)
        return function

    return decorate


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="smearscan")
@click.option("-v", "--verbose", is_flag=True, help="Debug messages too (with the final line).")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """Screen white-cell crops for acute lymphoblastic leukemia.

    Research use only; not for diagnostic use."""
    ctx.ensure_object(Environment)
    ctx.obj.verbose = verbose


@cli.command()
@click.argument("inputs", nargs=-1, type=click.Path(path_type=Path))
@click.option(
    "--out",
    "-o",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="Per-image report (CSV or JSONL). The summary JSON and HTML go beside it.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "jsonl"]),
    help="Report format [default: from the --out extension: .jsonl/.ndjson, else csv].",
)
@click.option(
    "--summary",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Summary JSON [default: <out>.summary.json].",
)
@click.option(
    "--html",
    type=click.Path(path_type=Path, dir_okay=False),
    help="HTML report [default: <out>.html].",
)
@click.option("--no-html", is_flag=True, help="Skip the HTML report.")
@click.option(
    "--files-from",
    type=click.File("r", encoding="utf-8", errors="surrogateescape"),
    help="Read file paths, one per line, from FILE ('-' for stdin).",
)
@click.option(
    "-0",
    "--null",
    "nul_separated",
    is_flag=True,
    help="With --files-from: paths are separated by NUL bytes (find -print0, as xargs -0), "
    "so that names may hold newlines.",
)
@click.option(
    "--glob",
    "pattern",
    help="Only files whose name or relative path matches (case-insensitive).",
)
@click.option("--glob-case-sensitive", is_flag=True, help="Match --glob case-sensitively.")
@click.option("--recursive/--no-recursive", default=True, show_default=True)
@click.option(
    "--slide-depth",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Slide = first N folder levels under the root (0 = the crop's folder).",
)
@model_option
@device_option
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=0,
    envvar="SMEARSCAN_WORKERS",
    show_envvar=True,
    help="Worker threads, each decoding a batch and running the model on it (0 = one per core).",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=1,
    envvar="SMEARSCAN_THREADS",
    show_envvar=True,
    show_default=True,
    help="onnxruntime threads per inference; the workers already fill the cores.",
)
@click.option(
    "--decode",
    type=click.Choice(["auto", "threads", "processes"]),
    default="auto",
    envvar="SMEARSCAN_DECODE",
    show_envvar=True,
    show_default=True,
    help="Run decoding, QC and preprocessing in the workers' threads or in worker processes "
    "(auto: processes on CUDA, where threads cannot keep the GPU busy; threads on CPU).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1, max=4096),
    default=None,
    envvar="SMEARSCAN_BATCH_SIZE",
    show_envvar=True,
    help="Crops per model call [default: 8 on CPU, where small batches stay in cache; 128 "
    "on CUDA; 32 with --engine ray].",
)
@threshold_option
@_apply(slide_options)
@qc_option
@click.option("--tta", is_flag=True, help="Average flips and 90° rotations (8x slower).")
@click.option(
    "--max-pixels",
    type=click.IntRange(min=64),
    envvar="SMEARSCAN_MAX_PIXELS",
    show_envvar=True,
    help="Refuse images larger than this many pixels, from the header [default: 64,000,000].",
)
@click.option(
    "--max-bytes",
    type=click.IntRange(min=1),
    envvar="SMEARSCAN_MAX_BYTES",
    show_envvar=True,
    help="Refuse files larger than this many bytes, before reading [default: 134,217,728].",
)
@click.option(
    "--state",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="SMEARSCAN_STATE",
    show_envvar=True,
    help="SQLite state on local disk: rescan only new or changed files; locks the run.",
)
@click.option(
    "--wait",
    "lock_wait",
    type=click.FloatRange(min=0),
    is_flag=False,
    flag_value=3600.0,
    help="If another run holds the state lock, wait up to SECONDS (default 3600) "
    "instead of exiting with code 4.",
)
@click.option(
    "--min-age",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    help="With --state: a file modified less than this many seconds ago waits for the next "
    "run, unless that run finds it unchanged (a scanner may still be writing it).",
)
@click.option(
    "--new-only", is_flag=True, help="With --state: report only this run's new or changed files."
)
@click.option(
    "--verify",
    type=click.Choice(["stat", "content"]),
    default="stat",
    show_default=True,
    help="With --state: a file is unchanged when its size and mtime are ('stat'), or also "
    "its bytes' sha256 ('content': reads every file each run).",
)
@click.option(
    "--anonymize-key-file",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="SMEARSCAN_ANONYMIZE_KEY_FILE",
    show_envvar=True,
    help="Replace folder and file names in reports by a keyed hash (HMAC-SHA256 with "
    "this file's contents), stable across runs.",
)
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    envvar="SMEARSCAN_ENGINE",
    show_envvar=True,
    show_default=True,
    help="Where the work runs: threads here, or a Ray cluster (pip install 'smearscan[ray]').",
)
@click.option(
    "--ray-address",
    envvar="SMEARSCAN_RAY_ADDRESS",
    show_envvar=True,
    help="With --engine ray: 'auto', host:port or ray://host:port of a cluster "
    "[default: start a local Ray instance].",
)
@click.option(
    "--num-parts",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Scan only one of N parts of the files (a stable hash of each report path); "
    "combine the parts with 'smearscan merge'.",
)
@click.option("--part-id", type=click.IntRange(min=0), default=0, show_default=True)
@click.option(
    "--log-file", type=click.Path(path_type=Path, dir_okay=False), envvar="SMEARSCAN_LOG_FILE"
)
@click.option(
    "--log-interval",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="Seconds between progress lines when stderr is not a terminal.",
)
@click.option(
    "--include-hidden",
    is_flag=True,
    help="Also scan hidden files and folders (dot files such as macOS '._*' copies, "
    ".DS_Store, .thumbs/, and @eaDir, #recycle, $RECYCLE.BIN, __MACOSX), skipped by default.",
)
@click.option(
    "--max-qc-rate",
    type=click.FloatRange(0, 1),
    default=None,
    envvar="SMEARSCAN_MAX_QC_RATE",
    show_envvar=True,
    help="Exit 0 when crops failed QC but no more than this share of the judged files "
    "(e.g. 0.01; above it, or with any unreadable file, exit 3) [default: any QC failure "
    "exits 3].",
)
@click.option(
    "--profile",
    is_flag=True,
    help="Print where the time went (decode, QC, preprocess, inference) at the end; the "
    "summary's 'profile' always has it.",
)
@click.option("-q", "--quiet", is_flag=True, help="Errors and the final line only.")
@click.pass_context
def scan(
    ctx: click.Context,
    inputs,
    out,
    fmt,
    summary,
    html,
    no_html,
    files_from,
    nul_separated,
    pattern,
    glob_case_sensitive,
    recursive,
    slide_depth,
    model,
    device,
    workers,
    threads,
    decode,
    batch_size,
    threshold,
    slide_rule,
    slide_cutoff,
    min_cells,
    qc_mode,
    tta,
    max_pixels,
    max_bytes,
    state,
    lock_wait,
    min_age,
    new_only,
    verify,
    anonymize_key_file,
    engine,
    ray_address,
    num_parts,
    part_id,
    log_file,
    log_interval,
    include_hidden,
    max_qc_rate,
    profile,
    quiet,
) -> None:
    """Classify every image under INPUTS (folders and/or files) and write reports.

    Research use only; not for diagnostic use."""
    env: Environment = ctx.obj
    if not inputs and files_from is None:
        raise click.UsageError("give at least one folder or file, or --files-from")
    given = click.core.ParameterSource.COMMANDLINE
    explicit = {name for name in ("min_age", "verify") if ctx.get_parameter_source(name) == given}
    if state is None and (new_only or lock_wait is not None or explicit):
        raise click.UsageError("--new-only, --wait, --min-age and --verify need --state")
    if ray_address and engine != "ray":
        if ctx.get_parameter_source("ray_address") == given:
            raise click.UsageError("--ray-address needs --engine ray")
        ray_address = None  # SMEARSCAN_RAY_ADDRESS is for Ray runs; a local scan ignores it
    if part_id >= num_parts:
        raise click.BadParameter("must be less than --num-parts", param_hint="--part-id")
    _check_device(device)
    anonymize_key = _read_key(anonymize_key_file) if anonymize_key_file else None
    if anonymize_key is not None and len(anonymize_key.strip()) < 16:
        raise click.BadParameter(
            "the key file must hold at least 16 bytes", param_hint="--anonymize-key-file"
        )
    for item in inputs:
        if not item.exists():
            raise click.BadParameter(f"{item} does not exist", param_hint="INPUTS")
    _setup_logging(env, quiet, log_file)
    _hide_names_in_logs(anonymize_key is not None)
    _quiet_opencv()
    if max_pixels:  # before OpenCV loads: it reads its header limit once
        os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(max_pixels)

    from smearscan.discover import read_file_list
    from smearscan.preprocess import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
    from smearscan.runner import ScanOptions, ScanRequest

    request = ScanRequest(
        inputs=list(inputs),
        files=list(read_file_list(files_from, nul_separated)) if files_from is not None else None,
        out=out,
        fmt=fmt,
        summary=summary,
        html=html,
        write_html=not no_html,
        recursive=recursive,
        pattern=pattern,
        case_sensitive_glob=glob_case_sensitive,
        slide_depth=slide_depth,
        options=ScanOptions(
            batch_size=batch_size,
            workers=workers,
            tta=tta,
            decode=decode,
            max_pixels=max_pixels or DEFAULT_MAX_PIXELS,
            max_bytes=max_bytes or DEFAULT_MAX_BYTES,
        ),
        threshold=threshold,
        slide_rule=slide_rule,
        slide_cutoff=slide_cutoff,
        min_cells=min_cells,
        qc_mode=qc_mode,
        state=state,
        lock_wait=lock_wait,
        min_age=min_age,
        new_only=new_only,
        verify=verify,
        anonymize_key=anonymize_key,
        num_parts=num_parts,
        part_id=part_id,
        include_hidden=include_hidden,
        max_qc_rate=max_qc_rate,
    )
    _run_command(
        env,
        "scan",
        quiet,
        log_interval,
        lambda guard, progress: _do_scan(
            request,
            model,
            device,
            threads,
            engine,
            ray_address,
            guard,
            progress,
            env if profile else None,
        ),
    )


def _read_key(path: Path) -> bytes:
    """The anonymisation key: a small regular file (a pipe or a huge file named there, by
    option or SMEARSCAN_ANONYMIZE_KEY_FILE, is refused instead of blocking or filling
    memory)."""
    from smearscan.files import read_regular

    try:
        return read_regular(path, 1 << 20)
    except OSError as exc:
        raise click.BadParameter(f"{path}: {exc}", param_hint="--anonymize-key-file") from None


def _load(model, device: str, threads: int = 1):
    """The classifier, or a usage/failure exit with the reason (before any report)."""
    from smearscan.inference import load_classifier

    classifier = load_classifier(model, device=device, threads=threads)
    level = logging.INFO
    note = classifier.device_note
    if note and device.strip().lower() != "auto":
        level = logging.WARNING
    log.log(
        level,
        "model %s (%s), execution provider %s%s",
        classifier.info.name,
        classifier.info.sha256[:12],
        classifier.provider,
        f" ({note})" if note else "",
    )
    return classifier


def _do_scan(
    request,
    model,
    device,
    threads,
    engine_name,
    ray_address,
    guard,
    progress,
    profile_to: Environment | None = None,
):
    from smearscan.runner import make_engine, plan, run_scan

    request.validate()  # usage errors before the model loads
    classifier = _load(model, device, threads)
    engine, run_plan = None, None
    if engine_name == "ray":

        def lost(reason: str) -> None:
            log.error("%s; no report written (rows already in --state are kept)", reason)
            guard.abort(ExitStatus.ERROR, "failed (cluster lost; no report written)")

        run_plan = plan(request, classifier)
        engine = make_engine("ray", run_plan, classifier, request, ray_address, on_lost=lost)
    progress.total_from(request.found)
    outcome = run_scan(
        request,
        classifier,
        stop=guard.stop,
        stop_status=guard.status,
        on_result=progress.advance,
        engine=engine,
        run_plan=run_plan,
    )
    if profile_to is not None:
        progress.close()
        print(profile_text(outcome.summary.get("profile"), outcome.seconds), file=profile_to.stderr)
    return outcome


def profile_text(profile: dict | None, seconds: float) -> str:
    """The --profile table: busy time per stage over all workers, per file and as a share
    of the workers' time (a stage near 100 % is the bottleneck)."""
    if not profile:
        return "profile: not measured (this engine runs its stages remotely)"
    lines = [
        f"profile: {profile['files']} files in {seconds:.2f} s on "
        f"{profile['workers']} workers ({profile['classified']} classified)",
        f"  {'stage':<11}{'busy s':>9}{'ms/file':>10}{'of workers':>12}",
    ]
    for stage, figures in profile["stages"].items():
        per_file = figures["ms_per_file"]
        lines.append(
            f"  {stage:<11}{figures['seconds']:>9.2f}"
            f"{'-' if per_file is None else f'{per_file:.3f}':>10}"
            f"{100 * figures['share_of_worker_time']:>11.1f}%"
        )
    return "\n".join(lines)


def _run_command(env: Environment, name: str, quiet: bool, log_interval: float, body) -> None:
    """Run a command body under the signal contract and the error contract: every outcome,
    an unexpected exception included, ends with the final line and a documented code."""
    from smearscan.engines import EngineError, EngineMissing
    from smearscan.inference import DeviceError, RuntimeMissing
    from smearscan.modelfile import ModelFileError
    from smearscan.policy import PolicyError
    from smearscan.qc import QCError
    from smearscan.runner import RequestError

    started = time.time()
    progress = _Progress(env, quiet, log_interval)

    def aborted(status: ExitStatus, state: str) -> None:
        progress.close()
        _final_line(env, state, status, progress.done, seconds=time.time() - started)

    def fail(state: str, status: ExitStatus, message: str) -> None:
        progress.close()
        log.error("%s", message)
        _final_line(
            env,
            state,
            status,
            progress.done,
            ok=progress.ok,
            qc=progress.qc,
            errors=progress.errors,
            seconds=time.time() - started,
        )
        sys.exit(status)

    with SignalGuard(env, aborted) as guard, _native_stderr_silenced(env, quiet):
        try:
            from smearscan.state import StateError, StateLocked

            with progress:
                outcome = body(guard, progress)
        except (RequestError, PolicyError, EngineMissing) as exc:
            fail("refused", ExitStatus.USAGE, f"usage error: {exc}")
        except (ModelFileError, DeviceError, RuntimeMissing, QCError, EngineError) as exc:
            fail("failed", ExitStatus.ERROR, str(exc))
        except StateLocked as exc:
            fail("locked", ExitStatus.LOCKED, f"{exc}; exiting (use --wait to queue behind it)")
        except InterruptedError as exc:
            fail("interrupted", guard.status(), f"{exc}; no report written")
        except (StateError, OSError) as exc:
            fail("failed", ExitStatus.ERROR, str(exc))
        except Exception as exc:  # noqa: BLE001  (the final line must come whatever broke)
            log.exception("unexpected error")
            fail("failed", ExitStatus.ERROR, f"unexpected error: {type(exc).__name__}: {exc}")
    if outcome.status == ExitStatus.PENDING:
        log.warning(
            "%d files were still being written (younger than --min-age) and have "
            "'pending' rows; their slides have no call until the next run reads them",
            outcome.pending,
        )
    if outcome.status == ExitStatus.NOTHING_TO_SCAN:
        log.warning("no image file to report (none found); the previous reports are kept")
    # the reports' own word: a signal that came once every file was read (while the page was
    # being written, say) left complete reports, and the final line must not call them partial
    partial = outcome.summary.get("partial") if outcome.summary else guard.stop.is_set()
    state = "partial" if partial else "done"
    _final_line(
        env,
        state,
        outcome.status,
        outcome.files,
        outcome.ok,
        outcome.qc,
        outcome.errors,
        outcome.seconds,
        outcome.pending,
        outcome.reused,
    )
    sys.exit(outcome.status)


class _AboveTheBar(io.TextIOBase):
    """A stream for log lines while the progress bar is live: rich prints them above the
    bar (written straight to the terminal they would land inside the bar's line)."""

    def __init__(self, console) -> None:
        self.console = console

    def write(self, text: str) -> int:
        if text.strip():
            self.console.print(text.rstrip("\n"), markup=False, highlight=False, soft_wrap=True)
        return len(text)


class _Progress:
    """Rich progress bar on a terminal; plain periodic log lines otherwise (cron)."""

    def __init__(self, env: Environment, quiet: bool, interval: float) -> None:
        self.env, self.quiet, self.interval = env, quiet, interval
        self.done = self.ok = self.qc = self.errors = 0
        self.started = self.last = time.time()
        self.bar: Any = None
        self.task: Any = None
        self.redirected: list = []

    def __enter__(self) -> _Progress:
        if self.quiet or not self.env.stderr_isatty:
            return self
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn("scanning"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rate]:.0f} files/s"),
            TimeRemainingColumn(),
            console=Console(file=self.env.stderr),
            transient=False,
        )
        self.bar.start()
        self.task = self.bar.add_task("scan", total=None, rate=0.0)
        self.redirected = [
            (handler, handler.setStream(_AboveTheBar(self.bar.console)))
            for handler in logging.getLogger("smearscan").handlers
            if type(handler) is logging.StreamHandler
        ]
        return self

    def total_from(self, listing: Callable) -> None:
        """Count the files in the background so the bar gets a total (and an ETA) without
        delaying the first results."""
        if self.bar is None:
            return

        def count() -> None:
            total = sum(1 for _ in listing())
            if self.bar is not None:
                self.bar.update(self.task, total=total)

        threading.Thread(target=count, daemon=True).start()

    def advance(self, result) -> None:
        self.done += 1
        if result.status == "ok":
            self.ok += 1
        elif result.status == "qc":
            self.qc += 1
        else:
            self.errors += 1
        now = time.time()
        rate = self.done / max(now - self.started, 1e-9)
        if self.bar is not None:
            self.bar.update(self.task, advance=1, rate=rate)
        elif not self.quiet and now - self.last >= self.interval:
            self.last = now
            log.info(
                "progress: %d files (%d failed QC, %d errors), %.1f files/s",
                self.done,
                self.qc,
                self.errors,
                rate,
            )

    def close(self) -> None:
        if self.bar is not None:
            for handler, stream in self.redirected:
                handler.setStream(stream)
            self.bar.stop()
            self.bar = None

    def __exit__(self, *exc) -> None:
        self.close()


@cli.command()
@click.argument("root", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option(
    "--labels",
    "labels_csv",
    type=click.Path(path_type=Path, dir_okay=False),
    help="CSV with columns path,label (paths relative to ROOT). Default: each "
    "crop's folder name is its label.",
)
@click.option(
    "--out",
    "-o",
    "report_dir",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="Folder for the evaluation and scan reports.",
)
@model_option
@device_option
@threshold_option
@_apply(slide_options)
@qc_option
@click.option("--tta", is_flag=True, help="Average flips and 90° rotations.")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1, max=4096),
    default=None,
    help="Crops per model call [default: 8 on CPU, 128 on CUDA].",
)
@click.option("-q", "--quiet", is_flag=True)
@click.pass_obj
def evaluate(
    env: Environment,
    root,
    labels_csv,
    report_dir,
    model,
    device,
    threshold,
    slide_rule,
    slide_cutoff,
    min_cells,
    qc_mode,
    tta,
    batch_size,
    quiet,
) -> None:
    """Score a model on labelled crops under ROOT (same pipeline as scan).

    Writes a validation record: metrics on the crops that passed quality control, the
    slide calls, plots and the scan's own reports."""
    _check_device(device)
    _setup_logging(env, quiet, None)
    _quiet_opencv()
    from smearscan.runner import ScanOptions, ScanRequest

    request = ScanRequest(
        options=ScanOptions(batch_size=batch_size, tta=tta),
        threshold=threshold,
        slide_rule=slide_rule,
        slide_cutoff=slide_cutoff,
        min_cells=min_cells,
        qc_mode=qc_mode,
    )

    def body(guard: SignalGuard, progress: _Progress):
        from smearscan.evaluate import LabelsError
        from smearscan.evaluate import evaluate as run_evaluation
        from smearscan.runner import RequestError

        classifier = _load(model, device)
        try:
            outcome = run_evaluation(
                root,
                classifier,
                report_dir,
                labels_csv,
                request,
                stop=guard.stop,
                stop_status=guard.status,
                on_result=progress.advance,
            )
        except LabelsError as exc:
            raise RequestError(str(exc)) from None
        if outcome.metrics is not None and outcome.slide_metrics is not None:
            m = outcome.metrics
            click.echo(
                f"{m['n']} cells ({outcome.excluded} excluded by QC or unreadable): "
                f"sensitivity {m['sensitivity']:.4f}, specificity {m['specificity']:.4f}, "
                f"accuracy {m['accuracy']:.4f}, weighted F1 {m['weighted_f1']:.4f}, ROC AUC "
                f"{_number(m['roc_auc'])}, ECE {m['expected_calibration_error']:.4f}"
            )
            slides = outcome.slide_metrics
            if slides.get("note"):
                click.echo(slides["note"])
            else:
                click.echo(
                    f"{len(slides['slides'])} slides: slide-call accuracy "
                    f"{_number(slides['accuracy'])} ({slides['rule']})"
                )
            if outcome.unlabelled:
                click.echo(
                    f"{outcome.unlabelled} classified cells had no label and were not scored"
                )
            click.echo(f"reports in {outcome.report_dir}")
        return outcome.scan

    _run_command(env, "evaluate", quiet, 30.0, body)


def _number(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


@cli.command()
@click.argument(
    "parts", nargs=-1, required=True, type=click.Path(path_type=Path, exists=True, dir_okay=False)
)
@click.option(
    "--out",
    "-o",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="Merged per-image report; its summary JSON and HTML go beside it.",
)
@click.option("--no-html", is_flag=True, help="Skip the HTML report.")
@click.option("-q", "--quiet", is_flag=True)
@click.pass_obj
def merge(env: Environment, parts, out, no_html, quiet) -> None:
    """Merge per-part reports (scan --num-parts N --part-id K) into one report, summary and
    HTML. Every part must come from the same model and decision rule."""
    _setup_logging(env, quiet, None)
    from smearscan.files import remove_dead_temporaries
    from smearscan.merge import MergeError, merge_reports, summary_of

    started = time.time()

    def aborted(status: ExitStatus, state: str) -> None:
        _final_line(env, state, status, seconds=time.time() - started)

    # the scan's signal contract: a first signal lets the merge finish writing its reports
    # (each is written whole or not at all), then exits 128 + the signal; a second exits
    with SignalGuard(env, aborted) as guard:
        try:
            html = None if no_html else out.with_name(out.stem + ".html")
            remove_dead_temporaries([out, summary_of(out), html])  # a killed merge's leftovers
            outcome = merge_reports(list(parts), out, html=not no_html)
        except MergeError as exc:
            log.error("%s", exc)
            _final_line(env, "refused", ExitStatus.USAGE, seconds=time.time() - started)
            sys.exit(ExitStatus.USAGE)
        except OSError as exc:
            log.error("%s", exc)
            _final_line(env, "failed", ExitStatus.ERROR, seconds=time.time() - started)
            sys.exit(ExitStatus.ERROR)
    status = guard.status() if guard.stop.is_set() else outcome.status
    _final_line(
        env,
        "merged",
        status,
        outcome.files,
        outcome.ok,
        outcome.qc,
        outcome.errors,
        outcome.seconds,
    )
    sys.exit(status)


@cli.group()
def model() -> None:
    """Inspect model files."""


@model.command("info")
@model_option
@click.option("--json", "as_json", is_flag=True, help="Print all metadata as JSON.")
@click.pass_obj
def model_info(env: Environment, model, as_json) -> None:
    """What a model file says about itself, explained (labels, preprocessing, decision
    rule, quality-control limits, training data and validation numbers)."""
    from smearscan.inference import RuntimeMissing, load_classifier
    from smearscan.modelfile import ModelFileError, describe

    try:
        classifier = load_classifier(model, device="cpu")
    except (ModelFileError, RuntimeMissing) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(ExitStatus.ERROR)
    info = classifier.info
    if as_json:
        metadata = {}
        for key, value in sorted(info.metadata.items()):
            try:
                metadata[key] = json.loads(value)
            except ValueError:
                metadata[key] = value
        click.echo(
            json.dumps(
                {
                    "path": str(info.path),
                    "sha256": info.sha256,
                    "intended_use": INTENDED_USE_LINE,
                    "metadata": metadata,
                },
                indent=2,
            )
        )
        return
    click.echo(describe(info))


def main(argv: list[str] | None = None, env: Environment | None = None) -> None:
    """Console entry point."""
    cli.main(args=argv, prog_name="smearscan", obj=env or Environment())


if __name__ == "__main__":
    main()
