"""Process groups of running stages: find their live members, stop them (SIGTERM, grace, SIGKILL).

A stage runs as `torchrun` started with `start_new_session=True`, so torchrun and every rank it
spawns share one process group whose id is torchrun's pid. Liveness is read from /proc (Linux):
a zombie is not alive, which `os.killpg(pgid, 0)` cannot tell apart.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

PROC = Path("/proc")
# Set in every stage process's environment: which job it belongs to.
JOB_MARKER = "NANOCHAT_TRAINER_JOB"


def _stat_fields(pid_dir: Path) -> tuple[str, int] | None:
    """(state, pgid) of one /proc entry, None when it vanished meanwhile."""
    try:
        raw = (pid_dir / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses; fields after it are fixed.
    rest = raw[raw.rfind(")") + 2:].split()
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


def group_runs_job(pgid: int, marker: str, job_id: str) -> bool:
    """True when a live member of group `pgid` carries the job's marker variable, so a recycled
    group id of some other program is never killed."""
    return any(pid in group_members(pgid) for pid in processes_with_env(marker, job_id))


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


def wait_group_gone(pgid: int, timeout: float, poll: float = 0.05) -> bool:
    """Wait until the group has no live member; True when it is gone within `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        if not group_members(pgid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)


def terminate_group(pgid: int, grace: float) -> bool:
    """SIGTERM the whole group, wait up to `grace` s, then SIGKILL what is left.

    True when the group had live members (i.e. something was stopped)."""
    if not group_members(pgid):
        return False
    signal_group(pgid, signal.SIGTERM)
    if not wait_group_gone(pgid, grace):
        signal_group(pgid, signal.SIGKILL)
        wait_group_gone(pgid, 10.0)
    return True
