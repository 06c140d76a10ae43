"""Downloads of a version's files and attachments: ranges, ETags (the sha256), HEAD."""

import itertools
from collections.abc import Iterator

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from service_kit.auth import AuthFirstRoute, require_read
from service_kit.errors import error_response

from registry import core
from registry.deps import ERRORS, FilePath, MetricsDep, Name, RegistryDep, VersionNo
from registry.metrics import Metrics
from registry.ranges import parse_range

# A committed version's model files never change, so a cache may keep them for good. Attachments
# do change: a report card is written again after a new eval of the version, and a retried report
# step must be able to PUT its file again, so refusing a replacement (409) would break what users
# do. They are served for revalidation instead: `no-cache` makes a cache ask each time, and the
# ETag (the sha256) makes the answer a cheap 304 while the bytes are the same.
CACHE_CONTROL = {"model": "private, max-age=31536000, immutable", "attachment": "private, no-cache"}

router = APIRouter(
    prefix="/models/{name}/versions/{version}",
    route_class=AuthFirstRoute,
    responses={**ERRORS, 206: {"description": "a byte range"}},
    dependencies=[require_read],
)


@router.get("/files/{path:path}", response_class=Response)
def get_file(
    request: Request, reg: RegistryDep, metrics: MetricsDep, name: Name, version: VersionNo, path: FilePath
) -> Response:
    """Stream a file (model file or attachment); `Range` supported, `ETag` is its sha256."""
    return download(request, reg, metrics, name, version, path)


@router.head("/files/{path:path}", include_in_schema=False)
def head_file(
    request: Request, reg: RegistryDep, metrics: MetricsDep, name: Name, version: VersionNo, path: FilePath
) -> Response:
    return download(request, reg, metrics, name, version, path)


@router.get("/attachments/{path:path}", response_class=Response)
def get_attachment(
    request: Request, reg: RegistryDep, metrics: MetricsDep, name: Name, version: VersionNo, path: FilePath
) -> Response:
    return download(request, reg, metrics, name, version, path)


def download(request: Request, reg: core.Registry, metrics: Metrics, name: str, version: int, path: str) -> Response:
    f = core.open_file(reg, name, version, path)
    etag = f'"{f["sha256"]}"'
    headers = {
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "X-Content-SHA256": f["sha256"],
        "Cache-Control": CACHE_CONTROL[f["kind"]],
    }
    if request.headers.get("if-none-match") in (etag, f["sha256"], "*"):
        return Response(status_code=304, headers=headers)
    start, end, status = 0, f["size"], 200
    rng = request.headers.get("range")
    if_range = request.headers.get("if-range")
    if rng and (if_range is None or if_range == etag):
        parsed = parse_range(rng, f["size"])
        if parsed is None:
            return error_response(
                416, f"cannot serve {rng!r} of {f['size']} bytes", headers={"Content-Range": f"bytes */{f['size']}"}
            )
        start, end, status = parsed[0], parsed[1], 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{f['size']}"
    headers["Content-Length"] = str(end - start)
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers, media_type="application/octet-stream")

    chunks = reg.blobs.read(f["sha256"], start, end)
    # The first chunk is read before the status line goes out, so a blob store that is away
    # answers a 503 (`registry.unavailable`) instead of a 200 cut short.
    first = next(chunks, b"")

    def body() -> Iterator[bytes]:
        try:
            for chunk in itertools.chain([first], chunks):
                metrics.downloaded.inc(len(chunk))
                yield chunk
        finally:
            chunks.close()

    return StreamingResponse(body(), status_code=status, headers=headers, media_type="application/octet-stream")
