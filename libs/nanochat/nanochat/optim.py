"""The optimizers of NANOCHAT_SPEC "Optimizers and schedule": AdamW and Muon, one process or many.

Both classes work alone and under torch.distributed; they look at the running process group
themselves (no separate Dist* classes, one code path for the maths):
- `AdamW` (embedding, lm_head): betas (0.8, 0.95), eps 1e-10, bias-corrected. With N processes
  it is ZeRO-2 style: each gradient is reduce-scattered along dim 0, each rank updates and keeps
  state for its slice only, then the slices are all-gathered (dim 0 must divide by N; the model
  pads its vocab rows for that).
- `Muon` (every matrix in the blocks): Nesterov momentum, then the update is orthogonalised by
  5 quintic Newton-Schulz steps and applied with lr * max(1, rows/cols)^0.5. Parameters are
  grouped by shape; same-shape matrices are stacked and orthogonalised in one batched call. With
  N processes, parameter i of a group is owned by rank i % N: per block of N parameters one
  reduce-scatter gives each owner its averaged gradient (a short last block is padded with zero
  buffers), the owner keeps the momentum and runs Newton-Schulz on the whole matrix, and an
  all-gather replicates the updated matrices.

Newton-Schulz precision: bf16 on CUDA; on a CPU bf16 only where it has bf16 instructions
(avx512_bf16 / amx_bf16 in /proc/cpuinfo), fp32 elsewhere, where bf16 is an order of magnitude
slower. Override with `Muon(..., ns_dtype=torch.float32)` or `NANOCHAT_NS_DTYPE=fp32|bf16`.

Take a step with `step(optimizers, grad_clip)`: it reduces every gradient first, clips by the
norm of the *averaged* gradient (each rank sums the squares of the parts it owns, one
all-reduce adds them up), then updates. Clipping by the global norm means N processes give the
same weights as 1 process with N-fold gradient accumulation, whether or not the clip triggers.
Gradients must be averaged over micro-batches by the caller (divide the loss by the
accumulation steps), as for any optimizer. `optimizer.step()` alone works too (no clipping).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist

from nanochat.common import cpu_has_bf16

NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_DTYPE_ENV = "NANOCHAT_NS_DTYPE"


def _dist() -> tuple[int, int]:
    """(rank, world_size) of the running process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def newton_schulz_dtype(device: torch.device | str) -> torch.dtype:
    """The Newton-Schulz dtype for `device`: the env override, else bf16 on CUDA or a bf16-capable CPU."""
    choice = os.environ.get(NS_DTYPE_ENV, "").strip().lower()
    if choice:
        table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}
        if choice not in table:
            raise ValueError(f"{NS_DTYPE_ENV}={choice!r}: use bf16 or fp32")
        return table[choice]
    if torch.device(device).type == "cuda" or cpu_has_bf16():
        return torch.bfloat16
    return torch.float32


