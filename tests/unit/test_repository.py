"""The repository stands on its own: no file sends its reader to notes outside it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUTSIDE = re.compile(r"\.\./shared|shared/notes|notes/(peers|celery|pitr-fleet)\.md")


def test_no_file_points_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    offenders = []
    for name in tracked.splitlines():
        path = ROOT / name
        if path.suffix not in {".py", ".md", ".yaml", ".yml", ".toml", ".sh", ".service", ".timer", ""}:
            continue
        if path.is_file() and OUTSIDE.search(path.read_text(errors="replace")) and path != Path(__file__):
            offenders.append(name)
    assert offenders == []
