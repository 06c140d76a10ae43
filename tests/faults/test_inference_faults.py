"""Inference killed in the middle of a stream, with the services as `make up` starts them
(fault_harness): the registry holds two SFT versions and its `serving` alias names the older one,
which inference resolves, downloads and serves through the images' entry point.

- The HTTP process SIGKILLed while chats stream, one straight from inference and one through the
  web UI: each stream ends within seconds instead of hanging (the direct one with its connection
  closed before `[DONE]`, all a dead process can do; the UI's with an error event in OpenAI's
  shape, then a complete response); the model process and its fork server go with it; restarted
  as `make up`'s supervisor restarts it (`up.Stack.supervise`), it serves the version the
  registry's resolve names, the same as before.
- Its model process SIGKILLed while a chat streams: the stream gets an error event in OpenAI's
  shape and ends; the server loads the same version in a new model process and answers again.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass, field

import httpx
import pytest
from fault_harness import FaultStack, alive, descendants, poll, tiny_checkpoint, up
from registry_client import RegistryClient

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

MODEL = "nanochat"
# A stream that ends on its own takes max_tokens steps (the tiny model never stops a reply), far
# longer than any of the ends below may take.
MAX_TOKENS = 3000
END_WITHIN_S = 15.0
CHAT = {
    "model": MODEL,
    "stream": True,
    "max_tokens": MAX_TOKENS,
    "temperature": 0.0,
    "messages": [{"role": "user", "content": "Go on."}],
}


@dataclass
class Stream:
    """A chat stream opened and read up to its first content, then read to its end after a fault."""

    client: httpx.Client
    url: str
    response: httpx.Response | None = None
    events: list[str] = field(default_factory=list)
    ended: str = "open"
    seconds_after_fault: float = 0.0

    def open(self) -> Stream:
        request = self.client.build_request("POST", self.url, json=CHAT)
        self.response = self.client.send(request, stream=True)
        assert self.response.status_code == 200, self.response.read()
        self._lines = self.response.iter_lines()
        # Content has flowed: the stream is in the middle of its generation.
        while not any('"content"' in e for e in self.events):
            self.events.append(self._next_event())
        return self

    def _next_event(self) -> str:
        for line in self._lines:
            if line.startswith("data:"):
                return line[5:].strip()
        raise EOFError

    def read_to_end(self, fault_at: float) -> Stream:
        """Read what is left: `done` ([DONE]), `error` (an error event, then the end), `cut`
        (the connection closed first) or `hung` (no byte for the client's read timeout)."""
        try:
            while True:
                event = self._next_event()
                self.events.append(event)
                if event == "[DONE]":
                    self.ended = "done"
                    break
                if "error" in json.loads(event):
                    self.ended = "error"
        except EOFError:
            self.ended = "error" if self.ended == "error" else "cut"
        except httpx.ReadTimeout:
            self.ended = "hung"
        except httpx.TransportError:
            self.ended = "cut"
        finally:
            self.seconds_after_fault = time.monotonic() - fault_at
            self.response.close()
        return self

    def error(self) -> dict:
        return json.loads(self.events[-1])["error"]


def served_version(stack: FaultStack) -> int | None:
    """The version inference's /ready names (None while no model is loaded)."""
    ready = httpx.get(f"{stack.url('inference')}/ready", timeout=5)
    return ready.json().get("version") if ready.status_code == 200 else None


def models_version(stack: FaultStack) -> int:
    data = httpx.get(f"{stack.url('inference')}/v1/models", timeout=30).json()["data"]
    assert [m["id"] for m in data] == [MODEL]
    return data[0]["version"]


def chat_answers(stack: FaultStack) -> bool:
    body = {**CHAT, "stream": False, "max_tokens": 4}
    reply = httpx.post(f"{stack.url('inference')}/v1/chat/completions", json=body, timeout=60)
    return reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4


@pytest.fixture
def stack(tmp_path):
    """Registry, inference (and the web UI) as `make up` starts them, inference serving v1 of two
    SFT versions: the one the serving alias names, not the newest."""
    extra = {
        "inference": {
            "INFERENCE_DEVICE": "cpu",
            "INFERENCE_CPU_THREADS": "1",
            "INFERENCE_SLOTS": "4",
            "INFERENCE_POLL_INTERVAL_S": "1",
        }
    }
    stack = FaultStack.create(tmp_path, services=["registry"], extra_env=extra)
    try:
        with RegistryClient(stack.url("registry"), token=stack.tokens["registry"], cache_dir=tmp_path / "up") as rc:
            checkpoint = tiny_checkpoint(tmp_path / "sft", sequence_len=4096)
            first = rc.upload_folder(checkpoint, MODEL, stage="sft").version
            rc.upload_folder(checkpoint, MODEL, stage="sft")
            rc.set_alias(MODEL, "serving", first)
        stack.start("inference")
        stack.start("webui")
        poll(lambda: httpx.get(f"{stack.url('webui')}/health", timeout=5).status_code == 200, 120, "the web UI")
        poll(lambda: served_version(stack) == first, 180, f"inference to serve v{first}")
        yield stack
    finally:
        stack.stop()


def registry_resolves(stack: FaultStack) -> int:
    r = httpx.get(
        f"{stack.url('registry')}/v1/resolve/{MODEL}",
        params={"alias": "serving"},
        headers={"Authorization": f"Bearer {stack.tokens['registry_read']}"},
        timeout=10,
    )
    r.raise_for_status()
    return r.json()["version"]


def test_a_killed_inference_server_ends_its_streams_and_comes_back_serving_the_same_version(stack):
    before = models_version(stack)
    assert before == registry_resolves(stack)
    server = stack.pid("inference")
    below = [p for p in descendants(server) if p != server]
    assert below, "the model runs in a process of its own"
    with httpx.Client(timeout=httpx.Timeout(30, read=END_WITHIN_S * 2)) as client:
        direct = Stream(client, f"{stack.url('inference')}/v1/chat/completions").open()
        through_ui = Stream(client, f"{stack.url('webui')}/api/inference/v1/chat/completions").open()
        killed_at = time.monotonic()
        stack.kill("inference")
        direct.read_to_end(killed_at)
        through_ui.read_to_end(killed_at)
    print(f"streams ended {direct.seconds_after_fault:.2f} s (direct), {through_ui.seconds_after_fault:.2f} s (UI)")
    assert direct.ended == "cut" and direct.seconds_after_fault < END_WITHIN_S, direct
    # The UI saw its upstream break: it ends the chat stream as inference ends a failed one.
    assert through_ui.ended == "error" and through_ui.seconds_after_fault < END_WITHIN_S, through_ui
    ui_error = through_ui.error()
    assert set(ui_error) == {"message", "type", "param", "code"} and ui_error["code"] == "upstream_stream_broken"
    poll(lambda: not any(alive(p) for p in below), 30, "the dead server's model process and fork server to exit")

    stack.procs.supervise()
    assert stack.pid("inference") != server, "the supervisor did not restart inference"
    up.wait_healthy(stack.procs, stack.url("inference"), "inference", 120)
    poll(lambda: served_version(stack) is not None, 180, "the restarted inference to load its model")
    assert models_version(stack) == before == registry_resolves(stack)
    assert chat_answers(stack)


def test_a_killed_model_process_ends_its_stream_with_an_error_and_is_loaded_again(stack):
    before = models_version(stack)
    server = stack.pid("inference")
    child = model_process(server)
    with httpx.Client(timeout=httpx.Timeout(30, read=END_WITHIN_S * 2)) as client:
        stream = Stream(client, f"{stack.url('inference')}/v1/chat/completions").open()
        killed_at = time.monotonic()
        os.kill(child, signal.SIGKILL)
        stream.read_to_end(killed_at)
    print(f"the stream ended {stream.seconds_after_fault:.2f} s after the model process was killed")
    assert stream.ended == "error" and stream.seconds_after_fault < END_WITHIN_S, stream
    error = stream.error()
    assert set(error) == {"message", "type", "param", "code"} and "model process exited" in error["message"], error
    assert stack.pid("inference") == server and alive(server), "the HTTP process survives its model process"
    poll(lambda: served_version(stack) == before, 120, f"inference to load v{before} again")
    assert models_version(stack) == before == registry_resolves(stack)
    assert chat_answers(stack)
    assert model_process(server) != child


def model_process(server: int) -> int:
    """The model process below the inference server `server`: its fork server's one child."""
    below = descendants(server)
    grandchildren = [p for p in below if parent(p) not in (server, None) and parent(p) in below]
    assert len(grandchildren) == 1, f"expected one model process below {server}, found {grandchildren}"
    return grandchildren[0]


def parent(pid: int) -> int | None:
    try:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None
