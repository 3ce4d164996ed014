"""`pgbeat backup --dry-run` says what would run and what retention would remove afterwards, and changes
nothing: no dump, no file, no removal; a target whose server cannot be reached is said so, exit 1."""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime, timedelta

import pytest

from bench.fleet import build_shelf
from tests.support import Service, free_port

pytestmark = pytest.mark.integration


def snapshot(root) -> dict[str, int]:
    return {os.path.relpath(os.path.join(d, f), root): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, files in os.walk(root) for f in files}


def test_dry_run_shows_the_plan_and_changes_nothing(workdir, pg, make_db):
    db = make_db("dryrun")
    pg.sql("CREATE TABLE t AS SELECT generate_series(1, 10) AS id", db)
    seed = Service(workdir / "seed", None, [pg.target("seed", db)])
    assert seed.pgbeat("backup", "daily").returncode == 0
    [seed_file] = seed.backups()
    targets = [pg.target("erp", db), pg.target("crm", db, format="custom", tiers={"weekly": {"enabled": False}}),
               pg.target("gone", db, port=free_port(), connect_timeout=1)]
    service = Service(workdir / "fleet", None, targets, timezone="America/Sao_Paulo")
    # erp's daily backups are 4 to 10 days old (and an hour): retention (7 days) would remove the four oldest.
    written = build_shelf(service.backup_root, seed_file, ["erp"], 7, datetime.now(UTC) - timedelta(days=4))
    before = snapshot(service.backup_root)

    done = service.pgbeat("backup", "daily", "--dry-run")
    assert done.returncode == 1, done.stdout + done.stderr  # gone's server cannot be reached
    assert "nothing is dumped, sent or removed; the chain would run in this process" in done.stdout
    erp_line = re.search(r"^erp daily: .* -> (\S+) \(plain/gzip\)$", done.stdout, re.M)
    assert erp_line and re.fullmatch(rf"{service.backup_root}/daily/erp_backup_daily_\d{{8}}_\d{{6}}\.sql\.gz",
                                     erp_line.group(1)), done.stdout
    assert re.search(r"^crm daily: .* -> \S+crm_backup_daily_\d{8}_\d{6}\.dump \(custom/gzip\)$", done.stdout, re.M)
    assert "next run 20" in done.stdout and "-03" in done.stdout  # a time for a person says its zone
    oldest = sorted(p.name for p in written["erp"])[:4]
    assert f"retention would then remove 4: {', '.join(oldest)}" in done.stdout, done.stdout
    rotate = service.pgbeat("rotate", "--dry-run", "--tier", "daily", "--target", "erp")
    assert [line.split(": would remove ")[1] for line in rotate.stdout.splitlines() if "would remove " in line] \
        == oldest  # the same plan as rotate's own
    assert "gone daily: " in done.stdout and "retention: not previewed: the database server's clock could not " \
                                              "be read" in done.stdout
    assert snapshot(service.backup_root) == before  # nothing written, nothing removed
    assert not (service.backup_root / ".work").exists() or not any((service.backup_root / ".work").iterdir())

    weekly = service.pgbeat("backup", "weekly", "--dry-run", "--target", "crm")
    assert weekly.returncode == 0 and "crm: tier weekly is disabled, would be skipped" in weekly.stdout
    refused = service.pgbeat("backup", "daily", "--dry-run", "--no-wait")
    assert refused.returncode == 2 and "--dry-run" in refused.stderr
    assert snapshot(service.backup_root) == before
