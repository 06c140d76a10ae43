"""One API request's run on the scheduler, seen from the event loop.

`Generation` submits the request's prompts (n samples each) to the served model's scheduler; its
receiver thread posts each iteration's events from the model process into an asyncio queue with `call_soon_threadsafe`, so
the event loop never waits on the model. `updates()` turns them into per-choice `Update`s (text
and tool parts from `SampleDecoder`, finish reasons), cancels a sample the moment one of its
stop strings matches, and records the latency metrics. `close()` cancels whatever is still
running: a disconnected client frees its cache slots at the scheduler's next iteration.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial

from nanochat.engine import SamplingParams
from nanochat.scheduler import Event

from inference.metrics import Metrics
from inference.served import ServedModel
from inference.textstream import Part, SampleDecoder


class GenerationError(Exception):
    """The model process failed or was stopped under a running request."""


@dataclass
class Choice:
    index: int
    decoder: SampleDecoder
    parts: list[Part] = field(default_factory=list)
    tokens: int = 0
    finish_reason: str | None = None
    last_token_at: float | None = None


@dataclass(frozen=True)
class Update:
    choice: int
    parts: list[Part]
    finish_reason: str | None


class Generation:
    def __init__(
        self,
        served: ServedModel,
        prompts: list[list[int]],
        params: SamplingParams,
        n: int,
        stop: list[str],
        stop_token_ids: list[int],
        metrics: Metrics,
    ):
        self.served, self.n, self.metrics = served, n, metrics
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, list[Event]]] = asyncio.Queue()
        self.started = time.monotonic()
        self.first_token_at: float | None = None
        self.prompt_tokens = sum(len(p) for p in prompts)
        tokenizer = served.tokenizer
        self.choices = [Choice(i, SampleDecoder(tokenizer, stop)) for i in range(len(prompts) * n)]
        self.handles = []
        try:
            for p, prompt in enumerate(prompts):
                self.handles.append(
                    served.scheduler.submit(prompt, params, partial(self._post, p), n=n, stop_token_ids=stop_token_ids)
                )
        except BaseException:
            self.close()
            raise
        metrics.prompt_tokens.inc(self.prompt_tokens)

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.choices)

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    def _post(self, prompt_index: int, events: list[Event]) -> None:
        """Called on the model process's receiver thread."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (prompt_index, events))

    async def updates(self) -> AsyncIterator[list[Update]]:
        """Each batch of updates as it arrives, until every choice has finished."""
        while not self.finished:
            prompt_index, events = await self.queue.get()
            now = time.monotonic()
            out = []
            for event in events:
                update = self._apply(self.choices[prompt_index * self.n + event.sample], event, now)
                if update is not None:
                    out.append(update)
            if out:
                yield out
        self.metrics.e2e.observe(time.monotonic() - self.started)

    def _apply(self, choice: Choice, event: Event, now: float) -> Update | None:
        if choice.finish_reason is not None:
            return None  # e.g. tokens already in flight after a stop string matched
        if event.token is not None:
            if self.first_token_at is None:
                self.first_token_at = now
                self.metrics.ttft.observe(now - self.started)
            if choice.last_token_at is not None:
                self.metrics.itl.observe(now - choice.last_token_at)
            choice.last_token_at = now
            choice.tokens += 1
            self.metrics.generation_tokens.inc()
            parts = choice.decoder.feed(event.token)
            if choice.decoder.stopped:
                handle = self.handles[choice.index // self.n]
                self.served.scheduler.cancel(handle, choice.index % self.n)
                choice.finish_reason = "stop"
        else:
            if event.finish_reason in ("error", "cancelled"):
                raise GenerationError(event.error or "the model was stopped while generating")
            parts = choice.decoder.finish()
            choice.finish_reason = event.finish_reason
        choice.parts.extend(parts)
        if not parts and choice.finish_reason is None:
            return None
        return Update(choice.index, parts, choice.finish_reason)

    async def collect(self) -> None:
        async for _ in self.updates():
            pass

    def close(self) -> None:
        """Cancel every sample still running (no-op once all finished)."""
        if not self.finished:
            for handle in self.handles:
                self.served.scheduler.cancel(handle)


def merge_text(parts: list[Part]) -> list[Part]:
    """Adjacent text parts joined (a message's parts, a stream's delta)."""
    merged: list[Part] = []
    for kind, text in parts:
        if merged and kind == "text" and merged[-1][0] == "text":
            merged[-1] = ("text", merged[-1][1] + text)
        else:
            merged.append((kind, text))
    return merged
