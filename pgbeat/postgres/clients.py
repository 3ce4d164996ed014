"""Which PostgreSQL client programs talk to which server: the right major for each target.

pg_dump refuses a server newer than itself ("aborting because of server version mismatch") and dumps
every older one; pg_restore and psql read what an older pg_dump wrote; pg_basebackup wants its own major
or newer. So for a server of major N the client is, in this order:
1. the target's `pg_bin_dir` (or the global one, for every target that sets none), if its pg_dump is of
   major N or newer, else an error saying so: a folder the operator named is never silently passed over;
2. the client of major N from the install roots in `pg_bin_dirs` (templates such as
   `/usr/lib/postgresql/{major}/bin`, plain folders, and the words `pg_config` and `PATH`);
3. the newest installed client newer than N, with a note saying so (recorded with the backup);
4. else a PgbeatError naming the majors found and the package to install.

What is installed is found by looking at folders (cheap), and each program's `--version` is asked once per
process: the answer is cached under the program's path and stat, so a client upgraded in place is
asked again.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pgbeat.errors import PgbeatError

if TYPE_CHECKING:
    import psycopg

    from pgbeat.settings import Settings, Target

# The words of `pg_bin_dirs` that are not folders: the bin folder `pg_config --bindir` names, and the
# folder of the program found on PATH.
PG_CONFIG, ON_PATH = "pg_config", "PATH"
MAJOR_FIELD = "{major}"
DEFAULT_PG_BIN_DIRS = ("/usr/lib/postgresql/{major}/bin", "/usr/pgsql-{major}/bin", PG_CONFIG, ON_PATH)
VERSION_RE = re.compile(r"\(PostgreSQL\)\s+(\d+(?:\.\d+)*)|(\d+(?:\.\d+)+)")


@dataclass(frozen=True)
class Client:
    """An installed set of PostgreSQL programs: their folder, and the version its defining program reports."""

    bin_dir: Path
    major: int
    version: str  # "15.19", "18.1"

    def program(self, name: str) -> str:
        """Return the path of program `name` of this client; raise PgbeatError if this folder lacks it."""
        path = self.bin_dir / name
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise PgbeatError(f"{name} not found in {self.bin_dir} (PostgreSQL {self.version})",
                              hint=f"install the PostgreSQL {self.major} package that has {name}")
        return str(path)


@dataclass(frozen=True)
class ClientChoice:
    """The client chosen for a server (or a backup) of major `wanted`, and why, when it is not that major."""

    client: Client
    wanted: int
    note: str | None = None  # e.g. "no PostgreSQL 15 client installed: used 18.1 (/usr/lib/...)"

    def program(self, name: str) -> str:
        return self.client.program(name)


def major_of(version: str) -> int:
    """The major of a version string: "15.19" -> 15, "18beta1" -> 18, "9.6.24" -> 9 (near enough for what
    dumps what: pgbeat supports no server older than 10)."""
    match = re.match(r"\d+", version.strip())
    if match is None:
        raise ValueError(f"not a PostgreSQL version: {version!r}")
    return int(match.group())


def recorded_major(version: str | None) -> int:
    """The major of the pg_dump version a manifest records, 0 when unknown: the field is outside the seal
    (pgbeat.catalog.manifest.UNSEALED), so a missing or damaged value means "not known", never a crash."""
    try:
        return major_of(version) if version else 0
    except ValueError:
        return 0


def server_major(conn: psycopg.Connection) -> int:
    """The major of the server `conn` is connected to, from server_version_num (which libpq learns at
    connection time: no query)."""
    return conn.info.server_version // 10000


def server_version(conn: psycopg.Connection) -> str:
    """The server's version as it spells it ("15.19", "18.1 (Debian 18.1-1)" shortened to "18.1")."""
    return str(conn.info.parameter_status("server_version") or "").split()[0] or str(conn.info.server_version)


# --- finding what is installed --------------------------------------------------------------------------

