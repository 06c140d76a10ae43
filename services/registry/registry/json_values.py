"""The free-form JSON a version carries (metrics, meta, job id, file names): what the API accepts,
and how a stored value the API would refuse today is still answered.

A value is accepted only if every response can carry it: plain JSON (no NaN or Infinity), text
that encodes as UTF-8 (a lone surrogate such as "\\ud800" parses from JSON but cannot be written
back out), no NUL (PostgreSQL refuses it), nesting at most `MAX_DEPTH` deep (the response
serializer stops at 255 levels; nothing a stage writes comes near 64) and a bounded size. One
bad value stored would otherwise fail every listing and resolve that includes its version.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

MAX_DEPTH = 64
MAX_METRICS_BYTES = 256 * 1024
# meta.json holds a run's loss and bpb curves (one point per logged step): megabytes, not more.
MAX_META_BYTES = 4 * 1024 * 1024

log = logging.getLogger("registry.json_values")


def check_text(text: str) -> str:
    """`text` if it survives a round trip through UTF-8 and holds no NUL; else ValueError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode text (a lone surrogate at position {e.start})") from e
    if "\x00" in text:
        raise ValueError("NUL characters are not allowed")
    return text


def _depth_ok(value: Any, max_depth: int) -> bool:
    """Whether no container in `value` is nested deeper than `max_depth` (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > max_depth:
                return False
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return True


def check_json(value: Any, max_bytes: int) -> Any:
    """`value` if it is plain, UTF-8 encodable JSON of at most `MAX_DEPTH` levels and `max_bytes`
    bytes; else ValueError saying which rule it breaks."""
    if not _depth_ok(value, MAX_DEPTH):
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
    try:
        text = json.dumps(value, allow_nan=False, ensure_ascii=False)
    except ValueError as e:
        raise ValueError(f"not plain JSON: {e}") from e
    check_text(text)
    # json.dumps escapes NUL; PostgreSQL's JSON refuses the escape as well.
    if "\\u0000" in text:
        raise ValueError("NUL characters are not allowed")
    size = len(text.encode("utf-8"))
    if size > max_bytes:
        raise ValueError(f"{size} bytes as JSON, more than the {max_bytes} allowed")
    return value


def _repaired(value: Any, depth: int) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8").replace("\x00", "?")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if not isinstance(value, dict | list):
        return value
    if depth > MAX_DEPTH:
        return None
    if isinstance(value, list):
        return [_repaired(v, depth + 1) for v in value]
    return {_repaired(str(k), depth): _repaired(v, depth + 1) for k, v in value.items()}


def readable(value: Any, what: str) -> Any:
    """A stored value as a response can carry it. Rows written before the checks above may hold
    what they refuse; such a value is answered repaired (bad characters as "?", levels below
    `MAX_DEPTH` as null) instead of failing the listing or resolve of its model. The row is left
    as stored; a PATCH of the version's metrics writes them back repaired."""
    try:
        return check_json(value, max_bytes=2**62)
    except ValueError as e:
        log.warning("answering a repaired %s: the stored value is %s", what, e)
        return _repaired(value, 1)
