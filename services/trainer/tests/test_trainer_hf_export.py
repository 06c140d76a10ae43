"""The hf_export job stage end to end: a real worker runs it under torchrun on a registry version,
and the transformers export lands on that version as the attachment `hf_export.tar`."""

from __future__ import annotations

import io
import json
import tarfile
import uuid

import pytest
import torch
from nanochat.checkpoint import save_checkpoint
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer
from registry_client import RegistryClient
from trainer_testlib import AUTH, REGISTRY_TOKEN, wait_job

pytestmark = pytest.mark.slow


def test_an_hf_export_job_attaches_the_export_to_its_version(api, start_worker, registry_url, tmp_path):
    tok = Tokenizer.train_from_iterator(["A tiny corpus for a tiny tokenizer, 7*3 = 21. "] * 50, vocab_size=300)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(2, tok.vocab_size, sequence_len=128))
    model.init_weights()
    save_checkpoint(tmp_path / "sft", model, tok, {"stage": "sft", "made_by": "chat_sft", "metrics": {}})
    name = f"hf-{uuid.uuid4().hex[:6]}"
    with RegistryClient(registry_url, token=REGISTRY_TOKEN, cache_dir=tmp_path / "cache") as rc:
        uploaded = rc.upload_folder(tmp_path / "sft", name, stage="sft")
        version = uploaded.version
        worker = start_worker()
        body = {"stage": "hf_export", "input": {"name": name, "version": version}}
        job = wait_job(api, api.post("/v1/jobs", json=body, headers=AUTH).json()["id"], timeout=300, worker=worker)
        assert job["status"] == "succeeded", job
        assert job["produced"] == []
        info = rc.get_version(name, version)
        assert [a.path for a in info.attachments] == ["hf_export.tar"]
        # The export's own config.json and README stay inside the tar: the model's files are untouched.
        assert {(f.path, f.sha256) for f in info.files} == {(f.path, f.sha256) for f in uploaded.files}
        packed = rc.read_attachment(name, version, "hf_export.tar")
    with tarfile.open(fileobj=io.BytesIO(packed)) as tar:
        names = set(tar.getnames())
        config = json.load(tar.extractfile("hf_export/config.json"))
    assert {"hf_export/model.safetensors", "hf_export/tokenizer.json", "hf_export/README.md"} <= names
    assert config["model_type"] == "nanochat" and config["num_hidden_layers"] == 2
