"""The Hugging Face export: transformers' NanoChat on the exported folder computes what our GPT does.

Random depth-2 models (one head; and a grouped-query one, 4 query heads over 2 key-value heads)
with a ~400-id tokenizer, exported by the library and by the CLI, then loaded by transformers
itself (`NanoChatForCausalLM`, `AutoTokenizer`): logits within 1e-4 in fp32, the chat template's
ids equal to ours, greedy generation equal to our Engine's, and the refusals when something differs.
"""

import json
import subprocess
import sys
import tarfile

import pytest
import torch
from hf_models import CONVERSATIONS, depth2_config, gqa_config, random_gpt, tiny_tokenizer, write_checkpoint
from huggingface_hub import ModelCard
from nanochat.checkpoint import load_checkpoint
from nanochat.engine import Engine
from nanochat.hf_export import export_checkpoint, verify_export
from nanochat.hf_mapping import ArchitectureMismatch, check_same_shapes, gpt_config
from nanochat.tokenizer import tool_call_text
from nanochat_contracts.events import parse_events
from nanochat_testing.lockfile import installed_by
from transformers import AutoTokenizer, NanoChatConfig, NanoChatForCausalLM


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def checkpoint(tok, tmp_path_factory):
    """A depth-2 checkpoint for the CLI tests (each CLI run is a new process importing transformers)."""
    return write_checkpoint(tmp_path_factory.mktemp("cli") / "ckpt", random_gpt(depth2_config(tok.vocab_size)), tok)


@pytest.fixture(scope="module", params=["depth2", "gqa"])
def exported(request, tok, tmp_path_factory):
    config = (depth2_config if request.param == "depth2" else gqa_config)(tok.vocab_size)
    root = tmp_path_factory.mktemp(f"export-{request.param}")
    model = random_gpt(config)
    write_checkpoint(root / "ckpt", model, tok)
    export_checkpoint(root / "ckpt", root / "hf")
    return {"model": model, "ckpt": root / "ckpt", "hf": root / "hf"}


def test_folder_is_a_transformers_nanochat(exported):
    files = sorted(p.name for p in exported["hf"].iterdir())
    assert files == [
        "README.md",
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    config = json.loads((exported["hf"] / "config.json").read_text())
    assert config["model_type"] == "nanochat"
    assert config["architectures"] == ["NanoChatForCausalLM"]
    assert config["tie_word_embeddings"] is False and config["hidden_act"] == "relu2"
    generation = json.loads((exported["hf"] / "generation_config.json").read_text())
    tok = load_checkpoint(exported["ckpt"]).tokenizer
    assert generation["eos_token_id"] == [tok.encode_special("<|assistant_end|>"), tok.bos_token_id]


def test_logits_equal_ours_in_fp32(exported, tok):
    hf = NanoChatForCausalLM.from_pretrained(exported["hf"], dtype=torch.float32).eval()
    torch.manual_seed(1)
    ids = torch.randint(0, tok.vocab_size, (2, 96))
    with torch.no_grad():
        ours, theirs = exported["model"](ids), hf(ids).logits
    assert theirs.shape == ours.shape == (2, 96, tok.vocab_size)
    assert float((theirs - ours).abs().max()) <= 1e-4
    assert float(ours.std()) > 0.1  # the comparison is between non-trivial logits


def test_chat_template_renders_our_ids(exported, tok):
    hf_tok = AutoTokenizer.from_pretrained(exported["hf"])
    for conversation in CONVERSATIONS:
        rendered = hf_tok.apply_chat_template(conversation, tokenize=True)["input_ids"]
        assert list(rendered) == tok.render_conversation(conversation, max_tokens=None)[0]
        prompt = hf_tok.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True)["input_ids"]
        assert list(prompt) == tok.render_for_completion(conversation)
    text = CONVERSATIONS[1][3]["content"]
    assert hf_tok.decode(hf_tok.encode(text, add_special_tokens=False)) == text


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


