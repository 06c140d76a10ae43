"""base_eval: the CORE metric of a base checkpoint on the eval bundle in `--data-dir`.

    torchrun --nproc_per_node 2 -m nanochat.stages.base_eval --init-from runs/base --data-dir data
    python -m nanochat.stages.base_eval --init-from runs/base --max-per-task 100

Items of each task are split across ranks (rank r scores r, r+W, ...) and the counts summed.
Metrics: `core`, its 95% interval `core/ci95`, `core/items` (all tasks) and `core/items_per_task`,
`core/offline` (1 when make_data generated the bundle: then CORE is not comparable to the real one),
and per task `core/<label>` (centred) and `core/<label>/accuracy`; as `eval`
events (with the `--input-version` measured) and in `finished`, which has no outputs: the trainer
patches the metrics onto the measured version. With `--out`, the metrics are also written to
`OUT/eval.json` (how the local speedrun hands them to `report`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from nanochat.common import Compute, compute_cleanup
from nanochat.core_eval import evaluate_core
from nanochat.gpt import GPT
from nanochat.report import centered_ci95, write_eval_result
from nanochat.stages.cli import log, run_stage
from nanochat.stages.events import EventEmitter
from nanochat.stages.options import BaseEvalOptions
from nanochat.stages.train_loop import all_reduce_sum, load_model, setup, single_input
from nanochat.tokenizer import Tokenizer


def model_scorer(
    model: GPT, compute: Compute, ctx: contextlib.AbstractContextManager, pad_id: int, batch_size: int = 8
):
    """The `core_eval.Scorer` of a model: per sequence, each next token's loss and the argmax."""

    @torch.no_grad()
    def score(seqs: list[list[int]]) -> list[tuple[Sequence[float], Sequence[int]]]:
        out: list[tuple[Sequence[float], Sequence[int]]] = []
        for start in range(0, len(seqs), batch_size):
            chunk = seqs[start : start + batch_size]
            width = max(len(s) for s in chunk)
            idx = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            for i, s in enumerate(chunk):
                idx[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            idx = idx.to(compute.device)
            with ctx:
                logits = model(idx)
            losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), idx[:, 1:], reduction="none")
            preds = logits[:, :-1].argmax(dim=-1)
            for i, s in enumerate(chunk):
                n = len(s) - 1
                out.append((losses[i, :n].tolist(), preds[i, :n].tolist()))
        return out

    return score


def core_metric(
    model: GPT,
    tokenizer: Tokenizer,
    compute: Compute,
    ctx: contextlib.AbstractContextManager,
    data_dir: str,
    bundle: str,
    max_per_task: int,
) -> dict[str, Any]:
    """CORE over every rank's share of the bundle's items. Items are cropped only past the model's
    rotary table (10x sequence_len), never to sequence_len: the original scores its models on
    whole items, and the reference CORE was measured so."""
    folder = Path(bundle) if Path(bundle).is_absolute() else Path(data_dir) / bundle
    if not (folder / "core.yaml").is_file():
        raise FileNotFoundError(f"no CORE bundle at {folder} (core.yaml missing); run make_data first")
    was_training = model.training
    model.eval()
    scorer = model_scorer(model, compute, ctx, tokenizer.bos_token_id)

    def reduce(counts: tuple[int, int]) -> tuple[int, int]:
        correct, total = all_reduce_sum(*counts)
        return int(correct), int(total)

    results = evaluate_core(
        folder, tokenizer, scorer, max_per_task, compute.rank, compute.world_size, model.rotary_len, reduce=reduce
    )
    model.train(was_training)
    return results


def base_eval(options: BaseEvalOptions, emitter: EventEmitter) -> tuple[list, dict[str, Any]]:
    folder = single_input(options, "base checkpoint")
    compute, ctx = setup(options)
    ckpt = load_model(folder, compute)
    results = core_metric(
        ckpt.model, ckpt.tokenizer, compute, ctx, options.data_dir, options.bundle, options.max_per_task
    )
    version = options.input_version[0] if options.input_version else None
    tasks = results["tasks"].values()
    metrics: dict[str, Any] = {
        "core": results["core"],
        "core/items": sum(t["items"] for t in tasks),
        "core/items_per_task": max((t["items"] for t in tasks), default=0),
        "core/ci95": centered_ci95([(t["accuracy"], t["items"], t["random_baseline"] / 100) for t in tasks]),
        "core/offline": int(results["offline"]),
    }
    for label, task in results["tasks"].items():
        metrics[f"core/{label}"] = task["centered"]
        metrics[f"core/{label}/accuracy"] = task["accuracy"]
        log(f"{label:>24}: accuracy {task['accuracy']:.4f} centred {task['centered']:+.4f} ({task['items']} items)")
    for name, value in metrics.items():
        emitter.eval(name, value, version)
    log(
        f"CORE {results['core']:.4f} ± {metrics['core/ci95']:.4f}" + (" (offline bundle)" if results["offline"] else "")
    )
    if options.out and compute.is_master:
        write_eval_result(options.out, "base_eval", options, metrics)
    compute_cleanup()
    return [], metrics


if __name__ == "__main__":
    run_stage("base_eval", base_eval)
