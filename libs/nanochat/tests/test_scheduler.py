"""The continuous-batching scheduler on a small perturbed fp32 model, driven with `iterate()`.

Greedy output of a request alone must equal its output inside a batch of mixed requests (other
temperatures, lengths, n, long chunked prompts, late arrivals), seeds must not depend on the
batch, and cancelled requests must give their slots back in the same iteration.
"""

import pytest
import torch
from nanochat.engine import Engine, SamplingParams
from nanochat.gpt import GPT, GPTConfig
from nanochat.scheduler import QueueFull, Scheduler
from nanochat.tokenizer import Tokenizer

TEXT = "The quick brown fox jumps over the lazy dog. What is 7*3? It is 21. Numbers like 1,234 add up. "


@pytest.fixture(scope="module")
def engine() -> Engine:
    tok = Tokenizer.train_from_iterator([TEXT] * 20, vocab_size=320)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(2, tok.vocab_size, sequence_len=256))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return Engine(model.eval(), tok)


class Collector:
    """Gathers one request's events into per-sample token lists and finish reasons."""

    def __init__(self, n: int = 1):
        self.tokens = [[] for _ in range(n)]
        self.reasons = [None] * n

    def __call__(self, events) -> None:
        for e in events:
            if e.token is not None:
                self.tokens[e.sample].append(e.token)
            if e.finish_reason is not None:
                self.reasons[e.sample] = e.finish_reason


def run(scheduler: Scheduler, max_iterations: int = 10_000) -> None:
    for _ in range(max_iterations):
        if scheduler.idle():
            return
        scheduler.iterate()
    raise AssertionError("the scheduler did not drain")


def prompt(engine: Engine, text: str) -> list[int]:
    return [engine.tokenizer.bos_token_id] + engine.tokenizer.encode(text)


def alone(engine: Engine, ids: list[int], params: SamplingParams, n: int = 1) -> Collector:
    scheduler = Scheduler(engine, slots=4)
    c = Collector(n)
    scheduler.submit(ids, params, c, n=n)
    run(scheduler)
    return c


def test_greedy_alone_equals_greedy_in_a_mixed_batch(engine):
    greedy = SamplingParams(temperature=0.0, max_tokens=24)
    targets = [prompt(engine, "What is 7*3?"), prompt(engine, "The lazy dog " * 30), [engine.tokenizer.bos_token_id]]
    expected = [alone(engine, ids, greedy).tokens[0] for ids in targets]
    assert len({tuple(e) for e in expected}) > 1, "the model gives every prompt the same output"

    scheduler = Scheduler(engine, slots=24, prefill_tokens=64)  # the long prompt takes several chunks
    collectors = []
    for i in range(16):
        if i < len(targets):
            ids, params, n = targets[i], greedy, 1
        else:
            ids = prompt(engine, "Numbers like " * (i % 5 + 1))
            params = SamplingParams(temperature=1.0, top_k=20, max_tokens=5 + i, seed=i)
            n = 1 + i % 2
        c = Collector(n)
        scheduler.submit(ids, params, c, n=n)
        collectors.append(c)
        if i % 4 == 3:
            scheduler.iterate()  # later requests join a batch that is already decoding
    run(scheduler)
    assert [c.tokens[0] for c in collectors[: len(targets)]] == expected
    assert all(r in ("stop", "length") for c in collectors for r in c.reasons)


def test_same_seed_same_text_whatever_the_batch(engine):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=20, seed=1234)
    ids = prompt(engine, "The quick brown fox")
    reference = alone(engine, ids, params, n=2)
    assert reference.tokens[0] != reference.tokens[1], "samples of one request must differ"

    scheduler = Scheduler(engine, slots=8)
    noise = [Collector() for _ in range(3)]
    for i, c in enumerate(noise):
        scheduler.submit(prompt(engine, "dog " * (i + 1)), SamplingParams(temperature=1.0, max_tokens=30), c)
    scheduler.iterate()
    c = Collector(2)
    scheduler.submit(ids, params, c, n=2)
    run(scheduler)
    assert c.tokens == reference.tokens


def test_cancel_frees_the_slots_at_once(engine):
    scheduler = Scheduler(engine, slots=3)
    long = SamplingParams(temperature=1.0, max_tokens=200, seed=0)
    c = Collector(2)
    handle = scheduler.submit(prompt(engine, "fox"), long, c, n=2)
    waiting = Collector(2)
    scheduler.submit(prompt(engine, "dog"), long, waiting, n=2)
    for _ in range(3):
        scheduler.iterate()
    assert scheduler.stats().used_slots == 2 and scheduler.stats().waiting == 1
    scheduler.cancel(handle)
    scheduler.iterate()
    assert c.reasons == ["cancelled", "cancelled"]
    stats = scheduler.stats()
    assert stats.waiting == 0 and stats.used_slots == 2  # the waiting request took the freed slots
    assert waiting.tokens[0]


def test_stop_token_ids_and_length(engine):
    ids = prompt(engine, "What is 7*3?")
    free = alone(engine, ids, SamplingParams(temperature=0.0, max_tokens=12)).tokens[0]
    stop_at = free[5]
    scheduler = Scheduler(engine, slots=2)
    c = Collector()
    scheduler.submit(ids, SamplingParams(temperature=0.0, max_tokens=12), c, stop_token_ids=[stop_at])
    run(scheduler)
    assert c.tokens[0] == free[: free.index(stop_at)] and c.reasons == ["stop"]
    assert alone(engine, ids, SamplingParams(temperature=0.0, max_tokens=3)).reasons == ["length"]


