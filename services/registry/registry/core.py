"""Registry logic as plain functions over a `Registry` (database sessions, blob store, events).

The HTTP layer (`registry.routes`, mounted by `registry.api`) only parses requests and calls
these; tests can call them directly. Every function raises a `RegistryError` subclass for
anything the caller got wrong, which the HTTP layer turns into a JSON error with the matching
status.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TypeVar

from nanochat_contracts import names, serving
from sqlalchemy import delete, exists, func, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from tenacity import Retrying, before_sleep_log, retry_if_exception_type, stop_after_attempt, wait_incrementing

from registry import file_names, json_values
from registry.blobs import MAX_PART, MAX_PARTS, MIN_PART, BlobMismatch, BlobStore, BlobWriter, PartsMissing
from registry.db import Alias, Blob, File, Model, Upload, Version, utcnow
from registry.events import EventPublisher
from registry.schemas import VersionCreate

log = logging.getLogger("registry.core")
T = TypeVar("T")


class RegistryError(Exception):
    status = 400
    type = "bad_request"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param


class BadRequest(RegistryError):
    pass


class Invalid(RegistryError):
    status, type = 422, "invalid_value"


class NotFound(RegistryError):
    status, type = 404, "not_found"


class Conflict(RegistryError):
    status, type = 409, "conflict"


@dataclass
class Registry:
    sessions: sessionmaker
    blobs: BlobStore
    events: EventPublisher
    max_path_length: int = 512
    # Whether model files may go straight to the blob store through presigned part URLs (S3 only).
    presigned_uploads: bool = False
    presign_expiry_s: int = 3600


def check_name(name: str) -> str:
    if not names.is_name(name):
        raise BadRequest(
            f"invalid model name {name!r}: letters, digits, '.', '_', '-', at most {names.NAME_MAX}, starting alnum"
        )
    return name


def check_alias(alias: str) -> str:
    if not names.is_alias(alias):
        raise BadRequest(
            f"invalid alias {alias!r}: letters, digits, '.', '_', '-', "
            f"at most {names.ALIAS_MAX}, starting with a letter"
        )
    return alias


def check_path(path: str, max_length: int = 512) -> str:
    """A path a version may hold (`registry.file_names`), else a 422 naming it."""
    try:
        return file_names.check(path, max_length)
    except ValueError as e:
        raise Invalid(str(e), param="path") from None


def _retrying(fn: Callable[[], T], attempts: int = 20) -> T:
    """Run a transaction, retrying the races a unique constraint or a lock timeout reports."""
    retrying = Retrying(
        stop=stop_after_attempt(attempts),
        wait=wait_incrementing(start=0.01, increment=0.01),
        retry=retry_if_exception_type((IntegrityError, OperationalError)),
        before_sleep=before_sleep_log(log, logging.INFO),
        reraise=True,
    )
    return retrying(fn)


def _version(s: Session, name: str, version: int, states: Iterable[str] | None = None) -> Version:
    v = s.scalar(select(Version).where(Version.name == name, Version.version == version))
    if v is None or (states is not None and v.state not in states):
        raise NotFound(f"{name} v{version} not found" + ("" if states is None else f" in state {'/'.join(states)}"))
    return v


def _utc(moment: datetime | None) -> datetime | None:
    """Times are written in UTC; SQLite gives them back without their zone, which is put back."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=timezone.utc)


def version_dict(s: Session, v: Version) -> dict:
    files = s.scalars(select(File).where(File.version_id == v.id).order_by(File.path)).all()
    aliases = s.scalars(select(Alias.alias).where(Alias.name == v.name, Alias.version == v.version)).all()
    parent = None
    if v.parent_version is not None:
        parent = {"name": v.parent_name, "version": v.parent_version}
    return {
        "name": v.name,
        "version": v.version,
        "stage": v.stage,
        "state": v.state,
        "step": v.step,
        "metrics": json_values.readable(v.metrics or {}, f"{v.name} v{v.version} metrics"),
        "meta": json_values.readable(v.meta or {}, f"{v.name} v{v.version} meta"),
        "parent": parent,
        "job_id": v.job_id,
        "created_at": _utc(v.created_at),
        "committed_at": _utc(v.committed_at),
        "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in files if f.kind == "model"],
        "attachments": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in files if f.kind == "attachment"],
        "aliases": sorted(aliases),
    }


