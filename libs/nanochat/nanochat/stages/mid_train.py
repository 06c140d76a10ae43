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

from nanochat import optim
from nanochat.checkpoint import load_optimizer_state
from nanochat.common import compute_cleanup
from nanochat.dataloader import ConversationLoader
from nanochat.stages.cli import build_meta, log, run_stage
from nanochat.stages.events import EventEmitter
from nanochat.stages.options import MidTrainOptions, plan_horizon
from nanochat.stages.train_loop import (
    ProgressMeter,
    StepTimer,
    TrainingForward,
    all_reduce_sum,
    any_rank,
    evaluate_bpb,
    finish_output,
    load_model,
    load_resumable,
    loop_state,
    muon_momentum,
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
from nanochat.tasks.mixtures import mid_mixture


def mid_train(options: MidTrainOptions, emitter: EventEmitter) -> tuple[list[dict[str, str]], dict[str, Any]]:
    folder = single_input(options, "base checkpoint")
    compute, ctx = setup(options)
    rank, world = compute.rank, compute.world_size
    version = options.input_version[0] if options.input_version else None
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
    optimizers = model.setup_optimizers(
        unembedding_lr=options.unembedding_lr,
        embedding_lr=options.embedding_lr,
        matrix_lr=options.matrix_lr,
        weight_decay=options.weight_decay,
    )
    rank_state: dict[str, Any] = load_optimizer_state(resume_path, optimizers) if resume_path else {}
    step = rank_state.get("step", 0)
    history: dict[str, list] = rank_state.get("history", {"train_loss": [], "val_bpb": []})
    metrics: dict[str, Any] = rank_state.get("metrics", {})
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
    token_bytes = token_bytes_tensor(tokenizer, compute.device)
    # Without a step budget the pass length is only estimated (for the ETA); the data decides the end.
    est_steps = max_steps or max(1, round(len(train_set) * 200 / options.total_batch_size))
    meter = ProgressMeter(
        est_steps, model.estimate_flops(), peak_flops(compute.device), world, state=rank_state.get("meter")
    )
    eval_steps = max(1, options.eval_tokens // (options.device_batch_size * options.max_seq_len * world))
    log(f"mid: {len(train_set):,} conversations, {max_steps or 'one pass of'} steps, grad accum {accum}")

    def val_bpb() -> float:
        val = ConversationLoader(
            tokenizer, val_set, options.device_batch_size, options.max_seq_len, rank, world, compute.device
        )
        return evaluate_bpb(model, take(val, eval_steps), token_bytes, ctx)

    def record_eval(at: int) -> None:
        bpb = val_bpb()
        history["val_bpb"].append([at, bpb])
        metrics.setdefault("mixture_val_bpb_step0", bpb)
        metrics["mixture_val_bpb"] = bpb
        emitter.eval("mixture_val_bpb", bpb, version)
        log(f"step {at}: val bpb {bpb:.4f}")

    forward = TrainingForward(model, options.compile, compute.device)
    start = step
    while True:
        if not (options.resume and step == start) and options.eval_every > 0 and step % options.eval_every == 0:
            record_eval(step)
        done = max_steps is not None and step >= max_steps
        if resumable_due(options.save_every, step, start, done):
            meta = build_meta("mid_train", options, "mid", step, metrics)
            state = loop_state(step, loader, meter, history, metrics)
            save_resumable(options.out, model, tokenizer, meta, optimizers, state, emitter, step)
        if done:
            break
        batches = list(take(loader, accum))
        if any_rank(len(batches) < accum):
            break  # the data pass is over on some rank: every rank stops at the same step
        progress = step / max_steps if max_steps else loader.progress()
        with StepTimer(compute.device) as timer:
            total_loss = 0.0
            for x, y in batches:
                with ctx:
                    loss = forward(x, y)
                (loss / accum).backward()
                total_loss += loss.item() / accum
            lr = warmdown_lr(progress, 0.0, options.warmdown_ratio, 0.0)
            set_lr(optimizers, lr)
            set_momentum(optimizers, muon_momentum(step))
            optim.step(optimizers, None)
            model.zero_grad(set_to_none=True)
        numbers = meter.update(step, all_reduce_sum(total_loss)[0] / world, options.total_batch_size, timer.seconds)
        forward.after_step(timer.seconds, (max_steps or est_steps) - step - 1)
        step += 1
        history["train_loss"].append([step, numbers["loss"]])
        if step % options.log_every == 0:
            emitter.progress(step=step, total=max_steps or est_steps, lr=lr, **numbers)
            log(
                f"step {step}/{max_steps or '~' + str(est_steps)} loss {numbers['loss']:.4f} lr {lr:.3f} "
                f"{numbers['tok_per_s']:,.0f} tok/s"
            )
    if not history["val_bpb"] or history["val_bpb"][-1][0] != step:
        record_eval(step)
    metrics.update(
        {
            "steps": step,
            "compiled": int(forward.compiled),
            "train_seconds": round(meter.train_seconds, 2),
            "final_train_loss": history["train_loss"][-1][1] if history["train_loss"] else None,
        }
    )
    meta = build_meta("mid_train", options, "mid", step, metrics)
    meta["history"] = history
    finish_output(options.out, model, tokenizer, meta, compute.is_master)
    compute_cleanup()
    return [{"path": str(options.out), "registry_stage": "mid"}], metrics


if __name__ == "__main__":
    run_stage("mid_train", mid_train)
