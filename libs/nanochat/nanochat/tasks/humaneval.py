"""HumanEval (`openai/openai_humaneval`): rows `task_id`, `prompt`, `canonical_solution`, `test`,
`entry_point`; one split, `test` (164 problems).

The user asks with the prompt; the reference answer is prompt + solution. A response is graded by
running its code with the problem's imports, its `check(candidate)` test and `check(entry_point)`
in the sandbox of `nanochat.sandbox` (bubblewrap, 5 s, 256 MB), graded as the original grades it:
- the code is the first fenced block (opened by three backticks, `python` optional) if any, else
  the whole response, stripped;
- the imports are the prompt's leading `import`/`from` lines (blank and comment lines among them
  skipped), up to its first other line.
Loading the task checks the sandbox first: without one it refuses (`SandboxUnavailable`) unless
`allow_unsandboxed` is set.
"""

from __future__ import annotations

import re
from pathlib import Path

from nanochat.sandbox import require_isolation, run_python
from nanochat.tasks.common import Task, read_rows

REPO, CONFIG = "openai/openai_humaneval", "openai_humaneval"
FENCE_RE = re.compile(r"```(?:python)?\s*\n(.*?)\n```", re.DOTALL)


def extract_code(response: str) -> str:
    """The code of a response: its first fenced block, else all of it; stripped."""
    match = FENCE_RE.search(response)
    return (match.group(1) if match else response).strip()


def imports_of(prompt: str) -> str:
    """The prompt's leading imports, stripped; an import after the signature is the body's own."""
    imports = []
    for line in prompt.splitlines():
        stripped = line.strip()
        if stripped.startswith(("import ", "from ")):
            imports.append(stripped)
        elif stripped and not stripped.startswith("#"):
            break
    return "\n".join(imports)


class HumanEval(Task):
    def __init__(
        self,
        data_dir: str | Path,
        split: str = "test",
        timeout: float = 5.0,
        allow_unsandboxed: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        require_isolation(allow_unsandboxed)
        self.rows = read_rows(data_dir, REPO, CONFIG, split)
        self.timeout = timeout
        self.allow_unsandboxed = allow_unsandboxed

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
        program = "\n\n".join(
            [
                imports_of(conversation["prompt"]),
                extract_code(response),
                conversation["test"],
                f"check({conversation['entry_point']})",
            ]
        )
        return run_python(program, timeout=self.timeout, allow_unsandboxed=self.allow_unsandboxed).success
