"""Client-side encryption with age (through pyrage), streaming, before anything leaves the worker.

Workers hold only the public recipients (`age1...`); the private identity is needed only to restore.
The result is ordinary age format: `age -d -i key.txt FILE.sql.gz.age | gunzip -c | psql` restores it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pyrage

from pgbeat.errors import PgbeatError
from pgbeat.fsutil import disk_error, open_private

SUFFIX = ".age"


class DecryptionError(PgbeatError):
    """The backup cannot be decrypted: no identity, a wrong one, or a damaged file."""

    exit_code = 3


class _Hashing:
    """A write-only wrapper counting bytes and computing SHA-256 and MD5 of what goes through."""

    def __init__(self, raw) -> None:
        self.raw, self.size = raw, 0
        self.sha256, self.md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)

    def write(self, data) -> int:
        self.sha256.update(data)
        self.md5.update(data)
        self.size += len(data)
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()

    def digests(self) -> dict[str, Any]:
        return {"size": self.size, "sha256": self.sha256.hexdigest(), "md5": self.md5.hexdigest()}


def encrypt_file(source: Path, dest: Path, recipients: list[str]) -> dict[str, Any]:
    """Encrypt `source` into a new 0600 file `dest` for `recipients`; return size, SHA-256, MD5 of `dest`."""
    keys = [pyrage.x25519.Recipient.from_str(r) for r in recipients]
    try:
        with open(source, "rb") as src, open_private(dest) as raw:
            out = _Hashing(raw)
            pyrage.encrypt_io(src, out, keys)
            raw.flush()
    except OSError as exc:
        raise disk_error(exc, dest) from None
    return out.digests()


def load_identities(path: Path | None) -> list:
    """Read age X25519 identities (AGE-SECRET-KEY-1...) from `path`; raise DecryptionError if there are none."""
    if path is None:
        raise DecryptionError("This backup is encrypted and no identity was given",
                              hint="pass --identity FILE or set encryption.identity_file in the config")
    try:
        lines = Path(path).expanduser().read_text().splitlines()
    except OSError as exc:
        raise DecryptionError(f"Cannot read the identity file {path}: {exc.strerror}") from None
    identities = []
    for line in lines:
        if line.strip().startswith("AGE-SECRET-KEY-"):
            try:
                identities.append(pyrage.x25519.Identity.from_str(line.strip()))
            except Exception:
                raise DecryptionError(f"{path} holds a malformed age identity") from None
    if not identities:
        raise DecryptionError(f"{path} holds no age identity (AGE-SECRET-KEY-...)")
    return identities


def decrypt_file(source: Path, dest: Path, identities: list) -> dict[str, Any]:
    """Decrypt `source` into a new 0600 file `dest`; return size, SHA-256 and MD5 of the plaintext."""
    try:
        with open(source, "rb") as src, open_private(dest) as raw:
            out = _Hashing(raw)
            pyrage.decrypt_io(src, out, identities)
    except pyrage.DecryptError as exc:
        dest.unlink(missing_ok=True)
        raise DecryptionError(f"Cannot decrypt {source.name}: {exc}",
                              hint="the identity does not match the backup's recipients, or the file is damaged"
                              ) from None
    except OSError as exc:
        dest.unlink(missing_ok=True)
        raise disk_error(exc, dest) from None
    return out.digests()
