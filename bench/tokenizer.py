"""Tokenizer benchmark: train and encode with our `rustbpe`, the original crate, HF and tiktoken.

    uv run python bench/tokenizer.py [--repeats 3] [--original-python PATH]

Corpus: the running interpreter's standard-library sources (make_data's default `stdlib` text:
tests, codec tables and pydoc topics left out), concatenated in sorted path order, the first
10,000,000 bytes (or all, when fewer) decoded as UTF-8 (errors ignored). Each trainer learns 4,096 ranks (the 256
bytes included, no specials) from the whole corpus passed as one string, `iter([text])`.

The original crate (PyPI `rustbpe==0.1.0`) has the same module name as ours, so it is installed
into a throwaway venv (the standard library's venv and pip, on first use) and timed in a subprocess. Every timing is
the median of `--repeats` runs. Prints a table and writes bench/results/tokenizer.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import tiktoken
from nanochat.offline_corpus import stdlib_files
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

import rustbpe

CORPUS_BYTES = 10_000_000
RANKS = 4096
RESULTS = Path(__file__).parent / "results"
ORIGINAL_VENV = Path(tempfile.gettempdir()) / "rustbpe-0.1.0-venv"

# Runs inside the original crate's venv: argv = corpus file, ranks, repeats, pattern; prints JSON.
# The pattern is passed explicitly: the original's default splits digits as \p{N}{1,3}.
ORIGINAL_SCRIPT = """
import json, statistics, sys, time
import rustbpe
text = open(sys.argv[1], encoding="utf-8").read()
ranks, repeats, pattern = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
def train(items):
    seconds = []
    for _ in range(repeats):
        tok = rustbpe.Tokenizer()
        t0 = time.perf_counter()
        tok.train_from_iterator(iter(items), ranks, pattern=pattern)
        seconds.append(time.perf_counter() - t0)
    return tok, statistics.median(seconds)
docs_tok, docs_s = train(text.split("\\n\\n"))
tok, one_s = train([text])
merges = [[bytes(b).hex(), r] for b, r in tok.get_mergeable_ranks()]
docs_merges = [[bytes(b).hex(), r] for b, r in docs_tok.get_mergeable_ranks()]
print(json.dumps({"seconds": one_s, "docs_seconds": docs_s, "ranks": merges, "docs_ranks": docs_merges}))
"""


def load_corpus() -> str:
    data = bytearray()
    for path in stdlib_files():
        data += path.read_bytes()
        if len(data) >= CORPUS_BYTES:
            break
    return bytes(data[:CORPUS_BYTES]).decode("utf-8", errors="ignore")


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median seconds of `repeats` calls, and the last call's result."""
    seconds, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds), result


def train_ours(items: list[str]) -> rustbpe.Tokenizer:
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(items), RANKS)
    return tok


def train_hf(text: str) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    # The same regex split as ours, then bytes mapped to ByteLevel's printable alphabet.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(rustbpe.DEFAULT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=RANKS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(iter([text]), trainer=trainer)
    return tok


