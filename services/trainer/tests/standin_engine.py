"""A stand-in Docker Engine for tests: a real HTTP server on a unix socket that speaks the part
of the Engine API the Docker SDK uses to run one container, and runs each "container" as a local
process (its Cmd, Env and WorkingDir; no isolation, no image).

    engine = StandinEngine(tmp_path / "docker.sock", images={"nanochat/trainer-worker:dev"})
    engine.start()            # DOCKER_HOST / TRAINER_DOCKER_HOST = engine.url
    ... engine.requests       # every (method, path, query, body) in order, for payload checks
    engine.stop()

Endpoints: GET /version and /_ping, POST /containers/create (404 "No such image" for an image
not pulled yet), GET /containers/json (label filters), GET /containers/{id}/json, POST .../start,
GET .../logs (stdout/stderr as the multiplexed stream, follow), POST .../wait, POST .../stop?t=N
(SIGTERM to the main process, t seconds, then SIGKILL to everything the container started),
DELETE /containers/{id}, POST /images/create (a "pull" that makes the image known). Paths may
carry the /v1.NN prefix the SDK adds.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socketserver
import struct
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

API_VERSION = "1.47"
ENGINE_VERSION = "27.5.1-standin"


@dataclass
class FakeContainer:
    id: str
    config: dict[str, Any]
    proc: subprocess.Popen | None = None
    chunks: dict[int, list[bytes]] = field(default_factory=lambda: {1: [], 2: []})
    done: dict[int, bool] = field(default_factory=lambda: {1: False, 2: False})
    cond: threading.Condition = field(default_factory=threading.Condition)
    signals: list[str] = field(default_factory=list)

    def status(self) -> str:
        if self.proc is None:
            return "created"
        return "running" if self.proc.poll() is None else "exited"

    def read(self, stream: int, pipe) -> None:
        for chunk in iter(lambda: pipe.read1(4096), b""):
            with self.cond:
                self.chunks[stream].append(chunk)
                self.cond.notify_all()
        with self.cond:
            self.done[stream] = True
            self.cond.notify_all()

    def kill_all(self) -> None:
        """Everything the container started dies with it (the process group stands for the
        container's pid namespace)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class StandinEngine:
    def __init__(self, socket_path: Path, images: set[str] | None = None):
        self.socket_path = socket_path
        self.url = f"unix://{socket_path}"
        self.images = set(images or ())
        self.containers: dict[str, FakeContainer] = {}
        self.requests: list[tuple[str, str, dict[str, list[str]], Any]] = []
        self.lock = threading.Lock()
        engine = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                engine.handle(self, "GET")

            def do_POST(self) -> None:
                engine.handle(self, "POST")

            def do_DELETE(self) -> None:
                engine.handle(self, "DELETE")

            def do_HEAD(self) -> None:
                engine.handle(self, "HEAD")

        self.server = _Server(str(socket_path), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> StandinEngine:
        self.thread.start()
        return self

    def stop(self) -> None:
        for c in self.containers.values():
            if c.proc is not None:
                c.kill_all()
                c.proc.wait()
        self.server.shutdown()
        self.server.server_close()
        self.socket_path.unlink(missing_ok=True)

    def calls(self, method: str, pattern: str) -> list[tuple[str, str, dict[str, list[str]], Any]]:
        return [r for r in self.requests if r[0] == method and re.fullmatch(pattern, r[1])]

    def handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        url = urlsplit(h.path)
        path = re.sub(r"^/v1\.\d+", "", url.path)
        query = parse_qs(url.query)
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        body = json.loads(raw) if raw and "json" in (h.headers.get("Content-Type") or "") else None
        with self.lock:
            self.requests.append((method, path, query, body))
        try:
            self.dispatch(h, method, path, query, body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away (a log stream it stopped reading)

    def dispatch(
        self, h: BaseHTTPRequestHandler, method: str, path: str, query: dict[str, list[str]], body: Any
    ) -> None:
        m = re.fullmatch(r"/containers/([0-9a-f]+)(/\w+)?", path)
        if method == "GET" and path == "/version":
            self.reply(
                h,
                200,
                {
                    "Version": ENGINE_VERSION,
                    "ApiVersion": API_VERSION,
                    "MinAPIVersion": "1.24",
                    "Os": "linux",
                    "Arch": "amd64",
                },
            )
        elif path == "/_ping":
            self.reply(h, 200, "OK")
        elif method == "POST" and path == "/containers/create":
            self.create(h, body)
        elif method == "GET" and path == "/containers/json":
            self.list(h, query)
        elif method == "POST" and path == "/images/create":
            self.pull(h, query)
        elif m and m.group(1) not in self.containers:
            self.reply(h, 404, {"message": f"No such container: {m.group(1)}"})
        elif m:
            self.container_call(h, method, self.containers[m.group(1)], m.group(2) or "", query)
        else:
            self.reply(h, 404, {"message": f"page not found: {method} {path}"})

    def reply(self, h: BaseHTTPRequestHandler, status: int, payload: Any = None) -> None:
        data = (
            b"" if payload is None else (payload.encode() if isinstance(payload, str) else json.dumps(payload).encode())
        )
        h.send_response(status)
        h.send_header("Content-Type", "text/plain" if isinstance(payload, str) else "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if data:
            h.wfile.write(data)

    def create(self, h: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        if body["Image"] not in self.images:
            self.reply(h, 404, {"message": f"No such image: {body['Image']}"})
            return
        cid = uuid.uuid4().hex + uuid.uuid4().hex
        self.containers[cid] = FakeContainer(cid, body)
        self.reply(h, 201, {"Id": cid, "Warnings": []})

    def pull(self, h: BaseHTTPRequestHandler, query: dict[str, list[str]]) -> None:
        image = f"{query['fromImage'][0]}:{query.get('tag', ['latest'])[0]}"
        self.images.add(image)
        lines = [{"status": f"Pulling from {query['fromImage'][0]}"}, {"status": f"Downloaded newer image for {image}"}]
        # A progress stream, one JSON object per chunk, as the engine sends it.
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        for line in lines:
            data = json.dumps(line).encode() + b"\r\n"
            h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        h.wfile.write(b"0\r\n\r\n")

    def list(self, h: BaseHTTPRequestHandler, query: dict[str, list[str]]) -> None:
        labels = json.loads(query.get("filters", ["{}"])[0]).get("label", [])
        wanted = dict(label.split("=", 1) for label in labels)
        found = [
            c
            for c in self.containers.values()
            if all(c.config.get("Labels", {}).get(k) == v for k, v in wanted.items())
            and ("all" in query or c.status() == "running")
        ]
        self.reply(h, 200, [{"Id": c.id, "Labels": c.config.get("Labels", {}), "State": c.status()} for c in found])

    def container_call(
        self, h: BaseHTTPRequestHandler, method: str, c: FakeContainer, action: str, query: dict[str, list[str]]
    ) -> None:
        if method == "GET" and action == "/json":
            self.reply(
                h,
                200,
                {
                    "Id": c.id,
                    "Name": f"/standin-{c.id[:12]}",
                    "Image": c.config["Image"],
                    "Config": {**c.config, "Tty": False},
                    "HostConfig": c.config.get("HostConfig", {}),
                    "State": {
                        "Status": c.status(),
                        "Running": c.status() == "running",
                        "ExitCode": c.proc.returncode if c.proc and c.proc.returncode is not None else 0,
                    },
                },
            )
        elif method == "POST" and action == "/start":
            env = {"PATH": os.environ["PATH"], **dict(e.split("=", 1) for e in c.config.get("Env") or [])}
            c.proc = subprocess.Popen(
                c.config["Cmd"],
                env=env,
                cwd=c.config.get("WorkingDir") or "/",
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
            for stream, pipe in ((1, c.proc.stdout), (2, c.proc.stderr)):
                threading.Thread(target=c.read, args=(stream, pipe), daemon=True).start()
            self.reply(h, 204)
        elif method == "GET" and action == "/logs":
            self.logs(h, c, query)
        elif method == "POST" and action == "/wait":
            code = c.proc.wait() if c.proc else 0
            c.kill_all()
            self.reply(h, 200, {"StatusCode": code, "Error": None})
        elif method == "POST" and action == "/stop":
            if c.status() != "running":
                self.reply(h, 304)
                return
            grace = int(query.get("t", ["10"])[0])
            c.signals.append("SIGTERM")
            c.proc.send_signal(signal.SIGTERM)
            try:
                c.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                c.signals.append("SIGKILL")
            c.kill_all()
            c.proc.wait()
            self.reply(h, 204)
        elif method == "DELETE" and action == "":
            if c.status() == "running" and query.get("force", ["false"])[0] not in ("1", "true", "True"):
                self.reply(h, 409, {"message": "You cannot remove a running container. Stop it first."})
                return
            if c.proc is not None:
                c.kill_all()
                c.proc.wait()
            del self.containers[c.id]
            self.reply(h, 204)
        else:
            self.reply(h, 404, {"message": f"page not found: {method} {action}"})

    def logs(self, h: BaseHTTPRequestHandler, c: FakeContainer, query: dict[str, list[str]]) -> None:
        streams = [
            s for s, name in ((1, "stdout"), (2, "stderr")) if query.get(name, ["0"])[0] in ("1", "true", "True")
        ]
        follow = query.get("follow", ["0"])[0] in ("1", "true", "True")
        h.send_response(200)
        h.send_header("Content-Type", "application/vnd.docker.multiplexed-stream")
        h.send_header("Connection", "close")
        h.end_headers()
        sent = {s: 0 for s in streams}
        while True:
            with c.cond:
                pending = [(s, c.chunks[s][sent[s] :]) for s in streams]
                finished = all(c.done[s] for s in streams) or c.proc is None
                if not any(chunks for _, chunks in pending) and not finished and follow:
                    c.cond.wait(timeout=0.5)
                    continue
            for s, chunks in pending:
                for chunk in chunks:
                    h.wfile.write(struct.pack(">BxxxL", s, len(chunk)) + chunk)
                sent[s] += len(chunks)
            h.wfile.flush()
            if finished or not follow:
                break
        h.close_connection = True


def wait_until(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)