def test_chat_template_renders_tools_calls_and_results_as_ours(exported, tok):
    """transformers' form (tools=, assistant tool_calls, role tool) gives the ids our tokenizer
    gives the same conversation in ours (tools listed, the call a python part)."""
    hf_tok = AutoTokenizer.from_pretrained(exported["hf"])
    call = {"name": "get_weather", "arguments": {"city": "Zürich"}}
    theirs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": call}]},
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "21 degrees."},
        {"role": "user", "content": "Thanks"},
    ]
    ours = [*theirs[:2], {"role": "assistant", "content": [{"type": "python", "text": tool_call_text(**call)}]}]
    ours += theirs[3:]
    plain = [t["function"] for t in TOOLS]
    expected = tok.render_conversation({"messages": ours, "tools": plain}, max_tokens=None)[0]
    assert TOOLS[0]["function"]["name"].encode() in tok.decode_bytes(expected)

    def rendered(messages, **kw):
        return list(hf_tok.apply_chat_template(messages, tools=TOOLS, tokenize=True, **kw)["input_ids"])

    assert rendered(theirs) == expected
    as_string = {**call, "arguments": json.dumps(call["arguments"], ensure_ascii=False)}  # OpenAI's wire form
    assert rendered([*theirs[:2], {**theirs[2], "tool_calls": [{"function": as_string}]}, *theirs[3:]]) == expected
    # A prompt ending in the tool's result leaves the assistant's turn open; one ending in a user
    # message opens the next turn.
    open_turn = tok.render_for_completion({"messages": ours[:4], "tools": plain})
    assert rendered(theirs[:4], add_generation_prompt=True) == open_turn
    assert rendered(theirs, add_generation_prompt=True) == tok.render_for_completion({"messages": ours, "tools": plain})
    with pytest.raises(Exception, match="tool message must follow"):
        hf_tok.apply_chat_template([theirs[1], theirs[3]], tokenize=False)


def test_chat_template_refuses_what_ours_refuses(exported):
    hf_tok = AutoTokenizer.from_pretrained(exported["hf"])
    with pytest.raises(Exception, match="alternate"):
        hf_tok.apply_chat_template([{"role": "assistant", "content": "first?"}], tokenize=False)
    with pytest.raises(Exception, match="part type"):
        bad = [{"role": "user", "content": "x"}, {"role": "assistant", "content": [{"type": "image", "text": "?"}]}]
        hf_tok.apply_chat_template(bad, tokenize=False)


