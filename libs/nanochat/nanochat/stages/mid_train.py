"""mid_train: midtrain a base checkpoint on conversations, multiple choice and tool use.

    torchrun --nproc_per_node 2 -m nanochat.stages.mid_train --init-from runs/base --data-dir data --out runs/mid
    python -m nanochat.stages.mid_train --preset tiny --init-from runs/base --out runs/mid

The mixture (NANOCHAT_SPEC "Data"): SmolTalk + MMLU auxiliary_train + GSM8K train, one pass,
rendered conversations (each cut at 2,048 tokens) packed like pretraining and trained on every
token (the loss mask is ignored, as in the original). `--num-iterations -1` runs the whole pass;
a positive value stops there (or earlier when the data runs out). Validation bits-per-byte
(`mixture_val_bpb`) on SmolTalk test + the first 5,200 rows of MMLU test + the first 420 of GSM8K
test, the original's validation mix (`tasks.mixtures.mid_mixture`).

Schedule: Muon momentum 0.85 -> 0.95 over 300 steps as in base, no gradient clipping, and the
base LR shape: constant, then linear warm-down over the last `--warmdown-ratio` of the run.
(The original's multiplier is `progress` itself, which ramps the LR UP from 0 to 1 over the run
although its comment says warm-down; we use the shape the comment describes.)

Events and resume as `base_train`: `OUT.resume` every `--save-every` steps, `--resume`
continues from it; `finished` names `OUT` as a `mid` version.
"""

from __future__ import annotations

from typing import Any

from nanochat.checkpoint import load_optimizer_state
from nanochat.dataloader import ConversationLoader
from nanochat.stages.cli import log, run_stage
from nanochat.stages.events import EventEmitter
from nanochat.stages.options import MidTrainOptions, plan_horizon
from nanochat.stages.train_loop import (
    ProgressMeter,
    StepTimer,
    TrainingForward,
    TrainingRun,
    accumulate_gradients,
    all_reduce_sum,
    any_rank,
    evaluate_bpb,
    final_train_loss,
    load_model,
    load_resumable,
    muon_momentum,
    optimizer_step,
    peak_flops,
    setup,
    single_input,
    take,
    token_bytes_tensor,
    train_optimizers,
    warmdown_lr,
)
from nanochat.tasks.mixtures import mid_mixture


def mid_train(options: MidTrainOptions, emitter: EventEmitter) -> tuple[list[dict[str, str]], dict[str, Any]]:
    folder = single_input(options, "base checkpoint")
    compute, ctx = setup(options)
    rank, world = compute.rank, compute.world_size
    ckpt, resume_path = load_resumable(options.out, compute) if options.resume else (load_model(folder, compute), None)
    model, tokenizer = ckpt.model, ckpt.tokenizer
    if options.max_seq_len > ckpt.config.sequence_len:
        raise ValueError(
            f"--max-seq-len {options.max_seq_len} exceeds the model's sequence_len {ckpt.config.sequence_len}"
        )

    train_set, val_set = mid_mixture(options.data_dir, "train"), mid_mixture(options.data_dir, "test")
    # The data pass sets the length unless --num-iterations does; the batch rule is plan_horizon's.
    horizon = plan_horizon(options.model_copy(update={"num_iterations": max(1, options.num_iterations)}), world)
    accum = horizon.grad_accum_steps
    max_steps = options.num_iterations if options.num_iterations > 0 else None
    optimizers = train_optimizers(model, options)
    rank_state: dict[str, Any] = load_optimizer_state(resume_path, optimizers) if resume_path else {}
    loader = ConversationLoader(
        tokenizer,
        train_set,
        options.device_batch_size,
        options.max_seq_len,
        rank,
        world,
        compute.device,
        state=rank_state.get("loader"),
    )
    # Without a step budget the pass length is only estimated (for the ETA); the data decides the end.
    est_steps = max_steps or max(1, round(len(train_set) * 200 / options.total_batch_size))
    meter = ProgressMeter(
        est_steps, model.estimate_flops(), peak_flops(compute.device), world, state=rank_state.get("meter")
    )
    run = TrainingRun(
        "mid_train",
        "mid",
        options,
        emitter,
        compute,
        ctx,
        model,
        tokenizer,
        optimizers,
        meter=meter,
        loader=loader,
        history=rank_state.get("history", {"train_loss": [], "val_bpb": []}),
        metrics=rank_state.get("metrics", {}),
        start=rank_state.get("step", 0),
    )
    log(f"mid: {len(train_set):,} conversations, {max_steps or 'one pass of'} steps, grad accum {accum}")
    evals = MidEvals(run, val_set)
    forward = TrainingForward(model, options.compile, compute.device)
    step = run.start
    while True:
        if not run.resumed_at(step) and options.eval_every > 0 and step % options.eval_every == 0:
            evals.val_bpb(step)
        done = max_steps is not None and step >= max_steps
        run.save_if_due(step, done)
        if done:
            break
        batches = list(take(loader, accum))
        if any_rank(len(batches) < accum):
            break  # the data pass is over on some rank: every rank stops at the same step
        train_step(run, forward, batches, step, max_steps, est_steps)
        step += 1
    if not run.history["val_bpb"] or run.history["val_bpb"][-1][0] != step:
        evals.val_bpb(step)
    metrics = {
        "steps": step,
        "compiled": int(forward.compiled),
        "train_seconds": round(meter.train_seconds, 2),
        "final_train_loss": final_train_loss(run.history),
    }
    return run.finish(step, metrics), run.metrics


