"""chat_eval: ChatCORE tasks and identity accuracy of a chat checkpoint (mid, sft or rl).

    torchrun --nproc_per_node 2 -m nanochat.stages.chat_eval --init-from runs/sft --data-dir data
    python -m nanochat.stages.chat_eval --init-from runs/sft --tasks GSM8K identity --max-problems 100

Tasks (NANOCHAT_SPEC "Evaluation"): ARC-Easy, ARC-Challenge (test) and MMLU (all/test) are
categorical: the answer is the argmax of the model's logits over the choice letters right after
`<|assistant_start|>`. GSM8K (test), HumanEval and identity (held-out questions; right when the
answer contains the model's name) are generative, through the engine (KV cache, calculator
tool): `--temperature 0` is greedy; with `--num-samples k` a question counts when any sample is
right. HumanEval code runs only in `nanochat.sandbox` (bubblewrap: read-only system, no network,
time, memory and process limits); where it cannot isolate, HumanEval refuses before any
generation unless `--allow-unsandboxed` is given.

Items are split across ranks (r, r+W, ...) and the counts summed. Metrics: each task's accuracy
under its own name, its item count `<task>/items` and the half-width of its 95% interval
`<task>/ci95`, and `chatcore` = the mean of (acc - baseline) / (1 - baseline) over the ChatCORE
tasks (baselines 0.25 for ARC/MMLU, 0 for GSM8K/HumanEval; identity is not part of it) with
`chatcore/ci95`. When only some ChatCORE tasks ran, the mean is `chatcore_partial` (with
`chatcore_partial/tasks`), never `chatcore`. `eval` events carry the `--input-version` measured; `finished` has no outputs (the
trainer patches the metrics onto that version); `--out` also writes `OUT/eval.json` for `report`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from nanochat.common import Compute, compute_cleanup
from nanochat.engine import Engine
from nanochat.gpt import GPT
from nanochat.report import centered_ci95, ci95, write_eval_result
from nanochat.stages.cli import log, run_stage
from nanochat.stages.events import EventEmitter
from nanochat.stages.options import ChatEvalOptions
from nanochat.stages.train_loop import all_reduce_sum, load_model, setup, single_input
from nanochat.tasks.arc import ARC
from nanochat.tasks.common import Task
from nanochat.tasks.customjson import IdentityTask
from nanochat.tasks.gsm8k import GSM8K
from nanochat.tasks.humaneval import HumanEval
from nanochat.tasks.mmlu import MMLU
from nanochat.tokenizer import Tokenizer

BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0}


def load_task(name: str, data_dir: str, allow_unsandboxed: bool = False) -> Task:
    if name in ("ARC-Easy", "ARC-Challenge"):
        return ARC(data_dir, name, "test")
    if name == "MMLU":
        return MMLU(data_dir, "all", "test")
    if name == "GSM8K":
        return GSM8K(data_dir, "test")
    if name == "HumanEval":
        return HumanEval(data_dir, "test", allow_unsandboxed=allow_unsandboxed)
    if name == "identity":
        return IdentityTask(data_dir, "test")
    raise ValueError(f"unknown chat_eval task {name!r}")


def letter_ids(tokenizer: Tokenizer, letters: list[str]) -> list[int]:
    ids = []
    for letter in letters:
        encoded = tokenizer.encode(letter)
        if len(encoded) != 1:
            raise ValueError(f"answer letter {letter!r} is not a single token for this tokenizer")
        ids.append(encoded[0])
    return ids


@torch.no_grad()
def run_categorical(
    model: GPT,
    tokenizer: Tokenizer,
    compute: Compute,
    ctx: contextlib.AbstractContextManager,
    items: list[dict],
    task: Task,
    batch_size: int,
) -> int:
    """Correct answers among `items`: argmax of the letter logits at the last prompt position."""
    correct = 0
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        prompts = [tokenizer.render_for_completion(c) for c in chunk]
        width = max(len(p) for p in prompts)
        idx = torch.full((len(prompts), width), tokenizer.encode_special("<|assistant_end|>"), dtype=torch.long)
        for i, p in enumerate(prompts):
            idx[i, : len(p)] = torch.tensor(p)
        with ctx:
            logits = model(idx.to(compute.device))
        for i, (conversation, prompt) in enumerate(zip(chunk, prompts)):
            choices = letter_ids(tokenizer, conversation["letters"])
            best = int(logits[i, len(prompt) - 1, choices].argmax())
            correct += task.evaluate(conversation, conversation["letters"][best])
    return correct


def run_generative(
    engine: Engine, tokenizer: Tokenizer, items: list[dict], task: Task, options: ChatEvalOptions, seed: int
) -> int:
    """Correct answers among `items` (any of num_samples samples right counts)."""
    correct = 0
    top_k = options.top_k or None
    for start in range(0, len(items), options.device_batch_size):
        chunk = items[start : start + options.device_batch_size]
        prompts = [tokenizer.render_for_completion(c) for c in chunk]
        sequences, _ = engine.generate_batch(
            prompts,
            num_samples=options.num_samples,
            max_tokens=options.max_new_tokens,
            temperature=options.temperature,
            top_k=top_k,
            seed=seed + start,
        )
        for j, (conversation, prompt) in enumerate(zip(chunk, prompts)):
            rows = sequences[j * options.num_samples : (j + 1) * options.num_samples]
            correct += any(task.evaluate(conversation, tokenizer.decode(seq[len(prompt) :])) for seq in rows)
    return correct


def evaluate_chat_tasks(
    model: GPT, tokenizer: Tokenizer, compute: Compute, ctx: contextlib.AbstractContextManager, options: ChatEvalOptions
) -> dict[str, float | int]:
    """Accuracy of every requested task plus chatcore, over all ranks."""
    model.eval()
    engine = Engine(model, tokenizer)
    metrics: dict[str, float | int] = {}
    for name in options.tasks:
        task = load_task(name, options.data_dir, options.allow_unsandboxed)
        count = len(task) if options.max_problems < 0 else min(len(task), options.max_problems)
        items = [task[i] for i in range(compute.rank, count, compute.world_size)]
        if task.eval_type == "categorical":
            correct = run_categorical(model, tokenizer, compute, ctx, items, task, options.device_batch_size)
        else:
            correct = run_generative(engine, tokenizer, items, task, options, options.seed + 7919 * compute.rank)
        correct, total = all_reduce_sum(correct, len(items))
        metrics[name] = correct / total if total else 0.0
        log(f"{name:>14}: {int(correct)}/{int(total)} = {metrics[name]:.4f}")
        metrics[f"{name}/items"] = int(total)
        metrics[f"{name}/ci95"] = ci95(metrics[name], int(total))
    scored = [(metrics[n], metrics[f"{n}/items"], b) for n, b in BASELINES.items() if n in metrics]
    if scored:
        key = "chatcore" if len(scored) == len(BASELINES) else "chatcore_partial"
        metrics[key] = sum((acc - b) / (1 - b) for acc, _, b in scored) / len(scored)
        metrics[f"{key}/ci95"] = centered_ci95(scored)
        if key == "chatcore_partial":
            metrics[f"{key}/tasks"] = len(scored)
    return metrics


def chat_eval(options: ChatEvalOptions, emitter: EventEmitter) -> tuple[list, dict[str, Any]]:
    folder = single_input(options, "chat checkpoint")
    compute, ctx = setup(options)
    ckpt = load_model(folder, compute)
    metrics = evaluate_chat_tasks(ckpt.model, ckpt.tokenizer, compute, ctx, options)
    version = options.input_version[0] if options.input_version else None
    for name, value in metrics.items():
        emitter.eval(name, value, version)
    if options.out and compute.is_master:
        write_eval_result(options.out, "chat_eval", options, metrics)
    compute_cleanup()
    return [], metrics


if __name__ == "__main__":
    run_stage("chat_eval", chat_eval)
