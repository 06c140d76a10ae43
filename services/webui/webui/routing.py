"""Which service a proxied request goes to, with which path, whether it is a stream, and whether
the browser's session may make it. Plain functions over the request's parts."""

import json
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote

from service_kit.errors import APIError

from webui.sessions import Role
from webui.settings import SERVICES, Settings

READS = ("GET", "HEAD")
# The registry's checkpoint files (the weights): the UI never shows them, so through the UI they
# need the admin session, even though a read token may fetch them from the registry itself.
REGISTRY_FILES = re.compile(r"^/(v1/)?models/[^/]+/versions/[^/]+/files(/|$)")
TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Target:
    service: str
    rest: str  # the path after the service's segment, as the browser encoded it


def target_of(raw_path: str) -> Target:
    """`/api/<service>/<rest>` split where the browser's own slashes are.

    The service is the second segment percent-decoded, so `/api/inferenc%65/v1/models` is
    inference's `/v1/models`, as the router that matched the decoded path saw it; a segment that
    decodes to something else (`inference%2Fv1`) names no service. The rest keeps its encoding
    (a `%2F` inside a file name stays one segment) and may hold no `.` or `..` segment, which
    would climb out of the service's path.
    """
    parts = raw_path.split("/", 3)
    service = unquote(parts[2]) if len(parts) > 2 and unquote(parts[1]) == "api" else ""
    if service not in SERVICES:
        raise APIError(404, f"Unknown service {service!r}; the UI proxies {', '.join(SERVICES)}.")
    rest = "/" + (parts[3] if len(parts) > 3 else "")
    if any(unquote(segment) in (".", "..") for segment in rest.split("/")):
        raise APIError(400, "The path may not hold '.' or '..' segments.", code="invalid_path")
    return Target(service, rest)


def check_access(target: Target, method: str, role: Role | None, settings: Settings) -> None:
    """Raise the 401 or 403 the browser's session earns for this call, if any."""
    if target.service == "inference":
        if settings.chat_needs_login and role is None:
            raise APIError(401, "Chat needs a token here: sign in first.", code="login_required")
        return
    if method not in READS and role != "admin":
        raise APIError(403, "Changing jobs or models needs the admin token: sign in as admin.", code="admin_required")
    if target.service == "registry" and REGISTRY_FILES.match(unquote(target.rest)) and role != "admin":
        raise APIError(
            403, "Downloading a model's files needs the admin token: sign in as admin.", code="admin_required"
        )


def is_stream(method: str, query: str, accept: str, content_type: str, body: bytes) -> bool:
    """Whether the answer will stay open: server-sent events asked for, a log followed, or a
    completion asked to stream."""
    if "text/event-stream" in accept.lower():
        return True
    if any(key == "follow" and value.lower() in TRUE for key, value in parse_qsl(query)):
        return True
    if method != "POST" or "json" not in content_type.lower() or b'"stream"' not in body:
        return False
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return False  # the service answers what is wrong with it, promptly
    return isinstance(payload, dict) and payload.get("stream") is True
