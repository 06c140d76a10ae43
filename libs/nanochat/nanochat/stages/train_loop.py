"""What the model stages share: runtime set-up, schedules, the progress meter, bits-per-byte,
resumable state and the per-step bookkeeping of a training loop.

Each stage (`base_train`, `mid_train`, `chat_sft`, `chat_rl`, the evals) stays readable top to
bottom and calls these small pieces:
- `setup(options)`: device, dtype, process group and seed (CUDA bf16 + NCCL, else CPU fp32 + gloo);
  returns the `Compute` record and the forward-pass context (autocast or nothing).
- schedules: `warmdown_lr(progress, ...)` (constant, then linear warm-down), `linear_decay`,
  `muon_momentum(step)` (0.85 -> 0.95 over 300 steps), `set_lr`, `set_momentum`.
- `ProgressMeter`: debiased EMA of the loss, tokens/s over every token of a step, MFU, ETA.
- `TrainingForward(model, mode, device)`: the training steps' model call, `torch.compile`d per
  `--compile` (auto: on CUDA; on CPU when the second step's time says the run wins it back).
- `evaluate_bpb(model, batches, token_bytes, ctx)`: bits per byte, summed over every rank.
- `base_samples(model, tokenizer)`: greedy completions of the original's seven fixed prompts
  (base_train at the end and every `--sample-every` steps, base_loss; the report prints them).
- `save_resumable` / `load_resumable`: write and read the resumable checkpoint (`OUT.resume`,
  beside `--out`; `nanochat.stages.options.resume_dir`) with per-rank optimizer state, loader
  position, step and RNG (via `nanochat.checkpoint`).
- the steps every training loop takes: `train_optimizers` (the options' LRs),
  `accumulate_gradients` (forward and backward over the micro-batches of a step),
  `optimizer_step` (LR, momentum, clip, step, zero the gradients), and `TrainingRun`, what a loop
  carries from step to step: its evaluations recorded (`record_eval`), each step's curve point and
  progress event (`record_step`), the periodic resumable save (`save_if_due`) and the final folder
  (`finish`).

Not a stage itself; the stages' docstrings say how to run them.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from nanochat import optim
from nanochat.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from nanochat.common import Compute, compute_cleanup, compute_init
from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import Muon
from nanochat.stages.cli import build_meta, log
from nanochat.stages.events import EventEmitter
from nanochat.stages.options import RuntimeOptions, StageOptions, TrainOptions, resume_dir
from nanochat.tokenizer import Tokenizer

H100_BF16_FLOPS = 989e12
PEAK_FLOPS_ENV = "NANOCHAT_PEAK_FLOPS"
MOMENTUM_RAMP_STEPS = 300
BASE_PROMPTS = (
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
)
SAMPLE_TOKENS = 16
# torch.compile on CPU, measured on a 2-core AMD EPYC (avx512_bf16), depth 4, B8 x T256 fp32:
# fwd+bwd 414 -> 314 ms (a 24% saving) after 36 s of compiling. `--compile auto` uses a lower
# gain and a higher cost than that, so it compiles only where the run clearly wins.
CPU_COMPILE_GAIN = 0.2
CPU_COMPILE_SECONDS = 60.0


# ---- runtime --------------------------------------------------------------------------------


def setup(options: RuntimeOptions) -> tuple[Compute, contextlib.AbstractContextManager]:
    """Start the runtime: the device/process group, the seed, and the forward context."""
    compute = compute_init(None if options.device == "auto" else options.device, seed=options.seed)
    if options.dtype == "bfloat16" or (options.dtype == "auto" and compute.device.type == "cuda"):
        ctx: contextlib.AbstractContextManager = torch.autocast(device_type=compute.device.type, dtype=torch.bfloat16)
    else:
        ctx = contextlib.nullcontext()
    log(
        f"device {compute.device}, rank {compute.rank}/{compute.world_size}, "
        f"autocast {'bf16' if not isinstance(ctx, contextlib.nullcontext) else 'off (fp32)'}"
    )
    return compute, ctx


def single_input(options: StageOptions, what: str) -> Path:
    """The one `--init-from` folder a stage reads, with a clear error otherwise."""
    if len(options.init_from) != 1:
        raise ValueError(f"--init-from must name exactly one {what} folder, got {len(options.init_from)}")
    folder = Path(options.init_from[0])
    if not folder.is_dir():
        raise FileNotFoundError(f"--init-from {folder} does not exist")
    return folder


def new_model(config: GPTConfig, compute: Compute) -> GPT:
    """A freshly initialised model on the compute device (built on meta, allocated once)."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=compute.device)
    model.init_weights()
    return model