# (path, inode, size, mtime) of a program -> the version it reported (None: it did not say one).
_versions: dict[tuple[str, int, int, int], str | None] = {}
# (pg_config's path, inode, mtime) -> the folder it names.
_pg_config_dirs: dict[tuple[str, int, int], Path | None] = {}
# (a template, the inode and mtime of the folder its majors are listed in) -> the folders it matched: a
# major installed or removed changes that folder's mtime, and so the key.
_listings: dict[tuple[str, int, int], list[Path]] = {}


def program_version_at(path: Path) -> str | None:
    """The version `path --version` reports ("18.1"), asked once per program and process; None if it
    does not run or says no version."""
    try:
        st = path.stat()
    except OSError:
        return None
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _versions:
        try:
            out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        match = VERSION_RE.search(out)
        _versions[key] = (match.group(1) or match.group(2)) if match else None
    return _versions[key]


def _pg_config_bindir() -> Path | None:
    pg_config = shutil.which(PG_CONFIG)
    if pg_config is None:
        return None
    st = os.stat(pg_config)
    key = (pg_config, st.st_ino, st.st_mtime_ns)
    if key not in _pg_config_dirs:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True)
            _pg_config_dirs[key] = Path(out.stdout.strip())
        except (subprocess.SubprocessError, OSError):
            _pg_config_dirs[key] = None
    return _pg_config_dirs[key]


def candidate_dirs(entry: str, program: str) -> list[Path]:
    """The folders one entry of `pg_bin_dirs` stands for: a template's every installed major (newest
    first), a plain folder, pg_config's bin folder, or the folder of `program` on PATH."""
    if entry == PG_CONFIG:
        found = _pg_config_bindir()
        return [found] if found else []
    if entry == ON_PATH:
        on_path = shutil.which(program)
        return [Path(on_path).resolve().parent] if on_path else []
    if MAJOR_FIELD not in entry:
        return [Path(entry).expanduser()]
    # `{major}` stands for the digits of one installed major: list the folders, never run anything here.
    head, tail = entry.split(MAJOR_FIELD, 1)
    try:
        listed = os.stat(os.path.dirname(head) or ".")
    except OSError:
        return []
    key = (entry, listed.st_ino, listed.st_mtime_ns)
    if key not in _listings:
        pattern = re.compile(re.escape(head) + r"(\d+)" + re.escape(tail.replace(MAJOR_FIELD, "")) + r"/?$")
        found = [(int(m.group(1)), Path(p)) for p in glob.glob(glob.escape(head) + "*" + glob.escape(tail))
                 if (m := pattern.match(p))]
        _listings[key] = [path for _major, path in sorted(found, key=lambda item: -item[0])]
    return _listings[key]


def client_at(bin_dir: Path, program: str = "pg_dump") -> Client | None:
    """The client in `bin_dir`, by the version its `program` reports; None if there is none."""
    path = bin_dir / program
    if not (path.is_file() and os.access(path, os.X_OK)):
        return None
    version = program_version_at(path)
    return Client(bin_dir, major_of(version), version) if version else None


def installed_clients(entries: Sequence[str], program: str = "pg_dump") -> list[Client]:
    """Every client found through `entries` (the `pg_bin_dirs` setting), in their order, each folder once."""
    clients, seen = [], set()
    for entry in entries:
        for folder in candidate_dirs(entry, program):
            real = os.path.realpath(folder)
            if real in seen:
                continue
            seen.add(real)
            client = client_at(folder, program)
            if client is not None:
                clients.append(client)
    return clients


# --- choosing -------------------------------------------------------------------------------------------


def install_hint(major: int) -> str:
    return (f"install PostgreSQL {major}'s client programs (Debian/Ubuntu: postgresql-client-{major}, from "
            f"apt.postgresql.org; RHEL: postgresql{major}) or a newer major's, or point pg_bin_dir at them")