def original_python(path: str | None) -> str:
    if path:
        return path
    python = ORIGINAL_VENV / "bin" / "python"
    if not python.exists():
        # The standard library's venv and pip: `uv` need not be on PATH (make puts it in ~/.local/bin).
        subprocess.run([sys.executable, "-m", "venv", str(ORIGINAL_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "rustbpe==0.1.0"], check=True)
    return str(python)


def run_original(python: str, text: str, repeats: int) -> dict:
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".txt") as f:
        f.write(text)
        f.flush()
        out = subprocess.run(
            [python, "-c", ORIGINAL_SCRIPT, f.name, str(RANKS), str(repeats), rustbpe.DEFAULT_PATTERN],
            check=True,
            capture_output=True,
            text=True,
        )
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--original-python", help="a python with rustbpe==0.1.0 installed (default: a throwaway venv)")
    args = parser.parse_args()

    text = load_corpus()
    print(
        f"corpus: {len(text.encode()):,} bytes, {len(text):,} chars; {RANKS:,} ranks, no specials; "
        f"{os.cpu_count()} cpus, median of {args.repeats}"
    )

    # Documents as nanochat's tokenizer training feeds them: many strings, pulled in buffers.
    docs = text.split("\n\n")
    original = run_original(original_python(args.original_python), text, args.repeats)
    original_s, original_docs_s = original["seconds"], original["docs_seconds"]
    original_ranks = [(bytes.fromhex(b), r) for b, r in original["ranks"]]
    original_docs_ranks = [(bytes.fromhex(b), r) for b, r in original["docs_ranks"]]

    ours_s, ours = timed(lambda: train_ours([text]), args.repeats)
    ours_docs_s, ours_docs = timed(lambda: train_ours(docs), args.repeats)
    hf_s, hf = timed(lambda: train_hf(text), args.repeats)

    ranks = ours.get_mergeable_ranks()
    merges_equal = ranks == original_ranks
    docs_merges_equal = ours_docs.get_mergeable_ranks() == original_docs_ranks
    first_diff = next((r for (a, r), (b, _) in zip(ranks, original_ranks) if a != b), None)

    enc = tiktoken.Encoding("bench", pat_str=ours.get_pattern(), mergeable_ranks=dict(ranks), special_tokens={})
    enc_ours_s, ids_ours = timed(lambda: ours.encode(text), args.repeats)
    enc_tt_s, ids_tt = timed(lambda: enc.encode_ordinary(text), args.repeats)
    enc_hf_s, ids_hf = timed(lambda: hf.encode(text).ids, args.repeats)
    batch_ours_s, batch_ours = timed(lambda: ours.batch_encode(docs), args.repeats)
    batch_tt_s, batch_tt = timed(lambda: enc.encode_ordinary_batch(docs), args.repeats)

    rows = [
        ("train 1 string", "rustbpe 0.1.0 (original)", original_s),
        ("train 1 string", "ours", ours_s),
        ("train 1 string", "HF tokenizers", hf_s),
        (f"train {len(docs):,} docs", "rustbpe 0.1.0 (original)", original_docs_s),
        (f"train {len(docs):,} docs", "ours", ours_docs_s),
        ("encode 1 string", "ours", enc_ours_s),
        ("encode 1 string", "tiktoken", enc_tt_s),
        ("encode 1 string", "HF tokenizers", enc_hf_s),
        (f"encode {len(docs):,} docs", "ours batch_encode", batch_ours_s),
        (f"encode {len(docs):,} docs", "tiktoken encode_ordinary_batch", batch_tt_s),
    ]
    print(f"\n{'task':<22} {'implementation':<32} {'seconds':>8}")
    for task, name, s in rows:
        print(f"{task:<22} {name:<32} {s:>8.3f}")
    print(
        f"\nours / original train time: {ours_s / original_s:.2f}x (target <= 0.8x); "
        f"HF / ours: {hf_s / ours_s:.1f}x (target >= 5x); ours / original on the docs: "
        f"{ours_docs_s / original_docs_s:.2f}x"
    )
    print(
        f"merges identical to the original's: {merges_equal}"
        + ("" if merges_equal else f" (first difference at rank {first_diff})")
        + f"; on the docs: {docs_merges_equal}"
    )
    print(
        f"our ids == tiktoken's: {ids_ours == ids_tt} (1 string), {batch_ours == batch_tt} (batch); "
        f"tokens: ours {len(ids_ours):,}, HF {len(ids_hf):,}"
    )

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "tokenizer.json"
    out.write_text(
        json.dumps(
            {
                "corpus_bytes": len(text.encode()),
                "ranks": RANKS,
                "repeats": args.repeats,
                "cpus": os.cpu_count(),
                "machine": platform.platform(),
                "seconds": {f"{task} / {name}": s for task, name, s in rows},
                "train_ratio_ours_over_original": ours_s / original_s,
                "train_ratio_hf_over_ours": hf_s / ours_s,
                "docs_train_ratio_ours_over_original": ours_docs_s / original_docs_s,
                "merges_equal_original": merges_equal,
                "docs_merges_equal_original": docs_merges_equal,
                "first_differing_rank": first_diff,
                "ids_equal_tiktoken": ids_ours == ids_tt and batch_ours == batch_tt,
                "tokens": {"ours": len(ids_ours), "hf": len(ids_hf)},
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
