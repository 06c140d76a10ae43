"""nanochat.tasks and nanochat.sandbox: each loader on hand-written rows in the public format."""

import json
import socket

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.sandbox import network_isolated, run_python
from nanochat.tasks.arc import ARC
from nanochat.tasks.common import TaskMixture, render_mc, task_url
from nanochat.tasks.customjson import CustomJSON, IdentityTask
from nanochat.tasks.gsm8k import GSM8K, extract_answer
from nanochat.tasks.humaneval import HumanEval
from nanochat.tasks.mmlu import MMLU
from nanochat.tasks.smoltalk import SmolTalk
from nanochat.tokenizer import Tokenizer


def put(root, repo, config, split, rows, fmt="parquet"):
    folder = root / "tasks" / repo / config
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{split}-00000-of-00001.parquet")
    else:
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_multiple_choice_rendering_matches_the_spec():
    assert render_mc("2+2?", ["A", "B"], ["4", "5"]) == (
        "Multiple Choice question: 2+2?\n- 4=A\n- 5=B\n\nRespond only with the letter of the correct answer.")


def test_smoltalk_rows(tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}]
    put(tmp_path, "HuggingFaceTB/smol-smoltalk", "data", "train", [{"messages": messages}])
    task = SmolTalk(tmp_path, "train")
    assert len(task) == 1 and task[0]["messages"] == messages
    with pytest.raises(TypeError, match="no grader"):
        task.evaluate(task[0], "x")
    with pytest.raises(FileNotFoundError, match="make_data"):
        SmolTalk(tmp_path, "test")


def test_mmlu_test_and_auxiliary_train(tmp_path):
    row = {"question": "Capital of France?", "subject": "geography", "choices": ["Rome", "Paris", "Oslo", "Bern"], "answer": 1}
    put(tmp_path, "cais/mmlu", "all", "test", [row])
    put(tmp_path, "cais/mmlu", "auxiliary_train", "train", [{"train": row}])
    for task in (MMLU(tmp_path, "all", "test"), MMLU(tmp_path, "auxiliary_train", "train")):
        item = task[0]
        assert item["letters"] == ["A", "B", "C", "D"] and item["messages"][1]["content"] == "B"
        assert "- Paris=B\n" in item["messages"][0]["content"]
        assert task.eval_type == "categorical" and task.evaluate(item, "B") and not task.evaluate(item, "A")


def test_arc_rows_use_their_labels(tmp_path):
    rows = [{"id": "x1", "question": "Which is a mammal?", "choices": {"text": ["Shark", "Whale"], "label": ["A", "B"]}, "answerKey": "B"},
            {"id": "x2", "question": "Pick one", "choices": {"text": ["p", "q", "r"], "label": ["1", "2", "3"]}, "answerKey": "3"}]
    put(tmp_path, "allenai/ai2_arc", "ARC-Challenge", "test", rows, fmt="jsonl")
    task = ARC(tmp_path, "ARC-Challenge", "test")
    assert task[0]["messages"][1]["content"] == "B" and task[1]["letters"] == ["1", "2", "3"]
    assert task.evaluate(task[1], "3")
    with pytest.raises(ValueError, match="ARC subset"):
        ARC(tmp_path, "ARC-Medium")


def test_gsm8k_calculator_calls_become_tool_parts(tmp_path):
    answer = "She sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18"
    put(tmp_path, "openai/gsm8k", "main", "test", [{"question": "Eggs?", "answer": answer}])
    task = GSM8K(tmp_path, "test")
    parts = task[0]["messages"][1]["content"]
    assert [p["type"] for p in parts] == ["text", "python", "python_output", "text", "python", "python_output", "text"]
    assert parts[1]["text"] == "16-3-4" and parts[2]["text"] == "9" and parts[-1]["text"] == "18.\n#### 18"
    assert "".join(p["text"] for p in parts) == answer.replace("<<16-3-4=9>>", "16-3-49").replace("<<9*2=18>>", "9*218")
    assert task.evaluate(task[0], "so #### 18") and not task.evaluate(task[0], "#### 17")
    assert task.reward(task[0], "no answer") == 0.0
    assert extract_answer("#### 1,234") == "1234"
    ids, mask = Tokenizer({bytes([i]): i for i in range(256)}).render_conversation(task[0])
    assert sum(mask) > 0


