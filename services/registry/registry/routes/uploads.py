"""Uploads into a pending version: streamed through the server, or presigned parts straight to S3.

A file is stored only if its size and sha256 match what the version's manifest declared.
"""

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from service_kit.auth import AuthFirstRoute, require_write
from starlette.concurrency import run_in_threadpool

from registry import core, schemas
from registry.blobs import BlobMismatch, BlobWriter
from registry.deps import ERRORS, FilePath, MetricsDep, Name, RegistryDep, UploadId, VersionNo
from registry.metrics import Metrics

UPLOAD_BUFFER = 1024 * 1024
# A streamed upload's body is raw bytes, not JSON; OpenAPI says so (FastAPI cannot infer it).
RAW_BODY = {
    "requestBody": {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
}

router = APIRouter(
    prefix="/models/{name}/versions/{version}",
    route_class=AuthFirstRoute,
    responses=ERRORS,
    dependencies=[require_write],
)


@router.get("/upload")
def upload_status(reg: RegistryDep, name: Name, version: VersionNo) -> schemas.VersionCreated:
    """A pending version with the files still missing: where a resumed upload starts."""
    return {**core.upload_status(reg, name, version), "presigned_uploads": reg.presigned_uploads}


@router.post("/uploads")
def start_presigned(
    reg: RegistryDep, name: Name, version: VersionNo, body: schemas.PresignedStart
) -> schemas.PresignedUpload:
    """Open a presigned multipart upload of a manifest file (S3 backend): the client then asks
    for a URL per part, PUTs each part straight to S3 and calls `complete`."""
    return core.start_presigned(reg, name, version, body.path, body.part_size)


@router.post("/uploads/{upload}/parts/{number}")
def presign_part(
    reg: RegistryDep,
    name: Name,
    version: VersionNo,
    upload: UploadId,
    number: Annotated[int, Path(ge=1, le=10_000)],
    body: schemas.PartRequest,
) -> schemas.PartUrl:
    """A presigned PUT URL for one part; S3 checks the part against the sha256 given here."""
    return core.presign_part(reg, name, version, upload, number, body.sha256)


@router.post("/uploads/{upload}/complete")
def complete_presigned(reg: RegistryDep, name: Name, version: VersionNo, upload: UploadId) -> schemas.UploadOut:
    """Assemble the parts; the file is stored only if its size and sha256 match the manifest."""
    return core.complete_presigned(reg, name, version, upload)


@router.put("/files/{path:path}", openapi_extra=RAW_BODY)
async def put_file(
    request: Request, reg: RegistryDep, metrics: MetricsDep, name: Name, version: VersionNo, path: FilePath
) -> schemas.UploadOut:
    """Stream one manifest file; it is stored only if its size and sha256 match the manifest."""
    spec, writer = await run_in_threadpool(core.begin_upload, reg, name, version, path)
    await receive_into(request, metrics, spec, writer)
    return await run_in_threadpool(core.finish_upload, reg, name, version, spec, writer)


@router.put("/attachments/{path:path}", openapi_extra=RAW_BODY)
async def put_attachment(
    request: Request, reg: RegistryDep, metrics: MetricsDep, name: Name, version: VersionNo, path: FilePath
) -> schemas.UploadOut:
    """Add a file that describes a ready version (report card, plot); hash-checked like model files.
    Needs headers Content-Length and X-Content-SHA256."""
    size = request.headers.get("content-length")
    spec, writer = await run_in_threadpool(
        core.begin_upload,
        reg,
        name,
        version,
        path,
        True,
        int(size) if size and size.isdigit() else None,
        request.headers.get("x-content-sha256"),
    )
    await receive_into(request, metrics, spec, writer)
    return await run_in_threadpool(core.finish_upload, reg, name, version, spec, writer, True)


async def receive_into(request: Request, metrics: Metrics, spec: dict[str, Any], writer: BlobWriter | None) -> None:
    """Stream the body into `writer` (None: the blob is stored already, so the body is drained)."""
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
