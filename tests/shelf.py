"""What a backup root and a destination must hold after any run, killed or not: every backup whole (data,
manifest, `.sha256`, the globals file its manifest names), nothing half-published, no work folders, no
partial files; and backups that restore.

The kill tests (tests/integration/test_kill_matrix.py and others) check these after every recovery.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pgbeat.catalog.manifest import Manifest
from tests.support import PG_BIN, shlex_quote


@dataclass
class Shelved:
    """A backup as the planners (plan_rotation, the incremental chain's) see one, a local Entry or a
    RemoteEntry, without files."""

    path: str
    manifest: Manifest
    exists: bool = True

    @property
    def verified(self) -> bool:
        return self.manifest.status == "verified" and self.manifest.complete


MANIFEST = ".manifest.json"
SUMS = ".sha256"
AGE_MAGIC = b"age-encryption.org/v1"


def shelf_problems(backup_root: Path) -> list[str]:
    """Return what is wrong on the local shelf: work folders left, hidden or partial files, a data file
    without its sidecars, sidecars without their data file."""
    problems = []
    work = backup_root / ".work"
    if work.exists():
        problems += [f".work/{p.name} left behind" for p in sorted(work.iterdir())]
    for tier in ("daily", "weekly", "monthly"):
        folder = backup_root / tier
        if not folder.is_dir():
            continue
        names = set(os.listdir(folder))
        globals_files = {data["globals"]["file"] for name in names if name.endswith(MANIFEST)
                         and not name.startswith(".") and (data := _json_or_none(folder / name)) is not None
                         and data.get("globals")}
        for name in sorted(names):
            if ".globals." in name and not name.startswith("."):  # part of the backup whose manifest names it
                if name not in globals_files:
                    problems.append(f"{tier}/{name}: a globals file no backup's manifest names")
                continue
            if name.startswith("."):
                if name.endswith(MANIFEST + ".lock") and name[1:].removesuffix(".lock") in names:
                    continue  # the lock update_manifest keeps beside a manifest
                problems.append(f"{tier}/{name}: a hidden (partial or temporary) file")
            elif name.endswith(MANIFEST) or name.endswith(SUMS):
                data = name.removesuffix(MANIFEST).removesuffix(SUMS)
                if data not in names:
                    problems.append(f"{tier}/{name} without its data file")
            else:
                problems += [f"{tier}/{name} without {side}" for side in (MANIFEST, SUMS) if name + side not in names]
    return problems


def _json_or_none(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def manifest_of(path: Path) -> dict:
    return json.loads(path.with_name(path.name + MANIFEST).read_text())


def backups_of(backup_root: Path, target: str, tier: str = "daily") -> list[Path]:
    """The data files of `target`'s `tier` on the shelf, oldest first (by name)."""
    folder = backup_root / tier
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith(f"{target}_backup_{tier}_")
                  and not p.name.endswith((MANIFEST, SUMS)) and ".globals." not in p.name)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def remote_keys(s3_client, bucket: str, prefix: str) -> list[str]:
    keys, token = [], None
    while True:
        more = {"ContinuationToken": token} if token else {}
        page = s3_client.list_objects_v2(Bucket=bucket, Prefix=prefix, **more)
        keys += [o["Key"] for o in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return sorted(keys)
        token = page["NextContinuationToken"]


def remote_problems(s3_client, bucket: str, prefix: str, encrypted: set[str] = frozenset()) -> list[str]:
    """Return what is wrong at an S3 destination, read with boto3 (not pgbeat's code): a data object
    without its sidecars or the reverse, a globals object no manifest names, and, for the `encrypted`
    targets, any data object that is not age-encrypted."""
    keys = set(remote_keys(s3_client, bucket, prefix))
    named = set()  # the globals objects the manifests there name (each beside its backup)
    for key in keys:
        if key.endswith(MANIFEST):
            data = json.loads(s3_client.get_object(Bucket=bucket, Key=key)["Body"].read())
            if data.get("globals"):
                named.add(f"{key.rsplit('/', 1)[0]}/{data['globals']['file']}")
    problems = []
    for key in sorted(keys):
        if key.endswith((MANIFEST, SUMS)):
            if key.removesuffix(MANIFEST).removesuffix(SUMS) not in keys:
                problems.append(f"{key} without its data object")
            continue
        if ".globals." in key:
            if key not in named:
                problems.append(f"{key}: a globals object no manifest names")
        else:
            problems += [f"{key} without {side}" for side in (MANIFEST, SUMS) if key + side not in keys]
        target = key.rsplit("/", 1)[-1].split("_backup_")[0]
        if target in encrypted:
            head = s3_client.get_object(Bucket=bucket, Key=key, Range="bytes=0-63")["Body"].read()
            if not key.endswith(".age") or not head.startswith(AGE_MAGIC):
                problems.append(f"{key}: a plaintext object of a target with encryption")
    return problems


def restore_into(pg, backup: Path, db: str, identity: Path | None = None) -> None:
    """Restore a plain `.sql.gz` (or `.sql.gz.age`, with `identity`) the seed's way into database `db`."""
    read = f"gunzip -c {shlex_quote(backup)}"
    if backup.name.endswith(".age"):
        read = f"age -d -i {shlex_quote(identity)} {shlex_quote(backup)} | gunzip -c"
    cmd = (f"{read} | {PG_BIN / 'psql'} -X -q -v ON_ERROR_STOP=1 -h {pg.host} -p {pg.port} -U postgres "
           f"-d {shlex_quote(db)}")
    subprocess.run(["bash", "-o", "pipefail", "-c", cmd], check=True, capture_output=True)


def plant_expired(folder: Path, target: str, stamp: str = "20200101_020000", tier: str = "daily",
                  destination: str | None = None, encrypted: bool = False) -> Path:
    """Write an expired backup of `target` (data, manifest, `.sha256`, digests right) into `folder`, as
    rotation finds one; with `destination`, its manifest says it is that destination's good copy."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{target}_backup_{tier}_{stamp}.sql.gz{'.age' if encrypted else ''}"
    data.write_bytes((AGE_MAGIC if encrypted else b"\x1f\x8b") + b" expired, not a real dump")
    digest = sha256_of(data)
    started = datetime.strptime(stamp, "%Y%m%d_%H%M%S").replace(tzinfo=UTC).isoformat()
    manifest = {"pgbeat_manifest": 1, "run_id": f"expired-{stamp}", "target": target, "tier": tier,
                "file": data.name, "format": "plain", "codec": "gzip", "size": data.stat().st_size,
                "sha256": digest, "md5": hashlib.md5(data.read_bytes()).hexdigest(), "complete": True,
                "started_at": started,
                "copies": {destination: {"status": "ok"}} if destination else {}}
    data.with_name(data.name + MANIFEST).write_text(json.dumps(manifest))
    data.with_name(data.name + SUMS).write_text(f"{digest}  {data.name}\n")
    for path in (data, data.with_name(data.name + MANIFEST), data.with_name(data.name + SUMS)):
        path.chmod(0o600)
    return data


def upload_folder(s3_client, bucket: str, prefix: str, files: list[Path]) -> None:
    for path in files:
        for name in (path.name, path.name + MANIFEST, path.name + SUMS):
            s3_client.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=(path.parent / name).read_bytes())


def make_age_key(folder: Path) -> tuple[Path, str]:
    """A throwaway age identity made by the real `age-keygen`; return (identity file, recipient)."""
    key = folder / f"age-key-{os.getpid()}-{len(list(folder.glob('age-key-*')))}.txt"
    result = subprocess.run(["age-keygen", "-o", str(key)], capture_output=True, text=True, check=True)
    return key, result.stderr.strip().split("Public key: ")[1]


def forget_copy(s3_client, bucket: str, prefix: str, backup: Path, destination: str) -> None:
    """Make `backup` lack its copy at `destination` again: its record and the objects there go."""
    from pgbeat.catalog.manifest import update_manifest

    update_manifest(backup.with_name(backup.name + MANIFEST), lambda m: m.copies.pop(destination, None))
    for key in remote_keys(s3_client, bucket, f"{prefix}/{backup.name}"):
        s3_client.delete_object(Bucket=bucket, Key=key)


# A `pgbeat` process whose imports are done: it forks a child per command, and the child runs the CLI's
# main() as `pgbeat ARGS` would, with the command's environment and working directory, then exits with
# its code (or dies of the signal a fault point sent). Only the interpreter's start-up is skipped.
WARM_DRIVER = r"""
import json, os, sys, traceback
import pgbeat.cli, pgbeat.pipeline.runner  # what `pgbeat backup` imports, once
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
            for fd, name in ((1, "stdout"), (2, "stderr")):
                os.dup2(os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
            pgbeat.cli.main(request["args"], prog_name="pgbeat")
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    print(json.dumps({"rc": rc}), flush=True)
"""


class WarmCli:
    """Run `pgbeat` commands of a Service through one driver process that imported pgbeat already; the
    same results as `Service.pgbeat` (returncode, stdout, stderr), without a second of start-up each."""

    def __init__(self, service, folder: Path) -> None:
        from tests.support import VENV_BIN

        self.service, self.folder, self.count = service, folder, 0
        folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([str(VENV_BIN / "python"), "-c", WARM_DRIVER], cwd=service.cwd,
                                     env=service.env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def pgbeat(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        self.count += 1
        out, err = self.folder / f"{self.count}.out", self.folder / f"{self.count}.err"
        request = {"args": list(args), "env": self.service.env(**env), "cwd": str(self.service.cwd),
                   "stdout": str(out), "stderr": str(err)}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        rc = json.loads(self.proc.stdout.readline())["rc"]
        return subprocess.CompletedProcess(["pgbeat", *args], rc, out.read_text(), err.read_text())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)
