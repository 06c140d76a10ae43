"""A job's processes: find the live ones, stop them all (SIGTERM, grace, SIGKILL).

A stage runs as `torchrun` started with `start_new_session=True`: its process group id is
torchrun's pid. torchrun in turn starts every rank in a session of its own, so the group alone
does not hold a job's processes; every process of a job also carries the `JOB_MARKER` variable
in its environment (inherited by all descendants), and both are searched. SIGTERM goes to
torchrun's group first, because torchrun passes it on to the ranks and their groups; what is
still alive after the grace period gets SIGKILL. Liveness is read from /proc (Linux): a zombie
is not alive, which `os.killpg(pgid, 0)` cannot tell apart.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

PROC = Path("/proc")
# Set in every stage process's environment to the node's tag (`node_tag`): whose process it is.
JOB_MARKER = "NANOCHAT_TRAINER_JOB"


def node_tag(job_id: str, node_rank: int) -> str:
    """The marker value of one node of a job (two nodes may share a host, as in tests)."""
    return f"{job_id}/n{node_rank}"


def _stat_fields(pid_dir: Path) -> tuple[str, int] | None:
    """(state, pgid) of one /proc entry, None when it vanished meanwhile."""
    try:
        raw = (pid_dir / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses; fields after it are fixed.
    rest = raw[raw.rfind(")") + 2 :].split()
    return rest[0], int(rest[2])


def group_members(pgid: int) -> list[int]:
    """Pids of the live (not zombie) processes in process group `pgid`."""
    members = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(entry)
        if fields and fields[1] == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def processes_with_env(name: str, value: str) -> list[int]:
    """Pids of live processes whose environment holds `name=value` (a job's marker variable)."""
    needle = f"{name}={value}".encode()
    found = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        fields = _stat_fields(entry)
        if needle in env and fields and fields[0] not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def job_processes(pgid: int | None, tag: str) -> list[int]:
    """Live processes of a job's node: members of torchrun's group and carriers of its tag."""
    pids = set(processes_with_env(JOB_MARKER, tag))
    if pgid:
        pids.update(group_members(pgid))
    return sorted(pids)


def signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to the group; False when no process of it exists any more."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        # pgid was recycled by another user's group: not ours to signal.
        return False


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def wait_gone(pgid: int | None, tag: str, timeout: float, poll: float = 0.05) -> bool:
    """Wait until no process of the job is alive; True when that happens within `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        if not job_processes(pgid, tag):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)


def terminate_job(pgid: int | None, tag: str, grace: float) -> bool:
    """SIGTERM torchrun's group and every marked process, wait up to `grace` s, then SIGKILL
    every process of the job left.

    True when the job had live processes (i.e. something was stopped)."""
    if pgid and not set(group_members(pgid)) & set(processes_with_env(JOB_MARKER, tag)):
        # torchrun is gone and the id may have been recycled: only marked processes are ours.
        pgid = None
    pids = job_processes(pgid, tag)
    if not pids:
        return False
    if pgid:
        signal_group(pgid, signal.SIGTERM)
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    for attempt in range(20):
        if wait_gone(pgid, tag, grace if attempt == 0 else 0.5):
            break
        if pgid:
            signal_group(pgid, signal.SIGKILL)
        for pid in job_processes(pgid, tag):
            _signal(pid, signal.SIGKILL)
    return True
