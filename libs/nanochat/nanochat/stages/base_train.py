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
from typing import Any

from nanochat import optim
from nanochat.checkpoint import load_optimizer_state
from nanochat.common import compute_cleanup
from nanochat.dataloader import pretrain_loader
from nanochat.gpt import GPTConfig
from nanochat.stages.base_eval import core_metric
from nanochat.stages.cli import build_meta, log, run_stage
from nanochat.stages.events import EventEmitter
from nanochat.stages.options import BaseTrainOptions, plan_horizon
from nanochat.stages.tok_eval import load_tokenizer_version
from nanochat.stages.train_loop import (
    ProgressMeter,
    StepTimer,
    TrainingForward,
    all_reduce_sum,
    base_samples,
    evaluate_bpb,
    finish_output,
    load_resumable,
    loop_state,
    muon_momentum,
    new_model,
    peak_flops,
    resumable_due,
    save_resumable,
    set_lr,
    set_momentum,
    setup,
    single_input,
    take,
    token_bytes_tensor,
    warmdown_lr,
)


def base_train(options: BaseTrainOptions, emitter: EventEmitter) -> tuple[list[dict[str, str]], dict[str, Any]]:
    tokenizer = load_tokenizer_version(single_input(options, "tokenizer version"))
    compute, ctx = setup(options)
    rank, world = compute.rank, compute.world_size
    version = options.input_version[0] if options.input_version else None

    config = GPTConfig.from_depth(options.depth, tokenizer.vocab_size, options.max_seq_len)
    rank_state: dict[str, Any] = {}
    if options.resume:
        ckpt, resume_path = load_resumable(options.out, compute)
        model = ckpt.model
        if ckpt.config != config:
            raise ValueError(f"--resume: the checkpoint's config {ckpt.config} differs from these options' {config}")
    else:
        model = new_model(config, compute)
    num_params, flops_per_token = model.num_params(), model.estimate_flops()
    horizon = plan_horizon(options, world, num_params, flops_per_token)
    steps, accum = horizon.num_iterations, horizon.grad_accum_steps
    if steps < 1:
        raise ValueError(f"the horizon gives {steps} steps; raise --num-iterations or the data ratio")
    log(
        f"depth {options.depth}: {num_params:,} params, {flops_per_token:,} FLOPs/token; {steps} steps of "
        f"{options.total_batch_size:,} tokens (grad accum {accum}), {horizon.total_tokens:,} tokens in all"
    )

    optimizers = model.setup_optimizers(
        unembedding_lr=options.unembedding_lr,
        embedding_lr=options.embedding_lr,
        matrix_lr=options.matrix_lr,
        weight_decay=options.weight_decay,
    )
    if options.resume:
        rank_state = load_optimizer_state(resume_path, optimizers)
    start = rank_state.get("step", 0)
    history: dict[str, list] = rank_state.get("history", {"train_loss": [], "val_bpb": []})
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
    token_bytes = token_bytes_tensor(tokenizer, compute.device)
    meter = ProgressMeter(steps, flops_per_token, peak_flops(compute.device), world, state=rank_state.get("meter"))
    grad_clip = options.grad_clip if options.grad_clip > 0 else None
    eval_steps = max(1, options.eval_tokens // (options.device_batch_size * options.max_seq_len * world))
    metrics: dict[str, Any] = rank_state.get("metrics", {})

    def val_bpb() -> float:
        val = pretrain_loader(
            tokenizer,
            options.data_dir,
            "val",
            options.device_batch_size,
            options.max_seq_len,
            rank,
            world,
            compute.device,
        )
        return evaluate_bpb(model, take(val, eval_steps), token_bytes, ctx)

    samples: dict[str, Any] | None = None
    forward = TrainingForward(model, options.compile, compute.device)
    for step in range(start, steps + 1):
        last = step == steps
        resumed_here = options.resume and step == start
        if not resumed_here and (last or (options.eval_every > 0 and step % options.eval_every == 0)):
            bpb = val_bpb()
            history["val_bpb"].append([step, bpb])
            metrics.setdefault("val_bpb_step0", bpb)
            metrics["val_bpb"] = bpb
            metrics["min_val_bpb"] = min(bpb, metrics.get("min_val_bpb", bpb))
            emitter.eval("val_bpb", bpb, version)
            log(f"step {step}/{steps}: val bpb {bpb:.4f}")
        if (
            not resumed_here
            and options.core_metric_every > 0
            and (last or step % options.core_metric_every == 0)
            and step > 0
        ):
            core = core_metric(
                model, tokenizer, compute, ctx, options.data_dir, "eval_bundle", options.core_metric_max_per_task
            )
            metrics["core"] = core["core"]
            emitter.eval("core", core["core"], version)
        if (
            not resumed_here
            and compute.is_master
            and (last or (options.sample_every > 0 and step > 0 and step % options.sample_every == 0))
        ):
            samples = {"step": step, "samples": base_samples(model, tokenizer)}
            for sample in samples["samples"]:
                log(f"sample: {sample['prompt']!r} -> {sample['completion']!r}")
        if resumable_due(options.save_every, step, start, last):
            meta = build_meta("base_train", options, "base", step, metrics)
            state = loop_state(step, loader, meter, history, metrics)
            save_resumable(options.out, model, tokenizer, meta, optimizers, state, emitter, step)
        if last:
            break

        with StepTimer(compute.device) as timer:
            total_loss = 0.0
            for x, y in itertools.islice(loader, accum):
                with ctx:
                    loss = forward(x, y)
                (loss / accum).backward()
                total_loss += loss.item() / accum
            lr = warmdown_lr(step / steps, options.warmup_ratio, options.warmdown_ratio, options.final_lr_frac)
            set_lr(optimizers, lr)
            set_momentum(optimizers, muon_momentum(step))
            optim.step(optimizers, grad_clip)
            model.zero_grad(set_to_none=True)
        loss_avg = all_reduce_sum(total_loss)[0] / world
        numbers = meter.update(step, loss_avg, options.total_batch_size, timer.seconds)
        forward.after_step(timer.seconds, steps - step - 1)
        history["train_loss"].append([step + 1, numbers["loss"]])
        if step % options.log_every == 0 or step + 1 == steps:
            emitter.progress(step=step + 1, total=steps, lr=lr, **numbers)
            log(
                f"step {step + 1}/{steps} loss {numbers['loss']:.4f} lr {lr:.3f} "
                f"{numbers['tok_per_s']:,.0f} tok/s eta {numbers['eta_s']:.0f}s"
            )

    metrics.update(
        {
            "steps": steps,
            "compiled": int(forward.compiled),
            "num_params": num_params,
            "tokens": horizon.total_tokens,
            "train_seconds": round(meter.train_seconds, 2),
            "final_train_loss": history["train_loss"][-1][1] if history["train_loss"] else None,
        }
    )
    meta = build_meta("base_train", options, "base", steps, metrics)
    meta["history"] = history
    if samples is not None:
        meta["samples"] = samples
    finish_output(options.out, model, tokenizer, meta, compute.is_master)
    compute_cleanup()
    return [{"path": str(options.out), "registry_stage": "base"}], metrics


if __name__ == "__main__":
    run_stage("base_train", base_train)
