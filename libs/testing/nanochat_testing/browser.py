"""The browser the web UI tests drive: Debian's chromium through Playwright.

Playwright's own browser download needs its CDN, which a machine limited to package registries
cannot reach, so `make test` installs Debian's chromium (apt-get, when root or passwordless sudo)
and the tests launch that binary."""

from __future__ import annotations

import os
import shutil

# No sandbox (the tests may run as root) and no background connections (a closed network refuses them).
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    """$CHROMIUM, else the `chromium` on PATH; a clear error naming the install command when neither exists."""
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        raise FileNotFoundError(
            "no chromium on PATH (or $CHROMIUM): `make test` installs it; by hand: sudo apt-get install -y chromium"
        )
    return path


def launch_chromium(playwright):
    """A headless Chromium from Playwright's sync API object (`sync_playwright()`'s value)."""
    return playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS)
