"""A job's curves for plots, from the JSON events its stages wrote.

`CurveCache` keeps each events file's curves as read so far and reads only what was appended
since (a file replaced by a new one is read again from its start), so polling the curves of a
long run costs what it wrote since the last poll, not its whole history.
"""

from __future__ import annotations

import json
import os
import threading
from array import array
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from trainer.schemas import MetricsOut

SERIES = ("loss", "lr", "tok_per_s", "mfu", "eta_s")
CACHED_FILES = 32
READ_CHUNK = 4 << 20


class Series:
    """(step, value) points as two arrays of doubles: 16 bytes a point, where a list of tuples
    takes about 100, so a long run's curves stay small in the cache."""

    __slots__ = ("steps", "values")

    def __init__(self) -> None:
        self.steps, self.values = array("d"), array("d")

    def append(self, step: float, value: float) -> None:
        self.steps.append(step)
        self.values.append(value)

    def points(self) -> list[tuple[float, float]]:
        return list(zip(self.steps, self.values))


class Curves:
    """The series of every stage, built one event at a time."""

    def __init__(self) -> None:
        self.by_stage: dict[str, dict[str, Series]] = {}
        self.last_step: dict[str, float] = {}
        self.trained: list[str] = []  # stages whose progress carries a loss, in the order they first reported

    def add(self, event: dict[str, Any]) -> None:
        name = event.get("stage")
        if not isinstance(name, str):
            return
        series = self.by_stage.setdefault(name, {})
        if event.get("type") == "progress" and _number(event.get("step")):
            self.last_step[name] = event["step"]
            if name not in self.trained and _number(event.get("loss")):
                self.trained.append(name)
            for key in SERIES:
                if _number(event.get(key)):
                    series.setdefault(key, Series()).append(self.last_step[name], event[key])
        elif event.get("type") == "eval" and isinstance(event.get("name"), str) and _number(event.get("value")):
            series.setdefault(event["name"], Series()).append(self.last_step.get(name, 0), event["value"])

    def result(self, stage: str | None, current_stage: str | None) -> MetricsOut:
        """The series of `stage`, else of the current stage, or, when that one draws no loss curve
        (an eval, the report), of the last stage that did; `stages` lists those with a loss curve."""
        if stage is None:
            stage = current_stage
            if stage not in self.trained and self.trained:
                stage = self.trained[-1]
        series = {key: points.points() for key, points in self.by_stage.get(stage, {}).items()}
        # Built from checked numbers only: validating a long run's points again would double the cost.
        return MetricsOut.model_construct(stage=stage, series=series, stages=list(self.trained))


def _number(value: Any) -> bool:
    """A JSON number a double holds (no bool, no integer past the double range)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        float(value)
    except OverflowError:
        return False
    return True


def curves(events: Iterable[dict[str, Any]], stage: str | None, current_stage: str | None) -> MetricsOut:
    """The curves of a list of events (see `Curves.result`)."""
    built = Curves()
    for event in events:
        built.add(event)
    return built.result(stage, current_stage)


class _File:
    def __init__(self, inode: int) -> None:
        self.inode, self.offset, self.curves, self.lock = inode, 0, Curves(), threading.Lock()


class CurveCache:
    """The curves of the most recently asked events files, each read on from where it was left."""

    def __init__(self, size: int = CACHED_FILES) -> None:
        self.size = size
        self._files: OrderedDict[Path, _File] = OrderedDict()
        self._lock = threading.Lock()

    def result(self, path: Path, stage: str | None, current_stage: str | None) -> MetricsOut:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return Curves().result(stage, current_stage)
        entry = self._entry(path, st.st_ino, st.st_size)
        with entry.lock:
            if st.st_size > entry.offset:
                self._read_on(path, entry)
            return entry.curves.result(stage, current_stage)

    def _entry(self, path: Path, inode: int, size: int) -> _File:
        with self._lock:
            entry = self._files.get(path)
            # Another file under the name, or one cut shorter: what was read of it no longer holds.
            if entry is None or entry.inode != inode or size < entry.offset:
                entry = self._files[path] = _File(inode)
            self._files.move_to_end(path)
            while len(self._files) > self.size:
                self._files.popitem(last=False)
            return entry

    @staticmethod
    def _read_on(path: Path, entry: _File) -> None:
        with open(path, "rb") as f:
            f.seek(entry.offset)
            while chunk := f.read(READ_CHUNK):
                # Only whole lines: a line being written is read once it ends.
                whole = chunk[: chunk.rfind(b"\n") + 1]
                if not whole:
                    if len(chunk) < READ_CHUNK:
                        return
                    whole = chunk  # a line longer than a chunk is no event: skipped, as its rest will be
                for line in whole.splitlines():
                    try:
                        event = json.loads(line)
                    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                        continue
                    if isinstance(event, dict):
                        entry.curves.add(event)
                entry.offset += len(whole)
                f.seek(entry.offset)
