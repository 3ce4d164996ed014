"""Typed errors: a short message, an optional hint, whether retrying can help, and an exit code.

The command line prints `message` (and `HINT: hint`) and exits with `exit_code`; Celery tasks retry
`transient` errors with backoff and fail the chain on the others. No error text ever carries a secret.
"""

from __future__ import annotations

# Documented exit codes of the `pgbeat` command (README, "Exit codes").
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_VERIFY = 3
EXIT_LOCKED = 4
EXIT_UNREACHABLE = 5
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT), as shells report it


class PgbeatError(Exception):
    """Base of every error pgbeat raises on purpose."""

    exit_code = EXIT_FAILED
    transient = False

    def __init__(self, message: str, *, hint: str | None = None, step: str | None = None,
                 details: list[str] | None = None, reason: str | None = None) -> None:
        self.message = message
        self.hint = hint
        self.step = step
        # Extra lines for the reader (for a dump: the last lines of pg_dump's stderr).
        self.details = details or []
        # The cause in one line (pg_dump's error line, the first problem found); by default the first detail.
        self.reason = reason if reason is not None else next(iter(self.details), None)
        # The exception's text (str, repr, and what Celery records and Flower shows of a failed or retried
        # step) is one line that says why, not only what: the message and its reason.
        super().__init__(one_line(message, self.reason))

    def __str__(self) -> str:
        return self.args[0] if self.args else self.message

    def render(self) -> str:
        """Return the message, its details and hint as the lines a user reads."""
        lines = [self.message, *(f"  {line}" for line in self.details)]
        if self.hint:
            lines.append(f"HINT: {self.hint}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"error": type(self).__name__, "message": self.message, "hint": self.hint,
                "step": self.step, "details": self.details, "transient": self.transient}


def one_line(message: str, reason: str | None) -> str:
    """Given an error's message and its reason, return them as one line (the reason left out when the
    message says it already), every run of whitespace one space."""
    text = message if not reason or reason in message else f"{message.rstrip(': ')}: {reason}"
    return " ".join(text.split())


def exit_code_of(error_name: str | None) -> int:
    """Given the class name of a PgbeatError (as `to_json` records it), return that class's exit code;
    EXIT_FAILED for a name that is no PgbeatError known in this process (a KeyError, a lost worker)."""
    pending: list[type[PgbeatError]] = [PgbeatError]
    while pending:
        cls = pending.pop()
        if cls.__name__ == error_name:
            return cls.exit_code
        pending += cls.__subclasses__()
    return EXIT_FAILED


def error_from_record(failure: dict) -> PgbeatError:
    """Given a failure as a run records it (`to_json`, or a run's `failure`: message, details, hint, the
    error's class name, optionally its exit code), return an error that renders and exits as the
    original did."""
    error = PgbeatError(failure.get("message") or "failed", hint=failure.get("hint"), step=failure.get("step"),
                        details=list(failure.get("details") or []))
    error.exit_code = failure.get("exit_code") or exit_code_of(failure.get("error"))
    return error


class ConfigError(PgbeatError):
    """The configuration is invalid; `errors` holds one line per problem, each naming its key and file."""

    exit_code = EXIT_CONFIG

    def __init__(self, errors: list[str], hint: str | None = None) -> None:
        noun = "error" if len(errors) == 1 else "errors"
        super().__init__(f"Configuration is invalid ({len(errors)} {noun}):", hint=hint, details=errors)
        self.errors = errors


class NoTargetsError(ConfigError):
    """No target is configured at all (a command that acts on targets has nothing to act on)."""

    def __init__(self) -> None:
        super().__init__(["no target configured: set DB_NAME (and DB_HOST, ...) in .env, or list targets in the "
                          "file named by PGBEAT_CONFIG"])


class UnknownTargetError(PgbeatError):
    exit_code = EXIT_CONFIG


class UsageError(PgbeatError):
    """The command line asks for something that cannot be done as given (a missing or conflicting argument)."""

    exit_code = EXIT_CONFIG


class NoSuchBackupError(UsageError):
    """The backup named on the command line is not there (a wrong path, not a damaged backup: exit 2)."""


class UnreachableError(PgbeatError):
    """A service the command needs (the broker) cannot be reached."""

    exit_code = EXIT_UNREACHABLE


class NoWorkerError(UnreachableError):
    """No live worker consumes the queue a task is (or would be) waiting in."""


class DumpError(PgbeatError):
    """pg_dump failed; `details` holds the last lines of its stderr."""


class TransientDumpError(DumpError):
    """pg_dump could not reach the server: worth retrying with backoff."""

    transient = True


class VerifyError(PgbeatError):
    """A backup failed verification: truncated, corrupt, checksum mismatch or incomplete dump."""

    exit_code = EXIT_VERIFY


class StorageError(PgbeatError):
    """A destination could not store, read or delete a backup, or its copy does not match (permanent)."""


class TransientStorageError(StorageError):
    """A destination failed in a way worth retrying: connection lost or refused, timeout, 5xx, throttling."""

    transient = True


class DiskFullError(PgbeatError):
    """No space left where the backup is written."""


class LockHeldError(PgbeatError):
    """Another backup of the same target holds its lock."""

    exit_code = EXIT_LOCKED
    transient = True


class LockLostError(PgbeatError):
    """The lock of a running backup expired or was removed: the run aborts rather than risk a twin."""


class CancelledError(PgbeatError):
    """The step was cancelled (time limit, lost lock, shutdown) and cleaned up."""
