"""The deployment files under deploy/, checked by their own tools (promtool, systemd-analyze, docker compose)
and against the interfaces they depend on: the commands and the metric names of `pgbeat metrics` and Flower.

Fast (a few seconds); no service is started. A tool that is missing and cannot be installed skips its tests
with the reason.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pgbeat.settings import Reliability

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
RULES = PROMETHEUS / "pgbeat-alerts.yml"
SYSTEMD = DEPLOY / "systemd"
UNITS = {path.stem: path for path in sorted(SYSTEMD.glob("*.service"))}
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "pgbeat.json"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
VENV_BIN = Path(sys.executable).parent

# The metrics the rules and the dashboard may use: what `pgbeat metrics` serves and what Flower exports.
PGBEAT_METRICS = frozenset({
    "pgbeat_wal_receiver_streaming",
    "pgbeat_wal_receiver_last_segment_timestamp_seconds",
    "pgbeat_backup_last_success_timestamp_seconds",
    "pgbeat_backup_last_attempt_timestamp_seconds",
    "pgbeat_backup_last_status",
    "pgbeat_backup_last_duration_seconds",
    "pgbeat_backup_last_size_bytes",
    "pgbeat_backup_expected_interval_seconds",
    "pgbeat_backup_first_due_timestamp_seconds",
    "pgbeat_backup_size_anomaly",
    "pgbeat_backups_kept",
    "pgbeat_backups_future_dated",
    "pgbeat_backup_last_clock_skew_seconds",
    "pgbeat_drill_last_timestamp_seconds",
    "pgbeat_drill_last_status",
    "pgbeat_drill_last_duration_seconds",
    "pgbeat_backup_root_free_bytes",
    "pgbeat_backup_root_used_bytes",
    "pgbeat_backup_root_total_bytes",
    "pgbeat_drill_expected_interval_seconds",
    "pgbeat_drill_first_due_timestamp_seconds",
    "pgbeat_runs_stuck",
    "pgbeat_queue_oldest_age_seconds",
    "pgbeat_wal_archive_gaps",
    "pgbeat_wal_window_start_timestamp_seconds",
    "pgbeat_wal_window_end_timestamp_seconds",
    "pgbeat_wal_server_reachable",
    "pgbeat_wal_archive_lag_segments",
    "pgbeat_wal_archive_lag_seconds",
    "pgbeat_wal_archive_failing",
    "pgbeat_wal_archive_failed_count",
})
FLOWER_METRICS = frozenset({
    "flower_worker_online",
    "flower_events_total",
    "flower_task_runtime_seconds_bucket",
    "flower_worker_number_of_currently_executing_tasks",
})
METRIC_NAME = re.compile(r"\b(?:pgbeat|flower)_[a-z0-9_]+")

# The fixed commands of the services (systemd escapes Celery's %h as %%h).
COMMANDS = {
    "pgbeat-worker": "celery -A workers.app worker -l INFO -n worker@%%h",
    "pgbeat-beat": "celery -A workers.app beat -l INFO",
    "pgbeat-flower": "celery -A workers.app flower --port=5555 "
                     "--task-runtime-metric-buckets=1,10,60,300,1800,3600,7200,14400,28800,inf "
                     "--tasks-columns=name,state,exception,retries,received,runtime,worker,routing_key "
                     "--natural-time=True --max-tasks=10000 --persistent=True --db=/var/lib/pgbeat-flower/flower "
                     "--state-save-interval=60000",
    "pgbeat-metrics": "pgbeat metrics --listen 127.0.0.1:9810",
    "pgbeat-receive": "pgbeat receive",
}
HARDENING = {
    "NoNewPrivileges": "yes", "PrivateTmp": "yes", "PrivateDevices": "yes", "ProtectSystem": "strict",
    "ProtectHome": "yes", "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes", "RestrictNamespaces": "yes", "RestrictSUIDSGID": "yes", "LockPersonality": "yes",
    "UMask": "0077", "CapabilityBoundingSet": "", "SystemCallArchitectures": "native", "User": "pgbeat",
    "EnvironmentFile": "/etc/pgbeat/pgbeat.env",
}
COMPOSE_ENV = {"REDIS_PASSWORD": "redis-secret", "FLOWER_BASIC_AUTH": "admin:flower-secret",
               "GRAFANA_ADMIN_PASSWORD": "grafana-secret"}


def run(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def load_yaml(path: Path):
    with path.open() as stream:
        return yaml.safe_load(stream)


# --- Prometheus -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def promtool() -> str:
    """Return promtool's path, installing Debian's prometheus package through scripts/system-deps.sh if needed."""
    if not shutil.which("promtool"):
        result = run("bash", str(ROOT / "scripts" / "system-deps.sh"), "promtool")
        if result.returncode != 0 or not shutil.which("promtool"):
            pytest.skip(f"promtool (Debian package prometheus) is missing and could not be installed: "
                        f"{(result.stderr or result.stdout).strip()}")
    return shutil.which("promtool")


def alert_rules() -> list[dict]:
    return [rule for group in load_yaml(RULES)["groups"] for rule in group["rules"] if "alert" in rule]


def dashboard_queries() -> list[str]:
    """Every PromQL query of the dashboard: the panels' targets and the template variables."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            queries.append(variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"])
    return queries


