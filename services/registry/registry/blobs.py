"""Blob stores: content-addressed by sha256, behind one small interface, two backends.

`LocalBlobs` keeps `<dir>/sha256/ab/abcdef...` files (the embedded default); `S3Blobs` keeps
`<prefix>ab/abcdef...` objects in a bucket (boto3; MinIO, AWS S3, moto). Writers hash while they
write and publish the blob only when size and sha256 match what was declared, so a broken or
dishonest upload never lands under a name it does not hash to. Memory stays flat in the file
size: local writes stream to a temp file; S3 writes spool each multipart part to a temp file and
send a bounded number of parts concurrently in the background. `S3Blobs` also takes presigned
uploads: clients PUT parts straight to a staging key (`<prefix>uploads/<id>`), and the assembled
object is published only after its whole-file sha256 is checked.
"""

from __future__ import annotations

import base64
import hashlib
import os
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Protocol

CHUNK = 1024 * 1024
MIN_PART = 5 * 1024 * 1024
MAX_PART = 5 * 1024**3
MAX_PARTS = 10_000


class BlobMismatch(ValueError):
    """The bytes written do not have the declared size or sha256."""


class PartsMissing(ValueError):
    """A presigned upload was completed before all its parts arrived."""


class BlobWriter(Protocol):
    def write(self, data: bytes) -> None: ...
    def finish(self) -> None: ...
    def abort(self) -> None: ...


class BlobStore(Protocol):
    def size(self, sha256: str) -> int | None: ...
    def writer(self, sha256: str, size: int) -> BlobWriter: ...
    def read(self, sha256: str, start: int = 0, end: int | None = None) -> Iterator[bytes]: ...
    def delete(self, sha256: str) -> None: ...
    def check(self) -> None: ...
    def sweep(self, older_than_s: float) -> int: ...


class _Hasher:
    def __init__(self, sha256: str, size: int):
        self.expected_sha, self.expected_size = sha256, size
        self.h, self.n = hashlib.sha256(), 0

    def update(self, data: bytes) -> None:
        self.n += len(data)
        if self.n > self.expected_size:
            raise BlobMismatch(f"more than the declared {self.expected_size} bytes")
        self.h.update(data)

    def verify(self) -> None:
        if self.n != self.expected_size:
            raise BlobMismatch(f"got {self.n} bytes, declared {self.expected_size}")
        got = self.h.hexdigest()
        if got != self.expected_sha:
            raise BlobMismatch(f"sha256 is {got}, declared {self.expected_sha}")


class LocalBlobs:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.root / "sha256" / sha256[:2] / sha256

    def size(self, sha256: str) -> int | None:
        try:
            return self.path(sha256).stat().st_size
        except FileNotFoundError:
            return None

    def writer(self, sha256: str, size: int) -> BlobWriter:
        return _LocalWriter(self, sha256, size)

    def read(self, sha256: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        with open(self.path(sha256), "rb") as f:
            f.seek(start)
            left = None if end is None else end - start
            while left is None or left > 0:
                data = f.read(CHUNK if left is None else min(CHUNK, left))
                if not data:
                    return
                if left is not None:
                    left -= len(data)
                yield data

    def delete(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)

    def check(self) -> None:
        with tempfile.NamedTemporaryFile(dir=self.tmp):
            pass

    def sweep(self, older_than_s: float) -> int:
        """Remove temp files of uploads that died; returns how many."""
        cutoff, n = time.time() - older_than_s, 0
        for p in self.tmp.iterdir():
            try:
                if p.stat().st_mtime <= cutoff:
                    p.unlink()
                    n += 1
            except FileNotFoundError:
                pass
        return n


class _LocalWriter:
    def __init__(self, store: LocalBlobs, sha256: str, size: int):
        self.store, self.sha256 = store, sha256
        self.hasher = _Hasher(sha256, size)
        fd, name = tempfile.mkstemp(dir=store.tmp, prefix=sha256[:12] + "-")
        self.f, self.tmp_path = os.fdopen(fd, "wb"), Path(name)

    def write(self, data: bytes) -> None:
        self.hasher.update(data)
        self.f.write(data)

    def finish(self) -> None:
        try:
            self.hasher.verify()
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
            dest = self.store.path(self.sha256)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.tmp_path, dest)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        self.f.close()
        self.tmp_path.unlink(missing_ok=True)


