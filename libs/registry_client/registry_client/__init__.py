"""Typed client of the nanochat model registry (httpx only): upload, resolve, verified cached download."""

from registry_client.client import FileInfo, IntegrityError, RegistryClient, RegistryError, UploadError, VersionInfo
from registry_client.manifest import MANIFEST_FILE, ManifestError, build_manifest, read_manifest

__all__ = ["FileInfo", "IntegrityError", "MANIFEST_FILE", "ManifestError", "RegistryClient", "RegistryError",
           "UploadError", "VersionInfo", "build_manifest", "read_manifest"]