def load_model(folder: str | os.PathLike, compute: Compute) -> Checkpoint:
    """A checkpoint folder (verified) loaded onto the compute device, in training mode."""
    ckpt = load_checkpoint(folder, device=compute.device)
    if ckpt.tokenizer is None:
        raise ValueError(f"checkpoint {folder} carries no tokenizer/ folder")
    ckpt.model.train()
    return ckpt


def all_reduce_sum(*values: float | torch.Tensor) -> list[float]:
    """Sum scalars over every rank (a no-op in one process)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        t = t.to(backend_device)
        dist.all_reduce(t)
    return t.cpu().tolist()


def any_rank(flag: bool) -> bool:
    """True when `flag` is true on any rank (ranks stop together, never leave one in a collective)."""
    return all_reduce_sum(float(flag))[0] > 0


# ---- schedules ------------------------------------------------------------------------------


def warmdown_lr(
    progress: float, warmup_ratio: float = 0.0, warmdown_ratio: float = 0.2, final_lr_frac: float = 0.0
) -> float:
    """LR multiplier at `progress` in [0, 1]: linear warm-up, constant, then linear warm-down
    to `final_lr_frac` over the last `warmdown_ratio` of the run."""
    if warmup_ratio > 0 and progress < warmup_ratio:
        return (progress + 1e-9) / warmup_ratio
    if warmdown_ratio > 0 and progress > 1 - warmdown_ratio:
        left = max(0.0, (1 - progress) / warmdown_ratio)
        return left + (1 - left) * final_lr_frac
    return 1.0


def linear_decay(step: int, total: int) -> float:
    """SFT and RL: 1 - step/total."""
    return 1.0 - step / max(1, total)


def muon_momentum(step: int) -> float:
    """Muon momentum ramped 0.85 -> 0.95 over the first 300 steps (base and mid)."""
    frac = min(step / MOMENTUM_RAMP_STEPS, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


def set_lr(optimizers: Sequence[torch.optim.Optimizer], multiplier: float) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * multiplier


def set_momentum(optimizers: Sequence[torch.optim.Optimizer], momentum: float) -> None:
    for opt in optimizers:
        if isinstance(opt, Muon):
            for group in opt.param_groups:
                group["momentum"] = momentum


def scale_initial_lr(optimizers: Sequence[torch.optim.Optimizer], frac: float) -> None:
    """SFT/RL start from a fraction of each group's base LR."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["initial_lr"] * frac
            group["lr"] = group["initial_lr"]


# ---- progress -------------------------------------------------------------------------------


def peak_flops(device: torch.device) -> float | None:
    """Peak FLOP/s of one device, the MFU denominator: the env override, else an H100's bf16
    dense peak on CUDA (the spec's reference); None on a CPU (MFU is then not reported)."""
    override = os.environ.get(PEAK_FLOPS_ENV)
    if override:
        try:
            return float(override)
        except ValueError:
            raise ValueError(f"{PEAK_FLOPS_ENV}={override!r} is not a number") from None
    return H100_BF16_FLOPS if device.type == "cuda" else None


