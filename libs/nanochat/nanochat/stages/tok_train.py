"""tok_train: train the BPE tokenizer on the pretraining corpus and save it as a tokenizer version.

    python -m nanochat.stages.tok_train --data-dir data --out runs/tokenizer --vocab-size 4096
    torchrun --nproc_per_node 2 -m nanochat.stages.tok_train ...   # rank 0 trains, others exit

Reads the train split's documents (each cut to `--doc-cap` chars) until `--max-chars`, trains
with rustbpe (`--vocab-size` counts the 9 special tokens; vocab_size - 9 ranks are trained) and
writes `--out` atomically with exactly `tokenizer/`, `meta.json` and `manifest.json`. The
`finished` event names the folder with registry stage `tokenizer`. A corpus too small for
`--vocab-size` fails the stage with the vocab asked, the vocab reached and the corpus size.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nanochat_contracts.manifest import write_manifest

from nanochat.artifacts import atomic_folder
from nanochat.dataset import iter_documents
from nanochat.stages.cli import build_meta, log, run_stage
from nanochat.stages.events import EventEmitter
from nanochat.stages.options import TokTrainOptions
from nanochat.tokenizer import Tokenizer


def training_texts(data_dir: str, max_chars: int, doc_cap: int, seen: dict[str, int]) -> Iterator[str]:
    """The train split's documents, each capped, until max_chars; counts go into `seen`."""
    for doc in iter_documents(data_dir, "train"):
        doc = doc[:doc_cap]
        seen["docs"] += 1
        seen["chars"] += len(doc)
        yield doc
        if seen["chars"] >= max_chars:
            return


def tok_train(options: TokTrainOptions, emitter: EventEmitter) -> tuple[list[dict[str, str]], dict[str, Any]]:
    seen = {"docs": 0, "chars": 0}
    t0 = time.time()
    tokenizer = Tokenizer.train_from_iterator(
        training_texts(options.data_dir, options.max_chars, options.doc_cap, seen), options.vocab_size
    )
    train_s = time.time() - t0
    if seen["docs"] == 0:
        raise ValueError(f"the train split of {options.data_dir} has no documents")
    if tokenizer.vocab_size < options.vocab_size:
        # BPE stops merging when no pair repeats: a smaller vocab would change every later stage's shapes.
        raise ValueError(
            f"the corpus cannot reach the vocab asked: vocab asked {options.vocab_size}, vocab reached "
            f"{tokenizer.vocab_size}, corpus {seen['chars']:,} chars in {seen['docs']:,} documents of "
            f"{options.data_dir}'s train split; give more text (--max-chars, more data) or a smaller --vocab-size"
        )
    metrics = {
        "vocab_size": tokenizer.vocab_size,
        "num_ranks": tokenizer.num_ranks,
        "train_docs": seen["docs"],
        "train_chars": seen["chars"],
        "train_seconds": round(train_s, 3),
    }
    log(f"trained {tokenizer.num_ranks} ranks (+9 specials) on {seen['chars']:,} chars in {train_s:.1f}s")
    emitter.progress(step=1, total=1)
    with atomic_folder(options.out) as tmp:
        tokenizer.save(tmp / "tokenizer")
        meta = build_meta("tok_train", options, "tokenizer", metrics=metrics)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        write_manifest(tmp)
    return [{"path": str(Path(options.out)), "registry_stage": "tokenizer"}], metrics


if __name__ == "__main__":
    run_stage("tok_train", tok_train, rank_zero_only=True)
