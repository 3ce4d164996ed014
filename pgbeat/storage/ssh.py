"""A folder on another host over SSH, through SFTP with paramiko.

Why paramiko rather than the `rsync`/`ssh`/`sftp` programs: it is a maintained, pure-Python SSH client
that gives typed errors (authentication failed, host key unknown or changed, connection lost), so retry
decisions do not depend on parsing another program's stderr; one connection serves many operations; it
needs no binaries on the pgbeat host; and SFTP gives exactly the operations the contract needs (exclusive
create, chmod, no-clobber rename, stat, listdir). Host key checking is always on: keys come from
`known_hosts` (or `~/.ssh/known_hosts` and `/etc/ssh/ssh_known_hosts`), an unknown key is refused.

Atomicity: a file is written under a hidden temporary name (`.NAME.partial-XXXXXXXX`), made 0600 before
its first byte, checked, then renamed to its final name. The rename is SFTP's plain rename, which on
OpenSSH is a hard link plus unlink for files and refuses an existing target, so an existing key is never
replaced, even by a concurrent writer. A folder is built the same way under a hidden 0700 folder and
renamed whole; delete renames a folder to a hidden name before removing it. Folders created remotely are
0700.

Integrity: after the upload and before the rename, `sha256sum` runs on the remote host over the same SSH
connection, and its result must equal the SHA-256 of the bytes sent. Where the account has no shell or no
`sha256sum` (e.g. an sftp-only account), the file is read back over SFTP and hashed instead. Shallow
`verify` uses the remote `sha256sum` (or the read-back); `deep=True` always reads back.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import shlex
import socket
import stat as statmod
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pgbeat.errors import StorageError, TransientStorageError
from pgbeat.fsutil import CHUNK, DIR_MODE, FILE_MODE, open_private, remove_path
from pgbeat.storage.base import (
    Capabilities,
    Closing,
    HashingReader,
    HashingWriter,
    ObjectInfo,
    S,
    check_key,
    compare,
    counted,
    folder_files,
    is_staging,
    mismatch,
    partial_name,
    staging_name,
)

READ_WINDOW = 8 * CHUNK  # bytes requested ahead while downloading: bounds memory, keeps the pipe full
HASH_BATCH = 100  # paths per remote sha256sum command


class _UnknownHostKey(Exception):
    pass


class SSHStorage(Closing):
    """A remote folder reached over SSH/SFTP."""

    def __init__(self, host: str, *, port: int = 22, user: str, path: str, key_file: str | Path | None = None,
                 known_hosts: str | Path | None = None, name: str = "ssh", connect_timeout: float = 15.0,
                 remote_sha256sum: bool = True) -> None:
        """`remote_sha256sum=False` never runs commands on the remote host (an sftp-only account): checks
        read the files back instead."""
        self.host = host
        self.port = port
        self.user = user
        self.path = path.rstrip("/") or "/"
        self.key_file = Path(key_file) if key_file else None
        self.known_hosts = Path(known_hosts) if known_hosts else None
        self.name = name
        self.connect_timeout = connect_timeout
        self.remote_sha256sum = remote_sha256sum
        self._lock = threading.RLock()
        self._client: Any = None
        self._sftp_client: Any = None

    @property
    def capabilities(self) -> Capabilities:
        """Without remote `sha256sum`, a shallow check reads every file back over SFTP."""
        return Capabilities(shallow_reads_back=not self.remote_sha256sum)

    def __repr__(self) -> str:
        return f"SSHStorage(name={self.name!r}, location={self.describe('')!r})"

    def describe(self, key: str) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        base = self.path if self.path.startswith("/") else f"/~/{self.path}"
        path = posixpath.join(base, key.strip("/")) if key.strip("/") else base
        return f"ssh://{self.user}@{host}:{self.port}{path}"

    def close(self) -> None:
        """Close the SSH connection (the next operation opens a new one)."""
        with self._lock:
            client, self._client, self._sftp_client = self._client, None, None
            if client is not None:
                with contextlib.suppress(Exception):
                    client.close()

    # --- connection ----------------------------------------------------------------------------------------

    def _connect(self) -> None:
        import paramiko

        storage = self

        class RejectUnknown(paramiko.MissingHostKeyPolicy):
            def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
                raise _UnknownHostKey(f"{storage.name}: the host key of {hostname} is not in "
                                      f"{storage.known_hosts or '~/.ssh/known_hosts'}")

        if self.key_file is not None and not self.key_file.is_file():
            raise StorageError(f"{self.name}: SSH key file {self.key_file} not found")
        client = paramiko.SSHClient()
        if self.known_hosts is not None:
            if not self.known_hosts.is_file():
                raise StorageError(f"{self.name}: known_hosts file {self.known_hosts} not found")
            client.load_host_keys(str(self.known_hosts))
        else:
            client.load_system_host_keys()
            if os.path.isfile("/etc/ssh/ssh_known_hosts"):
                client.load_system_host_keys("/etc/ssh/ssh_known_hosts")
        client.set_missing_host_key_policy(RejectUnknown())
        try:
            client.connect(self.host, port=self.port, username=self.user,
                           key_filename=str(self.key_file) if self.key_file else None,
                           allow_agent=self.key_file is None, look_for_keys=self.key_file is None,
                           timeout=self.connect_timeout, banner_timeout=self.connect_timeout,
                           auth_timeout=self.connect_timeout, channel_timeout=self.connect_timeout)
            transport = client.get_transport()
            transport.set_keepalive(30)
            transport.default_window_size = 64 * 1024 * 1024  # paramiko's 2 MiB default window halves throughput
            self._sftp_client = client.open_sftp()
            self._sftp_client.get_channel().settimeout(max(self.connect_timeout, 60.0))
        except BaseException:
            client.close()
            raise
        self._client = client

    @contextlib.contextmanager
    def _session(self, action: str, key: str) -> Iterator[Any]:
        with self._lock:
            try:
                transport = self._client.get_transport() if self._client is not None else None
                if transport is None or not transport.is_active():
                    self.close()
                    self._connect()
                yield self._sftp_client
            except StorageError as exc:
                if exc.transient:
                    self.close()
                raise
            except Exception as exc:
                error = self._error(exc, action, key)
                if error.transient:
                    self.close()
                raise error from None

    def _error(self, exc: Exception, action: str, key: str) -> StorageError:
        import paramiko

        where = f"{self.name}: cannot {action} {self.describe(key)}"
        endpoint = f"{self.user}@{self.host}:{self.port}"
        if isinstance(exc, _UnknownHostKey):
            return StorageError(f"{where}: {exc}", hint=f"check the host's fingerprint, then add it "
                                                        f"(ssh-keyscan -p {self.port} {self.host})")
        if isinstance(exc, paramiko.BadHostKeyException):
            return StorageError(f"{where}: the host key of {self.host}:{self.port} does not match known_hosts",
                                hint="the host was reinstalled, or someone is intercepting the connection")
        if isinstance(exc, paramiko.AuthenticationException):
            return StorageError(f"{where}: authentication failed for {endpoint} ({type(exc).__name__})",
                                hint="check key_file (or the ssh-agent) and the remote authorized_keys")
        if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError):
            return TransientStorageError(f"{where}: cannot connect to {self.host}:{self.port} (connection refused)")
        if isinstance(exc, (ConnectionError, TimeoutError, socket.timeout, socket.gaierror, EOFError,
                            paramiko.SSHException)):
            return TransientStorageError(f"{where}: connection to {self.host}:{self.port} failed "
                                         f"({type(exc).__name__}: {exc})")
        if isinstance(exc, OSError):
            if exc.errno == errno.ENOENT:
                return StorageError(f"{where}: no such file or folder on {self.host}")
            if exc.errno in (errno.EACCES, errno.EPERM):
                return StorageError(f"{where}: permission denied on {self.host}",
                                    hint=f"check that {self.user} may write under {self.path}")
            return StorageError(f"{where}: {exc.strerror or exc}")
        return StorageError(f"{where}: {type(exc).__name__}: {exc}")

    # --- paths -----------------------------------------------------------------------------------------------

    def _full(self, key: str) -> str:
        return posixpath.join(self.path, check_key(self.name, key))

    @staticmethod
    def _stat(sftp: Any, path: str) -> Any | None:
        try:
            return sftp.stat(path)
        except FileNotFoundError:
            return None

    def _makedirs(self, sftp: Any, folder: str) -> None:
        missing = []
        while folder not in ("", "/", ".") and self._stat(sftp, folder) is None:
            missing.append(folder)
            folder = posixpath.dirname(folder)
        for path in reversed(missing):
            try:
                sftp.mkdir(path, DIR_MODE)
            except OSError:
                if self._stat(sftp, path) is None:  # not a race with another writer: a real failure
                    raise
            sftp.chmod(path, DIR_MODE)

    def _walk(self, sftp: Any, folder: str, relative: str = "") -> Iterator[tuple[str, Any]]:
        """Yield (relative path, attributes) of every file under a remote folder."""
        for entry in sorted(sftp.listdir_attr(folder), key=lambda e: e.filename):
            rel = f"{relative}{entry.filename}"
            if statmod.S_ISDIR(entry.st_mode):
                yield from self._walk(sftp, posixpath.join(folder, entry.filename), rel + "/")
            else:
                yield rel, entry

    def _info(self, sftp: Any, key: str, path: str, attrs: Any) -> ObjectInfo:
        size = attrs.st_size
        if statmod.S_ISDIR(attrs.st_mode):
            size = sum(entry.st_size for _, entry in self._walk(sftp, path))
        return ObjectInfo(key=key, size=size, modified=datetime.fromtimestamp(attrs.st_mtime, UTC))

    # --- transfers ---------------------------------------------------------------------------------------------

    def _send(self, sftp: Any, source: Path, remote: str) -> str:
        """Write a local file to a new remote file (0600 before its first byte); return its SHA-256."""
        with sftp.open(remote, "wbx") as out:
            sftp.chmod(remote, FILE_MODE)
            out.set_pipelined(True)
            with open(source, "rb") as raw:
                reader = HashingReader(raw)
                while chunk := reader.read(CHUNK):
                    out.write(chunk)
        return reader.hexdigest()

    def _receive(self, sftp: Any, remote: str, size: int, writer: HashingWriter) -> None:
        """Stream a remote file into `writer`, asking for at most READ_WINDOW bytes ahead."""
        with sftp.open(remote, "rb") as f:
            offset = 0
            while offset < size:
                window = [(start, min(CHUNK, size - start))
                          for start in range(offset, min(size, offset + READ_WINDOW), CHUNK)]
                for data in f.readv(window):
                    writer.write(data)
                offset = window[-1][0] + window[-1][1]
            if f.read(1):
                raise StorageError(f"{self.name}: {remote} grew while it was read")

    def _remote_hashes(self, sftp: Any, paths: list[str], sizes: list[int]) -> list[str]:
        """Return the SHA-256 of remote files: `sha256sum` on the host, else read back over SFTP."""
        if self.remote_sha256sum:
            hashes = []
            for start in range(0, len(paths), HASH_BATCH):
                batch = self._sha256sum(paths[start:start + HASH_BATCH], sum(sizes[start:start + HASH_BATCH]))
                if batch is None:
                    break
                hashes += batch
            else:
                return hashes
        result = []
        for path, size in zip(paths, sizes, strict=True):
            with open(os.devnull, "wb") as sink:
                writer = HashingWriter(sink)
                self._receive(sftp, path, size, writer)
            result.append(writer.hexdigest())
        return result

    def _sha256sum(self, paths: list[str], size: int) -> list[str] | None:
        command = "sha256sum -- " + " ".join(shlex.quote(p) for p in paths)
        timeout = 120.0 + size / (20 * 1024 * 1024)  # generous: hashing runs at hundreds of MB/s
        try:
            _, stdout, _ = self._client.exec_command(command, timeout=timeout)
            output = stdout.read().decode(errors="replace")
            status = stdout.channel.recv_exit_status()
        except (OSError, EOFError) as exc:
            raise TransientStorageError(f"{self.name}: running sha256sum on {self.host} failed ({exc})") from None
        except Exception:  # the server refused the command channel (sftp-only account)
            return None
        lines = output.splitlines()
        if status != 0 or len(lines) != len(paths):
            return None
        hashes = [line.split(" ", 1)[0].lower() for line in lines]
        return hashes if all(len(h) == 64 for h in hashes) else None

    # --- contract ----------------------------------------------------------------------------------------------

    def put(self, source: Path, key: str, sha256: str | None = None, *, replace: bool = False) -> ObjectInfo:
        """Store a file or folder under a new `key` (see `pgbeat.storage.base`): upload to a hidden name,
        check it with the remote `sha256sum`, then rename it into place."""
        final = self._full(key)
        source = Path(source)
        parent, base = posixpath.split(final)
        with self._session("put", key) as sftp:
            existing = self._stat(sftp, final)
            if existing is not None and not (replace and not statmod.S_ISDIR(existing.st_mode)
                                             and not source.is_dir()):
                raise StorageError(f"{self.name}: refusing to overwrite existing {self.describe(key)}")
            self._makedirs(sftp, parent)
            staged = posixpath.join(parent, staging_name(base))
            try:
                if source.is_dir():
                    sftp.mkdir(staged, DIR_MODE)
                    sftp.chmod(staged, DIR_MODE)
                    files = folder_files(source)
                    for relative, _ in files:
                        self._makedirs(sftp, posixpath.dirname(posixpath.join(staged, relative)))
                    sent = [self._send(sftp, path, posixpath.join(staged, rel)) for rel, path in files]
                    sizes = [path.stat().st_size for _, path in files]
                    remote = self._remote_hashes(sftp, [posixpath.join(staged, rel) for rel, _ in files], sizes)
                    bad = [rel for (rel, _), a, b in zip(files, sent, remote, strict=True) if a != b]
                    if bad:
                        raise TransientStorageError(f"{self.name}: {', '.join(bad[:5])} of {self.describe(key)} "
                                                    "arrived damaged (remote SHA-256 differs); nothing was stored")
                    digest = None
                else:
                    digest = self._send(sftp, source, staged)
                    if sha256 is not None and digest != sha256.lower():
                        raise StorageError(f"{self.name}: the file for {self.describe(key)} does not hash to the "
                                           "SHA-256 given (it changed while uploading?); nothing was stored")
                    size = sftp.stat(staged).st_size
                    [remote_digest] = self._remote_hashes(sftp, [staged], [size])
                    if remote_digest != digest:
                        raise TransientStorageError(f"{self.name}: {self.describe(key)} arrived damaged (remote "
                                                    "SHA-256 differs); nothing was stored")
                try:
                    if replace and not source.is_dir():
                        sftp.posix_rename(staged, final)  # OpenSSH's atomic rename over an existing file
                    else:
                        sftp.rename(staged, final)
                except OSError:
                    if self._stat(sftp, final) is None:
                        raise
                    raise StorageError(f"{self.name}: refusing to overwrite existing {self.describe(key)}") from None
            except BaseException:
                with contextlib.suppress(Exception):
                    self._remove_tree(sftp, staged)
                raise
            info = self._info(sftp, key, final, sftp.stat(final))
        return ObjectInfo(key=key, size=info.size, modified=info.modified, sha256=digest)

    def get(self, key: str, dest: Path) -> None:
        source = self._full(key)
        dest = Path(dest)
        with self._session("get", key) as sftp:
            attrs = self._stat(sftp, source)
            if attrs is None:
                raise StorageError(f"{self.name}: {self.describe(key)} does not exist")
            if not statmod.S_ISDIR(attrs.st_mode):
                self._get_file(sftp, key, source, attrs.st_size, dest)
                return
            staged = partial_name(dest)
            remove_path(staged)
            staged.mkdir(mode=DIR_MODE, parents=True)
            try:
                for relative, entry in self._walk(sftp, source):
                    target = staged / relative
                    target.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
                    self._get_file(sftp, f"{key}/{relative}", posixpath.join(source, relative), entry.st_size,
                                   target)
                if dest.exists():
                    raise StorageError(f"{self.name}: cannot restore {self.describe(key)}: {dest} exists")
                os.rename(staged, dest)
            finally:
                remove_path(staged)

    def load(self, key: str, open_sink: Callable[[], S]) -> S:
        """Stream the stored file `key` (a file, or a file of a folder) into a new sink."""
        path = self._full(key)
        with self._session("load", key) as sftp:
            attrs = self._stat(sftp, path)
            if attrs is None or statmod.S_ISDIR(attrs.st_mode):
                raise StorageError(f"{self.name}: {self.describe(key)} does not exist"
                                   + (" as a file" if attrs is not None else ""))
            sink = open_sink()
            self._receive(sftp, path, attrs.st_size, counted(sink))
        return sink

    def _get_file(self, sftp: Any, key: str, remote: str, size: int, dest: Path) -> None:
        staged = partial_name(dest)
        try:
            with open_private(staged) as out:
                writer = HashingWriter(out)
                self._receive(sftp, remote, size, writer)
                out.flush()
                os.fsync(out.fileno())
            problems = compare(writer.size, None, size, None)
            if problems:
                raise TransientStorageError(f"{self.name}: reading {self.describe(key)}: {'; '.join(problems)}")
            os.replace(staged, dest)
        finally:
            staged.unlink(missing_ok=True)

    def stat(self, key: str) -> ObjectInfo | None:
        path = self._full(key)
        with self._session("stat", key) as sftp:
            attrs = self._stat(sftp, path)
            return None if attrs is None else self._info(sftp, key, path, attrs)

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        clean = check_key(self.name, prefix, allow_empty=True)
        folder = posixpath.join(self.path, clean) if clean else self.path
        with self._session("list", prefix or "/") as sftp:
            try:
                entries = sftp.listdir_attr(folder)
            except FileNotFoundError:
                return []
            infos = []
            for entry in entries:
                if is_staging(entry.filename):
                    continue
                key = f"{clean}/{entry.filename}" if clean else entry.filename
                infos.append(self._info(sftp, key, posixpath.join(folder, entry.filename), entry))
        return sorted(infos, key=lambda info: info.key)

    def walk(self, prefix: str) -> list[ObjectInfo]:
        folder = self._full(prefix)
        with self._session("list", prefix) as sftp:
            try:
                found = list(self._walk(sftp, folder))
            except FileNotFoundError:
                return []
        return [ObjectInfo(key=f"{prefix}/{rel}", size=attrs.st_size,
                           modified=datetime.fromtimestamp(attrs.st_mtime, UTC))
                for rel, attrs in found if not any(is_staging(part) for part in rel.split("/"))]

    def delete(self, key: str) -> None:
        path = self._full(key)
        with self._session("delete", key) as sftp:
            attrs = self._stat(sftp, path)
            if attrs is None:
                return
            if statmod.S_ISDIR(attrs.st_mode):
                parent, base = posixpath.split(path)
                doomed = posixpath.join(parent, staging_name(base, "deleting"))
                sftp.rename(path, doomed)  # the folder stops being a backup at once
                self._remove_tree(sftp, doomed)
            else:
                with contextlib.suppress(FileNotFoundError):
                    sftp.remove(path)

    def _remove_tree(self, sftp: Any, path: str) -> None:
        attrs = self._stat(sftp, path)
        if attrs is None:
            return
        if not statmod.S_ISDIR(attrs.st_mode):
            sftp.remove(path)
            return
        for entry in sftp.listdir_attr(path):
            self._remove_tree(sftp, posixpath.join(path, entry.filename))
        sftp.rmdir(path)

    def verify(self, key: str, size: int, sha256: str | None, deep: bool = False) -> None:
        """Check size and SHA-256 of the remote copy: shallow runs `sha256sum` on the host (or reads the file
        back where it cannot), deep always reads it back. A folder's total size is checked (deep also reads
        every file)."""
        path = self._full(key)
        with self._session("verify", key) as sftp:
            attrs = self._stat(sftp, path)
            if attrs is None:
                raise StorageError(f"{self.name}: {self.describe(key)} does not exist")
            if statmod.S_ISDIR(attrs.st_mode):
                files = list(self._walk(sftp, path))
                problems = compare(sum(entry.st_size for _, entry in files), None, size, None)
                if deep and not problems:
                    for relative, entry in files:
                        with open(os.devnull, "wb") as sink:
                            self._receive(sftp, posixpath.join(path, relative), entry.st_size, HashingWriter(sink))
            else:
                problems = compare(attrs.st_size, None, size, None)
                if not problems and (sha256 or deep):
                    if deep:
                        with open(os.devnull, "wb") as sink:
                            writer = HashingWriter(sink)
                            self._receive(sftp, path, attrs.st_size, writer)
                        found = writer.hexdigest()
                    else:
                        [found] = self._remote_hashes(sftp, [path], [attrs.st_size])
                    problems = compare(None, found, None, sha256)
        if problems:
            raise mismatch(self.describe(key), problems)
