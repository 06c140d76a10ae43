"""Fixtures for the web UI tests: the fake upstream and the web UI server as real processes on
free loopback ports, each waited for by polling its /health (a state, not a sleep)."""

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

HERE = Path(__file__).parent
OUTPUT = HERE / "output"
ADMIN_TOKEN = "admin-token-for-tests"
CHAT_TOKEN = "chat-token-for-tests"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url} exited with {process.returncode} before it was healthy")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not become healthy in {limit_s} s")


@dataclass
class Proc:
    url: str
    process: subprocess.Popen
    env: dict[str, str] = field(default_factory=dict)  # the variables it was started with, on top of os.environ

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_fake() -> Proc:
    port = free_port()
    process = subprocess.Popen([sys.executable, str(HERE / "webui_fake_upstream.py"), str(port)])
    url = f"http://127.0.0.1:{port}"
    wait_healthy(f"{url}/inference/health", process)
    return Proc(url, process)


def start_webui(fake_url: str | None, services: dict[str, str] | None = None, **extra: str) -> Proc:
    """The web UI in front of the fake upstream (`fake_url`), or of the real `services` by name."""
    port = free_port()
    urls = services or {name: f"{fake_url}/{name}" for name in ("inference", "trainer", "registry")}
    env = {
        **os.environ,
        "WEBUI_PORT": str(port),
        "WEBUI_INFERENCE_URL": urls["inference"],
        "WEBUI_TRAINER_URL": urls["trainer"],
        "WEBUI_REGISTRY_URL": urls["registry"],
        "WEBUI_INFERENCE_TOKEN": "inference-secret",
        "WEBUI_TRAINER_TOKEN": "trainer-secret",
        "WEBUI_REGISTRY_TOKEN": "registry-secret",
        "WEBUI_ADMIN_TOKEN": ADMIN_TOKEN,
        "WEBUI_CHAT_TOKEN": CHAT_TOKEN,
        **extra,
    }
    OUTPUT.mkdir(exist_ok=True)
    with open(OUTPUT / f"webui-{port}.log", "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "webui"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(f"{url}/health", process)
    return Proc(url, process)


@pytest.fixture(scope="session")
def fake():
    proc = start_fake()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def webui(fake):
    proc = start_webui(fake.url)
    yield proc
    proc.stop()


def poll(fn, limit_s: float = 10.0):
    """Call fn until it returns something truthy; fail with its last value after limit_s."""
    deadline = time.monotonic() + limit_s
    value = fn()
    while not value and time.monotonic() < deadline:
        time.sleep(0.05)
        value = fn()
    assert value, f"condition still false after {limit_s} s"
    return value


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium through Playwright, one per test module."""
    from nanochat_testing.browser import launch_chromium
    from playwright.sync_api import sync_playwright

    OUTPUT.mkdir(exist_ok=True)
    with sync_playwright() as p:
        b = launch_chromium(p)
        yield b
        b.close()
