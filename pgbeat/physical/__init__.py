"""Physical backups for point-in-time recovery: base backups of whole clusters (the `base` tier)."""
