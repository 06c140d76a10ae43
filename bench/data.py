"""Data-side timings: make_data, tok_train (tiny preset), loader throughput, local download speed.

    uv run python bench/data.py [--work DIR]

Prints a table and writes bench/results/data.json. The tokenizer row trains 4,087 ranks + 9
specials (vocab 4,096, the tiny preset) on the whole tiny train split.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from nanochat.dataloader import ConversationLoader, SFTLoader, pretrain_loader
from nanochat.dataset import download_shards, shard_name
from nanochat.tasks.mixtures import mid_mixture, sft_mixture
from nanochat.tokenizer import Tokenizer

RESULTS = Path(__file__).parent / "results"


def stage(name: str, *args: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", f"nanochat.stages.{name}", *args],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - t0


def tokens_per_second(loader, steps: int) -> float:
    next(loader)
    t0, tokens = time.perf_counter(), 0
    for _, (x, _) in zip(range(steps), loader):  # a one-pass loader may end sooner
        tokens += x.numel()
    return tokens / (time.perf_counter() - t0)


def download_speed(work: Path, shards: int = 4, size_mb: int = 32) -> float:
    src = work / "served"
    src.mkdir()
    blob = os.urandom(size_mb << 20)
    for i in range(shards):
        (src / shard_name(i)).write_bytes(b"PAR1" + blob + b"PAR1")

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = partial(Quiet, directory=str(src))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        t0 = time.perf_counter()
        download_shards(
            list(range(shards)), work / "fetched", base_url=f"http://127.0.0.1:{httpd.server_port}", workers=4
        )
        return shards * size_mb / (time.perf_counter() - t0)
    finally:
        httpd.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", help="Scratch folder (default: a temp folder).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        data, tok_dir = work / "data", work / "tok"
        rows = [("make_data (python docs corpus + task sets)", stage("make_data", "--data-dir", str(data)), "s")]
        rows.append(
            (
                "tok_train tiny (4,087 ranks + 9 specials)",
                stage("tok_train", "--data-dir", str(data), "--out", str(tok_dir), "--preset", "tiny"),
                "s",
            )
        )
        rows.append(("tok_eval tiny", stage("tok_eval", "--data-dir", str(data), "--init-from", str(tok_dir)), "s"))
        tok = Tokenizer.load(tok_dir / "tokenizer")
        rows.append(
            (
                "pretrain loader B=8 T=256",
                tokens_per_second(pretrain_loader(tok, str(data), "train", 8, 256), 2000),
                "tok/s",
            )
        )
        rows.append(
            (
                "mid loader B=8 T=256",
                tokens_per_second(ConversationLoader(tok, mid_mixture(data), 8, 256), 200),
                "tok/s",
            )
        )
        rows.append(
            (
                "SFT loader B=8",
                tokens_per_second(SFTLoader(tok, sft_mixture(data), 8, 256, num_epochs=None), 100),
                "tok/s",
            )
        )
        rows.append(("download 4 x 32 MiB from 127.0.0.1, 4 workers", download_speed(work), "MiB/s"))
    print(f"{'measurement':<48} {'value':>12}  unit")
    for name, value, unit in rows:
        print(f"{name:<48} {value:>12,.2f}  {unit}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "data.json"
    out.write_text(
        json.dumps(
            {
                "machine": platform.platform(),
                "cpus": os.cpu_count(),
                "results": [{"name": n, "value": v, "unit": u} for n, v, u in rows],
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
