"""nanochat_contracts: the serving rule on hand-made version lists, the name and alias patterns'
edges, a stage event line, registry event payloads, and the manifest's round trip and checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import pytest
from nanochat_contracts import events, manifest, names, registry_events, serving
from nanochat_contracts.stages import STAGES
from pydantic import BaseModel, Field, ValidationError


class V(NamedTuple):
    version: int
    stage: str
    state: str = "ready"


def test_stages_are_the_pipeline_order() -> None:
    assert STAGES == ("tokenizer", "base", "mid", "sft", "rl")
    assert set(serving.SERVED_STAGES) <= set(STAGES)


@pytest.mark.parametrize(
    ("versions", "expected"),
    [
        ([], None),
        ([V(1, "tokenizer"), V(2, "base"), V(3, "mid")], None),  # no chat model yet
        ([V(1, "sft"), V(2, "rl")], 2),
        # The newest wins whatever its stage: an SFT after an RL is served (rl is not preferred).
        ([V(1, "sft"), V(2, "rl"), V(3, "sft")], 3),
        # Later versions of other stages, and versions not ready, are passed over.
        ([V(1, "sft"), V(2, "base"), V(3, "rl", "pending"), V(4, "sft", "failed"), V(5, "rl", "deleted")], 1),
        ([V(7, "rl"), V(3, "sft")], 7),  # the order of the list does not matter
    ],
)
def test_serving_rule(versions: list[V], expected: int | None) -> None:
    chosen = serving.newest(versions)
    assert (chosen.version if chosen is not None else None) == expected


def test_serving_rule_over_other_stages() -> None:
    versions = [V(1, "base"), V(2, "sft"), V(3, "base", "pending")]
    assert serving.newest(versions, ["base"]) == V(1, "base")
    assert serving.newest(versions, ["base", "sft"]) == V(2, "sft")


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("nanochat", True),
        ("a", True),
        ("0", True),
        ("d20.run-2_b", True),
        ("a" * names.NAME_MAX, True),
        ("a" * (names.NAME_MAX + 1), False),
        ("", False),
        (".hidden", False),
        ("-x", False),
        ("_x", False),
        ("has space", False),
        ("a/b", False),
        ("a:1", False),
        ("ünï", False),
        ("nanochat\n", False),  # `$` alone would let one trailing newline through
    ],
)
def test_name_pattern(name: str, ok: bool) -> None:
    assert names.is_name(name) is ok


@pytest.mark.parametrize(
    ("alias", "ok"),
    [
        ("serving", True),
        ("best-2", True),
        ("a" * names.ALIAS_MAX, True),
        ("a" * (names.ALIAS_MAX + 1), False),
        ("2", False),
        ("", False),
        ("-x", False),
        ("serving\n", False),
    ],
)
def test_alias_pattern(alias: str, ok: bool) -> None:
    assert names.is_alias(alias) is ok


class _Named(BaseModel):
    name: str = Field(pattern=names.NAME_PATTERN)


@pytest.mark.parametrize("name", ["a" * names.NAME_MAX, "a" * (names.NAME_MAX + 1), "x\n", "ok.1"])
def test_pydantic_fields_agree_with_is_name(name: str) -> None:
    """The trainer checks names as pydantic field patterns, the registry with `is_name`: one answer."""
    try:
        _Named(name=name)
        accepted = True
    except ValidationError:
        accepted = False
    assert accepted is names.is_name(name)


def test_event_outputs_name_a_registry_stage() -> None:
    line = (
        '{"type": "finished", "stage": "tok_train", "job_id": "j1", "input_versions": [], "ts": 1.7e9, '
        '"outputs": [{"path": "runs/tok", "registry_stage": "%s"}], "metrics": {}}'
    )
    finished = events.parse_event_line(line % "tokenizer")
    assert isinstance(finished, events.Finished) and finished.outputs[0].registry_stage == "tokenizer"
    # A stage the registry does not know makes the line no event, as any malformed line.
    assert events.parse_event_line(line % "chat") is None
    assert list(events.parse_events(["plain log", line % "sft"]))[0].outputs[0].path == "runs/tok"


def test_manifest_round_trip_and_what_it_names(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "model.bin").write_bytes(b"weights")
    (tmp_path / "sub" / "tok.json").write_text("{}")
    written = manifest.write_manifest(tmp_path)
    assert sorted(written["files"]) == ["model.bin", "sub/tok.json"]  # relpaths with '/', itself unlisted
    # The download cache's marker is bookkeeping, not an unexpected file.
    (tmp_path / manifest.CACHE_MARKER).write_text("{}")
    assert manifest.verify_manifest(tmp_path) == written == manifest.read_manifest(tmp_path)

    (tmp_path / "model.bin").write_bytes(b"weightz")  # same size, other bytes
    assert manifest.read_manifest(tmp_path) == written  # sizes only: the upload hashes as it reads
    with pytest.raises(manifest.ManifestError, match="model.bin does not match its sha256"):
        manifest.verify_manifest(tmp_path)
    manifest.verify_manifest(tmp_path, only=["sub/tok.json"])  # just the files asked for
    with pytest.raises(manifest.ManifestError, match="extra.bin is not in the manifest"):
        manifest.verify_manifest(tmp_path, only=["extra.bin"])
    (tmp_path / "extra.bin").write_bytes(b"x")
    with pytest.raises(manifest.ManifestError, match="extra.bin"):
        manifest.read_manifest(tmp_path)


@pytest.mark.parametrize(
    "entry",
    [
        {"size": -1, "sha256": "0" * 64},
        {"size": 1, "sha256": "A" * 64},
        {"size": "1", "sha256": "0" * 64},
        "not an object",
    ],
)
def test_manifest_entries_are_checked_for_shape(entry: object) -> None:
    with pytest.raises(manifest.ManifestError, match="needs an int size"):
        manifest.parse_manifest({"files": {"f": entry}})
    with pytest.raises(manifest.ManifestError):
        manifest.parse_manifest([])


def test_registry_event_payloads() -> None:
    moved = registry_events.RegistryEvent(type="alias.moved", name="m", version=2, stage="sft", alias="serving")
    registered = registry_events.RegistryEvent(type="model.registered", name="m", version=3, stage="rl")
    assert "alias" not in registered.payload() and moved.payload()["alias"] == "serving"
    assert registry_events.parse_registry_event(json.dumps(moved.payload())) == moved
    # Fields a reader does not know are ignored; a payload without the contract's fields is no event.
    assert registry_events.parse_registry_event(json.dumps({**registered.payload(), "new": 1})) == registered
    assert registry_events.parse_registry_event('{"type": "model.registered", "name": "m"}') is None
    assert registry_events.parse_registry_event(b"\xff") is None
