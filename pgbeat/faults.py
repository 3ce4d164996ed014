"""Fault points: named places where a test can make this process die, to prove what a kill there costs.

Code that writes, swaps, deletes or uploads calls `fault_point(NAME)` between the actions that must not
be separated by a crash (after the sidecars are published, before the data file, say). It does nothing
unless the environment names that point, which only the kill tests do:

    PGBEAT_FAULTS="upload.published-sidecars=kill"   SIGKILL this process there; also term, hup, int
                                                     (the signal is sent to this process itself), or
                                                     pause (write a marker file, then sleep until killed),
                                                     or transient (raise InjectedTransientError: a
                                                     transient failure the runners retry)
    PGBEAT_FAULTS_DIR=/some/dir                      fire each point once only: a marker file there records
                                                     that it fired, so a redelivered step or the next run
                                                     passes it; `pause` writes <dir>/<point>.reached

Several points may be listed, separated by commas. Every point is declared where it is used, with
`declare(name, doc)`, so that the kill-matrix tests enumerate them all: a new point is covered without
anyone remembering to add it to a test. Names are `<step or phase>.<where>`.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from pgbeat.errors import PgbeatError

_DECLARED: dict[str, str] = {}

ACTIONS = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "hup": signal.SIGHUP, "int": signal.SIGINT}
PAUSE_SECONDS = 600.0


class InjectedTransientError(PgbeatError):
    """A transient failure a test asked for at a fault point (action `transient`)."""

    transient = True


def declare(name: str, doc: str) -> str:
    """Register fault point `name` (what is true when a process dies there); return the name."""
    _DECLARED[name] = doc
    return name


def declared(prefix: str = "") -> dict[str, str]:
    """Return the declared fault points whose name starts with `prefix`, sorted by name, with their docs."""
    return {name: doc for name, doc in sorted(_DECLARED.items()) if name.startswith(prefix)}


def _action(name: str) -> str | None:
    spec = os.environ.get("PGBEAT_FAULTS")
    if not spec:
        return None
    for item in spec.split(","):
        point, _, action = item.partition("=")
        if point.strip() == name:
            return action.strip() or "kill"
    return None


def fault_point(name: str) -> None:
    """Die here (or pause) if PGBEAT_FAULTS names this point; otherwise return at once."""
    action = _action(name)
    if action is None:
        return
    folder = os.environ.get("PGBEAT_FAULTS_DIR")
    if folder:
        try:
            os.close(os.open(Path(folder, f"{name}.fired"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            return  # fired before: the run that follows the kill passes through
    if action == "transient":
        raise InjectedTransientError(f"fault point {name}: an injected transient failure",
                                     step=name.partition(".")[0])
    if action == "pause":
        if folder:
            Path(folder, f"{name}.reached").write_text(str(os.getpid()))
        time.sleep(PAUSE_SECONDS)
        return
    os.kill(os.getpid(), ACTIONS[action])
