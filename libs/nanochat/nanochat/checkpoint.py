"""Save and load checkpoint folders (DESIGN.md "Artifacts"): safetensors and JSON only, no pickle.

A checkpoint is one folder:

    model.safetensors          weights; embedding and lm_head rows cut back to the real vocab
    config.json                the GPTConfig
    tokenizer/                 the tokenizer's own text format (when one is given)
    meta.json                  stage, step, metrics, ... (the caller's dict)
    optim/rank{r}.safetensors  optional, per rank: optimizer state tensors and RNG states
    optim/rank{r}.json         optional, per rank: optimizer hyper-parameters, world size and the
                               caller's resume state (loader position, step, ...)
    manifest.json              size and sha256 of every other file

`save_checkpoint` writes into a hidden temp folder that is renamed into place only when complete
(`nanochat.artifacts.atomic_folder`), so a crash leaves no half folder. Under torch.distributed it
is collective: call it on every rank; rank 0 writes the model files, every rank its optimizer
state (ranks other than 0 stage theirs beside the target, so the folder must be on a file system
all ranks share, as for the original), and rank 0 moves them in, writes the manifest and renames.

`load_checkpoint` verifies every file against the manifest before reading anything: a changed or
missing file is a ManifestError naming it. The model's vocab rows are padded again for the
running world size, so a checkpoint loads on any number of processes. `load_optimizer_state`
resumes the optimizers (same world size only, said clearly otherwise) and the RNG, and returns
the caller's resume state.

Quick check: `python -m nanochat.checkpoint FOLDER` verifies FOLDER and prints its config and meta.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from nanochat_contracts.manifest import ManifestError, verify_manifest, write_manifest
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nanochat.artifacts import atomic_folder
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
META_FILE = "meta.json"
TOKENIZER_DIR = "tokenizer"
OPTIM_DIR = "optim"
VOCAB_ROWS = ("transformer.wte.weight", "lm_head.weight")


@dataclass
class Checkpoint:
    model: GPT
    config: GPTConfig
    tokenizer: Tokenizer | None
    meta: dict[str, Any]


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _rank_world()[1] > 1:
        dist.barrier()


def _json_text(obj: Any, what: str) -> str:
    try:
        return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be JSON-serialisable: {e}") from e


def _optimizer_files(
    optimizers: Sequence[torch.optim.Optimizer], rank_state: dict | None, rank: int, world: int
) -> tuple[dict[str, torch.Tensor], str]:
    """Split the optimizers' state into tensors (safetensors) and everything else (JSON)."""
    tensors: dict[str, torch.Tensor] = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    described = []
    for i, opt in enumerate(optimizers):
        sd = opt.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for pid, state in sd["state"].items():
            for name, value in state.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"opt{i}.{pid}.{name}"] = value.detach().contiguous()
                else:
                    scalars.setdefault(str(pid), {})[name] = value
        described.append({"type": type(opt).__name__, "param_groups": sd["param_groups"], "scalars": scalars})
    info = {"rank": rank, "world_size": world, "optimizers": described, "rank_state": rank_state or {}}
    return tensors, _json_text(info, "optimizer state and rank_state")


def save_checkpoint(
    out: str | os.PathLike,
    model: GPT,
    tokenizer: Tokenizer | None = None,
    meta: dict[str, Any] | None = None,
    optimizers: Sequence[torch.optim.Optimizer] | None = None,
    rank_state: dict[str, Any] | None = None,
    replace: bool = False,
) -> Path:
    """Write the checkpoint folder `out` atomically; collective under torch.distributed."""
    out = Path(out)
    rank, world = _rank_world()
    meta_text = _json_text(meta or {}, "meta")
    staging = out.with_name(f".{out.name}.ranks")
    optim_files = _optimizer_files(optimizers, rank_state, rank, world) if optimizers else None
    # Checked on every rank (the folder is shared) so all raise together instead of some waiting.
    if out.exists() and not replace:
        raise FileExistsError(f"checkpoint folder {out} already exists (pass replace=True to overwrite)")
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    _barrier()
    if optim_files and rank > 0:
        tensors, text = optim_files
        save_file(tensors, str(staging / f"rank{rank}.safetensors"))
        (staging / f"rank{rank}.json").write_text(text)
    _barrier()
    if rank == 0:
        try:
            with atomic_folder(out, replace=replace) as tmp:
                save_file(_portable_state_dict(model), str(tmp / MODEL_FILE), metadata={"format": "nanochat-gpt"})
                (tmp / CONFIG_FILE).write_text(_json_text(model.config.to_dict(), "config"))
                (tmp / META_FILE).write_text(meta_text)
                if tokenizer is not None:
                    tokenizer.save(tmp / TOKENIZER_DIR)
                if optim_files:
                    optim_dir = tmp / OPTIM_DIR
                    optim_dir.mkdir()
                    tensors, text = optim_files
                    save_file(tensors, str(optim_dir / "rank0.safetensors"))
                    (optim_dir / "rank0.json").write_text(text)
                    for r in range(1, world):
                        for suffix in ("safetensors", "json"):
                            os.replace(staging / f"rank{r}.{suffix}", optim_dir / f"rank{r}.{suffix}")
                write_manifest(tmp)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    _barrier()
    return out


