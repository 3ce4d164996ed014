"""Talking to a target's server: libpq environments for client programs, and psycopg connections.

The password never appears on a command line, and on Linux not on disk either: client programs get a
passfile that lives only in this process's memory (a `memfd_create` file, mode 0600, which libpq opens as
PGPASSFILE=/proc/<pid>/fd/<n>; it vanishes with this process, and `pg_dump -j`'s workers, forked from
pg_dump, open the same path). Where that is not available, a private 0600 passfile in the run's work
folder is the fallback (removed after use, and swept with the folder if the process is killed).
psycopg gets the password as a keyword. Without a configured password, libpq's own ~/.pgpass /
PGPASSFILE apply.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from pgbeat.errors import PgbeatError
from pgbeat.fsutil import open_private, private_dir
from pgbeat.settings import Target

if TYPE_CHECKING:
    import psycopg
    from psycopg import sql

MAINTENANCE_DB = "postgres"


# One in-memory passfile per password and process, open for the process's lifetime (a handful of fds):
# (pid, SHA-256 of the content) -> fd. Keyed by pid, so a forked child makes its own.
_memory_passfiles: dict[tuple[int, str], int] = {}


def memory_passfile(content: str) -> str | None:
    """Given a passfile's text, return a path libpq can open that reads it from this process's memory, or
    None where that is impossible (no memfd_create or no /proc): then the caller writes a file."""
    key = (os.getpid(), hashlib.sha256(content.encode()).hexdigest())
    fd = _memory_passfiles.get(key)
    if fd is None:
        if not hasattr(os, "memfd_create"):
            return None
        try:
            fd = os.memfd_create("pgbeat-passfile", os.MFD_CLOEXEC)
        except OSError:
            return None
        try:
            os.fchmod(fd, 0o600)  # libpq ignores a passfile that others may read
            data = content.encode()
            while data:
                data = data[os.write(fd, data):]
        except OSError:
            os.close(fd)
            return None
        _memory_passfiles[key] = fd
    path = f"/proc/{os.getpid()}/fd/{fd}"
    return path if os.path.exists(path) else None


def client_env(target: Target, folder: Path) -> dict[str, str]:
    """Return the environment for a libpq client of `target`: the password in an in-memory passfile, or,
    where there is none, in a private passfile written into `folder`."""
    env = {k: v for k, v in os.environ.items() if k not in ("PGPASSWORD", "PGSERVICE")}
    if target.password is not None:
        secret = target.password.get_secret_value().replace("\\", "\\\\").replace(":", "\\:")
        content = f"*:*:*:*:{secret}\n"
        path = memory_passfile(content)
        if path is None:
            passfile = private_dir(folder) / ".pgpass"
            with open_private(passfile, "w") as f:
                f.write(content)
            path = str(passfile)
        env["PGPASSFILE"] = path
    elif target.passfile is not None:
        env["PGPASSFILE"] = str(target.passfile.expanduser())
    return env


def connect(target: Target, dbname: str | None = None, autocommit: bool = True) -> psycopg.Connection:
    """Connect to `target` (or another database on its server); raise PgbeatError with libpq's reason."""
    import psycopg  # imported here: a backup without restore or checks never needs it

    kwargs: dict = {"autocommit": autocommit}
    if target.password is not None:
        kwargs["password"] = target.password.get_secret_value()
    elif target.passfile is not None:
        kwargs["passfile"] = str(target.passfile.expanduser())
    on = target if dbname is None else target.model_copy(update={"dbname": dbname})
    try:
        return psycopg.connect(on.conninfo(), **kwargs)
    except psycopg.Error as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise PgbeatError(f"Cannot connect to {on.describe()}: {reason}") from None


def database_exists(conn: psycopg.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None


def ident(name: str) -> sql.Identifier:
    from psycopg import sql

    return sql.Identifier(name)