class MidEvals:
    """mid_train's measure: bits per byte on the validation mixture (`mixture_val_bpb`)."""

    def __init__(self, run: TrainingRun, val_set: Any):
        self.run, self.val_set = run, val_set
        options, compute = run.options, run.compute
        self.token_bytes = token_bytes_tensor(run.tokenizer, compute.device)
        self.eval_steps = max(
            1, options.eval_tokens // (options.device_batch_size * options.max_seq_len * compute.world_size)
        )

    def val_bpb(self, step: int) -> None:
        run, options, compute = self.run, self.run.options, self.run.compute
        val = ConversationLoader(
            run.tokenizer,
            self.val_set,
            options.device_batch_size,
            options.max_seq_len,
            compute.rank,
            compute.world_size,
            compute.device,
        )
        bpb = evaluate_bpb(run.model, take(val, self.eval_steps), self.token_bytes, run.ctx)
        run.metrics.setdefault("mixture_val_bpb_step0", bpb)
        run.record_eval("mixture_val_bpb", step, bpb, "val_bpb")
        log(f"step {step}: val bpb {bpb:.4f}")


def train_step(
    run: TrainingRun, forward: TrainingForward, batches: list, step: int, max_steps: int | None, est_steps: int
) -> None:
    """One optimizer step over the step's micro-batches (warm-down LR over the step budget or the
    data pass, Muon momentum ramp, no clip), then its numbers and, every `--log-every`, its event."""
    options, world = run.options, run.compute.world_size
    progress = step / max_steps if max_steps else run.loader.progress()
    with StepTimer(run.compute.device) as timer:
        total_loss = accumulate_gradients(forward, batches, len(batches), run.ctx)
        lr = warmdown_lr(progress, 0.0, options.warmdown_ratio, 0.0)
        optimizer_step(run.model, run.optimizers, lr, muon_momentum(step))
    numbers = run.meter.update(step, all_reduce_sum(total_loss)[0] / world, options.total_batch_size, timer.seconds)
    forward.after_step(timer.seconds, (max_steps or est_steps) - step - 1)
    due = (step + 1) % options.log_every == 0
    run.record_step(step + 1, max_steps or est_steps, lr, numbers, emit=due)
    if due:
        log(
            f"step {step + 1}/{max_steps or '~' + str(est_steps)} loss {numbers['loss']:.4f} lr {lr:.3f} "
            f"{numbers['tok_per_s']:,.0f} tok/s"
        )


if __name__ == "__main__":
    run_stage("mid_train", mid_train)
