"""Continuous batching: a waiting queue and a running batch over one preallocated KV cache.

The scheduler drives an `engine.DecodeBatch` (`slots` rows of `max_len` positions: memory is fixed
up front and admission is exact, a request needs `n` free slots). Each iteration it

1. applies cancellations (a client went away, a stop string matched): the rows leave at once and
   their slots are free for this very iteration;
2. admits waiting requests, first come first served, while enough slots are free;
3. prefills admitted prompts in chunks under a token budget (`prefill_tokens` per iteration,
   `decode_prefill_tokens` while rows decode, padding counted), so a long prompt is spread over
   several iterations instead of stalling the decodes running beside it; what the prefix cache
   (`prefix_cache.py`) already holds of a prompt is not prefilled again; when a prompt is
   complete its cached prefix is forked into the request's `n` slots and those rows join the
   batch;
4. runs one decode step for every running row and hands each request its new tokens.

Every request carries its own `SamplingParams` (and so its own seeded generator per sample: the
same seed gives the same text whatever else is in the batch), extra stop token ids, and `n`.
Sample i of a request seeded s samples with `engine.row_seed(s, i)`, as `DecodeBatch.add` does.

    scheduler = Scheduler(engine, slots=32)
    scheduler.start(threads=1)                # the model thread, with 1 intra-op torch thread
    handle = scheduler.submit(prompt_ids, SamplingParams(temperature=0, max_tokens=64),
                              on_events=lambda events: ...)   # called on the model thread
    scheduler.cancel(handle)                  # from any thread
    scheduler.stop()

Without `start()`, `iterate()` runs one iteration on the caller's thread (RL rollouts and evals can
drive it directly). `on_events` receives, once per iteration, the list of new `Event`s of that
request: tokens (`token`, `mask`: 0 for tokens the calculator forced) and one finish event per
sample (`finish_reason` "stop", "length", "cancelled" or "error"). The stop token that ends a row
is not passed on as a token.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from nanochat.engine import (
    PREFILL_CHUNK,
    DecodeBatch,
    Engine,
    Row,
    SamplingParams,
    TopLogprobs,
    check_params,
    row_seed,
)
from nanochat.prefix_cache import BLOCK_SIZE, PrefixCache

log = logging.getLogger("nanochat.scheduler")


class QueueFull(Exception):
    """More than `max_waiting` requests wait beyond what the free slots take; retry later."""


class Event(NamedTuple):
    """A tuple, not a dataclass: a model process pickles one per token per step.

    The log-probabilities are there only when the request's params ask (`SamplingParams.logprobs`):
    the token's and its top alternatives as (id, logprob) pairs; `prompt_logprobs` once, on a
    sample's first token, one (logprob, top) per prompt token (None for the first)."""

    sample: int
    token: int | None = None  # a generated token; None on a finish event
    mask: int = 1
    finish_reason: str | None = None
    error: str | None = None
    logprob: float | None = None
    top_logprobs: TopLogprobs | None = None
    prompt_logprobs: tuple[tuple[float | None, TopLogprobs], ...] | None = None


@dataclass(eq=False)
class Handle:
    """One submitted request: n samples of one prompt."""

    id: int
    prompt: list[int]
    params: SamplingParams
    n: int
    stop_token_ids: frozenset[int]
    on_events: Callable[[list[Event]], None]
    submitted_at: float = field(default_factory=time.monotonic)
    slots: list[int] = field(default_factory=list)
    prefilled: int = 0  # prompt tokens already in the head slot's cache
    rows: list[Row | None] = field(default_factory=list)
    finished: list[bool] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return bool(self.finished) and all(self.finished)


@dataclass(frozen=True)
class Stats:
    waiting: int  # requests not yet admitted
    prefilling: int  # requests admitted whose prompt is still being prefilled
    running: int  # rows decoding
    slots: int
    used_slots: int
    cache_positions_used: int  # tokens held in the KV cache over all slots
    cache_positions: int  # slots x max_len
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache, since the start
    prefix_hits: int = 0  # of those, tokens found there (their prefill was skipped)


