"""Supervised child processes (pg_dump, pg_restore, psql): never fire-and-forget.

- The child runs in its own session, so a Ctrl-C or a TERM sent to the worker's process group does not
  cut a dump short behind pgbeat's back, and dies with its parent (PR_SET_PDEATHSIG), so a pool process
  killed by a hard time limit or SIGKILL leaves no orphaned pg_dump.
- stderr is drained by a thread into a bounded tail that goes into error messages.
- A `cancel` event (lost lock, shutdown) terminates the child; `stop()` is safe to call from `finally`.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import os
import re
import signal
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
STDERR_TAIL_LINES = 20
# A line of a PostgreSQL program that reports the error itself: `pg_dump: error: ...`, `psql:<stdin>:3: ERROR:
# ...`, a server's `FATAL:` or `PANIC:` inside a connection error.
ERROR_LINE = re.compile(r"\b(?:error|ERROR|FATAL|PANIC):")
# Lines that only add to an error: `pg_dump: detail: ...`, `HINT:  ...`, `LINE 3: ...`, `Command was: ...`.
SUPPORTING_LINE = re.compile(r"^(?:\S+: )?(?:detail|hint|DETAIL|HINT|CONTEXT|LINE \d+|Command was|Query was):")


def _resolve_prctl():
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: the session still shields the child from group signals
        return None


# Resolved once in the parent: the child must not allocate or take locks between fork and exec.
_prctl = _resolve_prctl()


def _child_setup() -> None:  # runs in the forked child, before exec
    os.setsid()
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def last_error_line(stderr: Sequence[str]) -> str | None:
    """Given the stderr lines of pg_dump, psql or pg_restore, return the last meaningful one: the last that
    reports an error (not its detail, hint or indented continuation), else the last plain line; None if
    there is none. `connection to server ... failed: Connection refused`, not `Is the server running...`."""
    plain = [line.strip() for line in stderr
             if line.strip() and not line[:1].isspace() and not SUPPORTING_LINE.match(line.strip())]
    errors = [line for line in plain if ERROR_LINE.search(line)]
    return (errors or plain or [None])[-1]


class Supervised:
    """A running child process with a stderr tail and a cancel hook."""

    def __init__(self, argv: Sequence[str], *, env: dict[str, str] | None = None, stdout=subprocess.PIPE,
                 stdin=subprocess.DEVNULL, cancel: threading.Event | None = None, name: str | None = None) -> None:
        self.name = name or Path(argv[0]).name
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self.cancelled_by: str | None = None
        self.proc = subprocess.Popen(list(argv), stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, env=env,
                                     preexec_fn=_child_setup, close_fds=True)
        self._stderr_thread = threading.Thread(target=self._drain_stderr, daemon=True)
        self._stderr_thread.start()
        self._cancel = cancel
        self._done = threading.Event()
        if cancel is not None:
            threading.Thread(target=self._watch_cancel, daemon=True).start()

    @property
    def stdout(self):
        return self.proc.stdout

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in iter(self.proc.stderr.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self.stderr_tail.append(line)
                log.info("%s: %s", self.name, line)

    def _watch_cancel(self) -> None:
        assert self._cancel is not None
        while not self._done.is_set():
            if self._cancel.wait(0.2):
                self.cancelled_by = getattr(self._cancel, "reason", None) or "cancelled"
                self.terminate()
                return

    def terminate(self, grace: float = 5.0) -> None:
        """TERM the child, then KILL it if it has not exited after `grace` seconds."""
        if self.proc.poll() is not None:
            return
        try:
            self.proc.terminate()
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        except ProcessLookupError:
            pass

    def wait(self) -> int:
        rc = self.proc.wait()
        self._stderr_thread.join(timeout=5)
        self._done.set()
        return rc

    def stop(self) -> None:
        """Make sure the child is gone and its pipes closed (call from `finally`)."""
        self.terminate()
        self._done.set()
        if self.proc.stdout is not None:
            with contextlib.suppress(OSError):
                self.proc.stdout.close()
        # The child is gone, so its stderr ends and the drain thread with it: closing the pipe under that
        # thread's readline instead makes it raise (its buffer freed) and print a traceback to the terminal.
        self._stderr_thread.join(timeout=5)
        if self.proc.stderr is not None:
            with contextlib.suppress(OSError):
                self.proc.stderr.close()

    def stderr_text(self) -> list[str]:
        return list(self.stderr_tail)


class CancelEvent(threading.Event):
    """A threading.Event that remembers why it was set."""

    reason: str | None = None

    def cancel(self, reason: str) -> None:
        if not self.is_set():
            self.reason = reason
            self.set()
