"""Encryption means nothing leaves in plaintext, also for backups taken before it was turned on; and a new
destination catches up a few older backups per run, `pgbeat upload --retry` all of them.

What reaches the destination is listed and read with boto3, not with pgbeat's code.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from tests.shelf import (
    AGE_MAGIC,
    backups_of,
    make_age_key,
    manifest_of,
    remote_keys,
    remote_problems,
    sha256_of,
    shelf_problems,
)
from tests.storage_servers import S3_ACCESS_KEY, S3_SECRET
from tests.support import Service

pytestmark = pytest.mark.integration


def data_keys(s3, bucket: str) -> list[str]:
    return [k for k in remote_keys(s3, bucket, "pgbeat/")
            if not k.endswith((".manifest.json", ".sha256")) and ".globals." not in k]


def test_plaintext_backups_go_off_site_encrypted_a_few_per_run(workdir, pg, make_db, moto_s3):
    db = make_db("catchup")
    pg.sql("CREATE TABLE t AS SELECT i, md5(i::text) AS h FROM generate_series(1, 300) AS i", db)
    service = Service(workdir, None, [pg.target("erp", db), pg.target("erp_dir", db, format="directory", jobs=2)],
                      reliability={"copy_backlog_per_run": 1})
    for _ in range(3):
        assert service.pgbeat("backup", "daily", "--target", "erp").returncode == 0
    assert service.pgbeat("backup", "daily", "--target", "erp_dir").returncode == 0
    plaintext = backups_of(service.backup_root, "erp")
    digests = {p: sha256_of(p) for p in plaintext}
    assert len(plaintext) == 3 and not any(p.name.endswith(".age") for p in plaintext)

    key, recipient = make_age_key(workdir)
    s3, bucket = moto_s3.client(), moto_s3.new_bucket()
    destination = {"name": "offsite", "kind": "s3", "bucket": bucket, "prefix": "pgbeat", "region": "us-east-1",
                   "endpoint_url": moto_s3.url, "access_key_id": S3_ACCESS_KEY, "secret_access_key": S3_SECRET}
    for target in service.config["targets"]:
        target.update(encryption={"recipients": [recipient]}, destinations=[destination])
    service.config["targets"][1].update(format="custom", jobs=1)  # directory + encryption is not a valid config
    service.write_config()

    backup = service.pgbeat("backup", "daily", "--target", "erp")
    assert backup.returncode == 0, backup.stdout + backup.stderr
    [new] = [p for p in backups_of(service.backup_root, "erp") if p not in digests]
    # This run's backup and one older one (the newest), encrypted on the way out: bounded work per run.
    assert data_keys(s3, bucket) == sorted([f"pgbeat/daily/{new.name}", f"pgbeat/daily/{plaintext[-1].name}.age"])
    assert remote_problems(s3, bucket, "pgbeat/", {"erp", "erp_dir"}) == []

    retry = service.pgbeat("upload", "--retry")
    assert retry.returncode == 0, retry.stdout + retry.stderr
    assert data_keys(s3, bucket) == sorted([f"pgbeat/daily/{new.name}"] + [f"pgbeat/daily/{p.name}.age"
                                                                            for p in plaintext])
    assert remote_problems(s3, bucket, "pgbeat/", {"erp", "erp_dir"}) == []  # every object age-encrypted
    for path in plaintext:  # the local files stay as they were; the copy's manifest knows its plaintext
        assert sha256_of(path) == digests[path]
        remote = json.loads(s3.get_object(Bucket=bucket, Key=f"pgbeat/daily/{path.name}.age.manifest.json")["Body"]
                            .read())
        assert remote["file"] == path.name + ".age" and remote["encryption"]["plaintext"]["sha256"] == digests[path]
        body = s3.get_object(Bucket=bucket, Key=f"pgbeat/daily/{path.name}.age")["Body"].read()
        assert body.startswith(AGE_MAGIC) and remote["sha256"] == hashlib.sha256(body).hexdigest()
    [directory] = backups_of(service.backup_root, "erp_dir")  # a folder cannot be one encrypted file
    assert manifest_of(directory)["copies"]["offsite"]["status"] == "skipped"
    assert not any("erp_dir" in k for k in remote_keys(s3, bucket, "pgbeat/"))
    again = service.pgbeat("upload", "--retry")
    assert again.returncode == 0 and len(data_keys(s3, bucket)) == 4  # nothing sent twice

    oldest = f"s3://{bucket}/pgbeat/daily/{plaintext[0].name}.age"
    into = f"{db}_from_s3"
    try:
        restored = service.pgbeat("restore", oldest, "--into", into, "--identity", str(key))
        assert restored.returncode == 0, restored.stdout + restored.stderr
        assert pg.dump_text(into) == pg.dump_text(db)
    finally:
        pg.dropdb(into)
    scrub = service.pgbeat("verify", "--destination", "offsite", "--deep")
    assert scrub.returncode == 0, scrub.stdout + scrub.stderr
    assert shelf_problems(service.backup_root) == []
