"""MMLU (`cais/mmlu`): rows `question`, `subject`, `choices` (4 strings), `answer` (index 0-3).

Configs: `all` (splits test, validation, dev) and `auxiliary_train` (split train, ~100K rows, each
row's fields wrapped under a `train` key). Rendered as the spec's multiple choice with letters A-D.
"""

from __future__ import annotations

from pathlib import Path

from nanochat.tasks.common import CategoricalTask, read_rows, render_mc

REPO = "cais/mmlu"
LETTERS = ("A", "B", "C", "D")


class MMLU(CategoricalTask):
    def __init__(self, data_dir: str | Path, subset: str = "all", split: str = "test", **kwargs):
        super().__init__(**kwargs)
        if subset not in ("all", "auxiliary_train"):
            raise ValueError(f"MMLU subset must be all or auxiliary_train, got {subset!r}")
        if subset == "auxiliary_train" and split != "train":
            raise ValueError("MMLU auxiliary_train has only the train split")
        rows = read_rows(data_dir, REPO, subset, split)
        self.rows = [row["train"] for row in rows] if subset == "auxiliary_train" else rows

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        choices, answer = row["choices"], row["answer"]
        if len(choices) != 4 or not 0 <= answer < 4:
            raise ValueError(f"MMLU row {index}: expected 4 choices and an answer index 0-3")
        return {
            "messages": [
                {"role": "user", "content": render_mc(row["question"], LETTERS, choices)},
                {"role": "assistant", "content": LETTERS[answer]},
            ],
            "letters": list(LETTERS),
            "subject": row.get("subject", ""),
        }
