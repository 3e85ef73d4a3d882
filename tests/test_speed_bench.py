"""The speed benchmark (bench/run.py): what each load run reports as the
app's and the database's CPU per request, and the speed targets each report
prints."""

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import psycopg
import pytest

ROOT = Path(__file__).resolve().parent.parent
had_secret = "SECRET_KEY" in os.environ
spec = importlib.util.spec_from_file_location("speed_bench", ROOT / "bench" / "run.py")
run = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run)
if not had_secret:  # bench/run.py sets one for the servers it starts; the tests of settings want none
    os.environ.pop("SECRET_KEY", None)


def burn(seconds):
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_process_cpu_counts_this_process_and_knows_no_missing_one():
    before = run.process_cpu(os.getpid())
    burn(0.2)
    after = run.process_cpu(os.getpid())
    assert after - before >= 0.15  # clock ticks: 10 ms each
    assert run.process_cpu(2**22 + 1) is None  # above Linux's largest pid


def test_cpu_per_request_counts_connections_opened_during_the_run_from_nothing():
    assert run.cpu_per_request(1.0, 1.5, 1000) == 0.5
    # pid 7 existed before with 2 s; pid 9 was opened during the run; pid 5 closed.
    assert run.cpu_per_request({5: 1.0, 7: 2.0}, {7: 2.5, 9: 0.5}, 500) == 2.0
    assert run.cpu_per_request(None, 1.0, 10) is None
    assert run.cpu_per_request({}, None, 10) is None
    assert run.cpu_per_request(1.0, 2.0, 0) is None


def test_backend_cpu_finds_the_app_connections_of_the_database(database_url):
    with (
        psycopg.connect(database_url, application_name="whoknows") as app_conn,
        psycopg.connect(database_url, application_name="someone else") as other,
    ):
        app_conn.execute("SELECT count(*) FROM generate_series(1, 200000)").fetchone()
        cpu = run.backend_cpu(database_url)
        assert app_conn.info.backend_pid in cpu
        assert other.info.backend_pid not in cpu
        assert cpu[app_conn.info.backend_pid] >= 0


def test_a_server_with_workers_counts_them_all():
    """WORKERS > 1: the app's CPU and RSS are its process's and its workers' together."""
    script = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\ntime.sleep(60)\n"
    worker = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 20
        while (run.process_cpu(worker.pid) or 0) < 0.25:
            assert time.monotonic() < deadline, "the worker did not burn its CPU"
            time.sleep(0.1)
        cpu = run.server_cpu(os.getpid())
        assert set(cpu) >= {os.getpid(), worker.pid} and cpu[worker.pid] >= 0.25
        sampler = run.RssSampler(os.getpid())
        sampler.start()
        time.sleep(1.2)
        sampler.running = False
        alone = psutil.Process().memory_info().rss / 2**20
        together = alone + psutil.Process(worker.pid).memory_info().rss / 2**20
        assert sampler.samples
        rss, pss, largest = sampler.samples[-1]
        assert abs(rss - together) < 0.5 * (together - alone)
        assert largest == pytest.approx(alone, rel=0.2)
        assert 0 < pss <= rss
    finally:
        worker.kill()
        worker.wait()


def search_rows(figures, conns=8):
    """Report rows for the /api/search runs: figures is [(req/s, p99 ms)] in SEARCH_RUNS order."""
    rows = [{"run": "trivial /about (HTTP limit)", "conns": conns, "rps": 5000.0, "p99_ms": 1.0}]
    for name, (rps, p99) in zip(run.SEARCH_RUNS, figures):
        rows.append({"run": name, "conns": conns, "rps": rps, "p99_ms": p99})
    for row in rows:
        row.update(p50_ms=1.0, p95_ms=2.0, errors=0, http="", naive="", app_cpu=None, db_cpu=None)
    return rows


def write_reference(folder, name, figures):
    (folder / name).write_text("# Search benchmark\n\n" + run.table(search_rows(figures)) + "\n")


def test_the_reference_size_reports_its_best_throughput_against_the_target():
    lines = run.target_lines(100_000, search_rows([(600.4, 50.0), (630.0, 40.0), (450.0, 60.0)]), None)
    assert lines == ["- target 900 req/s at 8 connections: the best run (SEARCH_LOG=false) served 630, 70.0% of it"]


def test_a_larger_corpus_is_compared_run_by_run_with_the_latest_reference_of_its_kind_of_server(tmp_path):
    suffix = "-BENCH_DATABASE_URL"
    write_reference(tmp_path, f"100000-2026-12-08T0100{suffix}.md", [(400.0, 80.0)] * 3)
    write_reference(tmp_path, f"100000-2026-12-08T0115{suffix}.md", [(500.0, 50.0), (400.0, 40.0), (600.0, 60.0)])
    write_reference(tmp_path, "100000-2026-12-08T0120.md", [(900.0, 10.0)] * 3)  # the embedded server's
    write_reference(tmp_path, f"100000-2026-12-08T0200{suffix}.md", [(900.0, 10.0)] * 3)  # written after
    reference = run.reference_report(tmp_path, suffix, "2026-12-08T0144")
    assert reference.name == f"100000-2026-12-08T0115{suffix}.md"
    rows = search_rows([(245.0, 250.0), (220.0, 80.0), (330.0, 120.0)])
    (line,) = run.target_lines(1_000_000, rows, reference)
    assert f"against `100000-2026-12-08T0115{suffix}.md`" in line
    assert "(first run / SEARCH_LOG=false / SEARCH_LOG=true)" in line
    assert "throughput 49.0%, 55.0%, 55.0% of its (target ≥ 50%)" in line
    assert "p99 5.00×, 2.00×, 2.00× its p99 (target ≤ 4×)" in line
    # A report with no /api/search run at 8 connections has nothing to compare.
    (line,) = run.target_lines(1_000_000, search_rows([(245.0, 250.0)], conns=32), reference)
    assert line == "- speed targets: no /api/search run at 8 connections"


def test_only_the_runs_both_reports_have_are_compared_and_a_zero_divides_nothing(tmp_path):
    write_reference(tmp_path, "100000-2026-12-08T0115.md", [(500.0, 0.0)])  # its first run only
    rows = search_rows([(245.0, 250.0), (220.0, 80.0), (330.0, 120.0)])
    (line,) = run.target_lines(1_000_000, rows, tmp_path / "100000-2026-12-08T0115.md")
    assert "run by run (first run): throughput 49.0% of its" in line and "p99 – its p99" in line
    write_reference(tmp_path, "100000-2026-12-08T0116.md", [])  # no /api/search run
    (line,) = run.target_lines(1_000_000, rows, tmp_path / "100000-2026-12-08T0116.md")
    assert line == "- against `100000-2026-12-08T0116.md`: it has no /api/search run at 8 connections"


def test_a_reference_older_than_the_window_or_none_at_all_is_not_used(tmp_path):
    write_reference(tmp_path, "100000-2026-12-07T1300.md", [(500.0, 50.0)] * 3)
    assert run.reference_report(tmp_path, "", "2026-12-08T0100").name == "100000-2026-12-07T1300.md"  # 12 h before
    assert run.reference_report(tmp_path, "", "2026-12-08T0101") is None  # 12 h 1 min before
    (line,) = run.target_lines(1_000_000, search_rows([(245.0, 250.0)] * 3), None)
    assert line.startswith("- against 100,000 pages: no report of that size") and "make bench N=100000" in line
