"""Import of the original nanochat's checkpoint folders, written here in the original's formats.

`write_original` lays a run out as the original does: `<base>/chatsft_checkpoints/d2/` with
`model_NNNNNN.pt` (torch.save of a compiled model's state dict: `_orig_mod.` names, the embedding
in bf16, vocab rows padded to a multiple of 64), `meta_NNNNNN.json` (`model_config` and the run's
settings), an optimizer file, and `<base>/tokenizer/` with `tokenizer.pkl` (pickle.dump of the
tiktoken Encoding) and `token_bytes.pt`. The import must give a checkpoint whose logits equal the
original weights', and refuse pickles that ask for anything but a tiktoken Encoding.
"""

import os
import pickle
import subprocess
import sys

import pytest
import tiktoken
import torch
from hf_models import depth2_config, gqa_config, random_gpt, tiny_tokenizer, write_original
from nanochat.checkpoint import load_checkpoint
from nanochat.hf_mapping import ArchitectureMismatch
from nanochat.original_import import UnsafePickle, import_original, load_tokenizer_pkl


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def bf16_embedding(model):
    """The model as the original stored it: its embedding rounded to bf16."""
    with torch.no_grad():
        model.transformer.wte.weight.copy_(model.transformer.wte.weight.to(torch.bfloat16).float())
    return model


@pytest.mark.parametrize("make_config", [depth2_config, gqa_config])
def test_imported_checkpoint_scores_like_the_original_weights(tok, tmp_path, make_config):
    model = bf16_embedding(random_gpt(make_config(tok.vocab_size)))
    run = write_original(tmp_path, model, tok, steps=(5, 20))
    import_original(run, tmp_path / "ours")
    ckpt = load_checkpoint(tmp_path / "ours")
    ids = torch.randint(0, tok.vocab_size, (2, 50))
    with torch.no_grad():
        assert float((ckpt.model(ids) - model(ids)).abs().max()) <= 1e-5
    assert ckpt.tokenizer.encoding._mergeable_ranks == tok.encoding._mergeable_ranks
    assert ckpt.tokenizer.pattern == tok.pattern
    assert ckpt.meta["stage"] == "sft" and ckpt.meta["step"] == 20
    assert ckpt.meta["lineage"].startswith("imported from original nanochat") and "step 20" in ckpt.meta["lineage"]
    assert ckpt.meta["imported_from"]["meta"]["user_config"] == {"depth": 2, "run": "test"}


def test_the_step_and_stage_can_be_chosen(tok, tmp_path):
    run = write_original(tmp_path, random_gpt(depth2_config(tok.vocab_size)), tok, steps=(5, 20))
    import_original(run, tmp_path / "ours", step=5, stage="rl")
    meta = load_checkpoint(tmp_path / "ours").meta
    assert (meta["step"], meta["stage"]) == (5, "rl")
    with pytest.raises(FileNotFoundError, match="meta_000007.json"):
        import_original(run, tmp_path / "other", step=7)
    with pytest.raises(ValueError, match="stage must be one of"):
        import_original(run, tmp_path / "other", stage="tokenizer")


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_tokenizer_pickle_is_refused_unrun(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "tokenizer.pkl"
    path.write_bytes(pickle.dumps(Evil(marker)))
    with pytest.raises(UnsafePickle, match=r"refers to (posix|os|nt)\.system; only tiktoken.core.Encoding"):
        load_tokenizer_pkl(path)
    assert not marker.exists()
    path.write_bytes(pickle.dumps({"mergeable_ranks": eval}))
    with pytest.raises(UnsafePickle, match="builtins.eval"):
        load_tokenizer_pkl(path)


def test_a_registered_encoding_by_name_is_refused_unfetched(tmp_path):
    """tiktoken pickles a registered encoding as its bare name, which its own __setstate__ would
    look up (and download); here the name is only a state that is not an Encoding's dict."""
    path = tmp_path / "tokenizer.pkl"
    name = b"cl100k_base"
    path.write_bytes(b"\x80\x02ctiktoken.core\nEncoding\n)\x81X" + len(name).to_bytes(4, "little") + name + b"b.")
    with pytest.raises(ValueError, match="with state str, not a tiktoken Encoding's dict"):
        load_tokenizer_pkl(path)


def test_an_encoding_without_the_nanochat_specials_is_refused(tmp_path):
    ranks = {bytes([i]): i for i in range(256)}
    encoding = tiktoken.Encoding(name="x", pat_str=r"\S+", mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 256})
    path = tmp_path / "tokenizer.pkl"
    path.write_bytes(pickle.dumps(encoding))
    with pytest.raises(ValueError, match="are not nanochat's"):
        load_tokenizer_pkl(path)


def test_tensors_ours_lacks_are_named(tok, tmp_path):
    model = random_gpt(depth2_config(tok.vocab_size))
    extra = {"_orig_mod.resid_lambdas": torch.ones(2), "_orig_mod.value_embeds.0.weight": torch.zeros(3, 128)}
    run = write_original(tmp_path, model, tok, extra_tensors=extra)
    with pytest.raises(
        ArchitectureMismatch, match=r"unexpected resid_lambdas \(2,\); unexpected value_embeds.0.weight"
    ):
        import_original(run, tmp_path / "ours")
    assert not (tmp_path / "ours").exists()


def test_settings_ours_lacks_are_named(tok, tmp_path):
    model = random_gpt(depth2_config(tok.vocab_size))
    run = write_original(tmp_path, model, tok, extra_config={"window_pattern": "SSSL"})
    with pytest.raises(ArchitectureMismatch, match="'window_pattern': 'SSSL'"):
        import_original(run, tmp_path / "ours")


def test_a_pickled_object_in_the_weights_is_refused(tok, tmp_path):
    model = random_gpt(depth2_config(tok.vocab_size))
    run = write_original(tmp_path, model, tok)
    torch.save({"_orig_mod.lm_head.weight": Evil(tmp_path / "pwned")}, run / "model_000010.pt")
    with pytest.raises(ValueError, match="not a tensors-only torch file"):
        import_original(run, tmp_path / "ours")
    assert not (tmp_path / "pwned").exists()


def test_cli(tok, tmp_path):
    run = write_original(tmp_path, random_gpt(depth2_config(tok.vocab_size)), tok)
    cli = [sys.executable, "-m", "nanochat.original_import", str(run), "--out", str(tmp_path / "ours")]
    done = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"wrote {tmp_path / 'ours'}" in done.stdout
    (tmp_path / "tokenizer" / "tokenizer.pkl").write_bytes(pickle.dumps(Evil(tmp_path / "pwned")))
    cli[-1] = str(tmp_path / "again")
    refused = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and "only tiktoken.core.Encoding" in refused.stderr
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "again").exists()
