"""The trainer's use of the model registry, through `registry_client`, with errors sorted by
what the trainer does about them:

- `VersionNotFound`: the input a job names does not exist (the API answers 404).
- `RegistryUnavailable`: the registry cannot be reached or failed (5xx, timeouts, a broken
  transfer): worth retrying with backoff.
- `RegistryRejected`: the registry refused the request (other 4xx): retrying cannot help.

An upload interrupted part-way is resumed on the next try (only the missing files are sent).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from registry_client import IntegrityError, RegistryClient, RegistryError, UploadError, VersionInfo

from trainer.settings import Settings


class VersionNotFound(Exception):
    pass


class RegistryUnavailable(Exception):
    pass


class RegistryRejected(Exception):
    pass


@dataclass
class Resolved:
    name: str
    version: int
    stage: str


def _translate(error: BaseException) -> Exception:
    if isinstance(error, RegistryError):
        if error.status == 404:
            return VersionNotFound(error.message)
        if error.status >= 500 or error.status in (408, 429):
            return RegistryUnavailable(f"registry answered {error.status}: {error.message}")
        return RegistryRejected(f"registry refused: {error.status}: {error.message}")
    return RegistryUnavailable(f"{type(error).__name__}: {error}")


def _scalar_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The registry stores flat metrics: numbers, strings, booleans."""
    return {
        k: v
        for k, v in metrics.items()
        if isinstance(v, (int, float, str, bool)) and not (isinstance(v, float) and v != v)
    }


class Registry:
    def __init__(self, url: str, token: str | None, cache_dir: Path, timeout: float = 60.0):
        self.client = RegistryClient(url, token=token, cache_dir=cache_dir, timeout=timeout, retries=1)
        self._pending: dict[str, int] = {}

    def ping(self) -> None:
        self.client.http.get("/health", timeout=3).raise_for_status()

    def resolve(
        self, name: str, version: int | None = None, alias: str | None = None, stage: str | None = None
    ) -> Resolved:
        try:
            if version is not None:
                info = self.client.get_version(name, version)
                if info.state != "ready":
                    raise VersionNotFound(f"{name}:{version} is {info.state}, not ready")
            else:
                info = self.client.resolve(name, stage=stage, alias=alias)
        except (RegistryError, httpx.HTTPError) as e:
            raise _translate(e) from None
        return Resolved(info.name, info.version, info.stage)

    def download(self, name: str, version: int) -> Path:
        try:
            return self.client.download(name, version)
        except (RegistryError, httpx.HTTPError, IntegrityError, OSError) as e:
            raise _translate(e) from None

    def lineage(self, name: str, version: int) -> list[VersionInfo]:
        """The version, then its parent, up to the root."""
        try:
            chain = self.client.lineage(name, version)
        except (RegistryError, httpx.HTTPError) as e:
            raise _translate(e) from None
        return [VersionInfo.from_json(v) for v in [chain["version"], *chain["parents"]]]

    def upload(
        self,
        folder: Path,
        name: str,
        stage: str,
        parent: tuple[str, int] | None,
        job_id: str,
        metrics: dict[str, Any],
        step: int | None = None,
    ) -> int:
        """Register a checkpoint folder; returns its version. A retry after a broken upload sends
        only the files the registry does not hold yet."""
        key = str(folder.resolve())
        try:
            info = self.client.upload_folder(
                folder,
                name,
                stage,
                step=step,
                metrics=_scalar_metrics(metrics),
                job_id=job_id,
                parent={"name": parent[0], "version": parent[1]} if parent else None,
                resume_version=self._pending.get(key),
            )
        except UploadError as e:
            self._pending[key] = e.version
            raise _translate(e.cause) from None
        except (RegistryError, httpx.HTTPError, OSError) as e:
            raise _translate(e) from None
        self._pending.pop(key, None)
        return info.version

    def patch_metrics(self, name: str, version: int, metrics: dict[str, Any]) -> None:
        try:
            self.client.patch_metrics(name, version, _scalar_metrics(metrics))
        except (RegistryError, httpx.HTTPError) as e:
            raise _translate(e) from None

    def attach(self, name: str, version: int, path: Path) -> None:
        try:
            self.client.attach(name, version, path)
        except (RegistryError, httpx.HTTPError, OSError) as e:
            raise _translate(e) from None


def make_registry(settings: Settings) -> Registry:
    return Registry(settings.registry_url, settings.registry_token, settings.runs_dir / "cache")