def test_greedy_generation_through_the_chat_template_equals_our_engine(exported, tok):
    hf = NanoChatForCausalLM.from_pretrained(exported["hf"], dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(exported["hf"])
    engine = Engine(exported["model"], tok)
    for conversation in CONVERSATIONS[:2]:
        inputs = hf_tok.apply_chat_template(
            conversation, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        out = hf.generate(**inputs, max_new_tokens=24, do_sample=False)
        theirs = out[0, inputs["input_ids"].shape[1] :].tolist()
        prompt = tok.render_for_completion(conversation)
        sequences, _ = engine.generate_batch(prompt, max_tokens=24, temperature=0.0)
        ours = sequences[0][len(prompt) :]
        stops = {tok.encode_special("<|assistant_end|>"), tok.bos_token_id}
        # transformers keeps the stop token it ended on; the engine leaves it out.
        assert theirs[: len(ours)] == ours and set(theirs[len(ours) :]) <= stops
        assert len(ours) >= 3


def test_model_card_has_lineage_evals_and_model_index(exported):
    card = ModelCard.load(exported["hf"] / "README.md")
    assert card.data.library_name == "transformers"
    results = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert results == {"ARC-Easy": 0.31, "val bpb": 1.25}
    assert "## Lineage" in card.text and "made by chat_sft" in card.text
    assert "| ARC-Easy | 0.3100 |" in card.text and "## Data" in card.text


def test_a_behaviour_difference_is_refused(exported, tmp_path):
    """The exported config edited to another softcap: same tensors, other logits -> refused."""
    folder = tmp_path / "edited"
    folder.mkdir()
    for f in exported["hf"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["final_logit_softcapping"] = 30.0
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArchitectureMismatch, match="computation differs"):
        verify_export(folder, load_checkpoint(exported["ckpt"]))


def test_shape_differences_are_named():
    ours = {"transformer.wte.weight": torch.Size((10, 8)), "transformer.h.0.mlp.c_fc.weight": torch.Size((32, 8))}
    ours["transformer.h.0.attn.ve_gate.weight"] = torch.Size((1, 8))
    theirs = {"model.embed_tokens.weight": torch.Size((10, 8)), "model.layers.0.mlp.fc1.weight": torch.Size((24, 8))}
    theirs["lm_head.weight"] = torch.Size((10, 8))
    with pytest.raises(ArchitectureMismatch) as e:
        check_same_shapes(ours, theirs, "export")
    message = str(e.value)
    assert "transformer.h.0.attn.ve_gate.weight (1, 8) has no counterpart" in message
    assert "transformer.h.0.mlp.c_fc.weight is (32, 8) here but model.layers.0.mlp.fc1.weight is (24, 8)" in message
    assert "lm_head.weight (10, 8) has no counterpart in our GPT" in message


def test_config_settings_ours_cannot_run_are_named():
    config = NanoChatConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=100,
        num_hidden_layers=1,
        num_attention_heads=2,
        hidden_act="gelu",
        final_logit_softcapping=None,
    )
    with pytest.raises(ArchitectureMismatch) as e:
        gpt_config(config)
    for what in ("hidden_act is 'gelu'", "final_logit_softcapping is None", "intermediate_size is 100"):
        assert what in str(e.value)


def test_cli_exports_a_folder_and_reports_errors(checkpoint, tmp_path):
    run = [sys.executable, "-m", "nanochat.hf_export"]
    done = subprocess.run(
        [*run, str(checkpoint), "--out", str(tmp_path / "cli")], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "cli" / "model.safetensors").is_file()
    again = subprocess.run(
        [*run, str(checkpoint), "--out", str(tmp_path / "cli")], capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 1 and "already exists" in again.stderr
    missing = subprocess.run(
        [*run, str(tmp_path / "nope"), "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=300
    )
    assert missing.returncode == 1 and "does not exist" in missing.stderr and not (tmp_path / "x").exists()


def test_the_serving_image_does_not_install_transformers():
    for package, extras in (("nanochat-inference", ()), ("nanochat", ("serve",))):
        assert "transformers" not in installed_by(package, extras), package
    assert "transformers" in installed_by("nanochat", ("hf",))


def test_transformers_is_optional(checkpoint, tmp_path):
    """Without transformers the export says which extra to install; the serving path never imports it."""
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import nanochat.checkpoint, nanochat.engine, nanochat.hf_export\n"
        "from nanochat.hf_export import main\n"
        f"sys.exit(main([{str(checkpoint)!r}, '--out', {str(tmp_path / 'x')!r}]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "nanochat[hf]" in done.stderr, done.stderr
    probe = "import sys, nanochat.checkpoint, nanochat.engine, nanochat.hf_export, nanochat.hf_import, nanochat.original_import; print('transformers' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert loaded.stdout.strip() == "False", loaded.stderr


def test_the_trainer_stage_packs_the_export_for_the_registry(checkpoint, tok, tmp_path):
    """`nanochat.stages.hf_export` (the trainer's job stage) writes OUT/hf_export.tar, no outputs."""
    cli = [sys.executable, "-m", "nanochat.stages.hf_export", "--init-from", str(checkpoint)]
    cli += ["--out", str(tmp_path / "out"), "--input-version", "chat:4"]
    done = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    finished = [e for e in parse_events(done.stdout.splitlines()) if e.type == "finished"]
    assert len(finished) == 1 and finished[0].outputs == [] and finished[0].metrics == {}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["hf_export.tar"]
    with tarfile.open(tmp_path / "out" / "hf_export.tar") as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    folder = tmp_path / "unpacked" / "hf_export"
    assert "# chat-v4" in (folder / "README.md").read_text()
    hf = NanoChatForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(0, tok.vocab_size, (1, 30))
    with torch.no_grad():
        assert float((hf(ids).logits - load_checkpoint(checkpoint).model(ids)).abs().max()) <= 1e-4
