"""The backup pipeline, declared once: every step, what it locks, how it retries, whether it always runs.

Both runners read this table and nothing else about the chain: the in-process runner
(pgbeat.pipeline.runner.run_inprocess) and the Celery chain (workers.chain builds one task per row,
workers.guard takes the declared locks in Redis). A restore's safety backup runs a plan of some of its
rows (pgbeat.pipeline.runner.Plan). A new step is a new row here and a function in pgbeat/steps/.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pgbeat import settings
from pgbeat.physical.basebackup import base_backup_step
from pgbeat.pipeline.record import Run, StepContext
from pgbeat.steps.compress import compress_step
from pgbeat.steps.dump import dump_step
from pgbeat.steps.notify import notify_step
from pgbeat.steps.rotate import rotate_step
from pgbeat.steps.upload import upload_step
from pgbeat.steps.verify import verify_step

# "target": one dump of a target at a time (an flock in-process, a Redis lease in Celery);
# "dump_slots": a slot of the database server's `per_host_dumps` and of the fleet's `max_dumps` (Celery
# only: one process runs one dump at a time anyway).
Lock = Literal["target", "dump_slots"]
StepFunction = Callable[[StepContext, Run], Run]


@dataclass(frozen=True)
class Step:
    """One row of the pipeline.

    `opens_run`: the step creates the run's work folder and writes the run log's first lines; before it
    first waits for its locks, the healthchecks start ping is sent (once per run).
    `retries_transient`: a transient PgbeatError is retried `reliability.retries` times with backoff.
    `always_runs`: the step runs after a failure too (with the failure in the record); it ends the run.
    `physical`: what the step does instead for a physical run (a base backup, pgbeat.physical); the
    steps without one do the same for both kinds (compress passes an already compressed stream through).
    """

    name: str
    function: StepFunction
    locks: frozenset[Lock] = frozenset()
    retries_transient: bool = True
    opens_run: bool = False
    always_runs: bool = False
    physical: StepFunction | None = None

    def function_for(self, run: Run) -> StepFunction:
        """The function that does this step for `run`: its physical one for a base backup, if it has one."""
        return self.physical if run.kind == "physical" and self.physical is not None else self.function


STEP_TABLE: tuple[Step, ...] = (
    Step("dump", dump_step, locks=frozenset({"target", "dump_slots"}), opens_run=True, physical=base_backup_step),
    Step("compress", compress_step),
    Step("verify", verify_step),
    Step("upload", upload_step),
    Step("rotate", rotate_step),
    Step("notify", notify_step, always_runs=True),
)
STEPS: tuple[str, ...] = tuple(step.name for step in STEP_TABLE)
BY_NAME: dict[str, Step] = {step.name: step for step in STEP_TABLE}
# The steps that run only while every step before them succeeded, and the ones that run whatever happened.
MAIN_STEPS: tuple[Step, ...] = tuple(step for step in STEP_TABLE if not step.always_runs)
FINAL_STEPS: tuple[Step, ...] = tuple(step for step in STEP_TABLE if step.always_runs)

# settings.py validates `time_limits` against a plain tuple of names (it must not import the steps):
# the table is the definition, the tuple must follow it.
assert settings.STEPS == STEPS, f"pgbeat.settings.STEPS {settings.STEPS} differ from the step table {STEPS}"
assert STEP_TABLE[: len(MAIN_STEPS)] == MAIN_STEPS, "steps that always run come last"


def step(name: str) -> Step:
    """Given a step's name, return its row. Raise KeyError if there is no such step."""
    return BY_NAME[name]
