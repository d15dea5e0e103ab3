"""Per-image rows as CSV or JSONL.

CSV cells are safe for spreadsheets: report names are already one line (escaped, see
:mod:`smearscan.names`), and every text cell that a spreadsheet would run as a formula
(``=``, ``+``, ``-``, ``@``, tab, CR at the start) gets a leading ``'`` (OWASP's advice).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable
from typing import IO, Protocol

from smearscan.names import display_name
from smearscan.results import STATUS_OK, CellResult

FORMATS = ("csv", "jsonl")
CSV_FORMULA_STARTS = frozenset("=+-@\t\r")


def neutralize(value: str) -> str:
    """A cell that a spreadsheet would run as a formula gets a leading apostrophe."""
    if value and value[0] in CSV_FORMULA_STARTS:
        return "'" + value
    return value


def row_fields(labels: list[str]) -> list[str]:
    return [
        "path",
        "slide",
        "label",
        *[f"p_{label}" for label in labels],
        "status",
        "reason",
        "decided_by",
    ]


class RowWriter:
    """Streams per-image rows to CSV or JSONL inside an ``atomic_write``.

    ``decided_by`` names the cell rule on every classified row (e.g. ``P(all) >= 0.42``),
    so a spreadsheet shows why a row got its label even after sorting or filtering.
    """

    def __init__(self, handle: IO[str], labels: list[str], fmt: str, rule: str) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}")
        self.handle, self.labels, self.fmt, self.rule = handle, labels, fmt, rule
        self.fields = row_fields(labels)
        self.empty_probabilities = [""] * len(labels)
        if fmt == "csv":
            self.writer = csv.writer(handle, lineterminator="\n")
            self.writer.writerow(self.fields)

    def write(self, result: CellResult) -> None:
        reason = display_name(result.reason) if result.reason else ""
        probabilities = result.probabilities
        decided_by = self.rule if result.label else ""
        if self.fmt == "jsonl":
            values: dict = {"path": result.path, "slide": result.slide, "label": result.label}
            for index, label in enumerate(self.labels):
                values[f"p_{label}"] = round(probabilities[index], 6) if probabilities else None
            values.update(status=result.status, reason=reason, decided_by=decided_by)
            self.handle.write(json.dumps(values, ensure_ascii=False) + "\n")
            return
        self.writer.writerow(
            [
                neutralize(result.path),
                neutralize(result.slide),
                neutralize(result.label),
                *(
                    [f"{p:.6f}" for p in probabilities]
                    if probabilities
                    else self.empty_probabilities
                ),
                result.status,
                neutralize(reason),
                neutralize(decided_by),
            ]
        )


class _Tally(Protocol):
    def add(self, result: CellResult) -> None: ...


def write_labelled(
    writer: RowWriter,
    results: Iterable[CellResult],
    policy,
    summary: _Tally,
    counts: dict[str, int],
    transform: Callable[[CellResult], CellResult] | None = None,
) -> None:
    """The one loop behind scan's and merge's reports: each result labelled by the run's
    decision ``policy``, ``transform``-ed (anonymised), written, added to the ``summary``
    and counted by status."""
    for result in results:
        if result.status == STATUS_OK:
            result.label = policy.cell_label(result.probabilities)
        if transform is not None:
            result = transform(result)
        writer.write(result)
        summary.add(result)
        counts[result.status] += 1
