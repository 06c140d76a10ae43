"""The training mixtures of the spec, built from the local task sets.

- mid: SmolTalk train + MMLU auxiliary_train + GSM8K train (no identity: SFT only); validation on
  SmolTalk test + MMLU all/test + GSM8K test.
- SFT: ARC-Easy train + ARC-Challenge train + GSM8K train + SmolTalk train (the original caps it
  at 10K) + the identity conversations; validation on SmolTalk test.
"""

from __future__ import annotations

from pathlib import Path

from nanochat.tasks.arc import ARC
from nanochat.tasks.common import TaskMixture
from nanochat.tasks.customjson import IdentityTask
from nanochat.tasks.gsm8k import GSM8K
from nanochat.tasks.mmlu import MMLU
from nanochat.tasks.smoltalk import SmolTalk


def mid_mixture(data_dir: str | Path, split: str = "train") -> TaskMixture:
    if split == "train":
        return TaskMixture([SmolTalk(data_dir, "train"), MMLU(data_dir, "auxiliary_train", "train"), GSM8K(data_dir, "train")])
    return TaskMixture([SmolTalk(data_dir, "test"), MMLU(data_dir, "all", "test"), GSM8K(data_dir, "test")])


def sft_mixture(data_dir: str | Path, split: str = "train", identity: bool = True, smoltalk_cap: int = 10_000) -> TaskMixture:
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
    return TaskMixture(tasks)
