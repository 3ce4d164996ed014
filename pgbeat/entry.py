"""The `pgbeat` command's entry point.

PostgreSQL runs `archive_command` once per WAL file, so `pgbeat wal-push` starts a process per segment:
with push-ahead, the call for one segment has usually archived the next ones already, and their calls need
only confirm it. Such a call is answered here from the standard library alone (pgbeat.wal.acked), in a few
hundredths of a second instead of the settings' and the CLI's start-up; every other call goes to
pgbeat.cli.
"""

from __future__ import annotations

import sys


def main() -> int | None:
    if sys.argv[1:2] == ["wal-push"]:
        from pgbeat.wal.acked import acknowledged

        if acknowledged(sys.argv[2:]):
            return 0
    from pgbeat.cli import main as cli_main

    return cli_main()