def _claim(s: Session, shas: Iterable[str]) -> set[str]:
    """Mark stored blobs as just claimed and return which of `shas` are stored.

    The UPDATE locks their rows until the caller's transaction ends, and the sweeper deletes a
    blob only with a conditional DELETE (unreferenced and not claimed since its cutoff) whose
    object goes in the same transaction: either the sweep went first and the blob is reported
    missing (and uploaded again), or the claim went first and the sweep leaves the blob alone."""
    shas = sorted(set(shas))
    if not shas:
        return set()
    return set(s.scalars(update(Blob).where(Blob.sha256.in_(shas)).values(claimed_at=utcnow()).returning(Blob.sha256)))


def _missing(s: Session, files: Iterable[File]) -> list[str]:
    files = list(files)
    shas = {f.sha256 for f in files}
    stored = set(s.scalars(select(Blob.sha256).where(Blob.sha256.in_(shas)))) if shas else set()
    return sorted(f.path for f in files if f.sha256 not in stored)


def create_version(reg: Registry, name: str, req: VersionCreate) -> dict:
    """A new `pending` version with the next number; answers it with the files still to upload."""
    check_name(name)
    for path in req.files:
        check_path(path, reg.max_path_length)
    if not req.files:
        raise BadRequest("a version needs at least one file")
    parent_name = None
    if req.parent is not None:
        parent_name = check_name(req.parent.name or name)
        with reg.sessions() as s:
            _version(s, parent_name, req.parent.version, states=("ready",))

    def attempt() -> dict:
        with reg.sessions.begin() as s:
            number = s.scalar(
                update(Model)
                .where(Model.name == name)
                .values(last_version=Model.last_version + 1)
                .returning(Model.last_version)
            )
            if number is None:
                # First version of this model; a concurrent first insert makes this fail and retry.
                s.add(Model(name=name, last_version=1, created_at=utcnow()))
                s.flush()
                number = 1
            now = utcnow()
            v = Version(
                name=name,
                version=number,
                stage=req.stage,
                state="pending",
                step=req.step,
                metrics=dict(req.metrics),
                meta=req.meta,
                parent_name=parent_name,
                parent_version=req.parent.version if req.parent else None,
                job_id=req.job_id,
                created_at=now,
                updated_at=now,
            )
            s.add(v)
            s.flush()
            rows = [
                File(version_id=v.id, path=p, size=f.size, sha256=f.sha256, kind="model") for p, f in req.files.items()
            ]
            s.add_all(rows)
            s.flush()
            out = version_dict(s, v)
            stored = _claim(s, (f.sha256 for f in rows))
            out["missing"] = sorted(f.path for f in rows if f.sha256 not in stored)
            return out

    return _retrying(attempt)


def get_version(reg: Registry, name: str, version: int, include_pending: bool = False) -> dict:
    states = ("ready", "pending") if include_pending else ("ready",)
    with reg.sessions() as s:
        return version_dict(s, _version(s, name, version, states))


def upload_status(reg: Registry, name: str, version: int) -> dict:
    """A pending or ready version with its `missing` files (for resuming an upload)."""
    with reg.sessions() as s:
        v = _version(s, name, version, ("pending", "ready"))
        out = version_dict(s, v)
        out["missing"] = _missing(s, s.scalars(select(File).where(File.version_id == v.id, File.kind == "model")))
        return out


def begin_upload(
    reg: Registry,
    name: str,
    version: int,
    path: str,
    attachment: bool = False,
    size: int | None = None,
    sha256: str | None = None,
) -> tuple[dict, BlobWriter | None]:
    """Check an upload may start; returns the file spec and a blob writer (None: already stored).

    Model files must be in the version's manifest and the version pending; attachments go to ready
    versions and declare size and sha256 themselves."""
    check_path(path, reg.max_path_length)
    with reg.sessions.begin() as s:
        if attachment:
            v = _version(s, name, version, ("ready",))
            if size is None or sha256 is None or not re.fullmatch(r"[0-9a-f]{64}", sha256):
                raise BadRequest("an attachment needs Content-Length and X-Content-SHA256 (lowercase hex) headers")
            existing = s.get(File, (v.id, path))
            if existing is not None and existing.kind == "model":
                raise Conflict(f"{path} is a model file of {name} v{version}; model files never change")
            spec = {"path": path, "size": size, "sha256": sha256}
        else:
            v = _version(s, name, version, ("pending",))
            f = s.get(File, (v.id, path))
            if f is None or f.kind != "model":
                raise BadRequest(f"{path} is not in the manifest of {name} v{version}")
            spec = {"path": path, "size": f.size, "sha256": f.sha256}
            v.updated_at = utcnow()
        stored = bool(_claim(s, [spec["sha256"]]))
    if stored and reg.blobs.size(spec["sha256"]) == spec["size"]:
        return spec, None
    return spec, reg.blobs.writer(spec["sha256"], spec["size"])


