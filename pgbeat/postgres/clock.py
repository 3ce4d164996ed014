"""The database server's clock: what dates a backup and what rotation's "now" is, whatever a worker's says.

A worker's clock may be years off (a dead RTC battery, a VM restored from a snapshot, a wrong NTP
server); the database server's is the clock of the data. The dump step reads it once, as pg_dump starts,
with a `psql` of its own running beside pg_dump (a separate process: no import, no wait on the dump's
critical path), and records the reading with this host's monotonic clock and boot id. Later steps of
the same run on the same host derive the server's "now" from that reading plus the monotonic time
elapsed since (`server_now`), without asking the server again; `ask_server_time` asks it directly.
"""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pgbeat.errors import PgbeatError
from pgbeat.settings import Target

# A worker this far from the server's clock gets a warning on its run (file names and logs use its clock).
SKEW_WARNING = timedelta(minutes=5)
READ_TIMEOUT_S = 10.0  # how long the dump waits, after pg_dump ended, for a reading still under way
QUERY = "SELECT extract(epoch FROM clock_timestamp())"
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def boot_id() -> str | None:
    """This host's boot id (Linux): monotonic readings compare only within one boot."""
    try:
        return BOOT_ID.read_text().strip() or None
    except OSError:
        return None


@dataclass
class ServerReading:
    """One reading of the server's clock, with this host's clocks at the moment it was taken."""

    server_time: str  # ISO 8601, UTC
    local_time: str  # the worker's clock (the run's `now`) at the reading
    monotonic: float  # time.monotonic() at the reading
    boot_id: str | None

    @property
    def skew_s(self) -> float:
        """The worker's clock minus the server's, in seconds (positive: the worker is ahead)."""
        return round((datetime.fromisoformat(self.local_time) - datetime.fromisoformat(self.server_time))
                     .total_seconds(), 3)


def server_now(reading: ServerReading | None) -> datetime | None:
    """Given a run's reading of the server's clock, return the server's clock now, or None when this
    host's monotonic clock cannot bridge the time since (another boot, or no reading)."""
    if reading is None or reading.boot_id is None or reading.boot_id != boot_id():
        return None
    elapsed = time.monotonic() - reading.monotonic
    if elapsed < 0:
        return None
    return datetime.fromisoformat(reading.server_time) + timedelta(seconds=elapsed)


class PendingReading:
    """A `psql` reading the server's clock, started beside pg_dump; `result()` collects it.

    The process is started and waited for by a thread of its own, as a plain session leader (vfork: a
    fraction of a millisecond on the dump's thread, where a fork of a worker-sized process takes tens);
    it asks one question and exits, bounded by the target's connect_timeout and READ_TIMEOUT_S.
    """

    def __init__(self, target: Target, env: dict[str, str], local_now, pg_dump: str) -> None:
        self.error: str | None = None
        self.proc: subprocess.Popen | None = None
        self._answer: tuple[int, bytes, bytes] | None = None
        self.local_time, self.monotonic = local_now(), time.monotonic()
        sibling = Path(pg_dump).with_name("psql")  # the psql of the client chosen for this server
        argv = [str(sibling), "-X", "-A", "-t", "-q", "--no-password", "-v", "ON_ERROR_STOP=1",
                "--dbname", target.conninfo(), "-c", QUERY]
        self._thread = threading.Thread(target=self._read, args=(argv, env), name="pgbeat-server-clock",
                                        daemon=True)
        self._thread.start()

    def _read(self, argv: list[str], env: dict[str, str]) -> None:
        try:
            if not Path(argv[0]).is_file():  # a client folder without psql: the dump goes on without a reading
                raise PgbeatError(f"no psql beside pg_dump in {Path(argv[0]).parent}")
            self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, start_new_session=True)
            out, err = self.proc.communicate(timeout=READ_TIMEOUT_S)
            self._answer = (self.proc.returncode, out, err)
        except subprocess.TimeoutExpired:
            self.error = f"psql did not answer within {READ_TIMEOUT_S:.0f} s"
            self.stop()
        except (PgbeatError, OSError) as exc:
            self.error = exc.message if isinstance(exc, PgbeatError) else str(exc)

    def result(self) -> ServerReading | None:
        """Wait for the reading; return it, or None with `error` saying why there is none."""
        self._thread.join(READ_TIMEOUT_S + 1)
        if self._answer is None:
            self.error = self.error or "psql did not answer"
            self.stop()
            return None
        rc, out, err = self._answer
        output = out.decode("ascii", "replace").strip()
        try:
            if rc != 0:
                raise ValueError(f"psql exit code {rc}: {err.decode('utf-8', 'replace').strip()[-300:]}")
            server = datetime.fromtimestamp(float(output), UTC)
        except (ValueError, OverflowError) as exc:
            self.error = str(exc) or f"unexpected answer {output!r}"
            return None
        return ServerReading(server_time=server.isoformat(), local_time=self.local_time.isoformat(),
                             monotonic=self.monotonic, boot_id=boot_id())

    def stop(self) -> None:
        """Kill the psql if it still runs (a failed or cancelled dump does not wait for it)."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.kill()


def ask_server_time(target: Target) -> datetime:
    """Return `target`'s server clock now; raise PgbeatError if the server cannot be reached."""
    from pgbeat.postgres.client import connect

    with connect(target) as conn:
        return conn.execute("SELECT clock_timestamp()").fetchone()[0].astimezone(UTC)
