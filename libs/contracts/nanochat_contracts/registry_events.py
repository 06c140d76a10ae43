"""Registry events: what the registry announces on Redis when its versions change.

Each event is one JSON object, published on the pub/sub channel `CHANNEL` and appended to the
capped stream `STREAM` (for readers that were away):

    type     "model.registered" (a version became ready) | "alias.moved" | "version.deleted"
    name     the model name
    version  the version the event is about (for alias.moved: the one the alias points at now)
    stage    that version's stage
    alias    the alias, on alias.moved only
    ts       unix time in seconds

Inference listens for `model.registered` of a served stage and `alias.moved` of its serving
alias, and resolves again on either (`serving`). Readers ignore fields they do not know, so the
registry may add some without breaking them.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nanochat_contracts.stages import Stage

CHANNEL = "nanochat:events"
STREAM = "nanochat:events:stream"

EventType = Literal["model.registered", "alias.moved", "version.deleted"]


class RegistryEvent(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: EventType
    name: str
    version: int
    stage: Stage
    alias: str | None = None
    ts: float = Field(default_factory=time.time)

    def payload(self) -> dict:
        """The JSON object as published (no `alias` key on the events that have none)."""
        return self.model_dump(exclude_none=True)


def parse_registry_event(data: bytes | str) -> RegistryEvent | None:
    """One published payload -> its event, or None when it is not a registry event."""
    try:
        return RegistryEvent.model_validate_json(data)
    except ValidationError:
        return None