def test_humaneval_runs_code_in_the_sandbox(tmp_path):
    row = {"task_id": "HumanEval/0", "prompt": "from typing import List\n\ndef total(xs: List[int]) -> int:\n    \"\"\"Sum.\"\"\"\n",
           "canonical_solution": "    return sum(xs)\n", "test": "def check(candidate):\n    assert candidate([1, 2]) == 3\n",
           "entry_point": "total"}
    put(tmp_path, "openai/openai_humaneval", "openai_humaneval", "test", [row])
    task = HumanEval(tmp_path, timeout=2)
    item = task[0]
    assert task.evaluate(item, item["messages"][1]["content"])
    assert task.evaluate(item, "Here:\n```python\ndef total(xs):\n    return sum(xs)\n```")
    assert not task.evaluate(item, "def total(xs):\n    return 0\n")
    assert not task.evaluate(item, "def total(xs):\n    while True: pass\n")


def test_sandbox_limits():
    assert run_python("print(6 * 7)").stdout.strip() == "42"
    slow = run_python("while True: pass", timeout=1)
    assert slow.timed_out and not slow.success
    assert "MemoryError" in run_python("x = bytearray(4 << 30)", memory_mb=256).stderr
    assert "network access is disabled" in run_python("import socket; socket.create_connection(('1.1.1.1', 80))").stderr


def test_sandbox_network_namespace_stops_code_that_gets_past_the_prelude():
    # `_socket` is the C module under `socket`: the prelude does not cover it, the namespace does.
    # Where the OS refuses the namespace, the probe says so and such code reaches the host.
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        code = f"import _socket; s = _socket.socket(); s.settimeout(3); s.connect(('127.0.0.1', {port})); print('reached')"
        result = run_python(code, timeout=10)
    if network_isolated():
        assert not result.success and "unreachable" in result.stderr, result
    else:
        assert result.stdout.strip() == "reached", result


def test_custom_json_and_identity(tmp_path):
    path = tmp_path / "convs.jsonl"
    path.write_text(json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}) + "\n")
    task = CustomJSON(path)
    assert len(task) == 2 and task[0]["messages"][1]["content"] == "yo"
    path.write_text('{"nope": 1}\n')
    with pytest.raises(ValueError, match="line 1"):
        CustomJSON(path)
    identity = tmp_path / "tasks" / "identity"
    identity.mkdir(parents=True)
    (identity / "test.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "who are you?"},
                                                                  {"role": "assistant", "content": "I'm nanochat."}], "expected": "nanochat"}) + "\n")
    task = IdentityTask(tmp_path, "test")
    assert task.evaluate(task[0], "I am NanoChat!") and not task.evaluate(task[0], "I am a bot")


def test_slices_and_mixture_are_deterministic(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(10)]
    put(tmp_path, "openai/gsm8k", "main", "train", rows)
    sliced = GSM8K(tmp_path, "train", start=2, stop=9, step=3)
    assert [sliced[i]["messages"][0]["content"] for i in range(len(sliced))] == ["q2", "q5", "q8"]
    with pytest.raises(IndexError):
        sliced[3]
    a, b = TaskMixture([GSM8K(tmp_path, "train"), sliced]), TaskMixture([GSM8K(tmp_path, "train"), sliced])
    assert len(a) == 13 and [a[i] for i in range(13)] == [b[i] for i in range(13)]


def test_download_paths_are_kept():
    assert task_url("openai/gsm8k", "main", "test") == \
        "https://huggingface.co/datasets/openai/gsm8k/resolve/main/main/test-00000-of-00001.parquet"
