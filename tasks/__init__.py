"""Celery tasks: one module per chain step, each a thin wrapper over the core step in `pgbeat/`."""
