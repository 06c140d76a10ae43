"""RegistryClient against a live registry: folder round trip, verified cache, corruption, resume."""

import contextlib
import hashlib
import json
import os
import socket
import threading
import uuid

import httpx
import pytest
from nanochat_contracts.manifest import CACHE_MARKER, MANIFEST_FILE
from registry_client import IntegrityError, ManifestError, RegistryClient, RegistryError, UploadError, build_manifest


def make_checkpoint(folder, with_manifest=True, big=200_000):
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(uuid.uuid4().bytes + os.urandom(big))
    (folder / "config.json").write_text(json.dumps({"n_layer": 2}))
    (folder / "meta.json").write_text(json.dumps({"stage": "sft", "step": 5}))
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "tokenizer.json").write_text(json.dumps({"pattern": "x", "salt": uuid.uuid4().hex}))
    if with_manifest:
        (folder / "manifest.json").write_text(json.dumps(build_manifest(folder), indent=2, sort_keys=True) + "\n")
    return folder


def same_tree(a, b):
    def files(root):
        return {
            p.relative_to(root).as_posix(): p.read_bytes()
            for p in root.rglob("*")
            if p.is_file() and p.name != CACHE_MARKER
        }

    return files(a) == files(b)


@pytest.fixture
def rc(registry_url, tmp_path):
    # A small part size, so files above it take the parallel ranged-download path.
    with RegistryClient(
        registry_url["url"], token=registry_url["token"], cache_dir=tmp_path / "cache", part_size=64 * 1024
    ) as c:
        yield c


def test_upload_resolve_download_round_trip(rc, tmp_path):
    src = make_checkpoint(tmp_path / "ckpt")
    name = f"c-{uuid.uuid4().hex[:8]}"
    v = rc.upload_folder(src, name, stage="sft", step=5, metrics={"loss": 2.0}, job_id="j1")
    assert v.state == "ready" and v.meta == {"stage": "sft", "step": 5}
    assert {f.path for f in v.files} == {
        "model.safetensors",
        "config.json",
        "meta.json",
        "tokenizer/tokenizer.json",
        "manifest.json",
    }
    assert rc.resolve(name, stage=["rl", "sft"]).version == v.version
    folder = rc.download(name, stage="sft")
    assert folder.name == f"v{v.version}" and same_tree(src, folder)
    rc.set_alias(name, "serving", v.version)
    assert rc.download(name, alias="serving") == folder


def test_cache_is_reused_when_hashes_match_and_refreshed_when_not(rc, registry_url, tmp_path):
    name = f"c-{uuid.uuid4().hex[:8]}"
    v = rc.upload_folder(make_checkpoint(tmp_path / "ckpt"), name, stage="sft")
    folder = rc.download(name, v.version)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert rc.download(name, v.version) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # reused: not written again
    (folder / "config.json").write_text("tampered")
    again = rc.download(name, v.version)
    assert json.loads((again / "config.json").read_text()) == {"n_layer": 2}


def test_folder_without_manifest_gets_one(rc, tmp_path):
    src = make_checkpoint(tmp_path / "ckpt", with_manifest=False)
    name = f"c-{uuid.uuid4().hex[:8]}"
    v = rc.upload_folder(src, name, stage="base")
    folder = rc.download(name, v.version)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest == build_manifest(src)


def test_a_manifest_that_does_not_match_is_refused(rc, tmp_path):
    src = make_checkpoint(tmp_path / "ckpt")
    (src / "extra.bin").write_bytes(b"x")
    with pytest.raises(ManifestError, match="extra.bin"):
        rc.upload_folder(src, "never", stage="sft")
    (src / "extra.bin").unlink()
    (src / "config.json").write_text(json.dumps({"n_layer": 20}))
    with pytest.raises(ManifestError, match="config.json"):
        rc.upload_folder(src, "never", stage="sft")


