"""Amazon S3 and S3-compatible stores (MinIO, Ceph, R2, Wasabi...) through boto3.

Uploads are explicit multipart uploads in parts of `part_size` bytes (at least 5 MiB, S3's minimum; 8 MiB
by default; raised automatically so that no file needs more than 10,000 parts), read one part at a time,
so memory stays bounded whatever the file size. Every part carries its SHA-256 (`ChecksumSHA256`), which
S3 checks on arrival; a file of one part is a single PutObject whose SHA-256 is the whole object's. The
file's SHA-256 is stored as the object metadata `sha256` (`x-amz-meta-sha256`). If the bytes read do not
hash to the expected SHA-256 the multipart upload is aborted, so nothing appears under the key. The
object is created with `If-None-Match: *` on PutObject and CompleteMultipartUpload: S3 itself refuses to
replace an existing key, even between our existence check and the write.

Shallow `verify`: ContentLength, the `sha256` metadata and, for single-part objects, S3's own
`ChecksumSHA256` (computed by S3 over the stored bytes). A multipart object's checksum is a checksum of its
parts, so for those only the size and the metadata can be compared without reading; `deep=True` reads the
object back and hashes it.

Credentials: `access_key_id`/`secret_access_key` when given (the secret may be a pydantic SecretStr),
else `profile`, else boto3's standard chain (environment, shared files, instance roles). They are never
logged nor put in messages: every error text is also scrubbed of them.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from pgbeat.errors import StorageError, TransientStorageError
from pgbeat.fsutil import CHUNK
from pgbeat.storage.base import HashingReader, HashingWriter
from pgbeat.storage.objectstore import ObjectExists, ObjectStore, Remote, part_size_for

MIN_PART_SIZE = 5 * 1024 * 1024
DEFAULT_PART_SIZE = 8 * 1024 * 1024

_TRANSIENT_CODES = {
    "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable", "SlowDown", "Throttling",
    "ThrottlingException", "RequestLimitExceeded", "TooManyRequests", "TooManyRequestsException",
    "OperationAborted", "ConditionalRequestConflict", "PriorRequestNotComplete", "BandwidthLimitExceeded",
}
_AUTH_CODES = {
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
    "InvalidClientTokenId", "AuthorizationHeaderMalformed", "AllAccessDisabled", "AccountProblem",
}


class S3Storage(ObjectStore):
    """A bucket (and optional prefix) on S3 or an S3-compatible server."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None, region: str | None = None,
                 storage_class: str | None = None, sse: str | None = None, sse_kms_key_id: str | None = None,
                 access_key_id: str | None = None, secret_access_key: str | SecretStr | None = None,
                 profile: str | None = None, part_size: int = DEFAULT_PART_SIZE, name: str = "s3", *,
                 max_attempts: int = 3, connect_timeout: float = 10.0, read_timeout: float = 60.0) -> None:
        """`max_attempts` is botocore's own per-request retry budget (so one flaky part does not restart a
        whole upload); `RetryingStorage` retries whole operations on top of it."""
        if sse not in (None, "AES256", "aws:kms"):
            raise ValueError(f"{name}: sse must be 'AES256' or 'aws:kms', not {sse!r}")
        if sse_kms_key_id and sse != "aws:kms":
            raise ValueError(f"{name}: sse_kms_key_id needs sse='aws:kms'")
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"{name}: part_size must be at least {MIN_PART_SIZE} bytes (S3's minimum part)")
        if bool(access_key_id) != bool(secret_access_key):
            raise ValueError(f"{name}: give both access_key_id and secret_access_key, or neither")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.region = region
        self.storage_class = storage_class
        self.sse = sse
        self.sse_kms_key_id = sse_kms_key_id
        self.profile = profile
        self.part_size = part_size
        self.name = name
        self._access_key_id = SecretStr(access_key_id) if access_key_id else None
        if isinstance(secret_access_key, str):
            secret_access_key = SecretStr(secret_access_key)
        self._secret_access_key = secret_access_key
        self._client_options = {"max_attempts": max_attempts, "connect_timeout": connect_timeout,
                                "read_timeout": read_timeout}
        self._client_instance: Any = None

    def __repr__(self) -> str:
        return f"S3Storage(name={self.name!r}, location={self.describe('')!r})"

    def describe(self, key: str) -> str:
        path = "/".join(part for part in (self.prefix, key.strip("/")) if part)
        return f"s3://{self.bucket}/{path}"

    # --- client --------------------------------------------------------------------------------------------

    @property
    def _client(self) -> Any:
        if self._client_instance is None:
            import boto3
            from botocore.config import Config

            options = self._client_options
            session = boto3.session.Session(
                aws_access_key_id=self._access_key_id.get_secret_value() if self._access_key_id else None,
                aws_secret_access_key=self._secret_access_key.get_secret_value() if self._secret_access_key else None,
                profile_name=self.profile, region_name=self.region)
            region = self.region or session.region_name or ("us-east-1" if self.endpoint_url else None)
            config = Config(
                region_name=region,
                retries={"max_attempts": options["max_attempts"], "mode": "standard"},
                connect_timeout=options["connect_timeout"], read_timeout=options["read_timeout"],
                s3={"addressing_style": "path" if self.endpoint_url else "auto"},
                # We send our own SHA-256 with every upload; no trailing checksums that some
                # S3-compatible servers reject.
                request_checksum_calculation="when_required", response_checksum_validation="when_required",
            )
            self._client_instance = session.client("s3", endpoint_url=self.endpoint_url, config=config)
        return self._client_instance

    def _object_args(self, sha256: str | None) -> dict[str, Any]:
        args: dict[str, Any] = {}
        if sha256:
            args["Metadata"] = {"sha256": sha256}
        if self.storage_class:
            args["StorageClass"] = self.storage_class
        if self.sse:
            args["ServerSideEncryption"] = self.sse
            if self.sse_kms_key_id:
                args["SSEKMSKeyId"] = self.sse_kms_key_id
        return args

    # --- primitives ----------------------------------------------------------------------------------------

    def _head(self, name: str) -> Remote | None:
        from botocore.exceptions import ClientError

        try:
            head = self._client.head_object(Bucket=self.bucket, Key=name, ChecksumMode="ENABLED")
        except ClientError as exc:
            if _status(exc) == 404 or _code(exc) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return _remote(name, head)

    def _upload(self, source: Path, name: str, size: int, sha256: str, replace: bool = False) -> Remote:
        part_size = part_size_for(size, self.part_size)
        with open(source, "rb") as raw:
            reader = HashingReader(raw)
            if size <= part_size:
                self._put_single(name, _read_part(reader, part_size), reader, sha256, replace)
            else:
                self._put_multipart(name, reader, part_size, sha256, replace)
        remote = self._head(name)
        if remote is None:
            raise TransientStorageError(f"{self.name}: {self.describe(self._key(name))} is not visible after upload")
        if remote.size != reader.pos:
            raise StorageError(f"{self.name}: {self.describe(self._key(name))} has {remote.size} bytes after "
                               f"upload, {reader.pos} were sent")
        return remote

    def _put_single(self, name: str, data: bytes, reader: HashingReader, sha256: str, replace: bool) -> None:
        from botocore.exceptions import ClientError

        _check_source(self, name, reader, sha256)
        try:
            self._client.put_object(Bucket=self.bucket, Key=name, Body=data, **_no_clobber(replace),
                                    ChecksumAlgorithm="SHA256", ChecksumSHA256=_b64(reader.digest("sha256")),
                                    **self._object_args(sha256))
        except ClientError as exc:
            if _code(exc) == "PreconditionFailed" or _status(exc) == 412:
                raise ObjectExists from None
            raise

    def _put_multipart(self, name: str, reader: HashingReader, part_size: int, sha256: str, replace: bool) -> None:
        from botocore.exceptions import ClientError

        client = self._client
        upload_id = client.create_multipart_upload(Bucket=self.bucket, Key=name, ChecksumAlgorithm="SHA256",
                                                   **self._object_args(sha256))["UploadId"]
        try:
            parts = []
            number = 1
            while data := _read_part(reader, part_size):
                checksum = _b64(hashlib.sha256(data).digest())
                response = client.upload_part(Bucket=self.bucket, Key=name, UploadId=upload_id, PartNumber=number,
                                              Body=data, ChecksumAlgorithm="SHA256", ChecksumSHA256=checksum)
                parts.append({"PartNumber": number, "ETag": response["ETag"], "ChecksumSHA256": checksum})
                number += 1
            _check_source(self, name, reader, sha256)
            try:
                client.complete_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload_id,
                                                 MultipartUpload={"Parts": parts}, **_no_clobber(replace))
            except ClientError as exc:
                if _code(exc) == "PreconditionFailed" or _status(exc) == 412:
                    raise ObjectExists from None
                raise
        except BaseException:
            # The original error is what matters; a failed abort leaves parts that a lifecycle rule removes.
            with contextlib.suppress(Exception):
                client.abort_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload_id)
            raise

    def _download(self, name: str, writer: HashingWriter) -> None:
        body = self._client.get_object(Bucket=self.bucket, Key=name)["Body"]
        try:
            for chunk in body.iter_chunks(CHUNK):
                writer.write(chunk)
        finally:
            body.close()

    def _list(self, prefix: str, recursive: bool) -> tuple[list[Remote], list[str]]:
        paginator = self._client.get_paginator("list_objects_v2")
        args = {"Bucket": self.bucket, "Prefix": prefix}
        if not recursive:
            args["Delimiter"] = "/"
        objects, prefixes = [], []
        for page in paginator.paginate(**args):
            for item in page.get("Contents", []):
                objects.append(Remote(name=item["Key"], size=item["Size"], modified=item.get("LastModified"),
                                      md5=_etag_md5(item.get("ETag"), None)))
            prefixes += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
        return objects, prefixes

    def _delete_objects(self, names: list[str]) -> None:
        for start in range(0, len(names), 1000):
            batch = names[start:start + 1000]
            response = self._client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": n} for n in batch], "Quiet": True})
            errors = [e for e in response.get("Errors", []) if e.get("Code") != "NoSuchKey"]
            if errors:
                first = errors[0]
                cls = TransientStorageError if first.get("Code") in _TRANSIENT_CODES else StorageError
                raise cls(f"{self.name}: cannot delete {self.describe(self._key(first.get('Key', '')))}: "
                          f"{first.get('Code')}: {self._scrub(first.get('Message', ''))}")

    def _put_bytes(self, name: str, data: bytes) -> None:
        from botocore.exceptions import ClientError

        try:
            self._client.put_object(Bucket=self.bucket, Key=name, Body=data, IfNoneMatch="*",
                                    ChecksumAlgorithm="SHA256", ChecksumSHA256=_b64(hashlib.sha256(data).digest()),
                                    **self._object_args(hashlib.sha256(data).hexdigest()))
        except ClientError as exc:
            if _code(exc) == "PreconditionFailed" or _status(exc) == 412:
                raise ObjectExists from None
            raise

    def _read_bytes(self, name: str) -> bytes:
        body = self._client.get_object(Bucket=self.bucket, Key=name)["Body"]
        try:
            return body.read()
        finally:
            body.close()

    def _shallow_problems(self, remote: Remote, sha256: str | None) -> list[str] | None:
        problems = []
        vouched = False
        server = remote.extra.get("server_sha256")
        for label, value in (("stored SHA-256 metadata", remote.sha256), ("S3 ChecksumSHA256", server)):
            if value and sha256:
                vouched = True
                if value.lower() != sha256.lower():
                    problems.append(f"{label} {value[:16]}…, expected {sha256[:16]}…")
        if remote.sha256 and server and remote.sha256.lower() != server.lower():
            problems.append("S3's checksum of the stored bytes differs from the SHA-256 recorded at upload")
        return problems if (vouched or problems) else None

    # --- errors --------------------------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        for secret in (self._access_key_id, self._secret_access_key):
            if secret is not None and secret.get_secret_value():
                text = text.replace(secret.get_secret_value(), "***")
        return text

    def _error(self, exc: Exception, action: str, key: str) -> StorageError:
        from botocore import exceptions as bx

        where = f"{self.name}: cannot {action} {self.describe(key)}"
        if isinstance(exc, bx.ClientError):
            code, status = _code(exc), _status(exc)
            message = self._scrub(exc.response.get("Error", {}).get("Message") or "")
            text = f"{where}: {code or status}{': ' + message if message else ''}"
            if code in _TRANSIENT_CODES or (status is not None and (status >= 500 or status in (408, 429))):
                return TransientStorageError(text)
            if code in _AUTH_CODES or status in (401, 403):
                return StorageError(text, hint="check the S3 credentials and the bucket policy for this destination")
            if code == "NoSuchBucket":
                return StorageError(text, hint=f"create the bucket {self.bucket!r} or fix the destination")
            return StorageError(text)
        if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError, bx.ProfileNotFound,
                            bx.CredentialRetrievalError)):
            return StorageError(f"{where}: no usable credentials ({type(exc).__name__})",
                                hint="set access_key_id/secret_access_key, a profile, or the AWS_* environment")
        if isinstance(exc, bx.SSLError):
            return StorageError(f"{where}: TLS error ({type(exc).__name__})")
        if isinstance(exc, (bx.ConnectionError, bx.HTTPClientError, bx.IncompleteReadError,
                            bx.ResponseStreamingError, ConnectionError, TimeoutError)):
            return TransientStorageError(f"{where}: {self._scrub(str(exc))}")
        if isinstance(exc, bx.NoRegionError):
            return StorageError(f"{where}: no region configured", hint="set region for this destination")
        if isinstance(exc, OSError):
            return StorageError(f"{where}: {exc.strerror or type(exc).__name__}")
        return StorageError(f"{where}: {type(exc).__name__}: {self._scrub(str(exc))}")