def zeropower_via_newtonschulz5(G: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Approximately orthogonalise G (..., rows, cols): push every singular value towards ~1.

    Each step is X <- a X + (b A + c A^2) X with A = X X^T (X wide: rows <= cols). In fp32 a
    clearly wide X (cols >= GRAM_ASPECT * rows) takes the same iteration in Gram form instead."""
    a, b, c = NS_COEFFS
    X = G.to(dtype)
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    # Dividing by the Frobenius norm bounds the spectral norm by 1, where the iteration converges.
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    if dtype == torch.float32 and X.size(-1) >= GRAM_ASPECT * X.size(-2):
        X = _gram_newton_schulz(X, steps)
    else:
        batched = X.dim() == 3
        for _ in range(steps):
            A = X @ X.mT
            if batched:
                B = torch.baddbmm(A, A, A, beta=b, alpha=c)
                X = torch.baddbmm(X, B, X, beta=a, alpha=1.0)
            else:
                B = b * A + c * (A @ A)
                X = a * X + B @ X
    if tall:
        X = X.mT
    return X


# Every step multiplies X on the left by P = a I + b A + c A^2, a polynomial in X0 X0^T; so
# X_k = Q_k X0 with Q_k a rows x rows matrix, A_k = Q_k S Q_k^T (S = X0 X0^T) and Q_{k+1} = P_k Q_k.
# Only rows x rows products remain (17 of them for 5 steps, plus S and the final Q X0), against
# 5 * (2 rows^2 cols + rows^3) multiply-adds for the plain form: about 45% fewer for a 256 x 1024
# MLP matrix, and equal to it in exact arithmetic (fp32 agrees to ~1e-6). bf16 keeps the plain
# form, where the accumulated Q would lose too much precision.
GRAM_ASPECT = 1.5


def _gram_newton_schulz(X: torch.Tensor, steps: int) -> torch.Tensor:
    a, b, c = NS_COEFFS
    squeeze = X.dim() == 2
    if squeeze:
        X = X.unsqueeze(0)
    S = X @ X.mT
    Q = None
    for _ in range(steps):
        A = S if Q is None else Q @ S @ Q.mT
        P = torch.baddbmm(A, A, A, beta=b, alpha=c)
        P.diagonal(dim1=-2, dim2=-1).add_(a)
        Q = P if Q is None else P @ Q
    X = Q @ X
    return X.squeeze(0) if squeeze else X


class _Reducing(torch.optim.Optimizer, ABC):
    """The three phases `step()` runs: reduce the gradients, measure them, apply the update."""

    @abstractmethod
    def reduce_grads(self) -> None:
        """Average gradients over ranks into the parts this rank owns."""

    @abstractmethod
    def owned_grad_sq_norm(self) -> torch.Tensor:
        """Sum of squares of the averaged gradient parts this rank owns."""

    @abstractmethod
    def apply(self, clip_coef: torch.Tensor | float = 1.0) -> None:
        """Update the owned parts with gradients scaled by clip_coef, then replicate them."""

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        if closure is not None:
            raise ValueError("these optimizers take no closure")
        self.reduce_grads()
        self.apply(1.0)


class AdamW(_Reducing):
    """AdamW, sharded along dim 0 across ranks when a process group runs (ZeRO-2)."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.8, 0.95),
        eps: float = 1e-10,
        weight_decay: float = 0.0,
    ):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self._owned: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        world = _dist()[1]
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() == 0 or p.shape[0] % world:
                    raise ValueError(
                        f"sharded AdamW needs dim 0 divisible by the world size {world}; got shape "
                        f"{tuple(p.shape)} (pad the rows, as the model does for its vocab)"
                    )

    @torch.no_grad()
    def reduce_grads(self) -> None:
        rank, world = _dist()
        pending, self._owned = [], []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if world == 1:
                    self._owned.append((p, p.grad, p))
                    continue
                rows = p.shape[0] // world
                grad_slice = torch.empty_like(p.grad[:rows])
                pending.append(dist.reduce_scatter_tensor(grad_slice, p.grad, async_op=True))
                self._owned.append((p, grad_slice, p[rank * rows : (rank + 1) * rows]))
        for work in pending:
            work.wait()
        if world > 1:
            torch._foreach_div_([g for _, g, _ in self._owned], float(world))

    def owned_grad_sq_norm(self) -> torch.Tensor:
        return _sq_norm([g for _, g, _ in self._owned])

    @torch.no_grad()
    def apply(self, clip_coef: torch.Tensor | float = 1.0) -> None:
        rank, world = _dist()
        owned = {id(p): (g, s) for p, g, s in self._owned}
        gathers = []
        for group in self.param_groups:
            params = [p for p in group["params"] if id(p) in owned]
            if not params:
                continue
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            grads = [owned[id(p)][0] for p in params]
            # The shard is a view into the parameter on one process; a copy to gather from on many.
            shards = [owned[id(p)][1] if world == 1 else owned[id(p)][1].clone() for p in params]
            if not isinstance(clip_coef, float) or clip_coef != 1.0:
                torch._foreach_mul_(grads, clip_coef)
            exp_avgs, exp_avg_sqs, step_sizes, bias2_sqrts = [], [], [], []
            for p, g in zip(params, grads):
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(g)
                    state["exp_avg_sq"] = torch.zeros_like(g)
                state["step"] += 1
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                step_sizes.append(-lr / (1 - beta1 ** state["step"]))
                bias2_sqrts.append((1 - beta2 ** state["step"]) ** 0.5)
            if wd:
                torch._foreach_mul_(shards, 1 - lr * wd)
            torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
            denom = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_div_(denom, bias2_sqrts)
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(shards, exp_avgs, denom, step_sizes)
            if world > 1:
                gathers += [dist.all_gather_into_tensor(p, s, async_op=True) for p, s in zip(params, shards)]
        for work in gathers:
            work.wait()


