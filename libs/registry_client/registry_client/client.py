"""RegistryClient: typed access to the registry over HTTP (httpx and nanochat_contracts, no torch).

    from registry_client import RegistryClient
    rc = RegistryClient("http://127.0.0.1:8002", token="...", cache_dir="~/.cache/nanochat/registry")
    v = rc.upload_folder("out/sft", "nanochat", stage="sft", parent=3, job_id="j1")
    folder = rc.download("nanochat", stage=["rl", "sft"])   # every sha256 checked before it returns

Uploads send the files the registry does not hold yet, in parallel, then commit; when the
registry offers presigned part URLs (S3 backend), files bigger than a part go straight to S3 as
parts (`concurrency` in flight, each carrying its sha256 for S3 to check) and the registry checks
the assembled file; otherwise every file streams through the registry. An interrupted
upload raises `UploadError` carrying the version, and `upload_folder(..., resume_version=v)`
sends only what is still missing. Downloads go into `<cache_dir>/<name>/v<version>` through a
temp folder, big files as parallel ranged GETs, and the folder is handed over only when every
file's sha256 matches; a cached folder whose files still match is reused without a transfer.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote

import httpx
from nanochat_contracts.manifest import CACHE_MARKER, CHUNK, MANIFEST_FILE, file_digest, read_manifest
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

T = TypeVar("T")
# Answers that say "try again shortly": the registry with its blob store or database away, S3 busy.
RETRY_STATUSES = (502, 503, 504)


class RegistryError(Exception):
    """The registry answered an error."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status, self.message = status, message


class IntegrityError(Exception):
    """Downloaded bytes do not match the sha256 the registry recorded."""


class UploadError(Exception):
    """An upload stopped part-way; resume with `upload_folder(..., resume_version=self.version)`."""

    def __init__(self, name: str, version: int, cause: Exception):
        super().__init__(f"upload of {name} v{version} failed: {cause}")
        self.name, self.version, self.cause = name, version, cause


@dataclass
class FileInfo:
    path: str
    size: int
    sha256: str


@dataclass
class VersionInfo:
    name: str
    version: int
    stage: str
    state: str
    step: int | None
    metrics: dict
    meta: dict
    parent: dict | None
    job_id: str | None
    files: list[FileInfo]
    attachments: list[FileInfo] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    @classmethod
    def from_json(cls, d: dict) -> VersionInfo:
        return cls(
            name=d["name"],
            version=d["version"],
            stage=d["stage"],
            state=d["state"],
            step=d.get("step"),
            metrics=d.get("metrics") or {},
            meta=d.get("meta") or {},
            parent=d.get("parent"),
            job_id=d.get("job_id"),
            files=[FileInfo(**f) for f in d.get("files", [])],
            attachments=[FileInfo(**f) for f in d.get("attachments", [])],
            aliases=d.get("aliases", []),
            missing=d.get("missing", []),
        )


