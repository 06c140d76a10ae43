"""A job's growing log and events files, read as a bounded window or followed as SSE.

Event ids are byte offsets into the file, so a client that reconnects with `Last-Event-ID` goes
on exactly where it left off. Followers are capped (`max_followers`, then 429) and share one
job-state check per job every `follow_poll_s` instead of each asking the database itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import HTTPException
from sqlalchemy.exc import OperationalError
from sse_starlette import EventSourceResponse
from starlette.types import Receive, Scope, Send

from trainer.db import TERMINAL, Database, Job

# The largest byte offset a client may ask for: files never grow near it, and seek takes int64.
MAX_OFFSET = 2**62
SSE_POLL_S = 0.2
SSE_CHUNK = 64 * 1024
FOLLOW_RETRY_AFTER_S = 5


@dataclass
class _Check:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    checked_at: float = float("-inf")
    ended: bool = False
    followers: int = 0


class Followers:
    """The open streams, at most `limit`, and the job-state checks they share."""

    def __init__(self, db: Database, limit: int, poll_s: float):
        self.db, self.limit, self.poll_s = db, limit, poll_s
        self.open = 0
        self._lock = threading.Lock()
        self._checks: dict[str, _Check] = {}

    def take(self) -> Callable[[], None]:
        """A slot for one stream, or 429; the returned function gives it back (once)."""
        with self._lock:
            if self.open >= self.limit:
                raise HTTPException(
                    429,
                    f"{self.open} log/event streams are open, the most this server serves; try again later",
                    headers={"Retry-After": str(FOLLOW_RETRY_AFTER_S)},
                )
            self.open += 1
        given_back = threading.Event()

        def give_back() -> None:
            with self._lock:
                if not given_back.is_set():
                    given_back.set()
                    self.open -= 1

        return give_back

    def watch(self, job_id: str) -> _Check:
        check = self._checks.setdefault(job_id, _Check())
        check.followers += 1
        return check

    def unwatch(self, job_id: str, check: _Check) -> None:
        check.followers -= 1
        if check.followers <= 0:
            self._checks.pop(job_id, None)

    async def ended(self, job_id: str, check: _Check) -> bool:
        """Whether the job is over, asked at most once every `poll_s` for all its followers; while
        the database cannot be reached, what it last said (the streams go on, and ask again)."""
        async with check.lock:
            if time.monotonic() - check.checked_at >= self.poll_s:
                with contextlib.suppress(OperationalError):
                    check.ended = await asyncio.to_thread(self._job_ended, job_id)
                check.checked_at = time.monotonic()
        return check.ended

    def _job_ended(self, job_id: str) -> bool:
        with self.db.session() as s:
            job = s.get(Job, job_id)
            return job is None or job.status in TERMINAL


class FollowResponse(EventSourceResponse):
    """An SSE response (lines end in \\n, as the UI and tests read them) that gives its follower
    slot back however the stream ends."""

    def __init__(self, events: AsyncIterator[dict[str, str]], give_back: Callable[[], None]):
        super().__init__(events, sep="\n", headers={"Cache-Control": "no-cache"})
        self.give_back = give_back

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.give_back()


def follow(followers: Followers, job_id: str, path: Path, start: int, lines: bool) -> FollowResponse:
    """SSE over a growing file: each event carries whole lines and its id is the byte offset
    after them; ends (event `end`) once the job is over and the file is read to its end. Raises
    429 when `followers` are at their cap."""
    give_back = followers.take()
    return FollowResponse(_events(followers, job_id, path, start, lines), give_back)


async def _events(
    followers: Followers, job_id: str, path: Path, start: int, lines: bool
) -> AsyncIterator[dict[str, str]]:
    check = followers.watch(job_id)
    pos = start
    try:
        while True:
            # The job's state first, then the file: what a job wrote before it ended is then read.
            ended = await followers.ended(job_id, check)
            chunk = await asyncio.to_thread(read_window, path, pos, SSE_CHUNK) if _size(path) > pos else b""
            cut = chunk.rfind(b"\n") + 1
            # Whole lines, but a line longer than a chunk goes in pieces, and an ended job's last
            # unfinished line as it is.
            if cut == 0 and (ended or len(chunk) == SSE_CHUNK):
                cut = len(chunk)
            if cut:
                for piece in chunk[:cut].splitlines(keepends=True) if lines else [chunk[:cut]]:
                    pos += len(piece)
                    text = piece.decode("utf-8", "replace").rstrip("\r\n")
                    if lines and not text.strip():
                        continue
                    yield {"data": text, "id": str(pos)}
                continue
            if ended:
                yield {"data": json.dumps({"offset": pos}), "id": str(pos), "event": "end"}
                return
            await asyncio.sleep(SSE_POLL_S)
    finally:
        followers.unwatch(job_id, check)


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def read_window(path: Path, offset: int, limit: int) -> bytes:
    """At most `limit` bytes of the file from `offset` (none past its end or of a missing file)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(limit)
    except FileNotFoundError:
        return b""


def log_window(path: Path, offset: int, limit: int, tail: int | None) -> tuple[bytes, int, int]:
    """(bytes, their start offset, the file's size): `limit` bytes from `offset`, or with `tail`
    the last `tail` bytes (at most `limit` of them); only those bytes are read."""
    size = _size(path)
    start = max(0, size - tail) if tail is not None else offset
    return read_window(path, start, limit), start, size


def start_offset(offset: int, last_event_id: str | None) -> int:
    if last_event_id is None:
        return offset
    if not re.fullmatch(r"[0-9]{1,19}", last_event_id) or int(last_event_id) > MAX_OFFSET:
        raise HTTPException(
            400, f"Last-Event-ID must be a byte offset from 0 to {MAX_OFFSET}, got {last_event_id[:40]!r}"
        )
    return int(last_event_id)
