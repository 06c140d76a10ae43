"""The same-origin proxy: `/api/<service>/<rest>` goes to that service's `<rest>`, streamed.

The raw path and query pass unchanged, with the service's bearer token added here (it never
reaches the browser). Reads are open; changes on the trainer and registry need the admin
session; chat needs a session only when WEBUI_CHAT_TOKEN is set.
"""

import logging

import httpx
from fastapi import APIRouter, Request, Response
from service_kit.errors import error_response

from webui.deps import ClientDep, MetricsDep, RoleDep, SessionsDep, SettingsDep
from webui.settings import SERVICES
from webui.upstream import FORWARDED_REQUEST_HEADERS, UpstreamStream

log = logging.getLogger("webui.proxy")
router = APIRouter()


@router.api_route("/api/{service}/{path:path}", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"])
async def proxy(
    service: str,
    path: str,
    request: Request,
    role: RoleDep,
    sessions: SessionsDep,
    settings: SettingsDep,
    client: ClientDep,
    metrics: MetricsDep,
) -> Response:
    if service not in SERVICES:
        return error_response(404, f"Unknown service {service!r}; the UI proxies {', '.join(SERVICES)}.")
    if service == "inference" and sessions.chat is not None and role is None:
        return error_response(401, "Chat needs a token here: sign in first.", code="login_required")
    if service != "inference" and request.method not in ("GET", "HEAD") and role != "admin":
        return error_response(
            403, "Changing jobs or models needs the admin token: sign in as admin.", code="admin_required"
        )
    # The service kit's body limit stops this read at WEBUI_MAX_BODY_BYTES, chunked or not.
    body = await request.body()

    # The raw path keeps the browser's percent-encoding: the service gets exactly what was typed.
    raw_path = request.scope["raw_path"].decode("latin-1")
    rest = raw_path[len(f"/api/{service}") :]
    query = request.scope["query_string"].decode("latin-1")
    base, token = settings.upstream(service)
    url = base + rest + (f"?{query}" if query else "")
    headers = {k: v for k, v in request.headers.items() if k in FORWARDED_REQUEST_HEADERS}
    headers["x-request-id"] = request.state.request_id
    if token is not None:
        headers["authorization"] = f"Bearer {token.get_secret_value()}"
    upstream_request = client.build_request(request.method, url, headers=headers, content=body)
    try:
        upstream = await client.send(upstream_request, stream=True)
    except httpx.HTTPError as exc:
        metrics.requests.labels(service, "unreachable").inc()
        log.warning("upstream unreachable", extra={"service": service, "error": repr(exc)})
        return error_response(502, f"The {service} service cannot be reached right now.")
    metrics.requests.labels(service, str(upstream.status_code)).inc()
    return UpstreamStream(upstream, service, metrics)