class RegistryClient:
    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        concurrency: int = 4,
        part_size: int = 64 * 1024 * 1024,
        timeout: float = 300.0,
        retries: int = 3,
    ):
        self.base_url = base_url.rstrip("/")
        self.cache_dir = Path(cache_dir or Path.home() / ".cache" / "nanochat" / "registry").expanduser()
        self.concurrency, self.part_size, self.retries = max(1, concurrency), max(1, part_size), max(1, retries)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        limits = httpx.Limits(max_connections=2 * self.concurrency + 4, max_keepalive_connections=2 * self.concurrency)
        self.http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=httpx.Timeout(timeout, connect=10.0), limits=limits
        )
        # Presigned parts go to S3 itself: a client without the registry's bearer token.
        self.direct = httpx.Client(timeout=httpx.Timeout(timeout, connect=10.0), limits=limits)

    def close(self) -> None:
        self.http.close()
        self.direct.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, method: str, url: str, **kw) -> httpx.Response:
        if "json" in kw:
            # ASCII JSON with \u escapes: text that is no valid UTF-8 (a file name in another
            # encoding, held as a lone surrogate) still reaches the registry, which names it in a 422.
            kw["content"] = json.dumps(kw.pop("json"), allow_nan=False).encode()
            kw["headers"] = {**kw.get("headers", {}), "Content-Type": "application/json"}
        if method == "GET":
            # Reads are safe to repeat; writes are retried where a whole step is (a file's PUT).
            return self._retry(lambda: self._send(method, url, **kw))
        return self._send(method, url, **kw)

    def _send(self, method: str, url: str, **kw) -> httpx.Response:
        r = self.http.request(method, url, **kw)
        if r.status_code >= 400:
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = r.text[:500]
            raise RegistryError(r.status_code, message)
        return r

    @staticmethod
    def _v(name: str, version: int) -> str:
        return f"/v1/models/{quote(name, safe='')}/versions/{version}"

    def _file_url(self, name: str, version: int, kind: str, path: str) -> str:
        """The URL of a version's file (`kind` files or attachments), each path segment
        percent-encoded: `a#b` or `100%.txt` would otherwise be cut or misread by the URL."""
        return f"{self._v(name, version)}/{kind}/{quote_path(path)}"

    def _retry(self, call: Callable[[], T]) -> T:
        """`call`, tried `retries` times in all with backoff, again only after a transport error
        or a try-again answer (502, 503, 504); each try must be safe to repeat."""
        retrying = Retrying(
            stop=stop_after_attempt(self.retries),
            wait=wait_exponential(multiplier=0.2, max=5),
            retry=retry_if_exception(_transient),
            reraise=True,
        )
        return retrying(call)

    def list_models(self) -> list[dict]:
        return self._request("GET", "/v1/models").json()["items"]

    def list_versions(
        self,
        name: str,
        stage: list[str] | None = None,
        state: list[str] | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[VersionInfo]:
        params = {"stage": stage or [], "state": state or [], "limit": limit, "offset": offset}
        items = self._request("GET", f"/v1/models/{quote(name, safe='')}/versions", params=params).json()["items"]
        return [VersionInfo.from_json(d) for d in items]

    def get_version(self, name: str, version: int) -> VersionInfo:
        return VersionInfo.from_json(self._request("GET", self._v(name, version)).json())

    def resolve(self, name: str, stage: str | list[str] | None = None, alias: str | None = None) -> VersionInfo:
        params = {}
        if alias is not None:
            params["alias"] = alias
        if stage:
            params["stage"] = stage if isinstance(stage, str) else ",".join(stage)
        return VersionInfo.from_json(self._request("GET", f"/v1/resolve/{quote(name, safe='')}", params=params).json())

    def lineage(self, name: str, version: int) -> dict:
        return self._request("GET", f"{self._v(name, version)}/lineage").json()

    def set_alias(self, name: str, alias: str, version: int) -> None:
        url = f"/v1/models/{quote(name, safe='')}/aliases/{quote(alias, safe='')}"
        self._request("PUT", url, json={"version": version})

    def patch_metrics(self, name: str, version: int, metrics: dict) -> VersionInfo:
        return VersionInfo.from_json(self._request("PATCH", self._v(name, version), json={"metrics": metrics}).json())

    def delete_version(self, name: str, version: int, force: bool = False) -> None:
        self._request("DELETE", self._v(name, version), params={"force": str(force).lower()})

    def attach(self, name: str, version: int, path: str | os.PathLike, as_path: str | None = None) -> FileInfo:
        """Add a describing file (report card, plot) to a committed version."""
        size, sha = file_digest(path)
        rel = as_path or Path(path).name
        headers = {"Content-Length": str(size), "X-Content-SHA256": sha, "Content-Type": "application/octet-stream"}
        url = self._file_url(name, version, "attachments", rel)
        self._retry(lambda: self._request("PUT", url, content=_read_chunks(Path(path)), headers=headers))
        return FileInfo(rel, size, sha)

    def read_attachment(self, name: str, version: int, path: str) -> bytes:
        """An attachment's bytes, checked against the sha256 the registry recorded."""
        info = self.get_version(name, version)
        record = next((f for f in info.attachments if f.path == path), None)
        if record is None:
            raise RegistryError(404, f"{name}:{version} has no attachment {path!r}")
        data = self._request("GET", self._file_url(name, version, "attachments", path)).content
        if hashlib.sha256(data).hexdigest() != record.sha256:
            raise IntegrityError(f"{name} v{version} attachment {path}: bytes differ from the recorded sha256")
        return data

    def upload_folder(
        self,
        folder: str | os.PathLike,
        name: str,
        stage: str,
        step: int | None = None,
        metrics: dict | None = None,
        parent: int | dict | None = None,
        job_id: str | None = None,
        meta: dict | None = None,
        resume_version: int | None = None,
    ) -> VersionInfo:
        """Upload a checkpoint folder as a new version (or finish `resume_version`) and commit it."""
        folder = Path(folder)
        manifest = read_manifest(folder)
        sources: dict[str, Path | bytes] = {rel: folder / rel for rel in manifest["files"]}
        files = dict(manifest["files"])
        # The manifest travels too, so a downloaded folder is byte-identical; one is made if absent.
        if (folder / MANIFEST_FILE).exists():
            sources[MANIFEST_FILE] = folder / MANIFEST_FILE
            size, sha = file_digest(folder / MANIFEST_FILE)
        else:
            data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
            sources[MANIFEST_FILE] = data
            size, sha = len(data), hashlib.sha256(data).hexdigest()
        files[MANIFEST_FILE] = {"size": size, "sha256": sha}

        if resume_version is None:
            if meta is None and (folder / "meta.json").exists():
                meta = json.loads((folder / "meta.json").read_text())
            body = {
                "stage": stage,
                "files": files,
                "step": step,
                "metrics": metrics or {},
                "meta": meta or {},
                "job_id": job_id,
            }
            if parent is not None:
                body["parent"] = {"version": parent} if isinstance(parent, int) else parent
            created = self._request("POST", f"/v1/models/{name}/versions", json=body).json()
        else:
            created = self._request("GET", f"{self._v(name, resume_version)}/upload").json()
            declared = {f["path"]: {"size": f["size"], "sha256": f["sha256"]} for f in created["files"]}
            if declared != files:
                raise UploadError(name, resume_version, ValueError("the folder changed since the upload began"))
        version = created["version"]
        missing = created.get("missing", [])
        # S3 wants parts of 5 MiB or more; smaller files and parts stream through the registry.
        direct = [
            rel
            for rel in missing
            if created.get("presigned_uploads")
            and isinstance(sources[rel], Path)
            and files[rel]["size"] > self.part_size >= 5 * 1024 * 1024
        ]
        try:
            with ThreadPoolExecutor(self.concurrency) as pool:
                list(
                    pool.map(
                        lambda rel: self._put_file(name, version, rel, sources[rel], files[rel]),
                        [rel for rel in missing if rel not in direct],
                    )
                )
            for rel in direct:
                self._put_file_presigned(name, version, rel, sources[rel])
            return VersionInfo.from_json(self._request("POST", f"{self._v(name, version)}/commit").json())
        except (httpx.HTTPError, RegistryError, OSError) as e:
            raise UploadError(name, version, e) from e

    def _put_file(self, name: str, version: int, rel: str, source: Path | bytes, spec: dict) -> None:
        url = self._file_url(name, version, "files", rel)
        headers = {"Content-Length": str(spec["size"]), "Content-Type": "application/octet-stream"}

        def put() -> None:
            content = source if isinstance(source, bytes) else _read_chunks(source)
            self._request("PUT", url, content=content, headers=headers)

        self._retry(put)

    def _put_file_presigned(self, name: str, version: int, rel: str, source: Path) -> None:
        """Send one file as parts straight to S3 (`concurrency` at once), then have the registry
        assemble and verify it."""
        up = self._request(
            "POST", f"{self._v(name, version)}/uploads", json={"path": rel, "part_size": self.part_size}
        ).json()
        if up["stored"]:
            return
        base = f"{self._v(name, version)}/uploads/{up['id']}"

        def send(number: int) -> None:
            start = (number - 1) * up["part_size"]
            length = min(up["part_size"], up["size"] - start)
            sha = hashlib.sha256()
            for chunk in _read_chunks(source, start, length):
                sha.update(chunk)
            part = self._request("POST", f"{base}/parts/{number}", json={"sha256": sha.hexdigest()}).json()

            def put() -> None:
                r = self.direct.request(
                    part["method"],
                    part["url"],
                    content=_read_chunks(source, start, length),
                    headers={**part["headers"], "Content-Length": str(length)},
                )
                if r.status_code >= 400:
                    raise RegistryError(r.status_code, f"S3 refused part {number} of {rel}: {r.text[:300]}")

            self._retry(put)

        with ThreadPoolExecutor(self.concurrency) as pool:
            list(pool.map(send, range(1, up["parts"] + 1)))
        self._request("POST", f"{base}/complete")

    def download(
        self, name: str, version: int | None = None, alias: str | None = None, stage: str | list[str] | None = None
    ) -> Path:
        """A verified local folder of the version (resolved by alias/stage if no number is given):
        its model files, exactly what its manifest lists. Attachments (report cards, eval records)
        describe the version and may be added after commit; `read_attachment` fetches them."""
        info = self.get_version(name, version) if version is not None else self.resolve(name, stage, alias)
        wanted = {f.path: f for f in info.files}
        target = self.cache_dir / name / f"v{info.version}"
        if _cache_matches(target, wanted):
            return target
        tmp = self.cache_dir / name / f".tmp-{uuid.uuid4().hex}"
        try:
            for f in wanted.values():
                (tmp / f.path).parent.mkdir(parents=True, exist_ok=True)
            jobs = []
            for f in wanted.values():
                with open(tmp / f.path, "wb") as out:
                    out.truncate(f.size)
                starts = range(0, f.size, self.part_size) if f.size > self.part_size else [None]
                jobs += [(info.version, f, start) for start in starts]
            with ThreadPoolExecutor(self.concurrency) as pool:
                list(pool.map(lambda job: self._get_part(name, tmp, *job), jobs))
            marker = {}
            for f in wanted.values():
                size, sha = file_digest(tmp / f.path)
                if (size, sha) != (f.size, f.sha256):
                    raise IntegrityError(
                        f"{name} v{info.version} {f.path}: got {size} bytes sha256 {sha}, "
                        f"the registry recorded {f.size} bytes sha256 {f.sha256}"
                    )
                st = (tmp / f.path).stat()
                marker[f.path] = [st.st_size, st.st_mtime_ns, f.sha256]
            (tmp / CACHE_MARKER).write_text(json.dumps(marker))
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
            return target
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _get_part(self, name: str, folder: Path, version: int, f: FileInfo, start: int | None) -> None:
        headers = {}
        if start is not None:
            headers["Range"] = f"bytes={start}-{min(start + self.part_size, f.size) - 1}"
        url = self._file_url(name, version, "files", f.path)

        def get() -> None:
            with self.http.stream("GET", url, headers=headers) as r:
                if r.status_code >= 400:
                    r.read()
                    raise RegistryError(r.status_code, r.text[:500])
                with open(folder / f.path, "r+b") as out:
                    out.seek(start or 0)
                    for chunk in r.iter_bytes(CHUNK):
                        out.write(chunk)

        self._retry(get)


def quote_path(path: str) -> str:
    """`path` for a URL: each `/`-separated segment percent-encoded (UTF-8), the separators kept."""
    return "/".join(quote(segment, safe="") for segment in path.split("/"))


def _transient(e: BaseException) -> bool:
    return isinstance(e, httpx.TransportError) or (isinstance(e, RegistryError) and e.status in RETRY_STATUSES)


def _read_chunks(path: Path, start: int = 0, length: int | None = None) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(start)
        left = length
        while left is None or left > 0:
            chunk = f.read(CHUNK if left is None else min(CHUNK, left))
            if not chunk:
                return
            if left is not None:
                left -= len(chunk)
            yield chunk


def _cache_matches(target: Path, wanted: dict[str, FileInfo]) -> bool:
    """A cached folder is reused when it holds exactly the wanted files with their hashes; files
    unchanged since they were verified (same size and mtime) are not hashed again."""
    try:
        marker = json.loads((target / CACHE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    if set(marker) != set(wanted):
        return False
    for rel, f in wanted.items():
        p = target / rel
        try:
            st = p.stat()
        except OSError:
            return False
        size, mtime_ns, sha = marker[rel]
        if sha != f.sha256 or st.st_size != f.size:
            return False
        if st.st_mtime_ns != mtime_ns and file_digest(p)[1] != f.sha256:
            return False
    return True
