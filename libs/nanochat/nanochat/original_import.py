"""Import a checkpoint of the original nanochat (karpathy/nanochat) as our checkpoint.

    python -m nanochat.original_import ~/.cache/nanochat/chatsft_checkpoints/d20 --out ckpt/ [--step 650]
        [--tokenizer ~/.cache/nanochat/tokenizer] [--stage sft] [--register nanochat]

The original keeps a run's checkpoints in one folder: `model_NNNNNN.pt` (the model's state dict by
torch.save; a compiled model's names start with `_orig_mod.`), `meta_NNNNNN.json` (its
`model_config`: sequence_len, vocab_size, n_layer, n_head, n_kv_head, n_embd, plus the run's
settings), optimizer files we ignore, and a tokenizer folder with `tokenizer.pkl` (a pickled
tiktoken Encoding) and `token_bytes.pt`. The tokenizer is looked for in the checkpoint folder,
then in `<base>/tokenizer` of the original's `<base>/<kind>_checkpoints/<tag>` layout.

Nothing runs arbitrary code: the tensors load with `torch.load(weights_only=True)`, and
`tokenizer.pkl` with `EncodingUnpickler`, whose `find_class` admits tiktoken's `Encoding` only,
mapped to an inert record of the pickle's state (so not even tiktoken's own `__setstate__`, which
may fetch a registered encoding from the network, runs), and refuses any other global by name.
The newest step is taken unless `--step`; the stage is read from the original's folder name
(base/mid/chatsft/chatrl_checkpoints), else sft, unless `--stage`. A model with tensors or
settings ours lacks (the original's later value embeddings, per-layer scalars, sliding windows)
is refused with a message naming them.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import sys
from pathlib import Path
from typing import Any

import torch

from nanochat.checkpoint import VOCAB_ROWS
from nanochat.gpt import GPTConfig
from nanochat.hf_mapping import ArchitectureMismatch
from nanochat.imported import (
    add_register_args,
    build_gpt,
    check_stage,
    import_meta,
    register,
    registry_errors,
    write_imported,
)
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer

COMPILED_PREFIX = "_orig_mod."
STEP_FILE = re.compile(r"^model_(\d+)\.pt$")
CONFIG_KEYS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")
STAGE_OF_FOLDER = {
    "base_checkpoints": "base",
    "mid_checkpoints": "mid",
    "chatsft_checkpoints": "sft",
    "chatrl_checkpoints": "rl",
}


class UnsafePickle(pickle.UnpicklingError):
    """tokenizer.pkl asked for something other than a tiktoken Encoding."""


class EncodingState:
    """Stands in for tiktoken.core.Encoding while unpickling: keeps the state, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class EncodingUnpickler(pickle.Unpickler):
    """An Unpickler whose only global is tiktoken's Encoding (as an inert EncodingState)."""

    ALLOWED = {("tiktoken.core", "Encoding"): EncodingState}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[(module, name)]
        raise UnsafePickle(
            f"tokenizer.pkl refers to {module}.{name}; only tiktoken.core.Encoding may appear in a "
            "nanochat tokenizer.pkl, so it is refused unread"
        )


def load_tokenizer_pkl(path: str | os.PathLike) -> Tokenizer:
    """Our Tokenizer from the original's tokenizer.pkl, read by EncodingUnpickler."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = EncodingUnpickler(f).load()
    except UnsafePickle:
        raise
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a readable tokenizer pickle ({e})") from e
    state = obj.state if isinstance(obj, EncodingState) else None
    if not isinstance(state, dict):
        raise ValueError(
            f"{path}: holds {type(obj).__name__} with state {type(state).__name__}, not a tiktoken Encoding's dict"
        )
    ranks, pattern, specials = state.get("mergeable_ranks"), state.get("pat_str"), state.get("special_tokens")
    if not isinstance(pattern, str) or not isinstance(ranks, dict) or not isinstance(specials, dict):
        raise ValueError(f"{path}: an Encoding needs pat_str, mergeable_ranks and special_tokens")
    if not all(isinstance(k, bytes) and isinstance(v, int) for k, v in ranks.items()):
        raise ValueError(f"{path}: mergeable_ranks must map bytes to int")
    expected = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
    if specials != expected:
        raise ValueError(f"{path}: special tokens {specials} are not nanochat's {expected}")
    return Tokenizer(ranks, pattern)


def find_tokenizer(folder: Path, tokenizer_dir: str | os.PathLike | None) -> Path:
    candidates = [Path(tokenizer_dir)] if tokenizer_dir else [folder, folder.parent.parent / "tokenizer"]
    for candidate in candidates:
        if (candidate / "tokenizer.pkl").is_file():
            return candidate
    raise FileNotFoundError(f"no tokenizer.pkl in {' or '.join(map(str, candidates))}; pass --tokenizer DIR")


def latest_step(folder: Path) -> int:
    steps = sorted(int(m.group(1)) for p in folder.iterdir() if (m := STEP_FILE.match(p.name)))
    if not steps:
        raise FileNotFoundError(f"{folder} holds no model_NNNNNN.pt")
    return steps[-1]


def read_config(meta: dict[str, Any], where: Path) -> GPTConfig:
    """Our GPTConfig from the original's model_config; settings ours cannot run are named."""
    model_config = meta.get("model_config")
    if not isinstance(model_config, dict):
        raise ValueError(f"{where}: no model_config object")
    missing = [k for k in CONFIG_KEYS if k not in model_config]
    if missing:
        raise ValueError(f"{where}: model_config lacks {missing}")
    extra = {k: v for k, v in model_config.items() if k not in CONFIG_KEYS}
    # The original's later window_pattern: "L" is full attention, the only kind ours has.
    if isinstance(extra.get("window_pattern"), str) and set(extra["window_pattern"]) <= {"L"}:
        extra.pop("window_pattern")
    if extra:
        raise ArchitectureMismatch(f"{where}: the architectures differ: model_config settings ours lacks: {extra}")
    config = GPTConfig(**{k: model_config[k] for k in CONFIG_KEYS})
    config.validate()
    return config


