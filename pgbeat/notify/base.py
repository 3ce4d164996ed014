"""What a notification says, and the interface of a channel."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Protocol

from pgbeat import runlog
from pgbeat.pipeline.record import Run
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

    warnings: list[str] = field(default_factory=list)

    # What kind of news an event is, for a channel's `events` filter; every failure is a "failure".
    CATEGORIES = {"success": "success", "failure": "failure", "warning": "warning", "drill_passed": "drill",
                  "drill_failed": "failure", "restore_succeeded": "restore", "restore_failed": "failure"}

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def category(self) -> str:
        return self.CATEGORIES.get(self.kind, "failure")

    @property
    def failed(self) -> bool:
        return self.category == "failure"

    def title(self) -> str:
        what = {"success": "backup OK", "failure": f"backup FAILED at {self.step}", "warning": "backup WARNING",
                "drill_passed": "restore drill passed", "drill_failed": "restore drill FAILED",
                "restore_succeeded": "restore done", "restore_failed": "restore FAILED"}.get(self.kind, self.kind)
        return f"pgbeat: {self.target} {self.tier} {what}"

    def body(self) -> str:
        """The message text: everything a DBA needs to act, nothing secret."""
        lines = [self.title(), f"Target: {self.target}", f"Tier: {self.tier}"]
        if self.step:
            lines.append(f"Step: {self.step}")
        if self.reason:
            lines.append(f"Reason: {self.reason}")
        lines += [f"  {line}" for line in self.details]
        if self.hint:
            lines.append(f"Hint: {self.hint}")
        lines += [f"Warning: {w}" for w in self.warnings]
        if self.duration_s is not None:
            lines.append(f"Duration: {self.duration_s:.1f} s")
        if self.size is not None:
            lines.append(f"Size: {runlog.human_size(self.size)}")
        if self.file:
            lines.append(f"File: {self.file}")
        if self.log_file:
            lines.append(f"Log: {self.log_file}")
        lines += [f"Host: {self.node}", f"Run: {self.run_id}", f"At: {self.at}"]
        return "\n".join(lines)


class Notifier(Protocol):
    name: str

    def send(self, event: Event) -> None:
        """Deliver `event`; raise on failure (the caller logs it and carries on)."""
        ...


def event_from_run(settings: Settings, run: Run, now: datetime) -> Event:
    failure = run.failure
    return Event(
        kind="failure" if run.status == "failed" else "success",
        target=run.target, tier=run.tier, run_id=run.run_id, node=run.node, at=now.isoformat(),
        file=run.final_path, size=run.steps.verify.size if run.steps.verify else None,
        duration_s=round((now - run.started_at).total_seconds(), 3),
        step=failure and failure.step, reason=failure and failure.message,
        details=failure.details if failure else [], hint=failure and failure.hint,
        log_file=str(runlog.log_path(settings, run)),
        warnings=list(run.steps.rotate.errors) if run.steps.rotate else [],
    )
