"""base_train: pretrain the GPT on the FineWeb-format corpus, from a tokenizer version.

    torchrun --nproc_per_node 2 -m nanochat.stages.base_train --preset tiny \\
        --init-from runs/tokenizer --data-dir data --out runs/base
    python -m nanochat.stages.base_train --depth 4 --num-iterations 300 ...   # one process

The model is `GPTConfig.from_depth(depth)` with the tokenizer's vocab. Horizon (the original's
precedence): `--num-iterations`, else `--target-flops`, else `--target-param-data-ratio` tokens
per parameter; `--total-batch-size` tokens per step, gradient accumulation filling the gap to
device_batch_size * max_seq_len * world_size. Schedule (NANOCHAT_SPEC "base"): LR constant, then
linear warm-down over the last `--warmdown-ratio` of the steps; global-norm clip `--grad-clip`;
Muon momentum 0.85 -> 0.95 over the first 300 steps.

Events: `progress` every `--log-every` steps, `eval` val_bpb every `--eval-every` steps (and
CORE every `--core-metric-every`), `checkpoint` for each resumable save (`--save-every`, kept in
`OUT.resume`), `finished` with `OUT` as a `base` version. `--resume` continues from `OUT.resume`
to the same weights an uninterrupted run reaches. meta.json holds the loss and bpb curves
(`history`) for the report.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from nanochat.checkpoint import load_optimizer_state
from nanochat.common import Compute
from nanochat.dataloader import pretrain_loader
from nanochat.gpt import GPT, GPTConfig
from nanochat.stages.base_eval import core_metric
from nanochat.stages.cli import log, run_stage
from nanochat.stages.events import EventEmitter
from nanochat.stages.options import BaseTrainOptions, plan_horizon
from nanochat.stages.tok_eval import load_tokenizer_version
from nanochat.stages.train_loop import (
    ProgressMeter,
    StepTimer,
    TrainingForward,
    TrainingRun,
    accumulate_gradients,
    all_reduce_sum,
    base_samples,
    evaluate_bpb,
    final_train_loss,
    load_resumable,
    muon_momentum,
    new_model,
    optimizer_step,
    peak_flops,
    setup,
    single_input,
    take,
    token_bytes_tensor,
    train_optimizers,
    warmdown_lr,
)
from nanochat.tokenizer import Tokenizer


def base_train(options: BaseTrainOptions, emitter: EventEmitter) -> tuple[list[dict[str, str]], dict[str, Any]]:
    tokenizer = load_tokenizer_version(single_input(options, "tokenizer version"))
    compute, ctx = setup(options)
    rank, world = compute.rank, compute.world_size
    model, resume_path = initial_model(options, tokenizer, compute)
    num_params, flops_per_token = model.num_params(), model.estimate_flops()
    horizon = plan_horizon(options, world, num_params, flops_per_token)
    steps, accum = horizon.num_iterations, horizon.grad_accum_steps
    if steps < 1:
        raise ValueError(f"the horizon gives {steps} steps; raise --num-iterations or the data ratio")
    log(
        f"depth {options.depth}: {num_params:,} params, {flops_per_token:,} FLOPs/token; {steps} steps of "
        f"{options.total_batch_size:,} tokens (grad accum {accum}), {horizon.total_tokens:,} tokens in all"
    )

    optimizers = train_optimizers(model, options)
    rank_state: dict[str, Any] = load_optimizer_state(resume_path, optimizers) if resume_path else {}
    loader = pretrain_loader(
        tokenizer,
        options.data_dir,
        "train",
        options.device_batch_size,
        options.max_seq_len,
        rank,
        world,
        compute.device,
        state=rank_state.get("loader"),
    )
    run = TrainingRun(
        "base_train",
        "base",
        options,
        emitter,
        compute,
        ctx,
        model,
        tokenizer,
        optimizers,
        meter=ProgressMeter(steps, flops_per_token, peak_flops(compute.device), world, state=rank_state.get("meter")),
        loader=loader,
        history=rank_state.get("history", {"train_loss": [], "val_bpb": []}),
        metrics=rank_state.get("metrics", {}),
        start=rank_state.get("step", 0),
    )
    evals = BaseEvals(run, steps)
    forward = TrainingForward(model, options.compile, compute.device)
    for step in range(run.start, steps + 1):
        last = step == steps
        if not run.resumed_at(step):
            evals.measure(step, last)
        run.save_if_due(step, last)
        if last:
            break
        train_step(run, forward, step, steps, accum)

    metrics = {
        "steps": steps,
        "compiled": int(forward.compiled),
        "num_params": num_params,
        "tokens": horizon.total_tokens,
        "train_seconds": round(run.meter.train_seconds, 2),
        "final_train_loss": final_train_loss(run.history),
    }
    extra = {"samples": evals.samples} if evals.samples is not None else {}
    return run.finish(steps, metrics, **extra), run.metrics


def initial_model(options: BaseTrainOptions, tokenizer: Tokenizer, compute: Compute) -> tuple[GPT, Path | None]:
    """A fresh model of the options' depth, or (`--resume`) the resumable checkpoint's, which must
    have the same config; with the resumable folder whose optimizer state comes next."""
    config = GPTConfig.from_depth(options.depth, tokenizer.vocab_size, options.max_seq_len)
    if not options.resume:
        return new_model(config, compute), None
    ckpt, resume_path = load_resumable(options.out, compute)
    if ckpt.config != config:
        raise ValueError(f"--resume: the checkpoint's config {ckpt.config} differs from these options' {config}")
    return ckpt.model, resume_path


class BaseEvals:
    """What base_train measures between steps: val bpb every `--eval-every` steps, CORE every
    `--core-metric-every`, and (rank 0) the fixed prompts' samples every `--sample-every`; each
    also at the last step."""

    def __init__(self, run: TrainingRun, steps: int):
        self.run, self.steps = run, steps
        options, compute = run.options, run.compute
        self.token_bytes = token_bytes_tensor(run.tokenizer, compute.device)
        self.eval_steps = max(
            1, options.eval_tokens // (options.device_batch_size * options.max_seq_len * compute.world_size)
        )
        self.samples: dict[str, Any] | None = None

    def measure(self, step: int, last: bool) -> None:
        run, options = self.run, self.run.options
        if last or (options.eval_every > 0 and step % options.eval_every == 0):
            self.val_bpb(step)
        if options.core_metric_every > 0 and (last or step % options.core_metric_every == 0) and step > 0:
            core = core_metric(
                run.model,
                run.tokenizer,
                run.compute,
                run.ctx,
                options.data_dir,
                "eval_bundle",
                options.core_metric_max_per_task,
            )
            run.metrics["core"] = core["core"]
            run.emitter.eval("core", core["core"], run.version)
        if run.compute.is_master and (
            last or (options.sample_every > 0 and step > 0 and step % options.sample_every == 0)
        ):
            self.samples = {"step": step, "samples": base_samples(run.model, run.tokenizer)}
            for sample in self.samples["samples"]:
                log(f"sample: {sample['prompt']!r} -> {sample['completion']!r}")

    def val_bpb(self, step: int) -> None:
        run, options, compute = self.run, self.run.options, self.run.compute
        val = pretrain_loader(
            run.tokenizer,
            options.data_dir,
            "val",
            options.device_batch_size,
            options.max_seq_len,
            compute.rank,
            compute.world_size,
            compute.device,
        )
        bpb = evaluate_bpb(run.model, take(val, self.eval_steps), self.token_bytes, run.ctx)
        run.metrics.setdefault("val_bpb_step0", bpb)
        run.record_eval("val_bpb", step, bpb, "val_bpb")
        run.metrics["min_val_bpb"] = min(bpb, run.metrics.get("min_val_bpb", bpb))
        log(f"step {step}/{self.steps}: val bpb {bpb:.4f}")


def train_step(run: TrainingRun, forward: TrainingForward, step: int, steps: int, accum: int) -> None:
    """One optimizer step over `accum` micro-batches (warm-down LR, Muon momentum ramp, clip),
    then its numbers: the loss averaged over the ranks, the progress event every `--log-every`."""
    options, world = run.options, run.compute.world_size
    with StepTimer(run.compute.device) as timer:
        total_loss = accumulate_gradients(forward, itertools.islice(run.loader, accum), accum, run.ctx)
        lr = warmdown_lr(step / steps, options.warmup_ratio, options.warmdown_ratio, options.final_lr_frac)
        grad_clip = options.grad_clip if options.grad_clip > 0 else None
        optimizer_step(run.model, run.optimizers, lr, muon_momentum(step), grad_clip)
    loss_avg = all_reduce_sum(total_loss)[0] / world
    numbers = run.meter.update(step, loss_avg, options.total_batch_size, timer.seconds)
    forward.after_step(timer.seconds, steps - step - 1)
    due = step % options.log_every == 0 or step + 1 == steps
    run.record_step(step + 1, steps, lr, numbers, emit=due)
    if due:
        log(
            f"step {step + 1}/{steps} loss {numbers['loss']:.4f} lr {lr:.3f} "
            f"{numbers['tok_per_s']:,.0f} tok/s eta {numbers['eta_s']:.0f}s"
        )


if __name__ == "__main__":
    run_stage("base_train", base_train)
