"""Merge per-part reports (``scan --num-parts N --part-id K``) into one report.

For SLURM arrays and labs without a cluster: each part scans a stable 1/N share of the
files, and the merge rebuilds the per-image report, the summary and the HTML exactly as one
run would have decided them. Every part must come from the same model file and decision
rule (checked from the summaries beside the part reports).
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from smearscan.exitstatus import ExitStatus
from smearscan.files import ReportSet
from smearscan.policy import INCOMPLETE, DecisionPolicy
from smearscan.results import (
    STATUS_ERROR,
    STATUS_OK,
    STATUS_QC,
    STATUSES,
    CellResult,
)
from smearscan.sinks.html import write_html
from smearscan.sinks.rows import CSV_FORMULA_STARTS, RowWriter, write_labelled
from smearscan.sinks.summary import SummaryBuilder, write_json

log = logging.getLogger(__name__)


class MergeError(ValueError):
    """Parts that cannot be merged (another model or rule, overlapping files, ...)."""


@dataclass
class MergeOutcome:
    files: int
    ok: int
    qc: int
    errors: int
    seconds: float
    status: ExitStatus


def _unneutralize(value: str) -> str:
    if len(value) > 1 and value[0] == "'" and value[1] in CSV_FORMULA_STARTS:
        return value[1:]
    return value


def summary_of(report: Path) -> Path:
    return report.with_name(report.stem + ".summary.json")


def _probability(report: Path, line: int, row: dict, label: str) -> float:
    """A row's ``p_<label>``, refused unless it is a probability (a hand-edited or damaged
    part must not slip numbers like ``abc``, ``nan`` or ``5`` into the merged report)."""
    value = row.get(f"p_{label}")
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise MergeError(f"{report}, row {line}: p_{label} {value!r} is not a number") from None
    if not 0.0 <= number <= 1.0:  # also refuses NaN
        raise MergeError(f"{report}, row {line}: p_{label} {value!r} is not a probability")
    return number


def read_rows(report: Path, labels: list[str]) -> list[CellResult]:
    """Rows of a part report (CSV or JSONL) back into results, without their labels."""
    results = []
    try:
        with open(report, newline="", encoding="utf-8") as handle:
            if report.suffix.lower() in (".jsonl", ".ndjson"):
                rows = [json.loads(line) for line in handle if line.strip()]
            else:
                rows = [
                    {k: _unneutralize(v) if isinstance(v, str) else v for k, v in row.items()}
                    for row in csv.DictReader(handle)
                ]
    except (UnicodeDecodeError, ValueError, csv.Error) as exc:
        raise MergeError(f"{report}: not a smearscan report ({exc})") from None
    for line, row in enumerate(rows, start=2):
        if not isinstance(row, dict) or row.get("status") not in STATUSES:
            raise MergeError(f"{report}, row {line}: unknown status {row.get('status')!r}")
        if not isinstance(row.get("path"), str) or not isinstance(row.get("slide"), str):
            raise MergeError(f"{report}, row {line}: no path or slide")
        probabilities = []
        if row["status"] == STATUS_OK:
            probabilities = [_probability(report, line, row, label) for label in labels]
        results.append(
            CellResult(
                row["path"], row["slide"], row["status"], row.get("reason") or "", probabilities
            )
        )
    return results


def check_parts(parts: list[Path], summaries: list[dict]) -> None:
    """Refuse parts that do not make one run: a part missing or given twice, parts of other
    splits, other model, rule, QC, TTA or anonymisation (the merged report would silently
    lose files or mix decisions)."""
    first = summaries[0]
    for part, summary in zip(parts, summaries, strict=True):
        for key in ("model", "decision", "overall", "slides"):
            if key not in summary:
                raise MergeError(f"{part}: its summary has no {key!r}: not a smearscan summary")
    for part, summary in zip(parts[1:], summaries[1:], strict=True):
        if summary["model"].get("sha256") != first["model"].get("sha256"):
            raise MergeError(f"{part} was scanned with another model than {parts[0]}")
        if summary["decision"] != first["decision"]:
            raise MergeError(f"{part} was decided by another rule than {parts[0]}")
        for key, what in (
            ("quality_control", "quality control"),
            ("tta", "test-time views"),
            ("anonymized_paths", "anonymisation"),
        ):
            if summary.get(key) != first.get(key):
                raise MergeError(f"{part} used other {what} than {parts[0]}")
    given = [summary.get("part") for summary in summaries]
    if all(split is None for split in given):
        return  # whole reports of disjoint folders: nothing to count
    splits = [split for split in given if isinstance(split, dict)]
    if len(splits) != len(given):
        raise MergeError("some inputs are parts of a --num-parts run and some are not")
    totals = {split["num_parts"] for split in splits}
    if len(totals) > 1:
        raise MergeError(f"the parts come from different splits (--num-parts {sorted(totals)})")
    total = totals.pop()
    ids = [split["part_id"] for split in splits]
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        raise MergeError(f"part(s) {twice} given twice")
    missing = sorted(set(range(total)) - set(ids))
    if missing:
        raise MergeError(
            f"part(s) {missing} of {total} missing: the merged report would lack their files"
        )


#: Parts started further apart than this may have seen different files (a share still
#: being written): the merged summary says so.
PARTS_APART_SECONDS = 600


def _started_apart(summaries: list[dict]) -> float | None:
    """Seconds between the first and the last part's start, when they are far apart."""
    from datetime import datetime

    try:
        times = [datetime.fromisoformat(s["started"]).timestamp() for s in summaries]
    except (KeyError, TypeError, ValueError):
        return None
    spread = max(times) - min(times)
    if spread > PARTS_APART_SECONDS:
        log.warning(
            "the parts started %.0f minutes apart: files added or changed in between "
            "may be in some parts and not others (see the summary's 'parts')",
            spread / 60,
        )
        return round(spread, 1)
    return None


