"""Following runs on the workers from their state in Redis: the one loop every waiting command uses.

A run ends when its state says so (`ENDED`), or when a `watch` function, given a run's state, decides
that it never will (a restore whose worker died) and returns why. Nothing waits forever: after
`timeout` seconds the runs still going are returned as such, and go on (or are stopped by the caller).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from pgbeat.coordination.runs import RunState

ENDED = ("succeeded", "failed", "skipped")


@dataclass
class RunEnd:
    """How one followed run ended: its final state in Redis (`fields`), or `timed_out`."""

    run_id: str
    fields: dict[str, str] = field(default_factory=dict)
    timed_out: bool = False

    @property
    def status(self) -> str:
        return "timed out" if self.timed_out else self.fields.get("status", "pending")

    @property
    def failure(self) -> dict:
        """The recorded failure of a failed run (message, details, hint, error, ...), or {}."""
        return json.loads(self.fields.get("failure") or "{}")


def follow_runs(state: RunState, run_ids: Iterable[str], timeout: float, *,
                show: Callable[[str, str], None] = lambda run_id, line: None,
                on_end: Callable[[RunEnd], None] = lambda end: None,
                watch: Callable[[str, dict[str, str]], dict[str, str] | None] | None = None,
                interval: float = 0.2) -> dict[str, RunEnd]:
    """Follow `run_ids` until each has ended or `timeout` seconds pass; return how each ended.

    Each progress line of a run goes to `show(run_id, line)` as it appears, and each run's end to
    `on_end` as it comes. `watch(run_id, fields)`, called for a run still going, returns the fields to
    end it with (a failure it found: its worker died) or None.
    """
    pending = list(dict.fromkeys(run_ids))
    printed = dict.fromkeys(pending, 0)
    ends: dict[str, RunEnd] = {}
    deadline = time.monotonic() + timeout
    while True:
        for run_id in [r for r in pending if r not in ends]:
            fields = state.get(run_id)  # read before the progress lines, so none is missed at the end
            lines = state.progress_since(run_id, printed[run_id])
            printed[run_id] += len(lines)
            for line in lines:
                show(run_id, line)
            if fields.get("status") not in ENDED and watch is not None:
                fields = watch(run_id, fields) or fields
            if fields.get("status") in ENDED:
                ends[run_id] = RunEnd(run_id, fields)
                on_end(ends[run_id])
        if len(ends) == len(pending):
            return ends
        if time.monotonic() > deadline:
            return {**{r: RunEnd(r, timed_out=True) for r in pending}, **ends}
        time.sleep(interval)
