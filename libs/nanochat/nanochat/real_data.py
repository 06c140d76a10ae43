"""The real data of make_data (`--source download`, the d20 preset): FineWeb-Edu shards, every
task split the loaders read, and the CORE eval bundle, in the layout the offline data uses."""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from nanochat.dataset import download_file, download_shards
from nanochat.stages.events import EventEmitter
from nanochat.stages.options import MakeDataOptions
from nanochat.tasks import arc, gsm8k, humaneval, mmlu, smoltalk
from nanochat.tasks.common import fetch_split

# Every split the task loaders read, named by the loaders' own repo and config constants.
REAL_TASK_SPLITS = [
    (smoltalk.REPO, smoltalk.CONFIG, "train"),
    (smoltalk.REPO, smoltalk.CONFIG, "test"),
    (gsm8k.REPO, gsm8k.CONFIG, "train"),
    (gsm8k.REPO, gsm8k.CONFIG, "test"),
    (arc.REPO, "ARC-Easy", "train"),
    (arc.REPO, "ARC-Easy", "test"),
    (arc.REPO, "ARC-Challenge", "train"),
    (arc.REPO, "ARC-Challenge", "test"),
    (mmlu.REPO, "all", "test"),
    (mmlu.REPO, "auxiliary_train", "train"),
    (humaneval.REPO, humaneval.CONFIG, "test"),
]


def download_real_data(data_dir: Path, options: MakeDataOptions, emitter: EventEmitter) -> dict[str, Any]:
    """FineWeb-Edu shards, the task splits and the CORE bundle, straight into `data_dir`. Every
    file appears whole (a `.part` renamed, resumed with Range), so a rerun fetches what is missing."""
    shards = list(range(options.fineweb_shards))  # the last is the validation split (dataset.split_shards)
    download_shards(shards, data_dir, options.fineweb_url, options.download_workers)
    emitter.progress(step=1, total=3)
    for repo, config, split in REAL_TASK_SPLITS:
        fetch_split(data_dir, repo, config, split, options.datasets_url)
    emitter.progress(step=2, total=3)
    bundle = data_dir / "eval_bundle"
    if not bundle.is_dir():
        archive = download_file(options.core_bundle_url, data_dir / "eval_bundle.zip")
        with tempfile.TemporaryDirectory(dir=data_dir, prefix=".make_data.tmp-") as tmp:
            with zipfile.ZipFile(archive) as z:
                z.extractall(tmp)  # zipfile drops absolute paths and ".." from member names
            found = next(Path(tmp).rglob("core.yaml"), None)
            if found is None:
                raise ValueError(f"{options.core_bundle_url}: the archive holds no core.yaml")
            os.rename(found.parent, bundle)
        archive.unlink()
    emitter.progress(step=3, total=3)
    return {
        "source": "download",
        "shards": len(shards),
        "task_splits": len(REAL_TASK_SPLITS),
        "bytes": sum(p.stat().st_size for p in data_dir.rglob("*") if p.is_file()),
    }
