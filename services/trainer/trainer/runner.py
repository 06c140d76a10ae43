"""Run one stage under torchrun in its own session and watch it: log, events, cancel, exit.

    result = run_stage(command, env, log_path, on_event, should_stop, on_started, grace, job_id)

`on_started(pgid)` is called as soon as the process exists, so the job record holds the group id
before anything else can go wrong. stdout and stderr go to the log file line by line; stdout lines
that parse as stage events are handed to `on_event` as well. `should_stop()` is polled; when it
returns a reason, the job's processes get SIGTERM, `grace` seconds, then SIGKILL (see
`trainer.procs`; `env` must carry the job's marker). On return no process of the job is left.
"""

from __future__ import annotations

import os
import queue
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from nanochat_contracts.events import parse_event_line

from trainer.procs import terminate_job

POLL_S = 0.1


@dataclass
class StageResult:
    returncode: int
    stopped: str | None = None
    finished: dict[str, Any] | None = None
    last_error: str | None = None
    events: int = 0
    log_tail: str = ""


@dataclass
class _Log:
    path: Path
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.file = open(self.path, "ab")

    def write(self, line: bytes) -> None:
        with self.lock:
            self.file.write(line if line.endswith(b"\n") else line + b"\n")
            self.file.flush()

    def close(self) -> None:
        with self.lock:
            self.file.close()


def tail(path: Path, lines: int = 30, max_bytes: int = 16384) -> str:
    """The last `lines` lines of a log file (at most `max_bytes`)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return ""
    return b"\n".join(data.splitlines()[-lines:]).decode("utf-8", "replace")


def _pump(stream: IO[bytes], log: _Log, events: queue.Queue | None) -> None:
    for line in iter(stream.readline, b""):
        log.write(line)
        if events is not None:
            event = parse_event_line(line.decode("utf-8", "replace"))
            if event is not None:
                events.put(event.model_dump(mode="json"))
    stream.close()


def run_stage(
    command: list[str],
    env: dict[str, str],
    log_path: Path,
    on_event: Callable[[dict[str, Any]], None],
    should_stop: Callable[[], str | None],
    on_started: Callable[[int], None],
    grace: float,
    tag: str,
) -> StageResult:
    log = _Log(log_path)
    log.write(f"[trainer] $ {' '.join(command)}".encode())
    proc = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    pgid = proc.pid
    events: queue.Queue = queue.Queue()
    readers = [
        threading.Thread(target=_pump, args=(proc.stdout, log, events), daemon=True),
        threading.Thread(target=_pump, args=(proc.stderr, log, None), daemon=True),
    ]
    for t in readers:
        t.start()
    result = StageResult(returncode=-1)
    try:
        on_started(pgid)
        watch(
            result,
            events,
            on_event,
            lambda: proc.poll() is not None,
            should_stop,
            lambda: terminate_job(pgid, tag, grace),
            log,
        )
    finally:
        # Whatever happened (an exception in a callback, RQ's timeout), leave no process behind.
        terminate_job(pgid, tag, grace)
        result.returncode = proc.wait()
        for t in readers:
            t.join(timeout=5)
        while not events.empty():
            _record(result, events.get_nowait(), on_event)
        log.write(f"[trainer] stage exited with code {result.returncode}".encode())
        log.close()
    result.log_tail = tail(log_path)
    return result


def watch(
    result: StageResult,
    events: queue.Queue,
    on_event: Callable[[dict[str, Any]], None],
    exited: Callable[[], bool],
    should_stop: Callable[[], str | None],
    stop: Callable[[], None],
    log: _Log,
) -> None:
    """Hand each event to `on_event` until the stage has exited and its queue is empty. `should_stop`
    is polled on a clock, not only when the stage is quiet (one that emits an event every few ms
    must not hold off a cancel or a shutdown until it ends); its first reason calls `stop()`."""
    last_check = 0.0
    while True:
        try:
            _record(result, events.get(timeout=POLL_S), on_event)
        except queue.Empty:
            if exited():
                return
        now = time.monotonic()
        if result.stopped is not None or now - last_check < POLL_S:
            continue
        last_check = now
        reason = should_stop()
        if reason:
            result.stopped = reason
            log.write(f"[trainer] stopping the stage: {reason}".encode())
            stop()


def _record(result: StageResult, event: dict[str, Any], on_event: Callable[[dict[str, Any]], None]) -> None:
    result.events += 1
    if event["type"] == "finished":
        result.finished = event
    elif event["type"] == "error":
        result.last_error = event["message"]
    on_event(event)
