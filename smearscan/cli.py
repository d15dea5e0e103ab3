"""Command line: a thin click layer over the smearscan library.

Heavy modules (numpy, OpenCV, onnxruntime) are imported inside commands so that
``smearscan --help`` stays fast.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import click

from smearscan import __version__
from smearscan.exitstatus import ExitStatus

log = logging.getLogger("smearscan")


@dataclass
class Environment:
    """The process surroundings, injectable for tests (after httpie)."""

    stdin: TextIO = field(default_factory=lambda: sys.stdin)
    stderr: TextIO = field(default_factory=lambda: sys.stderr)
    stderr_isatty: bool = field(default_factory=lambda: sys.stderr.isatty())


def _setup_logging(env: Environment, quiet: bool, log_file: Path | None) -> None:
    root = logging.getLogger("smearscan")
    root.handlers.clear()
    root.setLevel(logging.INFO)
    root.propagate = False
    handler = logging.StreamHandler(env.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.setLevel(logging.ERROR if quiet else logging.INFO)
    root.addHandler(handler)
    if log_file:
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        root.addHandler(file_handler)


model_option = click.option(
    "--model",
    "-m",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="SMEARSCAN_MODEL",
    help="ONNX model [default: the embedded model].",
)
device_option = click.option(
    "--device",
    default="auto",
    envvar="SMEARSCAN_DEVICE",
    show_default=True,
    help="auto, cpu, cuda or cuda:N.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="smearscan")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Screen white-cell crops for acute lymphoblastic leukemia (a screening aid, not a
    diagnosis)."""
    ctx.ensure_object(Environment)


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
    "--format", "fmt", type=click.Choice(["csv", "jsonl"]), default="csv", show_default=True
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
    type=click.File("r", encoding="utf-8"),
    help="Read file paths, one per line, from FILE ('-' for stdin).",
)
@click.option("--glob", "pattern", help="Only files whose name or relative path matches.")
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
    help="Worker threads, each decoding a batch and running the model on it (0 = one per core).",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=1,
    envvar="SMEARSCAN_THREADS",
    show_default=True,
    help="onnxruntime threads per inference; the workers already fill the cores.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=32,
    envvar="SMEARSCAN_BATCH_SIZE",
    show_default=True,
)
@click.option(
    "--threshold",
    type=click.FloatRange(0, 1),
    help="P(positive class) cut-off [default: the model's operating point].",
)
@click.option(
    "--slide-threshold",
    type=click.FloatRange(0, 1),
    default=0.5,
    show_default=True,
    help="Fraction of positive cells that flags a slide.",
)
@click.option("--tta", is_flag=True, help="Average flips and 90° rotations (8x slower).")
@click.option(
    "--max-pixels",
    type=click.IntRange(min=64),
    envvar="SMEARSCAN_MAX_PIXELS",
    help="Refuse images larger than this many pixels.",
)
@click.option(
    "--state",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="SMEARSCAN_STATE",
    help="SQLite state on local disk: rescan only new or changed files; locks the run.",
)
@click.option(
    "--wait",
    "lock_wait",
    type=float,
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
    help="With --state: leave files modified less than this many seconds ago for "
    "the next run (a scanner may still be writing them).",
)
@click.option(
    "--new-only", is_flag=True, help="With --state: report only this run's new or changed files."
)
@click.option(
    "--anonymize-key-file",
    type=click.File("rb"),
    envvar="SMEARSCAN_ANONYMIZE_KEY_FILE",
    help="Replace folder and file names in reports by a keyed hash (HMAC-SHA256 with "
    "this file's contents), stable across runs.",
)
@click.option(
    "--log-file", type=click.Path(path_type=Path, dir_okay=False), envvar="SMEARSCAN_LOG_FILE"
)
@click.option(
    "--log-interval",
    type=float,
    default=30.0,
    show_default=True,
    help="Seconds between progress lines when stderr is not a terminal.",
)
@click.option("-q", "--quiet", is_flag=True, help="Errors and the final line only.")
@click.pass_obj
def scan(env: Environment, inputs, out, fmt, summary, html, no_html, files_from, pattern,
         recursive, slide_depth, model, device, workers, threads, batch_size, threshold,
         slide_threshold, tta, max_pixels, state, lock_wait, min_age, new_only,
         anonymize_key_file, log_file, log_interval, quiet) -> None:  # fmt: skip
    """Classify every image under INPUTS (folders and/or files) and write reports."""
    if not inputs and files_from is None:
        raise click.UsageError("give at least one folder or file, or --files-from")
    if (new_only or lock_wait is not None) and state is None:
        raise click.UsageError("--new-only and --wait need --state")
    anonymize_key = anonymize_key_file.read() if anonymize_key_file else None
    if anonymize_key is not None and len(anonymize_key.strip()) < 16:
        raise click.BadParameter("the key file must hold at least 16 bytes",
                                 param_hint="--anonymize-key-file")  # fmt: skip
    for item in inputs:
        if not item.exists():
            raise click.BadParameter(f"{item} does not exist", param_hint="INPUTS")
    _setup_logging(env, quiet, log_file)

    from smearscan.discover import read_file_list
    from smearscan.inference import DeviceError, load_classifier
    from smearscan.modelfile import ModelFileError
    from smearscan.preprocess import DEFAULT_MAX_PIXELS
    from smearscan.runner import ScanRequest, run_scan
    from smearscan.scan import ScanOptions

    options = ScanOptions(batch_size=batch_size, workers=workers, threshold=threshold, tta=tta,
                          max_pixels=max_pixels or DEFAULT_MAX_PIXELS)  # fmt: skip
    request = ScanRequest(
        inputs=list(inputs),
        files=list(read_file_list(files_from)) if files_from is not None else None,
        out=out, fmt=fmt, summary=summary, html=html, write_html=not no_html,
        recursive=recursive, pattern=pattern, slide_depth=slide_depth,
        slide_threshold=slide_threshold, options=options, state=state, lock_wait=lock_wait,
        min_age=min_age, new_only=new_only, anonymize_key=anonymize_key,
    )  # fmt: skip
    try:
        classifier = load_classifier(model, device=device, threads=threads)
    except (ModelFileError, DeviceError) as exc:
        log.error("%s", exc)
        _final_line(env, "failed", status=ExitStatus.ERROR)
        sys.exit(ExitStatus.ERROR)
    if classifier.device_note:
        log.warning("%s", classifier.device_note)
    log.info("model %s (%s), execution provider %s", classifier.info.name,
             classifier.info.sha256[:12], classifier.provider)  # fmt: skip

    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum, _frame) -> None:
        received.append(signum)
        stop.set()
        log.warning("signal %d: finishing the batches in flight, then writing a partial report",
                    signum)  # fmt: skip

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def stop_status() -> ExitStatus:
        if received and received[0] == signal.SIGTERM:
            return ExitStatus.INTERRUPTED_TERM
        return ExitStatus.INTERRUPTED_INT

    from smearscan.state import StateError, StateLocked

    progress = _Progress(env, quiet, log_interval, request)
    try:
        with progress:
            outcome = run_scan(request, classifier, stop=stop, stop_status=stop_status,
                               on_result=progress.advance)  # fmt: skip
    except StateLocked as exc:
        log.error("%s; exiting (use --wait to queue behind it)", exc)
        _final_line(env, "locked", status=ExitStatus.LOCKED)
        sys.exit(ExitStatus.LOCKED)
    except (StateError, OSError) as exc:
        log.error("%s", exc)
        _final_line(env, "failed", status=ExitStatus.ERROR)
        sys.exit(ExitStatus.ERROR)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    _final_line(env, "partial" if stop.is_set() else "done", outcome.files, outcome.ok,
                outcome.errors, outcome.seconds, outcome.status, outcome.pending,
                outcome.reused)  # fmt: skip
    sys.exit(outcome.status)