class ProgressMeter:
    """Per-step numbers of the `progress` event."""

    def __init__(
        self,
        total_steps: int,
        flops_per_token: float | None,
        peak: float | None,
        world_size: int,
        ema_beta: float = 0.9,
        state: dict[str, Any] | None = None,
    ):
        self.total = total_steps
        self.flops_per_token = flops_per_token
        self.peak = peak * world_size if peak else None
        self.beta = ema_beta
        self.ema = state["ema"] if state else 0.0
        self.updates = state["updates"] if state else 0
        self.step_times: list[float] = []
        self.train_seconds = state["train_seconds"] if state else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema, "updates": self.updates, "train_seconds": self.train_seconds}

    def update(self, step: int, loss: float, tokens: int, seconds: float) -> dict[str, float | None]:
        """Record step `step` (0-based) that trained `tokens` tokens (all ranks) in `seconds`."""
        self.ema = self.beta * self.ema + (1 - self.beta) * loss
        self.updates += 1
        self.train_seconds += seconds
        self.step_times.append(seconds)
        tok_per_s = tokens / max(seconds, 1e-9)
        mfu = self.flops_per_token * tok_per_s / self.peak if self.peak and self.flops_per_token else None
        # The first steps include warm-up (allocations, autotuning); leave them out of the ETA.
        recent = self.step_times[2:] or self.step_times
        eta = (self.total - step - 1) * sum(recent) / len(recent)
        return {"loss": self.ema / (1 - self.beta**self.updates), "tok_per_s": tok_per_s, "mfu": mfu, "eta_s": eta}


class StepTimer:
    """Wall time of one step, synchronised on CUDA so queued kernels are counted."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> StepTimer:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t0


class TrainingForward:
    """The model call of the training steps, eager or `torch.compile`d (`--compile`).

    on: compiled from the first step. auto: compiled at once on CUDA (the original compiles its
    model, and its speedrun time counts on it); on CPU the first two steps run eager and the
    second one's time decides (the first carries one-time warm-up): compile when the remaining
    steps would save more (CPU_COMPILE_GAIN of each) than compiling costs (CPU_COMPILE_SECONDS). Only the training steps use it: evals, samples and
    checkpoints use the model itself, whose parameters the compiled module shares."""

    def __init__(self, model: GPT, mode: str, device: torch.device):
        self.model = model
        self.undecided = mode == "auto" and device.type == "cpu"
        self.eager_steps = 0
        self.forward = (
            torch.compile(model, dynamic=False) if mode == "on" or (mode == "auto" and device.type == "cuda") else model
        )

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.forward(x, y)

    @property
    def compiled(self) -> bool:
        return self.forward is not self.model

    def after_step(self, step_seconds: float, remaining_steps: int) -> None:
        """auto on CPU: after the second eager step, compile when the rest of the run wins the cost back.
        `step_seconds` is this rank's; the ranks' mean decides, reduced once, at the decision (every
        rank reaches it at the same step), so the other steps pay no collective for it."""
        if not self.undecided:
            return
        self.eager_steps += 1
        if self.eager_steps < 2 and remaining_steps > 0:
            return
        self.undecided = False
        total, ranks = all_reduce_sum(step_seconds, 1.0)
        step_seconds = total / ranks
        saving = CPU_COMPILE_GAIN * step_seconds * remaining_steps
        if saving > CPU_COMPILE_SECONDS:
            self.forward = torch.compile(self.model, dynamic=False)
        log(
            f"compile auto: {remaining_steps} steps of {step_seconds:.2f} s would save ~{saving:.0f} s against "
            f"~{CPU_COMPILE_SECONDS:.0f} s of compiling: {'compiling' if self.compiled else 'staying eager'}"
        )


# ---- evaluation -----------------------------------------------------------------------------


@torch.no_grad()
def evaluate_bpb(
    model: GPT,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    token_bytes: torch.Tensor,
    ctx: contextlib.AbstractContextManager,
) -> float:
    """Bits per byte: nats summed over targets with a byte length (specials and -1 excluded),
    divided by ln 2 times their bytes; summed over every rank's batches."""
    nats = torch.zeros((), dtype=torch.float64, device=token_bytes.device)
    nbytes = torch.zeros((), dtype=torch.float64, device=token_bytes.device)
    was_training = model.training
    model.eval()
    for x, y in batches:
        with ctx:
            loss = model(x, y, loss_reduction="none").view(-1)
        targets = y.reshape(-1)
        counted = token_bytes[targets.clamp(min=0)] * (targets >= 0)
        nats += (loss.double() * (counted > 0)).sum()
        nbytes += counted.double().sum()
    model.train(was_training)
    total_nats, total_bytes = all_reduce_sum(nats, nbytes)
    if total_bytes == 0:
        raise ValueError("no target bytes to evaluate bits-per-byte on (empty validation data?)")
    return total_nats / (math.log(2) * total_bytes)


