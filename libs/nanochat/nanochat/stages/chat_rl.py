"""chat_rl: reinforcement learning of an SFT checkpoint on GSM8K (on-policy REINFORCE).

    torchrun --nproc_per_node 2 -m nanochat.stages.chat_rl --init-from runs/sft --data-dir data --out runs/rl
    python -m nanochat.stages.chat_rl --preset tiny --init-from runs/sft --out runs/rl

Each step (NANOCHAT_SPEC "RL"): `--examples-per-step` GSM8K train questions over all ranks,
`--num-samples` completions each through the engine (temperature 1.0, top-k 50, up to
`--max-new-tokens` tokens, calculator tool on); reward = 1 for the exact final answer, else 0;
advantage = reward - the question's mean reward (no std division); the loss is the token-level
normalised policy gradient -sum(logp * advantage) / (sampled tokens), trained only on sampled
tokens: the prompt and the calculator's forced output tokens carry mask 0. No KL term, no PPO
clipping. LR: `--init-lr-frac` (0.05) x each group's base LR, linear to 0; no clip, no ramp.

`--eval-every N` measures pass@1 (greedy) on `--eval-examples` GSM8K test questions (also at the
end); `--save-every N` keeps the latest weights and optimizer state in `OUT.resume`. Progress
events carry the policy-gradient loss; `eval` events the mean reward of each step; `finished`
names `OUT` as an `rl` version.
"""

from __future__ import annotations

from typing import Any

import torch

from nanochat import optim
from nanochat.common import compute_cleanup
from nanochat.engine import Engine
from nanochat.stages.cli import build_meta, log, run_stage
from nanochat.stages.events import EventEmitter
from nanochat.stages.options import ChatRlOptions
from nanochat.stages.train_loop import (ProgressMeter, StepTimer, all_reduce_sum, finish_output, linear_decay,
                                        load_model, save_resumable, scale_initial_lr, set_lr, setup, single_input)
from nanochat.tasks.gsm8k import GSM8K


def rollouts(engine: Engine, conversations: list[dict], options: ChatRlOptions, seed: int, task: GSM8K,
             assistant_end: int) -> list[tuple[list[list[int]], list[list[int]], list[float]]]:
    """num_samples completions of each question, all in one engine batch: per question its token
    sequences, masks (1 = sampled) and rewards."""
    tokenizer = engine.tokenizer
    prompts = [tokenizer.render_for_completion(c) for c in conversations]
    sequences, masks = engine.generate_batch(prompts, num_samples=options.num_samples, max_tokens=options.max_new_tokens,
                                             temperature=options.temperature, top_k=options.top_k or None, seed=seed)
    out = []
    for q, (conversation, prompt) in enumerate(zip(conversations, prompts)):
        rows = range(q * options.num_samples, (q + 1) * options.num_samples)
        seqs, row_masks, rewards = [sequences[i] for i in rows], [masks[i] for i in rows], []
        for seq, mask in zip(seqs, row_masks):
            rewards.append(task.reward(conversation, tokenizer.decode(seq[len(prompt):])))
            # A row shorter than the budget ended on <|assistant_end|>: train on that choice too.
            if len(seq) - len(prompt) < options.max_new_tokens:
                seq.append(assistant_end)
                mask.append(1)
        out.append((seqs, row_masks, rewards))
    return out


def policy_gradient_backward(model: torch.nn.Module, sequences: list[list[int]], masks: list[list[int]],
                             advantages: list[float], pad: int, batch_size: int, scale: float,
                             device: torch.device, ctx: Any) -> float:
    """Backpropagate -sum(logp * advantage) / (sampled tokens) * scale; returns that loss."""
    width = max(len(s) for s in sequences) - 1
    inputs = torch.full((len(sequences), width), pad, dtype=torch.long)
    targets = torch.full((len(sequences), width), -1, dtype=torch.long)
    for i, (seq, mask) in enumerate(zip(sequences, masks)):
        ids = torch.tensor(seq)
        keep = torch.tensor(mask[1:], dtype=torch.bool)
        inputs[i, :len(seq) - 1] = ids[:-1]
        targets[i, :len(seq) - 1] = torch.where(keep, ids[1:], torch.tensor(-1))
    adv = torch.tensor(advantages, dtype=torch.float32)
    num_tokens = max(1, int((targets >= 0).sum()))
    total = 0.0
    for start in range(0, len(sequences), batch_size):
        x = inputs[start:start + batch_size].to(device)
        y = targets[start:start + batch_size].to(device)
        with ctx:
            nll = model(x, y, loss_reduction="none")  # -log p per token, 0 where ignored
        loss = (nll * adv[start:start + batch_size, None].to(device)).sum() / num_tokens * scale
        loss.backward()
        total += loss.item()
    return total


