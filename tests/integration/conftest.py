"""Storage servers (moto S3, fake-gcs-server, sshd) for the integration tests that ask for them."""

from tests.storage_servers import fake_gcs, moto_s3, moto_s3_auth, sshd  # noqa: F401
