"""The runner contract over the step table: what the in-process runner and the Celery chain share.

Everything here is derived from `STEP_TABLE`, so a new row is covered without anyone remembering to add
it. The same rules on the real Celery chain and the real CLI: tests/integration/test_pipeline_contract.py.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import threading
import time

import pytest
import yaml
from celery import Celery

from pgbeat import settings as settings_module
from pgbeat.coordination.filelock import FileLock
from pgbeat.errors import DumpError, LockHeldError, TransientDumpError
from pgbeat.faults import InjectedTransientError
from pgbeat.pipeline import runner
from pgbeat.pipeline.record import (
    CompressResult,
    DumpResult,
    NotifyResult,
    RotateResult,
    Run,
    StepContext,
    StepResults,
    UploadResult,
    VerifyResult,
    new_run,
)
from pgbeat.pipeline.steps_table import FINAL_STEPS, MAIN_STEPS, STEP_TABLE, STEPS
from pgbeat.settings import Settings, load_settings


@pytest.fixture
def settings(monkeypatch, tmp_path) -> Settings:
    for key in list(os.environ):
        if key.startswith(("DB_", "CELERY_", "PGBEAT_", "TARGET_NAME", "BACKUP_ROOT")):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "pgbeat.yaml"
    path.write_text(yaml.safe_dump({
        "backup_root": str(tmp_path / "backups"), "timezone": "UTC", "node": "contract",
        "reliability": {"retries": 2, "retry_backoff": 3, "retry_backoff_max": 5, "lock_wait": 30},
        "targets": [{"name": "erp", "host": "127.0.0.1", "port": 5432, "dbname": "erp", "user": "postgres"}],
    }))
    monkeypatch.setenv("PGBEAT_CONFIG", str(path))
    return load_settings(env_file=None)


def test_the_table_is_the_one_definition_of_the_chain(settings, own_celery_app):
    """STEPS, the settings' names, the Celery tasks and the Celery chain all come from the table."""
    from workers.chain import build_chain

    assert STEPS == tuple(row.name for row in STEP_TABLE) == settings_module.STEPS
    assert {row.name: row.function for row in STEP_TABLE} == runner.STEP_FUNCTIONS
    assert [row.name for row in STEP_TABLE if row.opens_run] == [STEPS[0]]
    assert STEP_TABLE == MAIN_STEPS + FINAL_STEPS and FINAL_STEPS
    for row in STEP_TABLE:  # every row is a Celery task of the same name, over the same guard
        task = getattr(importlib.import_module(f"tasks.{row.name}"), row.name)
        assert task.name == f"tasks.{row.name}"
    run = new_run(settings, settings.target("erp"), "daily")
    signature = build_chain(Celery("contract"), settings, run)
    assert [task.task for task in signature.tasks] == [f"tasks.{name}" for name in STEPS]
    assert signature.tasks[0].args == (run.as_json(),)
    assert [errback.task for errback in signature.options["link_error"]] == ["tasks.chain_failed"]


@pytest.mark.parametrize("row", STEP_TABLE, ids=STEPS)
def test_one_retry_rule_for_every_step(settings, row):
    """A transient failure is retried with the configured backoff, `retries` times; nothing else is."""
    delays = [runner.retry_delay(settings, row, TransientDumpError("server gone"), n) for n in range(4)]
    if row.retries_transient:
        assert delays == [3, 5, None, None] == [*runner.backoff_delays(settings), None, None]
    else:
        assert delays == [None] * 4
    assert runner.retry_delay(settings, row, DumpError("syntax"), 0) is None
    assert runner.retry_delay(settings, row, ValueError("bug"), 0) is None
    assert runner.retry_delay(settings, row, LockHeldError("busy"), 0) == (3 if row.retries_transient else None)


# What a faked step records: the least result of each kind.
RESULTS = {"dump": DumpResult(path="dump.sql", size=0, started_at="2025-11-19T02:00:00+00:00"),
           "compress": CompressResult(path="x.sql.gz", size=0, codec="gzip"),
           "verify": VerifyResult(path="x.sql.gz", size=0), "upload": UploadResult(), "rotate": RotateResult(),
           "notify": NotifyResult(event="success")}


def test_the_record_has_one_typed_result_per_step_of_the_table():
    assert tuple(StepResults.model_fields) == STEPS
    assert set(RESULTS) == set(STEPS)
    steps = {name: result.model_dump(mode="json") for name, result in RESULTS.items()}
    run = Run.model_validate({**new_run_fields(), "steps": steps})
    assert [name for name, _ in run.steps.items()] == list(STEPS)
    assert Run.model_validate(run.as_json()) == run  # what Celery carries from step to step loads back the same
    with pytest.raises(ValueError):  # a result of the wrong shape is refused where it is made, not read later
        Run.model_validate({**new_run_fields(), "steps": {"dump": {"path": "x", "size": "big"}}})


