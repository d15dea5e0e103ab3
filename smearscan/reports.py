"""Per-image CSV/JSONL, summary JSON and a self-contained HTML report, all written atomically.

Every report is written to a temporary file in its destination folder and renamed into
place, so a crash or a kill never leaves a half-written report, and readers see either the
old report or the new one. Files are created without world permissions: names of slides
often carry patient identifiers.
"""

from __future__ import annotations

import base64
import csv
import heapq
import html
import io
import json
import os
import platform
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from smearscan import __version__
from smearscan.scan import STATUS_OK, CellResult

REPORT_MODE = 0o640
CSV_FORMULA_STARTS = frozenset("=+-@\t\r")
HISTOGRAM_BINS = 20
THUMBNAILS_PER_SLIDE = 6
THUMBNAIL_SLIDES = 200


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[io.IOBase]:
    """Write to a temporary sibling, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, REPORT_MODE)
        kwargs = {"newline": ""} if "b" not in mode else {}
        if "b" not in mode:
            kwargs["encoding"] = "utf-8"
        with os.fdopen(fd, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def neutralize(value: str) -> str:
    """OWASP CSV-injection guard: a cell that a spreadsheet would run as a formula gets a
    leading apostrophe."""
    if value and value[0] in CSV_FORMULA_STARTS:
        return "'" + value
    return value


def row_fields(labels: list[str]) -> list[str]:
    return ["path", "slide", "label", *[f"p_{label}" for label in labels], "status", "error"]


def row_values(result: CellResult, labels: list[str]) -> dict:
    probabilities = result.probabilities or [None] * len(labels)
    values = {"path": result.path, "slide": result.slide, "label": result.label}
    for label, p in zip(labels, probabilities, strict=False):
        values[f"p_{label}"] = None if p is None else round(float(p), 6)
    values["status"] = result.status
    values["error"] = result.error
    return values


class RowWriter:
    """Streams per-image rows to CSV or JSONL inside an :func:`atomic_write`."""

    def __init__(self, handle: io.TextIOBase, labels: list[str], fmt: str = "csv") -> None:
        if fmt not in ("csv", "jsonl"):
            raise ValueError("format must be csv or jsonl")
        self.handle, self.labels, self.fmt = handle, labels, fmt
        self.fields = row_fields(labels)
        self.empty_probabilities = [""] * len(labels)
        if fmt == "csv":
            self.writer = csv.writer(handle, lineterminator="\n")
            self.writer.writerow(self.fields)

    def write(self, result: CellResult) -> None:
        if self.fmt == "jsonl":
            values = row_values(result, self.labels)
            self.handle.write(json.dumps(values, ensure_ascii=False) + "\n")
            return
        probabilities = result.probabilities
        error = result.error
        self.writer.writerow(
            [neutralize(result.path), neutralize(result.slide), neutralize(result.label),
             *([f"{p:.6f}" for p in probabilities] if probabilities else self.empty_probabilities),
             result.status, neutralize(error) if error else error]
        )  # fmt: skip


@dataclass
class SlideStats:
    cells: int = 0
    errors: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    probability_sums: list[float] = field(default_factory=list)
    positive_scores: list[float] = field(default_factory=list)
    suspicious: list[tuple[float, str, str]] = field(default_factory=list)  # min-heap

    def add(self, result: CellResult, positive_index: int | None) -> None:
        if result.status != STATUS_OK:
            self.errors += 1
            return
        self.cells += 1
        self.counts[result.label] = self.counts.get(result.label, 0) + 1
        probabilities = result.probabilities
        sums = self.probability_sums
        if not sums:
            self.probability_sums = list(probabilities)
        else:
            for i, p in enumerate(probabilities):
                sums[i] += p
        if positive_index is not None:
            score = probabilities[positive_index]
            self.positive_scores.append(score)
            if len(self.suspicious) < THUMBNAILS_PER_SLIDE:
                heapq.heappush(self.suspicious, (score, result.path, result.file))
            elif score > self.suspicious[0][0]:
                heapq.heapreplace(self.suspicious, (score, result.path, result.file))

    def merge(self, other: SlideStats) -> None:
        """Add another slide's counts (for the overall totals)."""
        self.cells += other.cells
        self.errors += other.errors
        for label, count in other.counts.items():
            self.counts[label] = self.counts.get(label, 0) + count
        if other.probability_sums:
            sums = self.probability_sums or [0.0] * len(other.probability_sums)
            self.probability_sums = [a + b for a, b in zip(sums, other.probability_sums,
                                                            strict=True)]  # fmt: skip

    def to_dict(self, labels: list[str], positive: str | None, slide_threshold: float) -> dict:
        cells = self.cells
        out = {
            "cells": cells,
            "errors": self.errors,
            "counts": {label: self.counts.get(label, 0) for label in labels},
            "fractions": {
                label: round(self.counts.get(label, 0) / cells, 4) if cells else None
                for label in labels
            },
            "mean_probability": {
                label: round(self.probability_sums[i] / cells, 4) if cells else None
                for i, label in enumerate(labels)
            }
            if self.probability_sums
            else {label: None for label in labels},
        }
        if positive is not None:
            fraction = out["fractions"][positive]
            out[f"median_p_{positive}"] = (
                round(float(np.median(self.positive_scores)), 4) if self.positive_scores else None
            )
            out["call"] = (
                None
                if fraction is None
                else (f"{positive}-suspect" if fraction >= slide_threshold else "negative")
            )
        return out


