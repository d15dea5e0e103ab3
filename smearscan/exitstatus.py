"""Process exit codes, documented in the README; cron wrappers branch on them."""

from __future__ import annotations

from enum import IntEnum


class ExitStatus(IntEnum):
    SUCCESS = 0  # every file classified
    ERROR = 1  # the run failed (model unusable, output not writable, unexpected error)
    USAGE = 2  # bad command line or options
    SOME_UNUSABLE = 3  # finished, but some files were unreadable or failed quality control
    LOCKED = 4  # another run holds the state lock
    NOTHING_TO_SCAN = 5  # no image file found; reports kept
    PENDING = 6  # finished, but some files were still being written: their rows are pending
    # POSIX numbers written out: Windows has no SIGHUP, and the codes must not depend on it
    INTERRUPTED_HUP = 128 + 1  # 129: SIGHUP, partial report written
    INTERRUPTED_INT = 128 + 2  # 130: SIGINT, likewise
    INTERRUPTED_TERM = 128 + 15  # 143: SIGTERM, likewise

    @classmethod
    def for_signal(cls, signum: int) -> ExitStatus:
        return cls(128 + signum)

    @classmethod
    def for_report(
        cls, counts: dict[str, int], interrupted: ExitStatus | None, qc_tolerated: bool = False
    ) -> ExitStatus:
        """The code of a run that wrote its reports, from its rows' status counts: the
        signal's code when ``interrupted``, then pending files, then unusable files (failed
        QC within ``--max-qc-rate`` is tolerated), else success. Scan and merge share it."""
        if interrupted is not None:
            return interrupted
        from smearscan.results import STATUS_ERROR, STATUS_PENDING, STATUS_QC

        if counts.get(STATUS_PENDING):
            return cls.PENDING
        if counts.get(STATUS_ERROR) or (counts.get(STATUS_QC) and not qc_tolerated):
            return cls.SOME_UNUSABLE
        return cls.SUCCESS
