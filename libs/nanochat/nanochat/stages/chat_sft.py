"""chat_sft: supervised fine-tuning of a mid checkpoint on the chat mixture.

    torchrun --nproc_per_node 2 -m nanochat.stages.chat_sft --init-from runs/mid --data-dir data --out runs/sft
    python -m nanochat.stages.chat_sft --preset tiny --init-from runs/mid --out runs/sft

Mixture (NANOCHAT_SPEC "Data"): ARC-Easy + ARC-Challenge + GSM8K + the first 10K of SmolTalk
train, the original's; `--identity-in-mixture` adds the identity conversations (the tiny preset
does; the report card lists it as a deviation), `--tool-use-in-mixture N` N synthetic tool-use
conversations (docs/tools.md; also listed as a deviation). One conversation per row,
padded with `<|assistant_end|>`; only the assistant's tokens are trained on (mask 1).
`--target-examples-per-step` conversations per step over all ranks (gradient accumulation fills
the gap to device_batch_size * world_size); `--num-iterations -1` runs `--num-epochs` passes.

Schedule: each group's LR starts at `--init-lr-frac` (0.02) x its base LR and decays linearly
to 0 (1 - step/steps); no clipping, no momentum ramp. Validation: mean loss on SmolTalk test every
`--eval-every` steps; MMLU and ARC-Easy accuracy (test, `--eval-metrics-max-problems` items, the
chat_eval scoring) every `--eval-metrics-every` steps and at the end, as `mmlu_acc` / `arc_easy_acc`
(with `/items` and `/ci95` in the final metrics).
Resume as `base_train` (`OUT.resume`, `--resume`); `finished` names `OUT` as an `sft` version.
"""

from __future__ import annotations

from typing import Any

import torch

from nanochat.checkpoint import load_optimizer_state
from nanochat.dataloader import SFTLoader
from nanochat.stages.chat_eval import evaluate_chat_tasks
from nanochat.stages.cli import log, run_stage
from nanochat.stages.events import EventEmitter
from nanochat.stages.options import ChatEvalOptions, ChatSftOptions
from nanochat.stages.train_loop import (
    ProgressMeter,
    StepTimer,
    TrainingRun,
    all_reduce_sum,
    final_train_loss,
    linear_decay,
    load_model,
    load_resumable,
    optimizer_step,
    scale_initial_lr,
    setup,
    single_input,
    take,
    train_optimizers,
)
from nanochat.tasks.mixtures import sft_mixture


def chat_sft(options: ChatSftOptions, emitter: EventEmitter) -> tuple[list[dict[str, str]], dict[str, Any]]:
    folder = single_input(options, "mid checkpoint")
    compute, ctx = setup(options)
    rank, world = compute.rank, compute.world_size
    ckpt, resume_path = load_resumable(options.out, compute) if options.resume else (load_model(folder, compute), None)
    model, tokenizer = ckpt.model, ckpt.tokenizer

    train_set = sft_mixture(
        options.data_dir, "train", identity=options.identity_in_mixture, tool_use=options.tool_use_in_mixture
    )
    val_set = sft_mixture(options.data_dir, "test")
    per_micro = options.device_batch_size * world
    if options.target_examples_per_step % per_micro:
        raise ValueError(
            f"target_examples_per_step {options.target_examples_per_step} must be a multiple of "
            f"device_batch_size * world_size = {per_micro}"
        )
    accum = options.target_examples_per_step // per_micro
    steps = (
        options.num_iterations
        if options.num_iterations > 0
        else len(train_set) // options.target_examples_per_step * options.num_epochs
    )
    if steps < 1:
        raise ValueError(f"{len(train_set)} conversations give no step of {options.target_examples_per_step}")
    log(
        f"sft: {len(train_set):,} conversations, {steps} steps of {options.target_examples_per_step} (grad accum {accum})"
    )

    optimizers = train_optimizers(model, options)
    scale_initial_lr(optimizers, options.init_lr_frac)
    rank_state: dict[str, Any] = load_optimizer_state(resume_path, optimizers) if resume_path else {}
    # Epochs loop as long as the steps need (num_iterations may ask for more than one pass).
    loader = SFTLoader(
        tokenizer,
        train_set,
        options.device_batch_size,
        options.max_seq_len,
        rank,
        world,
        compute.device,
        num_epochs=None,
        state=rank_state.get("loader"),
    )
    run = TrainingRun(
        "chat_sft",
        "sft",
        options,
        emitter,
        compute,
        ctx,
        model,
        tokenizer,
        optimizers,
        meter=ProgressMeter(steps, None, None, world, state=rank_state.get("meter")),
        loader=loader,
        history=rank_state.get("history", {"train_loss": [], "val_loss": []}),
        metrics=rank_state.get("metrics", {}),
        start=rank_state.get("step", 0),
    )
    for step in range(run.start, steps + 1):
        last = step == steps
        if not run.resumed_at(step):
            evaluate(run, val_set, step, steps, last)
        run.save_if_due(step, last)
        if last:
            break
        train_step(run, step, steps, accum)

    metrics = {
        "steps": steps,
        "train_seconds": round(run.meter.train_seconds, 2),
        "final_train_loss": final_train_loss(run.history),
    }
    return run.finish(steps, metrics), run.metrics


