"""The library end to end on the CPU, through its own API only: train a tokenizer on a few MB of
text, 50 steps of a depth-2 model with the real optimizers, save, load (hashes verified), generate."""

import random

import pytest
import torch
from nanochat.checkpoint import load_checkpoint, save_checkpoint
from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig
from nanochat.offline_corpus import synthetic_docs
from nanochat.optim import step
from nanochat.tokenizer import Tokenizer
from nanochat_contracts.manifest import ManifestError

STEPS, BATCH, SEQ = 50, 8, 64


def test_tokenizer_train_save_load_generate(tmp_path):
    torch.manual_seed(0)
    docs = synthetic_docs(4000, random.Random(0))
    assert sum(map(len, docs)) > 2_000_000
    tokenizer = Tokenizer.train_from_iterator(docs, vocab_size=512)
    assert tokenizer.vocab_size == 512
    assert tokenizer.decode(tokenizer.encode(docs[0])) == docs[0]

    ids = torch.tensor([t for d in docs[:400] for t in tokenizer.encode(d, prepend="<|bos|>")])
    config = GPTConfig.from_depth(2, vocab_size=tokenizer.vocab_size, sequence_len=SEQ)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    model.on_device_ready()
    optimizers = model.setup_optimizers()
    losses = []
    for _ in range(STEPS):
        starts = torch.randint(0, len(ids) - SEQ - 1, (BATCH,))
        window = torch.stack([ids[s : s + SEQ + 1] for s in starts.tolist()])
        loss = model(window[:, :-1], targets=window[:, 1:])
        loss.backward()
        step(optimizers)
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses

    folder = save_checkpoint(tmp_path / "ckpt", model, tokenizer, meta={"stage": "base", "step": STEPS})
    loaded = load_checkpoint(folder)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    assert loaded.meta == {"stage": "base", "step": STEPS}

    engine = Engine(loaded.model, loaded.tokenizer)
    prompt = loaded.tokenizer.encode("The cat", prepend="<|bos|>")
    sequences, masks = engine.generate_batch(prompt, num_samples=2, max_tokens=12, temperature=0.0)
    assert len(sequences) == 2 and sequences[0] == sequences[1]
    assert sequences[0][: len(prompt)] == prompt and len(sequences[0]) > len(prompt)
    assert masks[0] == [0] * len(prompt) + [1] * (len(sequences[0]) - len(prompt))
    assert loaded.tokenizer.decode(sequences[0][len(prompt) :]).strip()

    # A flipped byte in the weights is caught before anything is built from them.
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="model.safetensors"):
        load_checkpoint(folder)
