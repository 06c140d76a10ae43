"""Fixtures of the fault suite; the harness itself (the stack, `poll`, `Paused`) is `fault_harness`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fault_harness import Paused


@pytest.fixture
def paused() -> Iterator[list[Paused]]:
    """Pauses a test made; whatever happens, each is resumed at the end."""
    made: list[Paused] = []
    yield made
    for p in made:
        p.resume()
