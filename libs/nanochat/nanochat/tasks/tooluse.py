"""Synthetic tool-use conversations for the SFT mixture (`--tool-use-in-mixture N`).

Made in memory from a seed (`synthetic_tasks.tool_use_conversation`), not read from the data
folder: a few hundred of them are enough to teach the call format of docs/tools.md, and a run
that asks for none reads the same mixture as before.
"""

from __future__ import annotations

import random

from nanochat.synthetic_tasks import tool_use_conversation
from nanochat.tasks.common import Task

TOOL_USE_SEED = 28


class ToolUse(Task):
    def __init__(self, n: int, seed: int = TOOL_USE_SEED, **kwargs):
        super().__init__(**kwargs)
        rng = random.Random(seed)
        self.rows = [tool_use_conversation(rng) for _ in range(n)]

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        return self.rows[index]
