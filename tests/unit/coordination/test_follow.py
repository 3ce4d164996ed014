"""The one loop that follows runs (pgbeat.coordination.follow) and the exit codes of how runs end."""

from __future__ import annotations

import json
import time

from pgbeat import actions, errors
from pgbeat.coordination.follow import RunEnd, follow_runs
from pgbeat.restore.on_worker import outcome_of


class ScriptedState:
    """A run state whose runs move through `script[run_id]`: one list of (fields, progress lines) per poll."""

    def __init__(self, script: dict[str, list[tuple[dict, list[str]]]]) -> None:
        self.script = script
        self.polls = dict.fromkeys(script, 0)
        self.lines: dict[str, list[str]] = {run_id: [] for run_id in script}

    def get(self, run_id: str) -> dict[str, str]:
        steps = self.script[run_id]
        fields, lines = steps[min(self.polls[run_id], len(steps) - 1)]
        self.polls[run_id] += 1
        self.lines[run_id] += lines
        return dict(fields)

    def progress_since(self, run_id: str, start: int) -> list[str]:
        return self.lines[run_id][start:]


def test_every_line_is_shown_once_and_each_end_is_told_once():
    state = ScriptedState({
        "a": [({"status": "running"}, ["dump started"]), ({"status": "running"}, ["dump done"]),
              ({"status": "succeeded", "final_path": "/x"}, ["notify done"])],
        "b": [({"status": "failed", "failure": json.dumps({"message": "boom", "error": "LockHeldError"})}, [])],
    })
    shown, ended = [], []
    ends = follow_runs(state, ["a", "b"], 10, show=lambda r, line: shown.append((r, line)), on_end=ended.append,
                       interval=0)
    assert shown == [("a", "dump started"), ("a", "dump done"), ("a", "notify done")]
    assert [e.run_id for e in ended] == ["b", "a"] and set(ends) == {"a", "b"}
    assert ends["a"].status == "succeeded" and ends["b"].failure["message"] == "boom"
    assert actions.backups_exit_code([ends["a"], ends["b"]]) == errors.EXIT_LOCKED


def test_it_never_waits_forever():
    state = ScriptedState({"a": [({"status": "running"}, [])]})
    started = time.monotonic()
    ends = follow_runs(state, ["a"], 0.3, interval=0.05)
    assert time.monotonic() - started < 2
    assert ends["a"].timed_out and ends["a"].status == "timed out"
    assert actions.backups_exit_code(list(ends.values())) == errors.EXIT_FAILED


def test_a_watch_ends_a_run_its_state_never_will():
    state = ScriptedState({"a": [({}, [])]})
    ends = follow_runs(state, ["a"], 10, watch=lambda run_id, fields: {"status": "failed"}, interval=0)
    assert ends["a"].status == "failed" and not ends["a"].timed_out


def test_exit_codes_come_from_the_error_classes():
    assert errors.exit_code_of("LockHeldError") == errors.EXIT_LOCKED
    assert errors.exit_code_of("VerifyError") == errors.EXIT_VERIFY
    assert errors.exit_code_of("TransientDumpError") == errors.EXIT_FAILED
    assert errors.exit_code_of("KeyError") == errors.EXIT_FAILED
    assert errors.exit_code_of(None) == errors.EXIT_FAILED
    recorded = errors.LockHeldError("Another backup of erp is running", hint="wait").to_json()
    assert errors.error_from_record(recorded).exit_code == errors.EXIT_LOCKED
    assert errors.error_from_record({**recorded, "exit_code": 3}).exit_code == 3  # as the task recorded it


def test_a_recorded_failure_renders_as_the_error_did():
    error = errors.DumpError("pg_dump failed", hint="check the server", details=["FATAL: no"])
    assert errors.error_from_record(error.to_json()).render() == error.render()


def test_a_restore_outcome_is_the_recorded_failure_rendered():
    failure = errors.VerifyError("checksum mismatch", hint="fetch it again", details=["sha256 differs"]).to_json()
    outcome = outcome_of(RunEnd("r", {"status": "failed", "failure": json.dumps(failure)}))
    assert outcome.exit_code == errors.EXIT_VERIFY
    assert outcome.lines == ["checksum mismatch", "  sha256 differs", "HINT: fetch it again"]
    done = outcome_of(RunEnd("r", {"status": "succeeded", "database": "erp", "duration_s": "1.5", "safety_backup": ""}))
    assert done.exit_code == 0 and done.lines == ["succeeded: erp restored in 1.5s; safety backup -"]
