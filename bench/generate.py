"""Engine generation speed against the no-cache reference: tokens/s and time to first token.

    uv run python bench/generate.py [--depth 4] [--prompt-len 64] [--new-tokens 64] [--device cpu]

A randomly initialised (noise on every weight) model of the given depth and a 4,096-id
tokenizer trained on this package's own source; greedy decoding, 1 row and 8 rows (8 different
prompts of the same length). The engine prefills once with its KV cache and decodes one token
per row per step; the reference re-runs the whole sequence every step and takes the argmax.
Each setting is run `--repeats` times after a warm-up; the median is reported. tokens/s counts
generated tokens over the whole call, prefill included. Prints a table and writes
bench/results/generate.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import nanochat
import torch
from nanochat.common import autocast
from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer

RESULTS = Path(__file__).parent / "results"


def build(depth: int, vocab_size: int, sequence_len: int, device: torch.device) -> Engine:
    source = Path(nanochat.__file__).parent
    texts = [p.read_text(encoding="utf-8") for p in sorted(source.rglob("*.py"))]
    tok = Tokenizer.train_from_iterator(texts, vocab_size=vocab_size)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(GPTConfig.from_depth(depth, vocab_size, sequence_len))
    model.to_empty(device=device)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return Engine(model.eval(), tok)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_engine(engine: Engine, prompts: list[list[int]], new_tokens: int) -> tuple[float, float, int]:
    """(time to first token, total seconds, tokens generated) for one streamed greedy call."""
    device = engine.device
    sync(device)
    t0 = time.perf_counter()
    ttft, generated = 0.0, 0
    for i, (tokens, _) in enumerate(engine.generate(prompts, max_tokens=new_tokens, temperature=0.0)):
        if i == 0:
            sync(device)
            ttft = time.perf_counter() - t0
        generated += sum(t is not None for t in tokens)
    sync(device)
    return ttft, time.perf_counter() - t0, generated


@torch.no_grad()
def run_reference(engine: Engine, prompts: list[list[int]], new_tokens: int) -> tuple[float, float, int]:
    """The same greedy decoding without a cache: the whole sequence goes through every step."""
    device = engine.device
    seq = torch.tensor(prompts, dtype=torch.long, device=device)
    sync(device)
    t0 = time.perf_counter()
    ttft = 0.0
    for i in range(new_tokens):
        with autocast(device):
            logits = engine.model(seq)[:, -1]
        seq = torch.cat([seq, logits.argmax(dim=-1, keepdim=True)], dim=1)
        if i == 0:
            sync(device)
            ttft = time.perf_counter() - t0
    sync(device)
    return ttft, time.perf_counter() - t0, new_tokens * len(prompts)


def measure(fn, engine: Engine, prompts: list[list[int]], new_tokens: int, repeats: int) -> dict:
    fn(engine, prompts, new_tokens)  # warm-up
    runs = [fn(engine, prompts, new_tokens) for _ in range(repeats)]
    ttft = statistics.median(r[0] for r in runs)
    total = statistics.median(r[1] for r in runs)
    tokens = statistics.median(r[2] for r in runs)
    return {"ttft_ms": ttft * 1000, "seconds": total, "tokens": tokens, "tok_per_s": tokens / total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    engine = build(args.depth, args.vocab_size, args.prompt_len + args.new_tokens, device)
    first_regular = engine.tokenizer.vocab_size - len(SPECIAL_TOKENS)
    gen = torch.Generator().manual_seed(1)
    results = []
    for rows in (1, 8):
        prompts = torch.randint(0, first_regular, (rows, args.prompt_len), generator=gen).tolist()
        for name, fn in (("engine (KV cache)", run_engine), ("no-cache reference", run_reference)):
            r = measure(fn, engine, prompts, args.new_tokens, args.repeats)
            results.append({"method": name, "rows": rows, **r})

    setting = (
        f"depth {args.depth}, vocab {engine.tokenizer.vocab_size}, prompt {args.prompt_len}, "
        f"{args.new_tokens} new tokens/row, greedy, {device.type}, {torch.get_num_threads()} threads"
    )
    print(setting)
    print(f"| {'method':<20} | rows | {'TTFT ms':>8} | {'tok/s':>8} | {'speed-up':>8} |")
    print(f"|{'-' * 22}|------|{'-' * 10}|{'-' * 10}|{'-' * 10}|")
    for r in results:
        ref = next(x for x in results if x["rows"] == r["rows"] and x["method"] == "no-cache reference")
        r["speedup_vs_reference"] = r["tok_per_s"] / ref["tok_per_s"]
        print(
            f"| {r['method']:<20} | {r['rows']:>4} | {r['ttft_ms']:>8.1f} | {r['tok_per_s']:>8.1f} | "
            f"{r['speedup_vs_reference']:>7.2f}x |"
        )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "generate.json"
    out.write_text(
        json.dumps(
            {
                "setting": setting,
                "args": vars(args),
                "machine": platform.platform(),
                "cpus": os.cpu_count(),
                "torch": torch.__version__,
                "results": results,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
