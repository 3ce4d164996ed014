"""A database server's globals: roles, memberships, role settings and tablespaces, which no pg_dump holds.

Every logical backup carries the globals of its server in a small file of its own (`pg_dumpall
--globals-only`, compressed like the backup, 0600: it holds the roles' password hashes), so that it can
be restored onto a fresh server without recreating its roles by hand. pg_dumpall reads the password hashes
from pg_authid, which only a superuser may read: for any other backup user the file is made with
`--no-role-passwords`, and the backup says so in a warning.

Applying them (`pgbeat restore --with-globals`) never drops or alters what the destination has: the
`CREATE ROLE` and `ALTER ROLE` lines (attributes, password, settings) of roles that exist there, and the
`CREATE TABLESPACE` of tablespaces that exist, are left out; the roles it lacks are created with their
settings, and memberships are added.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import zstandard
from isal import isal_zlib

from pgbeat.catalog.manifest import GlobalsInfo
from pgbeat.errors import DumpError, PgbeatError, VerifyError
from pgbeat.fsutil import disk_error, open_private, remove_path
from pgbeat.postgres.process import CancelEvent, Supervised, last_error_line
from pgbeat.settings import Target
from pgbeat.steps.compress import BlockWriter, decompressing_reader

if TYPE_CHECKING:
    import psycopg

CLOSING_LINE = b"-- PostgreSQL database cluster dump complete"
NO_PASSWORDS_WARNING = ("the backup user is not a superuser: the globals were dumped with --no-role-passwords "
                        "(roles restored from them have no password)")
# A role or tablespace name as pg_dumpall writes it: bare, or double-quoted with "" for a quote.
_NAME = r'(?P<name>"(?:[^"]|"")+"|[^\s";]+)'
CREATE_ROLE_RE = re.compile(rf"^CREATE ROLE {_NAME};$")
ALTER_ROLE_RE = re.compile(rf"^ALTER ROLE {_NAME} ")  # WITH attributes, SET settings (IN DATABASE too)
CREATE_TABLESPACE_RE = re.compile(rf"^CREATE TABLESPACE {_NAME} ")
# The roles and objects of the database whose owner or grantees a restore needs (system schemas aside).
USED_ROLES_SQL = """
WITH user_namespaces AS (
    SELECT oid, nspowner, nspacl FROM pg_namespace
    WHERE nspname NOT IN ('pg_catalog', 'information_schema') AND nspname NOT LIKE 'pg\\_toast%%'
      AND nspname NOT LIKE 'pg\\_temp\\_%%'
), used AS (
    SELECT nspowner AS role FROM user_namespaces
    UNION SELECT (aclexplode(nspacl)).grantee FROM user_namespaces WHERE nspacl IS NOT NULL
    UNION SELECT relowner FROM pg_class WHERE relnamespace IN (SELECT oid FROM user_namespaces)
    UNION SELECT (aclexplode(relacl)).grantee FROM pg_class
          WHERE relacl IS NOT NULL AND relnamespace IN (SELECT oid FROM user_namespaces)
    UNION SELECT proowner FROM pg_proc WHERE pronamespace IN (SELECT oid FROM user_namespaces)
    UNION SELECT typowner FROM pg_type WHERE typnamespace IN (SELECT oid FROM user_namespaces)
)
SELECT DISTINCT r.rolname FROM used JOIN pg_roles r ON r.oid = used.role
WHERE r.rolname NOT LIKE 'pg\\_%%' ORDER BY 1
"""


def unquote(name: str) -> str:
    """A name as pg_dumpall quoted it, as the catalog spells it."""
    return name[1:-1].replace('""', '"') if name.startswith('"') else name


def dumpall_argv(pg_dumpall: str, target: Target, passwords: bool) -> list[str]:
    """The command line of `pg_dumpall --globals-only` for `target`'s server, connecting to its database
    (the one the backup user may surely connect to; pg_dumpall ignores a connection string's dbname)."""
    argv = [pg_dumpall, "--globals-only", "--no-password", "--dbname", target.conninfo(), "-l", target.dbname]
    return argv if passwords else [*argv, "--no-role-passwords"]


def is_superuser(conn: psycopg.Connection) -> bool:
    return bool(conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0])


def used_roles(conn: psycopg.Connection) -> list[str]:
    """The roles that own objects of the connected database or hold grants on them (not the built-in ones)."""
    return [row[0] for row in conn.execute(USED_ROLES_SQL)]


def created_roles(text: str) -> list[str]:
    """The roles a globals file creates."""
    return [unquote(m["name"]) for line in text.splitlines() if (m := CREATE_ROLE_RE.match(line))]


