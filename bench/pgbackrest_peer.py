"""pgBackRest as the benchmarks' peer: a repository and a stanza of its own for a throwaway cluster.

Everything runs as the postgres user (as pgBackRest's archive-push must, from archive_command). The
settings are pgBackRest's defaults where the comparison allows (gz compression at its default level 6,
like pgbeat's gzip default), with the spool and the process count given for its asynchronous archiving.
Debian's package: `apt-get install pgbackrest`.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.support import PgCluster


def available() -> bool:
    return shutil.which("pgbackrest") is not None


class PgBackRest:
    """A pgBackRest configuration (`sync` or `async` archiving) over one repository for `pg`'s stanza."""

    STANZA = "bench"

    def __init__(self, base: Path, pg: PgCluster, process_max: int = 2) -> None:
        self.base = base / "pgbackrest"
        self.pg = pg
        for folder in ("repo", "log", "lock", "spool"):
            (self.base / folder).mkdir(parents=True, exist_ok=True)
        self.configs = {mode: self.base / f"pgbackrest-{mode}.conf" for mode in ("sync", "async")}
        for mode, path in self.configs.items():
            path.write_text(
                "[global]\n"
                f"repo1-path={self.base / 'repo'}\nlog-path={self.base / 'log'}\nlock-path={self.base / 'lock'}\n"
                f"spool-path={self.base / 'spool'}\nlog-level-console=warn\nlog-level-file=off\n"
                f"compress-type=gz\ncompress-level=6\nstart-fast=y\nprocess-max={process_max}\n"
                f"archive-async={'y' if mode == 'async' else 'n'}\n"
                f"[{self.STANZA}]\npg1-path={pg.data}\npg1-port={pg.port}\npg1-socket-path={pg.dir}\n")
        subprocess.run(["chown", "-R", "postgres:postgres", str(self.base)], check=True)
        self.run("stanza-create")

    def command(self, action: str, mode: str = "sync") -> list[str]:
        return ["pgbackrest", f"--config={self.configs[mode]}", f"--stanza={self.STANZA}", action]

    def run(self, action: str, *options: str, mode: str = "sync") -> subprocess.CompletedProcess:
        done = subprocess.run(["runuser", "-u", "postgres", "--", *self.command(action, mode), *options],
                              capture_output=True, text=True, cwd="/")
        if done.returncode != 0:
            raise RuntimeError(f"pgbackrest {action} failed: {done.stdout}{done.stderr}")
        return done

    def archive_command(self, mode: str) -> str:
        return " ".join(self.command("archive-push", mode)) + " %p"

    def repo_size(self, folder: str) -> int:
        """Bytes under the repository's `backup` or `archive` folder."""
        return sum(p.stat().st_size for p in (self.base / "repo" / folder).rglob("*") if p.is_file())
