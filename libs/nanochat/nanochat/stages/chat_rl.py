"""chat_rl: reinforcement learning of an SFT checkpoint on GSM8K (on-policy REINFORCE).

    torchrun --nproc_per_node 2 -m nanochat.stages.chat_rl --init-from runs/sft --data-dir data --out runs/rl
    python -m nanochat.stages.chat_rl --preset tiny --init-from runs/sft --out runs/rl

Each step (NANOCHAT_SPEC "RL"): `--examples-per-step` GSM8K train questions over all ranks,
`--num-samples` completions each through the engine (temperature 1.0, top-k 50, up to
`--max-new-tokens` tokens, calculator tool on), sampled `--device-batch-size` rows per engine
batch (`sample_rows`); reward = 1 for the exact final answer, else 0; advantage = reward - the
question's mean reward (no std division). Training rows (`training_rows`): a question's samples
padded to the longest with `<|assistant_end|>` under mask 0, targets -1 wherever the mask is 0
(the prompt, the calculator's forced output, the padding). The engine leaves the stop token out
of its sequences, so, as in the original, RL never trains on a stop token. The rows go through
the model `--device-batch-size` at a time; each pass's loss -sum(logp * advantage) is divided by
that pass's own count of trained tokens, by the question's number of passes and by the questions
per rank (`pass_loss`). No KL term, no PPO clipping. LR: `--init-lr-frac` (0.05) x each group's
base LR, linear to 0; no clip, no ramp.

Evaluation (`evaluate_pass_at_k`), at step 0 and every `--eval-every` steps as in the original,
and always at the end: `--eval-samples` (8) samples at temperature 1.0 of each of the first
`--eval-examples` (400) GSM8K test questions, with the training top-k and token budget (the
original's eval defaults are the same 50 and 256); `gsm8k/pass@k` for k = 1..eval_samples is the
fraction of questions with a correct answer among their first k samples, with `gsm8k/pass@k/items`
and `gsm8k/pass@k/ci95`, each sent as an `eval` event and kept in the metrics (the report card
shows them). `--save-every N` keeps the latest weights and optimizer state in `OUT.resume`.
Progress events carry the policy-gradient loss; `eval` events also the mean reward of each step;
`finished` names `OUT` as an `rl` version.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from nanochat.engine import Engine, row_seed
from nanochat.report import ci95
from nanochat.stages.cli import build_meta, log, run_stage
from nanochat.stages.events import EventEmitter
from nanochat.stages.options import ChatRlOptions
from nanochat.stages.train_loop import (
    ProgressMeter,
    StepTimer,
    TrainingRun,
    all_reduce_sum,
    linear_decay,
    load_model,
    optimizer_step,
    resumable_due,
    save_resumable,
    scale_initial_lr,
    setup,
    single_input,
)
from nanochat.tasks.gsm8k import GSM8K

# The original measures pass@k on samples at temperature 1.0, whatever temperature trains.
EVAL_TEMPERATURE = 1.0


def sample_rows(
    engine: Engine,
    prompt: list[int],
    count: int,
    batch_size: int,
    max_tokens: int,
    temperature: float,
    top_k: int | None,
    seed: int,
) -> tuple[list[list[int]], list[list[int]]]:
    """`count` completions of one prompt, at most `batch_size` rows per engine batch: sequences
    (prompt + generated, the stop token left out) and masks (1 = sampled, 0 = prompt or forced).

    The engine seeds a batch's rows from the batch seed, so batch c gets its own, row_seed(seed, c):
    two batches of one seed would repeat each other's samples."""
    sequences: list[list[int]] = []
    masks: list[list[int]] = []
    for chunk, start in enumerate(range(0, count, batch_size)):
        seqs, row_masks = engine.generate_batch(
            prompt,
            num_samples=min(batch_size, count - start),
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            seed=row_seed(seed, chunk),
        )
        sequences += seqs
        masks += row_masks
    return sequences, masks


def training_rows(sequences: list[list[int]], masks: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (rows, longest - 1) of one question's samples: each row padded to the
    longest with `pad` under mask 0; inputs = ids[:, :-1], targets = ids[:, 1:] with -1 wherever
    the target's mask is 0, so the prompt, the forced tokens and the padding are never trained."""
    width = max(len(s) for s in sequences)
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences], dtype=torch.long)
    keep = torch.tensor([m + [0] * (width - len(m)) for m in masks], dtype=torch.bool)
    return ids[:, :-1], torch.where(keep[:, 1:], ids[:, 1:], -1)


