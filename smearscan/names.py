"""File names as reports and logs show them: every name printable, one line, lossless.

Lab shares carry names from Windows and macOS clients in other encodings, and names with
line breaks or terminal escape sequences. Python hands undecodable bytes over as lone
surrogates (``surrogateescape``), which no UTF-8 report can hold. Report paths therefore
escape, reversibly:

- a byte that is not valid UTF-8 as ``\\xNN``;
- a control character as ``\\n``, ``\\r``, ``\\t``, ``\\xNN`` (C0 and DEL) or ``\\uNNNN``
  (C1), so a row is one line and a name never drives a terminal that shows a log;
- the Unicode line and paragraph separators and the bidirectional controls (U+2028/2029,
  U+200E/200F, U+202A–202E, U+2066–2069) as ``\\uNNNN``: some viewers break lines at the
  first, and the others make a name display as another ("Trojan Source");
- a backslash as ``\\\\`` (so the escapes are unambiguous).

:func:`unescape_name` gives back the exact name on disk.
"""

from __future__ import annotations

import os
import re

#: What discovery takes for an image, by extension (case-insensitive). Kept here, with the
#: other name rules, so that walking a share never imports the image libraries.
IMAGE_SUFFIXES = frozenset({".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp"})

#: Image and slide formats that discovery does not take (by extension): a crop saved as one
#: of these is left out of the report, so a scan says how many it left out and of which type.
UNREAD_IMAGE_SUFFIXES = frozenset(
    {".gif", ".jp2", ".j2k", ".jpx", ".jpf", ".jxl", ".jfif", ".jpe", ".heic", ".heif", ".avif"}
    | {".pgm", ".ppm", ".pbm", ".pnm", ".exr", ".hdr", ".tga", ".psd", ".ico"}
    | {".dcm", ".dicom", ".svs", ".ndpi", ".czi", ".scn", ".mrxs", ".vsi"}  # DICOM, whole slides
)

_SIMPLE = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}
_UNSAFE = re.compile(
    r"[\x00-\x1f\x7f-\x9f\\\udc80-\udcff\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
)
_ESCAPE = re.compile(r"\\(\\|n|r|t|x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4})")


def _escape(match: re.Match) -> str:
    char = match.group(0)
    if char in _SIMPLE:
        return _SIMPLE[char]
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte under surrogateescape
        return f"\\x{code - 0xDC00:02x}"
    if code >= 0x80:  # C1 control, line separator or bidirectional control
        return f"\\u{code:04x}"
    return f"\\x{code:02x}"


def display_name(name: str) -> str:
    """The escaped, printable, single-line form of a path or file name."""
    if not _UNSAFE.search(name):
        return name
    return _UNSAFE.sub(_escape, name)


def unescape_name(text: str) -> str:
    """Inverse of :func:`display_name`: the name as the OS gives it (with surrogateescape
    for bytes that are not UTF-8)."""
    if "\\" not in text:
        return text
    out: list[bytes] = []
    position = 0
    for match in _ESCAPE.finditer(text):
        out.append(text[position : match.start()].encode("utf-8", "surrogateescape"))
        token = match.group(1)
        if token == "\\":
            out.append(b"\\")
        elif token in ("n", "r", "t"):
            out.append({"n": b"\n", "r": b"\r", "t": b"\t"}[token])
        elif token[0] == "u":
            out.append(chr(int(token[1:], 16)).encode("utf-8"))
        else:
            out.append(bytes([int(token[1:], 16)]))
        position = match.end()
    out.append(text[position:].encode("utf-8", "surrogateescape"))
    return os.fsdecode(b"".join(out))


def name_suffix(name: str) -> str:
    """The extension of a bare file name, lower-case, with its dot ("" if none; leading
    dots are part of the name, as for ``splitext``)."""
    stripped = name.lstrip(".")
    dot = stripped.rfind(".")
    return stripped[dot:].lower() if dot >= 0 else ""


def is_image_name(name: str) -> bool:
    """By the extension of a bare file name, case-insensitive (called for every file of a
    share, so plain string work)."""
    return name_suffix(name) in IMAGE_SUFFIXES


def is_image_path(path: str | os.PathLike) -> bool:
    """:func:`is_image_name` of the path's last component."""
    return is_image_name(os.path.basename(os.fspath(path)))
