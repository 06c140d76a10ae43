"""nanochat.core_eval: bundle parsing, the three task types, few-shot sampling, capping, centring;
base_eval.core_metric's cropping."""

import contextlib
import json
import random

import pytest
import torch
from nanochat.common import Compute
from nanochat.core_eval import build_prompts, centered, evaluate_core, evaluate_task, load_bundle
from nanochat.gpt import GPT, GPTConfig
from nanochat.stages.base_eval import core_metric
from nanochat.tokenizer import Tokenizer

TOK = Tokenizer({bytes([i]): i for i in range(256)})


def make_bundle(root, tasks):
    (root / "eval_data").mkdir(parents=True)
    lines = ["icl_tasks:"]
    meta = ["Eval Task,Random baseline"]
    for label, kind, shots, items, rb in tasks:
        (root / "eval_data" / f"{label}.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
        lines += [
            f"- label: {label}",
            f"  dataset_uri: {label}.jsonl",
            f"  num_fewshot: [{shots}, 5]",
            f"  icl_task_type: {kind}",
        ]
        meta.append(f"{label},{rb}")
    (root / "core.yaml").write_text("\n".join(lines) + "\n")
    (root / "eval_meta_data.csv").write_text("\n".join(meta) + "\n")


def rule_scorer(bad: bytes = b"", calls=None):
    """Loss 5 on target bytes in `bad`, else 0; greedy predictions are right except on `bad` bytes."""

    def score(seqs):
        if calls is not None:
            calls.extend(seqs)
        out = []
        for s in seqs:
            losses = [5.0 if t in bad else 0.0 for t in s[1:]]
            preds = [(t + 1) % 256 if t in bad else t for t in s[1:]]
            out.append((losses, preds))
        return out

    return score


MC = [{"query": f"Q{i}:", "choices": ["right", "wrong"], "gold": i % 2} for i in range(8)]
SCHEMA = [{"context_options": ["calm sea", "wild sea"], "continuation": "then", "gold": i % 2} for i in range(6)]
LM = [{"context": f"Say {i}", "continuation": "ok" if i < 3 else "zz"} for i in range(5)]


def test_bundle_format_and_scores(tmp_path):
    make_bundle(
        tmp_path,
        [
            ("mc", "multiple_choice", 2, MC, 50.0),
            ("schema", "schema", 1, SCHEMA, 50),
            ("lm", "language_modeling", 0, LM, 0),
        ],
    )
    tasks = load_bundle(tmp_path)
    assert [(t.label, t.num_fewshot, t.delimiter, t.random_baseline) for t in tasks] == [
        ("mc", 2, " ", 50.0),
        ("schema", 1, " ", 50.0),
        ("lm", 0, " ", 0.0),
    ]
    # 'w' costs: "right" wins, so gold 0 items are right; 'w' in "wild" costs: "calm sea then" wins.
    results = evaluate_core(tmp_path, TOK, rule_scorer(bad=b"wz"))
    assert results["tasks"]["mc"]["accuracy"] == 0.5 and results["tasks"]["schema"]["accuracy"] == 0.5
    assert results["tasks"]["lm"]["accuracy"] == 3 / 5
    assert results["tasks"]["lm"]["centered"] == 3 / 5
    assert results["core"] == pytest.approx((0 + 0 + 0.6) / 3)
    assert centered(0.625, 25.0) == 0.5


def test_scored_span_is_only_the_continuation(tmp_path):
    make_bundle(tmp_path, [("mc", "multiple_choice", 0, [{"query": "Pick:", "choices": ["aXa", "bb"], "gold": 1}], 50)])
    # Only the choice's tokens are scored: the query's 'X'-free text never matters, the choice's 'X' does.
    assert evaluate_core(tmp_path, TOK, rule_scorer(bad=b"X"))["tasks"]["mc"]["accuracy"] == 1.0
    assert evaluate_core(tmp_path, TOK, rule_scorer(bad=b"P"))["tasks"]["mc"]["accuracy"] == 0.0  # tie -> first


def test_fewshot_is_drawn_from_the_capped_shuffled_items(tmp_path):
    items = [{"query": f"q{i}", "choices": ["a", "b"], "gold": 0} for i in range(10)]
    make_bundle(tmp_path, [("mc", "multiple_choice", 3, items, 50)])
    task = load_bundle(tmp_path)[0]
    calls = []
    correct, total = evaluate_task(task, TOK, rule_scorer(calls=calls), max_items=4)
    assert total == 4
    shuffled = list(items)
    random.Random(1337).shuffle(shuffled)
    capped = [item["query"] for item in shuffled[:4]]
    for idx in range(4):
        blocks = TOK.decode(calls[2 * idx][1:]).split("\n\n")  # two choices per item: [2 idx] is "a"
        assert blocks[-1] == f"{capped[idx]} a"
        # Three shots out of the three other capped items: exactly those, none of the six cut off.
        others = [i for i in range(4) if i != idx]
        assert sorted(blocks[:-1]) == sorted(f"{capped[i]} a" for i in others)
        assert blocks[:-1] == [f"{capped[i]} a" for i in random.Random(1234 + idx).sample(others, 3)]
    split = [evaluate_task(task, TOK, rule_scorer(), max_items=4, rank=r, world_size=3)[1] for r in range(3)]
    assert split == [2, 1, 1]


def test_language_modeling_prompts_strip_contexts_and_the_prompt_without_continuation():
    assert build_prompts({"context": "The sky is", "continuation": "blue"}, "language_modeling", " ", []) == [
        "The sky is",
        "The sky is blue",
    ]
    shot = {"context": "\n Grass is \t", "continuation": "green"}
    item = {"context": "  The sky is \n", "continuation": "blue"}
    assert build_prompts(item, "language_modeling", " ", [shot]) == [
        "Grass is green\n\nThe sky is",
        "Grass is green\n\nThe sky is blue",
    ]
    # A newline delimiter goes too from the prompt without continuation, but stays before it.
    assert build_prompts(item, "language_modeling", "\n", []) == ["The sky is", "The sky is\nblue"]


def test_core_metric_crops_only_past_the_rotary_table(tmp_path):
    config = GPTConfig.from_depth(1, TOK.vocab_size, sequence_len=8)
    model = GPT(config)
    model.init_weights()
    assert model.rotary_len == 80
    # With BOS, "<30 x a> b" is 33 tokens (past sequence_len 8, scored whole) and "<100 x a> b"
    # 103 (past the table: its last 80 tokens).
    items = [{"context": "a" * 30, "continuation": "b"}, {"context": "a" * 100, "continuation": "b"}]
    make_bundle(tmp_path, [("lm", "language_modeling", 0, items, 0)])
    lengths = []
    model.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    compute = Compute(device=torch.device("cpu"), dtype=torch.float32, rank=0, local_rank=0, world_size=1)
    results = core_metric(model, TOK, compute, contextlib.nullcontext(), str(tmp_path), str(tmp_path), -1)
    assert results["tasks"]["lm"]["items"] == 2
    assert sorted(lengths) == [33, 80]


def test_broken_bundles_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="core.yaml"):
        load_bundle(tmp_path)
    make_bundle(tmp_path, [("mc", "essay", 0, MC, 50)])
    with pytest.raises(ValueError, match="icl_task_type"):
        load_bundle(tmp_path)
