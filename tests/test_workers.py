"""`python app.py serve` with WORKERS=2: two real worker processes on one
port under a supervisor, against a real PostgreSQL. They share the port and
their metrics, a dead worker is replaced, SIGTERM stops them after their
requests in flight, and none outlives its supervisor."""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import psutil
import psycopg
import pytest
from helpers import ROOT, free_port
from prometheus_client.parser import text_string_to_metric_families

import app as whoknows


def get(url, timeout=10):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # a new connection each time
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_for(condition, seconds=15, message="it never happened"):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.1)


def alive(process):
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def workers_of(process):
    return [child for child in psutil.Process(process.pid).children() if alive(child)]


class Served:
    """`python app.py serve` with WORKERS=2 on a migrated database of its own."""

    def __init__(self, url, **env):
        self.url, self.port = url, free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        environment = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "DATABASE_"))},
            "DATABASE_URL": url,
            "SECRET_KEY": "k" * 64,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "WORKERS": "2",
            "SHUTDOWN_TIMEOUT": "15",
            **env,
        }
        command = [sys.executable, str(ROOT / "app.py"), "serve"]
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True)
        self.reader.start()

    @property
    def output(self):
        return "".join(self.lines)

    def wait_until_healthy(self):
        """Wait for the line that says every worker accepts, then for /healthz."""

        def serving():
            assert self.process.poll() is None, self.output
            return "with 2 workers" in self.output

        wait_for(serving, 30, "the workers did not start")
        assert len(workers_of(self.process)) == 2 and get(f"{self.base}/healthz")[0] == 200
        return self

    def wait(self, seconds=30):
        """Wait for the server to exit; return its whole output (its workers' included)."""
        self.process.wait(seconds)
        self.reader.join(10)  # the output ends once every worker is gone too
        return self.output

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        for worker in psutil.process_iter(["environ"]):
            try:  # never leave a worker of this server behind, whatever a test did
                protocol = (worker.info["environ"] or {}).get(whoknows.WORKER)
                if protocol and json.loads(protocol)["supervisor"] == self.process.pid:
                    worker.kill()
            except psutil.Error:
                pass


@pytest.fixture
def served(make_database):
    url = make_database()
    whoknows.apply_migrations(url)
    running = []

    def start(**env):
        running.append(Served(url, **env))
        return running[-1]

    yield start
    for server in running:
        server.stop()


