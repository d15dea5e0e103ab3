"""The one-file HTML report (and the evaluation page), rendered with Jinja2 autoescaping.

Every value that comes from a file name, a label or a model file's metadata reaches the page
through the template engine's escaping; only the histogram, built here from numbers, is
marked safe.
"""

from __future__ import annotations

import base64
import os

from markupsafe import Markup, escape

from smearscan.files import ReportSet, atomic_write, is_inside
from smearscan.policy import INCOMPLETE, INSUFFICIENT, is_suspect
from smearscan.sinks.summary import SummaryBuilder

THUMBNAIL_SLIDES = 200
THUMBNAIL_SIZE = 112


def breakable(name: str) -> Markup:
    """A path that may wrap after its separators (``/``, ``_``, ``-``) but never inside a
    word or an extension: escaped first, then ``<wbr>`` after each separator."""
    escaped = str(escape(name))
    for separator in ("/", "_", "-"):
        escaped = escaped.replace(separator, separator + "<wbr>")
    return Markup(escaped)


def environment():
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(
        loader=PackageLoader("smearscan", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["breakable"] = breakable
    return env


def thumbnail_data_uri(
    file: str, recipe, size: int = THUMBNAIL_SIZE, inside: str | None = None
) -> str | None:
    """A small JPEG of the framed cell, inlined so the report is one self-contained file.
    ``inside`` (the scanned folder's real path): the file must still lie inside it when it
    is read again, as the scan checked (a file swapped for a link since shows no picture)."""
    import cv2

    from smearscan.preprocess import ImageDecodeError, frame_cell, read_image

    try:
        bgr = read_image(file, order="bgr", inside=inside)
        framed = cv2.resize(
            frame_cell(bgr, recipe, "bgr"), (size, size), interpolation=cv2.INTER_AREA
        )
    except (ImageDecodeError, cv2.error, ValueError):
        return None
    ok, encoded = cv2.imencode(".jpg", framed, [cv2.IMWRITE_JPEG_QUALITY, 80])
    if not ok:
        return None
    return "data:image/jpeg;base64," + base64.b64encode(encoded.tobytes()).decode("ascii")


def histogram_svg(counts: list[int], label: str, cutoff: float | None = None) -> Markup:
    """Bars of the cells' P(positive); ``cutoff`` (the cell threshold) drawn as a dashed
    line, so the reader sees which bars were labelled positive."""
    width, height, pad = 520, 190, 30
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
    text = escape(label)
    axis = (
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" '
        'stroke="#333"/>'
        f'<text x="{pad}" y="{height - 12}" font-size="11">0</text>'
        f'<text x="{width / 2 - 30}" y="{height - 12}" font-size="11">{text}</text>'
        f'<text x="{width - pad - 6}" y="{height - 12}" font-size="11">1</text>'
        f'<text x="4" y="{pad - 10}" font-size="11">cells (max {peak})</text>'
    )
    if cutoff is not None:
        x = pad + (width - 2 * pad) * cutoff
        axis += (
            f'<line id="cutoff" x1="{x:.1f}" y1="{pad - 4}" x2="{x:.1f}" y2="{height - pad}" '
            'stroke="#c0392b" stroke-dasharray="4 3"/>'
            f'<text x="{x + 3:.1f}" y="{pad + 6}" font-size="11" fill="#c0392b">'
            f"threshold {cutoff:g}</text>"
        )
    return Markup(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" aria-label="histogram of {text}">{"".join(bars)}{axis}</svg>'
    )


def _row_class(stats: dict) -> str:
    call = stats.get("call") or ""
    if is_suspect(call):
        return "suspect"
    return call if call in (INSUFFICIENT, INCOMPLETE) else ""


def write_html(
    path: str | os.PathLike,
    summary: dict,
    builder: SummaryBuilder,
    recipe,
    qc_text: str,
    roots: list[str] | None = None,
    reports: ReportSet | None = None,
) -> None:
    """One offline HTML file: rule, per-slide table, histogram, suspicious cells, QC
    failures by reason, unreadable files, run details. ``roots`` (the scanned folders'
    real paths) keep thumbnails to the files inside them."""
    positive = builder.policy.positive
    made: dict[str, str | None] = {}  # a file shown under several QC reasons is read once

    def thumbnail(file: str) -> str | None:
        if file not in made:
            real = os.path.realpath(file) if file else ""
            inside = next((r for r in roots or [] if is_inside(real, r)), None)
            made[file] = thumbnail_data_uri(file, recipe, inside=inside) if file else None
        return made[file]

    thumbnails = []
    for name, stats in sorted(builder.slides.items())[:THUMBNAIL_SLIDES]:
        if stats.suspicious:
            thumbnails.append(
                {
                    "name": name,
                    "cells": [
                        {"score": score, "path": rel, "uri": thumbnail(file)}
                        for score, rel, file in sorted(stats.suspicious, reverse=True)
                    ],
                }
            )
    qc_groups = [
        {
            "reason": reason,
            "count": builder.qc_reasons.get(reason, 0),
            "cells": [{"path": rel, "uri": thumbnail(file)} for rel, file in examples],
        }
        for reason, examples in sorted(builder.qc_examples.items())
    ]
    model = summary["model"]
    engine = summary.get("engine") or {}
    details = [
        ("intended use", summary["intended_use"]),
        ("model", f"{model['name']} (sha256 {model['sha256']})"),
        ("cell rule", summary["decision"]["cell_rule_text"]),
        ("slide rule", summary["decision"]["slide_rule_text"] or "no slide call"),
        ("quality control", qc_text),
        (
            "execution provider",
            summary["execution_provider"]
            + (f" ({summary['device_note']})" if summary.get("device_note") else ""),
        ),
        ("engine", ", ".join(f"{k} {v}" for k, v in engine.items()) if engine else "local"),
        ("duration", f"{summary['seconds']} s ({summary.get('files_per_second')} files/s)"),
        ("smearscan", summary["smearscan_version"]),
        ("started", summary.get("started", "")),
    ]
    page = (
        environment()
        .get_template("report.html.j2")
        .render(
            summary=summary,
            overall=summary["overall"],
            decision=summary["decision"],
            slides=summary["slides"],
            labels=builder.labels,
            positive=positive,
            histogram=histogram_svg(
                summary["histogram"]["counts"], f"P({positive})", builder.policy.threshold
            )
            if positive
            else "",
            thumbnails=thumbnails,
            thumbnails_truncated=len(builder.slides) > THUMBNAIL_SLIDES,
            qc_groups=qc_groups,
            errors=[p for p in builder.problems if p["status"] == "error"],
            details=details,
            qc_text=qc_text,
            row_class=_row_class,
        )
    )
    with reports.write(path) if reports is not None else atomic_write(path) as handle:
        handle.write(page)
