"""Run untrusted Python (HumanEval answers) in an isolated, limited process.

`run_python(code)` runs the code under bubblewrap (`bwrap`, Debian's `bubblewrap`; `$NANOCHAT_BWRAP`
names another binary) with
- a file system that holds only the system folders (/usr and its /bin, /lib links) and the Python
  install, all read-only, plus a fresh, size-capped tmpfs at /tmp (the working folder and HOME):
  the worker's checkpoints, blobs, tokens and home are not there to read or write;
- no network (a new network namespace: its own loopback, nothing else), new IPC/UTS namespaces;
- a new PID namespace whose pid 1 is the program itself (`--as-pid-1`): when it ends or times
  out, the kernel kills every process it started, `setsid()` ones included, and bwrap exits only
  after that, so none is left when `run_python` returns;
- rlimits: CPU seconds, address space (256 MB unless asked, the original's HumanEval limit), file
  size (which also caps stdout/stderr, written to files), no core dumps, few open files, and a
  process limit (as pid 1 the program ignores the CPU limit's SIGXCPU; its hard limit, a second
  later, kills). RLIMIT_NPROC is not enforced for root, so under root the program runs as a fresh
  uid (`SANDBOX_UID_BASE` + this process's id: concurrent evaluators do not share the count);
  otherwise bwrap's user namespace gives the program a count of its own.

Where no such sandbox can be made (no bwrap, or the kernel refuses its namespaces) `run_python`
raises `SandboxUnavailable`, naming what is missing and how to install it, unless the caller
passes `allow_unsandboxed=True`: then the code runs as before this module used bwrap (the same
rlimits, a best-effort network namespace and a prelude that disables `socket`; none of them keeps
it from the worker's files). `require_isolation`, which HumanEval calls when loaded, checks once
up front: it raises the same, or under `allow_unsandboxed` logs a warning.
It never raises for what the code does: the result says success, timeout, exit code and output.

    python -m nanochat.sandbox 'print(1 + 1)'
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
OUTPUT_LIMIT = 1 << 20
PROCESS_LIMIT = 32
TMP_SIZE = 64 << 20
SANDBOX_UID_BASE = 1 << 30
SYSTEM_FOLDERS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
INSTALL_HINT = (
    "Install bubblewrap (Debian/Ubuntu: `sudo apt-get install -y bubblewrap`; `make system-packages` does it "
    "as root) on a kernel that allows user namespaces, or set the chat_eval option `allow_unsandboxed: true` "
    "to run the answers with best-effort limits only (they can then read and write the worker's files)."
)

# Runs before the untrusted code when no sandbox isolates it: sockets fail even where no namespace
# could be made (code importing `_socket` gets past it).
PRELUDE = """\
import socket as _s
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the sandbox")
_s.socket = _s.create_connection = _s.socketpair = _s.getaddrinfo = _no_network
del _s, _no_network
"""

# Pid 1 inside the sandbox: the process limit (counted per user, set before leaving root takes
# effect for the new uid), then the program in a fresh interpreter with no site-packages.
LAUNCHER = f"""\
import os, resource, sys
resource.setrlimit(resource.RLIMIT_NPROC, ({PROCESS_LIMIT}, {PROCESS_LIMIT}))
uid = int(sys.argv[1])
if uid:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
os.execv(sys.executable, [sys.executable, "-I", "-S", "/tmp/program.py"])
"""


class SandboxUnavailable(RuntimeError):
    """No isolating sandbox can be made here and running without one was not allowed."""


@dataclass
class RunResult:
    success: bool
    timed_out: bool
    returncode: int | None
    stdout: str
    stderr: str


def bwrap_path() -> str | None:
    """The bubblewrap binary: `$NANOCHAT_BWRAP` when set, else `bwrap` on PATH."""
    return os.environ.get("NANOCHAT_BWRAP") or shutil.which("bwrap")


def isolation_problem() -> str | None:
    """Why no isolating sandbox can be made here (None: it can), with what to install."""
    return _probe(bwrap_path())


@functools.cache
def _probe(bwrap: str | None) -> str | None:
    if bwrap is None:
        return f"bubblewrap (bwrap) is not installed. {INSTALL_HINT}"
    if not os.access(bwrap, os.X_OK):
        return f"bubblewrap is not at {bwrap} (NANOCHAT_BWRAP). {INSTALL_HINT}"
    result = _run_sandboxed(bwrap, "print('ok')", timeout=10, memory_mb=256)
    if result.success and result.stdout.strip() == "ok":
        return None
    said = result.stderr.strip().splitlines()[-1:] or [f"exit code {result.returncode}"]
    return f"bubblewrap ({bwrap}) cannot make the sandbox here: {said[0]}. {INSTALL_HINT}"


def require_isolation(allow_unsandboxed: bool = False) -> str | None:
    """Check before a run of many programs: None when they will run isolated; else raise
    `SandboxUnavailable`, or with `allow_unsandboxed` log a warning and return the problem."""
    problem = _refuse_unless_allowed(allow_unsandboxed)
    if problem is not None:
        logger.warning("running untrusted code WITHOUT a sandbox (allow_unsandboxed is set): %s", problem)
    return problem


def _refuse_unless_allowed(allow_unsandboxed: bool) -> str | None:
    problem = isolation_problem()
    if problem is not None and not allow_unsandboxed:
        raise SandboxUnavailable(f"refusing to run untrusted code without a sandbox: {problem}")
    return problem


def run_python(code: str, timeout: float = 5.0, memory_mb: int = 256, allow_unsandboxed: bool = False) -> RunResult:
    """Run `code` in the sandbox; success means exit code 0 within the timeout."""
    if timeout <= 0 or memory_mb <= 0:
        raise ValueError("timeout and memory_mb must be positive")
    if _refuse_unless_allowed(allow_unsandboxed) is None:
        return _run_sandboxed(bwrap_path(), code, timeout, memory_mb)
    return _run_unsandboxed(code, timeout, memory_mb)


def _limit(cpu_seconds: int, memory_bytes: int) -> None:
    """In the child before exec: the resource limits (inherited by everything it starts)."""
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (OUTPUT_LIMIT, OUTPUT_LIMIT))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))


def _limit_and_unshare(cpu_seconds: int, memory_bytes: int) -> None:
    _limit(cpu_seconds, memory_bytes)
    try:
        ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWUSER | CLONE_NEWNET)
    except (OSError, AttributeError):
        pass  # not permitted here: the prelude still blocks `socket`


def _interpreter() -> Path:
    """The base interpreter (a venv's python would need the venv's folder in the sandbox)."""
    return Path(getattr(sys, "_base_executable", None) or sys.executable).resolve()


def _mounts() -> list[str]:
    """bwrap's file system: the system folders and the Python install read-only, a tmpfs /tmp."""
    args = ["--ro-bind", "/usr", "/usr"]
    for folder in SYSTEM_FOLDERS:
        if os.path.islink(folder):
            args += ["--symlink", os.readlink(folder), folder]
        elif os.path.isdir(folder):
            args += ["--ro-bind", folder, folder]
    args += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache", "--dev", "/dev", "--proc", "/proc"]
    args += ["--perms", "1777", "--size", str(TMP_SIZE), "--tmpfs", "/tmp"]
    mounted = ["/usr", *SYSTEM_FOLDERS, "/tmp"]
    made: set[Path] = set()
    python = {Path(sys.base_prefix).resolve(), Path(sys.base_exec_prefix).resolve(), _interpreter().parent}
    for folder in sorted(python, key=lambda p: len(p.parts)):
        if any(folder.is_relative_to(m) for m in mounted) and not folder.is_relative_to("/tmp"):
            continue
        # bwrap makes the parents of a mount point 0700; the dropped uid must pass through them.
        for parent in reversed(folder.parents[:-1]):
            if parent not in made and not any(parent == Path(m) for m in mounted):
                args += ["--perms", "0755", "--dir", str(parent)]
                made.add(parent)
        args += ["--ro-bind", str(folder), str(folder)]
        mounted.append(str(folder))
    return args