class Muon(_Reducing):
    """Muon for 2D matrices: momentum, Newton-Schulz orthogonalisation, whole matrices per owner rank."""

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_dtype: torch.dtype | None = None,
    ):
        params = list(params)
        for p in params:
            if p.dim() != 2:
                raise ValueError(f"Muon takes 2D matrices only, got a parameter of shape {tuple(p.shape)}")
        # Group by shape (in first-seen order, identical on every rank) so matrices stack.
        shapes: dict[tuple[int, ...], list[torch.Tensor]] = {}
        for p in params:
            shapes.setdefault(tuple(p.shape), []).append(p)
        groups = [{"params": ps} for ps in shapes.values()]
        super().__init__(groups, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps))
        device = params[0].device if params else "cpu"
        self.ns_dtype = ns_dtype if ns_dtype is not None else newton_schulz_dtype(device)
        self._owned: list[list[tuple[torch.Tensor, torch.Tensor]]] = []

    @torch.no_grad()
    def reduce_grads(self) -> None:
        rank, world = _dist()
        pending, self._owned = [], []
        for group in self.param_groups:
            params = group["params"]
            if any(p.grad is None for p in params):
                raise ValueError("Muon needs a gradient for every matrix of a group (was backward run?)")
            owned = []
            if world == 1:
                owned = [(p, p.grad) for p in params]
            else:
                for start in range(0, len(params), world):
                    block = params[start : start + world]
                    inputs = [p.grad for p in block]
                    inputs += [torch.zeros_like(inputs[0])] * (world - len(block))
                    out = torch.empty_like(inputs[0])
                    pending.append(dist.reduce_scatter(out, inputs, async_op=True))
                    if rank < len(block):
                        owned.append((block[rank], out))
            self._owned.append(owned)
        for work in pending:
            work.wait()
        if world > 1:
            grads = [g for owned in self._owned for _, g in owned]
            if grads:
                torch._foreach_div_(grads, float(world))

    def owned_grad_sq_norm(self) -> torch.Tensor:
        return _sq_norm([g for owned in self._owned for _, g in owned])

    @torch.no_grad()
    def apply(self, clip_coef: torch.Tensor | float = 1.0) -> None:
        rank, world = _dist()
        for group, owned in zip(self.param_groups, self._owned):
            if owned:
                self._update(group, owned, clip_coef)
        if world == 1:
            return
        gathers = []
        for group in self.param_groups:
            params = group["params"]
            for start in range(0, len(params), world):
                block = params[start : start + world]
                outputs = [p.data for p in block] + [torch.empty_like(block[0]) for _ in range(world - len(block))]
                # A copy: the gather's input must not alias one of its outputs.
                mine = block[rank].data.clone() if rank < len(block) else torch.zeros_like(block[0])
                gathers.append(dist.all_gather(outputs, mine, async_op=True))
        for work in gathers:
            work.wait()

    def _update(
        self, group: dict, owned: Sequence[tuple[torch.Tensor, torch.Tensor]], clip_coef: torch.Tensor | float
    ) -> None:
        params = [p for p, _ in owned]
        grads = [g for _, g in owned]
        if not isinstance(clip_coef, float) or clip_coef != 1.0:
            torch._foreach_mul_(grads, clip_coef)
        bufs = []
        for p, g in owned:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(g)
            bufs.append(state["momentum_buffer"])
        momentum = group["momentum"]
        torch._foreach_lerp_(bufs, grads, 1 - momentum)
        if group["nesterov"]:
            torch._foreach_lerp_(grads, bufs, momentum)
            updates = grads
        else:
            updates = bufs
        ortho = zeropower_via_newtonschulz5(torch.stack(updates), group["ns_steps"], self.ns_dtype)
        rows, cols = params[0].shape
        scale = -group["lr"] * max(1.0, rows / cols) ** 0.5
        torch._foreach_add_(params, list(ortho.to(params[0].dtype).unbind(0)), alpha=scale)


def _sq_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Sum of squares in fp64: partial sums over different shardings then agree to the last fp32 bit."""
    if not tensors:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack([torch.linalg.vector_norm(t, dtype=torch.float64) for t in tensors]).square().sum()


@torch.no_grad()
def step(optimizers: Sequence[_Reducing], grad_clip: float | None = None) -> float | None:
    """Reduce, clip by the global norm of the averaged gradient (if grad_clip), update.

    Returns the gradient norm before clipping when grad_clip is set, else None.
    """
    if grad_clip is not None and grad_clip <= 0:
        raise ValueError(f"grad_clip must be positive (or None for no clipping), got {grad_clip}")
    for opt in optimizers:
        opt.reduce_grads()
    if grad_clip is None:
        for opt in optimizers:
            opt.apply(1.0)
        return None
    parts = [opt.owned_grad_sq_norm() for opt in optimizers]
    device = next((p.device for opt in optimizers for g in opt.param_groups for p in g["params"]), torch.device("cpu"))
    sq = torch.stack([x.to(device) for x in parts]).sum()
    if _dist()[1] > 1:
        dist.all_reduce(sq)
    norm = sq.sqrt()
    clip_coef = torch.clamp(grad_clip / (norm + 1e-6), max=1.0).float()
    for opt in optimizers:
        opt.apply(clip_coef)
    return float(norm)
