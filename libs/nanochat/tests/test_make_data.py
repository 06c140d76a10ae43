"""nanochat.stages.make_data: the offline corpus and task sets, in the public formats, deterministic."""

import functools
import json
import shutil
import subprocess
import sys
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pyarrow.parquet as pq
import pytest
from nanochat.core_eval import load_bundle
from nanochat.dataset import list_shards, shard_name, split_shards
from nanochat.real_data import REAL_TASK_SPLITS
from nanochat.tasks.arc import ARC
from nanochat.tasks.customjson import IdentityTask
from nanochat.tasks.gsm8k import GSM8K, extract_answer
from nanochat.tasks.humaneval import HumanEval
from nanochat.tasks.mixtures import mid_mixture, sft_mixture
from nanochat.tasks.mmlu import MMLU
from nanochat.tasks.smoltalk import SmolTalk
from nanochat_contracts.events import parse_events

SMALL = [
    "--chat-train",
    "200",
    "--chat-test",
    "20",
    "--math-train",
    "100",
    "--math-test",
    "20",
    "--mc-train",
    "100",
    "--mc-test",
    "20",
    "--identity-train",
    "100",
    "--identity-test",
    "30",
    "--core-items",
    "20",
]


def make(data_dir, *extra):
    small = ["--identity-train", "100", "--identity-test", "30"] if "download" in extra else SMALL
    proc = subprocess.run(
        [sys.executable, "-m", "nanochat.stages.make_data", "--data-dir", str(data_dir), *small, *extra],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return list(parse_events(proc.stdout.splitlines()))[-1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return root, make(root)


def test_corpus_is_fineweb_format(data):
    root, finished = data
    shards = list_shards(root)
    assert [p.name for p in shards] == [f"shard_{i:05d}.parquet" for i in range(len(shards))]
    for path in shards:
        pf = pq.ParquetFile(path)
        assert pf.schema_arrow.names == ["text"]
        assert all(pf.metadata.row_group(g).num_rows <= 1024 for g in range(pf.num_row_groups))
    val = pq.ParquetFile(shards[-1])
    assert (val.metadata.num_rows, val.num_row_groups) == (2048, 2)  # one row group per rank at world size 2
    # The default text is this interpreter's standard library, e.g. genericpath.isfile's docstring.
    assert finished.metrics["source"] == "stdlib"
    text = [doc for path in shards for doc in pq.read_table(path).column("text").to_pylist()]
    assert sum("Test whether a path is a regular file" in doc for doc in text) == 1
    assert finished.type == "finished" and finished.outputs == []


def test_task_sets_load_and_held_out_splits_are_disjoint(data):
    root, _ = data
    pairs = [
        (GSM8K(root, "train"), GSM8K(root, "test")),
        (ARC(root, "ARC-Easy", "train"), ARC(root, "ARC-Easy", "test")),
        (ARC(root, "ARC-Challenge", "train"), ARC(root, "ARC-Challenge", "test")),
        (MMLU(root, "auxiliary_train", "train"), MMLU(root, "all", "test")),
        (SmolTalk(root, "train"), SmolTalk(root, "test")),
        (IdentityTask(root, "train"), IdentityTask(root, "test")),
    ]
    for train, test in pairs:
        first = {json.dumps(train[i]["messages"][0]) for i in range(len(train))}
        if not isinstance(train, SmolTalk):
            assert not first & {json.dumps(test[i]["messages"][0]) for i in range(len(test))}, type(train).__name__
    gsm = GSM8K(root, "test")
    for i in range(len(gsm)):
        item = gsm[i]
        assert gsm.evaluate(item, "".join(p["text"] for p in item["messages"][1]["content"]))
        assert any(p["type"] == "python" for p in item["messages"][1]["content"])
        assert extract_answer(item["messages"][1]["content"][-1]["text"]) is not None
    identity = IdentityTask(root, "test")
    assert all(identity.evaluate(identity[i], identity[i]["messages"][1]["content"]) for i in range(len(identity)))
    assert len({identity[i]["messages"][0]["content"] for i in range(len(identity))}) == 30


def test_humaneval_references_pass_their_tests(data):
    root, _ = data
    task = HumanEval(root)
    assert len(task) == 20
    assert all(task.evaluate(task[i], task[i]["messages"][1]["content"]) for i in range(0, 20, 5))
    assert not task.evaluate(task[0], "def nothing(): pass")


def test_mixtures_and_core_bundle(data):
    root, _ = data
    assert len(mid_mixture(root)) == 200 + 100 + 100
    # The original's SFT mixture (ARC-Easy, ARC-Challenge, GSM8K, SmolTalk); identity only when asked for.
    assert len(sft_mixture(root)) == 100 + 100 + 100 + 200
    assert len(sft_mixture(root, identity=True)) == 100 + 100 + 100 + 200 + 100
    identity_q = {IdentityTask(root, "train")[i]["messages"][0]["content"] for i in range(100)}
    mid = mid_mixture(root)
    assert not any(mid[i]["messages"][0]["content"] in identity_q for i in range(len(mid)))
    tasks = load_bundle(root / "eval_bundle")
    assert sorted(t.task_type for t in tasks) == ["language_modeling", "multiple_choice", "schema"]
    assert all(len(t.items()) == 20 for t in tasks)


def test_deterministic_given_seed_and_the_other_sources(tmp_path, data):
    root, first = data
    rerun = make(root)
    assert rerun.metrics == {**first.metrics, "reused": True}
    make(tmp_path / "again")
    for name in ["shard_00000.parquet", "tasks/openai/gsm8k/main/train-00000-of-00001.parquet"]:
        assert pq.read_table(root / name).equals(pq.read_table(tmp_path / "again" / name))
    assert (root / "tasks/identity/test.jsonl").read_text() == (
        tmp_path / "again/tasks/identity/test.jsonl"
    ).read_text()
    finished = make(tmp_path / "synthetic", "--source", "synthetic", "--synthetic-docs", "3000")
    assert finished.metrics["source"] == "synthetic" and finished.metrics["docs"] == 3000
    # The Debian docs are used only when asked for; when absent that is an error, never a silent fallback.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nanochat.stages.make_data",
            "--data-dir",
            str(tmp_path / "docs"),
            "--source",
            "python-docs",
            "--docs-path",
            str(tmp_path / "absent"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert (
        f"no python-docs text files under {tmp_path / 'absent'}"
        in list(parse_events(proc.stdout.splitlines()))[-1].message
    )
    other_seed = make(tmp_path / "seeded", "--source", "synthetic", "--synthetic-docs", "3000", "--seed", "7")
    assert other_seed.metrics["chars"] != finished.metrics["chars"]


@pytest.fixture
def hub(tmp_path, data):
    """A real HTTP server laid out like the public hosts: FineWeb shards, Hugging Face dataset
    files and the CORE bundle zip (the files are the offline data's, which has the same formats)."""
    root, _ = data
    site = tmp_path / "site"
    shards = list_shards(root)
    for i, src in [(0, shards[0]), (1, shards[-1])]:
        dest = site / "fineweb" / shard_name(i)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dest)
    for repo, config, split in REAL_TASK_SPLITS:
        name = f"{split}-00000-of-00001.parquet"
        dest = site / "datasets" / repo / "resolve" / "main" / config / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / "tasks" / repo / config / name, dest)
    with zipfile.ZipFile(site / "eval_bundle.zip", "w") as z:
        for path in sorted((root / "eval_bundle").rglob("*")):
            z.write(path, "eval_bundle/" + str(path.relative_to(root / "eval_bundle")))
    requests: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            requests.append(self.path)

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    yield {
        "args": [
            "--source",
            "download",
            "--fineweb-url",
            f"{url}/fineweb",
            "--datasets-url",
            f"{url}/datasets",
            "--core-bundle-url",
            f"{url}/eval_bundle.zip",
        ],
        "requests": requests,
        "site": site,
    }
    server.shutdown()
    server.server_close()


def test_download_source_fetches_the_real_layout_and_resumes(tmp_path, hub):
    dest = tmp_path / "real"
    finished = make(dest, *hub["args"], "--fineweb-shards", "2")
    assert finished.type == "finished" and finished.metrics["source"] == "download"
    # As the original's download: shards 0..N-1 and no other, the last of them the validation split.
    assert sorted(r for r in hub["requests"] if "fineweb" in r) == [
        f"/fineweb/{shard_name(0)}",
        f"/fineweb/{shard_name(1)}",
    ]
    assert [p.name for p in list_shards(dest)] == [shard_name(0), shard_name(1)]
    assert [p.name for p in split_shards(dest, "train")] == [shard_name(0)]
    assert [p.name for p in split_shards(dest, "val")] == [shard_name(1)]
    for repo, config, split in REAL_TASK_SPLITS:
        name = f"{split}-00000-of-00001.parquet"
        assert (dest / "tasks" / repo / config / name).read_bytes() == (
            hub["site"] / "datasets" / repo / "resolve" / "main" / config / name
        ).read_bytes()
    assert len(SmolTalk(dest, "train")) and len(GSM8K(dest, "test")) and len(MMLU(dest, "all", "test"))
    assert load_bundle(dest / "eval_bundle")
    assert len(IdentityTask(dest, "test")) == 30  # made here: the model's own name
    assert not list(dest.glob("*.part")) and not (dest / "eval_bundle.zip").exists()
    # Rerun with more shards: only the missing one is fetched.
    hub["requests"].clear()
    (hub["site"] / "fineweb" / shard_name(2)).write_bytes((hub["site"] / "fineweb" / shard_name(0)).read_bytes())
    make(dest, *hub["args"], "--fineweb-shards", "3")
    assert [r for r in hub["requests"] if "fineweb" in r] and all(
        shard_name(2) in r for r in hub["requests"] if "fineweb" in r
    ), hub["requests"]
    assert [p.name for p in split_shards(dest, "val")] == [shard_name(2)]
    assert not any("eval_bundle" in r or "datasets" in r for r in hub["requests"]), hub["requests"]


def test_download_refuses_to_mix_with_the_offline_data(data, hub):
    root, _ = data
    proc = subprocess.run(
        [sys.executable, "-m", "nanochat.stages.make_data", "--data-dir", str(root), *hub["args"]],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "offline data" in list(parse_events(proc.stdout.splitlines()))[-1].message
