"""One API request's run on the scheduler, seen from the event loop.

`Generation` submits the request's prompts (n samples each) to the served model's scheduler. The
model process's receiver thread hands each iteration's events to the loop's `Mailbox`, which
wakes the event loop once per iteration for all requests together (not once per request), and
puts them on each request's queue. `updates()` takes everything queued at each wake-up, so a
client that fell behind gets one write for several steps instead of one per token; it turns
events into per-choice `Update`s (text and tool parts from `SampleDecoder`, finish reasons, and
the tokens' log-probabilities when the request asked for them),
cancels a sample the moment one of its stop strings matches, and records the latency metrics
with the model process's own step times. `close()` cancels whatever is still running: a
disconnected client frees its cache slots at the scheduler's next iteration.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from nanochat.engine import SamplingParams, TopLogprobs
from nanochat.scheduler import Event

from inference.metrics import Metrics
from inference.served import ServedModel
from inference.textstream import Part, SampleDecoder


class GenerationError(Exception):
    """The model process failed or was stopped under a running request."""


@dataclass(frozen=True)
class Scored:
    """A token with its log-probability (None for a prompt's first token) and top alternatives."""

    token: int
    logprob: float | None
    top: TopLogprobs


@dataclass
class Choice:
    index: int
    decoder: SampleDecoder
    parts: list[Part] = field(default_factory=list)
    tokens: int = 0
    finish_reason: str | None = None
    last_token_at: float | None = None
    logprobs: list[Scored] = field(default_factory=list)  # every generated token's, when asked
    prompt_logprobs: list[Scored] | None = None  # the prompt's, when asked (echo)


@dataclass(frozen=True)
class Update:
    choice: int
    parts: list[Part]
    finish_reason: str | None
    logprobs: list[Scored] = field(default_factory=list)  # the tokens' since the last update
    prompt_logprobs: list[Scored] | None = None  # once, with the choice's first token

    def after(self, prior: Update) -> Update:
        """This update merged after `prior`, of the same choice."""
        return Update(
            self.choice,
            prior.parts + self.parts,
            self.finish_reason,
            prior.logprobs + self.logprobs,
            prior.prompt_logprobs or self.prompt_logprobs,
        )


class Mailbox:
    """Events from the receiver thread to the event loop, with at most one wake-up in flight."""

    _by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox] = weakref.WeakKeyDictionary()
    _create = threading.Lock()

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.items: list[tuple[asyncio.Queue, tuple]] = []

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> Mailbox:
        with cls._create:
            box = cls._by_loop.get(loop)
            if box is None:
                box = cls._by_loop[loop] = cls(loop)
            return box

    def post(self, queue: asyncio.Queue, item: tuple) -> None:
        """Any thread."""
        with self.lock:
            self.items.append((queue, item))
            wake = len(self.items) == 1
        if wake:
            self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self.lock:
            items, self.items = self.items, []
        for queue, item in items:
            queue.put_nowait(item)


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
        score_only: bool = False,
    ):
        """score_only: the request scores its prompts and generates nothing (max_tokens 0): the
        one token each sample makes to get its prompt's log-probabilities is not returned, and
        every choice ends "length"."""
        self.served, self.n, self.metrics = served, n, metrics
        self.score_only = score_only
        self.mailbox = Mailbox.of(asyncio.get_running_loop())
        self.queue: asyncio.Queue[tuple[int, list[Event], float]] = asyncio.Queue()
        self.started = time.monotonic()
        self.first_token_at: float | None = None
        self.prompts = prompts
        self.prompt_tokens = sum(len(p) for p in prompts)
        tokenizer = served.tokenizer
        self.choices = [Choice(i, SampleDecoder(tokenizer, stop)) for i in range(len(prompts) * n)]
        self.handles = []
        try:
            for p, prompt in enumerate(prompts):
                self.handles.append(
                    served.scheduler.submit(prompt, params, self._poster(p), n=n, stop_token_ids=stop_token_ids)
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

    def _poster(self, prompt_index: int):
        def post(events: list[Event], at: float) -> None:
            """Called on the model process's receiver thread."""
            self.mailbox.post(self.queue, (prompt_index, events, at))

        return post

    async def updates(self) -> AsyncIterator[list[Update]]:
        """Each batch of updates as it arrives, until every choice has finished; what queued up
        meanwhile comes as one batch, each choice's parts merged."""
        while not self.finished:
            batch = [await self.queue.get()]
            while not self.queue.empty():
                batch.append(self.queue.get_nowait())
            merged: dict[int, Update] = {}
            generated = 0
            for prompt_index, events, at in batch:
                for event in events:
                    choice = self.choices[prompt_index * self.n + event.sample]
                    generated += event.token is not None and choice.finish_reason is None and not self.score_only
                    update = self._apply(choice, event, at)
                    if update is not None:
                        prior = merged.get(update.choice)
                        merged[update.choice] = update if prior is None else update.after(prior)
            self.metrics.generation_tokens.inc(generated)
            if merged:
                yield list(merged.values())
        self.metrics.e2e.observe(time.monotonic() - self.started)

    def _apply(self, choice: Choice, event: Event, at: float) -> Update | None:
        if choice.finish_reason is not None:
            return None  # e.g. tokens already in flight after a stop string matched
        scored, prompt_scored = [], None
        if event.prompt_logprobs is not None:
            prompt = self.prompts[choice.index // self.n]
            prompt_scored = [Scored(t, lp, top) for t, (lp, top) in zip(prompt, event.prompt_logprobs)]
            choice.prompt_logprobs = prompt_scored
        if self.score_only and event.token is not None:
            return None if prompt_scored is None else Update(choice.index, [], None, [], prompt_scored)
        if event.token is not None and event.logprob is not None:
            scored = [Scored(event.token, event.logprob, event.top_logprobs)]
            choice.logprobs.extend(scored)
        if event.token is not None:
            if self.first_token_at is None:
                self.first_token_at = at
                self.metrics.ttft.observe(max(0.0, at - self.started))
            if choice.last_token_at is not None:
                self.metrics.itl.observe(at - choice.last_token_at)
            choice.last_token_at = at
            choice.tokens += 1
            parts = choice.decoder.feed(event.token)
            if choice.decoder.stopped:
                handle = self.handles[choice.index // self.n]
                self.served.scheduler.cancel(handle, choice.index % self.n)
                choice.finish_reason = "stop"
        else:
            if event.finish_reason in ("error", "cancelled"):
                raise GenerationError(event.error or "the model was stopped while generating")
            parts = choice.decoder.finish()
            choice.finish_reason = "length" if self.score_only else event.finish_reason
        choice.parts.extend(parts)
        if not parts and choice.finish_reason is None and not scored and prompt_scored is None:
            return None
        return Update(choice.index, parts, choice.finish_reason, scored, prompt_scored)

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
