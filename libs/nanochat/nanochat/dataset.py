"""FineWeb-Edu pretraining shards: download them, or read the same parquet format from a folder.

The corpus is `karpathy/fineweb-edu-100b-shuffle` on Hugging Face: 1,823 parquet shards
`shard_00000.parquet` .. `shard_01822.parquet`, one `text` column, row groups of 1,024 documents.
Locally the shards sit flat in one folder (`--data-dir`); whatever the folder holds, its LAST
shard (by name) is the validation split and the others are the training split, so the tiny
corpus of `make_data` and the real download are read by the same code.

Downloads are parallel, retried with exponential backoff, written to `NAME.part` and renamed when
complete (a shard on disk is always whole); an interrupted `.part` is resumed with an HTTP Range
request, and shards already present are skipped.

Reading: `iter_row_groups` yields the documents of each row group, the row groups of every shard
strided by rank (rank r reads groups r, r+W, r+2W, ...), together with the position of the NEXT
group, `(shard, row_group)`, so a loader can resume exactly where it stopped.

    python -m nanochat.dataset -n 8 --data-dir data    # shards 0..7: 7 train, the last (7) val
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nanochat.sources import FINEWEB_LAST_SHARD as MAX_SHARD
from nanochat.sources import FINEWEB_URL as BASE_URL

SHARD_RE = re.compile(r"^shard_(\d{5})\.parquet$")
PARQUET_MAGIC = b"PAR1"


def shard_name(index: int) -> str:
    """`shard_00042.parquet` for 42."""
    if not 0 <= index <= 99_999:
        raise ValueError(f"shard index {index} out of range")
    return f"shard_{index:05d}.parquet"


def _is_parquet(path: Path) -> bool:
    if path.stat().st_size < 12:
        return False
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(-4, os.SEEK_END)
        return head == PARQUET_MAGIC and f.read(4) == PARQUET_MAGIC


class _HttpRedirectsOnly(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to http(s), and never from https down to http: a download URL must
    not lead the worker to its own files (file:) or elsewhere (ftp:)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        old, new = urllib.parse.urlsplit(req.full_url).scheme, urllib.parse.urlsplit(newurl).scheme
        if new not in ("http", "https") or (old == "https" and new == "http"):
            raise urllib.error.HTTPError(newurl, code, f"redirect from {old}: to {newurl!r} refused", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_HttpRedirectsOnly)


def download_file(
    url: str,
    dest: str | os.PathLike,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 60.0,
    chunk_size: int = 1 << 20,
) -> Path:
    """Download `url` to `dest` via `dest.part` (resumed with Range when present), renamed at the end.

    Retries with exponential backoff (backoff * 2**attempt seconds) on network errors, HTTP 5xx/429
    and truncated bodies; a 4xx other than 429 fails at once. Skips a `dest` that already exists."""
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    last_error: Exception | None = None
    for attempt in range(retries):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        have = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"User-Agent": "nanochat-dataset/1"})
        if have:
            request.add_header("Range", f"bytes={have}-")
        try:
            with _OPENER.open(request, timeout=timeout) as response:
                resumed = have and response.status == 206
                expected = response.headers.get("Content-Length")
                expected = int(expected) if expected is not None else None
                written = 0
                with open(part, "ab" if resumed else "wb") as f:
                    while block := response.read(chunk_size):
                        f.write(block)
                        written += len(block)
            if expected is not None and written != expected:
                raise OSError(f"truncated body: got {written} of {expected} bytes")
            os.replace(part, dest)
            return dest
        except urllib.error.HTTPError as e:
            last_error = e
            if e.code == 416:  # our .part is not a prefix of the file any more: start over
                part.unlink(missing_ok=True)
            elif e.code < 500 and e.code != 429:  # a 3xx here is a redirect not followed
                raise OSError(f"download of {url} failed: HTTP {e.code} {e.reason}") from e
        except (urllib.error.URLError, http.client.HTTPException, OSError, TimeoutError) as e:
            last_error = e
    raise OSError(f"download of {url} failed after {retries} attempts: {last_error}")


def download_shards(
    indices: Sequence[int],
    data_dir: str | os.PathLike,
    base_url: str = BASE_URL,
    workers: int = 8,
    retries: int = 5,
    backoff: float = 1.0,
) -> list[Path]:
    """Download shards in parallel into `data_dir`; a shard that is not valid parquet is removed
    and fetched again. Raises OSError naming every shard that could not be fetched."""
    data_dir = Path(data_dir)
    for i in indices:
        if not 0 <= i <= MAX_SHARD:
            raise ValueError(f"shard index {i} outside 0..{MAX_SHARD}")

    def fetch(i: int) -> Path:
        dest = data_dir / shard_name(i)
        for _ in range(2):
            download_file(f"{base_url}/{shard_name(i)}", dest, retries=retries, backoff=backoff)
            if _is_parquet(dest):
                return dest
            dest.unlink()
        raise OSError(f"{shard_name(i)} is not a parquet file after download")

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {i: pool.submit(fetch, i) for i in indices}
    failed = [f"{shard_name(i)}: {f.exception()}" for i, f in futures.items() if f.exception()]
    if failed:
        raise OSError("some shards failed to download:\n" + "\n".join(failed))
    return [futures[i].result() for i in indices]


def list_shards(data_dir: str | os.PathLike) -> list[Path]:
    """The shard files of `data_dir`, sorted by name; an error that says how to make some."""
    data_dir = Path(data_dir)
    shards = sorted(p for p in data_dir.glob("shard_*.parquet") if SHARD_RE.match(p.name)) if data_dir.is_dir() else []
    if len(shards) < 2:
        raise FileNotFoundError(
            f"{data_dir} holds {len(shards)} shard_XXXXX.parquet file(s); at least 2 are needed (train + val). "
            "Run `python -m nanochat.stages.make_data --data-dir DIR` or `python -m nanochat.dataset`."
        )
    return shards


def split_shards(data_dir: str | os.PathLike, split: str) -> list[Path]:
    """The shards of a split: `val` is the last shard, `train` all the others."""
    shards = list_shards(data_dir)
    if split == "train":
        return shards[:-1]
    if split == "val":
        return shards[-1:]
    raise ValueError(f"split must be 'train' or 'val', got {split!r}")


def iter_row_groups(
    data_dir: str | os.PathLike,
    split: str,
    rank: int = 0,
    world_size: int = 1,
    start: tuple[int, int] = (0, 0),
    loop: bool = False,
) -> Iterator[tuple[list[str], tuple[int, int]]]:
    """Yield `(documents, next_position)` for each of this rank's row groups in order.

    `start` is a position returned earlier (shard index within the split, row group index); the
    row group index must belong to this rank (r + k*W). With `loop` the split repeats forever."""
    import pyarrow.parquet as pq

    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    shards = split_shards(data_dir, split)
    shard_idx, group = start
    if not 0 <= shard_idx <= len(shards):
        raise ValueError(f"start shard {shard_idx} outside the {len(shards)} shards of {split}")
    first_group = group if group >= rank else rank
    if (first_group - rank) % world_size:
        raise ValueError(f"row group {group} is not read by rank {rank} of {world_size}")
    while True:
        yielded = 0
        for s in range(shard_idx, len(shards)):
            pf = pq.ParquetFile(shards[s])
            if "text" not in pf.schema_arrow.names:
                raise ValueError(f"{shards[s]} has no 'text' column (columns: {pf.schema_arrow.names})")
            for g in range(first_group, pf.num_row_groups, world_size):
                docs = pf.read_row_group(g, columns=["text"]).column("text").to_pylist()
                following = g + world_size
                nxt = (s, following) if following < pf.num_row_groups else (s + 1, rank)
                yielded += 1
                yield docs, nxt
            first_group = rank
        if not yielded and shard_idx == 0:
            raise ValueError(
                f"rank {rank} of {world_size} has no row group in the {split} split of {data_dir}: "
                f"each split needs at least {world_size} row groups"
            )
        if not loop:
            return
        shard_idx = 0


def iter_documents(data_dir: str | os.PathLike, split: str, rank: int = 0, world_size: int = 1) -> Iterator[str]:
    """Every document of a split (this rank's row groups), once."""
    for docs, _ in iter_row_groups(data_dir, split, rank, world_size):
        yield from docs


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Download FineWeb-Edu shards 0..N-1 (the last one is the val split).")
    parser.add_argument(
        "-n", "--num-shards", type=int, default=8, help="Shards to fetch, train and val together (-1: all)."
    )
    parser.add_argument("--data-dir", default="data", help="Destination folder.")
    parser.add_argument("--workers", type=int, default=8, help="Parallel downloads.")
    parser.add_argument("--base-url", default=BASE_URL, help="Where the shards are served.")
    args = parser.parse_args(argv)
    n = MAX_SHARD + 1 if args.num_shards < 0 else min(args.num_shards, MAX_SHARD + 1)
    if n < 2:
        parser.error("-n must be at least 2: a train shard and the val shard")
    paths = download_shards(list(range(n)), args.data_dir, args.base_url, args.workers)
    print(f"{len(paths)} shards in {args.data_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