def _read_part(reader: HashingReader, part_size: int) -> bytes:
    """Read up to `part_size` bytes in chunks (each paced by the bandwidth limit)."""
    parts = bytearray()
    while len(parts) < part_size and (chunk := reader.read(min(CHUNK, part_size - len(parts)))):
        parts += chunk
    return bytes(parts)


def _check_source(storage: S3Storage, name: str, reader: HashingReader, sha256: str) -> None:
    if reader.hexdigest() != sha256:
        raise StorageError(f"{storage.name}: the file for {storage.describe(storage._key(name))} does not hash to "
                           "the SHA-256 given (it changed while uploading?); nothing was stored")


def _remote(name: str, head: dict) -> Remote:
    server = head.get("ChecksumSHA256")
    if server and ("-" in server or head.get("ChecksumType") == "COMPOSITE"):
        server = None  # a checksum of the parts' checksums, not of the object
    metadata = head.get("Metadata") or {}
    return Remote(name=name, size=head["ContentLength"], modified=head.get("LastModified"),
                  sha256=metadata.get("sha256"), md5=_etag_md5(head.get("ETag"), head.get("ServerSideEncryption")),
                  extra={"server_sha256": base64.b64decode(server).hex() if server else None,
                         "storage_class": head.get("StorageClass", "STANDARD"),
                         "sse": head.get("ServerSideEncryption")})


def _etag_md5(etag: str | None, sse: str | None) -> str | None:
    """The ETag is the object's MD5 only for a single-part upload without SSE-KMS/SSE-C."""
    etag = (etag or "").strip('"')
    if len(etag) == 32 and "-" not in etag and sse != "aws:kms":
        return etag
    return None


def _no_clobber(replace: bool) -> dict[str, str]:
    """The precondition of a write: refuse an existing key (If-None-Match), unless it is to be replaced."""
    return {} if replace else {"IfNoneMatch": "*"}


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def _code(exc: Any) -> str | None:
    return exc.response.get("Error", {}).get("Code")


def _status(exc: Any) -> int | None:
    return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