def _record_blob(reg: Registry, spec: dict) -> None:
    def record() -> None:
        with reg.sessions.begin() as s:
            if not _claim(s, [spec["sha256"]]):
                now = utcnow()
                s.add(Blob(sha256=spec["sha256"], size=spec["size"], created_at=now, claimed_at=now))

    _retrying(record)


def finish_upload(
    reg: Registry, name: str, version: int, spec: dict, writer: BlobWriter | None, attachment: bool = False
) -> dict:
    """Publish a written blob (verified against its declared size and sha256) and record it."""
    if writer is not None:
        try:
            writer.finish()
        except BlobMismatch as e:
            raise BadRequest(f"{spec['path']}: {e}") from e

        _record_blob(reg, spec)
    if attachment:

        def attach() -> None:
            with reg.sessions.begin() as s:
                v = _version(s, name, version, ("ready",))
                f = s.get(File, (v.id, spec["path"]))
                if f is None:
                    s.add(
                        File(
                            version_id=v.id,
                            path=spec["path"],
                            size=spec["size"],
                            sha256=spec["sha256"],
                            kind="attachment",
                        )
                    )
                else:
                    f.size, f.sha256 = spec["size"], spec["sha256"]

        _retrying(attach)
    return {**spec, "stored": True}


def _pending_file(s: Session, name: str, version: int, path: str) -> tuple[Version, dict]:
    v = _version(s, name, version, ("pending",))
    f = s.get(File, (v.id, path))
    if f is None or f.kind != "model":
        raise BadRequest(f"{path} is not in the manifest of {name} v{version}")
    v.updated_at = utcnow()
    return v, {"path": path, "size": f.size, "sha256": f.sha256}


def _open_upload(s: Session, name: str, version: int, upload: str) -> tuple[Upload, dict]:
    v = _version(s, name, version, ("pending",))
    up = s.get(Upload, upload)
    if up is None or up.version_id != v.id:
        raise NotFound(f"{name} v{version} has no open upload {upload!r}")
    _, spec = _pending_file(s, name, version, up.path)
    return up, spec


