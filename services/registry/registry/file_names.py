"""Which file paths a version may hold: relative POSIX paths that round-trip through a URL (the
client percent-encodes each segment; the server decodes UTF-8), a JSON answer and a file system.

Refused: absolute paths, drive letters, backslashes, empty, `.` and `..` segments (they would
escape or alias the version's folder), control characters and NUL, text that is not valid
Unicode (a lone surrogate decodes from JSON but encodes neither as UTF-8 nor in a URL), and a
segment over 255 bytes of UTF-8 (no common file system can create it). `#`, `?`, `%` and spaces
are allowed: percent-encoded they arrive unchanged.
"""

from __future__ import annotations

import re

MAX_LENGTH = 512
MAX_SEGMENT_BYTES = 255


def check(path: str, max_length: int = MAX_LENGTH) -> str:
    """`path` if a version may hold it, else ValueError naming it."""
    if not path or len(path) > max_length:
        raise ValueError(f"file path must be 1..{max_length} characters")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"file path {ascii(path)} is not valid Unicode text (a lone surrogate)") from None
    if any(ord(c) < 32 or c == "\x7f" for c in path):
        raise ValueError(f"file path {ascii(path)} contains NUL or control characters")
    if path.startswith("/") or "\\" in path or re.match(r"^[A-Za-z]:", path):
        raise ValueError(f"file path {path!r} must be relative, with '/' separators")
    segments = path.split("/")
    if any(part in ("", ".", "..") for part in segments):
        raise ValueError(f"file path {path!r} has an empty, '.' or '..' component")
    long = next((part for part in segments if len(part.encode("utf-8")) > MAX_SEGMENT_BYTES), None)
    if long is not None:
        raise ValueError(f"file path {path!r} has a segment of more than {MAX_SEGMENT_BYTES} bytes of UTF-8")
    return path
