"""Google Cloud Storage through the official `google-cloud-storage` client.

Files larger than 8 MiB go up as resumable uploads sent in chunks of `chunk_size` bytes (a multiple of
256 KiB, 8 MiB by default); smaller ones as a single multipart request. Either way the client reads
bounded pieces of the file. The object is created with `ifGenerationMatch=0`, so GCS refuses to replace an
existing key. While uploading, MD5, CRC32C and SHA-256 are computed locally; afterwards GCS's own MD5 and
CRC32C of what it stored must equal them, else the new object is deleted and the put fails. The SHA-256
is stored as the object metadata `sha256` (set when the upload starts), and the locally computed MD5 and
CRC32C are recorded as metadata `pgbeat-md5`/`pgbeat-crc32c` once the upload checked out.

Shallow `verify`: size, the `sha256` metadata against the expected SHA-256, and GCS's MD5/CRC32C (which
GCS computes over the bytes it holds) against those recorded at upload: content replaced under the same
name is caught without reading it. `deep=True` reads the object back and hashes it.

Credentials: `credentials_file` (a service-account or other credentials JSON) when given, else
Application Default Credentials (`GOOGLE_APPLICATION_CREDENTIALS`, gcloud, metadata server). With an
`endpoint` (an emulator) and no credentials file, requests are anonymous.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

from pgbeat.errors import StorageError, TransientStorageError
from pgbeat.storage.base import HashingReader, HashingWriter
from pgbeat.storage.objectstore import ObjectExists, ObjectStore, Remote

DEFAULT_CHUNK_SIZE = 8 * 1024 * 1024
CHUNK_MULTIPLE = 256 * 1024
SCOPES = ["https://www.googleapis.com/auth/devstorage.read_write"]


class GCSStorage(ObjectStore):
    """A bucket (and optional prefix) on Google Cloud Storage or a GCS emulator."""

    def __init__(self, bucket: str, prefix: str = "", project: str | None = None,
                 credentials_file: str | Path | None = None, endpoint: str | None = None,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, name: str = "gcs", *,
                 timeout: float = 60.0, retry_deadline: float = 60.0) -> None:
        """`retry_deadline` bounds the client's own retries of one request (connection errors, 5xx, 429)
        in seconds; `RetryingStorage` retries whole operations on top of it."""
        if chunk_size <= 0 or chunk_size % CHUNK_MULTIPLE:
            raise ValueError(f"{name}: chunk_size must be a positive multiple of {CHUNK_MULTIPLE} bytes")
        self.bucket_name = bucket
        self.prefix = prefix.strip("/")
        self.project = project
        self.credentials_file = Path(credentials_file) if credentials_file else None
        self.endpoint = endpoint
        self.chunk_size = chunk_size
        self.name = name
        self.timeout = timeout
        self.retry_deadline = retry_deadline
        self._client_instance: Any = None

    def __repr__(self) -> str:
        return f"GCSStorage(name={self.name!r}, location={self.describe('')!r})"

    def describe(self, key: str) -> str:
        path = "/".join(part for part in (self.prefix, key.strip("/")) if part)
        return f"gs://{self.bucket_name}/{path}"

    # --- client --------------------------------------------------------------------------------------------

    @property
    def _bucket(self) -> Any:
        if self._client_instance is None:
            from google.cloud import storage

            options = {"api_endpoint": self.endpoint} if self.endpoint else None
            project = self.project
            if self.credentials_file:
                try:
                    credentials, file_project = _load_credentials(self.credentials_file)
                except Exception as exc:  # the message may quote the file: name only the type and the path
                    raise StorageError(f"{self.name}: cannot load GCS credentials from {self.credentials_file} "
                                       f"({type(exc).__name__})") from None
                project = project or file_project
            elif self.endpoint:
                from google.auth.credentials import AnonymousCredentials

                credentials, project = AnonymousCredentials(), project or "pgbeat"
            else:
                credentials = None  # Application Default Credentials
            self._client_instance = storage.Client(project=project, credentials=credentials, client_options=options)
        return self._client_instance.bucket(self.bucket_name)

    @property
    def _retry(self) -> Any:
        from google.cloud.storage.retry import DEFAULT_RETRY

        return DEFAULT_RETRY.with_timeout(self.retry_deadline)

    # --- primitives ----------------------------------------------------------------------------------------

    def _head(self, name: str) -> Remote | None:
        blob = self._bucket.get_blob(name, timeout=self.timeout, retry=self._retry)
        return None if blob is None else _remote(blob)

    def _upload(self, source: Path, name: str, size: int, sha256: str, replace: bool = False) -> Remote:
        import google_crc32c

        bucket = self._bucket
        blob = bucket.blob(name, chunk_size=self.chunk_size)
        blob.metadata = {"sha256": sha256}
        with open(source, "rb") as raw:
            reader = HashingReader(raw, {"sha256": hashlib.sha256(), "md5": hashlib.md5(usedforsecurity=False),
                                         "crc32c": google_crc32c.Checksum()})
            try:
                blob.upload_from_file(reader, size=size, if_generation_match=None if replace else 0,
                                      timeout=self.timeout, retry=self._retry, checksum="crc32c")
            except Exception as exc:
                if getattr(exc, "code", None) == 412:
                    raise ObjectExists from None
                raise
        local = {"sha256": reader.hexdigest("sha256"), "md5": reader.digest("md5").hex(),
                 "crc32c": reader.digest("crc32c").hex()}
        remote = _remote(blob)
        problems = []
        if local["sha256"] != sha256:
            problems.append("the file does not hash to the SHA-256 given (it changed while uploading?)")
        for label in ("md5", "crc32c"):
            theirs = getattr(remote, label)
            if theirs is not None and theirs != local[label]:
                problems.append(f"GCS {label.upper()} {theirs} differs from the {local[label]} computed here")
        if remote.size != reader.pos:
            problems.append(f"GCS holds {remote.size} bytes, {reader.pos} were sent")
        if problems:
            blob.delete(if_generation_match=blob.generation, timeout=self.timeout, retry=self._retry)
            raise StorageError(f"{self.name}: upload of {self.describe(self._key(name))} failed its checks, "
                               f"removed it: {'; '.join(problems)}")
        blob.metadata = {"sha256": sha256, "pgbeat-md5": local["md5"], "pgbeat-crc32c": local["crc32c"]}
        blob.patch(if_generation_match=blob.generation, timeout=self.timeout, retry=self._retry)
        return _remote(blob)

    def _download(self, name: str, writer: HashingWriter) -> None:
        self._bucket.blob(name).download_to_file(writer, timeout=self.timeout, retry=self._retry,
                                                  checksum="crc32c")

    def _list(self, prefix: str, recursive: bool) -> tuple[list[Remote], list[str]]:
        client = self._bucket.client
        pages = client.list_blobs(self.bucket_name, prefix=prefix or None, delimiter=None if recursive else "/",
                                  timeout=self.timeout, retry=self._retry)
        objects = [_remote(blob) for blob in pages]
        return objects, sorted(pages.prefixes)

    def _delete_objects(self, names: list[str]) -> None:
        from google.api_core.exceptions import NotFound

        bucket = self._bucket
        for name in names:
            with contextlib.suppress(NotFound):
                bucket.delete_blob(name, timeout=self.timeout, retry=self._retry)

    def _put_bytes(self, name: str, data: bytes) -> None:
        blob = self._bucket.blob(name)
        blob.metadata = {"sha256": hashlib.sha256(data).hexdigest()}
        try:
            blob.upload_from_string(data, content_type="application/json", if_generation_match=0,
                                    timeout=self.timeout, retry=self._retry)
        except Exception as exc:
            if getattr(exc, "code", None) == 412:
                raise ObjectExists from None
            raise

    def _read_bytes(self, name: str) -> bytes:
        return self._bucket.blob(name).download_as_bytes(timeout=self.timeout, retry=self._retry)

    def _shallow_problems(self, remote: Remote, sha256: str | None) -> list[str] | None:
        problems = []
        if remote.sha256 and sha256 and remote.sha256.lower() != sha256.lower():
            problems.append(f"stored SHA-256 metadata {remote.sha256[:16]}…, expected {sha256[:16]}…")
        compared = False
        for label in ("md5", "crc32c"):
            recorded, theirs = remote.extra.get(f"pgbeat-{label}"), getattr(remote, label)
            if recorded and theirs:
                compared = True
                if recorded != theirs:
                    problems.append(f"GCS {label.upper()} of the stored bytes {theirs} differs from the {recorded} "
                                    "recorded at upload")
        # The content is vouched for only if GCS's checksums of what it holds are those of the upload
        # whose SHA-256 is the expected one; otherwise the caller reads the object back.
        vouched = compared and bool(remote.sha256 and sha256)
        return problems if (problems or vouched) else None

    # --- errors --------------------------------------------------------------------------------------------

    def _error(self, exc: Exception, action: str, key: str) -> StorageError:
        import requests
        from google.api_core import exceptions as gx
        from google.auth import exceptions as ax
        from google.cloud.storage import exceptions as sx

        where = f"{self.name}: cannot {action} {self.describe(key)}"
        if isinstance(exc, gx.RetryError):
            cause = exc.cause
            return TransientStorageError(f"{where}: gave up retrying ({type(cause).__name__ if cause else 'timeout'})")
        if isinstance(exc, gx.GoogleAPICallError):
            code = exc.code or 0
            text = f"{where}: {code} {exc.message}"
            if code in (408, 429) or code >= 500:
                return TransientStorageError(text)
            if code in (401, 403):
                return StorageError(text, hint="check the GCS credentials and the bucket's IAM for this destination")
            return StorageError(text)
        if isinstance(exc, (sx.InvalidResponse, sx.DataCorruption)):
            status = getattr(getattr(exc, "response", None), "status_code", 0) or 0
            text = f"{where}: {type(exc).__name__} (HTTP {status or '?'})"
            if isinstance(exc, sx.DataCorruption) or status in (408, 429) or status >= 500:
                return TransientStorageError(text)
            return StorageError(text)
        if isinstance(exc, (ax.RefreshError, ax.DefaultCredentialsError)):
            return StorageError(f"{where}: no usable credentials ({type(exc).__name__})",
                                hint="set credentials_file or GOOGLE_APPLICATION_CREDENTIALS for this destination")
        if isinstance(exc, (ax.TransportError, requests.ConnectionError, requests.Timeout, ConnectionError,
                            TimeoutError)):
            return TransientStorageError(f"{where}: connection failed ({type(exc).__name__})")
        if isinstance(exc, OSError):
            return StorageError(f"{where}: {exc.strerror or type(exc).__name__}")
        return StorageError(f"{where}: {type(exc).__name__}")


def _load_credentials(path: Path) -> tuple[Any, str | None]:
    """Load a credentials file with the loader of its declared type (service account or user credentials);
    other types (workload identity federation...) go through google.auth's generic loader."""
    info = json.loads(path.read_text())
    kind = info.get("type")
    if kind == "service_account":
        from google.oauth2 import service_account

        return service_account.Credentials.from_service_account_info(info, scopes=SCOPES), info.get("project_id")
    if kind == "authorized_user":
        from google.oauth2 import credentials

        return credentials.Credentials.from_authorized_user_info(info, scopes=SCOPES), info.get("quota_project_id")
    import google.auth

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the file is the operator's own configuration
        return google.auth.load_credentials_from_file(str(path), scopes=SCOPES)


def _remote(blob: Any) -> Remote:
    metadata = blob.metadata or {}
    return Remote(name=blob.name, size=blob.size or 0, modified=blob.updated, sha256=metadata.get("sha256"),
                  md5=base64.b64decode(blob.md5_hash).hex() if blob.md5_hash else None,
                  crc32c=base64.b64decode(blob.crc32c).hex() if blob.crc32c else None,
                  extra={k: v for k, v in metadata.items() if k.startswith("pgbeat-")})
