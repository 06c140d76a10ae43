"""The registry stages: what kind of model a version holds, in the order the pipeline makes them.

A version's stage is the stage of training that produced it: the tokenizer, the pretrained base
model, the midtrained model, the supervised fine-tuned chat model and the RL-tuned one. The
registry stores it, the trainer registers each stage's outputs under one, stage runs name one in
their `finished` event, and the serving rule (`serving`) picks among two of them.
"""

from __future__ import annotations

from typing import Literal, get_args

Stage = Literal["tokenizer", "base", "mid", "sft", "rl"]
STAGES: tuple[Stage, ...] = get_args(Stage)