def pass_loss(nll: torch.Tensor, targets: torch.Tensor, advantages: torch.Tensor, divisor: int) -> torch.Tensor:
    """The policy-gradient loss of one forward pass: sum(-logp * advantage) over its trained tokens,
    divided by its own count of trained tokens (at least 1) and by `divisor` (the original's
    passes per question x questions per rank). `nll` is the model's per-token -logp, 0 where the
    target is -1."""
    num_valid = (targets >= 0).sum().clamp(min=1)
    return (nll * advantages[:, None]).sum() / (num_valid * divisor)


def policy_gradient_backward(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    batch_size: int,
    questions: int,
    device: torch.device,
    ctx: contextlib.AbstractContextManager,
) -> float:
    """Backpropagate one question's rows, `batch_size` rows per pass (`pass_loss` each, with
    `questions` the questions per rank); returns the sum of the passes' losses."""
    num_passes = -(-len(inputs) // batch_size)
    total = 0.0
    for start in range(0, len(inputs), batch_size):
        y = targets[start : start + batch_size].to(device)
        with ctx:
            nll = model(inputs[start : start + batch_size].to(device), y, loss_reduction="none")
        loss = pass_loss(nll, y, advantages[start : start + batch_size].to(device), num_passes * questions)
        loss.backward()
        total += loss.item()
    return total


def pass_at_k_counts(outcomes: list[list[bool]], k_max: int) -> list[int]:
    """For k = 1..k_max: how many questions have a correct answer among their first k samples."""
    return [sum(any(correct[:k]) for correct in outcomes) for k in range(1, k_max + 1)]


def pass_at_k_metrics(counts: list[float], questions: int) -> dict[str, float | int]:
    """`gsm8k/pass@k` (counts[k-1] / questions) with its `/items` and `/ci95` for each k."""
    metrics: dict[str, float | int] = {}
    for k, count in enumerate(counts, start=1):
        name = f"gsm8k/pass@{k}"
        metrics[name] = count / questions
        metrics[f"{name}/items"] = questions
        metrics[f"{name}/ci95"] = ci95(metrics[name], questions)
    return metrics


def evaluate_pass_at_k(
    engine: Engine, test: GSM8K, options: ChatRlOptions, rank: int, world: int
) -> dict[str, float | int]:
    """pass@1..pass@eval_samples over the first eval_examples test questions, summed over ranks
    (rank r takes questions r, r + world, ...). Question i is seeded from i alone, as the
    original seeds every evaluation alike: two evaluations differ by the model, not by the draw."""
    tokenizer = engine.tokenizer
    outcomes = []
    for i in range(rank, min(len(test), options.eval_examples), world):
        conversation = test[i]
        prompt = tokenizer.render_for_completion(conversation)
        sequences, _ = sample_rows(
            engine,
            prompt,
            options.eval_samples,
            options.device_batch_size,
            options.max_new_tokens,
            EVAL_TEMPERATURE,
            options.top_k or None,
            row_seed(options.seed, i),
        )
        outcomes.append([test.evaluate(conversation, tokenizer.decode(s[len(prompt) :])) for s in sequences])
    *counts, questions = all_reduce_sum(*pass_at_k_counts(outcomes, options.eval_samples), len(outcomes))
    return pass_at_k_metrics(counts, int(questions))


def chat_rl(options: ChatRlOptions, emitter: EventEmitter) -> tuple[list[dict[str, str]], dict[str, Any]]:
    folder = single_input(options, "sft checkpoint")
    compute, ctx = setup(options)
    world = compute.world_size
    if options.examples_per_step % world:
        raise ValueError(f"examples_per_step {options.examples_per_step} must be a multiple of the world size {world}")
    ckpt = load_model(folder, compute)
    model, tokenizer = ckpt.model, ckpt.tokenizer
    train, test = GSM8K(options.data_dir, "train"), GSM8K(options.data_dir, "test")
    if not len(test):
        raise ValueError("GSM8K test has no questions to measure pass@k on")
    steps = (
        options.num_iterations
        if options.num_iterations > 0
        else len(train) // options.examples_per_step * options.num_epochs
    )
    if steps < 1:
        raise ValueError(f"{len(train)} GSM8K questions give no step of {options.examples_per_step}")
    optimizers = model.setup_optimizers()
    scale_initial_lr(optimizers, options.init_lr_frac)
    engine = Engine(model, tokenizer)
    run = TrainingRun(
        "chat_rl",
        "rl",
        options,
        emitter,
        compute,
        ctx,
        model,
        tokenizer,
        optimizers,
        meter=ProgressMeter(steps, None, None, world),
        history={"train_loss": [], "reward": [], "gsm8k_pass_at_k": []},
    )
    log(f"rl: {steps} steps of {options.examples_per_step} questions x {options.num_samples} samples")

    for step in range(steps):
        if options.eval_every > 0 and step % options.eval_every == 0:
            evaluate(run, engine, test, step)
        if resumable_due(options.save_every, step, 0, last=False):
            meta = build_meta("chat_rl", options, "rl", step, run.metrics)
            save_resumable(options.out, model, tokenizer, meta, optimizers, {"step": step}, emitter, step)
        train_step(run, engine, train, step, steps)
    evaluate(run, engine, test, steps)
    metrics = {
        "steps": steps,
        "train_seconds": round(run.meter.train_seconds, 2),
        "mean_reward": sum(r for _, r in run.history["reward"]) / len(run.history["reward"]),
    }
    return run.finish(steps, metrics), run.metrics


def evaluate(run: TrainingRun, engine: Engine, test: GSM8K, step: int) -> None:
    """pass@k at `step`: into the metrics and the history, one `eval` event per number."""
    options = run.options
    run.model.eval()
    passes = evaluate_pass_at_k(engine, test, options, run.compute.rank, run.compute.world_size)
    run.metrics.update(passes)
    scores = [passes[f"gsm8k/pass@{k}"] for k in range(1, options.eval_samples + 1)]
    run.history["gsm8k_pass_at_k"].append([step, scores])
    for name, value in passes.items():
        run.emitter.eval(name, value, run.version)
    log(
        f"step {step}: GSM8K "
        + ", ".join(f"pass@{k} {v:.4f}" for k, v in enumerate(scores, start=1))
        + f" ({passes['gsm8k/pass@1/items']} questions x {options.eval_samples} samples at T={EVAL_TEMPERATURE})"
    )


def train_step(run: TrainingRun, engine: Engine, train: GSM8K, step: int, steps: int) -> None:
    """One REINFORCE step: this rank's questions sampled, rewarded and backpropagated
    (`question_backward`), the LR decaying linearly to 0; then the loss and mean reward over
    every rank, as a progress and a `mean_reward` event."""
    options, rank, world = run.options, run.compute.rank, run.compute.world_size
    per_rank = options.examples_per_step // world
    with StepTimer(run.compute.device) as timer:
        total_loss, rewards_sum, tokens = 0.0, 0.0, 0
        indices = [(step * options.examples_per_step + rank + k * world) % len(train) for k in range(per_rank)]
        for index in indices:
            loss, rewards, sampled = question_backward(run, engine, train, index, row_seed(options.seed, step))
            total_loss += loss
            rewards_sum += sum(rewards)
            tokens += sampled
        lr = linear_decay(step, steps)
        optimizer_step(run.model, run.optimizers, lr)
    loss_all, reward_all, tokens_all = all_reduce_sum(total_loss, rewards_sum, tokens)
    mean_reward = reward_all / (options.examples_per_step * options.num_samples)
    numbers = run.meter.update(step, loss_all / world, int(tokens_all), timer.seconds)
    run.record_step(step + 1, steps, lr, numbers, emit=True)
    run.history["reward"].append([step + 1, mean_reward])
    run.emitter.eval("mean_reward", mean_reward, run.version)
    log(f"step {step + 1}/{steps} pg loss {loss_all / world:+.4f} mean reward {mean_reward:.3f} lr {lr:.3f}")


def question_backward(
    run: TrainingRun, engine: Engine, train: GSM8K, index: int, step_seed: int
) -> tuple[float, list[float], int]:
    """Sample `--num-samples` answers to train question `index`, reward them, and backpropagate
    their advantages (reward - the question's mean); (loss, rewards, tokens sampled)."""
    options, tokenizer = run.options, run.tokenizer
    conversation = train[index]
    prompt = tokenizer.render_for_completion(conversation)
    run.model.eval()
    seqs, masks = sample_rows(
        engine,
        prompt,
        options.num_samples,
        options.device_batch_size,
        options.max_new_tokens,
        options.temperature,
        options.top_k or None,
        row_seed(step_seed, index),
    )
    rewards = [train.reward(conversation, tokenizer.decode(s[len(prompt) :])) for s in seqs]
    mean = sum(rewards) / len(rewards)
    # Padding only: it sits under mask 0, so it is never a target.
    inputs, targets = training_rows(seqs, masks, tokenizer.encode_special("<|assistant_end|>"))
    advantages = torch.tensor([r - mean for r in rewards], dtype=torch.float32)
    run.model.train()
    per_rank = options.examples_per_step // run.compute.world_size
    loss = policy_gradient_backward(
        run.model, inputs, targets, advantages, options.device_batch_size, per_rank, run.compute.device, run.ctx
    )
    return loss, rewards, sum(len(s) for s in seqs)


if __name__ == "__main__":
    run_stage("chat_rl", chat_rl)
