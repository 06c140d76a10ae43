"""Typed client of the nanochat model registry (httpx and the contracts): upload, resolve, verified cached download."""

# The manifest is the contracts' (`nanochat_contracts.manifest`); the client's API names what uploads use.
from nanochat_contracts.manifest import MANIFEST_FILE, ManifestError, build_manifest, read_manifest

from registry_client.client import FileInfo, IntegrityError, RegistryClient, RegistryError, UploadError, VersionInfo

__all__ = [
    "FileInfo",
    "IntegrityError",
    "MANIFEST_FILE",
    "ManifestError",
    "RegistryClient",
    "RegistryError",
    "UploadError",
    "VersionInfo",
    "build_manifest",
    "read_manifest",
]
