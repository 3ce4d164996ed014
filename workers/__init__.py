"""The Celery side of pgbeat: the app, its reliability settings, routing, and signal hooks."""
