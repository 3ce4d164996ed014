"""Where backups are kept: one small interface (`base.Storage`) and one module per kind of destination.

The SDKs (boto3, google-cloud-storage, paramiko) are imported when a backend first talks to its
destination, so importing this package stays cheap.
"""

from pgbeat.storage.base import ObjectInfo, Storage
from pgbeat.storage.gcs import GCSStorage
from pgbeat.storage.local import LocalStorage
from pgbeat.storage.s3 import S3Storage
from pgbeat.storage.ssh import SSHStorage
from pgbeat.storage.wrappers import RetryingStorage, ThrottledStorage

__all__ = ["GCSStorage", "LocalStorage", "ObjectInfo", "RetryingStorage", "S3Storage", "SSHStorage", "Storage",
           "ThrottledStorage"]
