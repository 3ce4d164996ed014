"""Continuous WAL archiving for point-in-time recovery: `pgbeat wal-push` (archive_command), `pgbeat
wal-fetch` (restore_command) and `pgbeat check`.

- `archive`: the archive's layout, pushing a WAL file (locally, then to every destination) and fetching one;
- `check`: forcing a segment switch on a target and waiting for the segment to reach the archive;
- `archiver`: reading a server's own account of its archiving (pg_stat_archiver, the WAL file being written);
- `walk`: how far the local archive goes without a gap (the restorable window), and its newest segment.

wal-push and wal-fetch run once per WAL file from PostgreSQL, as its own user: they import only what the target needs
(no Celery, no rich; a destination's SDK only when it has one).
"""
