"""The checkpoint manifest: `manifest.json` = {"files": {relpath: {"size": int, "sha256": hex}}}.

Relpaths use `/`, are relative to the checkpoint folder, and the manifest does not list itself.
This is the format `nanochat.manifest` writes; `read_manifest` takes a folder's manifest when it
has one (after checking it against the folder's files and sizes) and computes one otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

MANIFEST_FILE = "manifest.json"
CHUNK = 1024 * 1024
SHA_RE = re.compile(r"^[0-9a-f]{64}$")


class ManifestError(ValueError):
    """A manifest that is malformed or does not describe its folder."""


def file_digest(path: str | os.PathLike) -> tuple[int, str]:
    """(size, sha256 hex) of a file, read in 1 MiB chunks."""
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            n += len(chunk)
    return n, h.hexdigest()


def list_files(folder: str | os.PathLike) -> list[str]:
    """Every regular file under `folder` as a sorted relpath with `/`, the manifest excluded."""
    root = Path(folder)
    out = []
    for p in root.rglob("*"):
        if p.is_file():
            rel = p.relative_to(root).as_posix()
            if rel != MANIFEST_FILE:
                out.append(rel)
    return sorted(out)


def build_manifest(folder: str | os.PathLike) -> dict:
    files = {}
    for rel in list_files(folder):
        size, sha = file_digest(Path(folder, rel))
        files[rel] = {"size": size, "sha256": sha}
    return {"files": files}


def parse_manifest(data: dict) -> dict[str, dict]:
    """The `files` mapping of a manifest dict, checked for shape."""
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict):
        raise ManifestError('a manifest is {"files": {relpath: {"size", "sha256"}}}')
    for rel, spec in files.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("size"), int) or spec["size"] < 0 \
                or not SHA_RE.match(str(spec.get("sha256", ""))):
            raise ManifestError(f"manifest entry {rel!r} needs an int size and a lowercase hex sha256")
    return {rel: {"size": spec["size"], "sha256": spec["sha256"]} for rel, spec in files.items()}


def read_manifest(folder: str | os.PathLike) -> dict:
    """The folder's manifest (checked: same file set, same sizes), or a freshly computed one."""
    path = Path(folder, MANIFEST_FILE)
    if not path.exists():
        return build_manifest(folder)
    try:
        files = parse_manifest(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not JSON ({e})") from e
    present = set(list_files(folder))
    if present != set(files):
        raise ManifestError(f"{path} does not match the folder: missing {sorted(set(files) - present)[:10]}, "
                            f"unlisted {sorted(present - set(files))[:10]}")
    for rel, spec in files.items():
        size = Path(folder, rel).stat().st_size
        if size != spec["size"]:
            raise ManifestError(f"{rel}: {size} bytes on disk, {spec['size']} in the manifest")
    return {"files": files}
