"""The same-origin proxy: `/api/<service>/<rest>` goes to that service's `<rest>`, streamed.

The path (as the browser encoded it) and the query pass unchanged, with the service's bearer
token added here (it never reaches the browser): a read's token for reads, the write token only
for changes. Reads are open; changes on the trainer and registry need the admin session; chat
needs a session when the inference service has a token or WEBUI_CHAT_TOKEN is set (the rules
are in `webui.routing`). Streams and short calls go through separate pools (`webui.pools`).
"""

import logging
from urllib.parse import quote

import httpx
from fastapi import APIRouter, Request, Response
from service_kit.errors import error_response

from webui.deps import MetricsDep, PoolsDep, RoleDep, SettingsDep
from webui.routing import READS, Target, check_access, is_stream, target_of
from webui.settings import Settings
from webui.upstream import FORWARDED_REQUEST_HEADERS, Metrics, UpstreamStream

log = logging.getLogger("webui.proxy")
router = APIRouter()
# How long a refused stream should wait: long enough for some of the open ones to end.
STREAM_RETRY_AFTER_S = 5


def upstream_request(
    request: Request, target: Target, body: bytes, settings: Settings, client: httpx.AsyncClient
) -> httpx.Request:
    query = request.scope["query_string"].decode("latin-1")
    url = settings.upstream(target.service) + target.rest + (f"?{query}" if query else "")
    headers = {k: v for k, v in request.headers.items() if k in FORWARDED_REQUEST_HEADERS}
    headers["x-request-id"] = request.state.request_id
    token = settings.token(target.service, write=request.method not in READS)
    if token is not None:
        headers["authorization"] = f"Bearer {token.get_secret_value()}"
    return client.build_request(request.method, url, headers=headers, content=body)


@router.api_route("/api/{service}/{path:path}", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"])
async def proxy(
    request: Request, role: RoleDep, settings: SettingsDep, pools: PoolsDep, metrics: MetricsDep
) -> Response:
    # The route matched the decoded path; the upstream gets the path as the browser encoded it.
    raw_path = request.scope.get("raw_path") or quote(request.scope["path"]).encode()
    target = target_of(raw_path.decode("latin-1"))
    check_access(target, request.method, role, settings)
    # The service kit's body limit stops this read at WEBUI_MAX_BODY_BYTES, chunked or not.
    body = await request.body()
    headers = request.headers
    query = request.scope["query_string"].decode("latin-1")
    stream = is_stream(request.method, query, headers.get("accept", ""), headers.get("content-type", ""), body)
    service = target.service
    try:
        outgoing = upstream_request(request, target, body, settings, pools.client(service, stream))
    except httpx.InvalidURL as exc:
        return error_response(400, f"The path cannot be proxied: {exc}.", code="invalid_path")
    if stream and not pools.take_stream(service):
        metrics.requests.labels(service, "too_many_streams").inc()
        return error_response(
            429,
            f"{pools.max_streams} streams to the {service} service are open already; try again shortly.",
            code="too_many_streams",
            headers={"Retry-After": str(STREAM_RETRY_AFTER_S)},
        )
    on_close = (lambda: pools.release_stream(service)) if stream else None
    try:
        upstream = await pools.client(service, stream).send(outgoing, stream=True)
    except BaseException as exc:  # a browser gone while we wait is a cancellation: free its slot too
        if on_close:
            on_close()
        if isinstance(exc, httpx.HTTPError):
            return unreachable(service, exc, metrics)
        raise
    metrics.requests.labels(service, str(upstream.status_code)).inc()
    return UpstreamStream(upstream, service, metrics, on_close)


def unreachable(service: str, exc: httpx.HTTPError, metrics: Metrics) -> Response:
    if isinstance(exc, httpx.PoolTimeout):
        metrics.requests.labels(service, "busy").inc()
        log.warning("upstream pool full", extra={"service": service})
        return error_response(
            503, f"The web UI has too many calls to the {service} service in flight.", headers={"Retry-After": "1"}
        )
    metrics.requests.labels(service, "unreachable").inc()
    log.warning("upstream unreachable", extra={"service": service, "error": repr(exc)})
    return error_response(502, f"The {service} service cannot be reached right now.")
