"""Atomic publication of artifact folders: a stage's output appears whole or not at all.

`atomic_folder(out)` is how a stage publishes: it yields a hidden temp folder next to `out`, and
only when the block ends without an exception is the folder renamed to `out`, so a crash or a
SIGTERM never leaves a half-written artifact behind. What the folder must hold, a manifest of its
files, is the contract `nanochat_contracts.manifest`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_folder(out: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside `out`; rename it to `out` on success, delete it on any error.

    An existing `out` is an error unless `replace` is set (then it is swapped out only after the
    new folder is complete)."""
    out = Path(out)
    if out.exists() and not replace:
        raise FileExistsError(f"output folder {out} already exists; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
