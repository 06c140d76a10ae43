"""Checkpoint folders of nanochat.checkpoint: round trip, hash verification, atomic write, resume."""

import json
from pathlib import Path

import pytest
import torch
from nanochat import optim
from nanochat.checkpoint import load_checkpoint, load_optimizer_state, save_checkpoint
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer
from nanochat_contracts.manifest import ManifestError

TEXT = "The quick brown fox jumps over the lazy dog. " * 40 + "Numbers 12 345 6789 and symbols !?" * 20


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train_from_iterator(iter([TEXT]), vocab_size=300)


def small_model(vocab: int, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_depth(2, vocab, 32))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def train_steps(model: GPT, optimizers: list, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        data = torch.randint(0, model.config.vocab_size, (2, 17), generator=g)
        model(data[:, :-1], data[:, 1:]).backward()
        optim.step(optimizers, grad_clip=1.0)
        model.zero_grad(set_to_none=True)


def test_round_trip_keeps_weights_tokenizer_and_meta(tmp_path: Path, tokenizer: Tokenizer):
    model = small_model(tokenizer.vocab_size)
    meta = {"stage": "base", "step": 7, "metrics": {"val_bpb": 1.5}}
    out = save_checkpoint(tmp_path / "ckpt", model, tokenizer, meta)
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert names == [
        "config.json",
        "manifest.json",
        "meta.json",
        "model.safetensors",
        "tokenizer/ranks.tiktoken",
        "tokenizer/tokenizer.json",
    ]
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["files"]) == set(names) - {"manifest.json"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left

    ckpt = load_checkpoint(out)
    assert ckpt.meta == meta and ckpt.config == model.config
    assert not ckpt.model.training
    assert ckpt.tokenizer.encode(TEXT[:100]) == tokenizer.encode(TEXT[:100])
    idx = torch.tensor([tokenizer.encode("The lazy fox")])
    torch.testing.assert_close(ckpt.model(idx), model(idx), atol=0, rtol=0)


def test_loads_for_another_world_size_padding(tmp_path: Path, tokenizer: Tokenizer):
    model = small_model(tokenizer.vocab_size)
    save_checkpoint(tmp_path / "ckpt", model)
    ckpt = load_checkpoint(tmp_path / "ckpt", pad_vocab_world=3)
    assert ckpt.model.padded_vocab_size == 384 != model.padded_vocab_size
    assert ckpt.tokenizer is None
    idx = torch.randint(0, tokenizer.vocab_size, (2, 9))
    torch.testing.assert_close(ckpt.model(idx), model(idx), atol=1e-6, rtol=1e-6)


def test_changed_missing_or_extra_file_is_refused(tmp_path: Path, tokenizer: Tokenizer):
    out = save_checkpoint(tmp_path / "ckpt", small_model(tokenizer.vocab_size), tokenizer, {"step": 1})
    meta = out / "meta.json"
    original = meta.read_text()
    meta.write_text(original.replace("1", "2"))
    with pytest.raises(ManifestError, match="meta.json"):
        load_checkpoint(out)
    meta.write_text(original)
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, one flipped byte
    weights.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="model.safetensors"):
        load_checkpoint(out)
    weights.unlink()
    with pytest.raises(ManifestError, match="model.safetensors.*missing"):
        load_checkpoint(out)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")


def test_existing_folder_and_failed_save_leave_no_half_folder(tmp_path: Path, tokenizer: Tokenizer):
    model = small_model(tokenizer.vocab_size)
    save_checkpoint(tmp_path / "ckpt", model)
    with pytest.raises(FileExistsError, match="already exists"):
        save_checkpoint(tmp_path / "ckpt", model)
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save_checkpoint(tmp_path / "bad", model, meta={"when": object()})

    class BrokenTokenizer:
        def save(self, folder):
            Path(folder).mkdir()
            (Path(folder) / "ranks.tiktoken").write_text("half")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "crash", model, BrokenTokenizer())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_resume_continues_exactly(tmp_path: Path, tokenizer: Tokenizer):
    model = small_model(tokenizer.vocab_size)
    optimizers = model.setup_optimizers(ns_dtype=torch.float32)
    train_steps(model, optimizers, 2, seed=1)
    save_checkpoint(
        tmp_path / "ckpt", model, tokenizer, {"step": 2}, optimizers, rank_state={"step": 2, "loader": [0, 3]}
    )
    train_steps(model, optimizers, 2, seed=2)

    ckpt = load_checkpoint(tmp_path / "ckpt")
    resumed = ckpt.model.train()
    resumed_opt = resumed.setup_optimizers(ns_dtype=torch.float32)
    rank_state = load_optimizer_state(tmp_path / "ckpt", resumed_opt)
    assert rank_state == {"step": 2, "loader": [0, 3]}
    train_steps(resumed, resumed_opt, 2, seed=2)
    vocab = tokenizer.vocab_size  # the vocab padding rows are not saved: never used, never trained
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(a[:vocab], b[:vocab], atol=0, rtol=0, msg=name)


def test_rng_state_is_restored(tmp_path: Path, tokenizer: Tokenizer):
    model = small_model(tokenizer.vocab_size)
    optimizers = model.setup_optimizers()
    torch.manual_seed(5)
    save_checkpoint(tmp_path / "ckpt", model, optimizers=optimizers)
    expected = torch.rand(4)
    torch.manual_seed(123)
    load_optimizer_state(tmp_path / "ckpt", optimizers)
    torch.testing.assert_close(torch.rand(4), expected, atol=0, rtol=0)


def test_optimizer_state_errors_are_clear(tmp_path: Path, tokenizer: Tokenizer):
    model = small_model(tokenizer.vocab_size)
    save_checkpoint(tmp_path / "plain", model)
    with pytest.raises(FileNotFoundError, match="not a resumable checkpoint"):
        load_optimizer_state(tmp_path / "plain", model.setup_optimizers())
    optimizers = model.setup_optimizers()
    out = save_checkpoint(tmp_path / "ckpt", model, optimizers=optimizers)
    with pytest.raises(ValueError, match="optimizers"):
        load_optimizer_state(out, optimizers[:1])
    (out / "optim" / "rank0.json").write_text("{}")
    with pytest.raises(ManifestError, match="rank0.json"):
        load_optimizer_state(out, optimizers)
