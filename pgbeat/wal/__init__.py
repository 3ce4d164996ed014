"""Continuous WAL archiving for point-in-time recovery: `pgbeat wal-push` (archive_command), `pgbeat
wal-fetch` (restore_command) and `pgbeat check`.

- `archive`: the archive's layout, pushing a WAL file (locally, then to every destination) and fetching one;
- `check`: forcing a segment switch on a target and waiting for the segment to reach the archive.

Both run once per WAL file from PostgreSQL, as its own user: they import only what the target needs
(no Celery, no rich; a destination's SDK only when it has one).
"""
