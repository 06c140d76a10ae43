"""Hugging Face round trip timings: export a random model, load it with transformers, import it back.

    uv run python bench/hf.py [--depth 12] [--vocab 8192] [--work DIR]

The tokenizer is trained on transformers' own modeling files to `--vocab` ids (the vocab the
model gets); the model is `GPTConfig.from_depth(depth)` with noise on every weight. Rows: the
tokenizer's conversion to tokenizer.json, the export (with its check: transformers loads the folder
back and scores a probe), `from_pretrained`, the import (with its own check), and the largest
logit difference of transformers' model from ours on a 256-token batch. Prints a table and writes
bench/results/hf.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
import transformers
from nanochat.checkpoint import load_checkpoint, save_checkpoint
from nanochat.gpt import GPT, GPTConfig
from nanochat.hf_export import export_checkpoint
from nanochat.hf_import import import_hf
from nanochat.hf_tokenizer import to_hf_tokenizer
from nanochat.tokenizer import Tokenizer
from transformers import NanoChatForCausalLM

RESULTS = Path(__file__).parent / "results"


def timed(rows: list[tuple[str, float]], label: str, fn):
    start = time.perf_counter()
    value = fn()
    rows.append((label, time.perf_counter() - start))
    return value


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--work", default=None)
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-hf-"))
    texts = [
        f.read_text(errors="replace") for f in sorted(Path(transformers.__file__).parent.glob("models/*/modeling_*.py"))
    ]
    tok = Tokenizer.train_from_iterator(texts, vocab_size=args.vocab)
    config = GPTConfig.from_depth(args.depth, tok.vocab_size, sequence_len=1024)
    torch.manual_seed(0)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    save_checkpoint(work / "ckpt", model, tok, {"stage": "sft", "made_by": "bench"})
    rows: list[tuple[str, float]] = []
    timed(rows, "tokenizer.json conversion", lambda: to_hf_tokenizer(tok))
    timed(rows, "export (checked)", lambda: export_checkpoint(work / "ckpt", work / "hf", replace=True))
    hf = timed(rows, "from_pretrained", lambda: NanoChatForCausalLM.from_pretrained(work / "hf", dtype=torch.float32))
    timed(rows, "import (checked)", lambda: import_hf(str(work / "hf"), work / "back", replace=True))
    ids = torch.randint(0, tok.vocab_size, (1, 256))
    with torch.no_grad():
        diff = float((hf.eval()(ids).logits - load_checkpoint(work / "ckpt").model(ids)).abs().max())
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
        "depth": args.depth,
        "vocab": tok.vocab_size,
        "parameters": model.num_params(),
        "seconds": dict(rows),
        "max_logit_diff": diff,
    }
    for label, seconds in rows:
        print(f"{label:28s} {seconds:8.2f} s")
    print(f"{'max |logit diff|':28s} {diff:.2e}  ({result['parameters']:,} parameters, vocab {tok.vocab_size})")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "hf.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
