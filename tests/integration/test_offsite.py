"""Off-site copies and encryption end to end: local + S3 (moto) + SSH (sshd) + GCS (fake-gcs-server)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import uuid
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pexpect
import pytest

from tests.conftest import DATA
from tests.storage_servers import S3_ACCESS_KEY, S3_SECRET
from tests.support import VENV_BIN, Service, free_port, without_ansi

pytestmark = pytest.mark.integration


@pytest.fixture
def age_key(workdir):
    """A throwaway age identity made by the real `age-keygen`; returns (identity file, recipient)."""
    key = workdir / "backup-key.txt"
    result = subprocess.run(["age-keygen", "-o", str(key)], capture_output=True, text=True, check=True)
    recipient = result.stderr.strip().split("Public key: ")[1]
    return key, recipient


def s3_destination(server, bucket: str, **extra) -> dict:
    return {"name": "offsite-s3", "kind": "s3", "bucket": bucket, "prefix": "pgbeat", "endpoint_url": server.url,
            "region": "us-east-1", "access_key_id": S3_ACCESS_KEY, "secret_access_key": S3_SECRET, "retries": 2,
            **extra}


def ssh_destination(server, folder: str, **extra) -> dict:
    return {"name": "vault", "kind": "ssh", "host": "127.0.0.1", "port": server.port, "user": server.user,
            "path": str(server.root / folder), "key_file": str(server.user_key),
            "known_hosts": str(server.known_hosts), "retries": 2, **extra}


def manifest_of(path):
    return json.loads(path.with_name(path.name + ".manifest.json").read_text())


def test_encrypted_copies_in_three_places_each_restore(workdir, pg, make_db, moto_s3, sshd, age_key):
    source = make_db("erp", DATA / "rich.sql")
    key_file, recipient = age_key
    bucket, folder = moto_s3.new_bucket(), f"vault-{uuid.uuid4().hex[:6]}"
    service = Service(workdir, None, [pg.target("erp", source, encryption={"recipients": [recipient]},
                                                destinations=[s3_destination(moto_s3, bucket),
                                                              ssh_destination(sshd, folder)])])
    result = service.pgbeat("backup", "daily")
    assert result.returncode == 0, result.stdout + result.stderr
    [local] = service.backups("daily", ".sql.gz.age")
    manifest = manifest_of(local)
    assert manifest["file"] == local.name and manifest["encryption"]["plaintext"]["file"] == local.name[:-4]
    assert manifest["sha256"] == hashlib.sha256(local.read_bytes()).hexdigest()
    assert {name: copy["status"] for name, copy in manifest["copies"].items()} == {
        "local": "ok", "offsite-s3": "ok", "vault": "ok"}

    # S3, read with boto3: the same bytes; `age -d` gives a valid gzip SQL dump.
    key = f"pgbeat/daily/{local.name}"
    body = moto_s3.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    assert hashlib.sha256(body).hexdigest() == manifest["sha256"]
    decrypted = subprocess.run(["age", "-d", "-i", str(key_file)], input=body, capture_output=True, check=True).stdout
    assert hashlib.sha256(decrypted).hexdigest() == manifest["encryption"]["plaintext"]["sha256"]
    assert subprocess.run(["gzip", "-t"], input=decrypted).returncode == 0
    # SSH, checked with the plain ssh program on the remote side.
    remote = sshd.ssh(f"sha256sum {sshd.root / folder / 'daily' / local.name}").stdout.split()[0]
    assert remote == manifest["sha256"]

    expected = pg.dump_text(source)
    for where in (str(local), f"s3://{bucket}/{key}",
                  f"ssh://{sshd.user}@127.0.0.1:{sshd.port}{sshd.root / folder}/daily/{local.name}"):
        into = f"{source}_r{uuid.uuid4().hex[:6]}"
        try:
            restored = service.pgbeat("restore", where, "--into", into, "--identity", str(key_file))
            assert restored.returncode == 0, (where, restored.stdout + restored.stderr)
            assert pg.dump_text(into) == expected
        finally:
            pg.dropdb(into)

    listing = json.loads(service.pgbeat("list", "--destination", "offsite-s3", "--json").stdout)
    assert [b["file"] for b in listing] == [local.name]
    no_key = service.pgbeat("restore", str(local), "--into", f"{source}_x")
    assert no_key.returncode == 3 and "no identity was given" in no_key.stderr
    wrong = workdir / "wrong-key.txt"
    subprocess.run(["age-keygen", "-o", str(wrong)], capture_output=True, check=True)
    bad = service.pgbeat("restore", str(local), "--into", f"{source}_x", "--identity", str(wrong))
    assert bad.returncode == 3 and "Cannot decrypt" in bad.stderr
    assert pg.sql(f"SELECT count(*) FROM pg_database WHERE datname = '{source}_x'") == "0"
    everything = result.stdout + result.stderr + json.dumps(manifest) + json.dumps(service.events())
    assert S3_SECRET not in everything and "AGE-SECRET-KEY" not in everything


def test_each_destination_rotates_on_its_own(workdir, pg, make_db, moto_s3, sshd):
    source = make_db("erp")
    pg.sql("CREATE TABLE t AS SELECT generate_series(1, 10) AS i", source)
    bucket, folder = moto_s3.new_bucket(), f"vault-{uuid.uuid4().hex[:6]}"
    service = Service(workdir, None, [pg.target("erp", source, tiers={"daily": {"keep_days": 1}}, destinations=[
        s3_destination(moto_s3, bucket, retention={"daily": {"keep_days": 10}}),
        ssh_destination(sshd, folder, retention={"daily": {"keep_days": 3, "min_keep": 2}})])])
    for _ in range(3):
        assert service.pgbeat("backup", "daily").returncode == 0
    moto_s3.client().put_object(Bucket=bucket, Key="pgbeat/daily/not-ours.txt", Body=b"someone else's")
    names = sorted(p.name for p in service.backups("daily"))

    def stored(where: str) -> list[str]:
        if where == "s3":
            objects = moto_s3.client().list_objects_v2(Bucket=bucket, Prefix="pgbeat/daily/").get("Contents", [])
            return sorted(o["Key"].rsplit("/", 1)[1] for o in objects
                          if o["Key"].endswith(".sql.gz") and ".globals." not in o["Key"])
        return sorted(line for line in sshd.ssh(f"ls {sshd.root / folder / 'daily'}").stdout.split()
                      if line.endswith(".sql.gz") and ".globals." not in line)

    assert stored("s3") == stored("ssh") == names
    in_5_days = (datetime.now(UTC) + timedelta(days=5)).isoformat()
    result = service.pgbeat("rotate", "--now", in_5_days)
    assert result.returncode == 0, result.stderr
    assert [p.name for p in service.backups("daily")] == names[-1:]  # local: 1 day, the floor keeps 1
    assert stored("s3") == names  # s3: 10 days
    assert stored("ssh") == names[-2:]  # ssh: 3 days, its floor keeps 2
    in_30_days = (datetime.now(UTC) + timedelta(days=30)).isoformat()
    assert service.pgbeat("rotate", "--now", in_30_days).returncode == 0
    assert stored("s3") == names[-1:]
    s3_keys = [o["Key"] for o in moto_s3.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert "pgbeat/daily/not-ours.txt" in s3_keys  # never deletes what it did not create


def test_destination_down_then_upload_retry_completes(workdir, pg, make_db, moto_s3, sshd):
    source = make_db("erp")
    pg.sql("CREATE TABLE t AS SELECT generate_series(1, 10) AS i", source)
    bucket, folder = moto_s3.new_bucket(), f"vault-{uuid.uuid4().hex[:6]}"
    down = ssh_destination(sshd, folder, port=free_port(), retries=2)
    service = Service(workdir, None, [pg.target("erp", source, destinations=[s3_destination(moto_s3, bucket), down])])
    result = service.pgbeat("backup", "daily")
    assert result.returncode == 1
    [local] = service.backups()
    assert service.pgbeat("verify", str(local)).returncode == 0  # the local copy is kept, whole
    copies = manifest_of(local)["copies"]
    assert copies["offsite-s3"]["status"] == "ok" and copies["vault"]["status"] == "failed"
    [daily] = [t for t in json.loads(service.pgbeat("status", "--json").stdout)["tiers"] if t["tier"] == "daily"]
    assert daily["kept"] == {"local": 1, "offsite-s3": 1} and daily["copies"] == ["local", "offsite-s3"]
    [failure] = [e for e in service.events() if e["kind"] == "failure"]
    assert failure["step"] == "upload" and any(line.startswith("vault:") for line in failure["details"])
    assert "retrying" in result.stderr or "attempt" in result.stderr.lower()

    service.config["targets"][0]["destinations"][1]["port"] = sshd.port
    service.write_config()
    retried = service.pgbeat("upload", "--retry")
    assert retried.returncode == 0, retried.stdout + retried.stderr
    assert manifest_of(local)["copies"]["vault"]["status"] == "ok"
    [daily] = [t for t in json.loads(service.pgbeat("status", "--json").stdout)["tiers"] if t["tier"] == "daily"]
    assert daily["kept"] == {"local": 1, "offsite-s3": 1, "vault": 1}
    remote = sshd.ssh(f"sha256sum {sshd.root / folder / 'daily' / local.name}").stdout.split()[0]
    assert remote == manifest_of(local)["sha256"]
    assert len(service.backups()) == 1  # no new dump


def test_altered_remote_copy_is_reported(workdir, pg, make_db, moto_s3):
    source = make_db("erp")
    pg.sql("CREATE TABLE t AS SELECT generate_series(1, 1000) AS i", source)
    bucket = moto_s3.new_bucket()
    service = Service(workdir, None, [pg.target("erp", source, destinations=[s3_destination(moto_s3, bucket)])])
    assert service.pgbeat("backup", "daily").returncode == 0
    assert service.pgbeat("verify", "--destination", "offsite-s3").returncode == 0
    [local] = service.backups()
    key = f"pgbeat/daily/{local.name}"
    client = moto_s3.client()
    original = client.get_object(Bucket=bucket, Key=key)
    body = bytearray(original["Body"].read())
    body[100] ^= 0xFF
    # Rewritten by something else (same size): the shallow check (metadata, S3's checksum) sees it.
    client.put_object(Bucket=bucket, Key=key, Body=bytes(body))
    for args in ((), ("--deep",)):
        result = service.pgbeat("verify", "--destination", "offsite-s3", *args)
        assert result.returncode == 3, result.stdout + result.stderr
        assert f"✗ daily/{local.name}" in result.stdout
    # Rewritten with pgbeat's metadata copied over: only reading it back (--deep) can tell.
    client.put_object(Bucket=bucket, Key=key, Body=bytes(body), Metadata=original["Metadata"])
    deep = service.pgbeat("verify", "--destination", "offsite-s3", "--deep")
    assert deep.returncode == 3 and f"✗ daily/{local.name}" in deep.stdout


def test_deep_verify_catches_a_flipped_byte_in_a_directory_copy_on_every_destination(workdir, pg, make_db, moto_s3,
                                                                                      fake_gcs, sshd):
    """One byte of one file of a directory-format copy flipped at the destination: `verify --destination
    --deep` exits 3 naming that copy, on S3, GCS and SSH alike; the intact copies still pass."""
    source = make_db("erp", DATA / "rich.sql")
    bucket, gcs_bucket, folder = moto_s3.new_bucket(), fake_gcs.new_bucket(), f"vault-{uuid.uuid4().hex[:6]}"
    gcs = {"name": "gcs", "kind": "gcs", "bucket": gcs_bucket, "prefix": "team", "endpoint": fake_gcs.url,
           "retries": 2}
    service = Service(workdir, None, [pg.target("erp", source, format="directory", jobs=2, destinations=[
        s3_destination(moto_s3, bucket), gcs, ssh_destination(sshd, folder)])])
    result = service.pgbeat("backup", "daily")
    assert result.returncode == 0, result.stdout + result.stderr
    [local] = service.backups("daily", ".dir")
    victim = max((p for p in local.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    relative = victim.relative_to(local).as_posix()
    flipped = bytearray(victim.read_bytes())
    flipped[len(flipped) // 2] ^= 0x01
    s3_key = f"pgbeat/daily/{local.name}/{relative}"
    gcs_blob = fake_gcs.client().bucket(gcs_bucket).blob(f"team/daily/{local.name}/{relative}")
    ssh_file = sshd.root / folder / "daily" / local.name / relative

    def flip(where: str) -> None:
        if where == "offsite-s3":  # with pgbeat's metadata copied over: only reading it back can tell
            client = moto_s3.client()
            original = client.get_object(Bucket=bucket, Key=s3_key)
            client.put_object(Bucket=bucket, Key=s3_key, Body=bytes(flipped), Metadata=original["Metadata"])
        elif where == "gcs":
            gcs_blob.upload_from_string(bytes(flipped))
        else:
            ssh_file.write_bytes(bytes(flipped))

    for where in ("offsite-s3", "gcs", "vault"):
        intact = service.pgbeat("verify", "--destination", where, "--deep")
        assert intact.returncode == 0, intact.stdout + intact.stderr
        assert f"✓ daily/{local.name}" in intact.stdout
        flip(where)
        damaged = service.pgbeat("verify", "--destination", where, "--deep")
        assert damaged.returncode == 3, damaged.stdout + damaged.stderr
        assert f"✗ daily/{local.name}" in damaged.stdout and relative in damaged.stdout
    assert service.pgbeat("verify", str(local)).returncode == 0  # the local backup is untouched


def test_gcs_copy_of_a_directory_backup_fetches_and_restores(workdir, pg, make_db, fake_gcs):
    source = make_db("erp", DATA / "rich.sql")
    bucket = fake_gcs.new_bucket()
    gcs = {"name": "gcs", "kind": "gcs", "bucket": bucket, "prefix": "team", "endpoint": fake_gcs.url, "retries": 2}
    service = Service(workdir, None, [pg.target("erp", source, format="directory", jobs=2, destinations=[gcs])])
    result = service.pgbeat("backup", "weekly")
    assert result.returncode == 0, result.stdout + result.stderr
    [local] = service.backups("weekly", ".dir")
    url = f"gs://{bucket}/team/weekly/{local.name}"
    fetched = workdir / "fetched"
    got = service.pgbeat("fetch", url, "--to", str(fetched))
    assert got.returncode == 0, got.stderr
    assert sorted(p.name for p in (fetched / local.name).iterdir()) == sorted(p.name for p in local.iterdir())
    expected = pg.dump_text(source)
    pg.sql("DELETE FROM erp.invoices", source)
    restored = service.pgbeat("restore", url, "--yes", "--jobs", "2")
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert pg.dump_text(source) == expected


def on_terminal(service: Service, *args: str, columns: int = 80) -> tuple[int, str]:
    """Run the real CLI on a pseudo-terminal `columns` wide; return its exit code and what the terminal shows."""
    env = {k: v for k, v in service.env().items() if k not in ("COLUMNS", "LINES")}
    child = pexpect.spawn(str(VENV_BIN / "pgbeat"), list(args), cwd=str(service.cwd), env=env, encoding="utf-8",
                          timeout=120, dimensions=(50, columns))
    text = child.read()
    child.close()
    return child.exitstatus, without_ansi(text)


def test_list_is_readable_at_80_columns_and_names_what_restore_takes(workdir, pg, make_db, moto_s3):
    source = make_db("erp", DATA / "rich.sql")
    name = "erp_production_main_database_eu_west"  # far longer than a column of 80 can give it
    bucket = moto_s3.new_bucket()
    service = Service(workdir, None, [pg.target(name, source, destinations=[s3_destination(moto_s3, bucket)])],
                      timezone="America/Sao_Paulo")
    for tier in ("daily", "weekly"):
        assert service.pgbeat("backup", tier).returncode == 0
    assert service.pgbeat("drill").returncode == 0
    [daily], [weekly] = service.backups("daily"), service.backups("weekly")

    def check_narrow(text: str, drilled: bool = True) -> None:
        assert all(len(line) <= 80 for line in text.splitlines()), text
        lines = [line.strip() for line in text.splitlines()]
        assert "…" not in text and name in lines, text  # the target's full name, as a heading
        assert "taken at (-03)" in text and "drill (-03)" in text, text  # the zone the times are in
        rows = [line for line in lines if " daily " in f" {line} " or " weekly " in f" {line} "]
        assert len(rows) == 2, text
        for row, manifest in zip(rows, (manifest_of(daily), manifest_of(weekly)), strict=True):
            taken = datetime.fromisoformat(manifest["server_time"] or manifest["started_at"]).astimezone(
                ZoneInfo("America/Sao_Paulo"))
            assert row.startswith(taken.strftime("%Y-%m-%d %H:%M")), (row, text)
            assert " verified " in row and "KB" in row, row
        # The drill took the newest; it is recorded in the local manifest (a destination's is the upload's).
        assert ("passed " in rows[1]) is drilled and rows[0].endswith("-"), text

    piped = service.pgbeat("list", COLUMNS="80")
    assert piped.returncode == 0, piped.stderr
    check_narrow(piped.stdout)
    code, text = on_terminal(service, "list")
    assert code == 0, text
    check_narrow(text)

    wide = service.pgbeat("list", "--wide", COLUMNS="80")  # full names on request, however narrow
    assert str(daily) in wide.stdout and str(weekly) in wide.stdout, wide.stdout
    listing = json.loads(service.pgbeat("list", "--json").stdout)
    assert [b["path"] for b in listing] == [str(daily), str(weekly)]

    code, text = on_terminal(service, "list", "--destination", "offsite-s3")
    assert code == 0, text
    check_narrow(text, drilled=False)
    wide = service.pgbeat("list", "--destination", "offsite-s3", "--wide", COLUMNS="80")
    url = f"s3://{bucket}/pgbeat/daily/{daily.name}"
    assert url in wide.stdout.split(), wide.stdout
    remote = json.loads(service.pgbeat("list", "--destination", "offsite-s3", "--json").stdout)
    assert [b["path"] for b in remote] == [url, f"s3://{bucket}/pgbeat/weekly/{weekly.name}"]
    shown = service.pgbeat("restore", url, "--list")  # the URL the listing shows is one restore takes
    assert shown.returncode == 0 and daily.name in shown.stdout, shown.stdout + shown.stderr
