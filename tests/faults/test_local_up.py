"""`make up`'s secrets (infra/local/up.py) and compose's Redis: tokens.json is private from the moment
it exists, each service gets only the tokens it uses, the registry requires its generated read
token for reads and refuses it for writes, and Redis requires a password that every service's
Redis URL carries."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from fault_harness import REPO, FaultStack, poll, up
from nanochat_testing.servers import free_port
from redis import Redis
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError


@pytest.fixture
def no_umask():
    # With no umask a file made by open() would be world-readable: only an explicit mode keeps it private.
    old = os.umask(0)
    yield
    os.umask(old)


def test_tokens_json_is_private_from_its_creation(tmp_path, monkeypatch, no_umask):
    seen: dict[str, int] = {}
    replace = os.replace

    def watch(src, dst):
        seen[Path(dst).name] = stat.S_IMODE(os.stat(src).st_mode)
        replace(src, dst)

    monkeypatch.setattr(os, "replace", watch)
    tokens = up.load_tokens(tmp_path)
    assert set(tokens) == {"registry", "registry_read", "trainer", "admin", "redis"}
    assert len(set(tokens.values())) == len(tokens) and all(len(t) >= 24 for t in tokens.values())
    # The secrets were never in a file anyone else could read, not even for a moment.
    assert seen == {"tokens.json": 0o600}
    assert stat.S_IMODE((tmp_path / "tokens.json").stat().st_mode) == 0o600
    assert up.load_tokens(tmp_path) == tokens


def test_an_older_tokens_json_gets_the_redis_password_and_the_read_token(tmp_path, no_umask):
    (tmp_path / "tokens.json").write_text('{"registry": "r", "trainer": "t", "admin": "a"}')
    tokens = up.load_tokens(tmp_path)
    assert tokens["registry"] == "r" and len(tokens["redis"]) >= 24 and len(tokens["registry_read"]) >= 24
    assert stat.S_IMODE((tmp_path / "tokens.json").stat().st_mode) == 0o600


def test_each_service_gets_only_the_tokens_it_uses(tmp_path):
    config = {**up.load_config(), "home": str(tmp_path)}
    tokens = {
        "registry": "REG-SECRET",
        "registry_read": "REGREAD-SECRET",
        "trainer": "TRAIN-SECRET",
        "admin": "ADMIN-SECRET",
        "redis": "REDIS-SECRET",
    }
    base = {"PATH": os.environ["PATH"], "TRAINER_HEARTBEAT_LIMIT": "40", "WEBUI_PORT": "1"}
    envs = {name: up.process_env(name, env, base) for name, env in up.service_env(config, tokens).items()}

    def holders(secret: str) -> set[str]:
        return {name for name, env in envs.items() if any(secret in v for v in env.values())}

    # The registry's write token goes to what writes (the worker's uploads, the UI's alias moves);
    # what only reads gets the read token, which the registry requires.
    assert holders("REG-SECRET") == {"registry", "trainer-worker", "webui"}
    assert holders("REGREAD-SECRET") == {"registry", "trainer-api", "inference", "webui"}
    assert envs["registry"]["REGISTRY_READ_TOKEN_REQUIRED"] == "true"
    assert (
        envs["inference"]["INFERENCE_REGISTRY_TOKEN"] == envs["webui"]["WEBUI_REGISTRY_READ_TOKEN"] == "REGREAD-SECRET"
    )
    assert envs["trainer-api"]["TRAINER_REGISTRY_TOKEN"] == "REGREAD-SECRET"
    assert envs["trainer-worker"]["TRAINER_REGISTRY_TOKEN"] == "REG-SECRET"
    assert holders("TRAIN-SECRET") == {"trainer-api", "trainer-worker", "webui"}
    assert holders("ADMIN-SECRET") == {"webui"}
    # Redis's password is in each Redis URL, and nowhere else.
    assert holders("REDIS-SECRET") == {"registry", "trainer-api", "trainer-worker", "inference"}
    for env in envs.values():
        assert all(k.endswith("_REDIS_URL") for k, v in env.items() if "REDIS-SECRET" in v)
    # The launcher's own TRAINER_* reach the trainer only.
    assert {name for name, env in envs.items() if "TRAINER_HEARTBEAT_LIMIT" in env} == {"trainer-api", "trainer-worker"}
    assert envs["webui"]["WEBUI_PORT"] == config["webui_port"]


def test_make_ups_redis_refuses_a_client_without_its_password(tmp_path, no_umask):
    config = {**up.load_config(), "home": str(tmp_path), "redis_port": str(free_port())}
    argv = up.redis_argv(config, tmp_path, "s3cret-pass")
    assert "s3cret-pass" not in " ".join(argv), "the password is on the command line (ps shows it)"
    assert stat.S_IMODE((tmp_path / "redis" / "redis.conf").stat().st_mode) == 0o600
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        with_password = Redis(port=int(config["redis_port"]), password="s3cret-pass", socket_timeout=2)
        poll(lambda: _answers(with_password), 20, "Redis to start")
        with pytest.raises((AuthenticationError, ResponseError), match="(?i)auth"):
            Redis(port=int(config["redis_port"]), socket_timeout=2).ping()
        with pytest.raises((AuthenticationError, ResponseError)):
            Redis(port=int(config["redis_port"]), password="wrong", socket_timeout=2).ping()
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def _answers(client: Redis) -> bool:
    try:
        return bool(client.ping())
    except RedisConnectionError:
        return False


def test_compose_redis_requires_the_password_every_url_carries():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    redis = compose["services"]["redis"]
    assert "--requirepass" in " ".join(redis["command"])
    assert redis["environment"]["REDIS_PASSWORD"].startswith("${REDIS_PASSWORD:?")
    urls = {
        f"{name}.{key}": value
        for name, service in compose["services"].items()
        for key, value in (service.get("environment") or {}).items()
        if isinstance(value, str) and value.startswith("redis://")
    }
    assert len(urls) >= 3
    assert all(url.startswith("redis://:${REDIS_PASSWORD}@") for url in urls.values()), urls
    assert "REDIS_PASSWORD=" in (REPO / ".env.example").read_text()


def test_make_ups_registry_reads_with_the_read_token_and_refuses_it_for_writes(tmp_path):
    """The registry and the web UI as `make up` starts them: reads need a token, the generated
    read token reads but never writes, the write token does both, and the UI's proxied reads
    carry the read token (they answer without the UI holding a session)."""
    stack = FaultStack.create(tmp_path, services=["registry", "webui"])
    try:
        registry, webui = stack.url("registry"), stack.url("webui")
        poll(lambda: httpx.get(f"{webui}/health", timeout=5).status_code == 200, 120, "the web UI")
        read = {"Authorization": f"Bearer {stack.tokens['registry_read']}"}
        write = {"Authorization": f"Bearer {stack.tokens['registry']}"}
        alias = f"{registry}/v1/models/nanochat/aliases/serving"

        anonymous = httpx.get(f"{registry}/v1/models", timeout=10)
        assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{registry}/v1/models", headers=read, timeout=10).status_code == 200
        assert httpx.get(f"{registry}/v1/resolve/nanochat", headers=read, timeout=10).status_code == 404
        assert httpx.get(f"{registry}/v1/models", headers=write, timeout=10).status_code == 200
        refused = httpx.put(alias, headers=read, json={"version": 1}, timeout=10)
        assert refused.status_code == 401 and set(refused.json()["error"]) == {"message", "type", "param", "code"}
        # The write token gets past the check: the alias names a version that does not exist.
        assert httpx.put(alias, headers=write, json={"version": 1}, timeout=10).status_code == 404
        assert httpx.get(f"{webui}/api/registry/v1/models", timeout=10).status_code == 200
    finally:
        stack.stop()
