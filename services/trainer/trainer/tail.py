"""A job's growing log and events files, read from a byte offset or followed as SSE.

Event ids are byte offsets into the file, so a client that reconnects with `Last-Event-ID` goes
on exactly where it left off.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from fastapi import HTTPException, Request

from trainer.db import TERMINAL
from trainer.deps import State, load_job

SSE_POLL_S = 0.2
SSE_CHUNK = 64 * 1024


def sse_tail(state: State, job_id: str, path: Path, start: int, request: Request, lines: bool) -> AsyncIterator[str]:
    """SSE over a growing file: each event carries whole lines and its id is the byte offset
    after them; ends (event `end`) once the job is over and the file is read to its end."""

    async def stream() -> AsyncIterator[str]:
        pos = start
        while True:
            ended = (await asyncio.to_thread(load_job, state, job_id)).status in TERMINAL
            chunk = await asyncio.to_thread(read_from, path, pos, SSE_CHUNK)
            cut = chunk.rfind(b"\n") + 1
            if cut == 0 and ended and len(chunk) < SSE_CHUNK:
                cut = len(chunk)
            if cut:
                body = chunk[:cut]
                for piece in body.splitlines(keepends=True) if lines else [body]:
                    pos += len(piece)
                    text = piece.decode("utf-8", "replace").rstrip("\r\n")
                    if lines and not text.strip():
                        continue
                    data = "\n".join(f"data: {ln}" for ln in text.split("\n"))
                    yield f"id: {pos}\n{data}\n\n"
                continue
            if ended:
                yield f"id: {pos}\nevent: end\ndata: {json.dumps({'offset': pos})}\n\n"
                return
            if await request.is_disconnected():
                return
            await asyncio.sleep(SSE_POLL_S)

    return stream()


def read_from(path: Path, offset: int, size: int = -1) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(size)
    except FileNotFoundError:
        return b""


def start_offset(offset: int, last_event_id: str | None) -> int:
    if last_event_id is None:
        return offset
    try:
        value = int(last_event_id)
    except ValueError:
        raise HTTPException(400, f"Last-Event-ID must be a byte offset, got {last_event_id!r}") from None
    if value < 0:
        raise HTTPException(400, "Last-Event-ID must not be negative")
    return value


def read_events(path: Path) -> Iterator[dict[str, Any]]:
    if not path.exists():
        return
    with open(path) as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue
