"""The training mixtures of the spec, built from the local task sets (each already in the
original's seed-42 order, see `common.read_rows`, so every cap below takes the original's rows).

- mid: SmolTalk train + MMLU auxiliary_train + GSM8K train (no identity: SFT only); validation on
  SmolTalk test + the first 5,200 rows of MMLU all/test + the first 420 of GSM8K test (the
  original's caps, which keep the validation mix in the training mix's proportions).
- SFT: ARC-Easy train + ARC-Challenge train + GSM8K train + the first 10K of SmolTalk train (the
  original's mixture); `identity=True` adds the identity conversations, a deviation from the
  original that the report card names; `tool_use=N` adds N synthetic tool-use conversations
  (`tasks.tooluse`, docs/tools.md), another; validation on SmolTalk test.
"""

from __future__ import annotations

from pathlib import Path

from nanochat.tasks.arc import ARC
from nanochat.tasks.common import TaskMixture
from nanochat.tasks.customjson import IdentityTask
from nanochat.tasks.gsm8k import GSM8K
from nanochat.tasks.mmlu import MMLU
from nanochat.tasks.smoltalk import SmolTalk
from nanochat.tasks.tooluse import ToolUse

MID_VAL_MMLU_CAP = 5_200
MID_VAL_GSM8K_CAP = 420


def mid_mixture(data_dir: str | Path, split: str = "train") -> TaskMixture:
    if split == "train":
        return TaskMixture(
            [SmolTalk(data_dir, "train"), MMLU(data_dir, "auxiliary_train", "train"), GSM8K(data_dir, "train")]
        )
    return TaskMixture(
        [
            SmolTalk(data_dir, "test"),
            MMLU(data_dir, "all", "test", stop=MID_VAL_MMLU_CAP),
            GSM8K(data_dir, "test", stop=MID_VAL_GSM8K_CAP),
        ]
    )


def sft_mixture(
    data_dir: str | Path, split: str = "train", identity: bool = False, smoltalk_cap: int = 10_000, tool_use: int = 0
) -> TaskMixture:
    if split != "train":
        return TaskMixture([SmolTalk(data_dir, "test")])
    tasks = [
        ARC(data_dir, "ARC-Easy", "train"),
        ARC(data_dir, "ARC-Challenge", "train"),
        GSM8K(data_dir, "train"),
        SmolTalk(data_dir, "train", stop=smoltalk_cap),
    ]
    if identity:
        tasks.append(IdentityTask(data_dir, "train"))
    if tool_use:
        tasks.append(ToolUse(tool_use))
    return TaskMixture(tasks)
