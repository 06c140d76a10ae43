"""The GPT of nanochat.gpt: shape rules, parameter count, loss, and the paged KV cache."""

import math

import pytest
import torch
import torch.nn.functional as F
from nanochat.gpt import GPT, GPTConfig, KVCache, padded_vocab_size
from nanochat.kv_blocks import BlockManager


def perturbed_model(depth: int = 2, vocab_size: int = 97, sequence_len: int = 64, seed: int = 0) -> GPT:
    """A small fp32 model whose zero-initialised matrices got noise, so outputs depend on the input."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_depth(depth, vocab_size, sequence_len))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def test_depth20_parameter_count():
    config = GPTConfig.from_depth(20, vocab_size=65_536, sequence_len=2048)
    with torch.device("meta"):
        model = GPT(config, pad_vocab_world=1)
    assert (config.n_embd, config.n_head, config.head_dim) == (1280, 10, 128)
    assert model.num_params() == 560_988_160
    flops = model.estimate_flops()
    embedding = 65_536 * 1280
    assert flops == 6 * (560_988_160 - embedding) + 12 * 20 * 10 * 128 * 2048


@pytest.mark.parametrize("depth,head_dim", [(2, 128), (3, 96), (4, 128), (7, 112), (15, 120)])
def test_depths_the_head_rule_serves(depth, head_dim):
    assert GPTConfig.from_depth(depth, 100, 32).head_dim == head_dim


@pytest.mark.parametrize("depth", [5, 9, 11, 13])
def test_depths_the_head_rule_rejects(depth):
    with pytest.raises(ValueError, match="power of two"):
        GPTConfig.from_depth(depth, 100, 32)


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="positive integer"):
        GPTConfig.from_depth(0, 100)
    with pytest.raises(ValueError, match="keys"):
        GPTConfig.from_dict({"n_layer": 2})
    with pytest.raises(ValueError, match="n_kv_head"):
        GPT(GPTConfig(sequence_len=8, vocab_size=10, n_layer=1, n_head=4, n_kv_head=3, n_embd=64))


def test_vocab_padding_for_world_sizes():
    assert padded_vocab_size(65_536, 1) == 65_536
    assert padded_vocab_size(100, 1) == 128
    assert padded_vocab_size(100, 3) == 192
    assert padded_vocab_size(4096, 6) == 4224  # lcm(64, 6) = 192
    with torch.device("meta"):
        model = GPT(GPTConfig.from_depth(2, 100, 16), pad_vocab_world=3)
    assert model.transformer.wte.weight.shape[0] == 192 and model.lm_head.weight.shape[0] == 192


def test_fresh_init_follows_the_spec():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(2, 100, 16))
    model.init_weights()
    assert model.lm_head.weight.abs().sum() == 0
    for block in model.transformer.h:
        assert block.attn.c_proj.weight.abs().sum() == 0 and block.mlp.c_proj.weight.abs().sum() == 0
    fc = model.transformer.h[0].mlp.c_fc.weight  # fan_in 128, fan_out 512 -> std 1/sqrt(128)
    assert abs(fc.std().item() - 1 / math.sqrt(128)) < 0.01
    # A zero lm_head makes every logit 0: the loss is ln(vocab) exactly.
    idx = torch.randint(0, 100, (2, 8))
    assert torch.allclose(model(idx, idx), torch.tensor(math.log(100)))


def test_loss_matches_logits_and_ignores_minus_one():
    model = perturbed_model()
    idx = torch.randint(0, 97, (3, 20))
    targets = torch.randint(0, 97, (3, 20))
    targets[0, :5] = -1
    logits = model(idx)
    assert logits.shape == (3, 20, 97) and logits.dtype == torch.float32
    assert logits.abs().max() < 15.0  # soft cap
    expected = F.cross_entropy(logits.view(-1, 97), targets.view(-1), ignore_index=-1)
    assert torch.allclose(model(idx, targets), expected, atol=1e-6)
    per_token = model(idx, targets, loss_reduction="none")
    assert per_token.shape == (3, 20)
    assert (per_token[0, :5] == 0).all()
    assert torch.allclose(per_token.sum() / (targets != -1).sum(), expected, atol=1e-6)


def test_bad_forward_input_is_a_clear_error():
    model = perturbed_model()
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="targets shape"):
        model(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="loss_reduction"):
        model(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), loss_reduction="sum")


def paged(model: GPT, rows: int, max_len: int = 32, num_blocks: int = 40, block_size: int = 4):
    cache = KVCache.for_model(model, rows, max_len, num_blocks=num_blocks, block_size=block_size)
    return cache, BlockManager(cache.tables, cache.num_blocks, block_size)


def grow(blocks: BlockManager, cache: KVCache, rows: list[int], new: list[int]) -> None:
    """Give each row the blocks for its next new[i] tokens."""
    for row, n in zip(rows, new):
        blocks.allocate(row, blocks.blocks_for(int(cache.lengths[row]) + n) - len(blocks.tables[row]))


@torch.no_grad()
def test_cached_forward_equals_no_cache_forward_for_mixed_length_rows():
    model = perturbed_model(depth=3)  # head_dim 96, 2 heads
    lens = [5, 11, 1, 8]
    seqs = [torch.randint(0, 97, (n + 6,)) for n in lens]
    cache, blocks = paged(model, 4)
    # Blocks handed out interleaved, so no row's blocks are adjacent in the pool.
    for step in range(3):
        grow(blocks, cache, [0, 1, 2, 3], [min(n, 4 * (step + 1)) for n in lens])
    # One padded prefill call: row b keeps only its first lens[b] tokens.
    T = max(lens)
    prompt = torch.zeros(4, T, dtype=torch.long)
    for b, n in enumerate(lens):
        prompt[b, :n] = seqs[b][:n]
    logits = model(prompt, kv_cache=cache, num_new=torch.tensor(lens))
    assert cache.lengths.tolist() == lens
    for b, n in enumerate(lens):
        ref = model(seqs[b][None, :n])[0]
        torch.testing.assert_close(logits[b, :n], ref, atol=1e-5, rtol=1e-5)
    # Then decode the rest one token per row, each row at its own position.
    for t in range(6):
        grow(blocks, cache, [0, 1, 2, 3], [1] * 4)
        step = torch.stack([seqs[b][n + t] for b, n in enumerate(lens)])[:, None]
        logits = model(step, kv_cache=cache)
        for b, n in enumerate(lens):
            ref = model(seqs[b][None, : n + t + 1])[0, -1]
            torch.testing.assert_close(logits[b, 0], ref, atol=1e-5, rtol=1e-5)
    assert cache.lengths.tolist() == [n + 6 for n in lens]
    assert blocks.used == sum(blocks.blocks_for(n + 6) for n in lens)


@torch.no_grad()
def test_last_only_logits_equal_the_full_logits_at_each_rows_last_real_token():
    model = perturbed_model(depth=2)
    idx = torch.randint(0, 97, (3, 9))
    full = model(idx)
    torch.testing.assert_close(model(idx, last_only=True), full[:, -1:], atol=1e-5, rtol=1e-5)
    # Padded prefill into a subset of cache rows: each row's last kept token, wherever it sits.
    lens = [4, 9, 1]
    rows = [3, 0, 4]
    (full_cache, full_blocks), (last_cache, last_blocks) = paged(model, 5), paged(model, 5)
    grow(full_blocks, full_cache, rows, lens)
    grow(last_blocks, last_cache, rows, lens)
    full = model(idx, kv_cache=full_cache, rows=rows, num_new=lens)
    last = model(idx, kv_cache=last_cache, rows=rows, num_new=lens, last_only=True)
    assert last.shape == (3, 1, 97)
    for b, n in enumerate(lens):
        torch.testing.assert_close(last[b, 0], full[b, n - 1], atol=1e-5, rtol=1e-5)
    assert last_cache.lengths.tolist() == full_cache.lengths.tolist() == [9, 0, 0, 4, 1]
    with pytest.raises(ValueError, match="last_only"):
        model(idx, targets=idx, last_only=True)


@torch.no_grad()
def test_a_packed_forward_equals_its_parts_run_alone():
    model = perturbed_model(depth=3)
    seqs = [torch.randint(0, 97, (n,)) for n in (6, 9, 3, 12)]
    (packed, packed_blocks), (alone, alone_blocks) = paged(model, 4), paged(model, 4)
    for cache, blocks in ((packed, packed_blocks), (alone, alone_blocks)):
        for row, seq in enumerate(seqs[:3]):  # rows 0-2 hold a prompt each and now decode
            grow(blocks, cache, [row], [len(seq) + 1])
            model(seq[None, :-1], kv_cache=cache, rows=[row])
        grow(blocks, cache, [3], [12])
    order = [2, 0, 1]  # not one ascending run: the decode rows' keys are gathered
    decode = torch.stack([seqs[row][-1] for row in order])[:, None]
    chunk = seqs[3][None, :7]
    # Row 3's prompt chunk of 7 tokens beside the three decoding rows, in one pass ...
    got = model.forward_packed([(decode, order, None), (chunk, [3], [7])], packed)
    # ... against the decode step and the chunk each on their own.
    want_decode = model(decode, kv_cache=alone, rows=order)[:, -1]
    want_chunk = model(chunk, kv_cache=alone, rows=[3], num_new=[7], last_only=True)[:, -1]
    torch.testing.assert_close(got[0], want_decode, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want_chunk, atol=1e-5, rtol=1e-5)
    assert packed.lengths.tolist() == alone.lengths.tolist()
    for j, row in enumerate(order):
        torch.testing.assert_close(got[0][j], model(seqs[row][None])[0, -1], atol=1e-5, rtol=1e-5)
    # The rest of the chunked prompt, alone, attends to what the packed pass wrote.
    rest = model(seqs[3][None, 7:], kv_cache=packed, rows=[3])
    torch.testing.assert_close(rest[0], model(seqs[3][None])[0, 7:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="distinct cache rows"):
        model.forward_packed([(decode[:1], [0], None), (decode[:1], [0], None)], packed)


@torch.no_grad()
def test_forked_rows_share_the_full_blocks_and_each_own_a_partial_one():
    model = perturbed_model()
    prompt = torch.randint(0, 97, (1, 7))
    cache, blocks = paged(model, 5, num_blocks=12)
    grow(blocks, cache, [2], [7])
    model(prompt, kv_cache=cache, rows=[2])
    for dst in (0, 3, 4):
        blocks.fork(2, dst, 7)
        cache.copy_row(2, dst, 7)
        cache.lengths[dst] = 7
    assert {blocks.tables[r][0] for r in (0, 2, 3, 4)} == {blocks.tables[2][0]}, "the full block is shared"
    assert len({blocks.tables[r][1] for r in (0, 2, 3, 4)}) == 4, "each row has its own partial block"
    assert blocks.used == 1 + 4
    nxt = torch.randint(0, 97, (3, 2))
    grow(blocks, cache, [0, 3, 4], [2, 2, 2])
    logits = model(nxt, kv_cache=cache, rows=[0, 3, 4])
    for i in range(3):
        ref = model(torch.cat([prompt[0], nxt[i]])[None])[0, -2:]
        torch.testing.assert_close(logits[i], ref, atol=1e-5, rtol=1e-5)
    # Row 2 never saw the other rows' tokens: its own partial block is untouched.
    grow(blocks, cache, [2], [2])
    torch.testing.assert_close(
        model(nxt[:1], kv_cache=cache, rows=[2])[0],
        model(torch.cat([prompt[0], nxt[0]])[None])[0, -2:],
        atol=1e-5,
        rtol=1e-5,
    )
    blocks.release(0)
    assert blocks.used == 1 + 3 * 2 and blocks.ref[blocks.tables[2][0]] == 3  # rows 2-4: 9 positions each
    for row in (2, 3, 4):
        blocks.release(row)
    assert blocks.used == 0 and blocks.free == blocks.capacity


@torch.no_grad()
def test_a_row_staged_from_shared_blocks_attends_as_if_it_had_computed_them():
    model = perturbed_model()
    seq = torch.randint(0, 97, (1, 13))
    cache, blocks = paged(model, 3)
    grow(blocks, cache, [0], [10])
    model(seq[:, :10], kv_cache=cache, rows=[0])
    blocks.register(0, seq[0, :10].tolist())
    shared, names = blocks.match(seq[0, :10].tolist())  # the full blocks, the last token left out
    assert len(shared) == 2
    blocks.share(2, shared, names)
    cache.lengths[2] = 8
    cache.stage(2, 0, 8)
    grow(blocks, cache, [2], [5])
    logits = model(seq[:, 8:], kv_cache=cache, rows=[2])
    torch.testing.assert_close(logits[0], model(seq)[0, 8:], atol=1e-5, rtol=1e-5)
    assert blocks.tables[2][:2] == blocks.tables[0][:2] and blocks.used == 3 + 2


def test_cache_misuse_is_a_clear_error():
    model = perturbed_model()
    cache, blocks = paged(model, 2, max_len=8)
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(2, 9, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="rows="):
        model(torch.zeros(3, 1, dtype=torch.long), kv_cache=cache)
    with pytest.raises(IndexError, match="out of range"):
        model(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache, rows=[5])
    with pytest.raises(ValueError, match="num_new"):
        model(torch.zeros(2, 2, dtype=torch.long), kv_cache=cache, num_new=[3, 1])
    with pytest.raises(ValueError, match="rotary"):
        KVCache.for_model(model, 1, max_len=model.rotary_len + 1)
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        KVCache.for_model(model, 1, max_len=32, num_blocks=8, block_size=4)
    with pytest.raises(ValueError, match="more than"):
        blocks.allocate(0, 3)  # a row of max_len 8 holds 2 blocks of 4
