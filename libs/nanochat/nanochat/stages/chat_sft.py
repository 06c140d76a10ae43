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
from nanochat import optim
from nanochat.checkpoint import load_optimizer_state
from nanochat.common import compute_cleanup
from nanochat.dataloader import SFTLoader
from nanochat.stages.chat_eval import evaluate_chat_tasks
from nanochat.stages.cli import build_meta, log, run_stage
from nanochat.stages.events import EventEmitter
from nanochat.stages.options import ChatEvalOptions, ChatSftOptions
from nanochat.stages.train_loop import (
    ProgressMeter,
    StepTimer,
    all_reduce_sum,
    finish_output,
    linear_decay,
    load_model,
    load_resumable,
    loop_state,
    resumable_due,
    save_resumable,
    scale_initial_lr,
    set_lr,
    setup,
    single_input,
    take,
)
from nanochat.tasks.mixtures import sft_mixture


def chat_sft(options: ChatSftOptions, emitter: EventEmitter) -> tuple[list[dict[str, str]], dict[str, Any]]:
    folder = single_input(options, "mid checkpoint")
    compute, ctx = setup(options)
    rank, world = compute.rank, compute.world_size
    version = options.input_version[0] if options.input_version else None
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

    optimizers = model.setup_optimizers(
        unembedding_lr=options.unembedding_lr,
        embedding_lr=options.embedding_lr,
        matrix_lr=options.matrix_lr,
        weight_decay=options.weight_decay,
    )
    scale_initial_lr(optimizers, options.init_lr_frac)
    rank_state: dict[str, Any] = load_optimizer_state(resume_path, optimizers) if resume_path else {}
    start = rank_state.get("step", 0)
    history: dict[str, list] = rank_state.get("history", {"train_loss": [], "val_loss": []})
    metrics: dict[str, Any] = rank_state.get("metrics", {})
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
    meter = ProgressMeter(steps, None, None, world, state=rank_state.get("meter"))

    @torch.no_grad()
    def val_loss() -> float:
        model.eval()
        val = SFTLoader(tokenizer, val_set, options.device_batch_size, options.max_seq_len, rank, world, compute.device)
        total = count = 0.0
        for x, y in take(val, options.eval_steps):
            with ctx:
                losses = model(x, y, loss_reduction="none")
            total += float(losses.sum())
            count += int((y >= 0).sum())
        model.train()
        total, count = all_reduce_sum(total, count)
        return total / max(count, 1)

    accuracy_options = ChatEvalOptions(
        data_dir=options.data_dir,
        tasks=["MMLU", "ARC-Easy"],
        max_problems=options.eval_metrics_max_problems,
        device_batch_size=options.device_batch_size * 2,
    )

    def task_accuracy() -> dict[str, float | int]:
        scores = evaluate_chat_tasks(model, tokenizer, compute, ctx, accuracy_options)
        model.train()
        return {
            f"{key}_acc{rest}": scores[f"{task}{rest}"]
            for task, key in (("MMLU", "mmlu"), ("ARC-Easy", "arc_easy"))
            for rest in ("", "/items", "/ci95")
        }

    for step in range(start, steps + 1):
        last = step == steps
        resumed_here = options.resume and step == start
        if not resumed_here and (
            last or (options.eval_metrics_every > 0 and step > 0 and step % options.eval_metrics_every == 0)
        ):
            accuracy = task_accuracy()
            metrics.update(accuracy)
            for name in ("mmlu_acc", "arc_easy_acc"):
                emitter.eval(name, accuracy[name], version)
            log(f"step {step}/{steps}: MMLU {accuracy['mmlu_acc']:.4f}, ARC-Easy {accuracy['arc_easy_acc']:.4f}")
        if not resumed_here and (last or (options.eval_every > 0 and step % options.eval_every == 0)):
            loss = val_loss()
            history["val_loss"].append([step, loss])
            metrics["val_loss"] = loss
            emitter.eval("val_loss", loss, version)
            log(f"step {step}/{steps}: val loss {loss:.4f}")
        if resumable_due(options.save_every, step, start, last):
            meta = build_meta("chat_sft", options, "sft", step, metrics)
            state = loop_state(step, loader, meter, history, metrics)
            save_resumable(options.out, model, tokenizer, meta, optimizers, state, emitter, step)
        if last:
            break
        with StepTimer(compute.device) as timer:
            total_loss, tokens = 0.0, 0
            for _ in range(accum):
                x, y = next(loader)
                with ctx:
                    losses = model(x, y, loss_reduction="none")
                # Summed over the trained tokens and divided by their count, so a batch whose
                # assistant turns were all truncated away adds nothing instead of NaN.
                loss = losses.sum() / max(1, int((y >= 0).sum()))
                (loss / accum).backward()
                total_loss += loss.item() / accum
                tokens += x.numel()
            lr = linear_decay(step, steps)
            set_lr(optimizers, lr)
            optim.step(optimizers, None)
            model.zero_grad(set_to_none=True)
        loss_avg, tokens_all = all_reduce_sum(total_loss, tokens)
        numbers = meter.update(step, loss_avg / world, int(tokens_all), timer.seconds)
        history["train_loss"].append([step + 1, numbers["loss"]])
        if step % options.log_every == 0 or step + 1 == steps:
            emitter.progress(step=step + 1, total=steps, lr=lr, **numbers)
            log(f"step {step + 1}/{steps} loss {numbers['loss']:.4f} lr {lr:.4f}")

    metrics.update(
        {
            "steps": steps,
            "train_seconds": round(meter.train_seconds, 2),
            "final_train_loss": history["train_loss"][-1][1] if history["train_loss"] else None,
        }
    )
    meta = build_meta("chat_sft", options, "sft", steps, metrics)
    meta["history"] = history
    finish_output(options.out, model, tokenizer, meta, compute.is_master)
    compute_cleanup()
    return [{"path": str(options.out), "registry_stage": "sft"}], metrics


if __name__ == "__main__":
    run_stage("chat_sft", chat_sft)
