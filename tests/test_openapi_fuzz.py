"""schemathesis over each service's OpenAPI document, against the service as a real process:
no generated request, valid or not, may get a 5xx.

    uv run pytest tests/test_openapi_fuzz.py

The registry (SQLite and local blobs), the trainer's jobs API (SQLite, the real Redis from
`nanochat_testing`; no worker, so submitted jobs only queue), inference serving a tiny random
model, and the web UI in front of those three each run as `python -m <service>` on a free port,
started together. Every operation gets `EXAMPLES` requests its schema allows and `EXAMPLES` it refuses with the service's token
(the web UI's document is the app's own, which it does not serve: `openapi_url=None`). The
registry's answers must also match its documented response schemas. Bounded: each service's
fuzzing stops at `EXAMPLES` per operation, and the test fails if one takes over `BUDGET_S`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from nanochat_testing.servers import free_port
from schemathesis import GenerationMode
from schemathesis.checks import FailureGroup, not_a_server_error, response_schema_conformance
from schemathesis.core import NotSet

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

EXAMPLES = 15
BUDGET_S = 60.0
TOKENS = {"registry": "fuzz-registry", "trainer": "fuzz-trainer", "inference": "fuzz-inference", "webui": "fuzz-admin"}


@dataclass
class Service:
    name: str
    url: str
    proc: subprocess.Popen
    log_path: Path
    headers: dict[str, str] = field(default_factory=dict)
    cookies: dict[str, str] = field(default_factory=dict)

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


def spawn(name: str, argv: list[str], env: dict[str, str], port: int, workdir: Path, token: str | None) -> Service:
    log_path = workdir / f"{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", *argv],
            env={**os.environ, **env},
            cwd=workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return Service(name, f"http://127.0.0.1:{port}", proc, log_path, headers)


def wait_ready(service: Service, path: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if service.proc.poll() is not None:
            pytest.fail(f"{service.name} exited with {service.proc.returncode}:\n{service.log_tail()}")
        try:
            if httpx.get(f"{service.url}{path}", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"{service.name} was not ready within {timeout_s:.0f} s:\n{service.log_tail()}")


def tiny_checkpoint(folder: Path) -> Path:
    """A depth-2 model with random weights over a 300-id tokenizer: enough to serve, in a second."""
    import torch
    from nanochat.checkpoint import save_checkpoint
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import Tokenizer

    tok = Tokenizer.train_from_iterator(["The quick brown fox jumps over the lazy dog. 7*3 = 21. "] * 20, 300)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(2, tok.vocab_size, 128))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return save_checkpoint(folder, model.eval(), tok, meta={"stage": "sft"})


@pytest.fixture(scope="module")
def services(redis_server, tmp_path_factory) -> Iterator[dict[str, Service]]:
    root = tmp_path_factory.mktemp("fuzz")
    ports = {name: free_port() for name in ("registry", "trainer", "inference", "webui")}
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    for name in ports:
        (root / name).mkdir()
    checkpoint = tiny_checkpoint(root / "checkpoint")
    started = {
        "registry": spawn(
            "registry",
            ["registry"],
            {
                "REGISTRY_PORT": str(ports["registry"]),
                "REGISTRY_DATA_DIR": str(root / "registry"),
                "REGISTRY_WRITE_TOKEN": TOKENS["registry"],
                "REGISTRY_LOG_LEVEL": "WARNING",
            },
            ports["registry"],
            root / "registry",
            TOKENS["registry"],
        ),
        "trainer": spawn(
            "trainer",
            ["trainer", "api"],
            {
                "TRAINER_API_PORT": str(ports["trainer"]),
                "TRAINER_DATABASE_URL": f"sqlite:///{root / 'trainer' / 'trainer.db'}",
                "TRAINER_REDIS_URL": redis_server.url,
                "TRAINER_REDIS_PREFIX": "fuzz",
                "TRAINER_REGISTRY_URL": urls["registry"],
                "TRAINER_WRITE_TOKEN": TOKENS["trainer"],
                "TRAINER_DATA_DIR": str(root / "trainer" / "data"),
                "TRAINER_RUNS_DIR": str(root / "trainer" / "runs"),
                "TRAINER_LOG_LEVEL": "WARNING",
            },
            ports["trainer"],
            root / "trainer",
            TOKENS["trainer"],
        ),
        "inference": spawn(
            "inference",
            ["inference"],
            {
                "INFERENCE_PORT": str(ports["inference"]),
                "INFERENCE_MODEL_DIR": str(checkpoint),
                "INFERENCE_API_TOKEN": TOKENS["inference"],
                "INFERENCE_SLOTS": "4",
                "INFERENCE_MAX_WAITING": "16",
                "INFERENCE_DEFAULT_MAX_TOKENS": "16",
                "INFERENCE_CPU_THREADS": "1",
                "INFERENCE_DEVICE": "cpu",
                "INFERENCE_LOG_LEVEL": "WARNING",
            },
            ports["inference"],
            root / "inference",
            TOKENS["inference"],
        ),
        "webui": spawn(
            "webui",
            ["webui"],
            {
                "WEBUI_PORT": str(ports["webui"]),
                "WEBUI_INFERENCE_URL": urls["inference"],
                "WEBUI_TRAINER_URL": urls["trainer"],
                "WEBUI_REGISTRY_URL": urls["registry"],
                "WEBUI_INFERENCE_TOKEN": TOKENS["inference"],
                "WEBUI_TRAINER_TOKEN": TOKENS["trainer"],
                "WEBUI_REGISTRY_TOKEN": TOKENS["registry"],
                "WEBUI_ADMIN_TOKEN": TOKENS["webui"],
            },
            ports["webui"],
            root / "webui",
            None,
        ),
    }
    try:
        for name, path in [
            ("registry", "/ready"),
            ("trainer", "/health"),
            ("inference", "/ready"),
            ("webui", "/health"),
        ]:
            wait_ready(started[name], path)
        # The web UI is fuzzed signed in as admin, so its proxy passes requests on.
        login = httpx.post(f"{urls['webui']}/api/session", json={"token": TOKENS["webui"]})
        assert login.status_code == 200, login.text
        started["webui"].cookies = dict(login.cookies)
        yield started
    finally:
        for service in started.values():
            service.proc.terminate()
        for service in started.values():
            try:
                service.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                service.proc.kill()
                service.proc.wait(timeout=15)


def webui_schema() -> dict:
    """The web UI's OpenAPI document, from its app (the process serves none)."""
    from webui.app import create_app
    from webui.settings import Settings

    return create_app(Settings()).openapi()


