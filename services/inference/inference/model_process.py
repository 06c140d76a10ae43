"""The model in its own process: the scheduler runs there, the HTTP process drives it over a pipe.

Why a process and not a thread: every torch op gives the GIL back and takes it again, so a
model thread beside a busy event loop waits for the GIL dozens of times per decode step. On a
small CPU box that cost a third of the decode speed (bench/serve.py); in its own process the model
never waits on the HTTP side, and `/health` never waits on the model.

`ModelProcess.start(folder, ...)` starts `serve()` in a child process, which verifies and loads
the checkpoint, starts a `Scheduler` and answers with the model's shape (or the load error, raised
in the parent as `ModelLoadError`). Afterwards the parent object stands in for the scheduler:
`submit` / `cancel` / `stats` / `stop` as `nanochat.scheduler.Scheduler` has them.

    parent -> child   ("submit", id, prompt, params, n, stop_token_ids) | ("cancel", id, sample) | ("stop",)
    child -> parent   ("ready", shape) | ("failed", message)                             once, first
                      ("step", [(id, [Event, ...]), ...], Stats, last submit id seen, t) per iteration

The parent checks prompts and the queue bound itself, so `submit` raises `ValueError` /
`QueueFull` at once, as the local scheduler does. Its `stats()` count submits the child has not
read yet as waiting, so a request is never in no count. A receiver thread hands each request
its events with the step's `time.monotonic()` in the child (`on_events(events, t)` runs on that
thread; the clock is the machine's, so latencies are the model's, not the pipe's or the event
loop's). One message per iteration carries every request's events (named tuples, which pickle
cheaply). If the child dies, every open request gets an "error" finish event and `alive` turns
false; when the parent dies, the child sees its pipe close and exits.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path

from nanochat.engine import SamplingParams, check_params, check_prompt
from nanochat.scheduler import Event, QueueFull, Stats, check_fits

log = logging.getLogger("inference.model_process")


class ModelLoadError(Exception):
    """The child could not load the checkpoint (its message says why)."""


class ModelGone(Exception):
    """The model process has stopped or died; nothing can be submitted to it."""


@dataclass(frozen=True)
class ModelShape:
    """What the parent needs to know of the loaded model."""

    vocab_size: int
    slots: int
    max_len: int
    kv_blocks: int
    kv_block_size: int
    device: str
    meta: dict


@dataclass(eq=False)
class RemoteHandle:
    id: int
    n: int
    on_events: Callable[[list[Event], float], None]
    finished: int = 0


# ---- the child ----------------------------------------------------------------------------------


def serve(
    conn: Connection, folder: str, device: str | None, cpu_threads: int, compile_cuda: bool, options: dict
) -> None:
    """The child process: load, then run the scheduler (`options`: its keyword arguments, max_len 0
    meaning the model's sequence_len) until told to stop or the pipe closes. On CUDA with
    `compile_cuda` the engine's MLPs are torch.compiled (`Engine.compile`)."""
    from nanochat.checkpoint import load_checkpoint
    from nanochat.common import autodetect_device
    from nanochat.engine import Engine
    from nanochat.scheduler import Scheduler

    try:
        ckpt = load_checkpoint(folder, device=autodetect_device(device))
        if ckpt.tokenizer is None:
            raise ValueError(f"checkpoint {folder} has no tokenizer/ folder; inference needs one")
        engine = Engine(ckpt.model, ckpt.tokenizer)
        if compile_cuda and engine.device.type == "cuda":
            engine.compile()
        # The parent enforces the waiting bound; the child takes whatever reaches it.
        options = {**options, "max_len": options.get("max_len") or ckpt.config.sequence_len}
        scheduler = Scheduler(engine, max_waiting=1 << 40, **options)
    except Exception as e:
        conn.send(("failed", str(e)))
        return
    conn.send(
        (
            "ready",
            ModelShape(
                vocab_size=ckpt.config.vocab_size,
                slots=scheduler.slots,
                max_len=scheduler.max_len,
                kv_blocks=scheduler.blocks.capacity,
                kv_block_size=scheduler.blocks.block_size,
                device=engine.device.type,
                meta=ckpt.meta,
            ),
        )
    )
    # On CPU, one core fewer than the machine has by default: the HTTP process keeps one.
    threads = (cpu_threads or max(1, (os.cpu_count() or 1) - 1)) if engine.device.type == "cpu" else None
    _Child(conn, scheduler).run(threads)


class _Child:
    def __init__(self, conn: Connection, scheduler):
        self.conn, self.scheduler = conn, scheduler
        self.lock = threading.Lock()  # outbox, handles, seen: the pipe reader and the model thread
        self.send_lock = threading.Lock()
        self.outbox: list[tuple[int, list[Event]]] = []
        self.handles: dict[int, object] = {}
        self.seen = 0

    def run(self, threads: int | None) -> None:
        self.scheduler.start(threads=threads, after_iteration=self.flush)
        try:
            while True:
                try:
                    message = self.conn.recv()
                except (EOFError, OSError):
                    return  # the parent is gone
                if message[0] == "stop":
                    return
                self.handle(message)
        finally:
            self.scheduler.stop()  # what still runs finishes as cancelled, into the outbox
            self.flush()

    def handle(self, message: tuple) -> None:
        if message[0] == "submit":
            _, rid, prompt, params, n, stop_token_ids = message
            with self.lock:
                self.seen = rid
                try:
                    self.handles[rid] = self.scheduler.submit(
                        prompt, params, partial(self.post, rid), n=n, stop_token_ids=stop_token_ids
                    )
                    return
                except Exception as e:  # the parent checked it; say so rather than lose the request
                    self.outbox.append((rid, [Event(i, finish_reason="error", error=str(e)) for i in range(n)]))
            self.flush()
        elif message[0] == "cancel":
            _, rid, sample = message
            with self.lock:
                handle = self.handles.get(rid)
            if handle is not None:
                self.scheduler.cancel(handle, sample)

    def post(self, rid: int, events: list[Event]) -> None:
        with self.lock:
            self.outbox.append((rid, events))

    def flush(self) -> None:
        with self.lock:
            out, self.outbox = self.outbox, []
            for rid, _ in out:
                if self.handles.get(rid) is not None and self.handles[rid].done:
                    del self.handles[rid]
            stats, seen = self.scheduler.stats(), self.seen
        with self.send_lock:
            try:
                self.conn.send(("step", out, stats, seen, time.monotonic()))
            except (BrokenPipeError, OSError):
                pass  # the parent is gone; the reader loop ends on its own


# ---- the parent ---------------------------------------------------------------------------------


class ModelProcess:
    """A scheduler in a child process, with the local scheduler's submit / cancel / stats / stop."""

    def __init__(
        self, process: multiprocessing.process.BaseProcess, conn: Connection, shape: ModelShape, max_waiting: int
    ):
        self.process, self.conn, self.shape, self.max_waiting = process, conn, shape, max_waiting
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # _open, _stats, _last_submitted, _seen
        self._send_lock = threading.Lock()
        self._open: dict[int, RemoteHandle] = {}
        self._stats = Stats(
            waiting=0,
            prefilling=0,
            running=0,
            slots=shape.slots,
            used_slots=0,
            kv_blocks_used=0,
            kv_blocks=shape.kv_blocks,
        )
        self._last_submitted = self._seen = 0
        self._stopping = False
        self._receiver = threading.Thread(target=self._receive, name="inference-model-receiver", daemon=True)
        self._receiver.start()

    @classmethod
    def start(
        cls,
        folder: str | Path,
        device: str | None = None,
        max_waiting: int = 256,
        cpu_threads: int = 0,
        compile_cuda: bool = False,
        **options,
    ) -> ModelProcess:
        """Spawn the child and wait until it has loaded the model; ModelLoadError when it cannot.

        `options` are the Scheduler's (slots, max_len, prefill_tokens, decode_prefill_tokens,
        prefix_block, num_blocks)."""
        # A fork server imports torch once per HTTP process, so a model process starts in the time
        # its checkpoint takes to load (spawn: seconds of imports each time). Forking the HTTP
        # process itself is unsafe: it holds threads, and maybe torch's thread pools.
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["inference.model_process", "nanochat.checkpoint", "nanochat.scheduler"])
        conn, child_conn = context.Pipe()
        process = context.Process(
            target=serve,
            name="inference-model",
            daemon=True,
            args=(child_conn, str(folder), device, cpu_threads, compile_cuda, options),
        )
        process.start()
        child_conn.close()
        try:
            kind, payload = conn.recv()
        except (EOFError, OSError) as e:
            process.join(5)
            conn.close()
            raise ModelLoadError(f"the model process exited with code {process.exitcode} while loading {folder}") from e
        if kind == "failed":
            process.join(10)
            conn.close()
            raise ModelLoadError(payload)
        return cls(process, conn, payload, max_waiting)

    @property
    def slots(self) -> int:
        return self.shape.slots

    @property
    def max_len(self) -> int:
        return self.shape.max_len

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    def submit(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        on_events: Callable[[list[Event], float], None],
        n: int = 1,
        stop_token_ids: Iterable[int] = (),
    ) -> RemoteHandle:
        """Queue a request; raises ValueError for a bad one and QueueFull when the queue is full."""
        prompt = check_prompt(prompt, self.shape.vocab_size, self.max_len)
        check_params(params, self.shape.vocab_size)
        check_fits(len(prompt), n, self.slots, self.shape.kv_blocks, self.shape.kv_block_size)
        stop_ids = frozenset(int(t) for t in stop_token_ids)
        with self._lock:
            if not self.alive or self._stopping:
                raise ModelGone(f"the model process is not running (exit code {self.process.exitcode})")
            stats = self._stats_locked()
            # As the local scheduler: requests the free slots will take do not count as waiting.
            if stats.waiting >= self.max_waiting + max(0, self.slots - stats.used_slots):
                raise QueueFull(f"the waiting queue is full ({self.max_waiting} requests beyond the free slots)")
            handle = RemoteHandle(id=next(self._ids), n=n, on_events=on_events)
            self._open[handle.id] = handle
            self._last_submitted = handle.id
            self._send(("submit", handle.id, prompt, params, n, stop_ids))
        return handle

    def cancel(self, handle: RemoteHandle, sample: int | None = None) -> None:
        """Stop one sample of `handle` (all by default); the child frees the slots at its next iteration."""
        with self._lock:
            if handle.id not in self._open:
                return
        self._send(("cancel", handle.id, sample))

    def stats(self) -> Stats:
        with self._lock:
            return self._stats_locked()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the child; requests still queued or running are finished as cancelled."""
        with self._lock:
            self._stopping = True
        self._send(("stop",))
        self.process.join(timeout)
        if self.process.is_alive():
            log.warning("the model process did not stop within %.0f s; killing it", timeout)
            self.process.kill()
            self.process.join(5)
        self._receiver.join(10)
        self.conn.close()

    def _stats_locked(self) -> Stats:
        unread = self._last_submitted - self._seen
        return dataclasses.replace(self._stats, waiting=self._stats.waiting + unread)

    def _send(self, message: tuple) -> None:
        with self._send_lock:
            try:
                self.conn.send(message)
            except (BrokenPipeError, OSError):
                pass  # the child is gone: the receiver fails its requests

    def _receive(self) -> None:
        while True:
            try:
                _, out, stats, seen, at = self.conn.recv()
            except (EOFError, OSError):
                break
            delivered = []
            with self._lock:
                self._stats, self._seen = stats, seen
                for rid, events in out:
                    handle = self._open.get(rid)
                    if handle is None:
                        continue
                    handle.finished += sum(1 for e in events if e.finish_reason is not None)
                    if handle.finished >= handle.n:
                        del self._open[rid]
                    delivered.append((handle, events))
            for handle, events in delivered:
                _deliver(handle, events, at)
        self._fail_open()

    def _fail_open(self) -> None:
        """The pipe closed: whatever is still open gets its finish events now."""
        self.process.join(5)
        with self._lock:
            stopping, handles, self._open = self._stopping, list(self._open.values()), {}
        reason = "cancelled" if stopping else "error"
        error = None if stopping else f"the model process exited (code {self.process.exitcode})"
        if handles and not stopping:
            log.error("%s with %d requests open", error, len(handles))
        for handle in handles:
            _deliver(handle, [Event(i, finish_reason=reason, error=error) for i in range(handle.n)], time.monotonic())


def _deliver(handle: RemoteHandle, events: list[Event], at: float) -> None:
    try:
        handle.on_events(events, at)
    except Exception:  # one broken consumer must not stop the others
        log.exception("on_events of request %d failed", handle.id)
