"""hf_export: a chat model as a Hugging Face transformers folder, packed for the registry.

    python -m nanochat.stages.hf_export --init-from runs/sft --out runs/hf --input-version nanochat:7

Writes `OUT/hf_export.tar`: one folder `hf_export/` holding what `nanochat.hf_export` makes (config,
weights, tokenizer, chat template, generation config, model card), checked against our model
before it is packed. Run by the trainer on a registry version (a job `{"stage": "hf_export",
"input": {"name": ..., "version": ...}}`), the tar is attached to that version, so
`GET /v1/models/{name}/versions/{v}/attachments/hf_export.tar` hands the export out; `finished`
has no outputs and no metrics. It needs nanochat's optional extra `hf` (transformers) where it
runs, and says so when it is missing. The same export without the trainer:
`python -m nanochat.hf_export`.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

from nanochat.artifacts import atomic_folder
from nanochat.checkpoint import META_FILE
from nanochat.hf_export import export_checkpoint, facts_from_meta
from nanochat.stages.cli import log, run_stage
from nanochat.stages.events import EventEmitter
from nanochat.stages.options import HfExportOptions
from nanochat.stages.train_loop import single_input

TAR_NAME = "hf_export.tar"
FOLDER_NAME = "hf_export"


def hf_export(options: HfExportOptions, emitter: EventEmitter) -> tuple[list, dict[str, Any]]:
    if not options.out:
        raise ValueError("--out is required: the folder hf_export writes hf_export.tar to")
    folder = single_input(options, "checkpoint")
    meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    name = options.input_version[0].replace(":", "-v") if options.input_version else folder.name
    facts = facts_from_meta(name, meta)
    with atomic_folder(options.out, replace=True) as tmp:
        export_checkpoint(folder, tmp / FOLDER_NAME, facts)
        with tarfile.open(tmp / TAR_NAME, "w") as tar:
            tar.add(tmp / FOLDER_NAME, arcname=FOLDER_NAME)
        shutil.rmtree(tmp / FOLDER_NAME)
    log(f"transformers export of {folder} written to {Path(options.out) / TAR_NAME}")
    return [], {}


if __name__ == "__main__":
    run_stage("hf_export", hf_export, rank_zero_only=True)
