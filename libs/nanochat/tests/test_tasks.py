"""nanochat.tasks and nanochat.sandbox: each loader on hand-written rows in the public format."""

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from nanochat.tasks.arc import ARC
from nanochat.tasks.common import TaskMixture, render_mc, task_url
from nanochat.tasks.customjson import CustomJSON, IdentityTask
from nanochat.tasks.gsm8k import GSM8K, extract_answer
from nanochat.tasks.humaneval import HumanEval
from nanochat.tasks.mixtures import mid_mixture, sft_mixture
from nanochat.tasks.mmlu import MMLU
from nanochat.tasks.smoltalk import SmolTalk
from nanochat.tokenizer import Tokenizer


def put(root, repo, config, split, rows, fmt="parquet", files=1):
    folder = root / "tasks" / repo / config
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        size = -(-len(rows) // files)
        for f in range(files):
            pq.write_table(
                pa.Table.from_pylist(rows[f * size : (f + 1) * size]),
                folder / f"{split}-{f:05d}-of-{files:05d}.parquet",
            )
    else:
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def smoltalk_rows(n, tag="s"):
    return [
        {"messages": [{"role": "user", "content": f"{tag}{i}"}, {"role": "assistant", "content": "ok"}]}
        for i in range(n)
    ]


def mmlu_rows(n):
    return [{"question": f"m{i}", "subject": "x", "choices": ["a", "b", "c", "d"], "answer": 0} for i in range(n)]


def arc_rows(n, tag="a"):
    return [
        {"id": str(i), "question": f"{tag}{i}", "choices": {"text": ["p", "q"], "label": ["A", "B"]}, "answerKey": "A"}
        for i in range(n)
    ]


def gsm8k_rows(n):
    return [{"question": f"g{i}", "answer": f"#### {i}"} for i in range(n)]


def row_numbers(task, tag):
    """Which source row each item of `task` is: the number after `tag` in its first message."""
    return [int(re.search(rf"\b{tag}(\d+)\b", task[k]["messages"][0]["content"]).group(1)) for k in range(len(task))]


def test_multiple_choice_rendering_matches_the_spec():
    assert render_mc("2+2?", ["A", "B"], ["4", "5"]) == (
        "Multiple Choice question: 2+2?\n- 4=A\n- 5=B\n\nRespond only with the letter of the correct answer."
    )


def test_smoltalk_rows(tmp_path):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
    put(tmp_path, "HuggingFaceTB/smol-smoltalk", "data", "train", [{"messages": messages}])
    task = SmolTalk(tmp_path, "train")
    assert len(task) == 1 and task[0]["messages"] == messages
    with pytest.raises(TypeError, match="no grader"):
        task.evaluate(task[0], "x")
    with pytest.raises(FileNotFoundError, match="make_data"):
        SmolTalk(tmp_path, "test")


def test_mmlu_test_and_auxiliary_train(tmp_path):
    row = {
        "question": "Capital of France?",
        "subject": "geography",
        "choices": ["Rome", "Paris", "Oslo", "Bern"],
        "answer": 1,
    }
    put(tmp_path, "cais/mmlu", "all", "test", [row])
    put(tmp_path, "cais/mmlu", "auxiliary_train", "train", [{"train": row}])
    for task in (MMLU(tmp_path, "all", "test"), MMLU(tmp_path, "auxiliary_train", "train")):
        item = task[0]
        assert item["letters"] == ["A", "B", "C", "D"] and item["messages"][1]["content"] == "B"
        assert "- Paris=B\n" in item["messages"][0]["content"]
        assert task.eval_type == "categorical" and task.evaluate(item, "B") and not task.evaluate(item, "A")


def test_arc_rows_use_their_labels(tmp_path):
    rows = [
        {
            "id": "x1",
            "question": "Which is a mammal?",
            "choices": {"text": ["Shark", "Whale"], "label": ["A", "B"]},
            "answerKey": "B",
        },
        {
            "id": "x2",
            "question": "Pick one",
            "choices": {"text": ["p", "q", "r"], "label": ["1", "2", "3"]},
            "answerKey": "3",
        },
    ]
    put(tmp_path, "allenai/ai2_arc", "ARC-Challenge", "test", rows, fmt="jsonl")
    task = ARC(tmp_path, "ARC-Challenge", "test")
    # Shuffled at load: default_rng(42).permutation(2) is [1, 0], so x2 comes first.
    assert task[1]["messages"][1]["content"] == "B" and task[0]["letters"] == ["1", "2", "3"]
    assert task.evaluate(task[0], "3")
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
    row = {
        "task_id": "HumanEval/0",
        "prompt": 'from typing import List\n\ndef total(xs: List[int]) -> int:\n    """Sum."""\n',
        "canonical_solution": "    return sum(xs)\n",
        "test": "def check(candidate):\n    assert candidate([1, 2]) == 3\n",
        "entry_point": "total",
    }
    put(tmp_path, "openai/openai_humaneval", "openai_humaneval", "test", [row])
    task = HumanEval(tmp_path, timeout=2)
    item = task[0]
    assert task.evaluate(item, item["messages"][1]["content"])
    assert task.evaluate(item, "Here:\n```python\ndef total(xs):\n    return sum(xs)\n```")
    assert not task.evaluate(item, "def total(xs):\n    return 0\n")
    assert not task.evaluate(item, "def total(xs):\n    while True: pass\n")


def test_custom_json_and_identity(tmp_path):
    path = tmp_path / "convs.jsonl"
    path.write_text(
        json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
        + "\n"
    )
    task = CustomJSON(path)
    assert len(task) == 2 and task[0]["messages"][1]["content"] == "yo"
    path.write_text('{"nope": 1}\n')
    with pytest.raises(ValueError, match="line 1"):
        CustomJSON(path)
    identity = tmp_path / "tasks" / "identity"
    identity.mkdir(parents=True)
    (identity / "test.jsonl").write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "who are you?"},
                    {"role": "assistant", "content": "I'm nanochat."},
                ],
                "expected": "nanochat",
            }
        )
        + "\n"
    )
    task = IdentityTask(tmp_path, "test")
    assert task.evaluate(task[0], "I am NanoChat!") and not task.evaluate(task[0], "I am a bot")


