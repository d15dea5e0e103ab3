"""Lazy, deterministic discovery of image files under one or more roots.

Walks with ``os.scandir`` (names sorted per folder) and an explicit stack (no recursion
limit, however deep a share is nested), yielding as it goes so the first results appear
before a large share is fully listed. Symbolic links are followed only while they stay
inside the scanned root, and each real folder is visited once (no loops). A folder that
cannot be listed becomes an error row, not a log line: a report must never look complete
when part of the share was unreadable. Report names are escaped (:mod:`smearscan.names`),
so no file name can break a report or a terminal.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
import stat
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, ClassVar, NamedTuple

from smearscan.files import is_inside
from smearscan.names import (
    UNREAD_IMAGE_SUFFIXES,
    display_name,
    is_image_name,
    is_image_path,
    name_suffix,
)

log = logging.getLogger(__name__)


class Found(NamedTuple):
    """A discovered file: its path on disk, its path in reports and its slide.

    A named tuple, not a dataclass: one is built per file of a share, and a no-op nightly
    rerun over tens of thousands of files is mostly this bookkeeping.
    """

    path: str  # on disk; absolute for files found by walking a folder
    rel: str  # as reported (escaped)
    slide: str  # as reported (escaped)
    problem: str = ""  # non-empty: report this file as an error without reading it
    root: str | None = None  # real path of the scanned folder: reading must stay inside it


#: System folders that file servers and desktops write into shares, hidden by convention
#: though their names do not start with a dot: Synology's thumbnails and recycle bin,
#: Windows' recycle bin and volume data, the resource forks macOS puts in zip files.
HIDDEN_FOLDERS = frozenset(
    {"@eaDir", "#recycle", "#snapshot", "$RECYCLE.BIN", "System Volume Information", "__MACOSX"}
)


def is_hidden(name: str, is_folder: bool) -> bool:
    """Skipped unless ``--include-hidden``, as fd and ripgrep do: dot files and folders
    (macOS AppleDouble ``._*`` files, ``.DS_Store``, ``.thumbs/``) and :data:`HIDDEN_FOLDERS`."""
    return name.startswith(".") or (is_folder and name in HIDDEN_FOLDERS)


@dataclass
class Skipped:
    """What a walk left out without a row, for the summary: hidden files and folders, and
    files that are not of an image type smearscan reads, counted by extension (a crop saved
    as GIF or JPEG 2000 must not vanish from a report without a trace)."""

    hidden_files: int = 0
    hidden_folders: int = 0
    other_types: Counter[str] = field(default_factory=Counter)

    #: how many extensions the summary lists (a share's odd names can have thousands)
    SHOWN_TYPES: ClassVar[int] = 20

    def add_other(self, name: str) -> None:
        self.other_types[name_suffix(name)] += 1

    def unread_images(self) -> dict[str, int]:
        """The left-out files whose extension is an image or slide format smearscan does
        not read (:data:`~smearscan.names.UNREAD_IMAGE_SUFFIXES`), by extension."""
        return {
            suffix: count
            for suffix, count in sorted(self.other_types.items())
            if suffix in UNREAD_IMAGE_SUFFIXES
        }

    def to_dict(self) -> dict:
        return {
            "hidden_files": self.hidden_files,
            "hidden_folders": self.hidden_folders,
            "other_files": sum(self.other_types.values()),
            "other_types": {
                suffix or "(none)": count
                for suffix, count in self.other_types.most_common(self.SHOWN_TYPES)
            },
            "unread_images": self.unread_images(),
        }


def _slide_of(rel_parent: str, root_label: str, depth: int, prefix: str = "") -> str:
    """The folder holding a crop, relative to the root (first ``depth`` levels if > 0)."""
    if rel_parent in ("", "."):
        return root_label
    parts = rel_parent.split("/")
    return prefix + ("/".join(parts[:depth]) if depth > 0 else rel_parent)


def compile_pattern(pattern: str | None, case_sensitive: bool = False):
    """A matcher for ``--glob``: against the relative path or the file name, ignoring case
    by default (lab scanners write both ``.BMP`` and ``.bmp``)."""
    if pattern is None:
        return None
    flags = 0 if case_sensitive else re.IGNORECASE
    regex = re.compile(fnmatch.translate(pattern), flags)

    def matches(rel: str) -> bool:
        return bool(regex.match(rel) or regex.match(rel.rsplit("/", 1)[-1]))

    return matches


def walk_root(
    root: str | os.PathLike,
    *,
    prefix: str = "",
    recursive: bool = True,
    pattern: str | None = None,
    slide_depth: int = 0,
    case_sensitive: bool = False,
    include_hidden: bool = False,
    skipped: Skipped | None = None,
) -> Iterator[Found]:
    """Image files under ``root`` in sorted depth-first order; hidden files and folders
    (:func:`is_hidden`) are skipped and counted in ``skipped`` unless ``include_hidden``."""
    root = os.path.abspath(root)
    root_real = os.path.realpath(root)
    root_label = display_name(prefix.rstrip("/") or Path(root_real).name or ".")
    prefix = display_name(prefix)
    matches = compile_pattern(pattern, case_sensitive)
    visited: set[tuple[int, int]] = set()
    # (folder on disk, its path relative to the root); popped from the end, so children
    # are pushed in reverse to keep sorted depth-first order
    stack: list[tuple[str, str]] = [(str(root), "")]
    while stack:
        directory, rel_dir = stack.pop()
        slide = _slide_of(display_name(rel_dir), root_label, slide_depth, prefix)
        try:
            info = os.stat(directory)
            key = (info.st_dev, info.st_ino)
            if key in visited:
                continue
            visited.add(key)
            with os.scandir(directory) as entries:
                listed = sorted(entries, key=lambda entry: entry.name)
        except OSError as exc:
            shown = display_name(rel_dir or ".")
            log.warning("cannot list folder %s: %s", prefix + shown, exc.strerror or exc)
            yield Found(
                directory,
                f"{prefix}{shown}/",
                slide,
                f"cannot list folder: {exc.strerror or exc}",
                root_real,
            )
            continue
        subdirs = []
        rel_prefix = f"{rel_dir}/" if rel_dir else ""
        for entry in listed:
            name = entry.name
            rel = rel_prefix + name
            try:
                is_link = entry.is_symlink()
                is_dir = entry.is_dir()  # follows links
            except OSError:
                is_link = is_dir = False
            if is_link:
                real = os.path.realpath(entry.path)
                if not is_inside(real, root_real):
                    if is_image_name(name) and (matches is None or matches(rel)):
                        yield Found(
                            entry.path,
                            prefix + display_name(rel),
                            slide,
                            "symbolic link points outside the scanned folder; not followed",
                            root_real,
                        )
                    else:
                        log.warning(
                            "not following %s: link leaves the scanned folder",
                            prefix + display_name(rel),
                        )
                    continue
            if not include_hidden and is_hidden(name, is_dir):
                if skipped is not None:
                    if is_dir:
                        skipped.hidden_folders += 1
                    elif is_image_name(name):
                        skipped.hidden_files += 1
                continue
            if is_dir:
                if recursive:
                    subdirs.append((entry.path, rel))
                continue
            if not is_image_name(name):
                if skipped is not None and (matches is None or matches(rel)):
                    skipped.add_other(name)
                continue
            if matches is not None and not matches(rel):
                continue
            problem = ""
            try:
                if not entry.is_file():
                    mode = entry.stat().st_mode
                    if not stat.S_ISREG(mode):
                        problem = "not a regular file (a pipe, socket or device); not read"
            except OSError:
                pass  # vanished or unreadable: the reader says why
            yield Found(entry.path, prefix + display_name(rel), slide, problem, root_real)
        stack.extend(reversed(subdirs))


def unique_prefixes(folders: list[Path]) -> dict[Path, str]:
    """A stable report prefix per folder: its name, or as many trailing path components as
    it takes to tell it apart from the others (``siteA/slides/``, ``siteB/slides/``)."""
    reals = {folder: Path(os.path.realpath(folder)) for folder in folders}
    prefixes: dict[Path, str] = {}
    for folder, real in reals.items():
        parts = real.parts
        for depth in range(1, len(parts) + 1):
            candidate = "/".join(p for p in parts[-depth:] if p != os.sep)
            clashes = [
                other
                for other, other_real in reals.items()
                if other != folder
                and other_real != real
                and "/".join(p for p in other_real.parts[-depth:] if p != os.sep) == candidate
            ]
            if not clashes:
                prefixes[folder] = (candidate or ".") + "/"
                break
        else:
            prefixes[folder] = str(real).strip("/") + "/"
    return prefixes


def covering_roots(folders: list[Path]) -> list[Path]:
    """The folders left after dropping each one that another folder (or an earlier
    duplicate) already covers: overlapping inputs are scanned once."""
    kept: list[Path] = []
    reals: list[str] = []
    for folder in folders:
        real = os.path.realpath(folder)
        others = [os.path.realpath(f) for f in folders if f is not folder]
        if any(is_inside(real, other) and real != other for other in others):
            log.info("%s is inside another input folder; scanned once", display_name(str(folder)))
            continue
        if real in reals:
            continue
        kept.append(folder)
        reals.append(real)
    return kept


def discover(
    inputs: Iterable[str | os.PathLike],
    *,
    recursive: bool = True,
    pattern: str | None = None,
    slide_depth: int = 0,
    case_sensitive: bool = False,
    include_hidden: bool = False,
    skipped: Skipped | None = None,
) -> Iterator[Found]:
    """Files and folders to scan, in the order given. With several folders, report paths are
    prefixed by a unique name per folder; overlapping inputs are scanned once. Files named
    explicitly are never skipped as hidden."""
    paths = [Path(p) for p in inputs]
    folders = covering_roots([p for p in paths if p.is_dir()])
    prefixes = unique_prefixes(folders) if len(folders) > 1 else {}
    walked = [os.path.realpath(f) for f in folders]
    seen_files: set[str] = set()
    for item in paths:
        if item.is_dir():
            if item in folders:
                yield from walk_root(
                    item,
                    prefix=prefixes.get(item, ""),
                    recursive=recursive,
                    pattern=pattern,
                    slide_depth=slide_depth,
                    case_sensitive=case_sensitive,
                    include_hidden=include_hidden,
                    skipped=skipped,
                )
            continue
        real = os.path.realpath(item)
        if real in seen_files or any(is_inside(real, root) for root in walked):
            continue
        seen_files.add(real)
        yield from explicit_files([item])


def _problem_of(path: Path) -> str:
    """Why a named file cannot be read ("" if it can be tried); never raises: one bad name
    (a NUL byte, a name longer than the system allows) is one error row, not a failed run."""
    if "\0" in str(path):
        return "the name contains a NUL byte; not read"
    try:
        if not path.exists() and not path.is_symlink():
            return "file not found"
        if path.is_dir():
            return "is a directory"
    except (OSError, ValueError) as exc:
        return f"cannot use this name: {getattr(exc, 'strerror', None) or exc}"
    if not is_image_path(path):
        return f"not an image file type ({display_name(path.suffix) or 'no extension'})"
    return ""


def explicit_slides(paths: list[Path]) -> dict[Path, str]:
    """Slide names of files named one by one: the parent folder's name, with as many of its
    own parents as it takes to keep same-named folders of different places apart
    (``siteA/p1`` and ``siteB/p1``, never one slide ``p1``)."""
    usable = []
    for path in paths:
        try:
            if "\0" not in str(path) and path.parent.is_dir():
                usable.append(path.parent)
        except (OSError, ValueError):
            continue
    by_name: dict[str, list[Path]] = {}
    for parent in dict.fromkeys(usable):
        by_name.setdefault(Path(os.path.realpath(parent)).name, []).append(parent)
    slides = {}
    for name, parents in by_name.items():
        if len({os.path.realpath(p) for p in parents}) == 1:  # the usual case: no clash
            slides.update(dict.fromkeys(parents, name or "."))
        else:
            slides.update({p: prefix.rstrip("/") for p, prefix in unique_prefixes(parents).items()})
    return slides


def explicit_files(paths: Iterable[str | os.PathLike]) -> Iterator[Found]:
    """Files named one by one (``--files-from``): reported as given, slide = parent folder
    (see :func:`explicit_slides`). Missing files, bad names and non-images still get a row,
    since the user asked for them by name."""
    named = [(str(raw), Path(raw)) for raw in paths]
    slides = explicit_slides([path for _, path in named])
    for raw, path in named:
        slide = slides.get(path.parent) or path.parent.name or "."
        yield Found(str(path), display_name(raw), display_name(slide), _problem_of(path))


def file_key(path: str) -> str:
    """One spelling per file: absolute, as named (the state's row key, and what makes a file
    named twice one file). Absolute names are taken as they are: this runs once per file of
    a share."""
    return path if path[:1] == os.sep else os.path.abspath(path)


def unique_files(items: Iterable[Found]) -> Iterator[Found]:
    """Each file once, however often it was named (twice in a list, or as a file and inside a
    listed folder): one file, one row, with or without ``--state``."""
    seen: set[str] = set()
    for item in items:
        key = file_key(item.path)
        if key not in seen:
            seen.add(key)
            yield item


def read_file_list(stream: Iterable[str] | IO[str], nul_separated: bool = False) -> Iterator[str]:
    """Paths from a ``--files-from`` list: one per line, blank lines and ``#`` comments
    ignored; or, ``nul_separated`` (``find -print0``), separated by NUL bytes, taken as they
    are, so that names may hold newlines."""
    if nul_separated:
        text = stream.read() if hasattr(stream, "read") else "".join(stream)
        yield from (name for name in text.split("\0") if name)
        return
    for line in stream:
        line = line.rstrip("\r\n")
        if line.strip() and not line.lstrip().startswith("#"):
            yield line
