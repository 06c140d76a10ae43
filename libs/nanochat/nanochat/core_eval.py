"""The CORE metric (DCLM): in-context tasks of an `eval_bundle`, scored against a model callable.

Bundle layout:
- `core.yaml`: `icl_tasks`, each with `label`, `dataset_uri` (a path under `eval_data/`),
  `num_fewshot` (a list; its first value is used), `icl_task_type` (`multiple_choice`, `schema`
  or `language_modeling`) and `continuation_delimiter` (default `' '`);
- `eval_data/*.jsonl`: the items. multiple_choice: `query`, `choices`, `gold`; schema:
  `context_options`, `continuation`, `gold`; language_modeling: `context`, `continuation`;
- `eval_meta_data.csv`: keyed by its `Eval Task` column, with `Random baseline` in percent.

Scoring: each task's items are shuffled with `random.Random(1337)`, then capped when a cap is set;
item idx gets `num_fewshot` examples drawn by `random.Random(1234 + idx)` from the other items of
that capped list, joined with blank lines before it. multiple_choice scores each choice by the mean
loss of its tokens after the prompts' common prefix; schema scores each context option by the mean
loss of the common continuation (the prompts' common suffix); the lowest loss must be `gold`.
language_modeling is right when greedy decoding reproduces every continuation token; its contexts
(few-shot and the item's) are stripped of surrounding whitespace, and the prompt without the
continuation is stripped as a whole. A task's centred score is (acc - rb/100) / (1 - rb/100); CORE
is their mean.

Sequences longer than `max_seq_len` keep their last `max_seq_len` tokens. For a nanochat model
that is its rotary table, not its training length: the original never crops for its own models.

The model enters as a `Scorer`: a callable taking a list of token-id sequences and returning, per
sequence of length n, `(losses, predictions)`, both of length n-1: the cross-entropy (nats) of
token i+1 given tokens 0..i, and the argmax id at position i. No torch is needed here.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanochat.tokenizer import Tokenizer

Scorer = Callable[[list[list[int]]], list[tuple[Sequence[float], Sequence[int]]]]
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
OFFLINE_MARKER = "offline.json"  # in a bundle make_data generated: its CORE is not the real CORE


@dataclass
class CoreTask:
    label: str
    path: Path
    task_type: str
    num_fewshot: int
    delimiter: str
    random_baseline: float

    def items(self) -> list[dict[str, Any]]:
        rows = []
        with open(self.path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{self.path}:{lineno}: not valid JSON ({e})") from e
        return rows


def load_bundle(bundle_dir: str | Path) -> list[CoreTask]:
    """The tasks of a CORE bundle with their random baselines; clear errors for a broken bundle."""
    import yaml

    bundle = Path(bundle_dir)
    config_path, meta_path = bundle / "core.yaml", bundle / "eval_meta_data.csv"
    for path in (config_path, meta_path):
        if not path.is_file():
            raise FileNotFoundError(f"CORE bundle {bundle} has no {path.name}")
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    if not isinstance(config, dict) or not isinstance(config.get("icl_tasks"), list):
        raise ValueError(f"{config_path}: expected a mapping with an 'icl_tasks' list")
    with open(meta_path, newline="", encoding="utf-8") as f:
        baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
    tasks = []
    for entry in config["icl_tasks"]:
        label = entry["label"]
        if entry["icl_task_type"] not in TASK_TYPES:
            raise ValueError(f"{config_path}: task {label} has unknown icl_task_type {entry['icl_task_type']!r}")
        if label not in baselines:
            raise ValueError(f"{meta_path}: no 'Random baseline' for task {label}")
        fewshot = entry.get("num_fewshot", [0])
        tasks.append(
            CoreTask(
                label=label,
                path=bundle / "eval_data" / entry["dataset_uri"],
                task_type=entry["icl_task_type"],
                num_fewshot=int(fewshot[0] if isinstance(fewshot, list) else fewshot),
                delimiter=entry.get("continuation_delimiter", " "),
                random_baseline=baselines[label],
            )
        )
    return tasks


def _example_text(item: dict[str, Any], task_type: str, delim: str) -> str:
    if task_type == "multiple_choice":
        return f"{item['query']}{delim}{item['choices'][item['gold']]}"
    if task_type == "schema":
        return f"{item['context_options'][item['gold']]}{delim}{item['continuation']}"
    return f"{item['context'].strip()}{delim}{item['continuation']}"


def build_prompts(item: dict[str, Any], task_type: str, delim: str, fewshot: Sequence[dict[str, Any]]) -> list[str]:
    """The texts scored for one item (one per choice/option; LM: without and with continuation)."""
    context = "".join(_example_text(ex, task_type, delim) + "\n\n" for ex in fewshot)
    if task_type == "multiple_choice":
        return [f"{context}{item['query']}{delim}{choice}" for choice in item["choices"]]
    if task_type == "schema":
        return [f"{context}{option}{delim}{item['continuation']}" for option in item["context_options"]]
    without = f"{context}{item['context'].strip()}{delim}"
    # The delimiter's trailing space belongs to the continuation's first token once tokenized, so
    # the prompt without it ends before that space and is a clean token prefix of the full one.
    return [without.strip(), without + item["continuation"]]


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n


def _common_suffix(seqs: Sequence[Sequence[int]]) -> int:
    return _common_prefix([list(reversed(s)) for s in seqs])


def _crop(ids: list[int], start: int, max_len: int | None) -> tuple[list[int], int]:
    if max_len is None or len(ids) <= max_len:
        return ids, start
    cut = len(ids) - max_len
    return ids[cut:], max(1, start - cut)


def score_item(
    item: dict[str, Any],
    task_type: str,
    delim: str,
    fewshot: Sequence[dict[str, Any]],
    tokenizer: Tokenizer,
    scorer: Scorer,
    max_seq_len: int | None = None,
) -> bool:
    """Whether the model gets one item right."""
    prompts = build_prompts(item, task_type, delim, fewshot)
    ids = tokenizer.encode(prompts, prepend=tokenizer.bos_token_id)
    if task_type == "language_modeling":
        start = _common_prefix(ids)
        seq, start = _crop(ids[1], start, max_seq_len)
        if start >= len(seq):
            raise ValueError("language_modeling item with an empty continuation")
        _, predictions = scorer([seq])[0]
        return list(predictions[start - 1 : len(seq) - 1]) == seq[start:]
    if task_type == "multiple_choice":
        starts = [_common_prefix(ids)] * len(ids)
    else:
        suffix = _common_suffix(ids)
        starts = [len(s) - suffix for s in ids]
    cropped = [_crop(s, st, max_seq_len) for s, st in zip(ids, starts)]
    results = scorer([s for s, _ in cropped])
    mean_losses = []
    for (seq, start), (losses, _) in zip(cropped, results):
        span = losses[start - 1 : len(seq) - 1]
        mean_losses.append(sum(span) / len(span) if len(span) else float("inf"))
    return min(range(len(mean_losses)), key=mean_losses.__getitem__) == item["gold"]


def evaluate_task(
    task: CoreTask,
    tokenizer: Tokenizer,
    scorer: Scorer,
    max_items: int = -1,
    rank: int = 0,
    world_size: int = 1,
    max_seq_len: int | None = None,
) -> tuple[int, int]:
    """(correct, scored) over this rank's share (items rank, rank+W, ...) of the capped task."""
    items = task.items()
    random.Random(1337).shuffle(items)
    capped = items if max_items < 0 else items[:max_items]
    correct = total = 0
    for idx in range(rank, len(capped), world_size):
        fewshot = []
        if task.num_fewshot:
            # As the original: a capped run draws its examples from the capped items only.
            others = [i for i in range(len(capped)) if i != idx]
            fewshot = [capped[i] for i in random.Random(1234 + idx).sample(others, min(task.num_fewshot, len(others)))]
        correct += score_item(capped[idx], task.task_type, task.delimiter, fewshot, tokenizer, scorer, max_seq_len)
        total += 1
    return correct, total