def start_presigned(reg: Registry, name: str, version: int, path: str, part_size: int) -> dict:
    """Open a presigned multipart upload of a model file straight into the blob store."""
    if not reg.presigned_uploads:
        raise BadRequest("this registry takes uploads through PUT .../files/{path} only (no presigned part URLs)")
    check_path(path, reg.max_path_length)
    with reg.sessions.begin() as s:
        _, spec = _pending_file(s, name, version, path)
        stored = bool(_claim(s, [spec["sha256"]]))
    if stored and reg.blobs.size(spec["sha256"]) == spec["size"]:
        return {**spec, "id": None, "part_size": part_size, "parts": 0, "stored": True}
    count = -(-spec["size"] // part_size)
    if spec["size"] == 0 or not MIN_PART <= part_size <= MAX_PART or count > MAX_PARTS:
        raise BadRequest(
            f"{path}: {spec['size']} bytes in parts of {part_size} does not fit S3 "
            f"(parts of {MIN_PART}..{MAX_PART} bytes, at most {MAX_PARTS} parts, a non-empty file)"
        )
    upload = uuid.uuid4().hex
    upload_id = reg.blobs.start_staged(upload)

    def record() -> None:
        with reg.sessions.begin() as s:
            v, _ = _pending_file(s, name, version, path)
            s.add(
                Upload(
                    id=upload,
                    version_id=v.id,
                    path=path,
                    s3_upload_id=upload_id,
                    part_size=part_size,
                    created_at=utcnow(),
                )
            )

    try:
        _retrying(record)
    except BaseException:
        reg.blobs.abort_staged(upload, upload_id)
        raise
    return {**spec, "id": upload, "part_size": part_size, "parts": count, "stored": False}


def presign_part(reg: Registry, name: str, version: int, upload: str, number: int, sha256: str) -> dict:
    """A URL to PUT part `number` (whose sha256 the client gives) straight to S3, with its headers."""
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise BadRequest("sha256 must be 64 lowercase hex characters")
    with reg.sessions.begin() as s:
        up, spec = _open_upload(s, name, version, upload)
        s3_upload_id, part_size = up.s3_upload_id, up.part_size
    count = -(-spec["size"] // part_size)
    if not 1 <= number <= count:
        raise BadRequest(f"part number must be 1..{count}")
    url, headers = reg.blobs.presign_part(upload, s3_upload_id, number, sha256, reg.presign_expiry_s)
    size = part_size if number < count else spec["size"] - (count - 1) * part_size
    return {"url": url, "method": "PUT", "headers": headers, "size": size}


def complete_presigned(reg: Registry, name: str, version: int, upload: str) -> dict:
    """Assemble an upload's parts, check the whole file against the manifest, store it as a blob."""
    with reg.sessions.begin() as s:
        up, spec = _open_upload(s, name, version, upload)
        s3_upload_id, part_size = up.s3_upload_id, up.part_size
    try:
        reg.blobs.complete_staged(upload, s3_upload_id, spec["sha256"], spec["size"], part_size)
    except PartsMissing as e:
        raise Conflict(f"{spec['path']}: {e}") from e
    except BlobMismatch as e:
        _drop_upload(reg, upload)
        raise BadRequest(f"{spec['path']}: the assembled parts do not match the manifest: {e}") from e
    _record_blob(reg, spec)
    _drop_upload(reg, upload)
    return {**spec, "stored": True}


def _drop_upload(reg: Registry, upload: str) -> None:
    with reg.sessions.begin() as s:
        up = s.get(Upload, upload)
        if up is not None:
            s.delete(up)


def commit(reg: Registry, name: str, version: int) -> dict:
    """Make a pending version `ready` once every manifest file is stored with its size and sha256."""
    with reg.sessions() as s:
        v = _version(s, name, version, ("pending", "ready"))
        if v.state == "ready":
            return version_dict(s, v)
        files = s.scalars(select(File).where(File.version_id == v.id, File.kind == "model")).all()
        missing = _missing(s, files)
    # The blob table says what was verified; the store is asked too, in case a blob was lost since.
    missing += [f.path for f in files if f.path not in missing and reg.blobs.size(f.sha256) != f.size]
    if missing:
        raise Conflict(f"cannot commit {name} v{version}: not uploaded or not matching: {sorted(missing)[:20]}")
    with reg.sessions.begin() as s:
        done = s.execute(
            update(Version)
            .where(Version.name == name, Version.version == version, Version.state == "pending")
            .values(state="ready", committed_at=utcnow(), updated_at=utcnow())
        ).rowcount
        v = _version(s, name, version)
        if not done and v.state != "ready":
            raise Conflict(f"{name} v{version} is {v.state}, not pending")
        out = version_dict(s, v)
    if done:
        reg.events.publish("model.registered", name, version, out["stage"])
    return out


def list_models(reg: Registry) -> list[dict]:
    with reg.sessions() as s:
        rows = s.execute(
            select(Version.name, func.max(Version.version), func.count())
            .where(Version.state == "ready")
            .group_by(Version.name)
            .order_by(Version.name)
        ).all()
        aliases: dict[str, dict[str, int]] = {}
        for a in s.scalars(select(Alias)):
            aliases.setdefault(a.name, {})[a.alias] = a.version
        return [
            {"name": n, "latest_version": latest, "versions": count, "aliases": aliases.get(n, {})}
            for n, latest, count in rows
        ]


def list_versions(
    reg: Registry,
    name: str,
    stages: list[str] | None = None,
    states: list[str] | None = None,
    limit: int = 50,
    offset: int = 0,
) -> dict:
    """Versions of `name`, newest first; only `ready` ones unless `states` asks for others."""
    check_name(name)
    q = select(Version).where(Version.name == name, Version.state.in_(states or ["ready"]))
    if stages:
        q = q.where(Version.stage.in_(stages))
    with reg.sessions() as s:
        total = s.scalar(select(func.count()).select_from(q.subquery()))
        rows = s.scalars(q.order_by(Version.version.desc()).limit(limit).offset(offset)).all()
        return {"items": [version_dict(s, v) for v in rows], "total": total, "limit": limit, "offset": offset}


def patch_version(reg: Registry, name: str, version: int, metrics: dict) -> dict:
    """Merge `metrics` into the version's metrics (evals arrive after training)."""

    def attempt() -> dict:
        with reg.sessions.begin() as s:
            v = s.scalar(
                select(Version)
                .where(Version.name == name, Version.version == version, Version.state.in_(("ready", "pending")))
                .with_for_update()
            )
            if v is None:
                raise NotFound(f"{name} v{version} not found")
            # A stored value the checks refuse is merged repaired, so a PATCH also cleans it up.
            merged = {**json_values.readable(v.metrics or {}, f"{name} v{version} metrics"), **metrics}
            try:
                json_values.check_json(merged, json_values.MAX_METRICS_BYTES)
            except ValueError as e:
                raise Invalid(f"{name} v{version}'s metrics with these merged in: {e}", param="metrics") from None
            v.metrics = merged
            v.updated_at = utcnow()
            s.flush()
            return version_dict(s, v)

    return _retrying(attempt)


def delete_version(reg: Registry, name: str, version: int, force: bool = False) -> dict:
    """Soft-delete: the version disappears from lists and resolve; an aliased one needs `force`."""
    with reg.sessions.begin() as s:
        v = _version(s, name, version, ("ready", "pending", "failed"))
        aliases = s.scalars(select(Alias).where(Alias.name == name, Alias.version == version)).all()
        if aliases and not force:
            raise Conflict(
                f"{name} v{version} is aliased as {sorted(a.alias for a in aliases)}; delete with force=true"
            )
        for a in aliases:
            s.delete(a)
        v.state, v.deleted_at, v.updated_at = "deleted", utcnow(), utcnow()
        s.flush()
        out = version_dict(s, v)
    reg.events.publish("version.deleted", name, version, out["stage"])
    return out


def set_alias(reg: Registry, name: str, alias: str, version: int) -> dict:
    """Point `alias` at a ready version, creating or moving it in one transaction."""
    check_name(name)
    check_alias(alias)

    def attempt() -> str:
        with reg.sessions.begin() as s:
            v = _version(s, name, version, ("ready",))
            a = s.get(Alias, (name, alias), with_for_update=True)
            if a is None:
                s.add(Alias(name=name, alias=alias, version=version, updated_at=utcnow()))
            else:
                a.version, a.updated_at = version, utcnow()
            return v.stage

    stage = _retrying(attempt)
    reg.events.publish("alias.moved", name, version, stage, alias=alias)
    return {"name": name, "alias": alias, "version": version}


def get_alias(reg: Registry, name: str, alias: str) -> dict:
    with reg.sessions() as s:
        a = s.get(Alias, (name, alias))
        if a is None:
            raise NotFound(f"{name} has no alias {alias!r}")
        return {"name": name, "alias": alias, "version": a.version}


def delete_alias(reg: Registry, name: str, alias: str) -> None:
    with reg.sessions.begin() as s:
        a = s.get(Alias, (name, alias))
        if a is None:
            raise NotFound(f"{name} has no alias {alias!r}")
        s.delete(a)


def resolve(reg: Registry, name: str, stages: list[str] | None = None, alias: str | None = None) -> dict:
    """The version an alias points at, or the newest ready version whose stage is one of `stages`
    (sft or rl when none are given): the serving rule, `nanochat_contracts.serving`."""
    check_name(name)
    if alias is not None and stages:
        raise BadRequest("give either alias or stage, not both")
    with reg.sessions() as s:
        if alias is not None:
            a = s.get(Alias, (name, alias))
            if a is None:
                raise NotFound(f"{name} has no alias {alias!r}")
            return version_dict(s, _version(s, name, a.version, ("ready",)))
        stages = stages or list(serving.SERVED_STAGES)
        # The rule itself runs on the (version, stage, state) rows, so it is the contract's code, not
        # a copy of it in SQL; the WHERE only keeps the rows small (one model has tens of versions).
        rows = s.execute(
            select(Version.version, Version.stage, Version.state).where(
                Version.name == name, Version.state == "ready", Version.stage.in_(stages)
            )
        ).all()
        chosen = serving.newest(rows, stages)
        if chosen is not None:
            # Ready again: a delete committed between the two reads must not be answered.
            return version_dict(s, _version(s, name, chosen.version, ("ready",)))
    raise NotFound(f"{name} has no ready version of stage {'/'.join(stages)}")


def lineage(reg: Registry, name: str, version: int) -> dict:
    """The version, its parents up to the root (usually the tokenizer), and its children."""
    with reg.sessions() as s:
        v = _version(s, name, version, ("ready",))
        parents, seen, cur = [], {(v.name, v.version)}, v
        while cur.parent_version is not None and (cur.parent_name, cur.parent_version) not in seen:
            seen.add((cur.parent_name, cur.parent_version))
            cur = s.scalar(
                select(Version).where(Version.name == cur.parent_name, Version.version == cur.parent_version)
            )
            if cur is None:
                break
            parents.append(version_dict(s, cur))
        children = s.scalars(
            select(Version)
            .where(Version.parent_name == name, Version.parent_version == version, Version.state == "ready")
            .order_by(Version.name, Version.version)
        ).all()
        return {"version": version_dict(s, v), "parents": parents, "children": [version_dict(s, c) for c in children]}


def open_file(reg: Registry, name: str, version: int, path: str) -> dict:
    """The stored file `path` (model file or attachment) of a ready version."""
    check_path(path, reg.max_path_length)
    with reg.sessions() as s:
        v = _version(s, name, version, ("ready",))
        f = s.get(File, (v.id, path))
        if f is None:
            raise NotFound(f"{name} v{version} has no file {path!r}")
        return {"path": f.path, "size": f.size, "sha256": f.sha256, "kind": f.kind}


def _orphans(s: Session, cutoff: datetime) -> list[str]:
    """Blobs no file refers to and nobody claimed since `cutoff`: candidates, rechecked one by one."""
    return list(
        s.scalars(select(Blob.sha256).where(Blob.sha256.not_in(select(File.sha256)), Blob.claimed_at <= cutoff))
    )


def _drop_orphan(reg: Registry, sha256: str, cutoff: datetime) -> int:
    """Delete one blob if it is still unreferenced and unclaimed; its object goes while the row's
    delete is uncommitted, so a concurrent claim waits for both and then finds it missing."""
    with reg.sessions.begin() as s:
        gone = s.execute(
            delete(Blob).where(
                Blob.sha256 == sha256, Blob.claimed_at <= cutoff, ~exists().where(File.sha256 == Blob.sha256)
            )
        ).rowcount
        if gone:
            reg.blobs.delete(sha256)
        return gone


def sweep(reg: Registry, older_than_s: float) -> dict:
    """Clean up after abandoned uploads: pending versions untouched for `older_than_s` become
    `failed` (never visible), blobs no version refers to and nobody claimed for `older_than_s`
    are deleted, and the blob store drops its stale temp files / aborts stale multipart uploads."""
    cutoff = datetime.now(timezone.utc) - timedelta(seconds=older_than_s)
    with reg.sessions.begin() as s:
        stale = s.scalars(select(Version).where(Version.state == "pending", Version.updated_at <= cutoff)).all()
        for v in stale:
            v.state, v.updated_at = "failed", utcnow()
            for f in s.scalars(select(File).where(File.version_id == v.id)):
                s.delete(f)
        # The store aborts the multipart uploads themselves (they are as old as their rows or older).
        for up in s.scalars(select(Upload).where(Upload.created_at <= cutoff)):
            s.delete(up)
    with reg.sessions() as s:
        candidates = _orphans(s, cutoff)
    deleted = sum(_retrying(lambda sha=sha: _drop_orphan(reg, sha, cutoff)) for sha in candidates)
    store_cleaned = reg.blobs.sweep(older_than_s)
    if stale or deleted or store_cleaned:
        log.info("sweep: %d abandoned versions, %d orphan blobs, %d stale uploads", len(stale), deleted, store_cleaned)
    return {"failed_versions": len(stale), "deleted_blobs": deleted, "aborted_uploads": store_cleaned}