class Scheduler:
    def __init__(
        self,
        engine: Engine,
        slots: int = 32,
        max_len: int | None = None,
        prefill_tokens: int = 2 * PREFILL_CHUNK,
        max_waiting: int = 256,
        prefix_block: int = BLOCK_SIZE,
        decode_prefill_tokens: int | None = None,
    ):
        """prefix_block: the prefix cache's block size in tokens, 0 turns prefix caching off;
        decode_prefill_tokens: the prefill budget of an iteration while rows decode (default: the same)."""
        if prefill_tokens < 1 or max_waiting < 0:
            raise ValueError(f"prefill_tokens must be >= 1 and max_waiting >= 0, got {prefill_tokens}, {max_waiting}")
        self.engine = engine
        self.batch: DecodeBatch = engine.new_batch(slots, max_len)
        self.prefix = PrefixCache(self.batch.capacity, prefix_block) if prefix_block else None
        self.prefill_tokens = prefill_tokens
        self.decode_prefill_tokens = min(prefill_tokens, decode_prefill_tokens or prefill_tokens)
        self.max_waiting = max_waiting
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._waiting: deque[Handle] = deque()  # guarded by _cond
        self._cancels: deque[tuple[Handle, int | None]] = deque()  # guarded by _cond
        self._prefilling: list[Handle] = []  # model thread only, like everything below
        self._reserved: set[int] = set()
        self._by_slot: dict[int, tuple[Handle, int]] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False

    @property
    def slots(self) -> int:
        return self.batch.capacity

    @property
    def max_len(self) -> int:
        return self.batch.max_len

    # ---- any thread --------------------------------------------------------------------------

    def submit(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        on_events: Callable[[list[Event]], None],
        n: int = 1,
        stop_token_ids: Iterable[int] = (),
    ) -> Handle:
        """Queue a request; raises ValueError for a bad one and QueueFull when the queue is full."""
        prompt = self.engine.check_prompt(prompt, self.max_len)
        check_params(params, self.engine.model.config.vocab_size)
        if not isinstance(n, int) or not 1 <= n <= self.slots:
            raise ValueError(f"n must be an integer in [1, {self.slots}] (the cache's slots), got {n!r}")
        handle = Handle(
            id=next(self._ids),
            prompt=prompt,
            params=params,
            n=n,
            stop_token_ids=frozenset(int(t) for t in stop_token_ids),
            on_events=on_events,
        )
        with self._cond:
            # Requests that free slots will take at the next iteration do not count as waiting,
            # so a burst up to the free capacity is never turned away.
            free = max(0, self.slots - len(self.batch.rows) - len(self._reserved))
            if len(self._waiting) >= self.max_waiting + free:
                raise QueueFull(f"the waiting queue is full ({self.max_waiting} requests beyond the free slots)")
            self._waiting.append(handle)
            self._cond.notify()
        return handle

    def cancel(self, handle: Handle, sample: int | None = None) -> None:
        """Stop one sample of `handle` (all by default); slots are freed at the start of the next iteration."""
        with self._cond:
            self._cancels.append((handle, sample))
            self._cond.notify()

    def stats(self) -> Stats:
        # Under the lock: admission and a prompt's rows joining the batch move a request between
        # these counts under it too, so a reader never sees it in none or in two of them.
        with self._cond:
            waiting = len(self._waiting)
            used = len(self.batch.rows) + len(self._reserved)
        lengths = self.batch.cache.lengths
        return Stats(
            waiting=waiting,
            prefilling=len(self._prefilling),
            running=len(self.batch.rows),
            slots=self.slots,
            used_slots=used,
            cache_positions_used=int(lengths.sum()),
            cache_positions=self.slots * self.max_len,
            prefix_queries=self.prefix.queries if self.prefix else 0,
            prefix_hits=self.prefix.hits if self.prefix else 0,
        )

    def idle(self) -> bool:
        with self._cond:
            return not (self._waiting or self._cancels or self._prefilling or self.batch.rows)

    def start(self, threads: int | None = None, after_iteration: Callable[[], None] | None = None) -> None:
        """Run iterations on a daemon thread until `stop()`; `threads` sets torch's intra-op threads there.

        `after_iteration` runs on that thread after each iteration, once its events are delivered
        (a model process sends them on as one message there).

        On a small CPU box, intra-op threads that outnumber the free cores spin against the
        event loop and each other: one thread is several times faster than two on a loaded
        2-core machine (see bench/serve.py).
        """
        if self._thread is not None:
            raise RuntimeError("the scheduler is already running")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be None or an integer >= 1, got {threads!r}")
        self._thread = threading.Thread(
            target=self._run, args=(threads, after_iteration), name="nanochat-scheduler", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop the thread; requests still queued or running are finished as cancelled."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._cond:
            pending = list(self._waiting) + self._prefilling + [h for h, _ in self._by_slot.values()]
            self._waiting.clear()
        for handle in dict.fromkeys(pending):
            self._finish_all(handle, "cancelled")

    def _run(self, threads: int | None, after_iteration: Callable[[], None] | None) -> None:
        if threads is not None:
            # OpenMP keeps the thread count per OS thread, so it is set on the model thread itself.
            torch.set_num_threads(threads)
        while True:
            with self._cond:
                while not self._stopping and not (
                    self._waiting or self._cancels or self._prefilling or self.batch.rows
                ):
                    self._cond.wait()
                if self._stopping:
                    return
            try:
                self.iterate()
            except Exception as e:  # a bug or an out-of-memory must not kill the thread silently
                log.exception("scheduler iteration failed")
                self._fail_everything(f"{type(e).__name__}: {e}")
            if after_iteration is not None:
                after_iteration()

    # ---- model thread ------------------------------------------------------------------------

    @torch.no_grad()
    def iterate(self) -> None:
        """One iteration: cancellations, admission, a prefill chunk, one decode step."""
        self._apply_cancels()
        self._admit()
        if self._prefilling:
            self._prefill()
        if self.batch.rows:
            self._decode()

    def _apply_cancels(self) -> None:
        with self._cond:
            cancels, self._cancels = list(self._cancels), deque()
            for handle, sample in cancels:
                if sample is None and handle in self._waiting:
                    self._waiting.remove(handle)
        for handle, sample in cancels:
            if handle.rows:
                for i, row in enumerate(handle.rows):
                    if (sample is None or i == sample) and not handle.finished[i]:
                        self.batch.cancel(row)
                        self._left(row)
                        del self._by_slot[row.slot]
                        handle.finished[i] = True
                        self._deliver(handle, [Event(i, finish_reason="cancelled")])
            elif sample is None or handle.n == 1:
                # Not decoding yet: the samples share one prefill, so the request goes as a whole.
                if handle in self._prefilling:
                    self._prefilling.remove(handle)
                    self._reserved.difference_update(handle.slots)
                    for slot in handle.slots:
                        self._released(slot)
                self._finish_all(handle, "cancelled")

    def _admit(self) -> None:
        free = [s for s in self.batch.free_slots() if s not in self._reserved]
        with self._cond:
            while self._waiting and self._waiting[0].n <= len(free):
                handle = self._waiting.popleft()
                handle.slots = self._claim(handle, free)
                free = [s for s in free if s not in handle.slots]
                self._reserved.update(handle.slots)
                self._prefilling.append(handle)

    def _claim(self, handle: Handle, free: list[int]) -> list[int]:
        """The request's slots, the head one holding whatever the prefix cache had of its prompt."""
        cache = self.batch.cache
        if self.prefix is None:
            cache.reset(free[0])
            return free[: handle.n]
        claim = self.prefix.claim(handle.prompt, free)
        for source, destination, start, stop in claim.copies:
            cache.copy(source, destination, start, stop)
        cache.reset(claim.slot)
        cache.advance(claim.cached, claim.slot)
        handle.prefilled = claim.cached
        slots = [claim.slot]
        for _ in range(handle.n - 1):  # the other samples' slots, emptied for the fork
            rest = [s for s in free if s not in slots]
            for source, destination, start, stop in self.prefix.vacate(rest[0], rest[1:]):
                cache.copy(source, destination, start, stop)
            slots.append(rest[0])
        return slots

    def _left(self, row: Row) -> None:
        """A row left the batch: what its slot's cache holds stays findable until the slot is taken."""
        if self.prefix:
            self.prefix.register(row.slot, (row.prompt + row.tokens)[: row.cached])
        self._released(row.slot)

    def _released(self, slot: int) -> None:
        if self.prefix:
            self.prefix.release(slot)

    def _prefill(self) -> None:
        """Feed the next chunk of as many prefilling prompts as the token budget allows."""
        chosen: list[tuple[Handle, list[int]]] = []
        width = 0
        budget = self.decode_prefill_tokens if self.batch.rows else self.prefill_tokens
        for handle in self._prefilling:
            left = len(handle.prompt) - handle.prefilled
            chunk_len = min(left, PREFILL_CHUNK, max(budget // (len(chosen) + 1), 1))
            new_width = max(width, chunk_len)
            if chosen and new_width * (len(chosen) + 1) > budget:
                break
            chosen.append((handle, handle.prompt[handle.prefilled : handle.prefilled + chunk_len]))
            width = new_width
        idx = torch.zeros((len(chosen), width), dtype=torch.long)
        for i, (_, chunk) in enumerate(chosen):
            idx[i, : len(chunk)] = torch.tensor(chunk)
        counts = [len(chunk) for _, chunk in chosen]
        logits = self.engine.forward(
            idx.to(self.engine.device), self.batch.cache, [h.slots[0] for h, _ in chosen], counts, last_only=True
        )
        for i, (handle, chunk) in enumerate(chosen):
            handle.prefilled += len(chunk)
            if handle.prefilled == len(handle.prompt):
                self._prefilling.remove(handle)
                self._start_rows(handle, logits[i, 0])

    def _start_rows(self, handle: Handle, last_logits: torch.Tensor) -> None:
        """Fork the prefilled prompt into the request's slots and let its rows join the batch."""
        if self.prefix:
            self.prefix.register(handle.slots[0], handle.prompt)  # a running row never rewrites its prompt
        self.batch.cache.fork(handle.slots[0], handle.slots[1:])
        seed = secrets.randbits(62) if handle.params.seed is None else handle.params.seed
        handle.rows, handle.finished = [], [False] * handle.n
        for i, slot in enumerate(handle.slots):
            generator = torch.Generator(device=self.engine.device)
            generator.manual_seed(row_seed(seed, i))
            handle.rows.append(
                Row(slot=slot, prompt=handle.prompt, params=handle.params, generator=generator, logits=last_logits)
            )
        with self._cond:
            for i, row in enumerate(handle.rows):
                self.batch.rows[row.slot] = row
                self._by_slot[row.slot] = (handle, i)
            self._reserved.difference_update(handle.slots)

    def _decode(self) -> None:
        events: dict[Handle, list[Event]] = {}
        for t in self.batch.step():
            handle, sample = self._by_slot[t.row.slot]
            out = events.setdefault(handle, [])
            finished = t.finished
            if t.mask and t.token in handle.stop_token_ids:
                if not finished:
                    self.batch.cancel(t.row)
                t.row.finish_reason, finished = "stop", True
            elif not (finished and t.row.finish_reason == "stop" and t.token in self.engine.stop_tokens):
                out.append(Event(sample, t.token, t.mask, None, None, t.logprob, t.top_logprobs, t.prompt_logprobs))
            if finished:
                self._left(t.row)
                del self._by_slot[t.row.slot]
                handle.finished[sample] = True
                out.append(Event(sample, finish_reason=t.row.finish_reason))
        for handle, out in events.items():
            self._deliver(handle, out)

    def _finish_all(self, handle: Handle, reason: str, error: str | None = None) -> None:
        if not handle.finished:
            handle.finished = [False] * handle.n
        out = [Event(i, finish_reason=reason, error=error) for i, done in enumerate(handle.finished) if not done]
        handle.finished = [True] * handle.n
        if out:
            self._deliver(handle, out)

    def _fail_everything(self, message: str) -> None:
        handles = list(dict.fromkeys(self._prefilling + [h for h, _ in self._by_slot.values()]))
        for row in list(self.batch.rows.values()):
            self.batch.cancel(row)
        self._prefilling.clear()
        self._reserved.clear()
        self._by_slot.clear()
        if self.prefix:
            self.prefix.clear()  # a failed forward may have left any slot half written
        for handle in handles:
            self._finish_all(handle, "error", message)

    @staticmethod
    def _deliver(handle: Handle, events: list[Event]) -> None:
        try:
            handle.on_events(events)
        except Exception:  # one broken consumer must not stop the batch
            log.exception("on_events of request %d failed", handle.id)
