"""ARC (`allenai/ai2_arc`): rows `id`, `question`, `choices {text: [...], label: [...]}`, `answerKey`.

Configs `ARC-Easy` and `ARC-Challenge`, splits train, validation, test. The labels are the letters
the model answers with (a few rows use 1-4 instead of A-D; they are kept as published).
"""

from __future__ import annotations

from pathlib import Path

from nanochat.tasks.common import CategoricalTask, read_rows, render_mc

REPO = "allenai/ai2_arc"


class ARC(CategoricalTask):
    def __init__(self, data_dir: str | Path, subset: str = "ARC-Easy", split: str = "test", **kwargs):
        super().__init__(**kwargs)
        if subset not in ("ARC-Easy", "ARC-Challenge"):
            raise ValueError(f"ARC subset must be ARC-Easy or ARC-Challenge, got {subset!r}")
        self.rows = read_rows(data_dir, REPO, subset, split)

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        labels, texts = list(row["choices"]["label"]), list(row["choices"]["text"])
        if row["answerKey"] not in labels:
            raise ValueError(f"ARC row {index}: answerKey {row['answerKey']!r} not among labels {labels}")
        return {
            "messages": [
                {"role": "user", "content": render_mc(row["question"], labels, texts)},
                {"role": "assistant", "content": row["answerKey"]},
            ],
            "letters": labels,
        }