def test_queue_limits_and_bad_requests(engine):
    scheduler = Scheduler(engine, slots=2, max_waiting=1)
    params = SamplingParams(temperature=0.0, max_tokens=4)
    for _ in range(3):  # two for the free slots, one waiting
        scheduler.submit(prompt(engine, "fox"), params, Collector())
    with pytest.raises(QueueFull):
        scheduler.submit(prompt(engine, "dog"), params, Collector())
    with pytest.raises(ValueError, match="n must be"):
        scheduler.submit(prompt(engine, "dog"), params, Collector(), n=3)
    with pytest.raises(ValueError, match="leaves no room"):
        scheduler.submit([1] * 300, params, Collector())
    run(scheduler)


def test_thread_runs_requests_and_stop_cancels_the_rest(engine):
    import threading

    scheduler = Scheduler(engine, slots=2)
    with pytest.raises(ValueError, match="threads"):
        scheduler.start(threads=0)
    scheduler.start(threads=1)
    done = threading.Event()
    c = Collector()

    def on_events(events):
        c(events)
        if c.reasons[0]:
            done.set()

    scheduler.submit(prompt(engine, "fox"), SamplingParams(temperature=0.0, max_tokens=8), on_events)
    assert done.wait(30)
    assert c.tokens[0] == alone(engine, prompt(engine, "fox"), SamplingParams(temperature=0.0, max_tokens=8)).tokens[0]
    pending = Collector()
    scheduler.submit(prompt(engine, "dog"), SamplingParams(temperature=1.0, max_tokens=10_000), pending)
    scheduler.stop()
    assert pending.reasons == ["cancelled"]


def greedy_tokens(scheduler: Scheduler, ids: list[int], max_tokens: int = 16) -> list[int]:
    c = Collector()
    scheduler.submit(ids, SamplingParams(temperature=0.0, max_tokens=max_tokens), c)
    run(scheduler)
    return c.tokens[0]


def test_prefix_cache_hits_give_the_output_of_a_cold_prefill(engine):
    cold = Scheduler(engine, slots=4, prefill_tokens=64, prefix_block=0)
    warm = Scheduler(engine, slots=4, prefill_tokens=64)  # chunked: 64 tokens an iteration
    first = prompt(engine, "The lazy dog jumps. " * 12)
    reply = greedy_tokens(warm, first)
    assert warm.stats().prefix_hits == 0
    # The next turn: the previous prompt and reply, then more; it lands on the same slot.
    turn = first + reply + prompt(engine, "What is 7*3?")
    assert greedy_tokens(warm, turn) == greedy_tokens(cold, turn)
    stats = warm.stats()
    assert stats.prefix_hits >= len(first + reply) - warm.prefix.block_size - 1
    assert stats.prefix_queries == len(first) + len(turn)


def test_a_shared_prefix_is_copied_from_a_running_row_inside_a_mixed_batch(engine):
    system = prompt(engine, "Numbers like 1,234 add up. " * 6)
    asks = [system + engine.tokenizer.encode(q) for q in (" fox", " What is 7*3?", " dog dog")]
    cold = Scheduler(engine, slots=8, prefix_block=0)
    expected = [greedy_tokens(cold, ids) for ids in asks]

    warm = Scheduler(engine, slots=8, prefill_tokens=64)
    collectors = []
    for i, ids in enumerate(asks):
        c = Collector()
        warm.submit(ids, SamplingParams(temperature=0.0, max_tokens=16), c)
        noise = Collector(2)
        warm.submit(prompt(engine, "dog " * (i + 3)), SamplingParams(temperature=1.0, max_tokens=9, seed=i), noise, n=2)
        collectors.append(c)
        for _ in range(4):
            warm.iterate()  # the first request runs while the next ones arrive
    run(warm)
    assert [c.tokens[0] for c in collectors] == expected
    assert warm.stats().prefix_hits >= 2 * (len(system) // warm.prefix.block_size) * warm.prefix.block_size


def test_taking_a_slot_evicts_its_blocks(engine):
    scheduler = Scheduler(engine, slots=1)
    a = prompt(engine, "The quick brown fox. " * 6)
    greedy_tokens(scheduler, a)
    assert scheduler.prefix.index, "a finished request's blocks stay findable"
    greedy_tokens(scheduler, prompt(engine, "Numbers like 1,234. " * 6))
    hits = scheduler.stats().prefix_hits
    cold = Scheduler(engine, slots=1, prefix_block=0)
    assert greedy_tokens(scheduler, a) == greedy_tokens(cold, a)
    assert scheduler.stats().prefix_hits == hits, "the only slot was reused: nothing of a is left to hit"
    assert all(len(holders) == 1 for holders in scheduler.prefix.index.values())


def test_a_taken_slot_moves_its_blocks_to_the_least_recently_released_one(engine):
    scheduler = Scheduler(engine, slots=3)
    a = prompt(engine, "The quick brown fox. " * 6)
    greedy_tokens(scheduler, a)  # slot 0
    greedy_tokens(scheduler, prompt(engine, "Numbers like 1,234. " * 6))  # slot 0 again: a moves to slot 1
    assert scheduler.prefix.chains[1] and scheduler.prefix.chains[2] == []
    hits = scheduler.stats().prefix_hits
    cold = Scheduler(engine, slots=3, prefix_block=0)
    assert greedy_tokens(scheduler, a) == greedy_tokens(cold, a)
    assert scheduler.stats().prefix_hits - hits == (len(a) - 1) // 16 * 16, "a was found where it moved"
