"""Registry throughput: a checkpoint up and down through the registry vs boto3 straight to S3.

Starts moto's S3 server and `python -m registry` (SQLite metadata; S3 blobs, then local blobs)
as processes, writes a checkpoint folder (model.safetensors of --size-mb, config, tokenizer,
meta, manifest), and times: registry upload (RegistryClient.upload_folder, server-side sha256
check) and download (parallel ranged GETs, then every sha256 verified), against boto3
upload_file/download_file to the same S3 server with the same part size and concurrency.
Two S3 upload paths: through the server (the registry sends --concurrency parts in flight) and
presigned (the client sends --concurrency parts straight to S3, the registry reads the
assembled file back to check its sha256).
Each measurement gets a fresh S3 server (moto holds every object in its own process, and one
already holding the earlier paths' gigabytes slows the later ones), and the paths take turns for
`--rounds` rounds so the machine's drifting speed weighs on all alike; each row is the path's
median round. Reports MB/s and the registry process's peak RSS (VmHWM). Prints a table, writes
bench/results/registry.json.

    uv run python bench/registry.py --size-mb 1024 --part-mb 64 --concurrency 4
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import httpx
from boto3.s3.transfer import TransferConfig
from nanochat_testing.servers import free_port, start_s3
from registry_client import RegistryClient, build_manifest

TOKEN = "bench-token"
MB = 1024 * 1024


def make_checkpoint(folder: Path, size_mb: int) -> int:
    (folder / "tokenizer").mkdir(parents=True)
    block = os.urandom(16 * MB)
    with open(folder / "model.safetensors", "wb") as f:
        for i in range(size_mb // 16):
            # A counter in each block keeps blocks distinct without paying for 1 GB of urandom.
            f.write(i.to_bytes(8, "little") + block[8:])
        f.write(os.urandom((size_mb % 16) * MB))
    (folder / "config.json").write_text(json.dumps({"n_layer": 20, "n_embd": 1280}))
    (folder / "meta.json").write_text(json.dumps({"stage": "sft", "step": 1000}))
    (folder / "tokenizer" / "tokenizer.json").write_text(json.dumps({"pattern": "bench"}))
    (folder / "manifest.json").write_text(json.dumps(build_manifest(folder), indent=2, sort_keys=True))
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def start_registry(env_extra: dict, data_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {
        **os.environ,
        "REGISTRY_PORT": str(port),
        "REGISTRY_DATA_DIR": str(data_dir),
        "REGISTRY_WRITE_TOKEN": TOKEN,
        "REGISTRY_LOG_LEVEL": "WARNING",
        **env_extra,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "registry"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(data_dir / "registry.log", "wb"),
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"registry did not start: {(data_dir / 'registry.log').read_text()[-2000:]}")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_registry(path: str, env_extra: dict, src: Path, work: Path, total: int, args) -> dict:
    data_dir = Path(tempfile.mkdtemp(prefix="registry-", dir=work))
    cache_dir = Path(tempfile.mkdtemp(prefix="cache-", dir=work))
    proc, url = start_registry(env_extra, data_dir)
    try:
        with RegistryClient(
            url,
            token=TOKEN,
            cache_dir=cache_dir,
            concurrency=args.concurrency,
            part_size=args.part_mb * MB,
            timeout=1800,
        ) as rc:
            holder = {}
            up = timed(lambda: holder.setdefault("v", rc.upload_folder(src, "bench", stage="sft")))
            down = timed(lambda: rc.download("bench", holder["v"].version))
        rss = peak_rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    shutil.rmtree(cache_dir, ignore_errors=True)
    shutil.rmtree(data_dir, ignore_errors=True)
    return {
        "path": path,
        "upload_MBps": total / MB / up,
        "download_MBps": total / MB / down,
        "upload_s": up,
        "download_s": down,
        "registry_peak_rss_MB": rss,
    }


def bench_boto3(s3_url: str, src: Path, work: Path, total: int, args) -> dict:
    s3 = boto3.client(
        "s3", endpoint_url=s3_url, aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    )
    s3.create_bucket(Bucket="direct")
    cfg = TransferConfig(
        multipart_threshold=args.part_mb * MB, multipart_chunksize=args.part_mb * MB, max_concurrency=args.concurrency
    )
    files = [p for p in src.rglob("*") if p.is_file()]
    out = work / "direct-download"

    def upload():
        for p in files:
            s3.upload_file(str(p), "direct", p.relative_to(src).as_posix(), Config=cfg)

    def download():
        for p in files:
            dest = out / p.relative_to(src)
            dest.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file("direct", p.relative_to(src).as_posix(), str(dest), Config=cfg)

    up, down = timed(upload), timed(download)
    shutil.rmtree(out, ignore_errors=True)
    return {
        "path": "boto3 direct to S3",
        "upload_MBps": total / MB / up,
        "download_MBps": total / MB / down,
        "upload_s": up,
        "download_s": down,
        "registry_peak_rss_MB": None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--part-mb", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3, help="the paths take turns this many times; medians reported")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-registry-"))
    paths = {
        "boto3 direct to S3": "boto3",
        "registry (s3 via server)": "s3",
        "registry (s3 presigned)": "s3 presigned",
        "registry (local)": "local",
    }
    runs: dict[str, list[dict]] = {p: [] for p in paths}
    try:
        src = work / "ckpt"
        total = make_checkpoint(src, args.size_mb)
        for _ in range(args.rounds):
            for path, kind in paths.items():
                # A fresh S3 server per measurement: moto keeps every object in its own process, and a
                # server already holding the earlier paths' gigabytes is slower for the later ones.
                s3 = None if kind == "local" else start_s3()
                try:
                    if kind == "boto3":
                        row = bench_boto3(s3.url, src, work, total, args)
                    else:
                        env = (
                            {}
                            if s3 is None
                            else {
                                "REGISTRY_BLOB_BACKEND": "s3",
                                "REGISTRY_S3_ENDPOINT": s3.url,
                                "REGISTRY_S3_BUCKET": "bench",
                                "REGISTRY_S3_ACCESS_KEY": "testing",
                                "REGISTRY_S3_SECRET_KEY": "testing",
                                "REGISTRY_S3_PART_SIZE": str(args.part_mb * MB),
                                "REGISTRY_S3_PARTS_IN_FLIGHT": str(args.concurrency),
                                "REGISTRY_PRESIGNED_UPLOADS": str(kind == "s3 presigned").lower(),
                            }
                        )
                        row = bench_registry(path, env, src, work, total, args)
                finally:
                    if s3 is not None:
                        s3.stop()
                runs[path].append(row)
                print(
                    f"  {path:<28} up {row['upload_MBps']:7.1f} MB/s  down {row['download_MBps']:7.1f} MB/s", flush=True
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # Each path's median round by upload speed (its download from the same round).
    rows = [sorted(runs[p], key=lambda r: r["upload_MBps"])[len(runs[p]) // 2] | {"rounds": runs[p]} for p in paths]

    direct = rows[0]
    print(
        f"checkpoint {total / MB:.0f} MB, part {args.part_mb} MiB, concurrency {args.concurrency}, "
        f"{os.cpu_count()} CPUs (moto S3 server, registry and client share them), median of {args.rounds} rounds"
    )
    print(f"{'path':<30}{'up MB/s':>10}{'down MB/s':>11}{'up x':>7}{'down x':>8}{'peak RSS MB':>13}")
    for r in rows:
        rss = "-" if r["registry_peak_rss_MB"] is None else f"{r['registry_peak_rss_MB']:.0f}"
        print(
            f"{r['path']:<30}{r['upload_MBps']:>10.1f}{r['download_MBps']:>11.1f}"
            f"{r['upload_MBps'] / direct['upload_MBps']:>7.2f}{r['download_MBps'] / direct['download_MBps']:>8.2f}{rss:>13}"
        )
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    (results / "registry.json").write_text(json.dumps({"args": vars(args), "bytes": total, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
