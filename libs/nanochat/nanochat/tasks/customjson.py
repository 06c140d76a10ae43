"""Conversations from a JSONL file, and the identity set made by `make_data`.

Each line is a conversation: a list of `{role, content}` messages, or an object with a `messages`
list (extra keys kept). `IdentityTask` reads `DATA_DIR/tasks/identity/{split}.jsonl`, whose test
rows carry `expected` (the model's name); an answer is right when it contains that name.
"""

from __future__ import annotations

from pathlib import Path

from nanochat.tasks.common import Task, read_jsonl


class CustomJSON(Task):
    def __init__(self, path: str | Path, **kwargs):
        super().__init__(**kwargs)
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"conversation file {self.path} does not exist")
        self.rows = []
        for i, row in enumerate(read_jsonl(self.path)):
            conversation = {"messages": row} if isinstance(row, list) else row
            if not isinstance(conversation, dict) or not isinstance(conversation.get("messages"), list):
                raise ValueError(f"{self.path} line {i + 1}: expected a list of messages or {{'messages': [...]}}")
            self.rows.append(conversation)

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        return self.rows[index]


class IdentityTask(CustomJSON):
    def __init__(self, data_dir: str | Path, split: str = "train", **kwargs):
        super().__init__(Path(data_dir) / "tasks" / "identity" / f"{split}.jsonl", **kwargs)

    def evaluate(self, conversation: dict, response: str) -> bool:
        expected = conversation.get("expected")
        if not expected:
            raise ValueError("identity rows need an 'expected' name to be graded")
        return expected.lower() in response.lower()
