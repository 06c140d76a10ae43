"""Run untrusted Python (HumanEval answers) in a separate, limited process.

`run_python(code)` writes the code into a fresh temp folder and runs it with this interpreter in
isolated mode (`-I`: no site-packages of the user, no PYTHON* variables), in its own session, with
- rlimits: CPU seconds, address space (memory: 256 MB unless asked, the original's HumanEval
  limit), file size (which also caps stdout/stderr, written to files), no core dumps, few open files;
- no network where the OS allows it: a new user + network namespace (only a loopback that is down),
  and in any case a prelude that makes `socket` unusable;
- a wall-clock timeout after which the whole process group is killed.
It never raises for what the code does: the result says success, timeout, exit code and output.

    python -m nanochat.sandbox 'print(1 + 1)'
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
OUTPUT_LIMIT = 1 << 20

# Runs before the untrusted code: sockets fail even where no namespace could be made.
PRELUDE = """\
import socket as _s
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the sandbox")
_s.socket = _s.create_connection = _s.socketpair = _s.getaddrinfo = _no_network
del _s, _no_network
"""


@dataclass
class RunResult:
    success: bool
    timed_out: bool
    returncode: int | None
    stdout: str
    stderr: str


def _limit(cpu_seconds: int, memory_bytes: int) -> None:
    """In the child before exec: resource limits, then try to drop the network."""
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (OUTPUT_LIMIT, OUTPUT_LIMIT))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    try:
        ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWUSER | CLONE_NEWNET)
    except (OSError, AttributeError):
        pass  # not permitted here: the prelude still blocks sockets


def network_isolated() -> bool:
    """Whether this OS lets the sandbox make a private network namespace: inside, the process's
    own interface list (/proc/self/net/dev; /sys/class/net would show the host's) is `lo` only."""
    probe = (
        "lines = open('/proc/self/net/dev').read().splitlines()[2:]\n"
        "print([line.split(':')[0].strip() for line in lines] == ['lo'])"
    )
    result = run_python(probe, timeout=10)
    return result.success and result.stdout.strip() == "True"


def run_python(code: str, timeout: float = 5.0, memory_mb: int = 256) -> RunResult:
    """Run `code` in a limited subprocess; success means exit code 0 within the timeout."""
    if timeout <= 0 or memory_mb <= 0:
        raise ValueError("timeout and memory_mb must be positive")
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
                preexec_fn=lambda: _limit(int(timeout) + 1, memory_mb << 20),
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
        stdout = (folder / "stdout").read_bytes()[:OUTPUT_LIMIT].decode("utf-8", "replace")
        stderr = (folder / "stderr").read_bytes()[:OUTPUT_LIMIT].decode("utf-8", "replace")
    code_ = None if timed_out else proc.returncode
    return RunResult(success=code_ == 0, timed_out=timed_out, returncode=code_, stdout=stdout, stderr=stderr)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m nanochat.sandbox CODE")
    print(run_python(sys.argv[1]))
    print(f"network namespace: {'yes' if network_isolated() else 'no (the socket prelude only)'}")
