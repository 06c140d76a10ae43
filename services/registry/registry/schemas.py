"""Pydantic models at the HTTP edge: what requests carry and responses answer."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from nanochat_contracts.names import VERSION_MAX
from nanochat_contracts.stages import Stage
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from registry import file_names, json_values

State = Literal["pending", "ready", "failed", "deleted"]
SHA256 = Field(pattern=r"^[0-9a-f]{64}$", description="lowercase hex sha256")
# Text the registry stores and answers (job ids, names): it must survive the round trip to JSON.
Text = Annotated[str, AfterValidator(json_values.check_text)]


class FileSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: int = Field(ge=0, le=2**50)
    sha256: str = SHA256


class ParentRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Text | None = Field(default=None, description="defaults to the new version's model name")
    version: int = Field(ge=1, le=VERSION_MAX)


Metrics = dict[str, float | int | str | bool | None]


def _metrics(value: dict) -> dict:
    return json_values.check_json(value, json_values.MAX_METRICS_BYTES)


def _meta(value: dict) -> dict:
    return json_values.check_json(value, json_values.MAX_META_BYTES)


def _manifest(files: dict) -> dict:
    """Each path one the registry can store and serve, and a client can write to disk; a refusal
    names the path (escaped, so the error itself can be answered)."""
    for path in files:
        file_names.check(path)
    return files


class VersionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    stage: Stage
    files: Annotated[dict[str, FileSpec], AfterValidator(_manifest)] = Field(
        description="the manifest: relpath -> size and sha256", max_length=10_000
    )
    step: int | None = Field(default=None, ge=0, le=2**62)
    metrics: Annotated[Metrics, AfterValidator(_metrics)] = Field(default_factory=dict)
    meta: Annotated[dict, AfterValidator(_meta)] = Field(default_factory=dict)
    parent: ParentRef | None = None
    job_id: Text | None = Field(default=None, max_length=128, pattern=r"^[^\x00-\x1f\x7f]*$")


class VersionPatch(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    metrics: Annotated[Metrics, AfterValidator(_metrics)] = Field(default_factory=dict)


class AliasSet(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=1, le=VERSION_MAX)


class FileOut(BaseModel):
    path: str
    size: int
    sha256: str


class VersionOut(BaseModel):
    name: str
    version: int
    stage: Stage
    state: State
    step: int | None
    metrics: dict
    meta: dict
    parent: ParentRef | None
    job_id: str | None
    created_at: datetime
    committed_at: datetime | None
    files: list[FileOut]
    attachments: list[FileOut]
    aliases: list[str]


class VersionCreated(VersionOut):
    missing: list[str] = Field(description="manifest files whose bytes the registry does not hold yet")
    presigned_uploads: bool = Field(
        default=False, description="whether big files may go straight to S3 through POST .../uploads"
    )


class PresignedStart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: Annotated[str, AfterValidator(file_names.check)] = Field(min_length=1, max_length=1024)
    part_size: int = Field(ge=1, le=2**40, description="bytes per part; S3 wants 5 MiB..5 GiB")


class PresignedUpload(BaseModel):
    id: str | None = Field(description="the upload's id; null when the registry already holds the file")
    path: str
    size: int
    sha256: str
    part_size: int
    parts: int
    stored: bool


class PartRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sha256: str = SHA256


class PartUrl(BaseModel):
    url: str
    method: str
    headers: dict[str, str] = Field(description="headers the PUT must carry (signed into the URL)")
    size: int = Field(description="the part's exact size in bytes")


class VersionPage(BaseModel):
    items: list[VersionOut]
    total: int
    limit: int
    offset: int


class ModelOut(BaseModel):
    name: str
    latest_version: int | None
    versions: int
    aliases: dict[str, int]


class ModelList(BaseModel):
    items: list[ModelOut]


class AliasOut(BaseModel):
    name: str
    alias: str
    version: int


class UploadOut(BaseModel):
    path: str
    size: int
    sha256: str
    stored: bool


class Lineage(BaseModel):
    version: VersionOut
    parents: list[VersionOut] = Field(description="parent first, then its parent, up to the root")
    children: list[VersionOut]
