"""Beyond one machine, from outside: the shipped nginx config in front of two
app processes (the Dockerfile's command), which read searches from a
streaming standby of their primary (tests/replication.py).

One app process killed under load costs no request that was not in flight;
X-Forwarded-For counts only when nginx sends it; a standby stopped under
load costs no request, and searches return to it once it is back.
"""

import re
import secrets
import socket
import time

import psycopg
import pytest
from replication import StreamingPair

import app as whoknows

from .conftest import RunningApp, start_nginx
from .test_faults import JSON, WRK_COUNTING_LUA, request, socket_errors, start_wrk, wrk_result

SEARCH_LUA = (
    WRK_COUNTING_LUA
    + r"""
local counter = 0

function request()
  counter = counter + 1
  local words = {"search", "programming", "engines", "pages"}
  return wrk.format("GET", "/api/search?q=" .. words[counter % 4 + 1], {["Accept"] = "application/json"})
end
"""
)


@pytest.fixture(scope="module")
def pair():
    """A primary with a migrated database of a few pages (indexed when the first app starts), and its standby."""
    servers = StreamingPair().start()
    try:
        primary_url, standby_url = servers.create_database("whoknows")
        whoknows.apply_migrations(primary_url)
        with psycopg.connect(primary_url) as conn:
            for n in range(30):
                conn.execute(
                    "INSERT INTO pages (title, url, language, content) VALUES (%s, %s, 'en', %s)",
                    (f"Page {n} about search", f"https://example.org/{n}", f"Search engines index pages {n}."),
                )
        servers.wait_replayed()
        servers.urls = primary_url, standby_url
        yield servers
    finally:
        servers.cleanup()


@pytest.fixture
def cluster(pair):
    """Two app processes on the pair, trusting nginx (127.0.0.1) as their proxy, and nginx in front."""
    env = {
        "DATABASE_REPLICA_URL": pair.urls[1],
        "TRUSTED_PROXIES": "127.0.0.1/32",
        "SEARCH_CACHE_SECONDS": "0",
        "POOL_TIMEOUT": "3",
        # One key for all processes, as compose gives them: it keys the login
        # throttle's client hashes and signs the flash cookies.
        "SECRET_KEY": secrets.token_hex(32),
    }
    apps = [RunningApp(pair.urls[0], env) for _ in range(2)]  # the first indexes the pages
    pair.wait_replayed()
    proxy = start_nginx(*apps)
    yield apps, proxy
    proxy.stop()
    for app in apps:
        app.stop()


def test_searches_through_nginx_are_served_by_the_standby(pair, cluster):
    apps, proxy = cluster
    for _ in range(6):
        status, _, body, _ = request(proxy.base, "GET", "/api/search?q=engines", headers=JSON)
        assert status == 200 and b"Page" in body
    with psycopg.connect(pair.standby.url(), autocommit=True) as conn:
        readers = conn.execute(
            "SELECT count(DISTINCT client_port) FROM pg_stat_activity WHERE application_name = 'whoknows-replica'"
        ).fetchone()[0]
    assert readers >= 2, "both app processes read from the standby"


def test_one_app_process_killed_under_load_costs_only_requests_in_flight(cluster, tmp_path):
    apps, proxy = cluster
    connections, seconds = 8, 8
    wrk = start_wrk(proxy.base, SEARCH_LUA, seconds, tmp_path, connections=connections, threads=2)
    time.sleep(3)
    apps[0].process.kill()  # SIGKILL: no drain, its connections are cut
    result = wrk_result(wrk, seconds + 30)
    failed = result["requests"] - result["codes"].get("200", 0)
    print(
        f"\none of two app processes killed at 3 s of {seconds} s: {result['requests']} requests, codes "
        f"{result['codes']}, socket errors {socket_errors(result)}"
    )
    assert result["codes"].get("200", 0) > 100
    # At most the requests in flight at the kill (one per connection) may fail;
    # nginx retries the idempotent ones on the other process.
    assert failed + result["timeout"] + result["read"] <= connections, result
    status = request(proxy.base, "GET", "/api/search?q=search", headers=JSON)[0]
    assert status == 200, "the remaining process serves everything"


def log_addresses(app, path):
    """The client addresses in an app's request log for path."""
    return re.findall(rf"^\S+ GET {re.escape(path)} \d{{3}} \S+ (\S+)$", app.output(), re.M)