def choose_client(pinned: Path | None, entries: Sequence[str], wanted: int, what: str,
                  program: str = "pg_dump") -> ClientChoice:
    """Given the folder a target pins (its pg_bin_dir, else the global one), the install roots and the
    `wanted` major (the server's, or the major a backup was dumped with), return the client to use: the
    pinned one, else the same major, else the newest newer one (with a note). `what` names the server or
    backup in messages. Raise PgbeatError if the pinned folder has no client or an older one, or if no
    installed client is of major `wanted` or newer."""
    if pinned is not None:
        client = client_at(Path(pinned), program)
        if client is None:
            raise PgbeatError(f"pg_bin_dir {pinned} has no {program} for {what}",
                              hint="point pg_bin_dir at the bin folder of a PostgreSQL installation")
        if client.major < wanted:
            raise PgbeatError(f"{program} {client.version} in pg_bin_dir {pinned} is older than {what} (PostgreSQL "
                              f"{wanted}): {program} refuses a newer server", hint=install_hint(wanted))
        return ClientChoice(client, wanted)  # newer or not, the operator's choice needs no note
    clients = installed_clients(entries, program)
    for client in clients:
        if client.major == wanted:
            return ClientChoice(client, wanted)
    newer = [client for client in clients if client.major > wanted]
    if newer:
        newest = max(newer, key=lambda c: c.major)  # the first of the newest major, in the roots' order
        return ClientChoice(newest, wanted, f"no PostgreSQL {wanted} client installed: used {program} "
                                            f"{newest.version} ({newest.bin_dir}), which reads older servers")
    found = ", ".join(f"{c.major} ({c.bin_dir})" for c in clients) or "none"
    raise PgbeatError(f"No PostgreSQL client of major {wanted} or newer for {what}; majors found: {found}",
                      hint=install_hint(wanted))


def pinned_dir(settings: Settings, target: Target | None) -> Path | None:
    """The folder a target pins: its own pg_bin_dir, else the global one (PGBEAT_PG_BIN_DIR), else None."""
    own = target.pg_bin_dir if target is not None else None
    return own or settings.pg_bin_dir


def client_for_major(settings: Settings, target: Target | None, wanted: int, what: str,
                     program: str = "pg_dump") -> ClientChoice:
    """The client for a server or backup of major `wanted` under `target`'s settings (see choose_client)."""
    return choose_client(pinned_dir(settings, target), settings.pg_bin_dirs, wanted, what, program)


def archive_reader(settings: Settings, target: Target | None, dumped_with: str | None) -> ClientChoice:
    """The client whose pg_restore reads an archive written by pg_dump `dumped_with` ("18.1"): of that
    major or newer (pg_restore refuses an archive of a newer format). A backup whose pg_dump version is
    not recorded gets the newest installed client, which reads every older archive."""
    wanted = recorded_major(dumped_with)
    what = f"a backup made by pg_dump {dumped_with}" if dumped_with else "a backup of an unrecorded pg_dump"
    return client_for_major(settings, target, wanted, what, "pg_restore")


def client_for_server(settings: Settings, target: Target, conn: psycopg.Connection | None = None) -> ClientChoice:
    """Ask `target`'s server its major (on `conn`, else on a connection of its own) and return its client.
    Raise PgbeatError if the server cannot be reached or no client fits."""
    if conn is None:
        from pgbeat.postgres.client import connect

        with connect(target) as conn:
            major = server_major(conn)
    else:
        major = server_major(conn)
    return client_for_major(settings, target, major, f"the server of {target.name} (PostgreSQL {major})")


def server_programs(settings: Settings, major: int, what: str) -> Client:
    """The server programs (pg_ctl, postgres, pg_controldata) of exactly `major`, for a cluster restored
    from a base backup of that major: from the global pg_bin_dir if it is that major, else the install
    roots. Raise PgbeatError naming the majors found otherwise."""
    pinned = settings.pg_bin_dir
    clients = ([c for c in [client_at(Path(pinned), "pg_ctl")] if c] if pinned else []) + \
        installed_clients(settings.pg_bin_dirs, "pg_ctl")
    for client in clients:
        if client.major == major:
            return client
    found = ", ".join(f"{c.major} ({c.bin_dir})" for c in clients) or "none"
    raise PgbeatError(f"{what} needs PostgreSQL {major}'s server programs (pg_ctl); majors found: {found}",
                      hint=f"install PostgreSQL {major} (Debian/Ubuntu: postgresql-{major}; RHEL: "
                           f"postgresql{major}-server) and list its bin folder in pg_bin_dirs")
