"""The `Task` base class, where task files live, multiple-choice rendering and task mixtures.

Layout: a dataset published on Hugging Face as `REPO` with files `CONFIG/SPLIT-*.parquet` lives
locally at `DATA_DIR/tasks/REPO/CONFIG/` with the same file names (`SPLIT.jsonl` is accepted too),
so a download and `make_data` produce the same tree. `task_url` is the original download path
and `fetch_split` fetches a single-file split there when the network allows it.

`read_rows` hands every loader its split already shuffled with seed 42, the order of the
original's `load_dataset(...).shuffle(seed=42)`; a `stop=` cap, an eval's first `max_problems`
items and the mixtures are all taken from that order, so they are the original's rows too.
(Conversation files read by `customjson` keep their order, as the original's CustomJSON does.)

A task item is a conversation dict `{"messages": [...]}`; categorical tasks add `"letters"` (the
answer choices the model picks from by logits). `Task.evaluate(conversation, response)` grades a
model's answer text.
"""

from __future__ import annotations

import json
import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nanochat.dataset import download_file
from nanochat.sources import HF_DATASETS_URL


def task_dir(data_dir: str | Path, repo: str, config: str) -> Path:
    return Path(data_dir) / "tasks" / repo / config


def task_url(repo: str, config: str, split: str, base_url: str = HF_DATASETS_URL) -> str:
    """The Hugging Face path of a split stored as one parquet file."""
    return f"{base_url}/{repo}/resolve/main/{config}/{split}-00000-of-00001.parquet"


def fetch_split(
    data_dir: str | Path, repo: str, config: str, split: str, base_url: str = HF_DATASETS_URL, backoff: float = 1.0
) -> Path:
    """Download a single-file split into the local layout (skipped when present)."""
    dest = task_dir(data_dir, repo, config) / f"{split}-00000-of-00001.parquet"
    return download_file(task_url(repo, config, split, base_url), dest, backoff=backoff)


def read_jsonl(path: str | Path) -> list[Any]:
    """Rows of a JSONL file; a bad line raises ValueError with its line number."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from e
    return rows


SHUFFLE_SEED = 42  # the seed of the original's every `.shuffle(seed=42)`


def shuffle_rows(rows: Sequence[Any]) -> list[Any]:
    """`rows` in the order `datasets.Dataset.shuffle(seed=42)` gives them: row i of the result is
    `rows[numpy.random.default_rng(42).permutation(len(rows))[i]]`."""
    return [rows[i] for i in np.random.default_rng(SHUFFLE_SEED).permutation(len(rows))]


def read_rows(data_dir: str | Path, repo: str, config: str, split: str) -> list[dict]:
    """Every row of a split, shuffled once with seed 42 (`shuffle_rows`): its parquet files
    (`SPLIT-*.parquet`, `SPLIT.parquet`, concatenated in name order as `load_dataset` does) or
    `SPLIT.jsonl`."""
    folder = task_dir(data_dir, repo, config)
    parquet = sorted(folder.glob(f"{split}-*.parquet")) + sorted(folder.glob(f"{split}.parquet"))
    if parquet:
        import pyarrow.parquet as pq

        return shuffle_rows([row for path in parquet for row in pq.read_table(path).to_pylist()])
    jsonl = folder / f"{split}.jsonl"
    if jsonl.is_file():
        return shuffle_rows(read_jsonl(jsonl))
    raise FileNotFoundError(
        f"no {split} split of {repo}/{config} in {folder} (expected {split}-*.parquet or {split}.jsonl); "
        f"make it with `python -m nanochat.stages.make_data` or fetch {task_url(repo, config, split)}"
    )


def render_mc(question: str, letters: Sequence[str], choices: Sequence[str]) -> str:
    """The spec's multiple-choice prompt."""
    lines = [f"Multiple Choice question: {question}\n"]
    lines += [f"- {choice}={letter}\n" for letter, choice in zip(letters, choices)]
    lines.append("\nRespond only with the letter of the correct answer.")
    return "".join(lines)


class Task(ABC):
    """A list of conversations with an optional start:stop:step view and a grader."""

    eval_type = "generative"

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        if start < 0 or step < 1 or (stop is not None and stop < start):
            raise ValueError(f"bad task slice start={start} stop={stop} step={step}")
        self.start, self.stop, self.step = start, stop, step

    @abstractmethod
    def num_examples(self) -> int:
        """Implemented by each dataset."""

    @abstractmethod
    def get_example(self, index: int) -> dict:
        """Implemented by each dataset."""

    def evaluate(self, conversation: dict, response: str) -> bool:
        """Grade a response; training-only sets have no grader."""
        raise TypeError(f"{type(self).__name__} is a training set; it has no grader")

    def __len__(self) -> int:
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return max(0, -(-(stop - self.start) // self.step))

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"{type(self).__name__} index {index} out of range 0..{len(self) - 1}")
        return self.get_example(self.start + index * self.step)


class CategoricalTask(Task):
    """Answer = one of the conversation's `letters`, picked by the model's letter logits."""

    eval_type = "categorical"

    def evaluate(self, conversation: dict, response: str) -> bool:
        return response.strip() == conversation["messages"][-1]["content"]


class TaskMixture:
    """Several tasks' items in one deterministic shuffled order (seed 42 as in the original)."""

    def __init__(self, tasks: Sequence[Task], seed: int = 42):
        self.tasks = list(tasks)
        self.index = [(t, i) for t, task in enumerate(self.tasks) for i in range(len(task))]
        random.Random(seed).shuffle(self.index)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int) -> dict:
        t, i = self.index[index]
        return self.tasks[t][i]
