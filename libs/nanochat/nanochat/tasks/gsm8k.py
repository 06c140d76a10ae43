"""GSM8K (`openai/gsm8k`, config `main`): rows `question`, `answer`; the answer's last line is `#### N`.

The reference solutions mark calculator calls as `<<expr=result>>`; they become a `python` part
(expr) and a `python_output` part (result), so the model learns to call the tool and is never
trained on the tool's output. Graded by exact match of the final number (commas removed).
"""

from __future__ import annotations

import re
from pathlib import Path

from nanochat.tasks.common import Task, read_rows

REPO, CONFIG = "openai/gsm8k", "main"
CALL_RE = re.compile(r"<<([^<>=]*)=([^<>]*)>>")
ANSWER_RE = re.compile(r"#### (\-?[0-9\.\,]+)")


def extract_answer(text: str) -> str | None:
    """The number after `#### `, commas removed; None when there is none."""
    match = ANSWER_RE.search(text)
    return match.group(1).strip().replace(",", "") if match else None


def answer_parts(answer: str) -> list[dict[str, str]]:
    """Split a reference solution into text / python / python_output parts."""
    parts: list[dict[str, str]] = []
    pos = 0
    for match in CALL_RE.finditer(answer):
        if match.start() > pos:
            parts.append({"type": "text", "text": answer[pos : match.start()]})
        parts.append({"type": "python", "text": match.group(1)})
        parts.append({"type": "python_output", "text": match.group(2)})
        pos = match.end()
    if pos < len(answer):
        parts.append({"type": "text", "text": answer[pos:]})
    return parts


class GSM8K(Task):
    def __init__(self, data_dir: str | Path, split: str = "test", **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"GSM8K split must be train or test, got {split!r}")
        self.rows = read_rows(data_dir, REPO, CONFIG, split)

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        return {
            "messages": [
                {"role": "user", "content": row["question"]},
                {"role": "assistant", "content": answer_parts(row["answer"])},
            ]
        }

    def evaluate(self, conversation: dict, response: str) -> bool:
        reference = "".join(p["text"] for p in conversation["messages"][-1]["content"])
        expected, got = extract_answer(reference), extract_answer(response)
        return expected is not None and got == expected

    def reward(self, conversation: dict, response: str) -> float:
        """RL reward: 1.0 for the exact final answer, else 0.0."""
        return float(self.evaluate(conversation, response))
