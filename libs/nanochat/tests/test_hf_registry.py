"""The export and import CLIs against a real registry (the app under uvicorn on a free port).

Imports become versions (stage sft unless told, no parent, lineage "imported from ...") that
download into checkpoints scoring like their source; a registry version exports with its lineage
and its report card's eval table on the model card.
"""

import json
import threading
import time

import pytest
import torch
from hf_models import (
    assert_same_logits,
    depth2_config,
    hf_folder,
    random_gpt,
    tiny_tokenizer,
    write_checkpoint,
    write_original,
)
from huggingface_hub import ModelCard
from nanochat import hf_export, hf_import, original_import
from nanochat.checkpoint import load_checkpoint
from nanochat_testing.servers import free_port
from registry.api import create_app
from registry.settings import Settings
from registry_client import RegistryClient
from transformers import NanoChatForCausalLM

TOKEN = "hf-test-token"
REPORT = """# nanochat report card

## Environment

- a test

## Summary

| Metric | SFT |
|---|---|
| ARC-Easy | 0.3100 ± 0.020 (n=100) |

## sft

- made by `chat_sft`
"""


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    port = free_port()
    app = create_app(Settings(data_dir=tmp_path_factory.mktemp("registry"), write_token=TOKEN, log_level="WARNING"))
    server = uvicorn_server(app, port)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("registry did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def uvicorn_server(app, port):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))


@pytest.fixture()
def client(registry, tmp_path):
    with RegistryClient(registry, token=TOKEN, cache_dir=tmp_path / "cache") as rc:
        yield rc


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_an_hf_import_becomes_a_served_stage_version(registry, client, tok, tmp_path, capsys):
    theirs = hf_folder(tmp_path / "hf", tok)
    argv = [str(tmp_path / "hf"), "--out", str(tmp_path / "ours"), "--register", "imported"]
    assert hf_import.main([*argv, "--registry", registry, "--token", TOKEN]) == 0
    assert "registered imported:1 (sft, imported from hf:" in capsys.readouterr().out
    version = client.resolve("imported")  # the serving rule: newest sft or rl
    assert (version.version, version.stage, version.parent) == (1, "sft", None)
    assert version.meta["lineage"] == f"imported from hf:{(tmp_path / 'hf').resolve()}"
    ckpt = load_checkpoint(client.download("imported", 1))
    assert_same_logits(ckpt.model, theirs, tok.vocab_size)


def test_an_original_import_is_registered_with_its_step(registry, client, tok, tmp_path, capsys, monkeypatch):
    run = write_original(tmp_path, random_gpt(depth2_config(tok.vocab_size)), tok, steps=(3, 9))
    monkeypatch.setenv("NANOCHAT_REGISTRY_URL", registry)
    monkeypatch.setenv("NANOCHAT_REGISTRY_TOKEN", TOKEN)
    argv = [str(run), "--out", str(tmp_path / "ours"), "--register", "original", "--stage", "rl"]
    assert original_import.main(argv) == 0
    version = client.get_version("original", 1)
    assert (version.stage, version.step) == ("rl", 9)
    assert version.meta["lineage"].startswith("imported from original nanochat")
    assert "registered original:1 (rl" in capsys.readouterr().out


def test_a_registry_version_exports_with_lineage_and_report_card(registry, client, tok, tmp_path):
    model = random_gpt(depth2_config(tok.vocab_size))
    write_checkpoint(tmp_path / "ckpt", model, tok)
    client.upload_folder(tmp_path / "ckpt", "chat", stage="sft")
    (tmp_path / "report.md").write_text(REPORT)
    client.attach("chat", 1, tmp_path / "report.md")
    client.patch_metrics("chat", 1, {"GSM8K": 0.05})
    argv = ["--name", "chat", "--version", "1", "--out", str(tmp_path / "hf"), "--cache-dir", str(tmp_path / "c")]
    assert hf_export.main([*argv, "--registry", registry, "--token", TOKEN]) == 0
    card = ModelCard.load(tmp_path / "hf" / "README.md")
    assert "1. chat:1 (sft)" in card.text
    assert "| ARC-Easy | 0.3100 ± 0.020 (n=100) |" in card.text and "## Environment" not in card.text
    results = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert results == {"ARC-Easy": 0.31, "GSM8K": 0.05, "val bpb": 1.25}
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "nanochat"
    hf = NanoChatForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = torch.randint(0, tok.vocab_size, (1, 40))
    with torch.no_grad():
        assert float((hf(ids).logits - model(ids)).abs().max()) <= 1e-4


def test_registry_errors_are_one_line(registry, tmp_path, capsys):
    argv = ["--name", "nosuch", "--version", "4", "--out", str(tmp_path / "hf"), "--registry", registry]
    assert hf_export.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("hf_export: 404") and "\n" == err[-1] and err.count("\n") == 1
