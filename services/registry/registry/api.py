"""The registry's HTTP API (FastAPI): thin routes over `registry.core`, auth, errors, metrics.

`create_app(settings)` builds the app; `python -m registry` serves it with uvicorn. OpenAPI at
/docs. Writes need `Authorization: Bearer <REGISTRY_WRITE_TOKEN>`; with no write token set they
are refused, unless REGISTRY_ALLOW_ANONYMOUS_WRITES=true. Reads need a token too when
REGISTRY_READ_TOKEN_REQUIRED is set (the read or the write token).
"""

import asyncio
import logging
import re
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import FastAPI, Path, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge
from service_kit.app import create_app as create_service_app
from service_kit.auth import Tokens, require_read, require_write
from service_kit.errors import ErrorResponse, error_response
from service_kit.ops import Readiness, probe
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from registry import core, schemas
from registry.blobs import BlobMismatch, LocalBlobs, S3Blobs
from registry.db import STAGES, make_engine, make_sessionmaker, migrate
from registry.events import EventPublisher
from registry.settings import Settings

log = logging.getLogger("registry.api")

UPLOAD_BUFFER = 1024 * 1024
Name = Annotated[str, Path(min_length=1, max_length=128, description="model name")]
VersionNo = Annotated[int, Path(ge=1, le=2**31 - 1)]
FilePath = Annotated[str, Path(min_length=1, description="relative path inside the version")]
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 416, 422)}
NO_WRITE_TOKEN = ("writes are disabled: the registry has no REGISTRY_WRITE_TOKEN set "
                  "(set one, or REGISTRY_ALLOW_ANONYMOUS_WRITES=true for a private dev setup)")


