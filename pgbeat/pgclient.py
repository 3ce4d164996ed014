"""Talking to a target's server: libpq environments for client programs, and psycopg connections.

The password never appears on a command line: client programs get a private 0600 passfile, psycopg
gets it as a keyword. Without a configured password, libpq's own ~/.pgpass / PGPASSFILE apply.
"""

from __future__ import annotations

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


def client_env(target: Target, folder: Path) -> dict[str, str]:
    """Return the environment for a libpq client of `target`, writing a passfile into `folder` if needed."""
    env = {k: v for k, v in os.environ.items() if k not in ("PGPASSWORD", "PGSERVICE")}
    if target.password is not None:
        secret = target.password.get_secret_value().replace("\\", "\\\\").replace(":", "\\:")
        passfile = private_dir(folder) / ".pgpass"
        with open_private(passfile, "w") as f:
            f.write(f"*:*:*:*:{secret}\n")
        env["PGPASSFILE"] = str(passfile)
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