@torch.no_grad()
def base_samples(model: GPT, tokenizer: Tokenizer, max_tokens: int = SAMPLE_TOKENS) -> list[dict[str, str]]:
    """Greedy completions of BASE_PROMPTS, each after `<|bos|>`: what the base model "knows".
    (The engine runs its forward passes under the device's autocast itself.)"""
    was_training = model.training
    model.eval()
    prompts = [[tokenizer.bos_token_id, *tokenizer.encode(p)] for p in BASE_PROMPTS]
    sequences, _ = Engine(model, tokenizer).generate_batch(prompts, max_tokens=max_tokens, temperature=0.0)
    model.train(was_training)
    return [
        {"prompt": text, "completion": tokenizer.decode(seq[len(prompt) :])}
        for text, prompt, seq in zip(BASE_PROMPTS, prompts, sequences)
    ]


def token_bytes_tensor(tokenizer: Tokenizer, device: torch.device) -> torch.Tensor:
    return torch.tensor(tokenizer.token_bytes(), dtype=torch.long, device=device)


def take(iterator: Iterator, n: int) -> Iterator:
    """At most n items of an iterator."""
    for _ in range(n):
        try:
            yield next(iterator)
        except StopIteration:
            return


# ---- checkpoints ----------------------------------------------------------------------------


def resumable_due(save_every: int, step: int, start: int, last: bool) -> bool:
    """Whether `step` gets a resumable checkpoint: every `save_every` steps, except the step the run
    started from (nothing new to save) and the last one (the final folder follows)."""
    return save_every > 0 and step % save_every == 0 and step not in (0, start) and not last


def loop_state(step: int, loader: Any, meter: Any, history: dict, metrics: dict) -> dict[str, Any]:
    """A training loop's own state in a resumable checkpoint: where the data and the meters stand."""
    return {
        "step": step,
        "loader": loader.state_dict(),
        "meter": meter.state_dict(),
        "history": history,
        "metrics": metrics,
    }


def save_resumable(
    out: str | os.PathLike,
    model: GPT,
    tokenizer: Tokenizer,
    meta: dict[str, Any],
    optimizers: Sequence[torch.optim.Optimizer],
    rank_state: dict[str, Any],
    emitter: EventEmitter,
    step: int,
) -> None:
    """Replace the resumable checkpoint of `out` with the state after `step` steps (collective)."""
    path = resume_dir(out)
    save_checkpoint(path, model, tokenizer, meta, optimizers, rank_state, replace=True)
    emitter.checkpoint(str(path), step)
    log(f"step {step}: resumable checkpoint saved to {path}")


def load_resumable(out: str | os.PathLike, compute: Compute) -> tuple[Checkpoint, Path]:
    """The model of the resumable checkpoint of `out`; its optimizer state, loader position and
    RNG come back with `nanochat.checkpoint.load_optimizer_state` once the optimizers exist."""
    path = resume_dir(out)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume: no resumable checkpoint at {path} (run with --save-every first)")
    return load_model(path, compute), path


def finish_output(
    out: str | os.PathLike, model: GPT, tokenizer: Tokenizer, meta: dict[str, Any], is_master: bool
) -> None:
    """Publish the final checkpoint folder (collective) and drop the resumable one."""
    save_checkpoint(out, model, tokenizer, meta)
    if is_master:
        shutil.rmtree(resume_dir(out), ignore_errors=True)


# ---- the steps of a training loop ------------------------------------------------------------


