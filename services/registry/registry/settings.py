"""Registry settings, read from `REGISTRY_*` environment variables (pydantic-settings).

    REGISTRY_DATA_DIR=./registry-data   REGISTRY_DATABASE_URL=postgresql://...   REGISTRY_BLOB_BACKEND=s3
    REGISTRY_S3_ENDPOINT=http://minio:9000  REGISTRY_S3_BUCKET=nanochat  REGISTRY_WRITE_TOKEN=...

Writes need REGISTRY_WRITE_TOKEN; without one they are refused (401) unless
REGISTRY_ALLOW_ANONYMOUS_WRITES=true opens them to anyone who can reach the port.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from nanochat_contracts.registry_events import CHANNEL, STREAM
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="REGISTRY_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8002
    data_dir: Path = Path("registry-data")
    # Empty means sqlite:///<data_dir>/registry.db.
    database_url: str = ""
    blob_backend: Literal["local", "s3"] = "local"
    # Empty means <data_dir>/blobs.
    blob_dir: Path | None = None
    s3_endpoint: str | None = None
    s3_bucket: str = "nanochat-registry"
    s3_access_key: str | None = None
    s3_secret_key: str | None = None
    s3_region: str = "us-east-1"
    s3_prefix: str = "blobs/"
    # Through-server uploads into S3 spool parts to <data_dir>/spool and send up to
    # `s3_parts_in_flight` of them at once: disk per upload is part size x (parts in flight + 1).
    s3_part_size: int = Field(default=16 * 1024 * 1024, ge=5 * 1024 * 1024, le=5 * 1024**3)
    s3_parts_in_flight: int = Field(default=4, ge=1, le=32)
    # Opt-in: with the S3 backend, clients may send big files straight to S3 through presigned part
    # URLs. That spares the registry the bytes, but every client must reach S3 (at the public
    # endpoint, when it differs from s3_endpoint) and the store makes two server-side copies per
    # file (verify the whole sha256, publish); through the registry an upload streams once
    # (bench/registry.py compares both with boto3 straight to S3).
    # An S3 call that gets no connection or no bytes for this long fails (after s3_max_attempts
    # tries) and the request answers 503: a stopped store must not hang uploads for minutes.
    s3_connect_timeout_s: float = Field(default=10.0, gt=0)
    s3_read_timeout_s: float = Field(default=60.0, gt=0)
    s3_max_attempts: int = Field(default=3, ge=1, le=10)
    presigned_uploads: bool = False
    s3_public_endpoint: str | None = None
    presign_expiry_s: int = Field(default=3600, ge=60, le=7 * 24 * 3600)
    redis_url: str | None = None
    events_channel: str = CHANNEL
    events_stream: str = STREAM
    events_stream_maxlen: int = 10_000
    # Unset refuses every write, unless anonymous writes are asked for explicitly (a private dev box).
    write_token: str | None = None
    allow_anonymous_writes: bool = False
    read_token: str | None = None
    read_token_required: bool = False
    # A pending version (and its uploads) untouched this long is abandoned and swept.
    pending_ttl_s: int = Field(default=24 * 3600, ge=0)
    sweep_interval_s: float = Field(default=600.0, gt=0)
    max_path_length: int = 512
    log_level: str = "INFO"

    def resolved_database_url(self) -> str:
        if self.database_url:
            url = self.database_url
            # Plain postgresql:// URLs use psycopg 3, the driver this package installs.
            if url.startswith("postgresql://") or url.startswith("postgres://"):
                url = "postgresql+psycopg://" + url.split("://", 1)[1]
            return url
        return f"sqlite:///{(self.data_dir / 'registry.db').resolve()}"

    def resolved_blob_dir(self) -> Path:
        return (self.blob_dir or self.data_dir / "blobs").resolve()