def get_from(source, port, path, forwarded_for):
    """GET path on 127.0.0.1:port from the local address source, with a (forged) X-Forwarded-For."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    try:
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Forwarded-For: {forwarded_for}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    finally:
        sock.close()
    return int(answer.split(b" ", 2)[1])


def test_x_forwarded_for_counts_only_from_nginx(cluster):
    """The client is 127.0.0.3. Through nginx (127.0.0.1, trusted) the app
    logs 127.0.0.3 whatever it claims; straight to the app, its forged
    header is ignored too."""
    apps, proxy = cluster
    marker = f"/no-such-page-{secrets.token_hex(4)}"  # a path only this test asks for
    for _ in range(4):  # both processes get some
        assert get_from("127.0.0.3", proxy.port, marker, "203.0.113.9") == 404
    assert get_from("127.0.0.3", apps[1].port, marker, "203.0.113.9") == 404
    time.sleep(0.5)
    seen = log_addresses(apps[0], marker) + log_addresses(apps[1], marker)
    assert len(seen) == 5 and set(seen) == {"127.0.0.3"}, seen
    assert "203.0.113.9" not in apps[0].output() + apps[1].output()


def test_standby_stopped_under_load_then_restarted(pair, cluster, tmp_path):
    apps, proxy = cluster
    seconds = 14
    wrk = start_wrk(proxy.base, SEARCH_LUA, seconds, tmp_path, connections=8, threads=2)
    time.sleep(3)
    pair.standby.stop("fast")
    time.sleep(4)
    pair.standby.start()
    result = wrk_result(wrk, seconds + 30)
    print(
        f"\nstandby down from 3 s to 7 s of {seconds} s: {result['requests']} requests, codes {result['codes']}, "
        f"socket errors {socket_errors(result)}, max latency {result['max_us'] / 1e6:.2f} s"
    )
    assert set(result["codes"]) == {"200"} and socket_errors(result) == "0/0/0/0", result
    # No request waited longer than the pool timeout (3 s) and a margin.
    assert result["max_us"] < 5e6, result
    health = [request(app.base, "GET", "/healthz", headers=JSON) for app in apps]
    deadline = time.monotonic() + 15
    while any(b'"reading_from_primary": true' in h[2] for h in health):
        assert time.monotonic() < deadline, "searches did not move back to the standby"
        request(proxy.base, "GET", "/api/search?q=search", headers=JSON)
        time.sleep(0.2)
        health = [request(app.base, "GET", "/healthz", headers=JSON) for app in apps]


def test_sessions_the_throttle_and_the_search_log_span_processes(pair, cluster):
    """Nothing lives in one process only: a session made on one process is
    valid on the other, failed logins on both count together, and both
    processes' searches reach the search log."""
    apps, _ = cluster
    first, second = (app.base for app in apps)
    username, password = f"both_{secrets.token_hex(3)}", f"pw-{secrets.token_hex(6)}"
    form = {"username": username, "email": f"{username}@example.org", "password": password, "password2": password}
    assert request(first, "POST", "/api/register", form, JSON)[0] == 200
    status, headers, _, _ = request(second, "POST", "/api/login", {"username": username, "password": password}, JSON)
    assert status == 200
    cookie = headers["set-cookie"].split(";")[0]
    assert request(first, "GET", "/change-password", headers={"Cookie": cookie})[0] == 200  # logged in there too
    assert request(second, "GET", "/change-password", headers={"Cookie": cookie})[0] == 200
    limit = whoknows.Settings().login_max_failures
    for n in range(limit):
        base = (first, second)[n % 2]
        assert request(base, "POST", "/api/login", {"username": username, "password": "wrong"}, JSON)[0] == 422
    for base in (first, second):
        assert request(base, "POST", "/api/login", {"username": username, "password": password}, JSON)[0] == 429
    words = [f"spanning{secrets.token_hex(3)}", f"spanning{secrets.token_hex(3)}"]
    for base, word in zip((first, second), words):
        assert request(base, "GET", f"/api/search?q={word}", headers=JSON)[0] == 200
    deadline = time.monotonic() + 10
    with psycopg.connect(pair.urls[0], autocommit=True) as conn:
        while conn.execute("SELECT count(*) FROM search_log WHERE query = ANY(%s)", (words,)).fetchone()[0] < 2:
            assert time.monotonic() < deadline, "a process's searches did not reach the search log"
            time.sleep(0.2)
