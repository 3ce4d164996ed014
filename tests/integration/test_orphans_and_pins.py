"""Backups kept on purpose and backups left behind: `pgbeat pin` keeps a backup through every rotation, on the
local shelf and at every destination, until `pin --remove`; the backups of a target removed from the
configuration are listed (`status`, `list --orphans`) and rotated by `defaults` at `pgbeat rotate`, at a
configured server's time, pinned ones kept; with no server's clock to go by, nothing of theirs is removed."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from bench.fleet import build_shelf
from tests.integration.test_offsite import s3_destination
from tests.support import Service, free_port

pytestmark = pytest.mark.integration


def manifest_of(path) -> dict:
    return json.loads(path.with_name(path.name + ".manifest.json").read_text())


def removed_lines(stdout: str, verb: str = "removed") -> list[str]:
    return sorted(line.split(f": {verb} ")[1] for line in stdout.splitlines() if f": {verb} " in line)


def test_a_pinned_backup_outlives_its_retention_here_and_at_a_destination(workdir, pg, make_db, moto_s3):
    db = make_db("pinned")
    pg.sql("CREATE TABLE t AS SELECT generate_series(1, 10) AS i", db)
    bucket = moto_s3.new_bucket()
    service = Service(workdir / "svc", None, [pg.target("erp", db, tiers={"daily": {"keep_days": 1}},
                                                        destinations=[s3_destination(moto_s3, bucket)])])
    for _ in range(3):
        done = service.pgbeat("backup", "daily")
        assert done.returncode == 0, done.stdout + done.stderr
    oldest, middle, newest = service.backups("daily")

    def at_s3() -> list[str]:
        objects = moto_s3.client().list_objects_v2(Bucket=bucket, Prefix="pgbeat/daily/").get("Contents", [])
        return sorted(o["Key"].rsplit("/", 1)[1] for o in objects
                      if o["Key"].endswith(".sql.gz") and ".globals." not in o["Key"])

    pinned = service.pgbeat("pin", str(oldest), "--note", "year-end close")
    assert pinned.returncode == 0 and f"pinned {oldest.name}" in pinned.stdout, pinned.stdout + pinned.stderr
    assert manifest_of(oldest)["pinned"]["note"] == "year-end close"
    assert service.pgbeat("verify", str(oldest)).returncode == 0  # a pin is outside the seal
    listed = service.pgbeat("list", "--target", "erp")
    assert "verified, pinned" in listed.stdout, listed.stdout

    in_30_days = (datetime.now(UTC) + timedelta(days=30)).isoformat()
    rotated = service.pgbeat("rotate", "--now", in_30_days)
    assert rotated.returncode == 0, rotated.stdout + rotated.stderr
    assert service.backups("daily") == [oldest, newest]  # the floor keeps the newest, the pin the oldest
    assert f"kept {oldest.name} (expired, but pinned: year-end close)" in rotated.stdout
    assert at_s3() == [oldest.name, newest.name]
    assert removed_lines(rotated.stdout) == sorted([middle.name, f"daily/{middle.name} at offsite-s3"])

    unpinned = service.pgbeat("pin", "--remove", str(oldest))
    assert unpinned.returncode == 0 and manifest_of(oldest).get("pinned") is None
    again = service.pgbeat("rotate", "--now", in_30_days)
    assert again.returncode == 0, again.stdout + again.stderr
    assert service.backups("daily") == [newest] and at_s3() == [newest.name]

    for args, code, text in [(["pin", str(workdir / "nothere.sql.gz")], 2, "no such file"),
                             (["pin", str(service.config_path)], 3, "is not a pgbeat backup"),
                             (["pin", "--remove", "--note", "x", str(newest)], 2, "pick one")]:
        done = service.pgbeat(*args)
        assert done.returncode == code and text in done.stderr, done.stdout + done.stderr
    assert manifest_of(newest).get("pinned") is None


def test_a_removed_targets_backups_are_listed_and_rotated_by_the_defaults(workdir, pg, make_db):
    db = make_db("orphan")
    pg.sql("CREATE TABLE t AS SELECT generate_series(1, 10) AS i", db)
    service = Service(workdir / "svc", None, [pg.target("erp", db), pg.target("old", db)],
                      defaults={"tiers": {"daily": {"keep_days": 5, "min_keep": 2}}})
    for name in ("erp", "old"):
        assert service.pgbeat("backup", "daily", "--target", name).returncode == 0
    [seed] = [p for p in service.backups("daily") if p.name.startswith("old_")]
    # old's daily backups, one a day from 1 to 12 days ago (and the real one from now); then it leaves.
    written = build_shelf(service.backup_root, seed, ["old"], 12, datetime.now(UTC), tier="daily",
                          every=timedelta(days=1))["old"]
    keep_pinned = written[-1]  # the oldest
    assert service.pgbeat("pin", str(keep_pinned)).returncode == 0
    service.config["targets"] = [t for t in service.config["targets"] if t["name"] == "erp"]
    service.write_config()

    status = service.pgbeat("status")
    assert "not in the configuration (rotated by `defaults` at `pgbeat rotate` unless pinned" in status.stdout
    assert "old (13 backups)" in status.stdout, status.stdout
    assert json.loads(service.pgbeat("status", "--json").stdout)["orphans"] == {"old": 13}
    orphans = json.loads(service.pgbeat("list", "--orphans", "--json").stdout)
    assert len(orphans) == 13 and {b["target"] for b in orphans} == {"old"}

    # defaults keep 5 days: the ones 6 to 11 days old go; the pinned 12-day-old one stays.
    expired = sorted(p.name for p in written[5:-1])
    preview = service.pgbeat("rotate", "--dry-run")
    assert preview.returncode == 0, preview.stdout + preview.stderr
    assert removed_lines(preview.stdout, "would remove") == expired, preview.stdout
    assert f"old daily: kept {keep_pinned.name} (expired, but pinned)" in preview.stdout
    only_erp = service.pgbeat("rotate", "--target", "erp")
    assert only_erp.returncode == 0 and "old" not in only_erp.stdout
    assert all(p.exists() for p in written)

    rotated = service.pgbeat("rotate")
    assert rotated.returncode == 0, rotated.stdout + rotated.stderr
    assert removed_lines(rotated.stdout) == expired
    assert [p.exists() for p in written] == [True] * 5 + [False] * 6 + [True]
    assert seed.exists()
    again = service.pgbeat("rotate")
    assert again.returncode == 0 and removed_lines(again.stdout) == []


def test_without_a_configured_servers_clock_a_removed_targets_backups_stay(workdir, pg, make_db):
    db = make_db("orphanclock")
    service = Service(workdir / "svc", None, [pg.target("old", db)])
    assert service.pgbeat("backup", "daily").returncode == 0
    [seed] = service.backups("daily")
    written = build_shelf(service.backup_root, seed, ["old"], 12, datetime.now(UTC), tier="daily",
                          every=timedelta(days=1))["old"]
    service.config["targets"] = [pg.target("erp", db, port=free_port(), connect_timeout=1)]
    service.write_config()
    done = service.pgbeat("rotate")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "old: not rotated, nothing removed: not in the configuration" in done.stderr, done.stderr
    assert all(p.exists() for p in [seed, *written])