def test_a_changed_file_fails_the_upload_and_nothing_is_visible(rc, tmp_path):
    src = make_checkpoint(tmp_path / "ckpt")
    data = bytearray((src / "model.safetensors").read_bytes())
    data[100] ^= 0xFF  # same size, other bytes: only the sha256 can tell
    (src / "model.safetensors").write_bytes(bytes(data))
    name = f"c-{uuid.uuid4().hex[:8]}"
    with pytest.raises(UploadError) as e:
        rc.upload_folder(src, name, stage="sft")
    assert isinstance(e.value.cause, RegistryError) and e.value.cause.status == 400
    with pytest.raises(RegistryError) as nf:
        rc.resolve(name, stage="sft")
    assert nf.value.status == 404


def test_an_interrupted_upload_resumes(rc, registry_url, tmp_path):
    src = make_checkpoint(tmp_path / "ckpt")
    name = f"c-{uuid.uuid4().hex[:8]}"
    manifest = json.loads((src / "manifest.json").read_text())
    files = dict(manifest["files"])
    raw = (src / "manifest.json").read_bytes()
    files["manifest.json"] = {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    # The first attempt created the version and sent one file before dying.
    created = rc._request("POST", f"/v1/models/{name}/versions", json={"stage": "sft", "files": files}).json()
    rc._request(
        "PUT",
        f"/v1/models/{name}/versions/{created['version']}/files/config.json",
        content=(src / "config.json").read_bytes(),
    )
    status = rc._request("GET", f"/v1/models/{name}/versions/{created['version']}/upload").json()
    assert "config.json" not in status["missing"] and "model.safetensors" in status["missing"]
    v = rc.upload_folder(src, name, stage="sft", resume_version=created["version"])
    assert v.version == created["version"] and v.state == "ready"
    assert same_tree(src, rc.download(name, v.version))


def test_a_corrupted_blob_is_detected_on_download(rc, registry_url, tmp_path):
    src = make_checkpoint(tmp_path / "ckpt")
    name = f"c-{uuid.uuid4().hex[:8]}"
    v = rc.upload_folder(src, name, stage="sft")
    sha = next(f.sha256 for f in v.files if f.path == "model.safetensors")
    store = registry_url["app"].state.registry.blobs
    blob_path = store.path(sha)
    data = bytearray(blob_path.read_bytes())
    data[1234] ^= 0x01  # bit rot on the server's disk
    blob_path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="model.safetensors"):
        rc.download(name, v.version)
    assert not (rc.cache_dir / name / f"v{v.version}").exists()
    assert not [p for p in (rc.cache_dir / name).iterdir() if p.name.startswith(".tmp-")]


def test_attach_metrics_lineage_and_delete(rc, tmp_path):
    name = f"c-{uuid.uuid4().hex[:8]}"
    tok = rc.upload_folder(make_checkpoint(tmp_path / "t"), name, stage="tokenizer")
    sft = rc.upload_folder(make_checkpoint(tmp_path / "s"), name, stage="sft", parent=tok.version)
    report = tmp_path / "report.md"
    report.write_text("# report\n")
    rc.attach(name, sft.version, report)
    assert [a.path for a in rc.get_version(name, sft.version).attachments] == ["report.md"]
    assert rc.read_attachment(name, sft.version, "report.md") == b"# report\n"
    # The downloaded folder is the checkpoint its manifest describes, attachments left out.
    folder = rc.download(name, sft.version)
    listed = json.loads((folder / "manifest.json").read_text())["files"]
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert present - {MANIFEST_FILE, CACHE_MARKER} == set(listed)
    assert rc.patch_metrics(name, sft.version, {"chat_eval": 0.3}).metrics == {"chat_eval": 0.3}
    assert [p["version"] for p in rc.lineage(name, sft.version)["parents"]] == [tok.version]
    assert [x.version for x in rc.list_versions(name)] == [sft.version, tok.version]
    rc.delete_version(name, sft.version)
    assert [x.version for x in rc.list_versions(name)] == [tok.version]


