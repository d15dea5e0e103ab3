"""Incremental scanning state (SQLite) and the run lock, for nightly cron runs.

The state remembers, per file, its size, mtime and the *fingerprint* of what produced its
result (model sha256, test-time augmentation, quality-control mode and limits), with the
probabilities: never the label. Labels and slide calls are decided when the report is
written, by that run's policy, so a new ``--threshold`` relabels every reused row, while
anything that changes probabilities (another model, ``--tta``, other QC) rescans.

Results are committed batch by batch: a run killed at any moment leaves a consistent
database, and the next run picks up where it stopped. The lock is an ``flock`` on
``<state>.lock``: the kernel releases it when its holder dies, so a lock left by a killed
process never blocks the next run. The database, its WAL files and the lock are owner-only.
"""

from __future__ import annotations

import errno
import hashlib
import heapq
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import filelock

from smearscan.discover import Found, file_key

try:
    import fcntl
except ImportError:  # not POSIX (Windows acquisition PCs): filelock's portable lock instead
    fcntl = None  # type: ignore[assignment]
from smearscan.files import TargetError, check_private, create_private, open_private
from smearscan.names import display_name, unescape_name
from smearscan.results import STATUS_OK, STATUS_PENDING, STATUS_QC, CellResult

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    file TEXT PRIMARY KEY,      -- absolute path on disk (escaped like report names)
    rel TEXT NOT NULL,          -- path as reported
    slide TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    content_sha256 TEXT,        -- with --verify content
    fingerprint TEXT NOT NULL,  -- what produced the result (model, TTA, QC)
    status TEXT NOT NULL,
    reason TEXT NOT NULL,
    probabilities TEXT NOT NULL, -- comma-separated, in the model's label order
    scanned_run INTEGER NOT NULL,
    seen_run INTEGER NOT NULL,
    seen_order INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS files_seen ON files (seen_run, seen_order);
