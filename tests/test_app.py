"""Pages, errors, health, outages and serving over real HTTP."""

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import waitress

import app as whoknows

ROOT = Path(__file__).resolve().parent.parent


def test_about_page_keeps_the_layout(client):
    page = client.get("/about")
    assert "About ¿Who Knows?" in page.text
    assert 'id="nav-logo"' in page.text and 'class="footer"' in page.text


def test_404_is_a_page_and_json_for_the_api(client):
    page = client.get("/no/such/page", status=404)
    assert page.content_type == "text/html"
    assert "There is no page at this address." in page.text and 'id="nav-logo"' in page.text
    api = client.get("/api/nothing", status=404)
    assert api.json == {"statusCode": 404, "message": "There is no page at this address."}


def test_unexpected_error_is_a_500_page_without_traceback(client, monkeypatch, caplog):
    def boom(*args):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(whoknows, "search", boom)
    page = client.get("/", {"q": "x"}, status=500)
    assert "Something went wrong on our side" in page.text
    assert "secret internals" not in page.text and "Traceback" not in page.text
    assert "secret internals" in caplog.text


def test_security_headers_on_every_response(client):
    for response in (client.get("/"), client.get("/api/search", {"q": "x"}), client.get("/nope", status=404)):
        csp = response.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Referrer-Policy"]


def test_static_files(client):
    assert "search-result" in client.get("/static/style.css").text
    client.get("/static/../app.py", status=(403, 404))


def test_healthz_ok(client):
    body = client.get("/healthz").json
    assert body["status"] == "ok" and list(body["pools"]) == ["primary"]  # no standby configured
    assert body["pools"]["primary"]["size"] >= 1


def test_healthz_reports_a_schema_behind(client, db):
    last = whoknows.migration_ids()[-1]
    row = db.execute(
        "DELETE FROM _yoyo_migration WHERE migration_id = %s RETURNING migration_hash, migration_id, applied_at_utc",
        (last,),
    ).fetchone()
    try:
        body = client.get("/healthz", status=503).json
        assert body["status"] == "schema behind" and body["pending_migrations"] == [last]
    finally:
        db.execute(
            "INSERT INTO _yoyo_migration (migration_hash, migration_id, applied_at_utc) "
            "VALUES (%(migration_hash)s, %(migration_id)s, %(applied_at_utc)s)",
            row,
        )


def test_503_while_the_database_is_down_then_recovery(client, app, add_page, proxy):
    add_page("Outage", "survives the outage")
    assert client.get("/api/search", {"q": "outage"}).json["total"] == 1
    proxy.stop()
    started = time.monotonic()
    down = client.get("/api/search", {"q": "outage -cached"}, status=503)
    assert time.monotonic() - started < app.settings.pool_timeout + 3
    assert down.json["statusCode"] == 503 and "database is unavailable" in down.json["message"]
    assert "database is unavailable" in client.get("/", {"q": "outage -cached2"}, status=503).text
    assert client.get("/healthz", status=503).json["status"] == "database unavailable"
    proxy.start()
    deadline = time.monotonic() + 15
    while True:
        response = client.get("/api/search", {"q": "outage -cached3"}, expect_errors=True)
        if response.status_int == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert response.status_int == 200 and response.json["total"] == 1


def test_connections_the_server_closed_while_idle_are_replaced_before_use(client, app, add_page, db):
    add_page("Terminated", "the pool replaces closed connections")
    assert client.get("/api/search", {"q": "terminated"}).json["total"] == 1
    pool = app.db.pool()
    held = [pool.getconn() for _ in range(5)]  # at least five idle connections
    for conn in held:
        pool.putconn(conn)
    # As in a database restart: every idle pool connection gets FATAL and EOF.
    # The timeout argument waits until each backend has exited.
    killed = db.execute(
        "WITH pool AS MATERIALIZED (SELECT pid FROM pg_stat_activity WHERE application_name = 'whoknows' "
        "AND datname = current_database() AND pid <> pg_backend_pid()) "
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000)) AS n FROM pool"
    ).fetchone()["n"]
    assert killed >= 1
    # The next requests (not cached) get fresh connections, not AdminShutdown,
    # and not a 503 after backing off once for each dead connection.
    for n in range(3):
        assert client.get("/api/search", {"q": f"terminated -x{n}"}).json["total"] == 1