def test_wrong_token_is_a_clear_error(registry_url, tmp_path):
    with RegistryClient(registry_url["url"], token="wrong", cache_dir=tmp_path) as c:
        with pytest.raises(RegistryError) as e:
            c.upload_folder(make_checkpoint(tmp_path / "ckpt"), "x", stage="sft")
    assert e.value.status == 401 and "token" in e.value.message


ODD_NAMES = ["a#b.bin", "100% sure.txt", "what?.json", "dir #2/é ü.txt", "plus+and&eq=.bin"]


def test_file_names_with_url_characters_round_trip(rc, tmp_path):
    """`#`, `?`, `%`, spaces and non-ASCII in a file name: percent-encoded by the client, so each
    file uploads, downloads and attaches under its own name (`a#b` used to be cut at the `#`)."""
    src = tmp_path / "ckpt"
    for i, rel in enumerate(ODD_NAMES):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(f"{i} {uuid.uuid4()}".encode())
    (src / "manifest.json").write_text(json.dumps(build_manifest(src), indent=2, sort_keys=True) + "\n")
    name = f"c-{uuid.uuid4().hex[:8]}"
    v = rc.upload_folder(src, name, stage="sft")
    assert set(ODD_NAMES) <= {f.path for f in v.files}
    assert same_tree(src, rc.download(name, v.version))
    report = tmp_path / "report #1?.md"
    report.write_text("# card\n")
    assert rc.attach(name, v.version, report).path == "report #1?.md"
    assert rc.read_attachment(name, v.version, "report #1?.md") == b"# card\n"


def test_a_file_name_the_registry_cannot_hold_is_refused_by_name(rc, tmp_path):
    """A Linux file name that is not UTF-8 (Python holds it as a lone surrogate) has no URL and no
    JSON spelling: the registry refuses it with a 422 naming it, nothing is left pending."""
    src = make_checkpoint(tmp_path / "ckpt", with_manifest=False)
    (src / os.fsdecode(b"latin1-\xe9.bin")).write_bytes(b"named in Latin-1")
    name = f"c-{uuid.uuid4().hex[:8]}"
    with pytest.raises(RegistryError) as e:
        rc.upload_folder(src, name, stage="sft")
    assert e.value.status == 422 and "latin1-" in e.value.message
    assert rc.list_versions(name, state=["pending", "ready"]) == []


class FlakyProxy:
    """A TCP proxy in front of the registry that hangs up on its first `drops` connections (a
    registry restarting, a load balancer dropping a connection), then passes bytes through."""

    def __init__(self, upstream_port: int, drops: int):
        self.upstream_port, self.drops = upstream_port, drops
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            if self.accepted <= self.drops:
                conn.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()


def test_dropped_connections_are_retried(registry_url, tmp_path):
    """Uploads and downloads ride out connections the network drops (retried with backoff), and
    give up with the transport error once `retries` tries are spent."""
    port = int(registry_url["url"].rsplit(":", 1)[1])
    src = make_checkpoint(tmp_path / "ckpt")
    name = f"c-{uuid.uuid4().hex[:8]}"
    with RegistryClient(registry_url["url"], token=registry_url["token"], cache_dir=tmp_path / "c0") as direct:
        v = direct.upload_folder(src, name, stage="sft")
    proxy = FlakyProxy(port, drops=2)
    try:
        with RegistryClient(proxy.url, token=registry_url["token"], cache_dir=tmp_path / "c1", retries=3) as rc:
            rc.http.headers["Connection"] = "close"  # each request a new connection, so each can be dropped
            folder = rc.download(name, v.version)
        assert same_tree(src, folder) and proxy.accepted > 2
    finally:
        proxy.close()
    proxy = FlakyProxy(port, drops=1000)
    try:
        with RegistryClient(proxy.url, token=registry_url["token"], cache_dir=tmp_path / "c2", retries=2) as rc:
            report = tmp_path / "r.md"
            report.write_text("x")
            with pytest.raises(httpx.TransportError):
                rc.attach(name, v.version, report)
        assert proxy.accepted == 2
    finally:
        proxy.close()
