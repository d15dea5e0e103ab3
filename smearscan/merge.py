"""Merge per-part reports (``scan --num-parts N --part-id K``) into one report.

For SLURM arrays and labs without a cluster: each part scans a stable 1/N share of the
files, and the merge rebuilds the per-image report, the summary and the HTML exactly as one
run would have decided them. Every part must come from the same model file and decision
rule (checked from the summaries beside the part reports).
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path

from smearscan.exitstatus import ExitStatus
from smearscan.files import atomic_write
from smearscan.policy import DecisionPolicy
from smearscan.results import (
    STATUS_ERROR,
    STATUS_OK,
    STATUS_PENDING,
    STATUS_QC,
    STATUSES,
    CellResult,
)
from smearscan.sinks.html import write_html
from smearscan.sinks.rows import CSV_FORMULA_STARTS, RowWriter
from smearscan.sinks.summary import SummaryBuilder, write_json


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


def read_rows(report: Path, labels: list[str]) -> list[CellResult]:
    """Rows of a part report (CSV or JSONL) back into results, without their labels."""
    results = []
    with open(report, newline="", encoding="utf-8") as handle:
        if report.suffix.lower() in (".jsonl", ".ndjson"):
            rows = [json.loads(line) for line in handle if line.strip()]
        else:
            rows = [{k: _unneutralize(v) if isinstance(v, str) else v for k, v in row.items()}
                    for row in csv.DictReader(handle)]  # fmt: skip
    for row in rows:
        if row.get("status") not in STATUSES:
            raise MergeError(f"{report}: unknown status {row.get('status')!r}")
        probabilities = []
        if row["status"] == STATUS_OK:
            probabilities = [float(row[f"p_{label}"]) for label in labels]
        results.append(CellResult(row["path"], row["slide"], row["status"],
                                  row.get("reason") or "", probabilities))  # fmt: skip
    return results


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
    for part, summary in zip(parts[1:], summaries[1:], strict=True):
        if summary["model"]["sha256"] != first["model"]["sha256"]:
            raise MergeError(f"{part} was scanned with another model than {parts[0]}")
        if summary["decision"] != first["decision"]:
            raise MergeError(f"{part} was decided by another rule than {parts[0]}")
        if summary.get("quality_control") != first.get("quality_control"):
            raise MergeError(f"{part} used other quality control than {parts[0]}")
    decision = first["decision"]
    policy = DecisionPolicy(
        tuple(decision["labels"]), decision["positive_class"], decision["threshold"],
        decision["slide_rule"] or "fraction", decision["slide_cutoff"] or 0.5,
        decision["min_cells"] or 1,
    )  # fmt: skip
    labels = list(policy.labels)
    results: list[CellResult] = []
    seen: dict[str, Path] = {}
    for part in parts:
        for result in read_rows(part, labels):
            if result.path in seen:
                raise MergeError(f"{result.path} is in both {seen[result.path]} and {part}: "
                                 "the parts overlap")  # fmt: skip
            seen[result.path] = part
            results.append(result)
    results.sort(key=lambda r: r.path)
    builder = SummaryBuilder(policy)
    counts = dict.fromkeys(STATUSES, 0)
    fmt = "jsonl" if out.suffix.lower() in (".jsonl", ".ndjson") else "csv"
    with atomic_write(out) as handle:
        writer = RowWriter(handle, labels, fmt, policy.cell_rule_short())
        for result in results:
            if result.status == STATUS_OK:
                result.label = policy.cell_label(result.probabilities)
            writer.write(result)
            builder.add(result)
            counts[result.status] += 1
    partial = any(s.get("partial") for s in summaries)
    details = {key: first[key] for key in ("smearscan_version", "model", "execution_provider",
                                           "versions", "quality_control", "tta")
               if key in first}  # fmt: skip
    details.update(
        partial=partial,
        device_note="",
        seconds=round(sum(s.get("seconds", 0) for s in summaries), 3),
        files_per_second=None,
        started=min(s.get("started", "") for s in summaries),
        merged_from=[str(p) for p in parts],
        engine={"engine": "merged parts", "parts": len(parts)},
    )
    summary = builder.to_dict(details)
    write_json(summary_of(out), summary)
    if html:
        from smearscan.preprocess import Recipe

        write_html(out.with_name(out.stem + ".html"), summary, builder, Recipe(),
                   first.get("quality_control", ""))  # fmt: skip
    status = ExitStatus.SUCCESS
    if partial:
        status = ExitStatus.INTERRUPTED_INT
    elif counts[STATUS_PENDING]:
        status = ExitStatus.PENDING
    elif counts[STATUS_QC] or counts[STATUS_ERROR]:
        status = ExitStatus.SOME_UNUSABLE
    return MergeOutcome(sum(counts.values()), counts[STATUS_OK], counts[STATUS_QC],
                        counts[STATUS_ERROR], time.time() - started, status)  # fmt: skip