def dump_globals(pg_dumpall: str, target: Target, env: dict[str, str], dest: Path, codec: str, level: int,
                 passwords: bool, used: list[str], cancel: CancelEvent | None = None) -> GlobalsInfo:
    """Run pg_dumpall --globals-only for `target`'s server and write its output compressed with `codec` into
    a new 0600 file `dest`; return its record (`used`: the roles the backup's objects need).
    Raise DumpError (nothing left at `dest`) if pg_dumpall fails or its output lacks its closing line."""
    proc = Supervised(dumpall_argv(pg_dumpall, target, passwords), env=env, cancel=cancel, name="pg_dumpall")
    try:
        text = proc.stdout.read()
        rc = proc.wait()
    finally:
        proc.stop()
    if rc != 0 or CLOSING_LINE not in text:
        raise DumpError(f"pg_dumpall --globals-only of {target.describe()} failed with exit code {rc}",
                        step="dump", details=proc.stderr_text()[-8:] or ["(its output lacks the closing line)"],
                        reason=last_error_line(proc.stderr_text()))
    try:
        with open_private(dest) as raw:
            if codec == "none":
                raw.write(text)
            else:
                writer = BlockWriter(raw, codec, level, 1)
                writer.write(text)
                writer.close()
    except OSError as exc:
        remove_path(dest)
        raise disk_error(exc, dest) from None
    data = dest.read_bytes()
    return GlobalsInfo(file=dest.name, size=len(data), sha256=hashlib.sha256(data).hexdigest(), passwords=passwords,
                       roles=created_roles(text.decode()), used_roles=used)


def read_globals(path: Path, codec: str) -> str:
    """The SQL text of a (plaintext) globals file; raise VerifyError if it does not decompress or is cut short."""
    try:
        with decompressing_reader(path, codec) as f:
            data = f.read()
    except (OSError, EOFError, ValueError, isal_zlib.error, zstandard.ZstdError) as exc:
        raise VerifyError(f"{path.name} does not decompress: {exc}", step="verify",
                          hint="the globals file is damaged") from None
    if CLOSING_LINE not in data:
        raise VerifyError(f"{path.name} lacks pg_dumpall's closing line (truncated)", step="verify",
                          hint="the globals file is damaged")
    return data.decode()


@dataclass
class GlobalsApplied:
    """What applying a globals file did: roles created, roles that existed (left as they were), errors."""

    created: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def without_existing(text: str, roles: set[str], tablespaces: set[str]) -> tuple[str, list[str]]:
    """Given a globals file's text and the roles and tablespaces a server has, return the text without the
    lines that would create or change them (pg_dumpall writes each such statement on one line), and the
    existing roles it names."""
    kept, existing = [], []
    for line in text.splitlines(keepends=True):
        role = CREATE_ROLE_RE.match(line.rstrip("\n")) or ALTER_ROLE_RE.match(line)
        space = CREATE_TABLESPACE_RE.match(line)
        if role and unquote(role["name"]) in roles:
            if line.startswith("CREATE"):
                existing.append(unquote(role["name"]))
            continue
        if space and unquote(space["name"]) in tablespaces:
            continue
        kept.append(line)
    return "".join(kept), existing


def apply_globals(psql: str, target: Target, env: dict[str, str], text: str,
                  conn: psycopg.Connection) -> GlobalsApplied:
    """Apply a globals file's `text` to `target`'s server with psql, leaving out the roles and tablespaces it
    has (`without_existing`). A statement that fails (a membership granted by a role the server lacks, a
    setting in a database it has not) does not stop the rest: its error is returned, and the restore's
    check of the roles it needs decides whether that matters."""
    roles = {row[0] for row in conn.execute("SELECT rolname FROM pg_roles")}
    tablespaces = {row[0] for row in conn.execute("SELECT spcname FROM pg_tablespace")}
    sql_text, existing = without_existing(text, roles, tablespaces)
    argv = [psql, "-X", "-q", "-v", "ON_ERROR_STOP=0", "--no-password", "--dbname", target.conninfo()]
    proc = Supervised(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, name="psql")
    try:
        try:
            proc.proc.stdin.write(sql_text.encode())
            proc.proc.stdin.close()
        except BrokenPipeError:
            pass  # psql is gone: its exit code and stderr say why
        rc = proc.wait()
    finally:
        proc.stop()
    if rc != 0:
        raise PgbeatError(f"psql stopped with exit code {rc} while applying the globals",
                           details=proc.stderr_text()[-8:], reason=last_error_line(proc.stderr_text()))
    after = {row[0] for row in conn.execute("SELECT rolname FROM pg_roles")}
    return GlobalsApplied(created=sorted(after - roles), existing=existing,
                          errors=[line for line in proc.stderr_text() if "ERROR" in line])
