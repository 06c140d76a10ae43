"""Continuous batching: a waiting queue and a running batch over one paged KV cache.

The scheduler drives an `engine.DecodeBatch`: `slots` rows over a pool of KV blocks
(`kv_blocks.py`; `num_blocks`, by default enough for every slot at `max_len`). Memory is the pool,
fixed up front, and admission is exact in blocks. Each iteration it

1. applies cancellations (a client went away, a stop string matched): the rows leave at once and
   their blocks are free for this very iteration;
2. admits waiting requests, first come first served, while there are free slots and free blocks
   for the whole prompt (less what the prefix cache holds of it, shared with no copy) plus one
   block for each further sample's copy of the prompt's partial last block;
3. gives each decoding row that is about to fill its last block a new one; when the pool has none
   to spare, the newest running row (or prompt being prefilled) is preempted: its blocks are freed
   (what they hold stays findable) and it goes back to the front of the waiting queue, to be
   recomputed from its prompt plus what it has generated so far and then to go on where it
   stopped (its client sees a delay, no gap and no repeated token);
4. chooses the next chunks of admitted prompts under a token budget (`prefill_tokens` per iteration,
   padding counted); while rows decode, one prompt longer than `decode_prefill_tokens` is fed
   that many tokens an iteration, so a long prompt is spread over several iterations instead of
   stalling the decodes running beside it, and shorter prompts go whole beside it (a burst of
   short requests starts together, not one an iteration); when a prompt is complete it is forked
   into the request's `n` slots and those rows join the batch;
5. feeds the decoding rows' last tokens and the prefill chunks of step 4 through the model in one
   forward pass (`DecodeBatch.feed`: the weights are read once for both, which a small model's
   step is bound by), then chooses one token for every running row, those of prompts completed
   by this pass included, and hands each request its new tokens.

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
from nanochat.kv_blocks import BLOCK_SIZE

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
    rows: list[Row | None] = field(default_factory=list)
    finished: list[bool] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return bool(self.finished) and all(self.finished)


@dataclass(eq=False)
class _Work:
    """Tokens to prefill into a head slot: a new request's prompt (then forked into its n rows), or a
    preempted row's prompt and generated tokens (then that row, sample `resume`, goes on)."""

    handle: Handle
    tokens: list[int]
    n: int
    resume: int | None = None
    slots: list[int] = field(default_factory=list)
    prefilled: int = 0  # tokens already in the head slot's cache
    spare: int = 0  # free blocks held back for the forks' copies of the partial last block
    admitted: int = 0  # admission order: the newest is preempted first


@dataclass(frozen=True)
class Stats:
    waiting: int  # requests not yet admitted
    prefilling: int  # requests admitted whose prompt is still being prefilled
    running: int  # rows decoding
    slots: int
    used_slots: int
    kv_blocks_used: int  # KV blocks that running or prefilling sequences hold
    kv_blocks: int  # the pool's blocks (the null block left out)
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache, since the start
    prefix_hits: int = 0  # of those, tokens found there (their prefill was skipped)
    preemptions: int = 0  # rows or prompts sent back to wait for want of blocks, since the start


