"""S3 blobs against moto's S3 server: the writer's parts go up concurrently, bounded, in order; a
failed part or wrong bytes abort the multipart upload and leave no object behind; a staged
(presigned) upload is read back and hashed where the store computes no checksum on copy."""

import base64
import hashlib
import os
import threading
import uuid
import zlib

import boto3
import pytest
from registry.blobs import BlobMismatch, S3Blobs

MiB = 1024 * 1024


class CountingS3:
    """A boto3 client whose upload_part records how many calls run at once; the first `meet`
    calls wait for each other, so a writer that sends parts one at a time fails here."""

    def __init__(self, client, meet: int, fail_part: int | None = None):
        self.client, self.fail_part = client, fail_part
        self.barrier = threading.Barrier(meet, timeout=30) if meet > 1 else None
        self.lock, self.active, self.max_active, self.calls = threading.Lock(), 0, 0, 0

    def __getattr__(self, name):
        return getattr(self.client, name)

    def upload_part(self, **kw):
        with self.lock:
            self.active += 1
            self.calls += 1
            call, self.max_active = self.calls, max(self.max_active, self.active)
        try:
            if self.barrier is not None and call <= self.barrier.parties:
                self.barrier.wait()
            if kw["PartNumber"] == self.fail_part:
                raise ConnectionError("S3 went away")
            return self.client.upload_part(**kw)
        finally:
            with self.lock:
                self.active -= 1