def test_slices_and_mixture_are_deterministic(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(10)]
    put(tmp_path, "openai/gsm8k", "main", "train", rows)
    sliced = GSM8K(tmp_path, "train", start=2, stop=9, step=3)
    # The slice is of the shuffled order, default_rng(42).permutation(10) = [5, 6, 0, 7, 3, 2, 4, 9, 1, 8]:
    # positions 2, 5, 8 hold rows 0, 2, 1.
    assert [sliced[i]["messages"][0]["content"] for i in range(len(sliced))] == ["q0", "q2", "q1"]
    with pytest.raises(IndexError):
        sliced[3]
    a, b = TaskMixture([GSM8K(tmp_path, "train"), sliced]), TaskMixture([GSM8K(tmp_path, "train"), sliced])
    assert len(a) == 13 and [a[i] for i in range(13)] == [b[i] for i in range(13)]


def test_download_paths_are_kept():
    assert (
        task_url("openai/gsm8k", "main", "test")
        == "https://huggingface.co/datasets/openai/gsm8k/resolve/main/main/test-00000-of-00001.parquet"
    )


def test_every_loader_shuffles_its_split_once_with_seed_42(tmp_path):
    # The original loads every split with datasets' `.shuffle(seed=42)`, which puts row
    # numpy.random.default_rng(42).permutation(n)[i] at position i. For 12 rows:
    order = [0, 7, 6, 9, 11, 3, 5, 2, 4, 10, 1, 8]
    assert np.random.default_rng(42).permutation(12).tolist() == order
    put(tmp_path, "HuggingFaceTB/smol-smoltalk", "data", "train", smoltalk_rows(12), files=2)  # two files, one split
    put(tmp_path, "cais/mmlu", "all", "test", mmlu_rows(12))
    put(tmp_path, "cais/mmlu", "auxiliary_train", "train", [{"train": row} for row in mmlu_rows(12)])
    put(tmp_path, "allenai/ai2_arc", "ARC-Easy", "train", arc_rows(12), fmt="jsonl")
    put(tmp_path, "openai/gsm8k", "main", "train", gsm8k_rows(12))
    humaneval = [
        {
            "task_id": f"HumanEval/{i}",
            "prompt": f"def h{i}():\n",
            "canonical_solution": "    return 1\n",
            "test": "def check(c):\n    assert c() == 1\n",
            "entry_point": f"h{i}",
        }
        for i in range(12)
    ]
    put(tmp_path, "openai/openai_humaneval", "openai_humaneval", "test", humaneval)
    loaders = [
        (SmolTalk(tmp_path, "train"), "s"),
        (MMLU(tmp_path, "all", "test"), "m"),
        (MMLU(tmp_path, "auxiliary_train", "train"), "m"),
        (ARC(tmp_path, "ARC-Easy", "train"), "a"),
        (GSM8K(tmp_path, "train"), "g"),
        (HumanEval(tmp_path), "h"),
    ]
    for task, tag in loaders:
        assert row_numbers(task, tag) == order, type(task).__name__
    # A capped view (an eval's max_problems, RL's eval_examples, SFT's SmolTalk 10K) is a prefix of that order.
    assert row_numbers(GSM8K(tmp_path, "train", stop=5), "g") == [0, 7, 6, 9, 11]
    # Conversation files keep their order, as the original's CustomJSON does.
    path = tmp_path / "convs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in smoltalk_rows(12, tag="c")))
    assert row_numbers(CustomJSON(path), "c") == list(range(12))