def evaluate(run: TrainingRun, val_set: Any, step: int, steps: int, last: bool) -> None:
    """MMLU and ARC-Easy accuracy every `--eval-metrics-every` steps, the validation loss every
    `--eval-every`; both at the last step."""
    options = run.options
    if last or (options.eval_metrics_every > 0 and step > 0 and step % options.eval_metrics_every == 0):
        accuracy = task_accuracy(run)
        run.metrics.update(accuracy)
        for name in ("mmlu_acc", "arc_easy_acc"):
            run.emitter.eval(name, accuracy[name], run.version)
        log(f"step {step}/{steps}: MMLU {accuracy['mmlu_acc']:.4f}, ARC-Easy {accuracy['arc_easy_acc']:.4f}")
    if last or (options.eval_every > 0 and step % options.eval_every == 0):
        loss = val_loss(run, val_set)
        run.record_eval("val_loss", step, loss, "val_loss")
        log(f"step {step}/{steps}: val loss {loss:.4f}")


@torch.no_grad()
def val_loss(run: TrainingRun, val_set: Any) -> float:
    """Mean loss per trained token over `--eval-steps` validation batches of every rank."""
    options, compute, model = run.options, run.compute, run.model
    model.eval()
    val = SFTLoader(
        run.tokenizer,
        val_set,
        options.device_batch_size,
        options.max_seq_len,
        compute.rank,
        compute.world_size,
        compute.device,
    )
    total = count = 0.0
    for x, y in take(val, options.eval_steps):
        with run.ctx:
            losses = model(x, y, loss_reduction="none")
        total += float(losses.sum())
        count += int((y >= 0).sum())
    model.train()
    total, count = all_reduce_sum(total, count)
    return total / max(count, 1)


def task_accuracy(run: TrainingRun) -> dict[str, float | int]:
    """chat_eval's MMLU and ARC-Easy scores on `--eval-metrics-max-problems` test items each."""
    options = run.options
    accuracy_options = ChatEvalOptions(
        data_dir=options.data_dir,
        tasks=["MMLU", "ARC-Easy"],
        max_problems=options.eval_metrics_max_problems,
        device_batch_size=options.device_batch_size * 2,
    )
    scores = evaluate_chat_tasks(run.model, run.tokenizer, run.compute, run.ctx, accuracy_options)
    run.model.train()
    return {
        f"{key}_acc{rest}": scores[f"{task}{rest}"]
        for task, key in (("MMLU", "mmlu"), ("ARC-Easy", "arc_easy"))
        for rest in ("", "/items", "/ci95")
    }


def train_step(run: TrainingRun, step: int, steps: int, accum: int) -> None:
    """One optimizer step over `accum` micro-batches (LR decaying linearly to 0, no clip), then
    its numbers and, every `--log-every`, its event."""
    with StepTimer(run.compute.device) as timer:
        total_loss, tokens = 0.0, 0
        for _ in range(accum):
            x, y = next(run.loader)
            with run.ctx:
                losses = run.model(x, y, loss_reduction="none")
            # Summed over the trained tokens and divided by their count, so a batch whose
            # assistant turns were all truncated away adds nothing instead of NaN.
            loss = losses.sum() / max(1, int((y >= 0).sum()))
            (loss / accum).backward()
            total_loss += loss.item() / accum
            tokens += x.numel()
        lr = linear_decay(step, steps)
        optimizer_step(run.model, run.optimizers, lr)
    loss_avg, tokens_all = all_reduce_sum(total_loss, tokens)
    numbers = run.meter.update(step, loss_avg / run.compute.world_size, int(tokens_all), timer.seconds)
    due = step % run.options.log_every == 0 or step + 1 == steps
    run.record_step(step + 1, steps, lr, numbers, emit=due)
    if due:
        log(f"step {step + 1}/{steps} loss {numbers['loss']:.4f} lr {lr:.4f}")


if __name__ == "__main__":
    run_stage("chat_sft", chat_sft)
