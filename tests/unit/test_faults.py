"""Fault points fire only when named, once per marker folder, and really kill; recoveries never stop a run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from pgbeat import faults, startup

SCRIPT = "from pgbeat import faults; faults.declare('t.point', 'doc'); faults.fault_point('t.point'); print('passed')"


def run_point(tmp_path, spec: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGBEAT_FAULTS")}
    if spec is not None:
        env.update(PGBEAT_FAULTS=spec, PGBEAT_FAULTS_DIR=str(tmp_path))
    # SIGHUP as a dropped session sends it: not ignored as `nohup` (or a CI runner) may have left it.
    return subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=30,
                          preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))


def test_a_point_does_nothing_unless_named(tmp_path):
    assert run_point(tmp_path, None).stdout.strip() == "passed"
    assert run_point(tmp_path, "other.point=kill").stdout.strip() == "passed"


def test_a_named_point_kills_once_then_lets_the_next_run_pass(tmp_path):
    first = run_point(tmp_path, "t.point=kill")
    assert first.returncode == -signal.SIGKILL and "passed" not in first.stdout
    assert (tmp_path / "t.point.fired").exists()
    assert run_point(tmp_path, "t.point=kill").stdout.strip() == "passed"


def test_each_signal_action_sends_its_signal(tmp_path):
    for action, sig in faults.ACTIONS.items():
        folder = tmp_path / action
        folder.mkdir()
        assert run_point(folder, f"x.y=term,t.point={action}").returncode == -sig


def test_declared_points_are_listed_by_prefix():
    faults.declare("zz_test.b", "second")
    faults.declare("zz_test.a", "first")
    assert faults.declared("zz_test.") == {"zz_test.a": "first", "zz_test.b": "second"}


def test_a_failing_recovery_does_not_stop_the_others(monkeypatch):
    def broken(settings):
        raise RuntimeError("boom")

    def fine(settings):
        return ["removed one leftover"]

    monkeypatch.setattr(startup, "RECOVERIES", [broken, fine])
    assert startup.recover_host(None, "test") == ["removed one leftover"]
