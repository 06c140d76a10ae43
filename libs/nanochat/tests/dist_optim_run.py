"""Train a tiny GPT for a few steps with Muon + AdamW and clipping; launched by test_optim.py.

Under torchrun (gloo, CPU, fp32) each of the N ranks takes its share of every step's global batch;
run as a plain function (`train(accumulate=N)`) one process takes the same global batch in N
micro-batches. Both must end with the same weights. The ranks then save one checkpoint together
(each with its own optimizer shard) into OUT_DIR/ckpt.

    torchrun --nproc_per_node 2 libs/nanochat/tests/dist_optim_run.py OUT_DIR
"""

import json
import sys
from pathlib import Path

import torch
from nanochat import optim
from nanochat.checkpoint import save_checkpoint
from nanochat.common import compute_cleanup, compute_init
from nanochat.gpt import GPT, GPTConfig
from safetensors.torch import save_file

STEPS = 5
GLOBAL_BATCH = 4
SEQ = 16
VOCAB = 100
GRAD_CLIP = 0.5  # small enough that every step clips


def build_model(world: int) -> GPT:
    torch.manual_seed(0)
    # Depth 3: 12 square matrices and 3 of each MLP shape, so Muon's last block per group is short.
    model = GPT(GPTConfig.from_depth(3, VOCAB, SEQ), pad_vocab_world=world)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, VOCAB, (STEPS, GLOBAL_BATCH, SEQ + 1), generator=g)
    return [(d[:, :-1], d[:, 1:]) for d in data]


def train(rank: int, world: int, accumulate: int) -> tuple[GPT, list, list[float]]:
    """`world` processes, each summing `accumulate` micro-batches of its share of the batch."""
    model = build_model(world)
    optimizers = model.setup_optimizers(ns_dtype=torch.float32)
    per_micro = GLOBAL_BATCH // (world * accumulate)
    norms = []
    for x, y in batches():
        for k in range(accumulate):
            start = (rank * accumulate + k) * per_micro
            loss = model(x[start : start + per_micro], y[start : start + per_micro])
            (loss / accumulate).backward()
        norms.append(optim.step(optimizers, grad_clip=GRAD_CLIP))
        model.zero_grad(set_to_none=True)
    return model, optimizers, norms


def main() -> None:
    out = Path(sys.argv[1])
    compute = compute_init(device="cpu")
    model, optimizers, norms = train(compute.rank, compute.world_size, accumulate=1)
    # Collective: every rank's optimizer shard lands in one folder.
    save_checkpoint(out / "ckpt", model, meta={"step": STEPS}, optimizers=optimizers, rank_state={"rank": compute.rank})
    if compute.is_master:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "weights.safetensors"))
        (out / "norms.json").write_text(json.dumps(norms))
    compute_cleanup()


if __name__ == "__main__":
    main()
