"""Tiny offline data for tests and benchmarks: make_data's options for a corpus that takes seconds,
and a helper that writes it straight into a data folder (no trainer involved)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

TINY_DATA = {
    "source": "synthetic",
    "synthetic_docs": 300,
    "docs_per_shard": 100,
    "val_docs": 50,
    "chat_train": 20,
    "chat_test": 10,
    "math_train": 20,
    "math_test": 10,
    "mc_train": 20,
    "mc_test": 10,
    "identity_train": 10,
    "identity_test": 10,
    "core_items": 8,
}


def make_tiny_data(data_dir: Path, scratch: Path) -> Path:
    """Run the make_data stage with TINY_DATA into `data_dir`; its config goes to `scratch`."""
    config = scratch / "make_data.json"
    config.write_text(json.dumps(TINY_DATA))
    subprocess.run(
        [sys.executable, "-m", "nanochat.stages.make_data", "--config", str(config), "--data-dir", str(data_dir)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return Path(data_dir)
