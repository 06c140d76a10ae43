"""The Hugging Face import: folders that transformers itself wrote become checkpoints scoring the same.

The sources are `NanoChatForCausalLM.save_pretrained` of tiny random models (transformers' own
init plus noise; our rmsnorm epsilon unless a test says otherwise) and a tokenizer converted by transformers'
`TikTokenConverter` (the converter the published nanochat-d32 went through) and written by
`PreTrainedTokenizerFast.save_pretrained`.
"""

import json

import pytest
import torch
from hf_models import assert_same_logits, depth2_config, hf_folder, random_gpt, tiny_tokenizer, write_checkpoint
from nanochat.checkpoint import load_checkpoint
from nanochat.hf_export import export_checkpoint
from nanochat.hf_import import import_hf
from nanochat.hf_mapping import FP32_EPS, ArchitectureMismatch
from nanochat.hf_tokenizer import TokenizerMismatch
from safetensors.torch import load_file, save_file


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_import_of_a_transformers_folder_scores_the_same(tok, tmp_path):
    theirs = hf_folder(tmp_path / "hf", tok)
    import_hf(str(tmp_path / "hf"), tmp_path / "ours")
    ckpt = load_checkpoint(tmp_path / "ours")
    assert ckpt.config.n_head == 4 and ckpt.config.n_kv_head == 2 and ckpt.config.sequence_len == 256
    assert_same_logits(ckpt.model, theirs, tok.vocab_size)
    assert ckpt.tokenizer.encoding._mergeable_ranks == tok.encoding._mergeable_ranks
    assert ckpt.meta["stage"] == "sft"
    assert ckpt.meta["lineage"] == f"imported from hf:{(tmp_path / 'hf').resolve()}"
    assert ckpt.meta["imported_from"]["chat_template_matches_ours"] is None  # the source has none


def test_an_exported_model_imports_with_its_chat_template_recognised(tok, tmp_path):
    write_checkpoint(tmp_path / "ckpt", random_gpt(depth2_config(tok.vocab_size)), tok)
    export_checkpoint(tmp_path / "ckpt", tmp_path / "hf")
    import_hf(str(tmp_path / "hf"), tmp_path / "back")
    assert load_checkpoint(tmp_path / "back").meta["imported_from"]["chat_template_matches_ours"] is True


def test_another_norm_epsilon_is_recorded_and_the_weights_still_checked(tok, tmp_path):
    """transformers' default rms_norm_eps (1e-6) against ours (fp32's, 1.2e-7) is a real difference
    in the computation; the import records it, and the weights carry over exactly."""
    theirs = hf_folder(tmp_path / "hf", tok, rms_norm_eps=1e-6)
    import_hf(str(tmp_path / "hf"), tmp_path / "ours")
    ckpt = load_checkpoint(tmp_path / "ours")
    record = ckpt.meta["imported_from"]
    assert record["source_rms_norm_eps"] == 1e-6 and record["probe_max_logit_diff"] <= 1e-5
    assert 0 < record["probe_diff_source_eps"] < 1e-2
    for module in theirs.modules():
        if hasattr(module, "variance_epsilon"):
            module.variance_epsilon = FP32_EPS
    assert_same_logits(ckpt.model, theirs, tok.vocab_size)


def test_tied_embeddings_become_two_equal_matrices(tok, tmp_path):
    theirs = hf_folder(tmp_path / "hf", tok, tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(tmp_path / "hf" / "model.safetensors")
    import_hf(str(tmp_path / "hf"), tmp_path / "ours", stage="base")
    ckpt = load_checkpoint(tmp_path / "ours")
    assert ckpt.meta["stage"] == "base"
    assert_same_logits(ckpt.model, theirs, tok.vocab_size)


def test_export_then_import_gives_back_the_same_model(tok, tmp_path):
    model = random_gpt(depth2_config(tok.vocab_size))
    write_checkpoint(tmp_path / "ckpt", model, tok)
    export_checkpoint(tmp_path / "ckpt", tmp_path / "hf")
    import_hf(str(tmp_path / "hf"), tmp_path / "back")
    back = load_checkpoint(tmp_path / "back").model.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(back[name], tensor), name


def test_settings_ours_cannot_run_are_refused_by_name(tok, tmp_path):
    hf_folder(tmp_path / "hf", tok, hidden_act="silu", intermediate_size=384)
    with pytest.raises(ArchitectureMismatch) as e:
        import_hf(str(tmp_path / "hf"), tmp_path / "ours")
    assert "hidden_act is 'silu'" in str(e.value) and "intermediate_size is 384" in str(e.value)
    assert not (tmp_path / "ours").exists()


def test_a_weight_transformers_would_drop_is_refused(tok, tmp_path):
    hf_folder(tmp_path / "hf", tok)
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    weights["model.layers.0.self_attn.q_norm.weight"] = torch.ones(32)
    save_file(weights, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ArchitectureMismatch, match="model.layers.0.self_attn.q_norm.weight"):
        import_hf(str(tmp_path / "hf"), tmp_path / "ours")


def test_a_tokenizer_that_is_not_nanochats_is_refused(tok, tmp_path):
    hf_folder(tmp_path / "hf", tok)
    path = tmp_path / "hf" / "tokenizer.json"
    data = json.loads(path.read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|python_start|>"]
    path.write_text(json.dumps(data))
    with pytest.raises(TokenizerMismatch, match="not the nanochat specials"):
        import_hf(str(tmp_path / "hf"), tmp_path / "ours")


def test_a_source_that_is_neither_folder_nor_repo_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a folder nor a Hugging Face repo id"):
        import_hf(str(tmp_path / "no" / "such" / "folder"), tmp_path / "ours")


def test_another_model_type_or_no_config_is_refused(tok, tmp_path):
    hf_folder(tmp_path / "hf", tok)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ArchitectureMismatch, match="model_type is 'llama', not 'nanochat'"):
        import_hf(str(tmp_path / "hf"), tmp_path / "ours")
    (tmp_path / "hf" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        import_hf(str(tmp_path / "hf"), tmp_path / "ours")
