"""base_loss: bits-per-byte of a base checkpoint on the train and validation splits.

    torchrun --nproc_per_node 2 -m nanochat.stages.base_loss --init-from runs/base --data-dir data
    python -m nanochat.stages.base_loss --init-from runs/base --split-tokens 65536

Each split is read with the pretraining loader (rank-strided row groups, BOS per document) for
`--split-tokens` tokens over all ranks. Metrics `train_bpb` and `val_bpb` go out as `eval` events
for the `--input-version` measured and in `finished` (no outputs; the trainer patches them onto
that version); with `--out` they are also written to `OUT/eval.json` for `report`, with the greedy
completions of the seven fixed prompts (`train_loop.BASE_PROMPTS`), which are also logged.
"""

from __future__ import annotations

from typing import Any

from nanochat.common import compute_cleanup
from nanochat.dataloader import pretrain_loader
from nanochat.report import write_eval_result
from nanochat.stages.cli import log, run_stage
from nanochat.stages.events import EventEmitter
from nanochat.stages.options import BaseLossOptions
from nanochat.stages.train_loop import (
    base_samples,
    evaluate_bpb,
    load_model,
    setup,
    single_input,
    take,
    token_bytes_tensor,
)


def base_loss(options: BaseLossOptions, emitter: EventEmitter) -> tuple[list, dict[str, Any]]:
    folder = single_input(options, "base checkpoint")
    compute, ctx = setup(options)
    ckpt = load_model(folder, compute)
    seq_len = min(options.max_seq_len, ckpt.config.sequence_len)
    steps = max(1, options.split_tokens // (options.device_batch_size * seq_len * compute.world_size))
    token_bytes = token_bytes_tensor(ckpt.tokenizer, compute.device)
    version = options.input_version[0] if options.input_version else None
    metrics: dict[str, Any] = {}
    for split in ("train", "val"):
        loader = pretrain_loader(
            ckpt.tokenizer,
            options.data_dir,
            split,
            options.device_batch_size,
            seq_len,
            compute.rank,
            compute.world_size,
            compute.device,
            loop=False,
        )
        bpb = evaluate_bpb(ckpt.model, take(loader, steps), token_bytes, ctx)
        metrics[f"{split}_bpb"] = bpb
        emitter.eval(f"{split}_bpb", bpb, version)
        log(f"{split} bpb: {bpb:.4f}")
    if compute.is_master:
        samples = base_samples(ckpt.model, ckpt.tokenizer)
        for sample in samples:
            log(f"sample: {sample['prompt']!r} -> {sample['completion']!r}")
        if options.out:
            write_eval_result(options.out, "base_loss", options, metrics, samples)
    compute_cleanup()
    return [], metrics


if __name__ == "__main__":
    run_stage("base_loss", base_loss)
