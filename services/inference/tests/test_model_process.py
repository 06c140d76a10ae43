"""The model's own process: load errors, a killed model process, a killed HTTP process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import free_port, start_server, wait_for
from inference.model_process import ModelLoadError, ModelProcess


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc: the model process is a fork server's child)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def test_a_checkpoint_that_fails_to_load_says_why(checkpoints, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in checkpoints["a"].iterdir():
        if f.is_file():
            (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not the weights")
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        ModelProcess.start(broken)
    with pytest.raises(ModelLoadError, match="does not exist"):
        ModelProcess.start(tmp_path / "missing")


def test_a_killed_model_process_ends_its_streams_with_an_error_and_is_reloaded(checkpoints):
    s = start_server(model_dir=checkpoints["a"], slots=2, max_len=2048)
    try:
        s.wait_ready()
        dead = s.manager.current
        body = {
            "messages": [{"role": "user", "content": "Go on."}],
            "max_tokens": 2000,
            "temperature": 0.0,
            "stream": True,
        }
        with httpx.stream("POST", f"{s.url}/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            os.kill(dead.scheduler.process.pid, signal.SIGKILL)
            events = [json.loads(line[6:]) for line in lines if line.startswith("data: ") and line != "data: [DONE]"]
        assert "model process exited" in events[-1]["error"]["message"]
        s.wait_ready()
        assert s.manager.current is not dead and not dead.scheduler.alive
        reply = httpx.post(
            f"{s.url}/v1/chat/completions",
            timeout=60,
            json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0},
        )
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3
    finally:
        s.stop()


def test_the_model_process_exits_when_the_http_process_is_killed(checkpoints):
    port = free_port()
    env = {
        **os.environ,
        "INFERENCE_MODEL_DIR": str(checkpoints["a"]),
        "INFERENCE_PORT": str(port),
        "INFERENCE_LOG_LEVEL": "WARNING",
    }
    server = subprocess.Popen([sys.executable, "-m", "inference"], env=env, stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: _ready(port), timeout=60, what="the server to load its model")
        children = descendants(server.pid)
        assert children, "the model runs in a process of its own"
    finally:
        server.kill()
        server.wait()
    wait_for(
        lambda: not any(Path(f"/proc/{pid}").exists() and _state(pid) != "Z" for pid in children),
        timeout=15,
        what="the model process to exit with its parent",
    )


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200
    except httpx.TransportError:
        time.sleep(0.1)
        return False


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"
