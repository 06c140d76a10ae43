"""`python -m trainer doctor [--json] [--require PART ...]`: is everything the stack needs reachable?

Checks, side by side (each bounded by a few seconds): the Docker engine (its version), the GPUs
(nvidia-smi when present, else torch.cuda when importable), the registry, trainer API, inference
and web UI (`GET /health` at the URLs in TRAINER_* settings), Redis (PING) and the trainer's
database (SELECT 1; a SQLite file is opened read-only, never created), and the sandbox HumanEval
runs model-written code in (bubblewrap making its namespaces here: a container without the
security options compose gives the worker cannot). Prints a table, or JSON with --json. Exit status 1 when a required part is not up: the database, Redis, the registry and
the trainer API always, the engine with TRAINER_EXECUTOR=docker, and whatever --require names.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import httpx
from redis import Redis
from redis.exceptions import RedisError
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from trainer.settings import Settings

TIMEOUT_S = 3.0
PARTS = ("engine", "gpus", "database", "redis", "registry", "trainer-api", "inference", "webui", "sandbox")


@dataclass
class Check:
    part: str
    required: bool
    status: str  # up | down | none (nothing there, e.g. no GPU)
    detail: str


class Down(Exception):
    """A part did not answer; the message says why."""


def check_engine(settings: Settings) -> str:
    try:
        from trainer.docker_executor import EngineUnavailable, connect
    except ImportError:
        raise Down("the Docker SDK is not installed (extra nanochat-trainer[docker])") from None
    try:
        client = connect(settings, timeout=TIMEOUT_S)
    except EngineUnavailable as e:
        raise Down(str(e)) from None
    try:
        version = client.version()
    finally:
        client.close()
    return f"Docker {version.get('Version', '?')} (API {version.get('ApiVersion', '?')}, {version.get('Os', '?')}/{version.get('Arch', '?')})"


def check_gpus() -> str | None:
    """The visible GPUs, or None when there are none."""
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise Down(f"nvidia-smi failed: {e}") from None
        if out.returncode != 0:
            raise Down(f"nvidia-smi failed: {(out.stderr or out.stdout).strip()[:300]}")
        gpus = [line.strip() for line in out.stdout.splitlines() if line.strip()]
        return f"nvidia-smi: {len(gpus)} GPU(s): " + "; ".join(gpus) if gpus else None
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return f"torch.cuda: {len(names)} GPU(s): " + "; ".join(names)


def check_http(base_url: str) -> str:
    url = f"{base_url.rstrip('/')}/health"
    try:
        r = httpx.get(url, timeout=TIMEOUT_S)
    except httpx.HTTPError as e:
        raise Down(f"{url}: {type(e).__name__}: {e}") from None
    if r.status_code != 200:
        raise Down(f"{url}: HTTP {r.status_code}")
    return f"{url}: HTTP 200"


def check_sandbox() -> str:
    """Whether chat_eval's HumanEval can run its programs isolated (it refuses otherwise)."""
    from nanochat.sandbox import bwrap_path, isolation_problem

    problem = isolation_problem()
    if problem is not None:
        raise Down(problem)
    return f"bubblewrap ({bwrap_path()}) isolates HumanEval's programs"


def check_redis(url: str) -> str:
    try:
        client = Redis.from_url(url, socket_connect_timeout=TIMEOUT_S, socket_timeout=TIMEOUT_S)
        client.ping()
        version = client.info("server").get("redis_version", "?")
        client.close()
    except (RedisError, ValueError) as e:
        raise Down(f"{url}: {e}") from None
    return f"{url}: redis {version}"


def check_database(url: str) -> str:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = parsed.database
        if not path or path == ":memory:":
            raise Down(f"{url}: an in-memory database is no service's database")
        try:
            # mode=ro: a missing file is an error here, where a plain connect would create it.
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=TIMEOUT_S) as conn:
                conn.execute("SELECT 1")
        except sqlite3.Error as e:
            raise Down(f"SQLite {path}: {e}") from None
        return f"SQLite {path}"
    args = {"connect_timeout": int(TIMEOUT_S)} if parsed.get_backend_name() == "postgresql" else {}
    engine = create_engine(url, connect_args=args, pool_pre_ping=False)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            version = ".".join(str(v) for v in conn.dialect.server_version_info or ())
    except SQLAlchemyError as e:
        cause = getattr(e, "orig", None) or e
        first_line = (str(cause).strip().splitlines() or [""])[0]
        raise Down(f"{parsed.render_as_string(hide_password=True)}: {type(cause).__name__}: {first_line}") from None
    finally:
        engine.dispose()
    return f"{parsed.get_backend_name()} {version} at {parsed.host}:{parsed.port or ''}/{parsed.database}"


def _run(part: str, required: bool, probe: Callable[[], str | None]) -> Check:
    try:
        detail = probe()
    except Down as e:
        return Check(part, required, "down", str(e))
    except Exception as e:
        # A probe must never crash the report: whatever broke is this part's detail.
        return Check(part, required, "down", f"{type(e).__name__}: {e}")
    if detail is None:
        return Check(
            part, required, "none", "no GPU visible (nvidia-smi absent, torch.cuda unavailable or not installed)"
        )
    return Check(part, required, "up", detail)


def run_checks(settings: Settings, require: list[str] | tuple[str, ...] = ()) -> list[Check]:
    """Every check, run concurrently, in the order of PARTS."""
    required = {"database", "redis", "registry", "trainer-api", *require}
    if settings.executor == "docker":
        required.add("engine")
    api_url = settings.api_url or f"http://{settings.api_host}:{settings.api_port}"
    probes: dict[str, Callable[[], str | None]] = {
        "engine": lambda: check_engine(settings),
        "gpus": check_gpus,
        "database": lambda: check_database(settings.database_url),
        "redis": lambda: check_redis(settings.redis_url),
        "registry": lambda: check_http(settings.registry_url),
        "trainer-api": lambda: check_http(api_url),
        "inference": lambda: check_http(settings.inference_url),
        "webui": lambda: check_http(settings.webui_url),
        "sandbox": check_sandbox,
    }
    with ThreadPoolExecutor(len(probes)) as pool:
        futures = [pool.submit(_run, part, part in required, probes[part]) for part in PARTS]
        return [f.result() for f in futures]


def format_table(checks: list[Check]) -> str:
    rows = [("part", "required", "status", "detail")]
    rows += [(c.part, "yes" if c.required else "no", c.status, c.detail) for c in checks]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}" for r in rows)


def main(settings: Settings, as_json: bool = False, require: list[str] | None = None) -> int:
    """Print the report; 0 when every required part is up, 1 otherwise."""
    checks = run_checks(settings, require or ())
    healthy = all(c.status == "up" for c in checks if c.required)
    if as_json:
        print(json.dumps({"ok": healthy, "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        print(format_table(checks))
        print("ok: every required part is up" if healthy else "NOT OK: a required part is not up")
    return 0 if healthy else 1
