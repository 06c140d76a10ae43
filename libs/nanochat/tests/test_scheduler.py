"""The continuous-batching scheduler on a small perturbed fp32 model, driven with `iterate()`.

Greedy output of a request alone must equal its output inside a batch of mixed requests (other
temperatures, lengths, n, long chunked prompts, late arrivals, prefix-cache hits, preemption in a
pool too small for them all), seeds must not depend on the batch, and cancelled requests must give
their slots and KV blocks back in the same iteration.
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


def test_beside_decoding_rows_short_prompts_start_together_and_one_long_prompt_is_chunked(engine):
    """decode_prefill_tokens=16 under a 256-token budget: while a row decodes, a burst of short
    prompts all start in one iteration; of two long prompts one is fed 16 tokens an iteration and
    the other waits for it; every greedy output is the one it gives alone."""
    greedy = SamplingParams(temperature=0.0, max_tokens=6)
    shorts = [prompt(engine, text) for text in ("cat", "dog", "the fox", "cat cat", "a lazy dog", "7*3")]
    longs = [prompt(engine, "The lazy dog " * 30), prompt(engine, "Numbers like " * 30)]
    assert max(len(p) for p in shorts) <= 16 and min(len(p) for p in longs) > 48
    expected = [alone(engine, ids, greedy).tokens[0] for ids in shorts + longs]

    scheduler = Scheduler(engine, slots=12, prefill_tokens=256, decode_prefill_tokens=16)
    scheduler.submit(prompt(engine, "dog"), SamplingParams(temperature=0.0, max_tokens=100), Collector())
    scheduler.iterate()  # that row decodes from now on
    collectors = [Collector() for _ in shorts + longs]
    for ids, c in zip(shorts + longs, collectors):
        scheduler.submit(ids, greedy, c)
    scheduler.iterate()
    assert all(len(c.tokens[0]) == 1 for c in collectors[:6]), "each short prompt has its first token"
    for _ in range(-(-len(longs[0]) // 16) - 1):
        assert not collectors[6].tokens[0]
        scheduler.iterate()
    assert len(collectors[6].tokens[0]) == 1 and not collectors[7].tokens[0], "the second long prompt waited"
    run(scheduler)
    assert [c.tokens[0] for c in collectors] == expected


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
    stats = scheduler.stats()
    assert stats.used_slots == 2 and stats.waiting == 1
    assert stats.kv_blocks_used == 2  # each sample's own copy of the prompt's partial block
    scheduler.cancel(handle)
    scheduler.iterate()
    assert c.reasons == ["cancelled", "cancelled"]
    stats = scheduler.stats()
    assert stats.waiting == 0 and stats.used_slots == 2  # the waiting request took the freed slots
    assert stats.kv_blocks_used == 2, "the cancelled request's blocks went back to the pool"
    assert waiting.tokens[0]


def test_a_disconnect_frees_its_blocks_at_once(engine):
    scheduler = Scheduler(engine, slots=4)
    c = Collector()
    handle = scheduler.submit(
        prompt(engine, "The lazy dog " * 8), SamplingParams(temperature=1.0, max_tokens=200, seed=3), c
    )
    for _ in range(20):
        scheduler.iterate()
    assert scheduler.stats().kv_blocks_used == scheduler.blocks.blocks_for(len(handle.prompt) + 19)
    scheduler.cancel(handle)
    scheduler.iterate()
    assert c.reasons == ["cancelled"] and scheduler.stats().kv_blocks_used == 0
    assert scheduler.blocks.free == scheduler.stats().kv_blocks


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
    assert stats.prefix_hits >= len(first + reply) - warm.blocks.block_size - 1
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
    bs = warm.blocks.block_size
    assert warm.stats().prefix_hits >= 2 * (len(system) // bs) * bs


def test_running_requests_share_their_prefix_blocks_with_no_copy(engine):
    scheduler = Scheduler(engine, slots=4, prefill_tokens=256)
    system = prompt(engine, "Numbers like 1,234 add up. " * 6)
    first = scheduler.submit(system + engine.tokenizer.encode(" fox"), SamplingParams(temperature=0.0), Collector())
    scheduler.iterate()  # prefilled, its blocks named
    second = scheduler.submit(system + engine.tokenizer.encode(" dog"), SamplingParams(temperature=0.0), Collector())
    scheduler.iterate()
    full = len(system) // scheduler.blocks.block_size
    a, b = (scheduler.blocks.tables[h.rows[0].slot] for h in (first, second))
    assert a[:full] == b[:full] and all(scheduler.blocks.ref[block] == 2 for block in a[:full])
    assert not set(a[full:]) & set(b[full:])
    assert scheduler.stats().kv_blocks_used == len(a) + len(b) - full


def test_free_cached_blocks_are_evicted_least_recently_freed_first(engine):
    scheduler = Scheduler(engine, slots=2, max_len=96, num_blocks=10)  # 9 blocks of 16
    a, b, c = (prompt(engine, text * 6) for text in ("The quick brown fox. ", "Numbers like 1,234. ", "What is 7*3? "))
    for ids in (a, b):  # 43 and 52 tokens, then 16 more: 4 and 5 blocks, free but named afterwards
        greedy_tokens(scheduler, ids)
    assert [len(scheduler.blocks.match(ids)[0]) for ids in (a, b)] == [2, 3]
    assert scheduler.stats().kv_blocks_used == 0
    greedy_tokens(scheduler, c)  # 4 blocks: b's unnamed last one, then a's, tail first
    assert [len(scheduler.blocks.match(ids)[0]) for ids in (a, b)] == [1, 3]
    hits = scheduler.stats().prefix_hits
    cold = Scheduler(engine, slots=2, max_len=96, prefix_block=0)
    assert greedy_tokens(scheduler, a) == greedy_tokens(cold, a)
    assert scheduler.stats().prefix_hits - hits == 16, "a's first block is still cached"


def test_admission_is_exact_in_blocks(engine):
    scheduler = Scheduler(engine, slots=4, max_len=64, num_blocks=6)  # 5 blocks of 16
    long = SamplingParams(temperature=1.0, max_tokens=20, seed=0)
    first, second = Collector(), Collector()
    scheduler.submit(prompt(engine, "dog " * 40), long, first)  # 3 blocks, then a 4th while decoding
    scheduler.submit(prompt(engine, "fox " * 40), long, second)
    scheduler.iterate()
    stats = scheduler.stats()
    assert (stats.waiting, stats.prefilling + stats.running) == (1, 1), "the second prompt's 3 blocks are not free"
    with pytest.raises(ValueError, match="KV pool"):
        scheduler.submit(prompt(engine, "dog " * 40), long, Collector(), n=4)
    run(scheduler)
    assert first.reasons == second.reasons == ["length"]


def test_preempted_requests_recompute_and_give_the_output_they_give_alone(engine):
    """A pool too small for the batch: the newest requests are preempted and recomputed, more than
    once, beside chunked prefills and prefix hits; greedy and seeded outputs are the undisturbed ones."""
    greedy = SamplingParams(temperature=0.0, max_tokens=40)
    system = prompt(engine, "The lazy dog jumps. " * 5)
    asks = [
        (system + engine.tokenizer.encode(" fox"), greedy, 1),
        (prompt(engine, "What is 7*3? " * 12), greedy, 1),  # chunked: 64 tokens an iteration
        (system + engine.tokenizer.encode(" What is 7*3?"), greedy, 1),  # the system prompt's blocks hit
        (prompt(engine, "Numbers like "), SamplingParams(temperature=1.0, top_k=20, max_tokens=40, seed=7), 2),
        (prompt(engine, "The quick brown fox"), greedy, 1),
    ]
    expected = [alone(engine, ids, params, n).tokens for ids, params, n in asks]
    scheduler = Scheduler(engine, slots=8, max_len=128, num_blocks=17, prefill_tokens=64)  # 16 blocks of 16
    collectors = []
    for ids, params, n in asks:
        collectors.append(Collector(n))
        scheduler.submit(ids, params, collectors[-1], n=n)
        scheduler.iterate()
    peak = 0
    for _ in range(10_000):
        if scheduler.idle():
            break
        scheduler.iterate()
        peak = max(peak, scheduler.stats().kv_blocks_used)
    assert scheduler.stats().preemptions >= 2
    assert peak <= scheduler.stats().kv_blocks == 16
    assert [c.tokens for c in collectors] == expected
    assert all(r == "length" for c in collectors for r in c.reasons)
    assert scheduler.stats().kv_blocks_used == 0


def test_a_padded_chunk_never_runs_a_row_past_max_len(engine):
    """A prompt's last short chunk beside a wider one: the padding must fit its row too."""
    tok = engine.tokenizer
    s = Scheduler(engine, slots=4, max_len=64, decode_prefill_tokens=20)
    p = SamplingParams(temperature=0, max_tokens=30)
    got = [Collector() for _ in range(3)]
    s.submit([tok.bos_token_id] + [5] * 3, p, got[0])  # a row decoding
    s.iterate()
    s.submit([tok.bos_token_id] + [6] * 62, p, got[1])  # 63 tokens: chunks of 20, 20, 20, then 3
    for _ in range(3):
        s.iterate()
    s.submit([tok.bos_token_id] + [7] * 9, p, got[2])  # 10 tokens, arriving beside the last 3
    run(s)
    assert all(c.reasons[0] in ("stop", "length") for c in got), [c.reasons for c in got]