class Metrics:
    """The registry's own metrics; the HTTP ones come from the service kit, into the same registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.uploaded = Counter("registry_upload_bytes_total", "bytes received in uploads", registry=self.registry)
        self.downloaded = Counter("registry_download_bytes_total", "bytes sent in downloads", registry=self.registry)
        self.events_pending = Gauge("registry_events_pending", "events waiting for Redis", registry=self.registry)


def make_registry(settings: Settings) -> core.Registry:
    engine = make_engine(settings.resolved_database_url())
    migrate(engine)
    if settings.blob_backend == "s3":
        blobs = S3Blobs.connect(settings.s3_endpoint, settings.s3_bucket, settings.s3_access_key,
                                settings.s3_secret_key, settings.s3_region, settings.s3_prefix, settings.s3_part_size,
                                settings.s3_parts_in_flight, settings.data_dir / "spool", settings.s3_public_endpoint)
        blobs.ensure_bucket()
    else:
        blobs = LocalBlobs(settings.resolved_blob_dir())
    events = EventPublisher(settings.redis_url, settings.events_channel, settings.events_stream,
                            settings.events_stream_maxlen)
    return core.Registry(make_sessionmaker(engine), blobs, events, settings.max_path_length,
                         presigned_uploads=settings.presigned_uploads and settings.blob_backend == "s3",
                         presign_expiry_s=settings.presign_expiry_s)


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """`bytes=a-b`, `bytes=a-` or `bytes=-n` as a half-open [start, end); None if unsatisfiable."""
    m = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None
    if not m.group(1):
        n = int(m.group(2))
        return (max(0, size - n), size) if n > 0 and size > 0 else None
    start = int(m.group(1))
    end = min(int(m.group(2)) + 1, size) if m.group(2) else size
    if start >= size or end <= start:
        return None
    return start, end


def readiness(request: Request) -> Readiness:
    reg: core.Registry = request.app.state.registry

    def database() -> None:
        with reg.sessions() as s:
            s.execute(text("SELECT 1"))

    return Readiness({"database": probe(database), "blobs": probe(reg.blobs.check)})


async def registry_error(request: Request, e: core.RegistryError) -> JSONResponse:
    return error_response(e.status, e.message, code=e.type)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        reg = await run_in_threadpool(make_registry, settings)
        app.state.registry = reg
        metrics.events_pending.set_function(reg.events.pending)
        if not settings.write_token and settings.allow_anonymous_writes:
            log.warning("REGISTRY_ALLOW_ANONYMOUS_WRITES is set and no write token: anyone who can reach this "
                        "port can write")
        elif not settings.write_token:
            log.warning("REGISTRY_WRITE_TOKEN is not set: every write is refused (401)")

        async def sweeper() -> None:
            while True:
                await asyncio.sleep(settings.sweep_interval_s)
                try:
                    await run_in_threadpool(core.sweep, reg, settings.pending_ttl_s)
                except Exception:
                    log.exception("sweep failed")

        task = asyncio.create_task(sweeper())
        try:
            yield
        finally:
            task.cancel()
            await run_in_threadpool(reg.events.close)

    tokens = Tokens(write_token=settings.write_token, read_token=settings.read_token,
                    reads_need_token=settings.read_token_required, anonymous_writes=settings.allow_anonymous_writes,
                    no_write_token=NO_WRITE_TOKEN)
    # No body limit: uploads stream model files of any size, counted against their manifest.
    app = create_service_app("registry", tokens=tokens, readiness=readiness, metrics=metrics.registry,
                             title="nanochat model registry", version="0.1.0", lifespan=lifespan,
                             description="Versioned, verified checkpoints with aliases, lineage and events.")
    app.exception_handler(core.RegistryError)(registry_error)
    Write, Read = [require_write], [require_read]

    def reg(request: Request) -> core.Registry:
        return request.app.state.registry

    @app.get("/v1/models", dependencies=Read, responses=ERRORS)
    def list_models(request: Request) -> schemas.ModelList:
        return {"items": core.list_models(reg(request))}

    @app.post("/v1/models/{name}/versions", dependencies=Write, status_code=201, responses=ERRORS)
    def create_version(request: Request, name: Name, body: schemas.VersionCreate) -> schemas.VersionCreated:
        r = reg(request)
        return {**core.create_version(r, name, body), "presigned_uploads": r.presigned_uploads}

    @app.get("/v1/models/{name}/versions", dependencies=Read, responses=ERRORS)
    def list_versions(
        request: Request, name: Name,
        stage: Annotated[list[schemas.Stage] | None, Query()] = None,
        state: Annotated[list[schemas.State] | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
    ) -> schemas.VersionPage:
        return core.list_versions(reg(request), name, stage, state, limit, offset)

    @app.get("/v1/models/{name}/versions/{version}", dependencies=Read, responses=ERRORS)
    def get_version(request: Request, name: Name, version: VersionNo) -> schemas.VersionOut:
        return core.get_version(reg(request), name, version)

    @app.get("/v1/models/{name}/versions/{version}/upload", dependencies=Write, responses=ERRORS)
    def upload_status(request: Request, name: Name, version: VersionNo) -> schemas.VersionCreated:
        """A pending version with the files still missing: where a resumed upload starts."""
        r = reg(request)
        return {**core.upload_status(r, name, version), "presigned_uploads": r.presigned_uploads}

    @app.post("/v1/models/{name}/versions/{version}/uploads", dependencies=Write, responses=ERRORS)
    def start_presigned(request: Request, name: Name, version: VersionNo,
                        body: schemas.PresignedStart) -> schemas.PresignedUpload:
        """Open a presigned multipart upload of a manifest file (S3 backend): the client then asks
        for a URL per part, PUTs each part straight to S3 and calls `complete`."""
        return core.start_presigned(reg(request), name, version, body.path, body.part_size)

    @app.post("/v1/models/{name}/versions/{version}/uploads/{upload}/parts/{number}", dependencies=Write,
              responses=ERRORS)
    def presign_part(request: Request, name: Name, version: VersionNo,
                     upload: Annotated[str, Path(pattern=r"^[0-9a-f]{32}$")],
                     number: Annotated[int, Path(ge=1, le=10_000)], body: schemas.PartRequest) -> schemas.PartUrl:
        """A presigned PUT URL for one part; S3 checks the part against the sha256 given here."""
        return core.presign_part(reg(request), name, version, upload, number, body.sha256)

    @app.post("/v1/models/{name}/versions/{version}/uploads/{upload}/complete", dependencies=Write,
              responses=ERRORS)
    def complete_presigned(request: Request, name: Name, version: VersionNo,
                           upload: Annotated[str, Path(pattern=r"^[0-9a-f]{32}$")]) -> schemas.UploadOut:
        """Assemble the parts; the file is stored only if its size and sha256 match the manifest."""
        return core.complete_presigned(reg(request), name, version, upload)

    @app.patch("/v1/models/{name}/versions/{version}", dependencies=Write, responses=ERRORS)
    def patch_version(request: Request, name: Name, version: VersionNo, body: schemas.VersionPatch) -> schemas.VersionOut:
        return core.patch_version(reg(request), name, version, body.metrics)

    @app.delete("/v1/models/{name}/versions/{version}", dependencies=Write, responses=ERRORS)
    def delete_version(request: Request, name: Name, version: VersionNo, force: bool = False) -> schemas.VersionOut:
        return core.delete_version(reg(request), name, version, force)

    @app.post("/v1/models/{name}/versions/{version}/commit", dependencies=Write, responses=ERRORS)
    def commit(request: Request, name: Name, version: VersionNo) -> schemas.VersionOut:
        return core.commit(reg(request), name, version)

    async def receive_into(request: Request, spec: dict, writer) -> None:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) != spec["size"]:
            if writer is not None:
                await run_in_threadpool(writer.abort)
            raise core.BadRequest(f"{spec['path']}: Content-Length {declared} but the declared size is {spec['size']}")
        # Chunks gather into ~1 MiB writes (one join, one copy) so the thread hops stay few.
        chunks, buffered = [], 0
        try:
            async for chunk in request.stream():
                if writer is None:
                    continue
                chunks.append(chunk)
                buffered += len(chunk)
                if buffered >= UPLOAD_BUFFER:
                    await run_in_threadpool(writer.write, b"".join(chunks))
                    metrics.uploaded.inc(buffered)
                    chunks, buffered = [], 0
            if writer is not None and chunks:
                await run_in_threadpool(writer.write, b"".join(chunks))
                metrics.uploaded.inc(buffered)
        except BlobMismatch as e:
            await run_in_threadpool(writer.abort)
            raise core.BadRequest(f"{spec['path']}: {e}") from e
        except BaseException:
            if writer is not None:
                await run_in_threadpool(writer.abort)
            raise

    @app.put("/v1/models/{name}/versions/{version}/files/{path:path}", dependencies=Write, responses=ERRORS,
             openapi_extra={"requestBody": {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
    async def put_file(request: Request, name: Name, version: VersionNo, path: FilePath) -> schemas.UploadOut:
        """Stream one manifest file; it is stored only if its size and sha256 match the manifest."""
        r = reg(request)
        spec, writer = await run_in_threadpool(core.begin_upload, r, name, version, path)
        await receive_into(request, spec, writer)
        return await run_in_threadpool(core.finish_upload, r, name, version, spec, writer)

    @app.put("/v1/models/{name}/versions/{version}/attachments/{path:path}", dependencies=Write, responses=ERRORS,
             openapi_extra={"requestBody": {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
    async def put_attachment(request: Request, name: Name, version: VersionNo, path: FilePath) -> schemas.UploadOut:
        """Add a file that describes a ready version (report card, plot); hash-checked like model files.
        Needs headers Content-Length and X-Content-SHA256."""
        r = reg(request)
        size = request.headers.get("content-length")
        spec, writer = await run_in_threadpool(
            core.begin_upload, r, name, version, path, True,
            int(size) if size and size.isdigit() else None, request.headers.get("x-content-sha256"),
        )
        await receive_into(request, spec, writer)
        return await run_in_threadpool(core.finish_upload, r, name, version, spec, writer, True)

    def download(request: Request, name: str, version: int, path: str) -> Response:
        r = reg(request)
        f = core.open_file(r, name, version, path)
        etag = f'"{f["sha256"]}"'
        headers = {"ETag": etag, "Accept-Ranges": "bytes", "X-Content-SHA256": f["sha256"],
                   "Cache-Control": "private, max-age=31536000, immutable"}
        if request.headers.get("if-none-match") in (etag, f["sha256"], "*"):
            return Response(status_code=304, headers=headers)
        start, end, status = 0, f["size"], 200
        rng = request.headers.get("range")
        if_range = request.headers.get("if-range")
        if rng and (if_range is None or if_range == etag):
            parsed = _parse_range(rng, f["size"])
            if parsed is None:
                return error_response(416, f"cannot serve {rng!r} of {f['size']} bytes",
                                      headers={"Content-Range": f"bytes */{f['size']}"})
            start, end, status = parsed[0], parsed[1], 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{f['size']}"
        headers["Content-Length"] = str(end - start)
        if request.method == "HEAD":
            return Response(status_code=status, headers=headers, media_type="application/octet-stream")

        def body():
            for chunk in r.blobs.read(f["sha256"], start, end):
                metrics.downloaded.inc(len(chunk))
                yield chunk

        return StreamingResponse(body(), status_code=status, headers=headers, media_type="application/octet-stream")

    @app.get("/v1/models/{name}/versions/{version}/files/{path:path}", dependencies=Read,
             responses={**ERRORS, 206: {"description": "a byte range"}}, response_class=Response)
    def get_file(request: Request, name: Name, version: VersionNo, path: FilePath) -> Response:
        """Stream a file (model file or attachment); `Range` supported, `ETag` is its sha256."""
        return download(request, name, version, path)

    @app.head("/v1/models/{name}/versions/{version}/files/{path:path}", dependencies=Read, include_in_schema=False)
    def head_file(request: Request, name: Name, version: VersionNo, path: FilePath) -> Response:
        return download(request, name, version, path)

    @app.get("/v1/models/{name}/versions/{version}/attachments/{path:path}", dependencies=Read,
             responses={**ERRORS, 206: {"description": "a byte range"}}, response_class=Response)
    def get_attachment(request: Request, name: Name, version: VersionNo, path: FilePath) -> Response:
        return download(request, name, version, path)

    @app.get("/v1/models/{name}/versions/{version}/lineage", dependencies=Read, responses=ERRORS)
    def lineage(request: Request, name: Name, version: VersionNo) -> schemas.Lineage:
        return core.lineage(reg(request), name, version)

    @app.put("/v1/models/{name}/aliases/{alias}", dependencies=Write, responses=ERRORS)
    def set_alias(request: Request, name: Name, alias: str, body: schemas.AliasSet) -> schemas.AliasOut:
        return core.set_alias(reg(request), name, alias, body.version)

    @app.get("/v1/models/{name}/aliases/{alias}", dependencies=Read, responses=ERRORS)
    def get_alias(request: Request, name: Name, alias: str) -> schemas.AliasOut:
        return core.get_alias(reg(request), name, alias)

    @app.delete("/v1/models/{name}/aliases/{alias}", dependencies=Write, status_code=204, responses=ERRORS)
    def delete_alias(request: Request, name: Name, alias: str) -> Response:
        core.delete_alias(reg(request), name, alias)
        return Response(status_code=204)

    @app.get("/v1/resolve/{name}", dependencies=Read, responses=ERRORS)
    def resolve(request: Request, name: Name, stage: str | None = None, alias: str | None = None) -> schemas.VersionOut:
        """`?alias=serving`, or `?stage=rl,sft`: the newest ready version of the first stage present
        (rl, then sft when neither is given)."""
        stages = [s.strip() for s in stage.split(",") if s.strip()] if stage else None
        bad = [s for s in stages or [] if s not in STAGES]
        if bad:
            raise core.BadRequest(f"unknown stage(s) {bad}; stages are {list(STAGES)}")
        return core.resolve(reg(request), name, stages, alias)

    @app.post("/v1/admin/sweep", dependencies=Write, responses=ERRORS)
    def sweep(request: Request, older_than_s: Annotated[float, Query(ge=0, le=10**9)] = settings.pending_ttl_s) -> dict:
        """Fail abandoned pending versions, delete unreferenced blobs, abort stale uploads."""
        return core.sweep(reg(request), older_than_s)

    return app
