"""Reads on a streaming standby: a real one, cloned from a real primary with
pg_basebackup -R (tests/replication.py), as the compose `replica` profile does.

Searches go to the standby; accounts and sessions stay on the primary, so a
login right after a registration works while the standby lags; a stopped
standby costs no request, and searches move back once it returns.
"""

import dataclasses
import json
import threading
import time
import urllib.request

import psycopg
import pytest
import webtest
from replication import StreamingPair

import app as whoknows

JSON = {"Accept": "application/json"}


@pytest.fixture(scope="module")
def pair():
    """A primary and its standby, with a migrated database on both."""
    servers = StreamingPair().start()
    try:
        servers.urls = servers.create_database("whoknows")
        whoknows.apply_migrations(servers.urls[0])
        servers.wait_replayed()
        yield servers
    finally:
        servers.cleanup()


@pytest.fixture
def primary(pair):
    """An autocommit connection to the primary; the tables are emptied first,
    and the standby replays again after the test."""
    with psycopg.connect(pair.urls[0], autocommit=True, row_factory=psycopg.rows.dict_row) as conn:
        tables = conn.execute(
            "SELECT string_agg(format('%I', tablename), ', ') AS names FROM pg_tables "
            "WHERE schemaname = 'public' AND tablename NOT LIKE '%yoyo%'"
        ).fetchone()["names"]
        conn.execute(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")
        pair.wait_replayed()
        yield conn
    if not pair.standby.running():
        pair.standby.start()
    pair.resume_replay()


@pytest.fixture
def replica_app(pair, settings):
    """An app whose primary and standby are the pair's, with no result cache."""
    app = whoknows.make_app(
        dataclasses.replace(
            settings,
            database_url=pair.urls[0],
            database_replica_url=pair.urls[1],
            search_cache_seconds=0,
            host="127.0.0.1",
            port=0,
            access_log=False,
        )
    )
    yield app
    app.shut_down()


def add_page(conn, title, content):
    """Insert a page on the primary and index it, as an import does."""
    conn.execute(
        "INSERT INTO pages (title, url, language, content) VALUES (%s, %s, 'en', %s)",
        (title, f"https://example.org/{title.lower().replace(' ', '-')}", content),
    )
    with conn.transaction():
        whoknows.index_queued(conn)


def titles(client, q):
    return [row["title"] for row in client.get("/api/search", {"q": q}, headers=JSON).json["data"]]


def standby_sessions(pair):
    """The app's connections to the standby, by pg_stat_activity there."""
    with psycopg.connect(pair.standby.url(), autocommit=True) as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'whoknows-replica' AND datname = 'whoknows'"
        ).fetchone()[0]


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"DATABASE_REPLICA_URL": "postgresql://u@replica/db"}, "postgresql://u@replica/db"),
        (
            {"POSTGRES_SERVER": "database", "POSTGRES_PASSWORD": "pw", "POSTGRES_REPLICA_SERVER": "replica"},
            "user=postgres password=pw dbname=whoknows host=replica port=5432",
        ),
        (
            {"DATABASE_URL": "postgresql://u:p@db:6543/x?sslmode=disable", "POSTGRES_REPLICA_SERVER": "r1, r2"},
            "user=u password=p dbname=x host=r1,r2 port=6543,6543 sslmode=disable",
        ),
        (
            {"DATABASE_REPLICA_URL": "postgresql://u@r/db", "POSTGRES_REPLICA_SERVER": "other", "POSTGRES_SERVER": "d"},
            "postgresql://u@r/db",
        ),
    ],
)
def test_the_standby_setting(environ, expected):
    settings = whoknows.Settings.from_env(environ=environ, dotenv_path=None)
    assert settings.database_replica_url == expected


def test_a_standby_host_needs_a_configured_primary():
    with pytest.raises(whoknows.ConfigError, match="POSTGRES_REPLICA_SERVER needs a configured primary"):
        whoknows.Settings.from_env(environ={"POSTGRES_REPLICA_SERVER": "replica"}, dotenv_path=None)


def test_searches_are_served_by_the_standby(pair, primary, replica_app):
    client = webtest.TestApp(replica_app)
    add_page(primary, "Replicated page", "the standby has this zebrafish page")
    pair.wait_replayed()
    assert titles(client, "zebrafish") == ["Replicated page"]
    assert standby_sessions(pair) >= 1
    pair.pause_replay()
    add_page(primary, "Primary only", "a newer zebrafish page, not yet replayed")
    # Served by the standby, which has not replayed the second page yet.
    assert titles(client, "zebrafish") == ["Replicated page"]
    assert "Primary only" not in client.get("/", {"q": "zebrafish"}).text
    pair.resume_replay()
    pair.wait_replayed()
    assert sorted(titles(client, "zebrafish")) == ["Primary only", "Replicated page"]


