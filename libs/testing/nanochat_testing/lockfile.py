"""What a package installs, read from the workspace's uv.lock: the closure of its dependencies
(with the extras named), the way `uv sync --package NAME --extra ...` would install it. Tests use
it to check that each image gets only what its role needs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib

LOCK = Path(__file__).resolve().parents[3] / "uv.lock"


def installed_by(package: str, extras: tuple[str, ...] = (), lock: Path = LOCK) -> set[str]:
    """Names of every package `package` (with `extras`) pulls in, itself included."""
    entries = {p["name"]: p for p in tomllib.loads(lock.read_text())["package"]}
    seen: set[str] = set()
    todo: list[tuple[str, tuple[str, ...]]] = [(package, extras)]
    done: set[tuple[str, str]] = set()
    while todo:
        name, wanted = todo.pop()
        entry = entries[name]
        seen.add(name)
        groups = [entry.get("dependencies", [])]
        groups += [entry.get("optional-dependencies", {}).get(e, []) for e in wanted if (name, e) not in done]
        done.update((name, e) for e in wanted)
        for dep in (d for group in groups for d in group):
            dep_extras = tuple(dep.get("extra", ()))
            if dep["name"] not in seen or any((dep["name"], e) not in done for e in dep_extras):
                todo.append((dep["name"], dep_extras))
    return seen


_BLOCKER = """
import importlib.abc, sys
BLOCKED = set(sys.argv[1].split(","))

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"{name} is not installed for this role", name=name)

sys.meta_path.insert(0, Blocked())
exec(sys.argv[2])
"""


def run_without(modules: set[str], code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter where `modules` cannot be imported, as on an image
    that lacks them; the caller checks returncode and output."""
    return subprocess.run(
        [sys.executable, "-c", _BLOCKER, ",".join(sorted(modules)), code],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
