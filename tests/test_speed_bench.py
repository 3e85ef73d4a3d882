"""The speed benchmark's CPU accounting (bench/run.py): what each load run
reports as the app's and the database's CPU per request."""

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