def merge_reports(parts: list[Path], out: Path, html: bool = True) -> MergeOutcome:
    """Merge ``parts`` into ``out`` (and its summary and, with ``html``, its HTML page).
    The merged HTML has no thumbnails: part reports carry no paths on disk."""
    started = time.time()
    summaries = []
    for part in parts:
        path = summary_of(part)
        try:
            summaries.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            raise MergeError(f"{part}: its summary {path} cannot be read ({exc})") from None
    first = summaries[0]
    check_parts(parts, summaries)
    resolved = {p.resolve() for p in parts} | {summary_of(p).resolve() for p in parts}
    for target in (out, summary_of(out), out.with_name(out.stem + ".html")):
        if target.resolve() in resolved:
            raise MergeError(f"--out {out} would overwrite the input {target}")
    if out.suffix.lower() not in ("", ".csv", ".txt", ".jsonl", ".ndjson"):
        raise MergeError(f"--out {out}: the merged report is CSV or JSONL")
    decision = first["decision"]
    try:
        policy = DecisionPolicy.from_summary(decision)
    except (KeyError, TypeError, ValueError) as exc:
        raise MergeError(f"{parts[0]}: its summary's decision rule is unusable ({exc!r})") from None
    labels = list(policy.labels)
    results: list[CellResult] = []
    seen: dict[str, Path] = {}
    seen_by_part = []
    for part, summary in zip(parts, summaries, strict=True):
        rows = read_rows(part, labels)
        expected = summary["overall"].get("files")
        if expected != len(rows):
            raise MergeError(
                f"{part} has {len(rows)} rows but its summary counts {expected} "
                "files: cut short or edited"
            )
        for result in rows:
            if result.path in seen:
                raise MergeError(
                    f"{result.path} is in both {seen[result.path]} and {part}: the parts overlap"
                )
            seen[result.path] = part
            results.append(result)
        seen_by_part.append(
            {
                "report": str(part),
                "part": summary.get("part"),
                "started": summary.get("started"),
                "files": len(rows),
            }
        )
    results.sort(key=lambda r: r.path)
    builder = SummaryBuilder(policy)
    counts = dict.fromkeys(STATUSES, 0)
    fmt = "jsonl" if out.suffix.lower() in (".jsonl", ".ndjson") else "csv"
    with ReportSet() as reports:  # report, summary and page: all or none
        with reports.write(out) as handle:
            writer = RowWriter(handle, labels, fmt, policy.cell_rule_short())
            write_labelled(writer, results, policy, builder, counts)
        partial = any(s.get("partial") for s in summaries)
        # a slide a partial part left half-read stays incomplete: its other files were never read
        unfinished = {
            name
            for s in summaries
            if s.get("partial")
            for name, slide in s["slides"].items()
            if slide.get("call") == INCOMPLETE
        }
        details = {
            key: first[key]
            for key in (
                "smearscan_version",
                "model",
                "execution_provider",
                "versions",
                "quality_control",
                "tta",
                "skipped",  # every part walks the whole input, so each counts the same
            )
            if key in first
        }
        details.update(
            partial=partial,
            device_note="",
            seconds=round(sum(s.get("seconds", 0) for s in summaries), 3),
            files_per_second=None,
            started=min(s.get("started", "") for s in summaries),
            merged_from=[str(p) for p in parts],
            parts=seen_by_part,
            parts_started_apart=_started_apart(summaries),
            anonymized_paths=bool(first.get("anonymized_paths")),
            engine={"engine": "merged parts", "parts": len(parts)},
        )
        summary = builder.to_dict(details, unfinished)
        write_json(summary_of(out), summary, reports)
        if html:
            from smearscan.preprocess import Recipe

            write_html(
                out.with_name(out.stem + ".html"),
                summary,
                builder,
                Recipe(),
                first.get("quality_control", ""),
                reports=reports,
            )
    status = ExitStatus.for_report(counts, ExitStatus.INTERRUPTED_INT if partial else None)
    return MergeOutcome(
        sum(counts.values()),
        counts[STATUS_OK],
        counts[STATUS_QC],
        counts[STATUS_ERROR],
        time.time() - started,
        status,
    )
