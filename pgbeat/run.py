"""The run record: the small JSON document that travels from step to step (never file contents).

Each step reads what the previous steps recorded, does its work on local files, and returns the record
with its own section filled in under `steps[<name>]`. The same record drives the in-process chain and
the Celery chain; `StepContext` carries what must not travel (settings with secrets, the cancel event).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from pgbeat.catalog import STAMP_FORMAT, backup_name, extension
from pgbeat.process import CancelEvent
from pgbeat.settings import Settings, Target

WORK_DIR = ".work"


class Run(BaseModel):
    run_id: str
    target: str
    tier: str
    node: str
    started_at: datetime
    stamp: str = Field(description="YYYYMMDD_HHMMSS in the configured time zone; part of the file name")
    name: str = Field(description="the backup's final file name")
    format: str
    codec: str
    level: int
    slot: str | None = Field(None, description="the scheduled slot this run serves (beat runs only)")
    work_dir: str
    steps: dict[str, dict[str, Any]] = Field(default_factory=dict)
    final_path: str | None = None
    status: str = "running"
    failure: dict[str, Any] | None = None

    def work(self, *parts: str) -> Path:
        return Path(self.work_dir, *parts)

    def step(self, name: str) -> dict[str, Any]:
        return self.steps.get(name, {})

    @property
    def artifact(self) -> Path:
        """The file (or folder) the next step works on: the newest step's `path`."""
        for name in ("verify", "compress", "dump"):
            path = self.steps.get(name, {}).get("path")
            if path:
                return Path(path)
        raise ValueError("no artifact yet: the dump step has not run")

    def as_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def clock() -> datetime:
    return datetime.now(UTC)


@dataclass
class StepContext:
    """What a step needs besides the record: resolved settings and ways to be stopped."""

    settings: Settings
    cancel: CancelEvent = field(default_factory=CancelEvent)
    now: Callable[[], datetime] = clock
    # The connection to dump when it is not the run's configured target (a restore's safety backup).
    target_override: Target | None = None

    def target(self, run: Run) -> Target:
        return self.target_override or self.settings.target(run.target)


def new_run(settings: Settings, target: Target, tier: str, *, run_id: str | None = None,
            slot: str | None = None, now: datetime | None = None) -> Run:
    """Return the record of a new run of `target`'s `tier` backup, named after its start time."""
    started = now or clock()
    stamp = started.astimezone(settings.tz).strftime(STAMP_FORMAT)
    run_id = run_id or uuid.uuid4().hex
    return Run(
        run_id=run_id, target=target.name, tier=tier, node=settings.node, started_at=started, stamp=stamp,
        name=backup_name(target.name, tier, stamp, extension(target.format, target.compression.codec)),
        format=target.format, codec=target.compression.codec, level=target.compression.level, slot=slot,
        work_dir=str(settings.backup_root / WORK_DIR / run_id),
    )
