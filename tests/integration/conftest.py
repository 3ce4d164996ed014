"""Servers for the integration tests that ask for them: storage (moto S3, fake-gcs-server, sshd) and an
HTTP receiver (webhooks, healthchecks pings)."""

import pytest

from tests.receivers import HttpReceiver
from tests.storage_servers import fake_gcs, moto_s3, moto_s3_auth, sshd  # noqa: F401


@pytest.fixture
def http():
    receiver = HttpReceiver()
    yield receiver
    receiver.stop()
