"""make_data: the tiny offline data of the CPU speedrun, made at run time into `--data-dir`.

    python -m nanochat.stages.make_data --data-dir data [--seed 42] [--source stdlib]

Writes, all deterministic given `--seed`:
- `shard_XXXXX.parquet`: a pretraining corpus in the FineWeb-Edu format (one `text` column, row
  groups of 1,024 docs; the last shard is the validation split). The text is Debian's
  python3.11-doc reST sources cut into documents at section and paragraph boundaries; only where
  they are absent, a synthetic text generator stands in.
- `tasks/REPO/CONFIG/SPLIT-00000-of-00001.parquet`, the public datasets' layout and fields:
  SmolTalk-style conversations (`messages`), GSM8K-style word problems (`question`, `answer` with
  `<<a*b=c>>` calls and `#### N`), ARC-style (`id`, `question`, `choices{text,label}`,
  `answerKey`) and MMLU-style (`question`, `subject`, `choices`, `answer`; `auxiliary_train`
  rows under `train`) multiple choice, HumanEval-style problems (`task_id`, `prompt`,
  `canonical_solution`, `test`, `entry_point`);
- `tasks/identity/{train,test}.jsonl`: "who are you?" in varied wording -> the model's name (SFT
  only; the test questions are wordings never seen in train, rows carry `expected`);
- `eval_bundle/`: a CORE-format mini bundle (`core.yaml`, `eval_data/*.jsonl`,
  `eval_meta_data.csv`) with one task of each type, built from the validation documents.
Every train/test pair is disjoint. Everything is written to a temp folder inside `--data-dir`
first and moved in at the end (the stamp `make_data.json` last), so a killed run leaves no
partial data. A rerun with the same options finds the stamp and reuses the data (a pipeline can
run twice on one data volume); other options need `--overwrite`.

`--source download` fetches the real data instead (the d20 preset): FineWeb-Edu shards
`shard_00000` .. `--fineweb-shards` - 1, the last of them the validation split as in the original,
every task split the loaders read, and the CORE eval bundle, into the same layout (only the
identity conversations are made here). Each file is downloaded to `.part` and renamed, so an
interrupted download resumes where it stopped.

This module holds the option handling, the staging folder and the order of the work; the data
sources live in `nanochat.offline_corpus` (the pretraining text), `nanochat.synthetic_tasks` (the
task sets and the CORE mini bundle) and `nanochat.real_data` (`--source download`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

from nanochat.offline_corpus import load_docs, write_corpus
from nanochat.real_data import download_real_data
from nanochat.stages.cli import log, run_stage
from nanochat.stages.events import EventEmitter
from nanochat.stages.options import MakeDataOptions
from nanochat.synthetic_tasks import core_bundle, write_identity, write_tasks

STAMP = "make_data.json"  # the options that made a data dir: a rerun with the same ones is a no-op


def make_data(options: MakeDataOptions, emitter: EventEmitter) -> tuple[list, dict[str, Any]]:
    data_dir = Path(options.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    recipe = options.model_dump(
        mode="json", exclude={"data_dir", "out", "init_from", "job_id", "input_version", "overwrite"}
    )
    stamp = data_dir / STAMP
    if stamp.is_file() and not options.overwrite:
        made = json.loads(stamp.read_text())
        if made.get("recipe") == recipe:
            log(f"{data_dir} already holds this data (same options and seed); reusing it")
            return [], {**made["metrics"], "reused": True}
    produced = ["tasks", "eval_bundle", STAMP]
    existing = sorted(data_dir.glob("shard_*.parquet")) + [data_dir / p for p in produced if (data_dir / p).exists()]
    if options.source == "download":
        return [], _download(data_dir, options, emitter, recipe, existing)
    if existing and not options.overwrite:
        raise FileExistsError(
            f"{data_dir} already holds other data ({existing[0].name}, ...); pass --overwrite to replace it"
        )
    source = options.source
    docs = load_docs(options, random.Random(options.seed))
    log(f"{len(docs)} documents from {source}")
    total_steps = 3
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=".make_data.tmp-") as tmp:
        staging = Path(tmp)
        corpus = write_corpus(staging, docs, options)
        emitter.progress(step=1, total=total_steps)
        tasks = write_tasks(staging, docs[: -options.val_docs], options, options.seed)
        emitter.progress(step=2, total=total_steps)
        core_bundle(
            staging / "eval_bundle", docs[-options.val_docs :], options.core_items, random.Random(options.seed + 8)
        )
        emitter.progress(step=3, total=total_steps)
        metrics = {"source": source, **corpus, **{f"tasks/{k}": v for k, v in tasks.items()}}
        (staging / STAMP).write_text(json.dumps({"recipe": recipe, "metrics": metrics}, indent=2) + "\n")
        for path in existing:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        for entry in sorted(staging.iterdir(), key=lambda e: (e.name == STAMP, e.name)):
            os.rename(entry, data_dir / entry.name)
    log(f"data in {data_dir}: {corpus['shards']} shards, {corpus['chars']:,} chars")
    return [], metrics


def _download(
    data_dir: Path, options: MakeDataOptions, emitter: EventEmitter, recipe: dict, existing: list[Path]
) -> dict[str, Any]:
    stamp = data_dir / STAMP
    made_by = json.loads(stamp.read_text()).get("recipe", {}).get("source") if stamp.is_file() else None
    if existing and options.overwrite:
        for path in existing:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    elif made_by not in (None, "download"):
        # The tiny offline data must not mix with the real shards; an earlier download is resumed.
        raise FileExistsError(
            f"{data_dir} holds make_data's offline data (--source {made_by}); pass --overwrite to replace it"
        )
    stamp.unlink(missing_ok=True)
    metrics = download_real_data(data_dir, options, emitter)
    metrics.update({f"tasks/{k}": v for k, v in write_identity(data_dir, options, options.seed).items()})
    stamp.write_text(json.dumps({"recipe": recipe, "metrics": metrics}, indent=2) + "\n")
    log(f"data in {data_dir}: {metrics['shards']} shards, {metrics['task_splits']} task splits, the CORE bundle")
    return metrics


if __name__ == "__main__":
    run_stage("make_data", make_data, rank_zero_only=True)