def centered(accuracy: float, random_baseline_percent: float) -> float:
    rb = random_baseline_percent / 100.0
    return (accuracy - rb) / (1.0 - rb)


def evaluate_core(
    bundle_dir: str | Path,
    tokenizer: Tokenizer,
    scorer: Scorer,
    max_per_task: int = -1,
    rank: int = 0,
    world_size: int = 1,
    max_seq_len: int | None = None,
    reduce: Callable[[tuple[int, int]], tuple[int, int]] | None = None,
) -> dict[str, Any]:
    """Every task's accuracy and centred score, and CORE (their mean). `reduce` sums a task's
    (correct, scored) over ranks when distributed."""
    results: dict[str, Any] = {"tasks": {}}
    for task in load_bundle(bundle_dir):
        counts = evaluate_task(task, tokenizer, scorer, max_per_task, rank, world_size, max_seq_len)
        correct, total = reduce(counts) if reduce else counts
        accuracy = correct / total if total else 0.0
        results["tasks"][task.label] = {
            "accuracy": accuracy,
            "centered": centered(accuracy, task.random_baseline),
            "items": total,
            "random_baseline": task.random_baseline,
        }
    scores = [t["centered"] for t in results["tasks"].values()]
    results["core"] = sum(scores) / len(scores) if scores else 0.0
    results["offline"] = (Path(bundle_dir) / OFFLINE_MARKER).is_file()
    return results
