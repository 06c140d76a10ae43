"""The artifact manifest: `manifest.json` = {"files": {relpath: {"size": int, "sha256": hex}}}.

Every artifact the pipeline makes (a tokenizer version, a checkpoint) is one folder holding a
`manifest.json` that lists each of its other files by relpath (with `/`) with its size and its
lowercase hex sha256. The stages write it (`write_manifest`) after their last file; loading a
checkpoint checks every file against it (`verify_manifest`: missing, extra, resized and altered
files are named); the registry client uploads the files it lists (`read_manifest`: the folder's
manifest checked against the file set and sizes, or one computed when there is none), and the
registry stores exactly those files of a version.

Not part of an artifact, so neither listed nor an unexpected file: the manifest itself and
`CACHE_MARKER`, the record the registry client's download cache keeps inside a folder it has
verified.

Quick check: `python -m nanochat_contracts.manifest FOLDER` prints FOLDER's manifest and verifies it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Collection
from pathlib import Path

MANIFEST_FILE = "manifest.json"
CACHE_MARKER = ".registry-verified.json"
CHUNK = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ManifestError(ValueError):
    """A manifest that is malformed or does not describe its folder."""


def file_digest(path: str | os.PathLike) -> tuple[int, str]:
    """(size, sha256 hex) of a file, read in 1 MiB chunks so memory stays flat."""
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            n += len(chunk)
    return n, h.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file."""
    return file_digest(path)[1]


def list_files(folder: str | os.PathLike) -> list[str]:
    """Every regular file of the artifact under `folder`, as sorted relpaths with `/`."""
    root = Path(folder)
    rel = (p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return sorted(r for r in rel if r not in (MANIFEST_FILE, CACHE_MARKER))


def build_manifest(folder: str | os.PathLike) -> dict:
    """The manifest of every file under `folder`, computed from the files."""
    files = {}
    for rel in list_files(folder):
        size, sha = file_digest(Path(folder, rel))
        files[rel] = {"size": size, "sha256": sha}
    return {"files": files}


def write_manifest(folder: str | os.PathLike) -> dict:
    """Write `manifest.json` into `folder` and return it; call it after the last file is written."""
    manifest = build_manifest(folder)
    Path(folder, MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def parse_manifest(data: object) -> dict[str, dict]:
    """The `files` mapping of a manifest, checked for shape (an int size >= 0, a hex sha256)."""
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict):
        raise ManifestError('a manifest is {"files": {relpath: {"size", "sha256"}}}')
    for rel, spec in files.items():
        if (
            not isinstance(spec, dict)
            or not isinstance(spec.get("size"), int)
            or spec["size"] < 0
            or not _SHA256.fullmatch(str(spec.get("sha256", "")))
        ):
            raise ManifestError(f"manifest entry {rel!r} needs an int size and a lowercase hex sha256")
    return {rel: {"size": spec["size"], "sha256": spec["sha256"]} for rel, spec in files.items()}


def _load(folder: Path) -> dict[str, dict]:
    path = folder / MANIFEST_FILE
    try:
        return parse_manifest(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: malformed manifest, not JSON ({e})") from e


def verify_manifest(folder: str | os.PathLike, only: Collection[str] | None = None) -> dict:
    """Check every file of `folder` (sizes and hashes) against its manifest; raise ManifestError
    naming the first problem, return the manifest when all match.

    With `only`, just those files are checked, each of which must be listed (a resumed run reads
    its optimizer files long after the model files were checked at load)."""
    folder = Path(folder)
    if not (folder / MANIFEST_FILE).is_file():
        raise ManifestError(f"{folder} has no {MANIFEST_FILE}")
    listed = _load(folder)
    if only is None:
        extra = set(list_files(folder)) - set(listed)
        if extra:
            raise ManifestError(f"{folder}: files not in the manifest: {sorted(extra)}")
    else:
        unlisted = [rel for rel in only if rel not in listed]
        if unlisted:
            raise ManifestError(f"{folder}: {unlisted[0]} is not in the manifest")
    for rel in listed if only is None else only:
        entry = listed[rel]
        if not (folder / rel).is_file():
            raise ManifestError(f"{folder}: {rel} is listed in the manifest but missing")
        size, sha = file_digest(folder / rel)
        if size != entry["size"]:
            raise ManifestError(f"{folder}: {rel} has size {size}, manifest says {entry['size']}")
        if sha != entry["sha256"]:
            raise ManifestError(f"{folder}: {rel} does not match its sha256 in the manifest")
    return {"files": listed}


def read_manifest(folder: str | os.PathLike) -> dict:
    """The folder's manifest checked against its file set and sizes (hashing is left to whoever
    reads the bytes anyway, as an upload does), or a freshly computed one when it has none."""
    folder = Path(folder)
    if not (folder / MANIFEST_FILE).exists():
        return build_manifest(folder)
    files = _load(folder)
    present = set(list_files(folder))
    if present != set(files):
        raise ManifestError(
            f"{folder / MANIFEST_FILE} does not match the folder: missing "
            f"{sorted(set(files) - present)[:10]}, unlisted {sorted(present - set(files))[:10]}"
        )
    for rel, spec in files.items():
        size = Path(folder, rel).stat().st_size
        if size != spec["size"]:
            raise ManifestError(f"{rel}: {size} bytes on disk, {spec['size']} in the manifest")
    return {"files": files}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m nanochat_contracts.manifest FOLDER")
    print(json.dumps(verify_manifest(sys.argv[1]), indent=2))