def _portable_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The weights with the vocab padding rows cut off, so any world size can load them."""
    vocab = model.config.vocab_size
    state = {}
    for name, tensor in model.state_dict().items():
        if name in VOCAB_ROWS:
            tensor = tensor[:vocab]
        state[name] = tensor.detach().contiguous()
    return state


def load_checkpoint(
    folder: str | os.PathLike, device: torch.device | str = "cpu", pad_vocab_world: int | None = None
) -> Checkpoint:
    """Verify every file of `folder`, then build the model on `device` (eval mode) and load it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    verify_manifest(folder)
    for required in (MODEL_FILE, CONFIG_FILE, META_FILE):
        if not (folder / required).is_file():
            raise ManifestError(f"{folder} is not a model checkpoint: it has no {required}")
    config = GPTConfig.from_dict(_read_json(folder / CONFIG_FILE))
    meta = _read_json(folder / META_FILE)
    device = torch.device(device)
    try:
        state = load_file(str(folder / MODEL_FILE), device=str(device))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{folder / MODEL_FILE}: not a readable safetensors file ({e})") from e
    with torch.device("meta"):
        model = GPT(config, pad_vocab_world=pad_vocab_world)
    # The model's weights are fp32 until on_device_ready() (a CUDA run saves its embedding in bf16).
    state = {name: t.float() if t.is_floating_point() else t for name, t in state.items()}
    for name in VOCAB_ROWS:
        if name in state:
            rows = state[name]
            if rows.shape[0] != config.vocab_size:
                raise ValueError(
                    f"{folder / MODEL_FILE}: {name} has {rows.shape[0]} rows, config says vocab {config.vocab_size}"
                )
            padded = torch.zeros((model.padded_vocab_size, *rows.shape[1:]), dtype=rows.dtype, device=device)
            padded[: rows.shape[0]] = rows
            state[name] = padded
    try:
        # assign: the loaded tensors become the weights; no to_empty(), whose empty_like on meta
        # imports torch's Python decompositions (seconds, once per process).
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{folder / MODEL_FILE} does not fit the model of {CONFIG_FILE}: {e}") from e
    model.on_device_ready()
    model.eval()
    tokenizer = Tokenizer.load(folder / TOKENIZER_DIR) if (folder / TOKENIZER_DIR).is_dir() else None
    return Checkpoint(model=model, config=config, tokenizer=tokenizer, meta=meta)


def load_optimizer_state(
    folder: str | os.PathLike, optimizers: Sequence[torch.optim.Optimizer], restore_rng: bool = True
) -> dict[str, Any]:
    """Load this rank's optimizer state (hash-checked) into `optimizers`; return its rank_state."""
    folder = Path(folder)
    rank, world = _rank_world()
    rels = [f"{OPTIM_DIR}/rank{rank}.safetensors", f"{OPTIM_DIR}/rank{rank}.json"]
    if not (folder / OPTIM_DIR).is_dir():
        raise FileNotFoundError(f"{folder} holds no optimizer state (not a resumable checkpoint)")
    saved_world = len(list((folder / OPTIM_DIR).glob("rank*.json")))
    if saved_world != world:
        raise ValueError(
            f"{folder} was saved by {saved_world} processes; resume needs the same world size, this run has {world}"
        )
    verify_manifest(folder, only=rels)  # the model files were checked at load
    info = _read_json(folder / rels[1])
    tensors = load_file(str(folder / rels[0]))
    described = info.get("optimizers", [])
    if info.get("world_size") != world or len(described) != len(optimizers):
        raise ValueError(
            f"{folder / rels[1]}: saved for world size {info.get('world_size')} with "
            f"{len(described)} optimizers; this run has world size {world} and {len(optimizers)}"
        )
    for i, (opt, saved) in enumerate(zip(optimizers, described)):
        if saved["type"] != type(opt).__name__:
            raise ValueError(f"optimizer {i} was a {saved['type']}, now a {type(opt).__name__}")
        state: dict[int, dict[str, Any]] = {}
        for pid, scalars in saved["scalars"].items():
            state.setdefault(int(pid), {}).update(scalars)
        prefix = f"opt{i}."
        for key, tensor in tensors.items():
            if key.startswith(prefix):
                pid, name = key[len(prefix) :].split(".", 1)
                state.setdefault(int(pid), {})[name] = tensor
        try:
            opt.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
        except (ValueError, KeyError) as e:
            raise ValueError(f"optimizer {i} state in {folder / rels[0]} does not fit this model: {e}") from e
    if restore_rng:
        torch.set_rng_state(tensors["rng.cpu"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"])
    return info.get("rank_state", {})


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m nanochat.checkpoint FOLDER")
    ckpt = load_checkpoint(sys.argv[1])
    print(
        json.dumps(
            {"config": ckpt.config.to_dict(), "meta": ckpt.meta, "parameters": ckpt.model.num_params()}, indent=2
        )
    )
