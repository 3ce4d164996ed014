"""What a target's server says about its own WAL archiving: `pg_stat_archiver` and the WAL file it is
writing, in one query (`ARCHIVER_QUERY`).

`pgbeat check` reads it while it waits for a segment; `pgbeat status` and /metrics read it once per target
with the base tier, beside what this host's archive holds, to show how far archiving is behind and whether
archive_command is failing now. A reading for status or metrics never raises: a server that cannot be
reached gives a reading that says why, with a connect timeout short enough (READ_CONNECT_TIMEOUT_S) that a
scrape with a host down still answers before Prometheus gives up on it; the targets are read in parallel,
so one host down costs a scrape that timeout once, not once per target.

On a standby (`pg_is_in_recovery()`) there is no current WAL file of its own to compare with:
`pg_current_wal_lsn()` raises there, so the query asks for it only on a primary.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from pgbeat.errors import PgbeatError
from pgbeat.settings import Target

if TYPE_CHECKING:
    import psycopg

# Short beside Prometheus's default scrape timeout (10 s), and beside a DBA waiting for `pgbeat status`.
READ_CONNECT_TIMEOUT_S = 3
# A thread and a connection each: a fleet of base-tier targets is read 16 at a time, which keeps a
# scrape with up to 16 hosts down within one timeout without opening a connection per target at once.
MAX_PARALLEL_READS = 16

# CASE evaluates only the branch it takes: pg_current_wal_lsn() is never called on a standby.
ARCHIVER_QUERY = """
SELECT archived_count, last_archived_wal, last_archived_time, failed_count, last_failed_wal, last_failed_time,
       stats_reset, pg_is_in_recovery(),
       CASE WHEN NOT pg_is_in_recovery() THEN pg_walfile_name(pg_current_wal_lsn()) END,
       current_setting('archive_mode'),
       (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size'),
       now()
FROM pg_stat_archiver
"""


@dataclass
class ArchiverReading:
    """One reading of a server's archiver, or, with `reachable` false, why there is none (`error`)."""

    reachable: bool
    error: str | None = None
    archived_count: int = 0
    last_archived_wal: str | None = None
    last_archived_time: datetime | None = None
    failed_count: int = 0
    last_failed_wal: str | None = None
    last_failed_time: datetime | None = None
    stats_reset: datetime | None = None
    in_recovery: bool = False
    current_wal: str | None = None  # the WAL file being written (None on a standby)
    archive_mode: str | None = None  # off, on, always
    segment_size: int | None = None  # bytes (wal_segment_size)
    server_time: datetime | None = None  # the server's now() at the reading

    @property
    def failing(self) -> bool:
        """archive_command failed since it last succeeded: archiving is failing now (PostgreSQL retries the
        same segment, so every later one waits behind it)."""
        if self.last_failed_time is None:
            return False
        return self.last_archived_time is None or self.last_failed_time > self.last_archived_time


def query_archiver(conn: psycopg.Connection) -> ArchiverReading:
    """Read the archiver of the server `conn` is connected to; psycopg's errors pass through."""
    (archived, archived_wal, archived_at, failed, failed_wal, failed_at, reset, in_recovery, current, mode,
     segment_size, now) = conn.execute(ARCHIVER_QUERY).fetchone()
    return ArchiverReading(reachable=True, archived_count=archived, last_archived_wal=archived_wal,
                           last_archived_time=archived_at, failed_count=failed, last_failed_wal=failed_wal,
                           last_failed_time=failed_at, stats_reset=reset, in_recovery=in_recovery,
                           current_wal=current, archive_mode=mode, segment_size=segment_size, server_time=now)


def read_archiver(target: Target) -> ArchiverReading:
    """Connect to `target` (within READ_CONNECT_TIMEOUT_S, or its own connect_timeout if shorter) and read
    its archiver. Never raise: a server that cannot be reached or read gives a reading saying why."""
    import psycopg

    from pgbeat.postgres.client import connect

    quick = target.model_copy(update={"connect_timeout": min(target.connect_timeout, READ_CONNECT_TIMEOUT_S)})
    try:
        with connect(quick) as conn:
            return query_archiver(conn)
    except PgbeatError as exc:  # libpq's reason may span lines (tab-indented): status shows it in one
        return ArchiverReading(reachable=False, error=" ".join(exc.message.split()))
    except psycopg.Error as exc:  # connected, but the query failed (a permission, the server going down)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return ArchiverReading(reachable=False, error=f"cannot read pg_stat_archiver on {target.describe()}: {reason}")


def read_archivers(targets: list[Target]) -> dict[str, ArchiverReading]:
    """Read the archivers of `targets` in parallel; return the readings by target name."""
    from concurrent.futures import ThreadPoolExecutor  # only a fleet with the base tier pays for it

    if not targets:
        return {}
    with ThreadPoolExecutor(max_workers=min(len(targets), MAX_PARALLEL_READS)) as pool:
        return dict(zip([t.name for t in targets], pool.map(read_archiver, targets), strict=True))
