"""The benchmark harness runs end to end in its tiny size: a smoke test that never looks at times."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.support import ROOT, make_tempdir

pytestmark = pytest.mark.integration

EXPECTED_ROWS = (
    "ceiling", "seed", "gzip_pipe", "pigz_pipe", "zstd_pipe", "pgbeat_default", "pgbeat_dump_first",
    "pgbeat_stream_zstd", "pg_dump_custom", "pgbeat_custom", "pg_dump_dir_j2", "pg_dump_dir_j2_z0",
    "pgbeat_directory_j2", "restore_psql", "pgbeat_restore_plain", "pg_restore_custom_j2",
    "pgbeat_restore_custom_j2", "pg_restore_dir_j2", "pgbeat_restore_dir_j2",
)
# Rows that must be measured here whatever this pgbeat supports (plain PostgreSQL tools and today's pgbeat).
ALWAYS_MEASURED = ("ceiling", "seed", "gzip_pipe", "pgbeat_default", "pg_dump_custom", "pgbeat_custom",
                   "pg_dump_dir_j2", "pg_dump_dir_j2_z0", "pgbeat_directory_j2", "restore_psql",
                   "pg_restore_custom_j2", "pg_restore_dir_j2")


@pytest.fixture
def bench_dir():
    path = make_tempdir("pgbeat-bench-test-")  # reachable by the postgres user, unlike pytest's tmp_path
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_bench_tiny_prints_its_table_and_writes_json(bench_dir):
    results = bench_dir / "results.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--size", "tiny", "--runs", "1",
                           "--json", str(results), "--workdir", str(bench_dir)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    table_lines = proc.stdout.splitlines()
    for name in EXPECTED_ROWS:
        assert any(line.startswith(("│ ", "| ")) and f" {name} " in line for line in table_lines), name
    assert f"results: {results}" in proc.stdout

    data = json.loads(results.read_text())
    assert data["meta"]["size"] == "tiny" and data["meta"]["raw_dump_bytes"] > 0
    rows = {row["name"]: row for row in data["pipelines"]}
    assert list(rows) == list(EXPECTED_ROWS)
    for name in ALWAYS_MEASURED:
        assert rows[name]["status"] == "ok", (name, rows[name].get("error"))
    for name, row in rows.items():
        if row["status"] != "ok":
            assert row["status"].startswith("n/a"), (name, row["status"], row.get("error"))
            assert not row["samples"]
            continue
        assert row["samples"], name
        for sample in row["samples"]:
            assert sample["exit_code"] == 0 and sample["wall_s"] > 0, (name, sample)
            assert sample["rss_tree_peak_bytes"] > 0, (name, sample)
            if name != "ceiling":  # the ceiling writes to /dev/null; its output is the raw dump size
                assert sample["output_bytes"] > 0 and sample["ceiling_wall_s"] > 0, (name, sample)
            if row["kind"] == "restore":
                assert sample["rows_match"] is True, name
        assert row["summary"]["output_bytes_median"] > 0, name
    assert rows["pgbeat_default"]["samples"][0]["steps"].keys() >= {"dump", "compress", "verify"}