def train_optimizers(model: GPT, options: TrainOptions) -> list[torch.optim.Optimizer]:
    """The model's optimizers with the options' learning rates and weight decay."""
    return model.setup_optimizers(
        unembedding_lr=options.unembedding_lr,
        embedding_lr=options.embedding_lr,
        matrix_lr=options.matrix_lr,
        weight_decay=options.weight_decay,
    )


def accumulate_gradients(
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    accum: int,
    ctx: contextlib.AbstractContextManager,
) -> float:
    """Forward and backward over the `accum` micro-batches of one step, each loss scaled by
    1/accum so the gradients are the step's mean; returns this rank's mean loss."""
    total_loss = 0.0
    for x, y in batches:
        with ctx:
            loss = forward(x, y)
        (loss / accum).backward()
        total_loss += loss.item() / accum
    return total_loss


def optimizer_step(
    model: GPT,
    optimizers: Sequence[torch.optim.Optimizer],
    lr: float,
    momentum: float | None = None,
    grad_clip: float | None = None,
) -> None:
    """Set the step's LR multiplier (and Muon momentum), clip, step, and drop the gradients."""
    set_lr(optimizers, lr)
    if momentum is not None:
        set_momentum(optimizers, momentum)
    optim.step(optimizers, grad_clip)
    model.zero_grad(set_to_none=True)


def final_train_loss(history: dict[str, list]) -> float | None:
    return history["train_loss"][-1][1] if history["train_loss"] else None


@dataclass
class TrainingRun:
    """What a training stage's loop carries from step to step: the model and its optimizers,
    where the data and the meters stand (`loader`, `meter`, `history`, `metrics`, all restored by
    `--resume`), and where its events go. The stage's own steps take it whole."""

    stage: str
    registry_stage: str
    options: Any
    emitter: EventEmitter
    compute: Compute
    ctx: contextlib.AbstractContextManager
    model: GPT
    tokenizer: Tokenizer
    optimizers: list[torch.optim.Optimizer]
    meter: ProgressMeter
    loader: Any = None
    history: dict[str, list] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    start: int = 0

    @property
    def version(self) -> str | None:
        """The input version the evaluations are reported against."""
        return self.options.input_version[0] if self.options.input_version else None

    def resumed_at(self, step: int) -> bool:
        """`step` is where a `--resume` run starts: the interrupted run evaluated it already."""
        return self.options.resume and step == self.start

    def record_eval(self, name: str, step: int, value: float, curve: str) -> None:
        """An evaluation at `step`: a point on `history[curve]`, the latest `metrics[name]`, an event."""
        self.history[curve].append([step, value])
        self.metrics[name] = value
        self.emitter.eval(name, value, self.version)

    def record_step(self, done: int, total: int, lr: float, numbers: dict[str, Any], emit: bool) -> None:
        """After `done` steps: the train-loss point, and (when `emit`) the `progress` event."""
        self.history["train_loss"].append([done, numbers["loss"]])
        if emit:
            self.emitter.progress(step=done, total=total, lr=lr, **numbers)

    def save_if_due(self, step: int, last: bool) -> None:
        """The periodic resumable checkpoint (`resumable_due`), with the loop's state."""
        if resumable_due(self.options.save_every, step, self.start, last):
            meta = build_meta(self.stage, self.options, self.registry_stage, step, self.metrics)
            state = loop_state(step, self.loader, self.meter, self.history, self.metrics)
            save_resumable(
                self.options.out, self.model, self.tokenizer, meta, self.optimizers, state, self.emitter, step
            )

    def finish(self, steps: int, metrics: dict[str, Any], **meta: Any) -> list[dict[str, str]]:
        """Publish the final folder (`metrics` added to the run's, `meta` beside its history),
        shut the runtime down; the stage's outputs for its `finished` event."""
        self.metrics.update(metrics)
        record = build_meta(self.stage, self.options, self.registry_stage, steps, self.metrics)
        record["history"] = self.history
        record.update(meta)
        finish_output(self.options.out, self.model, self.tokenizer, record, self.compute.is_master)
        compute_cleanup()
        return [{"path": str(self.options.out), "registry_stage": self.registry_stage}]