@dataclass
class Findings:
    server_errors: list[str] = field(default_factory=list)
    nonconforming: list[str] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    operations: int = 0


def fuzz(service: Service, schema, conform: bool) -> Findings:
    """EXAMPLES generated requests per operation; what answered 5xx, what did not match its schema."""
    found = Findings()
    for result in schema.get_all_operations():
        operation = result.ok()
        found.operations += 1
        # Requests the schema allows and requests it refuses, EXAMPLES of each.
        strategy = operation.as_strategy(GenerationMode.POSITIVE) | operation.as_strategy(GenerationMode.NEGATIVE)

        @given(case=strategy)
        @settings(
            max_examples=2 * EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
            # The same requests on every run: a failure here is reproducible, not a lucky draw.
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
        )
        def check(case):
            response = case.call(base_url=service.url, headers=service.headers, cookies=service.cookies, timeout=30)
            found.statuses.append(response.status_code)
            body = "" if isinstance(case.body, NotSet) else f" body={str(case.body)[:200]!r}"
            where = f"{case.method} {case.formatted_path}{body} query={case.query}"
            if response.status_code >= 500:
                found.server_errors.append(f"{where}: {response.status_code} {response.text[:300]}")
                return
            checks = [not_a_server_error] + ([response_schema_conformance] if conform else [])
            try:
                case.validate_response(response, checks=checks)
            except (AssertionError, FailureGroup) as e:
                found.nonconforming.append(f"{where}: {response.status_code}: {str(e)[:300]}")

        check()
    return found


@pytest.mark.parametrize("name", ["registry", "trainer", "inference", "webui"])
def test_no_generated_request_gets_a_server_error(services, name):
    service = services[name]
    if name == "webui":
        schema = schemathesis.openapi.from_dict(webui_schema())
    else:
        schema = schemathesis.openapi.from_url(f"{service.url}/openapi.json")
    started = time.monotonic()
    found = fuzz(service, schema, conform=name == "registry")
    took = time.monotonic() - started
    print(
        f"{name}: {found.operations} operations, {len(found.statuses)} requests in {took:.1f} s, "
        f"{len(found.server_errors)} 5xx, {len(found.nonconforming)} not matching their schema"
    )
    for line in found.server_errors[:20] + found.nonconforming[:20]:
        print("  ", line)
    assert not found.server_errors, "\n".join(found.server_errors[:10])
    assert not found.nonconforming, "\n".join(found.nonconforming[:10])
    # Every operation was exercised, with both accepted and refused requests.
    assert len(found.statuses) >= found.operations
    assert any(s < 300 for s in found.statuses) and any(400 <= s < 500 for s in found.statuses)
    assert took < BUDGET_S, f"fuzzing {name} took {took:.0f} s, over its {BUDGET_S:.0f} s budget"
