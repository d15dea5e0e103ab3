"""The run shell every command shares: the injected environment, logging, the signal
contract (:class:`SignalGuard`), the error contract (:func:`run_command`), progress and
the final line (:func:`final_line`), which is always the last line on stderr."""

from __future__ import annotations

import contextlib
import io
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

from smearscan.exitstatus import ExitStatus

log = logging.getLogger("smearscan")


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


def setup_logging(env: Environment, quiet: bool, log_file: Path | None) -> None:
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


def hide_names_in_logs(hide: bool) -> None:
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


def quiet_opencv() -> None:
    """OpenCV's own warnings go straight to stderr and would get through -q; every decode
    problem already becomes an error row with its reason."""
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")


class SignalGuard:
    """One signal contract for every command.

    The first SIGINT, SIGTERM or SIGHUP sets ``stop``: the batches in flight are finished,
    a report marked partial is written, and the exit code is 128 + the signal (130, 143,
    129). A signal while waiting for the state lock, or before the run has a row to report,
    ends it with the same code and no report (the previous one is kept). A second signal
    exits at once (same code), writing nothing more: temporary files it leaves are removed
    by the next run.
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


def final_line(
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


def check_device(device: str) -> None:
    import re

    if not re.match(r"^(auto|cpu|cuda(:\d+)?)$", device.strip().lower()):
        raise click.BadParameter(
            f"{device!r}: use auto, cpu, cuda or cuda:N", param_hint="--device"
        )


def load_model(model, device: str, threads: int = 1):
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


def run_command(env: Environment, name: str, quiet: bool, log_interval: float, body) -> None:
    """Run a command body under the signal contract and the error contract: every outcome,
    an unexpected exception included, ends with the final line and a documented code."""
    from smearscan.engines import EngineError, EngineMissing
    from smearscan.inference import DeviceError, RuntimeMissing
    from smearscan.modelfile import ModelFileError
    from smearscan.policy import PolicyError
    from smearscan.qc import QCError
    from smearscan.runner import RequestError

    started = time.time()
    progress = Progress(env, quiet, log_interval)

    def aborted(status: ExitStatus, state: str) -> None:
        progress.close()
        final_line(env, state, status, progress.done, seconds=time.time() - started)

    def fail(state: str, status: ExitStatus, message: str) -> None:
        progress.close()
        log.error("%s", message)
        final_line(
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
    final_line(
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


class Progress:
    """Rich progress bar on a terminal; plain periodic log lines otherwise (cron)."""

    def __init__(self, env: Environment, quiet: bool, interval: float) -> None:
        self.env, self.quiet, self.interval = env, quiet, interval
        self.done = self.ok = self.qc = self.errors = 0
        self.started = self.last = time.time()
        self.bar: Any = None
        self.task: Any = None
        self.redirected: list = []
        self.counting: threading.Thread | None = None

    def __enter__(self) -> Progress:
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

        self.counting = threading.Thread(target=count, daemon=True)
        self.counting.start()

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

    def kept(self) -> None:
        """A file this run keeps from an earlier one (unchanged) or leaves pending: the bar,
        whose total counts every file found, moves on without a new result."""
        if self.bar is not None:
            self.bar.update(self.task, advance=1)

    def close(self) -> None:
        if self.bar is not None:
            if self.counting is not None:  # a short run may end before its count does
                self.counting.join(timeout=1.0)
            for handler, stream in self.redirected:
                handler.setStream(stream)
            self.bar.stop()
            self.bar = None

    def __exit__(self, *exc) -> None:
        self.close()
