"""Device, precision and torch.distributed helpers shared by the model, optimizers and stages.

- `compute_init()` reads torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE), starts the process
  group when there is more than one process (NCCL on CUDA, gloo on CPU) and returns a `Compute`
  record: device, dtype (bf16 autocast on CUDA, fp32 on CPU), rank, world size.
- `compute_cleanup()` tears the process group down again.
- `autocast(compute)` is the context every forward pass runs under: bf16 autocast on CUDA, a
  no-op on CPU, where everything stays fp32.
- `print0` prints on rank 0 only.

Run as `python -m nanochat.common` to print what this machine would use.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Compute:
    """Where and how this process computes."""

    device: torch.device
    dtype: torch.dtype
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_master(self) -> bool:
        return self.rank == 0


def dist_info() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) for a plain run."""
    try:
        rank = int(os.environ.get("RANK", 0))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        world_size = int(os.environ.get("WORLD_SIZE", 1))
    except ValueError as e:
        raise ValueError(f"RANK/LOCAL_RANK/WORLD_SIZE must be integers: {e}") from None
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad torchrun environment: RANK={rank} WORLD_SIZE={world_size}")
    return rank, local_rank, world_size


def world_size() -> int:
    """The size of the running process group, 1 when none is running."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def autodetect_device(device: str | None = None) -> torch.device:
    """CUDA when present (or asked for), else CPU."""
    if device is not None:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but torch sees no CUDA device")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_init(device: str | None = None, seed: int = 42) -> Compute:
    """Pick the device and start torch.distributed when torchrun launched several processes."""
    rank, local_rank, world = dist_info()
    dev = autodetect_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        # TF32 matmuls for the few fp32 ops left outside bf16 autocast.
        torch.backends.cuda.matmul.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
    torch.manual_seed(seed)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    return Compute(device=dev, dtype=dtype, rank=rank, local_rank=local_rank, world_size=world)


def compute_cleanup() -> None:
    """Destroy the process group if one is running."""
    if dist.is_available() and dist.is_initialized():
        # Without a barrier a rank that finishes first can tear gloo down under a slower one (SIGABRT).
        dist.barrier()
        dist.destroy_process_group()


def autocast(compute_or_device: Compute | torch.device | str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA, nothing on CPU (fp32 there)."""
    dev = compute_or_device.device if isinstance(compute_or_device, Compute) else torch.device(compute_or_device)
    if dev.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def print0(*args: object, **kwargs: object) -> None:
    """print() on rank 0 only."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs)


def cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where the file does not exist)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_bf16() -> bool:
    """True where the CPU has native bf16 matmul instructions (AVX512-BF16 or AMX-BF16)."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


if __name__ == "__main__":
    c = compute_init()
    print(f"device={c.device} dtype={c.dtype} rank={c.rank}/{c.world_size} cpu_bf16={cpu_has_bf16()}")
    compute_cleanup()