class SummaryBuilder:
    """Accumulates per-slide and overall statistics in bounded memory."""

    def __init__(self, labels: list[str], positive: str | None, slide_threshold: float = 0.5):
        self.labels = labels
        self.positive = positive if positive in labels else None
        self.positive_index = labels.index(positive) if self.positive else None
        self.slide_threshold = slide_threshold
        self.slides: dict[str, SlideStats] = {}
        self.histogram = [0] * HISTOGRAM_BINS
        self.error_reasons: dict[str, int] = {}

    @property
    def overall(self) -> SlideStats:
        """Totals over all slides (summed at the end rather than once more per cell)."""
        total = SlideStats()
        for stats in self.slides.values():
            total.merge(stats)
        return total

    def add(self, result: CellResult) -> None:
        stats = self.slides.get(result.slide)
        if stats is None:
            stats = self.slides[result.slide] = SlideStats()
        stats.add(result, self.positive_index)
        if result.status != STATUS_OK:
            reason = result.error.split(" (")[0]
            self.error_reasons[reason] = self.error_reasons.get(reason, 0) + 1
        elif self.positive_index is not None:
            score = result.probabilities[self.positive_index]
            self.histogram[min(int(score * HISTOGRAM_BINS), HISTOGRAM_BINS - 1)] += 1

    def to_dict(self, run: dict) -> dict:
        overall = self.overall.to_dict(self.labels, None, self.slide_threshold)
        overall["files"] = overall["cells"] + overall["errors"]
        slides = {
            name: stats.to_dict(self.labels, self.positive, self.slide_threshold)
            for name, stats in sorted(self.slides.items())
        }
        rule = None
        if self.positive:
            rule = (
                f"a slide is '{self.positive}-suspect' when the fraction of its cells labelled "
                f"'{self.positive}' is >= {self.slide_threshold}"
            )
        return {
            **run,
            "overall": overall,
            "error_reasons": self.error_reasons,
            "slide_rule": rule,
            "slides": slides,
            "histogram": {
                "of": f"p_{self.positive}" if self.positive else None,
                "bins": HISTOGRAM_BINS,
                "counts": list(self.histogram),
            },
        }


def run_details(classifier, seconds: float, files: int, partial: bool, extra: dict) -> dict:
    """Model, device, versions and timing for the summary."""
    import cv2
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


def write_summary(path: str | os.PathLike, summary: dict) -> None:
    with atomic_write(path) as handle:
        json.dump(summary, handle, indent=2, ensure_ascii=False)
        handle.write("\n")


# ---------------------------------------------------------------- HTML


def thumbnail_data_uri(file: str, recipe, size: int = 112) -> str | None:
    """A small JPEG of the framed cell, inlined so the report is one self-contained file."""
    import cv2

    from smearscan.preprocess import ImageDecodeError, frame_cell, read_image

    try:
        rgb = read_image(file)
    except ImageDecodeError:
        return None
    framed = cv2.resize(frame_cell(rgb, recipe), (size, size), interpolation=cv2.INTER_AREA)
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(framed, cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_JPEG_QUALITY, 80])  # fmt: skip
    if not ok:
        return None
    return "data:image/jpeg;base64," + base64.b64encode(encoded.tobytes()).decode("ascii")


def histogram_svg(counts: list[int], label: str) -> str:
    width, height, pad = 520, 180, 28
    peak = max(max(counts), 1)
    bar = (width - 2 * pad) / len(counts)
    bars = []
    for i, count in enumerate(counts):
        h = (height - 2 * pad) * count / peak
        x = pad + i * bar
        bars.append(
            f'<rect x="{x:.1f}" y="{height - pad - h:.1f}" width="{bar - 2:.1f}" '
            f'height="{h:.1f}" fill="#7b3fa0"><title>{i / len(counts):.2f}-'
            f"{(i + 1) / len(counts):.2f}: {count}</title></rect>"
        )
    axis = (
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" '
        'stroke="#333"/>'
        f'<text x="{pad}" y="{height - 8}" font-size="11">0</text>'
        f'<text x="{width / 2 - 30}" y="{height - 8}" font-size="11">{html.escape(label)}</text>'
        f'<text x="{width - pad - 6}" y="{height - 8}" font-size="11">1</text>'
        f'<text x="4" y="{pad - 8}" font-size="11">max {peak}</text>'
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" aria-label="histogram of {html.escape(label)}">{"".join(bars)}{axis}</svg>'
    )


