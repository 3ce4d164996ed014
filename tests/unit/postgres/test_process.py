"""What pgbeat reads out of a PostgreSQL program's stderr: the line that says why it failed."""

from __future__ import annotations

import pytest

from pgbeat.postgres.process import last_error_line


@pytest.mark.parametrize(("stderr", "reason"), [
    # A closed port: the error, not the hint on its indented continuation line.
    (['pg_dump: error: connection to server at "127.0.0.1", port 1 failed: Connection refused',
      "\tIs the server running on that host and accepting TCP/IP connections?"],
     'pg_dump: error: connection to server at "127.0.0.1", port 1 failed: Connection refused'),
    # localhost tried on two addresses: the error line that names the program (both say the same).
    (['pg_dump: error: connection to server at "localhost" (::1), port 1 failed: Connection refused',
      "\tIs the server running on that host and accepting TCP/IP connections?",
      'connection to server at "localhost" (127.0.0.1), port 1 failed: Connection refused',
      "\tIs the server running on that host and accepting TCP/IP connections?"],
     'pg_dump: error: connection to server at "localhost" (::1), port 1 failed: Connection refused'),
    (['pg_dump: error: connection to server at "127.0.0.1", port 5432 failed: FATAL:  password authentication '
      'failed for user "backup"'],
     'pg_dump: error: connection to server at "127.0.0.1", port 5432 failed: FATAL:  password authentication '
     'failed for user "backup"'),
    # A lock timeout: the error, not the query it names after it.
    (["pg_dump: error: query failed: ERROR:  canceling statement due to lock timeout",
      "pg_dump: detail: Query was: LOCK TABLE public.big IN ACCESS SHARE MODE"],
     "pg_dump: error: query failed: ERROR:  canceling statement due to lock timeout"),
    # psql stops at the first error; its LINE and caret lines only point at it.
    (['psql:<stdin>:12: ERROR:  relation "invoices" already exists', "LINE 1: CREATE TABLE invoices (",
      "                     ^", "HINT:  drop it first"],
     'psql:<stdin>:12: ERROR:  relation "invoices" already exists'),
    (["pg_restore: error: could not execute query: ERROR:  out of shared memory", "Command was: CREATE INDEX ..."],
     "pg_restore: error: could not execute query: ERROR:  out of shared memory"),
    # No line says "error": the last plain line.
    (["pg_dump: warning: something odd", "Killed"], "Killed"),
    ([], None),
    (["", "   "], None),
])
def test_the_last_error_line_is_the_reason(stderr, reason):
    assert last_error_line(stderr) == reason