def chat_rl(options: ChatRlOptions, emitter: EventEmitter) -> tuple[list[dict[str, str]], dict[str, Any]]:
    folder = single_input(options, "sft checkpoint")
    compute, ctx = setup(options)
    rank, world = compute.rank, compute.world_size
    version = options.input_version[0] if options.input_version else None
    if options.examples_per_step % world:
        raise ValueError(f"examples_per_step {options.examples_per_step} must be a multiple of the world size {world}")
    ckpt = load_model(folder, compute)
    model, tokenizer = ckpt.model, ckpt.tokenizer
    train, test = GSM8K(options.data_dir, "train"), GSM8K(options.data_dir, "test")
    steps = options.num_iterations if options.num_iterations > 0 else \
        len(train) // options.examples_per_step * options.num_epochs
    if steps < 1:
        raise ValueError(f"{len(train)} GSM8K questions give no step of {options.examples_per_step}")
    per_rank = options.examples_per_step // world
    optimizers = model.setup_optimizers()
    scale_initial_lr(optimizers, options.init_lr_frac)
    engine = Engine(model, tokenizer)
    pad = assistant_end = tokenizer.encode_special("<|assistant_end|>")
    meter = ProgressMeter(steps, None, None, world)
    history: dict[str, list] = {"train_loss": [], "reward": [], "gsm8k": []}
    metrics: dict[str, Any] = {}
    log(f"rl: {steps} steps of {options.examples_per_step} questions x {options.num_samples} samples")

    @torch.no_grad()
    def pass_at_1(step: int) -> None:
        model.eval()
        items = [test[i] for i in range(rank, min(len(test), options.eval_examples), world)]
        correct = 0
        for conversation in items:
            prompt = tokenizer.render_for_completion(conversation)
            seqs, _ = engine.generate_batch(prompt, max_tokens=options.max_new_tokens, temperature=0.0)
            correct += test.evaluate(conversation, tokenizer.decode(seqs[0][len(prompt):]))
        correct, total = all_reduce_sum(correct, len(items))
        metrics["gsm8k_pass1"] = correct / max(total, 1)
        history["gsm8k"].append([step, metrics["gsm8k_pass1"]])
        emitter.eval("gsm8k_pass1", metrics["gsm8k_pass1"], version)
        log(f"step {step}: GSM8K pass@1 {metrics['gsm8k_pass1']:.4f} ({int(total)} questions)")

    for step in range(steps):
        if options.eval_every > 0 and step % options.eval_every == 0:
            pass_at_1(step)
        if options.save_every > 0 and step % options.save_every == 0 and step > 0:
            save_resumable(options.out, model, tokenizer, build_meta("chat_rl", options, "rl", step, metrics),
                           optimizers, {"step": step}, emitter, step)
        with StepTimer(compute.device) as timer:
            total_loss, rewards_sum, tokens = 0.0, 0.0, 0
            indices = [(step * options.examples_per_step + rank + k * world) % len(train) for k in range(per_rank)]
            model.eval()
            with torch.no_grad():
                groups = rollouts(engine, [train[i] for i in indices], options,
                                  options.seed + 1_000_003 * step + rank, train, assistant_end)
            model.train()
            for seqs, masks, rewards in groups:
                mean = sum(rewards) / len(rewards)
                total_loss += policy_gradient_backward(model, seqs, masks, [r - mean for r in rewards], pad,
                                                       options.device_batch_size, 1.0 / per_rank, compute.device, ctx)
                rewards_sum += sum(rewards)
                tokens += sum(len(s) for s in seqs)
            lr = linear_decay(step, steps)
            set_lr(optimizers, lr)
            optim.step(optimizers, None)
            model.zero_grad(set_to_none=True)
        loss_all, reward_all, tokens_all = all_reduce_sum(total_loss, rewards_sum, tokens)
        mean_reward = reward_all / (options.examples_per_step * options.num_samples)
        numbers = meter.update(step, loss_all / world, int(tokens_all), timer.seconds)
        history["train_loss"].append([step + 1, numbers["loss"]])
        history["reward"].append([step + 1, mean_reward])
        emitter.progress(step=step + 1, total=steps, lr=lr, **numbers)
        emitter.eval("mean_reward", mean_reward, version)
        log(f"step {step + 1}/{steps} pg loss {loss_all / world:+.4f} mean reward {mean_reward:.3f} lr {lr:.3f}")
    if options.eval_every > 0:
        pass_at_1(steps)
    metrics.update({"steps": steps, "train_seconds": round(meter.train_seconds, 2),
                    "mean_reward": sum(r for _, r in history["reward"]) / len(history["reward"])})
    meta = build_meta("chat_rl", options, "rl", steps, metrics)
    meta["history"] = history
    finish_output(options.out, model, tokenizer, meta, compute.is_master)
    compute_cleanup()
    return [{"path": str(options.out), "registry_stage": "rl"}], metrics


if __name__ == "__main__":
    run_stage("chat_rl", chat_rl)