@pytest.fixture
def s3(s3_server):
    client = boto3.client(
        "s3",
        endpoint_url=s3_server.url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    bucket = f"blobs-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    return client, bucket


def store_over(client, bucket, tmp_path, in_flight):
    return S3Blobs(client, bucket, part_size=5 * MiB, parts_in_flight=in_flight, spool_dir=tmp_path / "spool")


def write_all(writer, data, chunk=1 * MiB + 7):
    for i in range(0, len(data), chunk):
        writer.write(data[i : i + chunk])
    writer.finish()


def test_parts_go_up_concurrently_bounded_and_reassemble_in_order(s3, tmp_path):
    client, bucket = s3
    counting = CountingS3(client, meet=2)
    store = store_over(counting, bucket, tmp_path, in_flight=2)
    data = os.urandom(5 * 5 * MiB + 123)
    sha = hashlib.sha256(data).hexdigest()
    write_all(store.writer(sha, len(data)), data)
    assert counting.calls == 6 and counting.max_active == 2
    assert b"".join(store.read(sha)) == data
    assert not os.listdir(tmp_path / "spool")  # spooled parts live in unnamed temp files


def test_a_failed_part_aborts_the_multipart_upload(s3, tmp_path):
    client, bucket = s3
    store = store_over(CountingS3(client, meet=1, fail_part=2), bucket, tmp_path, in_flight=3)
    data = os.urandom(4 * 5 * MiB)
    sha = hashlib.sha256(data).hexdigest()
    writer = store.writer(sha, len(data))
    with pytest.raises(ConnectionError):
        try:
            write_all(writer, data)
        except BaseException:
            writer.abort()  # what the HTTP layer does with any error
            raise
    assert store.size(sha) is None
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_wrong_bytes_publish_nothing(s3, tmp_path):
    client, bucket = s3
    store = store_over(client, bucket, tmp_path, in_flight=2)
    data = os.urandom(12 * MiB)
    sha = hashlib.sha256(data).hexdigest()
    with pytest.raises(BlobMismatch, match="sha256"):
        write_all(store.writer(sha, len(data)), data[:-1] + bytes([data[-1] ^ 1]))
    assert store.size(sha) is None
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


class NoCopyChecksum:
    """A store that answers no checksum for copies: the registry must read the object back."""

    def __init__(self, client):
        self.client, self.copies = client, 0

    def __getattr__(self, name):
        return getattr(self.client, name)

    def copy_object(self, **kw):
        self.copies += 1
        r = self.client.copy_object(**kw)
        r.get("CopyObjectResult", {}).pop("ChecksumSHA256", None)
        return r


@pytest.mark.parametrize("wrong", [False, True])
def test_staged_upload_is_read_back_where_the_store_gives_no_checksum(s3, tmp_path, wrong):
    client, bucket = s3
    wrapped = NoCopyChecksum(client)
    store = store_over(wrapped, bucket, tmp_path, in_flight=2)
    data = os.urandom(5 * MiB + 10)
    sha = hashlib.sha256(data).hexdigest()
    upload = uuid.uuid4().hex
    upload_id = store.start_staged(upload)
    second = data[5 * MiB :]
    for number, part in [(1, data[: 5 * MiB]), (2, (b"x" + second[1:]) if wrong else second)]:
        client.upload_part(
            Bucket=bucket,
            Key=store.staging_key(upload),
            UploadId=upload_id,
            PartNumber=number,
            Body=part,
            ChecksumAlgorithm="SHA256",
        )
    if wrong:
        with pytest.raises(BlobMismatch, match="sha256"):
            store.complete_staged(upload, upload_id, sha, len(data), 5 * MiB)
        assert store.size(sha) is None
    else:
        store.complete_staged(upload, upload_id, sha, len(data), 5 * MiB)
        assert b"".join(store.read(sha)) == data
    assert wrapped.copies >= 1
    assert client.list_objects_v2(Bucket=bucket, Prefix=store.staging_key("")).get("KeyCount") == 0


def test_parts_carry_crc32_checksums_instead_of_a_payload_hash(s3_server, tmp_path):
    """Each part the registry sends is checked by S3 against a CRC32 header, and botocore is not
    asked to sha256 the body once more for the signature (a second pass over every byte)."""
    store = S3Blobs.connect(
        s3_server.url,
        f"blobs-{uuid.uuid4().hex[:8]}",
        "testing",
        "testing",
        "us-east-1",
        "blobs/",
        part_size=5 * MiB,
        parts_in_flight=2,
        spool_dir=tmp_path / "spool",
    )
    store.ensure_bucket()
    sent = []

    def record(request, **_):
        sent.append({k.lower(): v.decode() if isinstance(v, bytes) else v for k, v in request.headers.items()})

    store.s3.meta.events.register("before-send.s3.UploadPart", record)
    data = os.urandom(3 * 5 * MiB + 99)
    sha = hashlib.sha256(data).hexdigest()
    write_all(store.writer(sha, len(data)), data)
    assert len(sent) == 4
    for headers in sent:
        assert headers["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD"
        assert "x-amz-checksum-crc32" in headers
    head = store.s3.head_object(Bucket=store.bucket, Key=store.key(sha), ChecksumMode="ENABLED")
    # S3's composite checksum: the CRC32 of the 4 parts' CRC32s (AWS appends "-4", moto does not).
    parts = [data[i : i + 5 * MiB] for i in range(0, len(data), 5 * MiB)]
    composite = zlib.crc32(b"".join(zlib.crc32(part).to_bytes(4, "big") for part in parts)).to_bytes(4, "big")
    assert head["ChecksumCRC32"].split("-")[0] == base64.b64encode(composite).decode()
    assert b"".join(store.read(sha)) == data


def test_published_staged_blob_carries_its_full_sha256(s3, tmp_path):
    """The staged object is verified by a copy onto itself with SHA256; publishing it copies that
    full-object checksum along instead of computing it a second time."""
    client, bucket = s3
    store = store_over(client, bucket, tmp_path, in_flight=2)
    data = os.urandom(5 * MiB + 10)
    sha = hashlib.sha256(data).hexdigest()
    upload = uuid.uuid4().hex
    upload_id = store.start_staged(upload)
    for number, part in [(1, data[: 5 * MiB]), (2, data[5 * MiB :])]:
        client.upload_part(
            Bucket=bucket,
            Key=store.staging_key(upload),
            UploadId=upload_id,
            PartNumber=number,
            Body=part,
            ChecksumAlgorithm="SHA256",
        )
    store.complete_staged(upload, upload_id, sha, len(data), 5 * MiB)
    head = client.head_object(Bucket=bucket, Key=store.key(sha), ChecksumMode="ENABLED")
    assert base64.b64decode(head["ChecksumSHA256"]).hex() == sha
    assert b"".join(store.read(sha)) == data
