"""The serving rule: which version of a model the inference server serves.

The version the `serving` alias points at, when the model has that alias; otherwise the newest
ready version (the highest version number) whose stage is `sft` or `rl`. Newest wins whatever its
stage: an SFT model registered after an RL one is served, because it is the more recent work on
the model (a run that fine-tunes again after RL means it). To pin an older version, move the alias.

The registry's resolve applies this (`GET /v1/resolve/{name}` with no stage; with `?stage=` the
same rule over the stages given) and inference asks it, so the rule lives here and runs there.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Protocol, TypeVar

from nanochat_contracts.stages import Stage

SERVED_STAGES: tuple[Stage, ...] = ("sft", "rl")
SERVING_ALIAS = "serving"


class Candidate(Protocol):
    """What the rule reads of a version (a registry row, a client's `VersionInfo`, a test's tuple)."""

    @property
    def version(self) -> int: ...
    @property
    def stage(self) -> str: ...
    @property
    def state(self) -> str: ...


V = TypeVar("V", bound=Candidate)


def newest(versions: Iterable[V], stages: Collection[str] = SERVED_STAGES) -> V | None:
    """The ready version with the highest number among those whose stage is in `stages`, or None."""
    eligible = [v for v in versions if v.state == "ready" and v.stage in stages]
    return max(eligible, key=lambda v: v.version, default=None)
