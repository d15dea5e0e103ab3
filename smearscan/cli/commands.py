"""The commands: ``scan``, ``evaluate``, ``merge`` and ``model info``, each a thin layer
that turns options into a request for the library and runs it in the shell."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import click

from smearscan import __version__
from smearscan.cli.options import (
    apply_options,
    device_option,
    model_option,
    qc_option,
    setting_option,
    slide_options,
    threshold_option,
)
from smearscan.cli.shell import (
    Environment,
    Progress,
    SignalGuard,
    check_device,
    final_line,
    hide_names_in_logs,
    load_model,
    profile_text,
    quiet_opencv,
    run_command,
    setup_logging,
)
from smearscan.exitstatus import ExitStatus
from smearscan.limits import (
    CPU_BATCH_SIZE,
    CUDA_BATCH_SIZE,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    RAY_BATCH_SIZE,
)

log = logging.getLogger("smearscan")
INTENDED_USE_LINE = "Research use only; not for diagnostic use."
#: ``--wait`` without a value: how long a run waits for another run's state lock.
LOCK_WAIT_SECONDS = 3600.0


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
@setting_option(
    "--workers",
    type=click.IntRange(min=0),
    default=0,
    help="Worker threads, each decoding a batch and running the model on it (0 = one per core).",
)
@setting_option(
    "--threads",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="onnxruntime threads per inference; the workers already fill the cores.",
)
@setting_option(
    "--decode",
    type=click.Choice(["auto", "threads", "processes"]),
    default="auto",
    show_default=True,
    help="Run decoding, QC and preprocessing in the workers' threads or in worker processes "
    "(auto: processes on CUDA, where threads cannot keep the GPU busy; threads on CPU).",
)
@setting_option(
    "--batch-size",
    type=click.IntRange(min=1, max=4096),
    default=None,
    help=f"Crops per model call [default: {CPU_BATCH_SIZE} on CPU, where small batches stay "
    f"in cache; {CUDA_BATCH_SIZE} on CUDA; {RAY_BATCH_SIZE} with --engine ray].",
)
@threshold_option
@apply_options(slide_options)
@qc_option
@click.option("--tta", is_flag=True, help="Average flips and 90° rotations (8x slower).")
@setting_option(
    "--max-pixels",
    type=click.IntRange(min=64),
    help="Refuse images larger than this many pixels, from the header "
    f"[default: {DEFAULT_MAX_PIXELS:,}].",
)
@setting_option(
    "--max-bytes",
    type=click.IntRange(min=1),
    help="Refuse files larger than this many bytes, before reading "
    f"[default: {DEFAULT_MAX_BYTES:,}].",
)
@setting_option(
    "--state",
    type=click.Path(path_type=Path, dir_okay=False),
    help="SQLite state on local disk: rescan only new or changed files; locks the run.",
)
@click.option(
    "--wait",
    "lock_wait",
    type=click.FloatRange(min=0),
    is_flag=False,
    flag_value=LOCK_WAIT_SECONDS,
    help=f"If another run holds the state lock, wait up to SECONDS (default {LOCK_WAIT_SECONDS:g}) "
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
@setting_option(
    "--anonymize-key-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Replace folder and file names in reports by a keyed hash (HMAC-SHA256 with "
    "this file's contents), stable across runs.",
)
@setting_option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="Where the work runs: threads here, or a Ray cluster (pip install 'smearscan[ray]').",
)
@setting_option(
    "--ray-address",
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
@setting_option("--log-file", type=click.Path(path_type=Path, dir_okay=False))
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
@setting_option(
    "--max-qc-rate",
    type=click.FloatRange(0, 1),
    default=None,
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
    check_device(device)
    anonymize_key = _read_key(anonymize_key_file) if anonymize_key_file else None
    if anonymize_key is not None and len(anonymize_key.strip()) < 16:
        raise click.BadParameter(
            "the key file must hold at least 16 bytes", param_hint="--anonymize-key-file"
        )
    for item in inputs:
        if not item.exists():
            raise click.BadParameter(f"{item} does not exist", param_hint="INPUTS")
    setup_logging(env, quiet, log_file)
    hide_names_in_logs(anonymize_key is not None)
    quiet_opencv()
    if max_pixels:  # before OpenCV loads: it reads its header limit once
        os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(max_pixels)

    from smearscan.discover import read_file_list
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
    run_command(
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
    classifier = load_model(model, device, threads)
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
        on_kept=progress.kept,
        engine=engine,
        run_plan=run_plan,
    )
    if profile_to is not None:
        progress.close()
        print(profile_text(outcome.summary.get("profile"), outcome.seconds), file=profile_to.stderr)
    return outcome


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
@apply_options(slide_options)
@qc_option
@click.option("--tta", is_flag=True, help="Average flips and 90° rotations.")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1, max=4096),
    default=None,
    help=f"Crops per model call [default: {CPU_BATCH_SIZE} on CPU, {CUDA_BATCH_SIZE} on CUDA].",
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
    check_device(device)
    setup_logging(env, quiet, None)
    quiet_opencv()
    from smearscan.runner import ScanOptions, ScanRequest

    request = ScanRequest(
        options=ScanOptions(batch_size=batch_size, tta=tta),
        threshold=threshold,
        slide_rule=slide_rule,
        slide_cutoff=slide_cutoff,
        min_cells=min_cells,
        qc_mode=qc_mode,
    )

    def body(guard: SignalGuard, progress: Progress):
        from smearscan.evaluate import LabelsError
        from smearscan.evaluate import evaluate as run_evaluation
        from smearscan.runner import RequestError

        classifier = load_model(model, device)
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

    run_command(env, "evaluate", quiet, 30.0, body)


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
    setup_logging(env, quiet, None)
    from smearscan.files import remove_dead_temporaries
    from smearscan.merge import MergeError, merge_reports, summary_of

    started = time.time()

    def aborted(status: ExitStatus, state: str) -> None:
        final_line(env, state, status, seconds=time.time() - started)

    # the scan's signal contract: a first signal lets the merge finish writing its reports
    # (each is written whole or not at all), then exits 128 + the signal; a second exits
    with SignalGuard(env, aborted) as guard:
        try:
            html = None if no_html else out.with_name(out.stem + ".html")
            remove_dead_temporaries([out, summary_of(out), html])  # a killed merge's leftovers
            outcome = merge_reports(list(parts), out, html=not no_html)
        except MergeError as exc:
            log.error("%s", exc)
            final_line(env, "refused", ExitStatus.USAGE, seconds=time.time() - started)
            sys.exit(ExitStatus.USAGE)
        except OSError as exc:
            log.error("%s", exc)
            final_line(env, "failed", ExitStatus.ERROR, seconds=time.time() - started)
            sys.exit(ExitStatus.ERROR)
    status = guard.status() if guard.stop.is_set() else outcome.status
    final_line(
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
