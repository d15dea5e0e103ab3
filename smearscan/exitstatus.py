"""Process exit codes, documented in the README; cron wrappers branch on them."""

from __future__ import annotations

from enum import IntEnum


class ExitStatus(IntEnum):
    SUCCESS = 0  # every file classified
    ERROR = 1  # the run failed (model unusable, output not writable, ...)
    USAGE = 2  # bad command line or options
    SOME_UNREADABLE = 3  # finished, but some files got an error row
    LOCKED = 4  # another run holds the state lock
    INTERRUPTED_INT = 130  # SIGINT: batches in flight finished, partial report written
    INTERRUPTED_TERM = 143  # SIGTERM: likewise
