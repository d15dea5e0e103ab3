"""Writing files that hold patient identifiers: atomically, privately, and cleaning up only
what is provably dead.

Every report is written to a temporary sibling, flushed, renamed into place and the folder
fsynced, so a crash or a kill never leaves a half-written report and readers see either
the old report or the new one. Files are created owner-only (0600 or 0640 for reports):
slide names often carry patient identifiers. Temporary names carry the host and process
id, so a later run removes a temporary file only when its writer is known to be gone.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

REPORT_MODE = 0o640
PRIVATE_MODE = 0o600
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


class TargetError(OSError):
    """A report target that must not be written (a device, a folder, ...)."""


def check_target(path: str | os.PathLike) -> None:
    """Refuse targets that are not (or not yet) regular files: renaming over a device node
    such as /dev/null would replace it, and a folder cannot be a report."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(info.st_mode):
        raise TargetError(f"{path} is a folder, not a file")
    if not stat.S_ISREG(info.st_mode):
        raise TargetError(f"{path} exists and is not a regular file (a device, pipe or socket)")


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a power cut after rename could lose it)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class ReportSet:
    """Several files written as one: each to a temporary sibling, fsynced, and all renamed
    into place only when every one is written. A full disk or a crash halfway leaves the
    previous set whole, never a new report beside an old summary or page."""

    def __init__(self) -> None:
        self.written: list[tuple[Path, Path]] = []  # (temporary, target)

    @contextmanager
    def write(
        self, path: str | os.PathLike, mode: str = "w", permissions: int = REPORT_MODE
    ) -> Iterator[IO[Any]]:
        path = Path(path)
        check_target(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_name(path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(tmp, flags, permissions)
        try:
            os.fchmod(fd, permissions)  # the umask may have taken bits away; add none either
            kwargs: dict = {} if "b" in mode else {"newline": "", "encoding": "utf-8"}
            with os.fdopen(fd, mode, **kwargs) as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.written.append((tmp, path))

    def commit(self) -> None:
        for tmp, path in self.written:
            os.replace(tmp, path)
        for folder in {path.parent for _, path in self.written}:
            fsync_folder(folder)
        self.written = []

    def discard(self) -> None:
        for tmp, _ in self.written:
            tmp.unlink(missing_ok=True)
        self.written = []

    def __enter__(self) -> ReportSet:
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is None:
            self.commit()
        else:
            self.discard()


@contextmanager
def atomic_write(
    path: str | os.PathLike, mode: str = "w", permissions: int = REPORT_MODE
) -> Iterator[IO[Any]]:
    """Write to a temporary sibling, fsync, rename over ``path``, fsync the folder."""
    with ReportSet() as reports, reports.write(path, mode, permissions) as handle:
        yield handle


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def remove_dead_temporaries(targets: list[Path | None]) -> int:
    """Remove temporary siblings of ``targets`` whose writer was on this host and is no
    longer running (a run killed with SIGKILL). Returns how many were removed."""
    removed = 0
    for target in targets:
        if target is None or not target.parent.is_dir():
            continue
        for candidate in target.parent.glob(f".{target.name}.*.tmp"):
            match = _TEMP.match(candidate.name)
            if not match or match["name"] != target.name or match["host"] != _HOST:
                continue
            if int(match["pid"]) != os.getpid() and not _process_alive(int(match["pid"])):
                candidate.unlink(missing_ok=True)
                removed += 1
    return removed


def open_private(path: Path, flags: int = os.O_WRONLY | os.O_APPEND) -> int:
    """Open (creating owner-only) a private file — the state, its lock, the log — and
    return its descriptor: never through a symbolic link (``O_NOFOLLOW``: a link planted
    at the path by another user would otherwise have its target truncated, appended to or
    chmod-ed), never blocking on a pipe (``O_NONBLOCK`` while opening), and only a regular
    file; group and world bits are taken off it. Raises :class:`TargetError` (an OSError)
    otherwise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    nonblock = getattr(os, "O_NONBLOCK", 0)
    cloexec = getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags | os.O_CREAT | nofollow | nonblock | cloexec, PRIVATE_MODE)
    except OSError as exc:
        if os.path.islink(path):
            raise TargetError(
                f"{path} is a symbolic link; private files are never opened through a link"
            ) from None
        raise TargetError(f"cannot open {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise TargetError(f"{path} is not a regular file (a device, pipe or socket)")
        if nonblock and hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        if stat.S_IMODE(info.st_mode) & ~PRIVATE_MODE:
            os.fchmod(fd, PRIVATE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


_KINDS = {
    stat.S_IFIFO: "a named pipe (FIFO)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFDIR: "a directory",
}


class FileTooLarge(TargetError):
    """A file larger than the limit its reader accepts."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"file too large ({size:,} bytes > {limit:,})")
        self.size, self.limit = size, limit


def read_regular(path: str | os.PathLike, max_bytes: int, inside: str | None = None) -> bytes:
    """The bytes of a regular file (an image, a labels list, a key), or :class:`TargetError`
    with the reason (:class:`FileTooLarge` past ``max_bytes``).

    Opens without blocking (a FIFO named like an image would otherwise hang the run),
    refuses anything but a regular file and anything larger than ``max_bytes`` before
    reading, and, when ``inside`` (a real folder path) is given, checks after opening that
    the file really opened lies inside it: a file swapped for a symbolic link between
    discovery and reading cannot make the scanner read outside the scanned folder.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        if os.path.islink(path):
            raise TargetError("dangling link: its target does not exist") from None
        raise TargetError("file vanished before it could be read") from None
    except PermissionError:
        raise TargetError("permission denied") from None
    except OSError as exc:
        raise TargetError(f"cannot open: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = _KINDS.get(stat.S_IFMT(info.st_mode), "not a regular file")
            raise TargetError(f"not a regular file ({kind}); not read")
        if info.st_size > max_bytes:
            raise FileTooLarge(info.st_size, max_bytes)
        if inside is not None and not _opened_inside(fd, inside):
            raise TargetError(
                "file became a link out of the scanned folder after discovery; not read"
            )
        chunks, remaining = [], max_bytes + 1
        while remaining > 0:
            try:
                chunk = os.read(fd, min(remaining, 1 << 20))
            except BlockingIOError:
                raise TargetError("file cannot be read without blocking") from None
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        if remaining <= 0:
            raise TargetError(f"file grew past {max_bytes} bytes while being read")
        return b"".join(chunks)
    except IsADirectoryError:
        raise TargetError("is a directory") from None
    except OSError as exc:
        raise TargetError(f"read error: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def _opened_inside(fd: int, folder: str) -> bool:
    """Whether the file behind ``fd`` lies inside the real path ``folder`` (Linux:
    /proc/self/fd; elsewhere the check is skipped)."""
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return True
    return is_inside(real, folder)


def is_inside(real: str, folder: str) -> bool:
    """Whether the real path ``real`` is ``folder`` or lies below it (both resolved)."""
    return real == folder or real.startswith(folder.rstrip(os.sep) + os.sep)


def check_private(path: Path) -> None:
    """Refuse a path that is a symbolic link or not a regular file, if it exists (the
    companions SQLite opens by name, such as ``state.db-wal``)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode):
        raise TargetError(
            f"{path} is a symbolic link; private files are never opened through a link"
        )
    if not stat.S_ISREG(info.st_mode):
        raise TargetError(f"{path} is not a regular file (a device, pipe or socket)")


def create_private(path: Path) -> None:
    """Create ``path`` owner-only if it does not exist (a state file SQLite will open by
    name), with the checks of :func:`open_private`."""
    os.close(open_private(path))