HTML_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;color:#222}
h1{font-size:22px}h2{font-size:18px;margin-top:28px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:4px 8px}
th{background:#f2eef6;text-align:left}td.num{text-align:right}
.suspect{background:#fde8e8}.note{color:#555;font-size:13px}
.thumbs{display:flex;flex-wrap:wrap;gap:6px;margin:6px 0 16px}
figure{margin:0;font-size:11px;text-align:center;width:116px;word-break:break-all}
figure img{display:block;border:1px solid #999}
.warn{background:#fff4d6;border:1px solid #e0b84c;padding:8px}
"""


def write_html(path: str | os.PathLike, summary: dict, builder: SummaryBuilder, recipe) -> None:
    """One offline HTML file: run details, per-slide table, histogram, suspicious cells."""
    esc = html.escape
    labels, positive = builder.labels, builder.positive
    overall = summary["overall"]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>smearscan report</title>",
        f"<style>{HTML_STYLE}</style></head><body>",
        "<h1>smearscan report</h1>",
        "<p class='note'>A screening aid that flags cells for review by a qualified person; "
        "not a diagnosis.</p>",
    ]
    if summary.get("partial"):
        parts.append("<p class='warn'>This run was interrupted: the report is partial.</p>")
    parts.append(
        f"<p id='totals'>{overall['files']} files: {overall['cells']} classified, "
        f"{overall['errors']} unreadable.</p>"
    )
    header = "".join(f"<th>{esc(label)}</th>" for label in labels)
    parts.append(
        "<h2>Slides</h2><table id='slides'><thead><tr><th>slide</th><th>cells</th>"
        f"<th>errors</th>{header}"
        + (f"<th>median P({esc(positive)})</th><th>call</th>" if positive else "")
        + "</tr></thead><tbody>"
    )
    for name, stats in summary["slides"].items():
        suspect = positive and stats.get("call", "") and stats["call"] != "negative"
        cells = "".join(
            f"<td class='num'>{stats['counts'][label]}"
            + (
                f" ({stats['fractions'][label]:.0%})"
                if stats["fractions"][label] is not None
                else ""
            )
            + "</td>"
            for label in labels
        )
        extra = ""
        if positive:
            median = stats.get(f"median_p_{positive}")
            extra = (
                f"<td class='num'>{'' if median is None else f'{median:.3f}'}</td>"
                f"<td>{esc(stats.get('call') or '')}</td>"
            )
        parts.append(
            f"<tr class='{'suspect' if suspect else ''}'><td>{esc(name)}</td>"
            f"<td class='num'>{stats['cells']}</td><td class='num'>{stats['errors']}</td>"
            f"{cells}{extra}</tr>"
        )
    parts.append("</tbody></table>")
    if summary.get("slide_rule"):
        parts.append(f"<p class='note'>{esc(summary['slide_rule'])}</p>")
    if positive:
        parts.append(f"<h2>Distribution of P({esc(positive)})</h2>")
        parts.append(histogram_svg(summary["histogram"]["counts"], f"P({positive})"))
        parts.append(f"<h2>Most suspicious cells per slide (highest P({esc(positive)}))</h2>")
        for index, (name, stats) in enumerate(sorted(builder.slides.items())):
            if index >= THUMBNAIL_SLIDES:
                parts.append(f"<p class='note'>Thumbnails shown for the first "
                             f"{THUMBNAIL_SLIDES} slides only.</p>")  # fmt: skip
                break
            if not stats.suspicious:
                continue
            parts.append(f"<h3>{esc(name)}</h3><div class='thumbs'>")
            for score, rel, file in sorted(stats.suspicious, reverse=True):
                uri = thumbnail_data_uri(file, recipe)
                image = (
                    f"<img src='{uri}' width='112' height='112' alt='{esc(rel)}'>" if uri else ""
                )
                parts.append(f"<figure>{image}<figcaption>{score:.3f}<br>{esc(rel)}"
                             "</figcaption></figure>")  # fmt: skip
            parts.append("</div>")
    model = summary["model"]
    details = {
        "model": f"{model['name']} (sha256 {model['sha256'][:16]}…)",
        "execution provider": summary["execution_provider"]
        + (f" — {summary['device_note']}" if summary.get("device_note") else ""),
        "duration": f"{summary['seconds']} s ({summary.get('files_per_second')} files/s)",
        "smearscan": summary["smearscan_version"],
        "started": summary.get("started", ""),
    }
    parts.append("<h2>Run details</h2><table id='details'>")
    parts.extend(f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>" for k, v in details.items())
    parts.append("</table></body></html>")
    with atomic_write(path) as handle:
        handle.write("\n".join(parts))
