"""Helper of `bench/run.py --celery`, run with pgbeat's own Python because it uses pgbeat's Celery app.

    PGBEAT_CONFIG=... python bench/celery_probe.py TARGET RUNS TIMEOUT

Send `tasks.backup` for TARGET's daily tier RUNS times, one after another (each waits for the previous
chain to finish), and print one JSON line per run: the run id, its final status, `total_s` (from just
before sending to the worker's last run-state update, after notify: both clocks are this machine's) and
`steps_s`, each step's own duration as the step recorded it.
"""

from __future__ import annotations

import json
import sys
import time
import uuid

from pgbeat.coordination import redis_client
from pgbeat.coordination.runs import RunState
from pgbeat.settings import get_settings
from workers.app import app

FINISHED = ("succeeded", "failed", "skipped")


def main() -> int:
    target, runs, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    state = RunState(redis_client(get_settings()))
    for _ in range(runs):
        run_id = uuid.uuid4().hex
        sent = time.time()
        app.send_task("tasks.backup", args=[target, "daily"], task_id=run_id)
        deadline = time.monotonic() + timeout
        fields = state.get(run_id)
        while fields.get("status") not in FINISHED:
            if time.monotonic() > deadline:
                print(json.dumps({"run_id": run_id, "status": "timeout", "state": fields}), flush=True)
                return 1
            time.sleep(0.02)  # the end time comes from the worker, so polling only costs CPU
            fields = state.get(run_id)
        record = json.loads(fields.get("done:notify") or "{}")
        steps = {name: info.get("duration_s") for name, info in record.get("steps", {}).items()}
        print(json.dumps({"run_id": run_id, "status": fields["status"], "total_s": float(fields["updated_at"]) - sent,
                          "steps_s": steps, "failure": fields.get("failure")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
