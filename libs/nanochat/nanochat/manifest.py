"""Artifact folders: `manifest.json` (size + sha256 of every file) and atomic publication.

Every artifact the pipeline writes (a tokenizer version, a checkpoint) is one folder whose
`manifest.json` is `{"files": {relpath: {"size": int, "sha256": hex}}}`, relpaths with `/`,
the manifest itself not listed. `write_manifest` makes it, `verify_manifest` checks a folder
against it (missing, extra, resized or altered files are named in the error).

`atomic_folder(out)` is how a stage publishes: it yields a hidden temp folder next to `out`, and
only when the block ends without an exception is the folder renamed to `out`, so a crash or a
SIGTERM never leaves a half-written artifact behind.

Quick check: `python -m nanochat.manifest FOLDER` prints the manifest of FOLDER and verifies it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MANIFEST_FILE = "manifest.json"
# Bookkeeping a download cache keeps inside a verified folder (registry_client's marker): never
# part of the checkpoint, so neither listed nor counted as an unexpected file.
CACHE_FILES = frozenset({".registry-verified.json"})


class ManifestError(ValueError):
    """A folder that does not match its manifest."""


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so memory stays flat."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> list[str]:
    rel = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    return sorted(r for r in rel if r != MANIFEST_FILE and r not in CACHE_FILES)


def build_manifest(folder: str | os.PathLike) -> dict:
    """The manifest dict of every file under `folder` (the manifest file itself excluded)."""
    folder = Path(folder)
    return {
        "files": {
            rel: {"size": (folder / rel).stat().st_size, "sha256": sha256_file(folder / rel)}
            for rel in _files(folder)
        }
    }


def write_manifest(folder: str | os.PathLike) -> dict:
    """Write `manifest.json` into `folder` and return it; call it after the last file is written."""
    manifest = build_manifest(folder)
    Path(folder, MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def verify_manifest(folder: str | os.PathLike) -> dict:
    """Check every file of `folder` against its manifest; raise ManifestError naming the first
    problem, return the manifest when all match."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(f"{folder} has no {MANIFEST_FILE}")
    try:
        manifest = json.loads(path.read_text())
        listed = manifest["files"]
        if not isinstance(listed, dict):
            raise TypeError("'files' is not an object")
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ManifestError(f"{path}: malformed manifest ({e})") from e
    present = set(_files(folder))
    extra = present - set(listed)
    if extra:
        raise ManifestError(f"{folder}: files not in the manifest: {sorted(extra)}")
    for rel, entry in listed.items():
        file = folder / rel
        if rel not in present:
            raise ManifestError(f"{folder}: {rel} is listed in the manifest but missing")
        if file.stat().st_size != entry.get("size"):
            raise ManifestError(f"{folder}: {rel} has size {file.stat().st_size}, manifest says {entry.get('size')}")
        if sha256_file(file) != entry.get("sha256"):
            raise ManifestError(f"{folder}: {rel} does not match its sha256 in the manifest")
    return manifest


@contextmanager
def atomic_folder(out: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside `out`; rename it to `out` on success, delete it on any error.

    An existing `out` is an error unless `replace` is set (then it is swapped out only after the
    new folder is complete)."""
    out = Path(out)
    if out.exists() and not replace:
        raise FileExistsError(f"output folder {out} already exists; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m nanochat.manifest FOLDER")
    print(json.dumps(verify_manifest(sys.argv[1]), indent=2))