def test_mixture_caps_take_the_first_rows_of_the_shuffled_splits(tmp_path):
    put(tmp_path, "HuggingFaceTB/smol-smoltalk", "data", "test", smoltalk_rows(30))
    put(tmp_path, "cais/mmlu", "all", "test", mmlu_rows(5300))
    put(tmp_path, "openai/gsm8k", "main", "test", gsm8k_rows(500))
    val = mid_mixture(tmp_path, "test")
    # The original's midtraining validation: all of SmolTalk test, MMLU test capped at 5,200 rows and GSM8K
    # test at 420, each cap taken after the seed-42 shuffle.
    assert len(val) == 30 + 5200 + 420
    firsts = [val[i]["messages"][0]["content"] for i in range(len(val))]
    mmlu = {int(m.group(1)) for text in firsts if (m := re.search(r"question: m(\d+)\n", text))}
    gsm = {int(text[1:]) for text in firsts if re.fullmatch(r"g\d+", text)}
    assert mmlu == set(np.random.default_rng(42).permutation(5300)[:5200].tolist())
    assert gsm == set(np.random.default_rng(42).permutation(500)[:420].tolist())

    put(tmp_path, "HuggingFaceTB/smol-smoltalk", "data", "train", smoltalk_rows(12))
    put(tmp_path, "allenai/ai2_arc", "ARC-Easy", "train", arc_rows(3, tag="e"))
    put(tmp_path, "allenai/ai2_arc", "ARC-Challenge", "train", arc_rows(2, tag="c"))
    put(tmp_path, "openai/gsm8k", "main", "train", gsm8k_rows(4))
    sft = sft_mixture(tmp_path, "train", smoltalk_cap=5)
    # ARC-Easy 3 + ARC-Challenge 2 + GSM8K 4 + SmolTalk capped at 5; no identity conversations (none on disk).
    assert len(sft) == 3 + 2 + 4 + 5
    smol = {
        int(text[1:])
        for text in (sft[i]["messages"][0]["content"] for i in range(len(sft)))
        if re.fullmatch(r"s\d+", text)
    }
    assert smol == {0, 7, 6, 9, 11}  # the first 5 of default_rng(42).permutation(12)
