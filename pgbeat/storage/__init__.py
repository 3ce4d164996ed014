"""Where backups are kept: one small interface (`base.Storage`) and one module per kind of destination."""

from pgbeat.storage.base import ObjectInfo, Storage
from pgbeat.storage.local import LocalStorage
from pgbeat.storage.wrappers import RetryingStorage, ThrottledStorage

__all__ = ["LocalStorage", "ObjectInfo", "RetryingStorage", "Storage", "ThrottledStorage"]
