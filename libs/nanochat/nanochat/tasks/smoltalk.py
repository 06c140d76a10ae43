"""SmolTalk (`HuggingFaceTB/smol-smoltalk`): general conversations, rows `{"messages": [{role, content}]}`.

Splits `train` (~460K) and `test`; files `data/{split}-*.parquet`. Used by mid and SFT mixtures.
"""

from __future__ import annotations

from pathlib import Path

from nanochat.tasks.common import Task, read_rows

REPO, CONFIG = "HuggingFaceTB/smol-smoltalk", "data"


class SmolTalk(Task):
    def __init__(self, data_dir: str | Path, split: str = "train", **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"SmolTalk split must be train or test, got {split!r}")
        self.rows = read_rows(data_dir, REPO, CONFIG, split)

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        messages = self.rows[index]["messages"]
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