class S3Blobs:
    def __init__(
        self,
        client,
        bucket: str,
        prefix: str = "blobs/",
        part_size: int = 16 * 1024 * 1024,
        parts_in_flight: int = 4,
        spool_dir: Path | None = None,
    ):
        self.s3, self.bucket, self.prefix, self.part_size = client, bucket, prefix, part_size
        self.parts_in_flight = max(1, parts_in_flight)
        self.spool_dir = spool_dir
        if spool_dir is not None:
            Path(spool_dir).mkdir(parents=True, exist_ok=True)
        # Shared by every upload; each writer bounds its own parts in flight, so a busy pool only queues.
        self.pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="s3-parts")

        # Presigned URLs are made by this client: the same one, unless clients reach S3 elsewhere.
        self.presigner = client

    @classmethod
    def connect(
        cls,
        endpoint: str | None,
        bucket: str,
        access_key: str | None,
        secret_key: str | None,
        region: str,
        prefix: str,
        part_size: int,
        parts_in_flight: int = 4,
        spool_dir: Path | None = None,
        public_endpoint: str | None = None,
        timeouts: tuple[float, float, int] = (10.0, 60.0, 3),
    ) -> S3Blobs:
        """`timeouts`: connect and read timeouts in seconds, and how many tries each call gets."""
        import boto3
        from botocore.config import Config

        def client(url: str | None):
            return boto3.client(
                "s3",
                endpoint_url=url,
                aws_access_key_id=access_key,
                aws_secret_access_key=secret_key,
                region_name=region,
                # No SigV4 payload hash: botocore would sha256 every byte of a plain-http request
                # body once more. Each part carries a CRC32 checksum header instead (signed, and
                # checked by S3), and the whole file's sha256 was checked on the way in.
                config=Config(
                    max_pool_connections=32,
                    connect_timeout=timeouts[0],
                    read_timeout=timeouts[1],
                    retries={"max_attempts": timeouts[2], "mode": "standard"},
                    s3={"addressing_style": "path", "payload_signing_enabled": False},
                    signature_version="s3v4",
                ),
            )

        store = cls(client(endpoint), bucket, prefix, part_size, parts_in_flight, spool_dir)
        if public_endpoint:
            store.presigner = client(public_endpoint)
        return store

    def key(self, sha256: str) -> str:
        return f"{self.prefix}{sha256[:2]}/{sha256}"

    def ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self.s3.head_bucket(Bucket=self.bucket)
        except ClientError:
            self.s3.create_bucket(Bucket=self.bucket)

    def size(self, sha256: str) -> int | None:
        from botocore.exceptions import ClientError

        try:
            return self.s3.head_object(Bucket=self.bucket, Key=self.key(sha256))["ContentLength"]
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def writer(self, sha256: str, size: int) -> BlobWriter:
        return _S3Writer(self, sha256, size)

    def read(self, sha256: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        kwargs = {}
        if start or end is not None:
            kwargs["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        body = self.s3.get_object(Bucket=self.bucket, Key=self.key(sha256), **kwargs)["Body"]
        try:
            yield from body.iter_chunks(CHUNK)
        finally:
            body.close()

    def delete(self, sha256: str) -> None:
        self.s3.delete_object(Bucket=self.bucket, Key=self.key(sha256))

    def check(self) -> None:
        self.s3.head_bucket(Bucket=self.bucket)

    def sweep(self, older_than_s: float) -> int:
        """Abort multipart uploads under our prefix that were started too long ago and delete staged
        objects never published; returns how many."""
        cutoff, n = time.time() - older_than_s, 0
        paginator = self.s3.get_paginator("list_multipart_uploads")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
            for up in page.get("Uploads", []):
                if up["Initiated"].timestamp() <= cutoff:
                    self.s3.abort_multipart_upload(Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"])
                    n += 1
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.staging_key("")):
            for obj in page.get("Contents", []):
                if obj["LastModified"].timestamp() <= cutoff:
                    self.s3.delete_object(Bucket=self.bucket, Key=obj["Key"])
                    n += 1
        return n

    # Presigned uploads: the client sends parts straight to S3, into a staging key, each part
    # with its sha256 in `x-amz-checksum-sha256` (signed into the URL, so S3 checks the part).
    # Part checksums say nothing about the whole file, so `complete_staged` checks the assembled
    # object's sha256 before it is copied under its content-addressed name.

    def staging_key(self, upload: str) -> str:
        return f"{self.prefix}uploads/{upload}"

    def start_staged(self, upload: str) -> str:
        """Open a multipart upload at the staging key of `upload`; returns S3's upload id."""
        r = self.s3.create_multipart_upload(
            Bucket=self.bucket, Key=self.staging_key(upload), ChecksumAlgorithm="SHA256"
        )
        return r["UploadId"]

    def presign_part(self, upload: str, upload_id: str, number: int, sha256: str, expiry_s: int) -> tuple[str, dict]:
        """A PUT URL for part `number` and the headers the request must carry (they are signed)."""
        checksum = base64.b64encode(bytes.fromhex(sha256)).decode()
        url = self.presigner.generate_presigned_url(
            "upload_part",
            ExpiresIn=expiry_s,
            Params={
                "Bucket": self.bucket,
                "Key": self.staging_key(upload),
                "UploadId": upload_id,
                "PartNumber": number,
                "ChecksumAlgorithm": "SHA256",
                "ChecksumSHA256": checksum,
            },
        )
        return url, {"x-amz-checksum-sha256": checksum, "x-amz-sdk-checksum-algorithm": "SHA256"}

    def abort_staged(self, upload: str, upload_id: str) -> None:
        from botocore.exceptions import ClientError

        try:
            self.s3.abort_multipart_upload(Bucket=self.bucket, Key=self.staging_key(upload), UploadId=upload_id)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("404", "NoSuchUpload"):
                raise
        self.s3.delete_object(Bucket=self.bucket, Key=self.staging_key(upload))

    def complete_staged(self, upload: str, upload_id: str, sha256: str, size: int, part_size: int) -> None:
        """Assemble the parts, check the whole object's size and sha256, publish it as blob `sha256`.

        Raises `PartsMissing` (the upload stays open: the client may still send them) or
        `BlobMismatch` (the upload is discarded)."""
        key = self.staging_key(upload)
        parts: list[dict] = []
        for page in self.s3.get_paginator("list_parts").paginate(Bucket=self.bucket, Key=key, UploadId=upload_id):
            parts += page.get("Parts", [])
        count = -(-size // part_size)
        missing = sorted(set(range(1, count + 1)) - {p["PartNumber"] for p in parts})
        if missing:
            raise PartsMissing(f"parts {missing[:20]} of {count} are not uploaded")
        try:
            for p in parts:
                want = part_size if p["PartNumber"] < count else size - (count - 1) * part_size
                if p["PartNumber"] > count or p["Size"] != want:
                    raise BlobMismatch(f"part {p['PartNumber']} has {p['Size']} bytes, expected {want}")
            done = [
                {
                    "PartNumber": p["PartNumber"],
                    "ETag": p["ETag"],
                    **({"ChecksumSHA256": p["ChecksumSHA256"]} if p.get("ChecksumSHA256") else {}),
                }
                for p in sorted(parts, key=lambda p: p["PartNumber"])
            ]
            self.s3.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": done}
            )
            verified_by_store = self._verify_staged(key, sha256, size)
            # The published object needs a full-object SHA256 (the staged one had a checksum of
            # parts); a copy carries its source's checksum, so only where the store did not just
            # compute one is it asked for again.
            source = {"Bucket": self.bucket, "Key": key}
            extra = {} if verified_by_store else {"ChecksumAlgorithm": "SHA256"}
            if size <= MAX_PART:
                self.s3.copy_object(Bucket=self.bucket, Key=self.key(sha256), CopySource=source, **extra)
            else:
                self.s3.copy(source, self.bucket, self.key(sha256), ExtraArgs=extra)
        finally:
            self.abort_staged(upload, upload_id)

    def _verify_staged(self, key: str, sha256: str, size: int) -> bool:
        """Check the assembled object's sha256: S3 computes it when the object is copied onto
        itself with a SHA256 checksum (no byte passes through here); where the store answers no
        checksum, or the object is too big for one copy, it is read back and hashed. True when the
        store computed it (the object now carries it)."""
        if size <= MAX_PART:
            r = self.s3.copy_object(
                Bucket=self.bucket,
                Key=key,
                CopySource={"Bucket": self.bucket, "Key": key},
                ChecksumAlgorithm="SHA256",
                MetadataDirective="REPLACE",
            )
            got = r.get("CopyObjectResult", {}).get("ChecksumSHA256")
            if got:
                got_hex = base64.b64decode(got).hex()
                if got_hex != sha256:
                    raise BlobMismatch(f"sha256 is {got_hex}, declared {sha256}")
                return True
        hasher = _Hasher(sha256, size)
        for chunk in self._read_key(key):
            hasher.update(chunk)
        hasher.verify()
        return False

    def _read_key(self, key: str) -> Iterator[bytes]:
        body = self.s3.get_object(Bucket=self.bucket, Key=key)["Body"]
        try:
            yield from body.iter_chunks(CHUNK)
        finally:
            body.close()


class _S3Writer:
    """Small blobs go up in one PUT; bigger ones as a multipart upload whose parts are sent in the
    background while the next ones arrive. A part is spooled to an unnamed temp file (gone with
    the process, whatever happens), so disk use is part size x (parts in flight + 1) and memory
    stays a few chunks, whatever the part size and file size."""

    def __init__(self, store: S3Blobs, sha256: str, size: int):
        self.store, self.key, self.size = store, store.key(sha256), size
        self.hasher = _Hasher(sha256, size)
        self.spool = self._new_spool()
        self.spooled = self.written = 0
        self.upload_id: str | None = None
        self.in_flight: set[Future] = set()
        self.parts: list[dict] = []

    def _new_spool(self):
        return tempfile.TemporaryFile(dir=self.store.spool_dir)

    def _send_part(self, number: int, spool) -> dict:
        try:
            spool.seek(0)
            r = self.store.s3.upload_part(
                Bucket=self.store.bucket,
                Key=self.key,
                UploadId=self.upload_id,
                PartNumber=number,
                Body=spool,
                ChecksumAlgorithm="CRC32",
            )
            return {
                "PartNumber": number,
                "ETag": r["ETag"],
                **({"ChecksumCRC32": r["ChecksumCRC32"]} if r.get("ChecksumCRC32") else {}),
            }
        finally:
            spool.close()

    def _collect(self, block: bool) -> None:
        """Record finished parts (waiting for one when `block`); a failed part raises here."""
        if block and self.in_flight:
            done, _ = wait(self.in_flight, return_when=FIRST_COMPLETED)
        else:
            done = {f for f in self.in_flight if f.done()}
        for f in done:
            self.in_flight.discard(f)
            self.parts.append(f.result())

    def _flush_part(self) -> None:
        s3 = self.store.s3
        if self.upload_id is None:
            # A named part checksum: without one a store may checksum the whole object at completion
            # (moto's default is a full-object CRC64 over every byte, as slow as the upload itself).
            self.upload_id = s3.create_multipart_upload(
                Bucket=self.store.bucket, Key=self.key, ChecksumAlgorithm="CRC32"
            )["UploadId"]
        self._collect(block=False)
        while len(self.in_flight) >= self.store.parts_in_flight:
            self._collect(block=True)
        number = len(self.parts) + len(self.in_flight) + 1
        spool, self.spool, self.spooled = self.spool, self._new_spool(), 0
        self.in_flight.add(self.store.pool.submit(self._send_part, number, spool))

    def write(self, data: bytes) -> None:
        self.hasher.update(data)
        view = memoryview(data)
        while view:
            # Parts are cut at exact multiples of the part size (S3 wants all but the last >= 5 MiB).
            take = min(len(view), self.store.part_size - self.spooled)
            self.spool.write(view[:take])
            self.spooled += take
            self.written += take
            view = view[take:]
            # A full last part waits for finish(): a file of exactly one part goes up in one PUT.
            if self.spooled == self.store.part_size and self.written < self.size:
                self._flush_part()

    def finish(self) -> None:
        s3 = self.store.s3
        try:
            self.hasher.verify()
            if self.upload_id is None:
                self.spool.seek(0)
                s3.put_object(Bucket=self.store.bucket, Key=self.key, Body=self.spool)
                self.spool.close()
            else:
                if self.spooled:
                    self._flush_part()
                while self.in_flight:
                    self._collect(block=True)
                parts = sorted(self.parts, key=lambda p: p["PartNumber"])
                s3.complete_multipart_upload(
                    Bucket=self.store.bucket, Key=self.key, UploadId=self.upload_id, MultipartUpload={"Parts": parts}
                )
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        self.spool.close()
        for f in self.in_flight:
            f.cancel()
        # Parts still being sent would outlive an abort issued now; wait for them first.
        wait(self.in_flight)
        self.in_flight.clear()
        if self.upload_id is not None:
            try:
                self.store.s3.abort_multipart_upload(Bucket=self.store.bucket, Key=self.key, UploadId=self.upload_id)
            finally:
                self.upload_id = None
