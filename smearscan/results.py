"""The per-file result type, shared by every engine, the state and the report sinks.

It lives apart from the engines so that reports and the state never import an engine, and
a result made on a Ray worker is the same object as one made by a local thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field

STATUS_OK = "ok"  # classified: probabilities set, label decided by the run's policy
STATUS_QC = "qc"  # decoded, but the model cannot judge it: no label, reasons given
STATUS_ERROR = "error"  # not read or not decoded: reason given
#: with ``--state``: modified less than ``--min-age`` ago (still being written, or changed
#: since its last scan), so not read in this run; reason given (with the previous result,
#: marked as such, when there is one); its slide gets no call
STATUS_PENDING = "pending"
STATUSES = (STATUS_OK, STATUS_QC, STATUS_ERROR, STATUS_PENDING)


@dataclass(slots=True)
class CellResult:
    """One row of the per-image report (slots: a merged nightly report builds one per file).

    ``path`` and ``slide`` are the report's names (escaped, see
    :func:`smearscan.names.display_name`); ``file`` is the path on disk, for thumbnails and
    the state, and is never written to a report. ``label`` is filled from the
    probabilities by the run's :class:`~smearscan.policy.DecisionPolicy` when the report is
    written, never stored.
    """

    path: str
    slide: str
    status: str
    reason: str = ""
    probabilities: list[float] = field(default_factory=list)
    size: int = -1
    mtime_ns: int = -1
    file: str = ""
    label: str = ""

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK

    @property
    def usable(self) -> bool:
        """Counts towards its slide's call (classified, passed QC)."""
        return self.status == STATUS_OK
