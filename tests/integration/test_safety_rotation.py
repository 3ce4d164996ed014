"""Safety backups (`pre_restore_*`) are kept by count: the newest `safety_backups` of a target after each
restore that succeeds, and at `pgbeat rotate`; a failed restore never costs an older one, and what is
kept is whole and restores."""

from __future__ import annotations

import json

import pytest

from tests.support import Service

pytestmark = pytest.mark.integration


def safety_backups(service: Service) -> list[str]:
    """The safety backups on the shelf, oldest first (by the server's clock in their manifests)."""
    found = []
    for manifest in service.backup_root.glob("pre_restore_*.manifest.json"):
        data = json.loads(manifest.read_text())
        found.append((data["server_time"] or data["started_at"], data["file"]))
    return [name for _, name in sorted(found)]


def whole(service: Service, name: str) -> bool:
    return all((service.backup_root / f"{name}{side}").is_file() for side in ("", ".manifest.json", ".sha256"))


def restore(service: Service, backup, **env: str):
    return service.pgbeat("restore", str(backup), "--yes", **env)


def test_safety_backups_are_kept_by_count(workdir, pg, make_db):
    db = make_db("safety")
    pg.sql("CREATE TABLE t AS SELECT generate_series(1, 50) AS id", db)
    service = Service(workdir, None, [pg.target("erp", db, safety_backups=2)])
    assert service.pgbeat("backup", "daily").returncode == 0
    [backup] = service.backups()

    seen: list[str] = []
    for attempt in range(3):
        pg.sql(f"INSERT INTO t VALUES ({1000 + attempt})", db)  # each safety backup holds a different state
        done = restore(service, backup)
        assert done.returncode == 0, done.stderr
        now = safety_backups(service)
        seen.append(now[-1])
        assert now == seen[-2:], (attempt, now)
        assert all(whole(service, name) for name in now)

    # A restore that fails after its safety backup keeps every one (the database was not changed).
    failed = restore(service, backup, PGBEAT_FAULTS="restore.load.start=transient")
    assert failed.returncode != 0
    after_failure = safety_backups(service)
    assert len(after_failure) == 3 and after_failure[:2] == seen[-2:]

    # `pgbeat rotate` keeps the newest `safety_backups` too; a dry run removes nothing.
    service.config["targets"][0]["safety_backups"] = 1
    service.write_config()
    dry = service.pgbeat("rotate", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    for name in after_failure[:2]:
        assert f"erp pre_restore: would remove {name}" in dry.stdout, dry.stdout
    assert safety_backups(service) == after_failure
    assert service.pgbeat("rotate").returncode == 0
    assert safety_backups(service) == after_failure[-1:] and whole(service, after_failure[-1])
    assert not [p for p in service.backup_root.iterdir() if p.name.startswith(tuple(after_failure[:2]))]
    again = service.pgbeat("rotate")  # run twice: nothing more goes
    assert again.returncode == 0 and safety_backups(service) == after_failure[-1:]

    # What is kept restores: the last safety backup holds the state before the failed restore.
    into = make_db("safety_into")
    assert service.pgbeat("restore", str(service.backup_root / after_failure[-1]), "--into", into,
                          "--yes").returncode == 0
    assert pg.dump_text(into) == pg.dump_text(db)
