"""Tiny tokenizers and random models for the Hugging Face export/import and original-import tests."""

from __future__ import annotations

from pathlib import Path

import torch
from nanochat.checkpoint import save_checkpoint
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer

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
