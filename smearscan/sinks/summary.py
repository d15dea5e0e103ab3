"""Per-slide and overall statistics in bounded memory, and the summary JSON.

The slide call comes from the run's :class:`~smearscan.policy.DecisionPolicy` and counts
only usable cells (classified, passed QC). Builders merge, so per-part or per-node
statistics add up to the same summary as one pass.
"""

from __future__ import annotations

import heapq
import json
import math
import os
import platform
from dataclasses import dataclass, field

from smearscan import __version__
from smearscan.files import ReportSet, atomic_write
from smearscan.modelfile import INTENDED_USE, default_model_path
from smearscan.policy import INCOMPLETE, DecisionPolicy
from smearscan.results import STATUS_OK, STATUS_PENDING, STATUS_QC, CellResult

HISTOGRAM_BINS = 20
THUMBNAILS_PER_SLIDE = 6
#: Problem files listed by name in the summary and HTML (all are in the per-image report).
LISTED_PROBLEMS = 200
QC_EXAMPLES_PER_REASON = 8
#: Lossy file types. Compression is a shift: the default model lost 0.094 of weighted F1 and
#: a quarter of its sensitivity on crops saved as JPEG at quality 75 (its shift suite), so a
#: run counts them and says so.
LOSSY_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif")


def is_lossy(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in LOSSY_SUFFIXES


@dataclass
class SlideStats:
    cells: int = 0  # usable: classified and passed QC
    qc: int = 0
    errors: int = 0
    pending: int = 0  # not read yet (--state, younger than --min-age)
    counts: dict[str, int] = field(default_factory=dict)
    probability_sums: list[float] = field(default_factory=list)
    positives: int = 0
    positive_sum: float = 0.0
    suspicious: list[tuple[float, str, str]] = field(default_factory=list)  # min-heap

    def add(self, result: CellResult, positive: str | None, positive_index: int | None) -> None:
        if result.status == STATUS_QC:
            self.qc += 1
            return
        if result.status == STATUS_PENDING:
            self.pending += 1
            return
        if result.status != STATUS_OK:
            self.errors += 1
            return
        self.cells += 1
        self.counts[result.label] = self.counts.get(result.label, 0) + 1
        probabilities = result.probabilities
        if not self.probability_sums:
            self.probability_sums = [0.0] * len(probabilities)
        sums = self.probability_sums
        for i, p in enumerate(probabilities):
            sums[i] += p
        if positive_index is not None:
            score = probabilities[positive_index]
            self.positive_sum += score
            self.positives += result.label == positive
            if len(self.suspicious) < THUMBNAILS_PER_SLIDE:
                heapq.heappush(self.suspicious, (score, result.path, result.file))
            elif score > self.suspicious[0][0]:
                heapq.heapreplace(self.suspicious, (score, result.path, result.file))

    def merge(self, other: SlideStats) -> None:
        self.cells += other.cells
        self.qc += other.qc
        self.errors += other.errors
        self.pending += other.pending
        for label, count in other.counts.items():
            self.counts[label] = self.counts.get(label, 0) + count
        if other.probability_sums:
            sums = self.probability_sums or [0.0] * len(other.probability_sums)
            self.probability_sums = [
                a + b for a, b in zip(sums, other.probability_sums, strict=True)
            ]
        self.positives += other.positives
        self.positive_sum += other.positive_sum
        for item in other.suspicious:
            if len(self.suspicious) < THUMBNAILS_PER_SLIDE:
                heapq.heappush(self.suspicious, item)
            elif item > self.suspicious[0]:
                heapq.heapreplace(self.suspicious, item)

    def to_dict(self, policy: DecisionPolicy, with_call: bool, incomplete: bool = False) -> dict:
        cells, labels = self.cells, policy.labels
        out: dict = {
            "cells": cells,
            "qc_failed": self.qc,
            "errors": self.errors,
            "pending": self.pending,
            "counts": {label: self.counts.get(label, 0) for label in labels},
            "fractions": {
                label: round(self.counts.get(label, 0) / cells, 4) if cells else None
                for label in labels
            },
            "mean_probability": {
                label: round(self.probability_sums[i] / cells, 4)
                if cells and self.probability_sums
                else None
                for i, label in enumerate(labels)
            },
        }
        if with_call and policy.positive is not None:
            score = policy.slide_score(cells, self.positives, self.positive_sum)
            out["score"] = None if score is None else round(score, 4)
            # how far the score lies from the cut-off: a call by a hair is worth a look
            out["margin"] = None if score is None else round(score - policy.slide_cutoff, 4)
            out["call"] = (
                INCOMPLETE
                if incomplete or self.pending
                else policy.slide_call(cells, self.positives, self.positive_sum)
            )
            if incomplete:
                out["note"] = "the run was interrupted before every file of this slide was read"
            elif self.pending:
                out["note"] = (
                    f"{self.pending} file(s) of this slide were still being written and were "
                    "not read: no call until a run reads them"
                )
        return out


class SummaryBuilder:
    """Accumulates per-slide and overall statistics in bounded memory."""

    def __init__(self, policy: DecisionPolicy) -> None:
        self.policy = policy
        self.positive_index = policy.positive_index
        self.slides: dict[str, SlideStats] = {}
        self.histogram = [0] * HISTOGRAM_BINS
        self.error_reasons: dict[str, int] = {}
        self.qc_reasons: dict[str, int] = {}
        self.problems: list[dict] = []  # first LISTED_PROBLEMS error/QC files
        self.qc_examples: dict[str, list[tuple[str, str]]] = {}  # reason -> (path, file)
        self.jpeg_files = 0

    @property
    def labels(self) -> tuple[str, ...]:
        return self.policy.labels

    def add(self, result: CellResult) -> None:
        stats = self.slides.get(result.slide)
        if stats is None:
            stats = self.slides[result.slide] = SlideStats()
        stats.add(result, self.policy.positive, self.positive_index)
        if is_lossy(result.file or result.path):
            self.jpeg_files += 1
        if result.status == STATUS_PENDING:  # counted per slide; not a problem of the file
            return
        if result.status == STATUS_OK:
            if self.positive_index is not None:
                score = result.probabilities[self.positive_index]
                self.histogram[min(int(score * HISTOGRAM_BINS), HISTOGRAM_BINS - 1)] += 1
            return
        reasons = result.reason.split("; ") if result.status == STATUS_QC else [result.reason]
        counter = self.qc_reasons if result.status == STATUS_QC else self.error_reasons
        for reason in reasons:
            key = reason.split(" (")[0]
            counter[key] = counter.get(key, 0) + 1
            if result.status == STATUS_QC:
                examples = self.qc_examples.setdefault(key, [])
                if len(examples) < QC_EXAMPLES_PER_REASON:
                    examples.append((result.path, result.file))
        if len(self.problems) < LISTED_PROBLEMS:
            self.problems.append(
                {"path": result.path, "status": result.status, "reason": result.reason}
            )

    def merge(self, other: SummaryBuilder) -> None:
        """Add another builder's statistics (another part or node of the same run)."""
        for name, stats in other.slides.items():
            self.slides.setdefault(name, SlideStats()).merge(stats)
        self.histogram = [a + b for a, b in zip(self.histogram, other.histogram, strict=True)]
        self.jpeg_files += other.jpeg_files
        for mine, theirs in (
            (self.error_reasons, other.error_reasons),
            (self.qc_reasons, other.qc_reasons),
        ):
            for key, count in theirs.items():
                mine[key] = mine.get(key, 0) + count
        for key, examples in other.qc_examples.items():
            kept = self.qc_examples.setdefault(key, [])
            kept.extend(examples[: max(0, QC_EXAMPLES_PER_REASON - len(kept))])
        self.problems.extend(other.problems[: max(0, LISTED_PROBLEMS - len(self.problems))])

    @property
    def overall(self) -> SlideStats:
        total = SlideStats()
        for stats in self.slides.values():
            total.merge(stats)
        return total

    def to_dict(self, run: dict, unfinished: set[str] | None = None) -> dict:
        unfinished = unfinished or set()
        overall = self.overall.to_dict(self.policy, with_call=False)
        files = overall["cells"] + overall["qc_failed"] + overall["errors"] + overall["pending"]
        overall["files"] = files
        overall["qc_rate"] = round(overall["qc_failed"] / files, 4) if files else None
        overall["jpeg_files"] = self.jpeg_files
        slides = {
            name: stats.to_dict(self.policy, with_call=True, incomplete=name in unfinished)
            for name, stats in sorted(self.slides.items())
        }
        return {
            "intended_use": INTENDED_USE,
            **run,
            "decision": self.policy.to_dict(),
            "overall": overall,
            "error_reasons": self.error_reasons,
            "qc_reasons": self.qc_reasons,
            "problem_files": self.problems,
            "problem_files_listed": f"first {LISTED_PROBLEMS}; all are in the per-image report",
            "slides": slides,
            "histogram": {
                "of": f"p_{self.policy.positive}" if self.policy.positive else None,
                "bins": HISTOGRAM_BINS,
                "counts": list(self.histogram),
            },
        }


def run_details(classifier, seconds: float, files: int, partial: bool, extra: dict) -> dict:
    """Model, device, versions and timing for the summary."""
    import cv2
    import numpy as np
    import onnxruntime

    info = classifier.info
    return {
        "smearscan_version": __version__,
        "partial": partial,
        "model": {
            "name": info.name,
            "path": str(info.path),
            "sha256": info.sha256,
            "labels": info.labels,
            "positive_class": info.positive_class,
            "temperature": classifier.temperature,
            "is_default": info.path.resolve() == default_model_path().resolve(),
        },
        "execution_provider": classifier.provider,
        "device_note": classifier.device_note,
        "versions": {
            "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__,
            "opencv": cv2.__version__,
            "numpy": np.__version__,
        },
        "seconds": round(seconds, 3),
        "files_per_second": round(files / seconds, 2) if seconds > 0 else None,
        **extra,
    }


def json_safe(value):
    """NaN and infinities become null: bare NaN is not JSON, and strict readers refuse it."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: str | os.PathLike, document: dict, reports: ReportSet | None = None) -> None:
    """The summary as JSON; with ``reports``, as one file of that set."""
    with reports.write(path) if reports is not None else atomic_write(path) as handle:
        json.dump(json_safe(document), handle, indent=2, ensure_ascii=False, allow_nan=False)
        handle.write("\n")
