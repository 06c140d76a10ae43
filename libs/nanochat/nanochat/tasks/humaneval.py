"""HumanEval (`openai/openai_humaneval`): rows `task_id`, `prompt`, `canonical_solution`, `test`,
`entry_point`; one split, `test` (164 problems).

The user asks with the prompt; the reference answer is prompt + solution. A response is graded by
running its code (the last fenced block if any, else the text) with the problem's imports, its
`check(candidate)` test and `check(entry_point)` in the sandbox of `nanochat.sandbox`.
"""

from __future__ import annotations

import re
from pathlib import Path

from nanochat.sandbox import run_python
from nanochat.tasks.common import Task, read_rows

REPO, CONFIG = "openai/openai_humaneval", "openai_humaneval"
FENCE_RE = re.compile(r"```(?:python|py)?\n(.*?)```", re.DOTALL)


def extract_code(response: str) -> str:
    blocks = FENCE_RE.findall(response)
    return blocks[-1] if blocks else response


def imports_of(prompt: str) -> str:
    return "\n".join(line for line in prompt.splitlines() if line.startswith(("import ", "from ")))


class HumanEval(Task):
    def __init__(self, data_dir: str | Path, split: str = "test", timeout: float = 5.0, **kwargs):
        super().__init__(**kwargs)
        self.rows = read_rows(data_dir, REPO, CONFIG, split)
        self.timeout = timeout

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        return {
            "messages": [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": row["prompt"] + row["canonical_solution"]},
            ],
            "entry_point": row["entry_point"],
            "test": row["test"],
            "prompt": row["prompt"],
        }

    def evaluate(self, conversation: dict, response: str) -> bool:
        program = "\n\n".join([
            imports_of(conversation["prompt"]),
            extract_code(response),
            conversation["test"],
            f"check({conversation['entry_point']})",
        ])
        return run_python(program, timeout=self.timeout).success
