"""tok_train and tok_eval as the trainer runs them: a tokenizer version folder, verified references."""

import json
import os
import re
import subprocess
import sys

import pytest
from nanochat.tokenizer import Tokenizer
from nanochat_contracts.events import parse_events
from nanochat_contracts.manifest import ManifestError, verify_manifest


def run(stage, *args, env=None):
    proc = subprocess.run(
        [sys.executable, "-m", f"nanochat.stages.{stage}", *args], capture_output=True, text=True, timeout=300, env=env
    )
    return proc, list(parse_events(proc.stdout.splitlines()))


@pytest.fixture(scope="module")
def tokenizer_version(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    data = root / "data"
    proc, _ = run(
        "make_data",
        "--data-dir",
        str(data),
        "--chat-train",
        "20",
        "--chat-test",
        "5",
        "--math-train",
        "10",
        "--math-test",
        "5",
        "--mc-train",
        "10",
        "--mc-test",
        "5",
        "--identity-train",
        "5",
        "--identity-test",
        "5",
    )
    assert proc.returncode == 0, proc.stderr
    out = root / "tok"
    proc, events = run(
        "tok_train",
        "--data-dir",
        str(data),
        "--out",
        str(out),
        "--vocab-size",
        "1024",
        "--max-chars",
        "3000000",
        "--job-id",
        "job-1",
        "--input-version",
        "corpus:1",
    )
    assert proc.returncode == 0, proc.stderr
    return data, out, events


def test_tok_train_writes_a_tokenizer_version(tokenizer_version):
    _, out, events = tokenizer_version
    assert [e.type for e in events] == ["started", "progress", "finished"]
    finished = events[-1]
    assert [o.model_dump() for o in finished.outputs] == [{"path": str(out), "registry_stage": "tokenizer"}]
    assert sorted(os.listdir(out)) == ["manifest.json", "meta.json", "tokenizer"]
    manifest = verify_manifest(out)
    assert set(manifest["files"]) == {"meta.json", "tokenizer/ranks.tiktoken", "tokenizer/tokenizer.json"}
    meta = json.loads((out / "meta.json").read_text())
    assert meta["stage"] == "tokenizer" and meta["job_id"] == "job-1" and meta["parent"] == "corpus:1"
    assert meta["options"]["vocab_size"] == 1024 and meta["code_version"]
    tok = Tokenizer.load(out / "tokenizer")
    assert tok.vocab_size == 1024 and finished.metrics["num_ranks"] == 1015
    text = "def f(x):\n    return x + 1\n"
    assert tok.decode(tok.encode(text)) == text
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".tok")]


def test_tok_train_refuses_an_existing_out(tokenizer_version):
    data, out, _ = tokenizer_version
    proc, events = run("tok_train", "--data-dir", str(data), "--out", str(out), "--vocab-size", "300")
    assert proc.returncode == 1 and events[-1].type == "error" and "already exists" in events[-1].message


def test_tok_train_fails_when_the_corpus_cannot_reach_the_vocab(tokenizer_version, tmp_path):
    # 2,000 chars hold at most 1,999 adjacent pairs, so at most 1,999 merges: 4,096 is out of reach.
    data, _, _ = tokenizer_version
    out = tmp_path / "small"
    proc, events = run(
        "tok_train", "--data-dir", str(data), "--out", str(out), "--vocab-size", "4096", "--max-chars", "2000"
    )
    assert proc.returncode == 1 and events[-1].type == "error"
    message = events[-1].message
    assert re.search(r"vocab asked 4096, vocab reached (\d+), corpus ([\d,]+) chars", message), message
    reached = int(re.search(r"vocab reached (\d+)", message).group(1))
    chars = int(re.search(r"corpus ([\d,]+) chars", message).group(1).replace(",", ""))
    assert 256 + 9 <= reached < 4096 and 2000 <= chars < 2000 + 3000  # the last document passes max_chars
    assert not out.exists()


def test_tok_eval_compares_with_verified_gpt2_and_gpt4(tokenizer_version):
    data, out, _ = tokenizer_version
    proc, events = run(
        "tok_eval",
        "--data-dir",
        str(data),
        "--init-from",
        str(out),
        "--input-version",
        "nanochat:1",
        "--max-chars",
        "20000",
    )
    assert proc.returncode == 0, proc.stderr
    finished = events[-1]
    assert finished.type == "finished" and finished.outputs == []
    metrics = finished.metrics
    for sample in ("corpus-train", "corpus-val", "prose", "code"):
        for enc in ("ours", "gpt2", "gpt4"):
            assert metrics[f"compression/{sample}/{enc}"] > 1.0
    assert metrics["compression/prose/gpt4"] > metrics["compression/prose/ours"]  # 100K vocab vs 1K
    evals = [e for e in events if e.type == "eval"]
    assert len(evals) == len(metrics) and all(e.version == "nanochat:1" for e in evals)


def test_tok_eval_rejects_a_tampered_version(tokenizer_version, tmp_path):
    data, out, _ = tokenizer_version
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(out), str(copy)], check=True)
    with open(copy / "tokenizer" / "ranks.tiktoken", "a") as f:
        f.write("\n")
    with pytest.raises(ManifestError, match="ranks.tiktoken"):
        verify_manifest(copy)
    proc, events = run("tok_eval", "--data-dir", str(data), "--init-from", str(copy))
    assert proc.returncode == 1 and "ManifestError" in events[-1].message


def test_other_ranks_do_nothing(tokenizer_version, tmp_path):
    data, _, _ = tokenizer_version
    proc, events = run(
        "tok_train",
        "--data-dir",
        str(data),
        "--out",
        str(tmp_path / "r1"),
        "--vocab-size",
        "300",
        env={**os.environ, "RANK": "1", "WORLD_SIZE": "2"},
    )
    assert proc.returncode == 0 and events == [] and not (tmp_path / "r1").exists()


def test_atomic_folder_publishes_whole_or_nothing(tmp_path):
    from nanochat.artifacts import atomic_folder
    from nanochat_contracts.manifest import write_manifest

    with pytest.raises(RuntimeError):
        with atomic_folder(tmp_path / "v1") as tmp:
            (tmp / "weights.bin").write_bytes(b"half")
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []
    with atomic_folder(tmp_path / "v1") as tmp:
        (tmp / "weights.bin").write_bytes(b"whole")
        write_manifest(tmp)
    assert verify_manifest(tmp_path / "v1")["files"]["weights.bin"]["size"] == 5
    assert os.listdir(tmp_path) == ["v1"]
