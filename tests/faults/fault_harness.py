"""The fault suite's harness: the stack's pieces started as `make up` starts them, real processes
(a plain module, not conftest.py: several suites have a conftest, so `from conftest import` would
be ambiguous in a whole-repository run; conftest.py holds the fixtures).

`infra/local/up.py` supplies the pieces: its config (free ports, NANOCHAT_HOME in a temporary
folder), its generated secrets, each service's own environment, its Redis command line (password,
append-only file) and its `Stack` of process groups, each service run through the images' entry
point. A test adds or replaces what it breaks (`FaultStack.start`, `stop`, `pause`) and waits for
states with `poll`, never with a fixed sleep; every wait is bounded.

    stack = FaultStack.create(tmp_path, services=["registry", "trainer-api", "trainer-worker"])
    job = stack.trainer.post("/v1/jobs", json={...}).json()
    poll(lambda: stack.job(job["id"])["status"] == "running", 60, "the job to start")
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
from nanochat_testing.servers import free_port
from redis import Redis
from redis.exceptions import RedisError
from trainer.procs import processes_with_env

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "infra" / "local"))

import up  # noqa: E402  (infra/local/up.py, the launcher `make up` runs)

T = TypeVar("T")
HEALTH_URLS = {"registry": "registry_port", "trainer-api": "trainer_port", "inference": "inference_port"}


def poll(check: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.2) -> T:
    """check()'s first truthy value; a test failure naming `what` when none comes within timeout_s.
    A check that raises an HTTP error counts as not yet (a service may be restarting)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = check()
        except httpx.HTTPError:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}", pytrace=False)
        time.sleep(interval_s)


def alive(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def descendants(pid: int) -> list[int]:
    """`pid` and every live process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return [p for p in found if alive(p)]


def tiny_checkpoint(folder: Path, sequence_len: int = 128) -> Path:
    """A depth-2 model with random weights over a 300-id tokenizer: enough to serve. Its lm_head is
    init_weights' zeros, so greedy decoding repeats one ordinary token and a reply never ends on
    its own: a stream runs until max_tokens (or the context) ends it."""
    import torch
    from nanochat.checkpoint import save_checkpoint
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import Tokenizer

    tok = Tokenizer.train_from_iterator(["The quick brown fox jumps over the lazy dog. 7*3 = 21. "] * 20, 300)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(2, tok.vocab_size, sequence_len))
    model.init_weights()
    return save_checkpoint(folder, model.eval(), tok, meta={"stage": "sft"})


class FaultStack:
    """Some of `make up`'s services over its Redis, with handles to break them."""

    def __init__(self, home: Path, config: dict[str, str], extra_env: dict[str, dict[str, str]]):
        self.home, self.config = home, config
        self.tokens = up.load_tokens(home)
        self.envs = up.service_env(config, self.tokens)
        for service, env in extra_env.items():
            self.envs[service].update(env)
        self.base = {**os.environ, "NANOCHAT_PYTHON": sys.executable}
        self.procs = up.Stack(home)
        self.trainer = httpx.Client(
            base_url=self.url("trainer"), headers={"Authorization": f"Bearer {self.tokens['trainer']}"}, timeout=30
        )

    @classmethod
    def create(cls, tmp: Path, services: list[str], extra_env: dict[str, dict[str, str]] | None = None) -> FaultStack:
        """Redis, then `services` in `make up`'s order (a name may repeat: `trainer-worker` twice
        starts two workers, `trainer-worker-1` and `trainer-worker-2`)."""
        config = {**up.load_config(), "home": str(tmp / "home")}
        for key in ("webui_port", "inference_port", "trainer_port", "registry_port", "redis_port"):
            config[key] = str(free_port())
        home = Path(config["home"])
        home.mkdir(parents=True, exist_ok=True)
        stack = cls(home, config, extra_env or {})
        stack.start_redis()
        counts: dict[str, int] = {}
        for service in services:
            counts[service] = counts.get(service, 0) + 1
            name = service if services.count(service) == 1 else f"{service}-{counts[service]}"
            stack.start(name, service)
        return stack

    def url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.config[service.replace('-', '_') + '_port']}"

    def start(self, name: str, service: str | None = None) -> int:
        """Start `service` (default: `name`) as `name` and wait until it answers; its pid."""
        service = service or name
        env = up.process_env(service, self.envs[service], self.base)
        self.procs.start(name, ["sh", str(up.ENTRYPOINT), service], env)
        if service in HEALTH_URLS:
            up.wait_healthy(self.procs, f"http://127.0.0.1:{self.config[HEALTH_URLS[service]]}", name, 120)
        return self.pid(name)

    def start_redis(self) -> None:
        argv = up.redis_argv(self.config, self.home, self.tokens["redis"])
        self.procs.start("redis", argv, up.process_env(None, {}, self.base))
        poll(self.redis_answers, 30, "Redis to answer")

    def redis_answers(self) -> bool:
        client = Redis.from_url(up.redis_url(self.config, self.tokens, 0), socket_timeout=1, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        except RedisError:
            return False
        finally:
            client.close()

    def pid(self, name: str) -> int:
        return self.procs.procs[name].pid

    def kill(self, name: str, sig: int = signal.SIGKILL, timeout_s: float = 30) -> None:
        """Signal the process `name` (not its group: a SIGKILLed worker leaves its stage, as in
        production) and wait until it has exited."""
        proc = self.procs.procs[name]
        os.kill(proc.pid, sig)
        proc.wait(timeout=timeout_s)

    def job(self, job_id: str) -> dict:
        r = self.trainer.get(f"/v1/jobs/{job_id}")
        r.raise_for_status()
        return r.json()

    def log(self, name: str, chars: int = 4000) -> str:
        path = self.home / "logs" / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def stop(self, grace_s: float = 20) -> None:
        """SIGTERM to every service's group (Redis last), SIGKILL after `grace_s`; then whatever a
        SIGKILLed worker left running (its stages, in sessions of their own)."""
        self.trainer.close()
        procs = self.procs.procs
        for group in ([n for n in procs if n != "redis"], ["redis"]):
            for name in group:
                if name in procs and procs[name].poll() is None:
                    os.killpg(procs[name].pid, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            for name in group:
                if name not in procs:
                    continue
                try:
                    procs[name].wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    os.killpg(procs[name].pid, signal.SIGKILL)
                    procs[name].wait()
        for pid in processes_with_env("TRAINER_RUNS_DIR", self.envs["trainer-worker"]["TRAINER_RUNS_DIR"]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


class Paused:
    """A server and all its processes stopped (SIGSTOP) until `resume()`: it neither answers nor
    refuses, as a frozen VM or a long GC pause looks from outside."""

    def __init__(self, pid: int):
        self.pids = descendants(pid)
        for p in self.pids:
            os.kill(p, signal.SIGSTOP)

    def resume(self) -> None:
        for p in self.pids:
            try:
                os.kill(p, signal.SIGCONT)
            except ProcessLookupError:
                pass