def scrape(base):
    status, text = get(f"{base}/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_workers_share_the_port_and_their_metrics(served):
    server = served().wait_until_healthy()
    with psycopg.connect(server.url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO pages (title, url, language, content) VALUES ('Shared', 'https://e.org/s', 'en', 'one')"
        )
    first, second = workers_of(server.process)
    assert {worker.environ().get("MALLOC_ARENA_MAX") for worker in (first, second)} == {"2"}  # less memory kept
    searches = ("whoknows_http_requests_total", (("method", "GET"), ("route", "/api/search"), ("status", "200")))
    before = scrape(server.base).get(searches, 0)
    # Either worker accepts on the shared socket: with one stopped, the other answers every request.
    for frozen in (first, second):
        frozen.suspend()
        try:
            for n in range(10):
                status, body = get(f"{server.base}/api/search?q=one+{n}", timeout=5)
                assert status == 200 and json.loads(body)["data"][0]["title"] == "Shared"
        finally:
            frozen.resume()
    # Counters add up over the workers, whichever one answers the scrape.
    assert [scrape(server.base)[searches] - before for _ in range(4)] == [20] * 4
    # The workers rank with numpy; the supervisor, which never searches, does not load it.
    loads_numpy = [
        any("numpy" in m.path for m in p.memory_maps()) for p in (psutil.Process(server.process.pid), first, second)
    ]
    assert loads_numpy == [False, True, True]
    # Each worker's pools count: the gauges add up over the live workers.
    pool = ("whoknows_db_pool_size", (("pool", "primary"),))
    wait_for(lambda: scrape(server.base)[pool] >= 2 * 2, 15, "the pool gauges did not add up")  # min_size 2 each


def open_connections(process, port):
    """How many client connections to port each of the server's workers holds."""
    return [
        sum(1 for c in worker.net_connections("tcp") if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port)
        for worker in workers_of(process)
    ]


def test_connections_spread_evenly_over_the_workers(served):
    """With one worker stopped (so long that it no longer counts), the other
    takes 6 keep-alive connections; once both run, the next 6 all go to the
    one with fewer. The kernel alone would hand each to whichever worker
    polls first."""
    server = served().wait_until_healthy()
    first, second = workers_of(server.process)
    kept = []

    def connect():
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        connection.request("GET", "/healthz")
        assert connection.getresponse().read() and connection.sock is not None  # accepted, and kept open
        kept.append(connection)

    second.suspend()
    try:
        time.sleep(whoknows.Share.STALE_MS / 1000 + 0.5)  # a stopped worker does not hold the other back
        for _ in range(6):
            connect()
    finally:
        second.resume()
    assert sorted(open_connections(server.process, server.port)) == [0, 6]
    time.sleep(1.5)  # its loop wakes up at least every second, and says it has none
    for _ in range(6):
        connect()
    assert open_connections(server.process, server.port) == [6, 6]
    for connection in kept:
        connection.close()


def test_a_dead_worker_is_replaced_and_the_other_serves_meanwhile(served):
    server = served().wait_until_healthy()
    victim, survivor = workers_of(server.process)
    victim.kill()
    assert get(f"{server.base}/healthz")[0] == 200  # the survivor answers

    # The killed worker may still look alive for a moment: wait for it to be
    # gone and another to take its place, or a SIGTERM could come before the
    # supervisor noticed, and then it replaces no one.
    def replaced():
        pids = [w.pid for w in workers_of(server.process)]
        return victim.pid not in pids and len(pids) == 2

    wait_for(replaced, 15, "no worker replaced the dead one")
    assert victim.pid not in [w.pid for w in workers_of(server.process)] and alive(survivor)
    wait_for(lambda: get(f"{server.base}/healthz")[0] == 200)
    server.process.send_signal(signal.SIGTERM)
    output = server.wait()
    assert f"worker {victim.pid} exited (status -9); starting another" in output
    assert server.process.returncode == 0


def wait_for_a_search_blocked_on_the_lock(url):
    with psycopg.connect(url, autocommit=True) as watcher:
        wait_for(
            lambda: watcher.execute(
                "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
            ).fetchone(),
            10,
            "the search never started waiting",
        )


def test_sigterm_stops_every_worker_after_the_requests_in_flight(served):
    server = served().wait_until_healthy()
    workers = workers_of(server.process)
    locker = psycopg.connect(server.url)
    locker.execute("LOCK TABLE pages IN ACCESS EXCLUSIVE MODE")  # the next search waits for this
    busy = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    answer = {}

    def ask():
        busy.request("GET", "/api/search?q=flight", headers={"Accept": "application/json"})
        response = busy.getresponse()
        answer.update(status=response.status, body=response.read())

    thread = threading.Thread(target=ask)
    thread.start()
    wait_for_a_search_blocked_on_the_lock(server.url)
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(OSError):  # no longer accepting connections
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
    assert server.process.poll() is None, "it must not exit with a request in flight"
    locker.rollback()
    locker.close()
    thread.join(20)
    assert answer["status"] == 200
    output = server.wait()
    assert server.process.returncode == 0, output
    assert output.count("requests finished; database pool closed; exiting") == 2, output
    assert not any(alive(worker) for worker in workers)


def test_workers_stop_when_their_supervisor_is_killed(served):
    server = served().wait_until_healthy()
    workers = workers_of(server.process)
    server.process.kill()
    server.process.wait(10)
    gone, alive = psutil.wait_procs(workers, timeout=15)
    assert not alive, "a worker outlived its supervisor"
    with pytest.raises(OSError):  # and the port is free again
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()


def test_a_worker_that_cannot_start_stops_the_server_with_one_line(served, tmp_path):
    # Python imports sitecustomize at start-up: this one fails the workers only.
    (tmp_path / "sitecustomize.py").write_text("import os\nif os.environ.get('WHOKNOWS_WORKER'):\n    os._exit(3)\n")
    server = served(PYTHONPATH=str(tmp_path))
    output = server.wait(60)
    assert server.process.returncode == 1
    assert "whoknows: error: a worker exited while starting (status 3); see its output above" in output
    assert "Traceback" not in output


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_port_in_use_is_one_clear_line(served, workers):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = served(WORKERS=workers, PORT=str(port))
        output = server.wait(60)
    assert server.process.returncode == 2 and "Traceback" not in output, output
    assert f"whoknows: error: cannot listen on 127.0.0.1:{port}: Address already in use" in output