def _bwrap_command(bwrap: str, program: Path, info_fd: int) -> list[str]:
    if os.geteuid() == 0:
        # No user namespace: its uid 0 would map to root, which RLIMIT_NPROC exempts. The launcher
        # keeps CAP_SETUID/SETGID only to leave root (bwrap sets no_new_privs: no way back).
        uid = SANDBOX_UID_BASE + os.getpid()
        namespaces = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
        namespaces += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        uid = 0
        namespaces = ["--unshare-all", "--unshare-user", "--disable-userns"]
    env = {"HOME": "/tmp", "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
    return [
        bwrap,
        *namespaces,
        "--as-pid-1",
        "--die-with-parent",
        "--new-session",
        *_mounts(),
        "--ro-bind",
        str(program),
        "/tmp/program.py",
        "--remount-ro",
        "/",
        "--chdir",
        "/tmp",
        "--clearenv",
        *[arg for key, value in env.items() for arg in ("--setenv", key, value)],
        "--info-fd",
        str(info_fd),
        str(_interpreter()),
        "-I",
        "-S",
        "-c",
        LAUNCHER,
        str(uid),
    ]


def _sandbox_pidfd(info_read: int) -> int | None:
    """A pidfd of the sandbox's pid 1, from bwrap's info (None when bwrap failed first)."""
    with os.fdopen(info_read, "rb") as info:
        data = info.read()
    try:
        return os.pidfd_open(json.loads(data)["child-pid"])
    except (ValueError, KeyError, OSError):
        return None


def _run_sandboxed(bwrap: str, code: str, timeout: float, memory_mb: int) -> RunResult:
    with tempfile.TemporaryDirectory(prefix="nanochat-sandbox-") as tmp:
        folder = Path(tmp)
        program = folder / "program.py"
        program.write_text(code, encoding="utf-8")
        program.chmod(0o644)  # read by the sandbox's own uid
        info_read, info_write = os.pipe()
        with open(folder / "stdout", "wb") as out, open(folder / "stderr", "wb") as err:
            proc = subprocess.Popen(
                _bwrap_command(bwrap, program, info_write),
                cwd=tmp,
                env={"PATH": "/usr/bin:/bin"},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                pass_fds=(info_write,),
                start_new_session=True,
                preexec_fn=lambda: _limit(int(timeout) + 1, memory_mb << 20),
            )
            os.close(info_write)
            pidfd = _sandbox_pidfd(info_read)
            timed_out = _wait(proc, timeout, pidfd)
        return _result(folder, proc, timed_out)


def _wait(proc: subprocess.Popen, timeout: float, pidfd: int | None) -> bool:
    """Wait for the sandbox; on timeout kill its pid 1, which takes every process inside with it
    (bwrap reaps pid 1, whose exit completes only once the namespace is empty). True on timeout."""
    try:
        proc.wait(timeout=timeout)
        return False
    except subprocess.TimeoutExpired:
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
                return True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _run_unsandboxed(code: str, timeout: float, memory_mb: int) -> RunResult:
    with tempfile.TemporaryDirectory(prefix="nanochat-sandbox-") as tmp:
        folder = Path(tmp)
        program = folder / "program.py"
        program.write_text(PRELUDE + code, encoding="utf-8")
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
        with open(folder / "stdout", "wb") as out, open(folder / "stderr", "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", str(program)],
                cwd=tmp,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
                preexec_fn=lambda: _limit_and_unshare(int(timeout) + 1, memory_mb << 20),
            )
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        return _result(folder, proc, timed_out)


def _result(folder: Path, proc: subprocess.Popen, timed_out: bool) -> RunResult:
    stdout = (folder / "stdout").read_bytes()[:OUTPUT_LIMIT].decode("utf-8", "replace")
    stderr = (folder / "stderr").read_bytes()[:OUTPUT_LIMIT].decode("utf-8", "replace")
    code = None if timed_out else proc.returncode
    return RunResult(success=code == 0, timed_out=timed_out, returncode=code, stdout=stdout, stderr=stderr)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m nanochat.sandbox CODE")
    if problem := isolation_problem():
        sys.exit(problem)
    print(run_python(sys.argv[1]))
