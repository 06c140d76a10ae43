"""nanochat.dataloader: packed pretraining/midtraining batches, SFT padding, and exact resume."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from nanochat.dataloader import ConversationLoader, SFTLoader, pretrain_loader
from nanochat.dataset import shard_name
from nanochat.tokenizer import Tokenizer

TOK = Tokenizer({bytes([i]): i for i in range(256)})  # one id per byte: streams are easy to predict
BOS = TOK.bos_token_id


@pytest.fixture
def shards(tmp_path):
    docs = [[f"doc{s}-{j}:" + "x" * (j % 7) for j in range(40)] for s in range(3)]
    for s, shard in enumerate(docs):
        pq.write_table(pa.table({"text": shard}), tmp_path / shard_name(s), row_group_size=8)
    return tmp_path, docs


def stream_of(texts):
    return [t for text in texts for t in [BOS] + list(text.encode())]


def test_packing_is_contiguous_with_bos_per_document(shards):
    folder, docs = shards
    B, T = 2, 16
    loader = pretrain_loader(TOK, str(folder), "train", B, T, loop=False)
    expected = stream_of(docs[0] + docs[1])
    steps = list(loader)
    assert len(steps) == (len(expected) - 1) // (B * T)
    for k, (x, y) in enumerate(steps):
        assert x.shape == y.shape == (B, T) and x.dtype == torch.long
        window = expected[k * B * T : (k + 1) * B * T + 1]
        assert x.flatten().tolist() == window[:-1]
        assert y.flatten().tolist() == window[1:]


def test_val_split_is_the_last_shard(shards):
    folder, docs = shards
    x, _ = next(pretrain_loader(TOK, str(folder), "val", 1, 8))
    assert x.flatten().tolist() == stream_of(docs[2])[:8]


def test_resume_gives_the_same_batches(shards):
    folder, _ = shards
    run = pretrain_loader(TOK, str(folder), "train", 2, 24, rank=1, world_size=2)
    for _ in range(3):
        next(run)
    state = json.loads(json.dumps(run.state_dict()))
    expected = [next(run) for _ in range(12)]  # long enough to wrap around the train split
    again = pretrain_loader(TOK, str(folder), "train", 2, 24, rank=1, world_size=2, state=state)
    for (x, y), (x2, y2) in zip(expected, (next(again) for _ in range(12))):
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_ranks_read_disjoint_row_groups(shards):
    folder, _ = shards
    seen = []
    for rank in range(2):
        loader = pretrain_loader(TOK, str(folder), "train", 1, 64, rank=rank, world_size=2, loop=False)
        seen.append({bytes(t for t in x.flatten().tolist() if t < 256).decode() for x, _ in loader})
    text0, text1 = "".join(seen[0]), "".join(seen[1])
    assert "doc0-0:" in text0 and "doc0-8:" in text1 and "doc0-8:" not in text0


CONVERSATIONS = [
    {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a" * (i % 5 + 1)}]}
    for i in range(30)
]


def test_midtraining_packs_whole_conversations_ignoring_the_mask():
    loader = ConversationLoader(TOK, CONVERSATIONS, 2, 10, chunk=4)
    expected = [t for c in CONVERSATIONS for t in TOK.render_conversation(c)[0]]
    batches = list(loader)
    flat = [t for x, _ in batches for t in x.flatten().tolist()]
    assert flat == expected[: len(flat)] and len(batches) == (len(expected) - 1) // 20
    assert loader.progress() == 1.0
    state = ConversationLoader(TOK, CONVERSATIONS, 2, 10, chunk=4)
    next(state)
    resumed = ConversationLoader(TOK, CONVERSATIONS, 2, 10, chunk=4, state=json.loads(json.dumps(state.state_dict())))
    assert torch.equal(next(resumed)[0], batches[1][0])


def test_midtraining_cuts_each_conversation_at_2048_tokens():
    # As the original: a conversation renders to at most 2,048 tokens before packing, whatever T is.
    long = {"messages": [{"role": "user", "content": "u" * 3000}, {"role": "assistant", "content": "never reached"}]}
    short = {"messages": [{"role": "user", "content": "q0"}, {"role": "assistant", "content": "a"}]}
    special = TOK.encode_special
    kept_long = [BOS, special("<|user_start|>")] + [ord("u")] * 2046  # 2,048 tokens
    whole_short = [
        BOS,
        special("<|user_start|>"),
        ord("q"),
        ord("0"),
        special("<|user_end|>"),
        special("<|assistant_start|>"),
        ord("a"),
        special("<|assistant_end|>"),
    ]
    stream = kept_long + whole_short  # 2,056 tokens: one batch of B=1, T=2,055
    batches = list(ConversationLoader(TOK, [long, short], 1, len(stream) - 1))
    assert len(batches) == 1
    assert batches[0][0][0].tolist() == stream[:-1] and batches[0][1][0].tolist() == stream[1:]


def test_sft_pads_with_assistant_end_and_ignores_masked_targets():
    loader = SFTLoader(TOK, CONVERSATIONS[:3], batch_size=3)
    x, y = next(loader)
    pad = TOK.encode_special("<|assistant_end|>")
    for row, conversation in enumerate(CONVERSATIONS[:3]):
        ids, mask = TOK.render_conversation(conversation)
        n = len(ids) - 1
        assert x[row, :n].tolist() == ids[:-1]
        assert (x[row, n:] == pad).all() and (y[row, n:] == -1).all()
        assert y[row, :n].tolist() == [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
    with pytest.raises(StopIteration):
        next(loader)


def test_sft_ranks_epochs_and_resume():
    loader = SFTLoader(TOK, CONVERSATIONS, batch_size=4, rank=1, world_size=2, num_epochs=2)
    batches = list(loader)
    assert sum(x.shape[0] for x, _ in batches) == 2 * 15
    first = SFTLoader(TOK, CONVERSATIONS, batch_size=4, rank=1, world_size=2, num_epochs=2)
    for _ in range(5):
        next(first)
    resumed = SFTLoader(TOK, CONVERSATIONS, batch_size=4, rank=1, world_size=2, num_epochs=2, state=first.state_dict())
    assert torch.equal(next(resumed)[0], batches[5][0])