def check_fits(prompt_len: int, n: int, slots: int, pool_blocks: int, block_size: int) -> None:
    """ValueError unless `n` samples of a `prompt_len`-token prompt can ever run together: `n` slots,
    and the prompt's blocks plus one block per further sample (its own copy of the last one)."""
    if not isinstance(n, int) or not 1 <= n <= slots:
        raise ValueError(f"n must be an integer in [1, {slots}] (the cache's slots), got {n!r}")
    if -(-prompt_len // block_size) + n - 1 > pool_blocks:
        raise ValueError(
            f"a prompt of {prompt_len} tokens with n={n} needs more than the KV pool's {pool_blocks} "
            f"blocks of {block_size}"
        )


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
        num_blocks: int | None = None,
    ):
        """prefix_block: the KV blocks' size in tokens, 0 turns prefix caching off (blocks of BLOCK_SIZE);
        decode_prefill_tokens: while rows decode, the most tokens of a longer prompt an iteration feeds,
        one such prompt an iteration (default: prefill_tokens);
        num_blocks: the KV pool's size, the null block included (default: every slot at max_len)."""
        if prefill_tokens < 1 or max_waiting < 0:
            raise ValueError(f"prefill_tokens must be >= 1 and max_waiting >= 0, got {prefill_tokens}, {max_waiting}")
        self.engine = engine
        self.batch: DecodeBatch = engine.new_batch(
            slots,
            max_len,
            num_blocks=num_blocks,
            block_size=prefix_block or BLOCK_SIZE,
            prefix_caching=prefix_block > 0,
        )
        self.blocks = self.batch.blocks
        self.prefill_tokens = prefill_tokens
        self.decode_prefill_tokens = min(prefill_tokens, decode_prefill_tokens or prefill_tokens)
        self.max_waiting = max_waiting
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._waiting: deque[_Work] = deque()  # guarded by _cond
        self._cancels: deque[tuple[Handle, int | None]] = deque()  # guarded by _cond
        self._prefilling: list[_Work] = []  # model thread only, like everything below
        self._reserved: set[int] = set()
        self._by_slot: dict[int, tuple[Handle, int]] = {}
        self._admitted: dict[int, int] = {}  # slot -> admission order of its running row
        self._admissions = itertools.count(1)
        self._spare = 0  # the prefilling works' spare blocks, together
        self.prefix_queries = self.prefix_hits = self.preemptions = 0
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
        check_fits(len(prompt), n, self.slots, self.blocks.capacity, self.blocks.block_size)
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
            self._waiting.append(_Work(handle, prompt, n))
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
        return Stats(
            waiting=waiting,
            prefilling=len(self._prefilling),
            running=len(self.batch.rows),
            slots=self.slots,
            used_slots=used,
            kv_blocks_used=self.blocks.used,
            kv_blocks=self.blocks.capacity,
            prefix_queries=self.prefix_queries,
            prefix_hits=self.prefix_hits,
            preemptions=self.preemptions,
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
            pending = [w.handle for w in [*self._waiting, *self._prefilling]] + [h for h, _ in self._by_slot.values()]
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
        """One iteration: cancellations, admission, room for the decodes, one forward pass that feeds
        the decoding rows and the next prefill chunks together, then one token for every row."""
        self._apply_cancels()
        self._admit()
        if self.batch.rows:
            self._make_room()
        chosen = self._chunks() if self._prefilling else []
        if self.batch.rows or chosen:
            logits = self.batch.feed([chunk for _, chunk in chosen], [w.slots[0] for w, _ in chosen])
            self._prefilled(chosen, logits)
        if self.batch.rows:
            self._decode()

    def _apply_cancels(self) -> None:
        with self._cond:
            cancels, self._cancels = list(self._cancels), deque()
        for handle, sample in cancels:
            if handle.rows:
                for i, row in enumerate(handle.rows):
                    if (sample is None or i == sample) and not handle.finished[i]:
                        self._drop_row(handle, i, row)
                        handle.finished[i] = True
                        self._deliver(handle, [Event(i, finish_reason="cancelled")])
            elif sample is None or handle.n == 1:
                # Not decoding yet: the samples share one prefill, so the request goes as a whole.
                self._drop_work(handle, None)
                self._finish_all(handle, "cancelled")

    def _drop_row(self, handle: Handle, sample: int, row: Row) -> None:
        """Take a decoding or preempted row out of the scheduler, its blocks freed at once."""
        if self.batch.rows.get(row.slot) is row:
            self.batch.cancel(row)
            del self._by_slot[row.slot]
            del self._admitted[row.slot]
        else:
            self._drop_work(handle, sample)

    def _drop_work(self, handle: Handle, resume: int | None) -> None:
        """Forget the handle's waiting or prefilling work for sample `resume` (None: its prompt)."""
        with self._cond:
            for work in self._waiting:
                if work.handle is handle and work.resume == resume:
                    self._waiting.remove(work)
                    return
        for work in self._prefilling:
            if work.handle is handle and work.resume == resume:
                self._unadmit(work)
                return

    def _unadmit(self, work: _Work) -> None:
        """A prefilling work leaves: what it prefilled stays findable, its blocks and slots are free."""
        self._prefilling.remove(work)
        self.batch.release_slot(work.slots[0], work.tokens)
        self._spare -= work.spare
        with self._cond:
            self._reserved.difference_update(work.slots)
        work.slots, work.prefilled, work.spare = [], 0, 0

    def _admit(self) -> None:
        """Admit waiting works in order while their slots and blocks are free (exact: what admission
        counts is what the prompt and its forks will hold)."""
        free = [s for s in self.batch.free_slots() if s not in self._reserved]
        blocks, bs = self.blocks, self.blocks.block_size
        with self._cond:
            while self._waiting and self._waiting[0].n <= len(free):
                work = self._waiting[0]
                cached, names = blocks.match(work.tokens)
                fresh = blocks.blocks_for(len(work.tokens)) - len(cached)
                spare = (work.n - 1) * (len(work.tokens) % bs > 0)
                revived = sum(1 for b in cached if blocks.ref[b] == 0)  # free now, held once shared
                if fresh + spare + revived > blocks.free - self._spare:
                    break
                self._waiting.popleft()
                work.slots, free = free[: work.n], free[work.n :]
                head = work.slots[0]
                blocks.share(head, cached, names)
                blocks.allocate(head, fresh)
                work.prefilled = len(cached) * bs
                self.batch.cache.lengths[head] = work.prefilled
                self.batch.stage(head, names)
                work.spare, work.admitted = spare, next(self._admissions)
                self._spare += spare
                if blocks.caching:
                    self.prefix_queries += len(work.tokens)
                    self.prefix_hits += work.prefilled
                self._reserved.update(work.slots)
                self._prefilling.append(work)

    def _chunks(self) -> list[tuple[_Work, list[int]]]:
        """The next chunk of as many prefilling prompts as the token budget allows."""
        chosen: list[tuple[_Work, list[int]]] = []
        width, budget, long_fed = 0, self.prefill_tokens, False
        room = self.max_len  # the least any chosen row has left: padding is written past a row's length too
        cap = min(self.decode_prefill_tokens, PREFILL_CHUNK)  # a long prompt's chunk while rows decode
        for work in self._prefilling:
            left = len(work.tokens) - work.prefilled
            if self.batch.rows:
                if left > cap:
                    if long_fed:
                        continue
                    long_fed = True
                chunk_len = min(left, cap)
            else:
                chunk_len = min(left, PREFILL_CHUNK, max(budget // (len(chosen) + 1), 1))
            new_width = max(width, chunk_len)
            if chosen and new_width * (len(chosen) + 1) > budget:
                break
            new_room = min(room, self.max_len - int(self.batch.cache.lengths[work.slots[0]]))
            if new_width > new_room:
                continue
            chosen.append((work, work.tokens[work.prefilled : work.prefilled + chunk_len]))
            width, room = new_width, new_room
        return chosen

    def _prefilled(self, chosen: list[tuple[_Work, list[int]]], logits: torch.Tensor | None) -> None:
        """The chunks are fed (`logits`: after each one's last token): a prompt now complete starts its rows."""
        for i, (work, chunk) in enumerate(chosen):
            work.prefilled += len(chunk)
            # Named as soon as they are full, so prompts admitted meanwhile can share them.
            self.blocks.register(work.slots[0], work.tokens[: work.prefilled])
            if work.prefilled == len(work.tokens):
                self._prefilling.remove(work)
                self._spare -= work.spare
                self._start_rows(work, logits[i])

    def _start_rows(self, work: _Work, last_logits: torch.Tensor) -> None:
        """Fork the prefilled prompt into the request's slots and let its rows join the batch (or let
        the preempted row go on from the logits of what it had generated)."""
        handle = work.handle
        if work.resume is not None:
            row = handle.rows[work.resume]
            row.slot, row.logits = work.slots[0], last_logits
            new = [(work.resume, row)]
        else:
            self.batch.fork(work.slots[0], work.slots[1:])
            seed = secrets.randbits(62) if handle.params.seed is None else handle.params.seed
            handle.rows, handle.finished = [], [False] * handle.n
            for i, slot in enumerate(work.slots):
                generator = torch.Generator(device=self.engine.device)
                generator.manual_seed(row_seed(seed, i))
                handle.rows.append(
                    Row(slot=slot, prompt=handle.prompt, params=handle.params, generator=generator, logits=last_logits)
                )
            new = list(enumerate(handle.rows))
        with self._cond:
            for i, row in new:
                self.batch.rows[row.slot] = row
                self._by_slot[row.slot] = (handle, i)
                self._admitted[row.slot] = work.admitted
            self._reserved.difference_update(work.slots)

    def _make_room(self) -> None:
        """A block for each decoding row about to fill its last one, oldest first; while the pool has
        none to spare, the newest running row or prefilling prompt is preempted (the row itself last)."""
        for row in sorted(self.batch.needing_blocks(), key=lambda r: self._admitted[r.slot]):
            while self.batch.rows.get(row.slot) is row and self.blocks.free - self._spare < 1:
                self._preempt(self._newest())
            if self.batch.rows.get(row.slot) is row:
                self.blocks.allocate(row.slot, 1)

    def _newest(self) -> Row | _Work:
        work = max(self._prefilling, key=lambda w: w.admitted, default=None)
        slot = max(self._admitted, key=lambda s: (self._admitted[s], s))
        if work is not None and work.admitted > self._admitted[slot]:
            return work
        return self.batch.rows[slot]

    def _preempt(self, victim: Row | _Work) -> None:
        """Free the victim's blocks and put it first in the waiting queue, to be recomputed."""
        self.preemptions += 1
        if isinstance(victim, _Work):
            self._unadmit(victim)
            work = victim
        else:
            handle, sample = self._by_slot.pop(victim.slot)
            del self._admitted[victim.slot]
            self.batch.preempt(victim)
            # Its prompt and every token it chose, the one not yet fed included: the prefill's last
            # logits are then the ones the row would have sampled its next token from.
            work = _Work(handle, handle.prompt + victim.tokens, 1, resume=sample)
        with self._cond:
            self._waiting.appendleft(work)

    def _decode(self) -> None:
        events: dict[Handle, list[Event]] = {}
        for t in self.batch.sample():
            handle, sample = self._by_slot[t.row.slot]
            out = events.setdefault(handle, [])
            finished, passed_on = t.finished, False
            if t.mask and t.token in handle.stop_token_ids:
                if not finished:
                    self.batch.cancel(t.row)
                t.row.finish_reason, finished = "stop", True
            elif not (finished and t.row.finish_reason == "stop" and t.token in self.engine.stop_tokens):
                out.append(Event(sample, t.token, t.mask, None, None, t.logprob, t.top_logprobs, t.prompt_logprobs))
                passed_on = True
            if finished:
                del self._by_slot[t.row.slot]
                del self._admitted[t.row.slot]
                handle.finished[sample] = True
                # A stop token is not passed on, but the prompt's scores it carried are.
                scores = None if passed_on else t.prompt_logprobs
                out.append(Event(sample, finish_reason=t.row.finish_reason, prompt_logprobs=scores))
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
        with self._cond:
            resumes = [w for w in self._waiting if w.resume is not None]
            for work in resumes:
                self._waiting.remove(work)
        works = self._prefilling + resumes
        handles = list(dict.fromkeys([w.handle for w in works] + [h for h, _ in self._by_slot.values()]))
        for row in list(self.batch.rows.values()):
            self.batch.cancel(row)
        for work in self._prefilling:
            self.batch.release_slot(work.slots[0], ())
        self._prefilling.clear()
        self._reserved.clear()
        self._by_slot.clear()
        self._admitted.clear()
        self._spare = 0
        self.batch.forget()
        for handle in handles:
            self._finish_all(handle, "error", message)

    @staticmethod
    def _deliver(handle: Handle, events: list[Event]) -> None:
        try:
            handle.on_events(events)
        except Exception:  # one broken consumer must not stop the batch
            log.exception("on_events of request %d failed", handle.id)
