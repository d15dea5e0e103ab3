"""Lazy, deterministic discovery of image files under one or more roots.

Walks with ``os.scandir`` (names sorted per folder) and yields as it goes, so the first
results appear before a large share is fully listed. Symbolic links are followed only
while they stay inside the scanned root, and each real folder is visited once (no loops).
"""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Iterable, Iterator
from operator import attrgetter
from pathlib import Path
from typing import NamedTuple

from smearscan.preprocess import is_image_name, is_image_path

log = logging.getLogger(__name__)


class Found(NamedTuple):
    """A discovered file: its path on disk, its path in reports and its slide.

    A named tuple, not a dataclass: one is built per file of a share, and a no-op nightly
    rerun over tens of thousands of files is mostly this bookkeeping.
    """

    path: str  # on disk; absolute for files found by walking a folder
    rel: str
    slide: str
    problem: str = ""  # non-empty: report this file as an error without reading it


def _inside(real: str, root_real: str) -> bool:
    return real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep)


def _slide_of(rel_parent: str, root_label: str, depth: int, prefix: str = "") -> str:
    """The folder holding a crop, relative to the root (first ``depth`` levels if > 0)."""
    if rel_parent in ("", "."):
        return root_label
    parts = rel_parent.split("/")
    return prefix + ("/".join(parts[:depth]) if depth > 0 else rel_parent)


def walk_root(
    root: str | os.PathLike,
    *,
    prefix: str = "",
    recursive: bool = True,
    pattern: str | None = None,
    slide_depth: int = 0,
) -> Iterator[Found]:
    """Image files under ``root`` in sorted depth-first order."""
    root = os.path.abspath(root)
    root_real = os.path.realpath(root)
    root_label = prefix.rstrip("/") or Path(root_real).name or "."
    visited: set[tuple[int, int]] = set()

    def matches(rel: str) -> bool:
        return (
            pattern is None
            or fnmatch.fnmatch(rel, pattern)
            or fnmatch.fnmatch(rel.rsplit("/", 1)[-1], pattern)
        )

    def walk(directory: str, rel_dir: str) -> Iterator[Found]:
        try:
            stat = os.stat(directory)
        except OSError as exc:
            log.warning("cannot open folder %s: %s", directory, exc.strerror)
            return
        key = (stat.st_dev, stat.st_ino)
        if key in visited:
            return
        visited.add(key)
        try:
            with os.scandir(directory) as entries:
                listed = sorted(entries, key=attrgetter("name"))
        except OSError as exc:
            log.warning("cannot list folder %s: %s", directory, exc.strerror)
            return
        subdirs = []
        slide = _slide_of(rel_dir, root_label, slide_depth, prefix)
        rel_prefix = f"{rel_dir}/" if rel_dir else ""
        for entry in listed:
            name = entry.name
            try:
                is_link = entry.is_symlink()
                is_dir = entry.is_dir()  # follows links
            except OSError:
                continue
            if is_link:
                real = os.path.realpath(entry.path)
                if not _inside(real, root_real):
                    rel = rel_prefix + name
                    if is_image_name(name) and matches(rel):
                        yield Found(
                            entry.path,
                            prefix + rel,
                            slide,
                            "symbolic link points outside the scanned folder; not followed",
                        )
                    else:
                        log.warning("not following %s: link leaves the scanned folder",
                                    prefix + rel)  # fmt: skip
                    continue
            if is_dir:
                if recursive:
                    subdirs.append((entry.path, rel_prefix + name))
                continue
            if not is_image_name(name):
                continue
            rel = rel_prefix + name
            if pattern is not None and not matches(rel):
                continue
            yield Found(entry.path, prefix + rel, slide)
        for path, rel in subdirs:
            yield from walk(path, rel)

    yield from walk(str(root), "")


def discover(
    inputs: Iterable[str | os.PathLike],
    *,
    recursive: bool = True,
    pattern: str | None = None,
    slide_depth: int = 0,
) -> Iterator[Found]:
    """Files and folders to scan, in the order given. With several folders, report paths are
    prefixed by each folder's name so they stay unique."""
    inputs = [Path(p) for p in inputs]
    folders = [p for p in inputs if p.is_dir()]
    several = len(folders) > 1
    for item in inputs:
        if item.is_dir():
            prefix = f"{Path(os.path.realpath(item)).name}/" if several else ""
            yield from walk_root(
                item, prefix=prefix, recursive=recursive, pattern=pattern, slide_depth=slide_depth
            )
        else:
            yield from explicit_files([item])


def explicit_files(paths: Iterable[str | os.PathLike]) -> Iterator[Found]:
    """Files named one by one (``--files-from``): reported as given, slide = parent folder.
    Missing files and non-images still get a row, since the user asked for them by name."""
    for raw in paths:
        path = Path(raw)
        parent = path.parent.name or Path(os.path.realpath(path.parent)).name or "."
        problem = ""
        if not path.exists() and not path.is_symlink():
            problem = "file not found"
        elif path.is_dir():
            problem = "is a directory"
        elif not is_image_path(path):
            problem = f"not an image file type ({path.suffix or 'no extension'})"
        yield Found(str(path), str(raw), parent, problem)


def read_file_list(stream: Iterable[str]) -> Iterator[str]:
    """Paths from a ``--files-from`` list: one per line, blank lines and ``#`` comments ignored."""
    for line in stream:
        line = line.rstrip("\r\n")
        if line.strip() and not line.lstrip().startswith("#"):
            yield line
