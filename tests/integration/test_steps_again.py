"""Every chain step run twice with the same input record: the second run completes, with the same record,
and changes nothing it should not (no second backup, no second copy, no second notification).

Steps are taken from STEP_FUNCTIONS, so a new step is covered too. A redelivered Celery step is run like
this (tests/integration/test_kill_matrix.py kills real workers); here the record is handed twice to the
step in one process, with `once` claims as the step guard gives them (one notification per channel).
Also: what a run that fails for good may and may not remove (the errback's promises).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pgbeat.fsutil import hold_dir
from pgbeat.pipeline.record import Run, StepContext, new_run
from pgbeat.pipeline.runner import STEP_FUNCTIONS, discard_work, execute_step
from pgbeat.settings import STEPS, load_settings
from tests.receivers import HttpReceiver
from tests.shelf import backups_of, make_age_key, remote_keys, restore_into, sha256_of, shelf_problems
from tests.storage_servers import S3_ACCESS_KEY, S3_SECRET
from tests.support import Service, wait_for

pytestmark = pytest.mark.integration

# What a second run may change: timings and the time a record was written.
VOLATILE = {"started_at", "finished_at", "duration_s", "stored_at", "at", "updated_at", "server_now"}


# What a dump run again must reproduce: the data it describes (not its bytes, nor when it ran).
DUMP_DATA = {"path", "size", "raw_size", "tables", "complete", "server_version", "pg_dump_version", "compressed",
             "codec", "blocks", "blocks_checked"}


def stable(value):
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


def snapshot(root: Path, s3, bucket: str) -> dict[str, object]:
    """Every file under BACKUP_ROOT (manifests without their timings) but the run logs and the last-attempt
    record, and every object at the destination with its ETag (manifests by content)."""
    files: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_dir() or rel.startswith(("logs/erp_", ".state/")):
            continue
        files[rel] = stable(json.loads(path.read_text())) if rel.endswith(".manifest.json") else sha256_of(path)
    for key in remote_keys(s3, bucket, ""):
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        files[f"s3:{key}"] = stable(json.loads(body)) if key.endswith(".manifest.json") else s3.head_object(
            Bucket=bucket, Key=key)["ETag"]
    return files


@pytest.fixture
def shelf(workdir, pg, make_db, moto_s3, monkeypatch):
    """A target with encryption, an S3 destination, a webhook and a healthcheck URL, and one plaintext backup
    on its shelf from before encryption was turned on (so the upload encrypts one on the way out)."""
    db = make_db("again")
    pg.sql("CREATE TABLE t AS SELECT i, md5(i::text) AS h FROM generate_series(1, 200) AS i", db)
    key, recipient = make_age_key(workdir)
    http = HttpReceiver()
    bucket = moto_s3.new_bucket()
    service = Service(workdir, None, [pg.target("erp", db)])
    assert service.pgbeat("backup", "daily").returncode == 0
    target = service.config["targets"][0]
    target.update(encryption={"recipients": [recipient]}, healthcheck_url=f"{http.base()}/ping",
                  notify=[{"url": f"json://127.0.0.1:{http.port}/hook", "events": ["success"]}],
                  destinations=[{"name": "offsite", "kind": "s3", "bucket": bucket, "prefix": "", "region": "us-east-1",
                                 "endpoint_url": moto_s3.url, "access_key_id": S3_ACCESS_KEY,
                                 "secret_access_key": S3_SECRET, "retries": 2}])
    service.write_config()
    monkeypatch.setenv("PGBEAT_CONFIG", str(service.config_path))
    for name in ("CELERY_BROKER_URL", "DB_NAME", "BACKUP_ROOT"):
        monkeypatch.delenv(name, raising=False)
    yield service, load_settings(env_file=None), db, key, http, moto_s3.client(), bucket
    http.stop()


def test_each_step_twice_with_the_same_record(shelf, pg, make_db):
    service, settings, db, key, http, s3, bucket = shelf
    claimed: set[str] = set()

    def once(what: str) -> bool:  # what the step guard's Redis claims do, per run
        fresh = what not in claimed
        claimed.add(what)
        return fresh

    ctx = StepContext(settings, once=once)
    run = new_run(settings, settings.target("erp"), "daily")
    with hold_dir(run.work(), create=True):
        for name in STEP_FUNCTIONS:
            record = run.as_json()
            first = execute_step(ctx, Run.model_validate(record), name)
            before, requests = snapshot(service.backup_root, s3, bucket), list(http.requests)
            second = execute_step(ctx, Run.model_validate(record), name)
            run = second.model_copy(deep=True)  # the record the attempt that finished hands on
            records = first.as_json(), second.as_json()
            if name == "notify":  # the second sends nothing, and says so
                assert second.steps.notify.sent == [] and first.steps.notify.sent
                for record_ in records:
                    del record_["steps"]["notify"]["sent"]
            after = snapshot(service.backup_root, s3, bucket)
            if name == "dump":  # it starts over: a new dump of the same database (pg_dump writes a random
                for record_ in records:  # \restrict key into each; a new reading of the clock)
                    dumped = record_["steps"]["dump"]
                    # Compressed as it streamed, its size is the compressed size, which the random key's
                    # bytes move by a few bytes; raw_size is the data's.
                    record_["steps"]["dump"] = {k: v for k, v in dumped.items() if k in DUMP_DATA
                                                and not (k == "size" and dumped.get("compressed"))}
                dump = Path(first.steps.dump.path).relative_to(service.backup_root).as_posix()
                assert before.pop(dump) != after.pop(dump)
                # The server's globals beside it: pg_dumpall writes a random \restrict key too.
                server_globals = Path(first.steps.dump.path).with_name(first.steps.dump.globals.file)
                server_globals = server_globals.relative_to(service.backup_root).as_posix()
                assert before.pop(server_globals) != after.pop(server_globals)
                # Its block index (compressed sizes per block) moves with the bytes too, when there is one.
                index = f"{dump}.blocks.json"
                assert (index in before) == (index in after)
                before.pop(index, None), after.pop(index, None)
            assert stable(records[1]) == stable(records[0]), name
            assert after == before, name
            assert http.requests == requests, name  # no second webhook call nor healthcheck ping
    assert run.status == "succeeded" and tuple(STEP_FUNCTIONS) == STEPS
    assert [e["kind"] for e in service.events()] == ["success", "success"]  # the first backup's, then this one
    older, new = backups_of(service.backup_root, "erp")
    assert new == Path(run.final_path) and new.name.endswith(".sql.gz.age") and not older.name.endswith(".age")
    keys = remote_keys(s3, bucket, "")
    assert f"daily/{new.name}" in keys and f"daily/{older.name}.age" in keys  # the older one encrypted on its way
    assert shelf_problems(service.backup_root) == []
    restored = make_db("restored")
    restore_into(pg, new, restored, key)
    assert pg.dump_text(restored) == pg.dump_text(db)


def held_elsewhere(folder: Path):
    """A process (not this one) that holds `folder`'s lock until it is killed."""
    code = ("import sys, time; from pathlib import Path; from pgbeat.fsutil import acquire_dir; "
            "assert acquire_dir(Path(sys.argv[1])); print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def run_until(settings, last: str) -> Run:
    ctx = StepContext(settings)
    run = new_run(settings, settings.target("erp"), "daily")
    with hold_dir(run.work(), create=True):
        for name in STEPS[:STEPS.index(last) + 1]:
            run = execute_step(ctx, run, name)
    return run


def test_a_failed_run_takes_back_sidecars_published_without_data(shelf, monkeypatch):
    """As after a kill between the shelf's sidecars and its data file: failing the run for good (the
    errback) removes the sidecars and the work folder, never an older backup; run again, the same upload
    would have completed it instead."""
    service, settings, *_ = shelf
    before = {p: sha256_of(p) for p in backups_of(service.backup_root, "erp")}
    run = run_until(settings, "verify")
    from pgbeat.steps import upload

    artifact, manifest = upload.staged_artifact(run, settings.target("erp").encryption.recipients)
    final = service.backup_root / "daily" / upload.shelf_name(service.backup_root, "daily", manifest)
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # stopped after the sidecars, before the data file

    with monkeypatch.context() as patched, pytest.raises(KeyboardInterrupt):
        patched.setattr(upload.LocalStorage, "put", interrupted)
        upload.publish_local(StepContext(settings), run, artifact, manifest)
    assert final.with_name(final.name + ".manifest.json").exists() and not final.exists()
    discard_work(settings, run)  # what tasks.chain_failed (and the embedded runner) do with a failed run
    assert not final.with_name(final.name + ".manifest.json").exists()
    assert not final.with_name(final.name + ".sha256").exists() and not run.work().exists()
    assert {p: sha256_of(p) for p in backups_of(service.backup_root, "erp")} == before
    assert shelf_problems(service.backup_root) == []


def test_a_failed_run_keeps_a_published_backup_and_a_folder_in_use(shelf):
    _service, settings, *_ = shelf
    run = run_until(settings, "upload")
    published = Path(run.final_path)
    discard_work(settings, run)  # e.g. a destination failed after the local publish
    assert published.exists() and published.with_name(published.name + ".manifest.json").exists()

    run = run_until(settings, "verify")
    holder = held_elsewhere(run.work())  # a copy of the step that still runs (a redelivery)
    try:
        discard_work(settings, run)
        assert run.artifact.exists()  # its verified file is left to it
    finally:
        holder.kill()
        holder.wait()
    discard_work(settings, run)
    wait_for(lambda: not run.work().exists(), 5, what="the folder to go once nobody holds it")