def read_state(path: Path, config: GPTConfig) -> dict[str, torch.Tensor]:
    """The original's state dict by torch.load(weights_only=True), compiled names and vocab padding undone."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise ValueError(f"{path}: not a tensors-only torch file ({e})") from e
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors")
    state = {name.removeprefix(COMPILED_PREFIX): t for name, t in state.items()}
    for name in VOCAB_ROWS:
        # The original pads these rows up for its sharded optimizer; the padding is never used.
        if name in state and state[name].dim() == 2 and state[name].shape[0] > config.vocab_size:
            state[name] = state[name][: config.vocab_size]
    return state


def check_token_bytes(path: Path, tokenizer: Tokenizer) -> None:
    if not path.is_file():
        return
    token_bytes = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(token_bytes, torch.Tensor) or token_bytes.shape != (tokenizer.vocab_size,):
        shape = tuple(token_bytes.shape) if isinstance(token_bytes, torch.Tensor) else type(token_bytes).__name__
        raise ValueError(f"{path}: {shape} does not fit a tokenizer of {tokenizer.vocab_size} ids")


def import_original(
    folder: str | os.PathLike,
    out: str | os.PathLike,
    step: int | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    stage: str | None = None,
    replace: bool = False,
) -> Path:
    """Write our checkpoint folder of the original's checkpoint `folder` (at `step`) to `out`."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    if Path(out).exists() and not replace:
        raise FileExistsError(f"output folder {out} already exists (pass --replace to overwrite)")
    stage = check_stage(stage or STAGE_OF_FOLDER.get(folder.parent.name, "sft"))
    step = latest_step(folder) if step is None else step
    meta_path, model_path = folder / f"meta_{step:06d}.json", folder / f"model_{step:06d}.pt"
    for required in (meta_path, model_path):
        if not required.is_file():
            raise FileNotFoundError(f"{folder} has no {required.name}")
    try:
        original_meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_path}: not valid JSON ({e})") from e
    config = read_config(original_meta, meta_path)
    tok_dir = find_tokenizer(folder, tokenizer_dir)
    tokenizer = load_tokenizer_pkl(tok_dir / "tokenizer.pkl")
    check_token_bytes(tok_dir / "token_bytes.pt", tokenizer)
    model = build_gpt(config, read_state(model_path, config), str(model_path))
    source = f"original nanochat {folder.resolve()} step {step}"
    details = {"format": "nanochat-original", "path": str(folder.resolve()), "step": step, "meta": original_meta}
    return write_imported(out, model, tokenizer, import_meta(source, "original_import", stage, details, step), replace)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nanochat.original_import", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="the original's checkpoint folder (model_NNNNNN.pt, meta_NNNNNN.json)")
    p.add_argument("--step", type=int, help="which step (default: the newest)")
    p.add_argument("--tokenizer", help="folder with tokenizer.pkl and token_bytes.pt")
    p.add_argument("--stage", help="registry stage (default: from the folder name, else sft)")
    add_register_args(p)
    args = p.parse_args(argv)
    try:
        out = import_original(args.folder, args.out, args.step, args.tokenizer, args.stage, args.replace)
        print(register(out, args))
    except (ValueError, OSError, ImportError, pickle.UnpicklingError, *registry_errors()) as e:
        print(f"original_import: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