def new_run_fields() -> dict:
    return {"run_id": "0" * 32, "target": "erp", "tier": "daily", "node": "n", "started_at": "2025-11-19T02:00:00Z",
            "stamp": "20251119_020000", "name": "erp_backup_daily_20251119_020000.sql.gz", "format": "plain",
            "codec": "gzip", "level": 6, "work_dir": "/nonexistent"}


def faked_plan(calls: list[str], failing: set[str]) -> runner.Plan:
    """The table with each step's function replaced by one that records its call and fails transiently the
    first time for the steps in `failing` (the rows' locks, retries and order are the table's)."""

    def fake(name: str):
        def function(ctx: StepContext, run: Run) -> Run:
            calls.append(name)
            if name in failing:
                failing.discard(name)
                raise InjectedTransientError(f"{name} fails once", step=name)
            setattr(run.steps, name, RESULTS[name])
            if name == "upload":
                run.final_path = str(ctx.settings.backup_root / "daily" / run.name)
            return run
        return function

    return runner.Plan(steps=tuple(dataclasses.replace(row, function=fake(row.name)) for row in STEP_TABLE))


def test_in_process_runner_retries_every_transient_step_and_pings_start_once(settings, monkeypatch):
    """Each step failing transiently once: the in-process runner retries each with the configured
    backoff (as the Celery guard does, through the same `retry_delay`) and completes; one start ping."""
    pings: list[str] = []
    monkeypatch.setattr(runner.healthchecks, "ping", lambda target, what, *a, **k: pings.append(what))
    calls: list[str] = []
    slept: list[float] = []
    events: list[tuple[str, str]] = []
    run = runner.run_inprocess(settings, "erp", "daily", plan=faked_plan(calls, set(STEPS)), sleep=slept.append,
                               on_event=lambda run, step, state: events.append((step, state)))
    assert run.status != "failed" and run.failure is None, run.failure
    assert calls == [name for name in STEPS for _ in range(2)]
    assert slept == [3] * len(STEPS)
    assert events == [(name, state) for name in STEPS for state in ("started", "done")]
    assert pings == ["start"]


def test_in_process_failure_runs_the_final_steps_with_the_failure(settings, monkeypatch):
    """A step that keeps failing: retried `retries` times, the run fails there, and the steps that always
    run still run (with the failure in the record)."""
    monkeypatch.setattr(runner.healthchecks, "ping", lambda *a, **k: True)
    calls: list[str] = []
    failing = MAIN_STEPS[1].name
    plan = faked_plan(calls, set())

    def always_fails(ctx, run):
        calls.append(failing)
        raise TransientDumpError("still gone")

    plan = runner.Plan(steps=tuple(dataclasses.replace(row, function=always_fails) if row.name == failing else row
                                   for row in plan.steps))
    slept: list[float] = []
    run = runner.run_inprocess(settings, "erp", "daily", plan=plan, sleep=slept.append)
    assert run.status == "failed" and run.failure.step == failing
    assert calls == [STEPS[0], failing, failing, failing, *(row.name for row in FINAL_STEPS)]
    assert slept == runner.backoff_delays(settings)
    assert not run.work().exists()


def test_in_process_runner_waits_for_a_held_target_lock(settings, monkeypatch):
    """The rows' declared target lock: a dump waits while another process holds the target (as the Celery
    guard waits for the Redis lease), then runs."""
    monkeypatch.setattr(runner.healthchecks, "ping", lambda *a, **k: True)
    locking = [row for row in STEP_TABLE if "target" in row.locks]
    assert locking, "the table declares the target lock on the dump"
    held = FileLock(settings.backup_root, "target-erp")
    assert held.acquire()
    calls: list[str] = []
    result: list[Run] = []
    worker = threading.Thread(target=lambda: result.append(runner.run_inprocess(
        settings, "erp", "daily", plan=faked_plan(calls, set()), sleep=lambda _: None)))
    worker.start()
    time.sleep(1.5)
    assert calls == [] and worker.is_alive()  # waiting, not failed
    held.release()
    worker.join(20)
    assert not worker.is_alive() and calls == list(STEPS) and result[0].failure is None


def test_a_plan_of_some_steps_takes_no_lock_and_announces_nothing(settings, monkeypatch):
    """A restore's safety backup: a subset of the rows, no locks, no start ping, no run log."""
    pings: list[str] = []
    monkeypatch.setattr(runner.healthchecks, "ping", lambda target, what, *a, **k: pings.append(what))
    held = FileLock(settings.backup_root, "target-erp")
    assert held.acquire()
    try:
        calls: list[str] = []
        full = faked_plan(calls, {STEPS[0]})
        plan = runner.Plan(steps=full.steps[:3], locks=False, announce=False)
        run = new_run(settings, settings.target("erp"), "pre_restore")
        slept: list[float] = []
        run = runner.run_steps(StepContext(settings), run, plan, sleep=slept.append)
    finally:
        held.release()
    assert calls == [STEPS[0], *STEPS[:3]] and slept == [3]
    assert pings == [] and not (settings.backup_root / "logs").exists()
