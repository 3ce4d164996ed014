"""The notify step: tell the world how a run ended. It always runs, after success and after failure.

It writes the seed's closing lines, records the attempt (status and metrics read it), adds the warnings
that are not failures (a much smaller dump, tables gone, little disk), and sends the outcome through
every channel of the target (pgbeat.notify) and the healthchecks ping. Where a step may be delivered
again (Celery), the step context's `once` claims each channel's delivery of each outcome first, so a
notify step run again after a kill never sends an outcome twice on a channel.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

from pgbeat import faults, runlog
from pgbeat.catalog.manifest import BackupWarning, find_backup, manifest_path, record_attempt, update_manifest
from pgbeat.errors import PgbeatError
from pgbeat.monitoring.anomaly import backup_warnings, disk_warnings
from pgbeat.notify import event_from_run, healthchecks, send_event
from pgbeat.pipeline.record import NotifyResult, Run, StepContext

log = logging.getLogger(__name__)

NOTIFY_SENT = faults.declare("notify.sent", "the channels have the outcome; the warning event and the "
                                           "healthcheck ping are not sent yet")


def notify_step(ctx: StepContext, run: Run) -> Run:
    """Record the run's outcome in its log and send it to every channel; return the record."""
    t0 = time.monotonic()
    if run.status == "running":  # every earlier step succeeded: a failure sets "failed" before notify
        run.status = "succeeded"
    settings = ctx.settings
    event = event_from_run(settings, run, ctx.now())
    entry = find_backup(Path(run.final_path)) if run.final_path else None
    if event.kind == "success" and entry is not None:
        found = [BackupWarning(kind="rotate", text=w) for w in event.warnings] + backup_warnings(settings, entry)
        event.warnings = [w.text for w in found]
        if found:
            update_manifest(manifest_path(entry.path), lambda m: m.record_warnings(found))
    elif event.kind == "failure":
        event.warnings += [w.text for w in disk_warnings(settings.backup_root, settings.monitoring)]
    try:
        record_attempt(settings.backup_root, run.target, run.tier, {
            "status": event.kind, "at": event.at, "run_id": run.run_id, "duration_s": event.duration_s,
            "size": event.size, "step": event.step, "reason": event.reason, "file": event.file})
    except PgbeatError as exc:  # a full disk: the notification matters more than the record
        log.warning("cannot record the attempt: %s", exc.message)
    once = ctx.once or (lambda what: True)
    if not once(f"notify:{event.kind}:runlog"):
        pass  # written by an earlier delivery of this step
    elif event.kind == "success":
        runlog.write(ctx.settings, run, ctx.now(), f"Backup concluído com sucesso em {event.duration_s}s",
                     *(f"WARNING: {w}" for w in event.warnings))
    else:
        runlog.write(ctx.settings, run, ctx.now(), f"ERROR: backup falhou na etapa {event.step}: {event.reason}",
                     *(f"  {line}" for line in event.details), *( [f"HINT: {event.hint}"] if event.hint else []))
    sent, failed = send_event(settings, event, ctx.once)
    faults.fault_point(NOTIFY_SENT)
    if event.warnings and event.kind == "success":
        send_event(settings, replace(event, kind="warning"), ctx.once)
    target = settings.resolve(run.target)
    if target is not None and once(f"notify:{event.kind}:healthcheck"):
        healthchecks.ping(target, "success" if event.kind == "success" else "fail", event.body())
    run.steps.notify = NotifyResult(event=event.kind, sent=sent, failed=failed, warnings=event.warnings,
                                    duration_s=round(time.monotonic() - t0, 3))
    return run
