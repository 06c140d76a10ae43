"""Tiny tokenizers, random models and the foreign folders the export/import tests read.

`hf_folder` writes a NanoChat folder the way transformers does (`save_pretrained` of a random
`NanoChatForCausalLM`, a tokenizer converted by transformers' `TikTokenConverter`, the converter the
published nanochat-d32 went through); `write_original` lays out a run of the original nanochat
(see test_original_import)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import tiktoken
import torch
from nanochat.checkpoint import save_checkpoint
from nanochat.gpt import GPT, GPTConfig, padded_vocab_size
from nanochat.hf_mapping import FP32_EPS
from nanochat.tokenizer import RANKS_FILE, SPECIAL_TOKENS, Tokenizer
from transformers import NanoChatConfig, NanoChatForCausalLM, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

TEXT = (
    "The quick brown fox jumps over the lazy dog. What is 7*3? It is 21. Numbers like 1,234 and "
    "0.5 add up; 6/2 is 3.0. Héllo wörld, naïve café! A tiny corpus for a tiny tokenizer.\n\n  Indented text. "
)

CONVERSATIONS = [
    [{"role": "user", "content": "Hello there!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 7*3?"},
        {"role": "assistant", "content": "It is 21."},
        {"role": "user", "content": "And  6/2 ?\n\nThanks, café."},
    ],
    [
        {"role": "user", "content": "Compute 1,234 + 5"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Using the tool: "},
                {"type": "python", "text": "1234+5"},
                {"type": "python_output", "text": "1239"},
                {"type": "text", "text": " so 1239."},
            ],
        },
    ],
]


def tiny_tokenizer() -> Tokenizer:
    return Tokenizer.train_from_iterator([TEXT] * 20, vocab_size=400)


def random_gpt(config: GPTConfig, seed: int = 0, noise: float = 0.05) -> GPT:
    """A GPT with noise on every weight (a fresh one's zero lm_head gives flat logits)."""
    torch.manual_seed(seed)
    model = GPT(config, pad_vocab_world=1)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
        model.transformer.wte.weight[config.vocab_size :] = 0  # padding rows: never used, never saved
        model.lm_head.weight[config.vocab_size :] = 0
    return model.eval()


def depth2_config(vocab_size: int) -> GPTConfig:
    return GPTConfig.from_depth(2, vocab_size, sequence_len=256)


def gqa_config(vocab_size: int) -> GPTConfig:
    """Four query heads sharing two key-value heads: the grouped-query path."""
    return GPTConfig(sequence_len=256, vocab_size=vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=128)


def write_checkpoint(folder: Path, model: GPT, tokenizer: Tokenizer, meta: dict | None = None) -> Path:
    meta = meta or {"stage": "sft", "made_by": "chat_sft", "metrics": {"ARC-Easy": 0.31, "val_bpb": 1.25}}
    return save_checkpoint(folder, model, tokenizer, meta)


def hf_folder(folder, tok, seed=0, **overrides):
    """A transformers-written NanoChat folder: random model + converted tiktoken tokenizer."""
    end = tok.encode_special("<|assistant_end|>")
    settings = dict(
        vocab_size=tok.vocab_size,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=end,
        pad_token_id=end,
        rms_norm_eps=FP32_EPS,
    )
    torch.manual_seed(seed)
    model = NanoChatForCausalLM(NanoChatConfig(**{**settings, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    tok.save(folder / "tiktoken")
    converter = TikTokenConverter(
        str(folder / "tiktoken" / RANKS_FILE), tok.pattern, extra_special_tokens=SPECIAL_TOKENS
    )
    PreTrainedTokenizerFast(tokenizer_object=converter.converted(), bos_token="<|bos|>").save_pretrained(folder)
    return model


def assert_same_logits(ours, theirs, vocab, bound=1e-4):
    ids = torch.randint(0, vocab, (2, 80), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = ours(ids), theirs(ids).logits
    assert float((a - b).abs().max()) <= bound
    assert float(a.std()) > 0.05


def write_original(base, model, tok, steps=(10,), extra_tensors=None, extra_config=None):
    """A run folder of the original nanochat holding `model` at each of `steps`."""
    run = base / "chatsft_checkpoints" / "d2"
    run.mkdir(parents=True)
    vocab = model.config.vocab_size
    for step in steps:
        state = {}
        for name, tensor in model.state_dict().items():
            if name in ("transformer.wte.weight", "lm_head.weight"):
                padded = torch.zeros(padded_vocab_size(vocab), tensor.shape[1])
                padded[:vocab] = tensor[:vocab]
                tensor = padded
            if name == "transformer.wte.weight":
                tensor = tensor.to(torch.bfloat16)
            state["_orig_mod." + name] = tensor.clone()
        state.update(extra_tensors or {})
        torch.save(state, run / f"model_{step:06d}.pt")
        torch.save({"state": {}, "param_groups": []}, run / f"optim_{step:06d}_rank0.pt")
        meta = {
            "step": step,
            "val_bpb": 1.1,
            "model_config": {**model.config.to_dict(), **(extra_config or {})},
            "user_config": {"depth": 2, "run": "test"},
            "device_batch_size": 4,
            "max_seq_len": model.config.sequence_len,
        }
        (run / f"meta_{step:06d}.json").write_text(json.dumps(meta))
    tok_dir = base / "tokenizer"
    tok_dir.mkdir()
    encoding = tiktoken.Encoding(
        name="rustbpe",
        pat_str=tok.pattern,
        mergeable_ranks=dict(tok.encoding._mergeable_ranks),
        special_tokens={name: tok.num_ranks + i for i, name in enumerate(SPECIAL_TOKENS)},
    )
    with open(tok_dir / "tokenizer.pkl", "wb") as f:
        pickle.dump(encoding, f)
    torch.save(torch.tensor(tok.token_bytes(), dtype=torch.int32), tok_dir / "token_bytes.pt")
    return run