def _final_line(env: Environment, state: str, files: int = 0, ok: int = 0, errors: int = 0,
                seconds: float = 0.0, status: ExitStatus = ExitStatus.SUCCESS, pending: int = 0,
                reused: int = 0) -> None:  # fmt: skip
    """One line for cron mail, printed even with --quiet."""
    line = (
        f"smearscan {state}: {files} files, {ok} ok, {errors} errors, {pending} pending, "
        f"{reused} unchanged in {seconds:.1f} s; exit {int(status)} ({status.name.lower()})"
    )
    print(line, file=env.stderr)
    record = log.makeRecord(log.name, logging.INFO, __file__, 0, line, None, None)
    for handler in log.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.emit(record)


class _Progress:
    """Rich progress bar on a terminal; plain periodic log lines otherwise (cron)."""

    def __init__(self, env: Environment, quiet: bool, interval: float, request) -> None:
        self.env, self.quiet, self.interval, self.request = env, quiet, interval, request
        self.done = self.errors = 0
        self.started = self.last = time.time()
        self.bar = None

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
            TextColumn("scanning"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
            TextColumn("{task.fields[rate]:.0f} files/s"), TimeRemainingColumn(),
            console=Console(file=self.env.stderr), transient=False,
        )  # fmt: skip
        self.bar.start()
        self.task = self.bar.add_task("scan", total=None, rate=0.0)
        # count in the background so the bar gets a total (and an ETA) without delaying
        # the first results
        threading.Thread(target=self._count, daemon=True).start()
        return self

    def _count(self) -> None:
        total = sum(1 for _ in self.request.found())
        if self.bar is not None:
            self.bar.update(self.task, total=total)

    def advance(self, result) -> None:
        self.done += 1
        self.errors += 0 if result.ok else 1
        now = time.time()
        rate = self.done / max(now - self.started, 1e-9)
        if self.bar is not None:
            self.bar.update(self.task, advance=1, rate=rate)
        elif not self.quiet and now - self.last >= self.interval:
            self.last = now
            log.info("progress: %d files (%d errors), %.1f files/s", self.done, self.errors, rate)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


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
@click.option(
    "--threshold",
    type=click.FloatRange(0, 1),
    help="P(positive class) cut-off [default: the model's operating point].",
)
@click.option("--slide-threshold", type=click.FloatRange(0, 1), default=0.5, show_default=True)
@click.option("--tta", is_flag=True, help="Average flips and 90° rotations.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("-q", "--quiet", is_flag=True)
@click.pass_obj
def evaluate(env: Environment, root, labels_csv, report_dir, model, device, threshold,
             slide_threshold, tta, batch_size, quiet) -> None:  # fmt: skip
    """Score a model on labelled crops under ROOT (same pipeline as scan)."""
    _setup_logging(env, quiet, None)
    from smearscan.evaluate import LabelsError
    from smearscan.evaluate import evaluate as run_evaluation
    from smearscan.inference import DeviceError, load_classifier
    from smearscan.modelfile import ModelFileError
    from smearscan.runner import ScanRequest
    from smearscan.scan import ScanOptions

    try:
        classifier = load_classifier(model, device=device)
        request = ScanRequest(
            slide_threshold=slide_threshold,
            options=ScanOptions(batch_size=batch_size, threshold=threshold, tta=tta),
        )
        outcome = run_evaluation(root, classifier, report_dir, labels_csv, request)
    except LabelsError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(ExitStatus.USAGE)
    except (ModelFileError, DeviceError, OSError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(ExitStatus.ERROR)
    m = outcome.metrics
    click.echo(
        f"{m['n']} cells: sensitivity {m['sensitivity']:.4f}, specificity "
        f"{m['specificity']:.4f}, accuracy {m['accuracy']:.4f}, weighted F1 "
        f"{m['weighted_f1']:.4f}, ROC AUC {m['roc_auc']:.4f}, ECE "
        f"{m['expected_calibration_error']:.4f}"
    )
    click.echo(
        f"{len(outcome.slide_metrics['slides'])} slides: slide-call accuracy "
        f"{outcome.slide_metrics['accuracy']:.4f} ({outcome.slide_metrics['rule']})"
    )
    if outcome.unlabelled:
        click.echo(f"{outcome.unlabelled} classified cells had no label and were not scored")
    click.echo(f"reports in {outcome.report_dir}")


@cli.group()
def model() -> None:
    """Inspect model files."""


@model.command("info")
@model_option
@click.option("--json", "as_json", is_flag=True, help="Print all metadata as JSON.")
@click.pass_obj
def model_info(env: Environment, model, as_json) -> None:
    """Print a model's self-description (labels, preprocessing, training data, metrics)."""
    from smearscan.inference import load_classifier
    from smearscan.modelfile import ModelFileError

    try:
        classifier = load_classifier(model, device="cpu")
    except ModelFileError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(ExitStatus.ERROR)
    info = classifier.info
    metadata = {}
    for key, value in sorted(info.metadata.items()):
        try:
            metadata[key] = json.loads(value)
        except ValueError:
            metadata[key] = value
    if as_json:
        click.echo(json.dumps({"path": str(info.path), "sha256": info.sha256,
                               "metadata": metadata}, indent=2))  # fmt: skip
        return
    click.echo(f"model:            {info.path}")
    click.echo(f"sha256:           {info.sha256}")
    click.echo(f"labels:           {', '.join(info.labels)} (positive: {info.positive_class})")
    click.echo(f"input:            {info.recipe.input_size}x{info.recipe.input_size} RGB")
    click.echo(f"preprocess:       {info.recipe.to_json()}")
    for key in sorted(metadata):
        if key.startswith("smearscan.") and key not in ("smearscan.labels",
                                                        "smearscan.preprocessing"):  # fmt: skip
            value = metadata[key]
            text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
            click.echo(f"{key.removeprefix('smearscan.') + ':':<18}{text}")


def main(argv: list[str] | None = None, env: Environment | None = None) -> None:
    """Console entry point."""
    cli.main(args=argv, prog_name="smearscan", obj=env or Environment())


if __name__ == "__main__":
    main()
