"""An error's text is one line that says what failed and why: what Celery records of a failed or retried step
and what Flower shows (its str and repr), while the command line still prints message, details and hint."""

from __future__ import annotations

import pickle

from pgbeat.errors import ConfigError, DumpError, PgbeatError, TransientDumpError, error_from_record
from pgbeat.postgres.process import STDERR_TAIL_LINES
from pgbeat.settings.schema import Target
from pgbeat.steps.dump import classify_failure

REFUSED = ['pg_dump: error: connection to server at "127.0.0.1", port 1 failed: Connection refused',
           "\tIs the server running on that host and accepting TCP/IP connections?"]


def test_the_text_is_the_message_and_its_reason_on_one_line():
    error = TransientDumpError("pg_dump of erp failed with exit code 1", details=REFUSED, reason=REFUSED[0])
    assert str(error) == f"pg_dump of erp failed with exit code 1: {REFUSED[0]}"
    assert repr(error) == f"TransientDumpError({str(error)!r})"
    assert error.message == "pg_dump of erp failed with exit code 1"  # what the CLI and notifications print
    assert error.render().splitlines() == [error.message, *(f"  {line}" for line in REFUSED)]


def test_the_reason_defaults_to_the_first_detail_and_is_never_said_twice():
    assert str(PgbeatError("Backup x failed verification", details=["size differs", "CRC differs"])) == \
        "Backup x failed verification: size differs"
    assert str(PgbeatError("lock held by run 42", reason="run 42")) == "lock held by run 42"
    assert str(PgbeatError("plain")) == "plain"
    assert str(ConfigError(["DB_PORT in .env: not an integer", "x"])) == \
        "Configuration is invalid (2 errors): DB_PORT in .env: not an integer"
    assert "\n" not in str(PgbeatError("two\nlines", reason="and\tmore"))


def test_the_text_survives_pickling_and_the_run_record():
    error = DumpError("pg_dump of erp failed", details=["pg_dump: error: boom"], hint="h")
    again = pickle.loads(pickle.dumps(error))
    assert str(again) == str(error) == "pg_dump of erp failed: pg_dump: error: boom"
    assert again.message == error.message and again.hint == "h"
    assert str(error_from_record(error.to_json())) == str(error)


def test_a_failed_pg_dump_gives_its_error_line_as_the_reason():
    target = Target(name="erp", host="127.0.0.1", port=1, dbname="erp")
    error = classify_failure(target, 1, REFUSED * STDERR_TAIL_LINES)
    assert isinstance(error, TransientDumpError)
    assert str(error) == f"pg_dump of erp ({target.describe()}) failed with exit code 1: {REFUSED[0]}"
    auth = classify_failure(target, 1, ['pg_dump: error: connection to server at "127.0.0.1", port 1 failed: '
                                        'FATAL:  password authentication failed for user "backup"'])
    assert type(auth) is DumpError and str(auth).endswith('FATAL: password authentication failed for user "backup"')
    assert str(classify_failure(target, 1, [])).endswith("(pg_dump wrote nothing on stderr)")