def test_promtool_checks_the_alert_rules(promtool):
    result = run(promtool, "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus-compose.yml"])
def test_promtool_checks_the_scrape_config(promtool, config):
    result = run(promtool, "check", "config", str(PROMETHEUS / config))
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = {job["job_name"] for job in load_yaml(PROMETHEUS / config)["scrape_configs"]}
    assert jobs == {"pgbeat", "flower"}


def test_alert_rule_unit_tests_pass(promtool):
    result = run(promtool, "test", "rules", "tests.yml", cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_tested_firing_and_quiet_when_healthy():
    tests = load_yaml(PROMETHEUS / "tests.yml")["tests"]
    fired = {case["alertname"] for test in tests for case in test["alert_rule_test"] if case["exp_alerts"]}
    [healthy] = [test for test in tests if test["name"].startswith("healthy")]
    quiet = {case["alertname"] for case in healthy["alert_rule_test"] if not case["exp_alerts"]}
    names = {rule["alert"] for rule in alert_rules()}
    assert names - fired == set(), "alerts with no test that makes them fire"
    assert names - quiet == set(), "alerts not asserted quiet on a healthy deployment"


def test_every_alert_has_for_severity_and_names_what_it_is_about():
    for rule in alert_rules():
        name, annotations = rule["alert"], rule.get("annotations", {})
        assert rule.get("for"), f"{name}: no `for:`"
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert annotations.get("summary") and annotations.get("description"), name
        text = annotations["summary"] + annotations["description"]
        metrics = set(METRIC_NAME.findall(rule["expr"]))
        if any(m.startswith("pgbeat_backup_") and not m.startswith("pgbeat_backup_root") for m in metrics):
            assert "$labels.target" in text and "$labels.tier" in text, f"{name} must name the target and tier"
        if any(m.startswith("pgbeat_drill_") for m in metrics):
            assert "$labels.target" in text, f"{name} must name the target"


def test_dashboard_queries_parse(promtool, tmp_path):
    """promtool has no expression checker: the dashboard's queries become recording rules it parses."""
    substitutions = {"$__rate_interval": "5m", "$target": ".*", "$tier": ".*"}
    rules = []
    for number, query in enumerate(dashboard_queries()):
        expr = query
        for variable, value in substitutions.items():
            expr = expr.replace(variable, value)
        if expr.startswith("label_values("):  # a Grafana function: check the selector inside it
            expr = re.match(r"label_values\((.*), *\w+\)$", expr).group(1)
        rules.append({"record": f"dashboard:query_{number}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run(promtool, "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_and_dashboard_use_only_known_metrics():
    used = {name: "alert rules" for rule in alert_rules() for name in METRIC_NAME.findall(rule["expr"])}
    used.update({name: "dashboard" for query in dashboard_queries() for name in METRIC_NAME.findall(query)})
    unknown = {name: where for name, where in used.items() if name not in PGBEAT_METRICS | FLOWER_METRICS}
    assert unknown == {}
    # Every pgbeat metric shows somewhere (alert or panel): a new metric needs a place.
    assert PGBEAT_METRICS - set(used) == set()


def test_the_known_metrics_are_those_pgbeat_metrics_serves_and_documents():
    """PGBEAT_METRICS above, the gauges metrics.py makes and the list in its docstring: one set of names."""
    import pgbeat.monitoring.metrics as metrics

    served = set(re.findall(r'gauge\(\s*"(pgbeat_[a-z0-9_]+)"', Path(metrics.__file__).read_text()))
    assert served == PGBEAT_METRICS
    assert set(METRIC_NAME.findall(metrics.__doc__)) == PGBEAT_METRICS


# --- Grafana ----------------------------------------------------------------------------------------------


def test_dashboard_is_valid_and_uses_the_provisioned_data_source():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "pgbeat" and dashboard["title"]
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    [datasource] = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    [variable] = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert variable["current"]["value"] == datasource["uid"]
    cells = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        area = {(grid["x"] + dx, grid["y"] + dy) for dx in range(grid["w"]) for dy in range(grid["h"])}
        assert not cells & area, f"panel {panel['title']!r} overlaps another"
        cells |= area
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"] and all(t["expr"] and t["refId"] for t in panel["targets"]), panel["title"]


def test_dashboard_provider_points_where_compose_mounts_the_dashboards():
    [provider] = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "pgbeat.yml")["providers"]
    mounts = load_yaml(COMPOSE)["services"]["grafana"]["volumes"]
    assert f"../grafana/dashboards:{provider['options']['path']}:ro" in mounts


# --- systemd ----------------------------------------------------------------------------------------------


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Given a unit file, return {section: {key: [values in order]}} (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, _, value = line.partition("=")
            current.setdefault(key.strip(), []).append(value.strip())
    return sections


def seconds(span: str) -> int:
    units = {"h": 3600, "min": 60, "m": 60, "s": 1}
    return sum(int(number) * units[unit] for number, unit in re.findall(r"(\d+)\s*(min|h|m|s)", span))


def test_units_are_the_five_services():
    assert set(UNITS) == set(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_unit_runs_its_command_hardened(name):
    unit = parse_unit(UNITS[name])
    service = unit["Service"]
    [exec_start] = service["ExecStart"]
    assert exec_start == f"/opt/pgbeat/.venv/bin/{COMMANDS[name]}"
    for key, value in HARDENING.items():
        assert service.get(key) == [value], f"{name}: {key}={service.get(key)}"
    families = set(service["RestrictAddressFamilies"][0].split())
    assert families == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert service["SystemCallFilter"][0] == "@system-service"
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_worker_stops_warm_and_waits_for_the_longest_step():
    service = parse_unit(UNITS["pgbeat-worker"])["Service"]
    assert service["KillMode"] == ["mixed"] and service["KillSignal"] == ["SIGTERM"]
    reliability = Reliability()
    longest_hard_limit = max(reliability.time_limits.values()) + 60
    assert seconds(service["TimeoutStopSec"][0]) >= max(longest_hard_limit, reliability.visibility_timeout)
    # The worker writes the backup root; the env example's BACKUP_ROOT must be that path.
    env = dict(line.split("=", 1) for line in (SYSTEMD / "pgbeat.env.example").read_text().splitlines()
               if line and not line.startswith("#"))
    assert service["ReadWritePaths"] == [env["BACKUP_ROOT"]]
    assert env["PGPASSFILE"] and env["FLOWER_ADDRESS"] == "127.0.0.1"
    # The receiver archives WAL into the backup root, as the worker does.
    assert parse_unit(UNITS["pgbeat-receive"])["Service"]["ReadWritePaths"] == [env["BACKUP_ROOT"]]
    for other in ("pgbeat-beat", "pgbeat-flower", "pgbeat-metrics"):
        paths = parse_unit(UNITS[other])["Service"].get("ReadWritePaths", [])
        assert all(path == env["BACKUP_ROOT"] + "/.state" for path in paths), other


def test_flower_admits_loopback_only_and_needs_credentials():
    service = parse_unit(UNITS["pgbeat-flower"])["Service"]
    assert service["IPAddressDeny"] == ["any"] and service["IPAddressAllow"] == ["localhost"]
    [check] = service["ExecStartPre"]
    assert 'test -n "$$FLOWER_BASIC_AUTH"' in check, "Flower must refuse to start without credentials"


def flower_options(command: list[str]) -> dict[str, str]:
    """Given Flower's command line, return its options (after `flower`) as {name: value}."""
    return dict(arg.removeprefix("--").split("=", 1) for arg in command[command.index("flower") + 1:])


def test_flower_options_are_flowers_own_and_keep_state_in_the_state_directory():
    """Each option of the unit is one Flower knows, with a value of its type; the columns exist; the task
    history is bounded and saved under the unit's StateDirectory (the Compose service mounts a volume there)."""
    from flower.options import options as known
    from flower.views.tasks import TASK_COLUMNS

    options = flower_options(COMMANDS["pgbeat-flower"].split())
    for name, value in options.items():
        assert name in known._options, f"--{name} is not a Flower option"
        known._options[name].parse(value)  # raises on a value of the wrong type
    columns = options["tasks-columns"].split(",")
    assert set(columns) <= set(TASK_COLUMNS) and {"name", "state", "exception", "worker"} <= set(columns)
    assert options["persistent"] == "True" and 0 < int(options["max-tasks"]) <= 100_000
    assert 0 < int(options["state-save-interval"]) <= 300_000  # a crash loses at most 5 minutes of history
    service = parse_unit(UNITS["pgbeat-flower"])["Service"]
    assert service["StateDirectory"] == ["pgbeat-flower"] and service["StateDirectoryMode"] == ["0700"]
    assert options["db"].startswith("/var/lib/pgbeat-flower/")
    flower = load_yaml(COMPOSE)["services"]["flower"]
    assert flower_options(flower["command"]) == options
    assert "flower-state:/var/lib/pgbeat-flower" in flower["volumes"]
    dockerfile = (DEPLOY / "compose" / "Dockerfile").read_text()
    assert re.search(r"install -d -o pgbeat -g pgbeat -m 0700 [^\n]*/var/lib/pgbeat-flower", dockerfile)


# --- Restart policies: every way a process ends brings it back -------------------------------------------

# Every way a pgbeat process (worker, beat, Flower, metrics) can end, from running them (README, "What
# survives what"; tests/integration/test_schedule_faults.py): each must bring it back, except an invalid
# configuration (exit 2), which no restart can fix.
EXITS = {
    ("exit", 0): "clean, but not asked for: a worker's remote shutdown, a SIGTERM or SIGINT from outside systemd",
    ("exit", 1): "a crash; a worker whose Redis dropped mid-step or stayed away for 100 reconnection attempts",
    ("exit", 2): "an invalid configuration",
    ("exit", 3): "any other code (pgbeat's CLI codes 3-5)",
    ("exit", 4): "any other code",
    ("exit", 5): "any other code",
    ("signal", "SIGKILL"): "the OOM killer, or `kill -9`",
    ("signal", "SIGSEGV"): "a crash in a C extension",
    ("signal", "SIGABRT"): "an abort",
    ("signal", "SIGTERM"): "a signal systemd counts as clean (a process without a handler for it)",
    ("signal", "SIGHUP"): "a signal systemd counts as clean",
    ("signal", "SIGINT"): "a signal systemd counts as clean",
    ("signal", "SIGPIPE"): "a signal systemd counts as clean",
}
SIGNAL_NUMBERS = {"SIGHUP": 1, "SIGINT": 2, "SIGABRT": 6, "SIGKILL": 9, "SIGSEGV": 11, "SIGPIPE": 13, "SIGTERM": 15}


def systemd_restarts(service: dict[str, list[str]], outcome: tuple[str, int | str]) -> bool:
    """Given a unit's [Service] settings and how its main process ended, return whether systemd restarts it.

    systemd.service(5), "Exit causes and the effect of the Restart= settings": exit 0 and the signals
    SIGHUP, SIGINT, SIGTERM and SIGPIPE are clean (so are SuccessExitStatus=); RestartPreventExitStatus=
    wins over Restart=, RestartForceExitStatus= forces a restart.
    """
    kind, value = outcome

    def listed(key: str) -> bool:
        return str(value) in " ".join(service.get(key, [])).split()

    if listed("RestartPreventExitStatus"):
        return False
    if listed("RestartForceExitStatus"):
        return True
    clean = (value == 0 if kind == "exit" else value in {"SIGHUP", "SIGINT", "SIGTERM", "SIGPIPE"})
    clean = clean or listed("SuccessExitStatus")
    unclean_signal = kind == "signal" and not clean
    return {"no": False, "always": True, "on-success": clean, "on-failure": not clean,
            "on-abnormal": unclean_signal, "on-abort": unclean_signal, "on-watchdog": False,
            }[service.get("Restart", ["no"])[-1]]


def compose_restarts(service: dict, outcome: tuple[str, int | str]) -> bool:
    """Given a Compose service and how its process ended, return whether Docker restarts the container.

    A process killed by a signal exits 128 + its number; "on-failure" restarts non-zero exits (a bounded
    "on-failure:N" eventually gives up, so it counts as no); "always" and "unless-stopped" restart any exit.
    """
    kind, value = outcome
    code = value if kind == "exit" else 128 + SIGNAL_NUMBERS[value]
    policy = str(service.get("restart", "no"))
    return policy in ("always", "unless-stopped") or (policy == "on-failure" and code != 0)


def test_the_restart_models_follow_the_documented_tables():
    """The models must be able to say no: on-failure does not restart an exit 0 (what the units had)."""
    assert not systemd_restarts({"Restart": ["on-failure"]}, ("exit", 0))
    assert not systemd_restarts({"Restart": ["on-failure"]}, ("signal", "SIGTERM"))
    assert systemd_restarts({"Restart": ["on-failure"]}, ("signal", "SIGKILL"))
    assert not systemd_restarts({"Restart": ["always"], "RestartPreventExitStatus": ["2"]}, ("exit", 2))
    assert not systemd_restarts({}, ("exit", 1))
    assert not compose_restarts({"restart": "on-failure"}, ("exit", 0))
    assert compose_restarts({"restart": "on-failure"}, ("signal", "SIGTERM"))
    assert not compose_restarts({"restart": "on-failure:5"}, ("exit", 1)) and not compose_restarts({}, ("exit", 1))


@pytest.mark.parametrize("outcome", sorted(EXITS, key=str), ids=lambda o: f"{o[0]}-{o[1]}")
@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_unit_comes_back_from_every_exit_but_a_bad_config(name, outcome):
    service = parse_unit(UNITS[name])["Service"]
    assert systemd_restarts(service, outcome) == (outcome != ("exit", 2)), f"{name}: {EXITS[outcome]}"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_unit_restarts_never_give_up_and_never_spin(name):
    unit = parse_unit(UNITS[name])
    # systemd's default start limit stops restarting after 5 starts in 10 s, for good.
    assert unit["Unit"].get("StartLimitIntervalSec") == ["0"], name
    assert seconds(unit["Service"]["RestartSec"][0]) >= 5, name


@pytest.mark.parametrize("outcome", sorted(EXITS, key=str), ids=lambda o: f"{o[0]}-{o[1]}")
def test_every_compose_service_comes_back_from_every_exit(outcome):
    # Compose cannot exempt exit 2 as systemd does: a bad configuration restarts too (with Docker's backoff).
    for name, service in load_yaml(COMPOSE)["services"].items():
        assert compose_restarts(service, outcome), f"{name}: {EXITS[outcome]}"


@pytest.fixture(scope="module")
def units_with_local_venv(tmp_path_factory) -> Path:
    """The units with /opt/pgbeat/.venv/bin replaced by this venv's bin, so that ExecStart binaries exist."""
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed (package systemd); the units' settings are still parsed")
    folder = tmp_path_factory.mktemp("units")
    for path in UNITS.values():
        (folder / path.name).write_text(path.read_text().replace("/opt/pgbeat/.venv/bin/", f"{VENV_BIN}/"))
    return folder


def test_systemd_analyze_verify_accepts_the_units(units_with_local_venv):
    names = sorted(path.name for path in units_with_local_venv.glob("*.service"))
    result = run("systemd-analyze", "verify", "--man=no", *names, cwd=units_with_local_venv)
    # verify exits 0 on unknown keys too: any message is a failure.
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_systemd_analyze_security_rates_the_units_ok(units_with_local_venv, name):
    result = run("systemd-analyze", "security", "--offline=yes", "--threshold=20", "--no-pager",
                 f"{name}.service", cwd=units_with_local_venv)
    assert result.returncode == 0, result.stdout[-600:] + result.stderr
    assert re.search(r"Overall exposure level for .*: [01]\.\d OK", result.stdout), result.stdout[-300:]


# --- Docker Compose ---------------------------------------------------------------------------------------


def test_compose_file_keeps_one_broker_and_a_safe_redis():
    """Structure checks that need no Docker: the same broker everywhere, Redis noeviction + AOF, one beat."""
    compose = load_yaml(COMPOSE)
    services = compose["services"]
    assert set(services) == {"redis", "worker", "beat", "flower", "metrics", "prometheus", "grafana"}
    redis = " ".join(services["redis"]["command"])
    assert "--maxmemory-policy noeviction" in redis and "--appendonly yes" in redis
    assert "deploy" not in services["beat"] and "scale" not in services["beat"]


@pytest.fixture(scope="module")
def docker_compose() -> list[str]:
    docker = shutil.which("docker")
    if not docker or run(docker, "compose", "version").returncode != 0:
        pytest.skip("the docker client with the compose plugin is not installed: `docker compose config` not run")
    return [docker, "compose", "-f", str(COMPOSE)]


def compose_config(docker_compose, tmp_path, **env) -> subprocess.CompletedProcess:
    env_file = tmp_path / "compose.env"
    env_file.write_text("".join(f"{key}={value}\n" for key, value in env.items()))
    clean = {key: value for key, value in os.environ.items() if key not in COMPOSE_ENV and key != "PGBEAT_YAML"}
    return run(*docker_compose, "--env-file", str(env_file), "config", "--format", "json", env=clean)


def test_docker_compose_config_resolves(docker_compose, tmp_path):
    result = compose_config(docker_compose, tmp_path, **COMPOSE_ENV)
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    broker = f"redis://:{COMPOSE_ENV['REDIS_PASSWORD']}@redis:6379/0"
    celery = ("worker", "beat", "flower", "metrics")
    for name in celery:
        environment = services[name]["environment"]
        assert environment["CELERY_BROKER_URL"] == broker, name
        assert environment["CELERY_RESULT_BACKEND"] == broker[:-1] + "1", name
        assert environment["BACKUP_ROOT"] == "/var/backups/pgbeat", name
        assert services[name]["init"] is True and services[name]["read_only"] is True, name
    worker = services["worker"]
    assert worker["command"] == COMMANDS["pgbeat-worker"].replace("%%", "%").split()
    assert seconds(worker["stop_grace_period"]) >= Reliability().visibility_timeout
    assert services["beat"]["command"] == COMMANDS["pgbeat-beat"].split()
    # Flower reads FLOWER_BASIC_AUTH from its environment: never on its command line (ps shows that).
    assert services["flower"]["environment"]["FLOWER_BASIC_AUTH"] == COMPOSE_ENV["FLOWER_BASIC_AUTH"]
    assert not any("basic-auth" in arg for arg in services["flower"]["command"])
    published = {name: [port["host_ip"] for port in service.get("ports", [])] for name, service in services.items()}
    assert published == {"redis": [], "worker": [], "beat": [], "metrics": [],
                         "flower": ["127.0.0.1"], "prometheus": ["127.0.0.1"], "grafana": ["127.0.0.1"]}
    rule_mounts = {(m["source"], m["target"]) for m in services["prometheus"]["volumes"] if m["type"] == "bind"}
    assert (str(RULES), "/etc/prometheus/pgbeat-alerts.yml") in rule_mounts


def test_docker_compose_refuses_to_run_flower_without_a_password(docker_compose, tmp_path):
    env = {key: value for key, value in COMPOSE_ENV.items() if key != "FLOWER_BASIC_AUTH"}
    result = compose_config(docker_compose, tmp_path, **env)
    assert result.returncode != 0 and "FLOWER_BASIC_AUTH" in result.stderr
