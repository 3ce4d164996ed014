"""What a notification says, and the interface of a channel."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Protocol

from pgbeat import runlog
from pgbeat.run import Run
from pgbeat.settings import Settings


@dataclass
class Event:
    """The outcome of one run, as every channel receives it. It never holds a secret."""

    kind: str  # "success" or "failure"
    target: str
    tier: str
    run_id: str
    node: str
    at: str
    file: str | None = None
    size: int | None = None
    duration_s: float | None = None
    step: str | None = None  # the step that failed
    reason: str | None = None
    details: list[str] = field(default_factory=list)  # e.g. the last lines of pg_dump's stderr
    hint: str | None = None
    log_file: str | None = None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    def title(self) -> str:
        if self.kind == "success":
            return f"pgbeat: {self.target} {self.tier} backup OK"
        return f"pgbeat: {self.target} {self.tier} backup FAILED at {self.step}"


class Notifier(Protocol):
    name: str

    def send(self, event: Event) -> None:
        """Deliver `event`; raise on failure (the caller logs it and carries on)."""
        ...


def event_from_run(settings: Settings, run: Run, now: datetime) -> Event:
    failure = run.failure or {}
    return Event(
        kind="failure" if run.status == "failed" else "success",
        target=run.target, tier=run.tier, run_id=run.run_id, node=run.node, at=now.isoformat(),
        file=run.final_path, size=run.step("verify").get("size"),
        duration_s=round((now - run.started_at).total_seconds(), 3),
        step=failure.get("step"), reason=failure.get("message"), details=failure.get("details", []),
        hint=failure.get("hint"), log_file=str(runlog.log_path(settings, run)),
    )
