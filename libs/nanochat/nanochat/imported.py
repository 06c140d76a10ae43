"""What the importers share: our GPT built from foreign weights, the imported checkpoint, its registry version.

An import (`nanochat.hf_import`, `nanochat.original_import`) ends as an ordinary checkpoint folder
(`nanochat.checkpoint`: safetensors, config, our tokenizer format, meta, manifest), which inference
serves like any other, and optionally as a registry version: stage `sft` unless told, no parent
(the weights come from outside the registry), and the lineage in its meta: `"lineage": "imported
from <source>"` plus `imported_from` (the source, revision, format). The registry URL and token
default to $NANOCHAT_REGISTRY_URL and $NANOCHAT_REGISTRY_TOKEN; the registry-client package is
imported only when a version is registered.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from nanochat_contracts.stages import STAGES

from nanochat.checkpoint import VOCAB_ROWS, save_checkpoint
from nanochat.gpt import GPT, GPTConfig
from nanochat.hf_mapping import ArchitectureMismatch
from nanochat.tokenizer import Tokenizer

MODEL_STAGES = tuple(stage for stage in STAGES if stage != "tokenizer")


def expected_shapes(config: GPTConfig) -> dict[str, torch.Size]:
    """Our GPT's tensors for `config`, the vocab rows unpadded (as a checkpoint stores them)."""
    with torch.device("meta"):
        model = GPT(config, pad_vocab_world=1)
    shapes = {}
    for name, tensor in model.state_dict().items():
        shapes[name] = torch.Size((config.vocab_size, *tensor.shape[1:])) if name in VOCAB_ROWS else tensor.shape
    return shapes


def build_gpt(config: GPTConfig, state: dict[str, torch.Tensor], source: str) -> GPT:
    """Our GPT (CPU, fp32, eval) holding `state` (our names, vocab rows unpadded)."""
    want = expected_shapes(config)
    problems = [f"missing {n} {tuple(s)}" for n, s in want.items() if n not in state]
    problems += [f"unexpected {n} {tuple(t.shape)}" for n, t in state.items() if n not in want]
    problems += [
        f"{n} is {tuple(t.shape)}, our GPT's is {tuple(want[n])}"
        for n, t in state.items()
        if n in want and t.shape != want[n]
    ]
    if problems:
        shown = "; ".join(sorted(problems)[:12]) + (f"; and {len(problems) - 12} more" if len(problems) > 12 else "")
        raise ArchitectureMismatch(f"{source}: the architectures differ: {shown}")
    with torch.device("meta"):
        model = GPT(config, pad_vocab_world=1)
    weights = {}
    for name, tensor in state.items():
        tensor = tensor.detach().to("cpu", torch.float32)
        if name in VOCAB_ROWS:
            padded = torch.zeros((model.padded_vocab_size, tensor.shape[1]), dtype=torch.float32)
            padded[: tensor.shape[0]] = tensor
            tensor = padded
        weights[name] = tensor.contiguous()
    model.load_state_dict(weights, strict=True, assign=True)
    model.on_device_ready()
    return model.eval()


def check_stage(stage: str) -> str:
    if stage not in MODEL_STAGES:
        raise ValueError(f"stage must be one of {', '.join(MODEL_STAGES)}, got {stage!r}")
    return stage


def import_meta(source: str, made_by: str, stage: str, details: dict[str, Any], step: int | None = None) -> dict:
    """meta.json of an imported checkpoint: the lineage is where it came from."""
    return {
        "stage": check_stage(stage),
        "made_by": made_by,
        "step": step,
        "metrics": {},
        "parent": None,
        "lineage": f"imported from {source}",
        "imported_from": {"source": source, **details},
        "created": time.time(),
    }


def write_imported(out: str | os.PathLike, model: GPT, tokenizer: Tokenizer, meta: dict, replace: bool) -> Path:
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ArchitectureMismatch(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocab is {model.config.vocab_size}"
        )
    return save_checkpoint(out, model, tokenizer, meta, replace=replace)


def registry_client(url: str | None, token: str | None, cache_dir: str | None = None) -> Any:
    """A RegistryClient for `url` (default $NANOCHAT_REGISTRY_URL), with a clear error when absent."""
    try:
        from registry_client import RegistryClient
    except ImportError:
        raise ImportError("talking to the registry needs the registry-client package") from None
    url = url or os.environ.get("NANOCHAT_REGISTRY_URL")
    if not url:
        raise ValueError("no registry URL: pass --registry or set NANOCHAT_REGISTRY_URL")
    return RegistryClient(url, token=token or os.environ.get("NANOCHAT_REGISTRY_TOKEN"), cache_dir=cache_dir)


def registry_errors() -> tuple[type[Exception], ...]:
    """The registry client's exceptions, for a CLI to report as one line (none when it is absent)."""
    try:
        from registry_client import IntegrityError, RegistryError, UploadError
    except ImportError:
        return ()
    return (RegistryError, UploadError, IntegrityError)


def add_register_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="the checkpoint folder to write")
    p.add_argument("--replace", action="store_true", help="replace --out when it exists")
    p.add_argument("--register", metavar="NAME", help="also upload the checkpoint as a version of registry model NAME")
    p.add_argument("--registry", help="registry URL (default $NANOCHAT_REGISTRY_URL)")
    p.add_argument("--token", help="registry write token (default $NANOCHAT_REGISTRY_TOKEN)")


def register(folder: Path, args: argparse.Namespace) -> str:
    """Upload `folder` when --register was given; the line to print."""
    if not args.register:
        return f"wrote {folder}"
    with registry_client(args.registry, args.token) as rc:
        meta = json.loads((folder / "meta.json").read_text())
        info = rc.upload_folder(folder, args.register, stage=meta["stage"], step=meta.get("step"), meta=meta)
    return f"wrote {folder} and registered {info.name}:{info.version} ({info.stage}, {meta['lineage']})"