def test_a_healthy_idle_connection_is_checked_without_a_round_trip(client, add_page, monkeypatch):
    add_page("Quiet", "nothing to read on an idle connection")
    client.get("/api/search", {"q": "quiet"})
    round_trips = []
    real_check = whoknows.ConnectionPool.check_connection
    monkeypatch.setattr(
        whoknows.ConnectionPool, "check_connection", staticmethod(lambda conn: round_trips.append(real_check(conn)))
    )
    for n in range(3):
        assert client.get("/api/search", {"q": f"quiet -x{n}"}).json["total"] == 1
    assert round_trips == []


def test_real_waitress_server_over_http(app, add_page):
    add_page("Waitress", "served over real HTTP")
    server = waitress.create_server(app, host="127.0.0.1", port=0, threads=4)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.effective_port}"
        with urllib.request.urlopen(f"{base}/api/search?q=waitress") as response:
            body = json.load(response)
        assert response.status == 200 and body["data"][0]["title"] == "Waitress"
        with urllib.request.urlopen(f"{base}/?q=waitres&language=en") as response:
            assert "Waitress" in response.read().decode()
    finally:
        server.close()


def run_app(*args, env=None):
    """Run app.py; env values of None remove that variable."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL",)}
    full_env.update(env or {})
    full_env = {k: v for k, v in full_env.items() if v is not None}
    return subprocess.run(
        [sys.executable, str(ROOT / "app.py"), *args], env=full_env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    "env, message",
    [
        ({"DATABASE_URL": "mysql://x@y/z"}, "DATABASE_URL must start with postgresql://"),
        ({"DATABASE_URL": "postgresql://u@h/db?bogus_option=1"}, "DATABASE_URL is malformed"),
        ({"DATABASE_URL": "postgresql://postgres@127.0.0.1:1/nowhere"}, "cannot connect to the database"),
        ({"PORT": "eighty"}, "PORT must be a whole number"),
        ({"PORT": "70000"}, "PORT must be between 1 and 65535"),
        ({"SECRET_KEY": "short"}, "SECRET_KEY must be at least 32 characters"),
        ({"SECRET_KEY": "change-me-to-the-output-of-openssl-rand-hex-32"}, "SECRET_KEY is still the placeholder"),
        (
            {"DATABASE_URL": None, "POSTGRES_USER": "w", "POSTGRES_PASSWORD": "change-me-too"},
            "POSTGRES_PASSWORD is still the placeholder",
        ),
        (
            {"DATABASE_URL": None, "POSTGRES_SERVER": "127.0.0.1", "POSTGRES_PORT": "1"},
            "cannot connect to the database",
        ),
        ({"ACCESS_LOG": "maybe"}, "ACCESS_LOG must be true or false"),
    ],
)
def test_bad_configuration_gives_one_clear_line(env, message):
    result = run_app("migrate", env={"DATABASE_URL": "postgresql://postgres@127.0.0.1:1/nowhere", **env})
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_serving_needs_a_secret_key_but_read_only_commands_do_not(database_url):
    serve = run_app("serve", env={"DATABASE_URL": "postgresql://postgres@127.0.0.1:1/nowhere", "SECRET_KEY": None})
    assert serve.returncode == 2 and "Traceback" not in serve.stderr
    assert "SECRET_KEY is required when a database is configured" in serve.stderr
    report = run_app("searches", env={"DATABASE_URL": database_url, "SECRET_KEY": None})
    assert report.returncode == 0, report.stderr
    assert "Top searches" in report.stdout


def test_importing_app_starts_no_database():
    code = "import app, sys; sys.exit(1 if app._embedded_servers else 0)"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "DATABASE_URL"},
    )
    assert result.returncode == 0, result.stderr


def test_the_readme_configuration_table_is_the_settings_declaration():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert whoknows.Settings.markdown_table() in readme


def test_dotenv_is_read_as_compose_reads_it(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("PORT=9090 # the port\nWEATHER_LOCATION='Aarhus # not a comment'\nTHREADS=4\nSEARCH_LOG=\n")
    settings = whoknows.Settings.from_env(environ={"THREADS": "6"}, dotenv_path=dotenv)
    assert settings.port == 9090 and settings.weather_location == "Aarhus # not a comment"
    assert settings.threads == 6  # the environment wins
    assert settings.search_log is True  # blank counts as unset


def test_apps_built_from_different_settings_do_not_share_them(make_app, session_app):
    other = make_app(search_cache_seconds=0, login_max_failures=2)
    assert other.settings.login_max_failures == 2 and session_app.settings.login_max_failures == 5
    assert other.search_cache is not session_app.search_cache and other.db is not session_app.db