def test_register_then_login_works_while_the_standby_lags(pair, primary, replica_app):
    client = webtest.TestApp(replica_app)
    pair.pause_replay()
    form = {"username": "fresh", "email": "fresh@example.org", "password": "s3cret-pw", "password2": "s3cret-pw"}
    client.post("/api/register", form, headers=JSON, status=200)
    client.post("/api/login", {"username": "fresh", "password": "s3cret-pw"}, headers=JSON, status=200)
    # The session check right after the login, on a page that needs one.
    assert client.get("/change-password", status=200).text.count("form") >= 1
    with psycopg.connect(pair.urls[1], autocommit=True) as standby:
        assert standby.execute("SELECT count(*) FROM users").fetchone()[0] == 0, "the standby really lags"
    client.get("/api/logout", headers=JSON, status=200)
    client.get("/change-password", status=303)


def test_healthz_and_metrics_show_both_pools_and_the_lag(pair, primary, replica_app):
    client = webtest.TestApp(replica_app, extra_environ={"REMOTE_ADDR": "127.0.0.1"})
    client.get("/api/search", {"q": "warm"}, headers=JSON)  # opens the standby's pool
    body = client.get("/healthz").json
    assert body["status"] == "ok" and set(body["pools"]) == {"primary", "replica"}
    replica = body["pools"]["replica"]
    assert replica["up"] and replica["in_recovery"] and not replica["reading_from_primary"]
    pair.pause_replay()
    add_page(primary, "Lagging", "written while replay is paused")
    deadline = time.monotonic() + 10
    while client.get("/healthz").json["pools"]["replica"]["lag_bytes"] == 0:
        assert time.monotonic() < deadline, "the lag never showed"
        time.sleep(0.1)
    lagging = client.get("/healthz").json["pools"]["replica"]
    assert lagging["lag_bytes"] > 0 and lagging["lag_seconds"] >= 0
    metrics = client.get("/metrics").text
    assert 'whoknows_db_pool_size{pool="replica"}' in metrics
    assert 'whoknows_db_pool_size{pool="primary"}' in metrics
    assert "whoknows_replica_up 1.0" in metrics
    assert "whoknows_replica_lag_bytes" in metrics and "whoknows_replica_lag_bytes 0.0" not in metrics


def test_a_standby_that_does_not_answer_makes_searches_read_from_the_primary(pair, primary, settings):
    """A standby URL nobody listens on: every search still gets its answer, from the primary."""
    app = whoknows.make_app(
        dataclasses.replace(
            settings,
            database_url=pair.urls[0],
            database_replica_url="postgresql://postgres@127.0.0.1:1/whoknows",
            search_cache_seconds=0,
        )
    )
    try:
        client = webtest.TestApp(app)
        add_page(primary, "Only primary", "a quokka page")
        started = time.monotonic()
        for _ in range(5):
            assert titles(client, "quokka") == ["Only primary"]
        assert time.monotonic() - started < settings.pool_timeout + 2  # one short wait, then straight to the primary
        health = client.get("/healthz").json
        assert health["status"] == "ok" and health["pools"]["replica"]["up"] is False
        assert health["pools"]["replica"]["reading_from_primary"] is True
    finally:
        app.shut_down()


class Load(threading.Thread):
    """Four clients searching over HTTP, one request after another; records statuses."""

    def __init__(self, base):
        super().__init__(daemon=True)
        self.base, self.statuses, self.running = base, [], threading.Event()
        self.running.set()

    def run(self):
        workers = [threading.Thread(target=self.client, args=(n,), daemon=True) for n in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()

    def client(self, n):
        while self.running.is_set():
            url = f"{self.base}/api/search?q=otter+{n}"
            try:
                with urllib.request.urlopen(urllib.request.Request(url, headers=JSON), timeout=30) as response:
                    json.loads(response.read())
                    self.statuses.append(response.status)
            except urllib.error.HTTPError as exc:
                self.statuses.append(exc.code)
            except OSError as exc:
                self.statuses.append(repr(exc))

    def finish(self):
        self.running.clear()
        self.join(30)
        return self.statuses


def test_standby_stopped_under_load_then_restarted(pair, primary, replica_app):
    add_page(primary, "Otter page", "otter 0 1 2 3")
    pair.wait_replayed()
    server = whoknows.Server(replica_app)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    load = Load(f"http://127.0.0.1:{server.port}")
    try:
        load.start()
        time.sleep(1)
        before = len(load.statuses)
        pair.standby.stop("fast")
        time.sleep(3)
        during = len(load.statuses)
        assert replica_app.db.standby.up is False
        pair.standby.start()
        deadline = time.monotonic() + 20
        while not replica_app.db.standby.up:
            assert time.monotonic() < deadline, "searches did not move back to the standby"
            time.sleep(0.1)
        time.sleep(1)
        assert standby_sessions(pair) >= 1
    finally:
        statuses = load.finish()
        server.stop()
        thread.join(30)
    print(f"\n{before} searches before the stop, {during - before} while it was down, {len(statuses) - during} after")
    assert during - before > 0, "no search was answered while the standby was down"
    assert set(statuses) == {200}, [s for s in statuses if s != 200][:5]