CREATE TABLE IF NOT EXISTS observed (
    file TEXT PRIMARY KEY,      -- a file too young to scan, as last seen
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    run INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    started REAL NOT NULL,
    finished REAL,
    fingerprint TEXT NOT NULL,
    status TEXT
);
"""
VERIFY_MODES = ("stat", "content")
#: Results reused from earlier runs: read and classified, or read and refused by the same QC.
REUSABLE = (STATUS_OK, STATUS_QC)


class StateLocked(RuntimeError):
    """Another run holds the lock of this state file."""


class StateError(RuntimeError):
    """The state file cannot be used (corrupt, wrong version, unwritable)."""


@dataclass
class Counters:
    discovered: int = 0
    reused: int = 0
    pending: int = 0
    to_scan: int = 0


def fingerprint(model_sha256: str, tta: bool, qc_mode: str, qc_limits: str | None) -> str:
    """What a stored result depends on besides the file itself."""
    text = "\n".join([model_sha256, f"tta={tta}", f"qc={qc_mode}", qc_limits or ""])
    return hashlib.sha256(text.encode()).hexdigest()


def content_digest(path: str) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def _readable(status: str, probabilities: str) -> bool:
    if status != STATUS_OK:
        return True
    try:
        values = [float(p) for p in probabilities.split(",")]
    except (ValueError, AttributeError):
        return False
    return bool(values) and all(0.0 <= v <= 1.0 for v in values)


class RunLock:
    """Exclusive advisory lock on ``<state>.lock``; ``wait`` seconds (None = fail at once).

    ``stop`` (a signal) ends a wait at once with :class:`InterruptedError`.
    """

    def __init__(
        self, path: Path, wait: float | None = None, stop: threading.Event | None = None
    ) -> None:
        self.path, self.wait, self.stop = path, wait, stop
        self.handle: IO[str] | None = None
        self.portable: filelock.BaseFileLock | None = None  # where there is no flock
        self.said_waiting = False

    def __enter__(self) -> RunLock:
        if fcntl is None:
            return self._enter_portable()
        try:
            fd = open_private(self.path, os.O_RDWR)
        except TargetError as exc:
            raise StateError(f"cannot use the lock file: {exc}") from None
        handle = os.fdopen(fd, "r+")  # held for the run's lifetime
        deadline = None if self.wait is None else time.monotonic() + self.wait
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    handle.close()
                    raise
                if deadline is None or time.monotonic() >= deadline:
                    holder = self._holder(handle)
                    handle.close()
                    raise StateLocked(f"another smearscan run holds {self.path}{holder}") from None
                self._say_waiting(self._holder(handle))
                if self.stop is not None and self.stop.wait(0.2):
                    handle.close()
                    raise InterruptedError("interrupted while waiting for the state lock") from None
                if self.stop is None:
                    time.sleep(0.2)
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self.handle = handle
        return self

    def _enter_portable(self) -> RunLock:
        """Where ``fcntl`` does not exist: filelock (Windows' byte-range lock), with the
        same waiting, stop and error contract; the holder's pid is not recorded."""
        lock = filelock.FileLock(str(self.path))
        deadline = None if self.wait is None else time.monotonic() + self.wait
        while True:
            try:
                lock.acquire(timeout=0)
                break
            except filelock.Timeout:
                if deadline is None or time.monotonic() >= deadline:
                    raise StateLocked(f"another smearscan run holds {self.path}") from None
                self._say_waiting("")
                if self.stop is not None and self.stop.wait(0.2):
                    raise InterruptedError("interrupted while waiting for the state lock") from None
                if self.stop is None:
                    time.sleep(0.2)
        self.portable = lock
        return self

    def _say_waiting(self, holder: str) -> None:
        """Once per run: the log (and cron mail) says why nothing happens yet."""
        if not self.said_waiting:
            self.said_waiting = True
            log.info(
                "another smearscan run holds %s%s: waiting up to %g s for it",
                self.path,
                holder,
                self.wait,
            )

    @staticmethod
    def _holder(handle) -> str:
        handle.seek(0)
        pid = handle.read().strip()
        return f" (pid {pid})" if pid else ""

    def __exit__(self, *exc) -> None:
        if self.portable is not None:
            self.portable.release()
            self.portable = None
        if self.handle is not None and fcntl is not None:
            fcntl.flock(self.handle.fileno(), fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


class StateStore:
    """The SQLite state of one scan target; use inside a :class:`RunLock`."""

    def __init__(
        self, path: Path, fingerprint: str, verify: str = "stat", labels: tuple[str, ...] = ()
    ) -> None:
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}")
        self.path, self.fingerprint, self.verify = path, fingerprint, verify
        self.labels = labels  # the model's, to describe a pending file's previous result
        companions = [path.with_name(path.name + suffix) for suffix in ("-wal", "-shm")]
        try:
            # before SQLite opens them: it creates new WAL files with the database's mode
            create_private(path)
            for companion in companions:  # SQLite opens these by name: no link, no device
                check_private(companion)
                if companion.exists():  # a killed run's (older versions made them 0644)
                    os.close(open_private(companion, os.O_RDONLY))
        except TargetError as exc:
            raise StateError(f"cannot use state file {path}: {exc}") from None
        try:
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StateError(
                    f"{path} was written by a newer smearscan (schema {version}); upgrade"
                )
            if 0 < version < SCHEMA_VERSION:
                # results of older versions carry labels, not the facts a rerun needs
                self.db.executescript("DROP TABLE IF EXISTS files; DROP TABLE IF EXISTS runs;")
            self.db.executescript(SCHEMA)
            self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self.db.execute("SELECT count(*) FROM files").fetchone()
        except sqlite3.DatabaseError as exc:
            raise StateError(f"cannot use state file {path}: {exc}") from None
        # never open (and close) the database or its companions from here on: closing any
        # descriptor of a file drops this process's POSIX locks on it, and a reader that then
        # finds itself the first to attach resets the -shm this run has mapped (SIGBUS)
        self.run_id = self.db.execute(
            "INSERT INTO runs (started, fingerprint) VALUES (?, ?)", (time.time(), fingerprint)
        ).lastrowid
        self._order = 0
        self._orders: dict[str, int] = {}
        self._digests: dict[str, str | None] = {}
        self._pending_rows: list[tuple] = []
        # unchanged files seen by this run, as report rows in discovery order (their results
        # come from earlier runs and are not written again)
        self._reused: list[tuple] = []
        # files too young to read, as pending report rows in discovery order: every file
        # present has a row in every run
        self._pending: list[tuple] = []

    def close(self) -> None:
        self.db.close()

    def reusable(self) -> dict[str, tuple]:
        """file -> (size, mtime_ns, content digest, status, reason, probabilities) of the
        results a rerun may reuse, loaded in one query for speed."""
        rows = self.db.execute(
            "SELECT file, size, mtime_ns, content_sha256, status, reason, probabilities "
            "FROM files WHERE fingerprint=? AND status IN (?, ?)",
            (self.fingerprint, *REUSABLE),
        )
        # a row whose probabilities do not read back (a damaged or edited database) is not
        # reused: its file is scanned again rather than failing every run
        return {row[0]: row[1:] for row in rows if _readable(row[4], row[6])}

    def select(
        self,
        found: Iterable[Found],
        min_age: float,
        counters: Counters,
        on_kept: Callable[[], None] | None = None,
    ) -> Iterator[Found]:
        """Yield the files that need scanning; keep unchanged ones as reused report rows
        (and the young ones as pending rows), calling ``on_kept`` for each file kept.

        A result is reused when the fingerprint, size and mtime (and with ``--verify
        content`` the bytes' sha256) are unchanged and the file was read. Errors are retried
        every run. A file modified less than ``min_age`` seconds ago may still be being
        written: it waits, unless this run sees it with the same size and mtime as an
        earlier run did; so a file whose mtime lies in the future (clock skew on a share)
        waits one run, never forever.
        """
        reusable = self.reusable()
        observed = {
            row[0]: (row[1], row[2])
            for row in self.db.execute("SELECT file, size, mtime_ns FROM observed")
        }
        sightings: list[tuple] = []
        now_ns = time.time_ns()
        min_age_ns = int(min_age * 1e9)
        stat = os.stat
        verify = self.verify == "content"
        # plain locals in this per-file loop (a no-op rerun over 50,000 files is this loop)
        discovered = pending = reused = to_scan = 0
        try:
            for item in found:
                discovered += 1
                path = item.path
                key = display_name(file_key(path))  # the request has named each file once
                try:
                    st = stat(path)
                    size, mtime_ns = st.st_size, st.st_mtime_ns
                except (OSError, ValueError):  # ValueError: a NUL byte in a listed name
                    size = mtime_ns = -1
                previous = reusable.pop(key, None)  # popped: its data moves to the report row
                unchanged = (
                    previous is not None
                    and previous[0] == size
                    and previous[1] == mtime_ns
                    and not item.problem
                )
                young = mtime_ns >= 0 and now_ns - mtime_ns < min_age_ns
                # a young file is done being written when a run already read it, or saw it
                # with this size and mtime before
                self._order += 1
                if young and not unchanged and observed.get(key) != (size, mtime_ns):
                    sightings.append((key, size, mtime_ns, self.run_id))
                    pending += 1
                    if on_kept is not None:
                        on_kept()
                    reason = self.pending_reason((now_ns - mtime_ns) / 1e9, min_age, previous)
                    self._pending.append(
                        (
                            self._order,
                            item.rel,
                            item.slide,
                            key,
                            size,
                            mtime_ns,
                            STATUS_PENDING,
                            reason,
                            "",
                        )
                    )
                    continue
                digest = content_digest(path) if verify and not item.problem else None
                if unchanged and previous is not None and (not verify or previous[2] == digest):
                    reused += 1
                    if on_kept is not None:
                        on_kept()
                    self._reused.append(
                        (
                            self._order,
                            item.rel,
                            item.slide,
                            key,
                            size,
                            mtime_ns,
                            previous[3],
                            previous[4],
                            previous[5],
                        )
                    )
                    continue
                to_scan += 1
                self._orders[path] = self._order
                if verify:
                    self._digests[path] = digest
                yield item
        finally:
            counters.discovered += discovered
            counters.pending += pending
            counters.reused += reused
            counters.to_scan += to_scan
            with self.db:
                self.db.execute("BEGIN")
                # sightings older than this run are settled, gone or seen again now
                self.db.execute("DELETE FROM observed WHERE run < ?", (self.run_id,))
                self.db.executemany("INSERT OR REPLACE INTO observed VALUES (?,?,?,?)", sightings)

    def pending_reason(self, age: float, min_age: float, previous: tuple | None) -> str:
        """Why a file was not read, and its previous result, marked as such, if it had one."""
        if age < 0:
            reason = "its modification time lies in the future (clock skew on the share?)"
        else:
            reason = f"modified {age:.0f} s ago, less than --min-age {min_age:g} s"
        reason += ": not read in this run, the next run classifies it"
        if previous is None:
            return reason
        status, previous_reason, probabilities = previous[3], previous[4], previous[5]
        if status == STATUS_OK and probabilities:
            values = probabilities.split(",")
            names = self.labels if len(self.labels) == len(values) else range(len(values))
            shown = ", ".join(f"p_{n} {float(v):.4f}" for n, v in zip(names, values, strict=True))
        else:
            shown = f"{status}: {previous_reason}"
        return f"{reason}; previous result, for an earlier version of the file: {shown}"

    def record(self, result: CellResult) -> None:
        """Queue a fresh result; :meth:`commit` writes queued results in one transaction."""
        order = self._orders.pop(result.file, self._order)
        file = display_name(file_key(result.file))
        self._pending_rows.append(
            (
                file,
                result.path,
                result.slide,
                result.size,
                result.mtime_ns,
                self._digests.pop(result.file, None),
                self.fingerprint,
                result.status,
                result.reason,
                ",".join(map(repr, result.probabilities)),
                self.run_id,
                self.run_id,
                order,
            )
        )

    def commit(self) -> None:
        """Write the queued results in one transaction."""
        if not self._pending_rows:
            return
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany(
                "INSERT OR REPLACE INTO files VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                self._pending_rows,
            )
        self._pending_rows = []

    def finish(self, status: str) -> None:
        self.commit()
        self.db.execute(
            "UPDATE runs SET finished=?, status=? WHERE id=?", (time.time(), status, self.run_id)
        )

    def results(self, new_only: bool = False) -> Iterator[CellResult]:
        """This run's report rows in discovery order: every file seen now (merged), or only
        those scanned or pending now. Files deleted since earlier runs are not seen, so they
        drop out; files too young to read are ``pending`` rows.

        Rows scanned by this run come from the database (indexed by run and order); rows
        reused from earlier runs and pending rows were collected by :meth:`select`; all are
        in discovery order, so a merge keeps the report in that order without sorting."""
        scanned = self.db.execute(
            "SELECT seen_order, rel, slide, file, size, mtime_ns, status, reason, "
            "probabilities FROM files WHERE seen_run=? ORDER BY seen_order",
            (self.run_id,),
        )
        kept = [self._pending] if new_only else [self._reused, self._pending]
        rows = heapq.merge(*kept, scanned)
        for _, rel, slide, file, size, mtime_ns, status, reason, probabilities in rows:
            parsed = list(map(float, probabilities.split(","))) if probabilities else []
            yield CellResult(
                rel, slide, status, reason, parsed, size, mtime_ns, unescape_name(file)
            )
