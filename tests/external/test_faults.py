"""Faults and limits, from outside: a database outage under load, oversized
requests, broken encodings, slow clients and concurrent migrations.

Every test talks to a real server (the Dockerfile's command, python app.py serve) on
127.0.0.1; load comes from wrk; each test is bounded (under a minute).
"""

import contextlib
import datetime as dt
import http.client
import json
import os
import re
import secrets
import select
import socket
import subprocess
import threading
import time
import urllib.parse

import psycopg
import pytest

import app as whoknows

from .conftest import BIN, ROOT, RunningApp, served, tool

POOL_TIMEOUT = 3  # seconds; set explicitly for the servers these tests start
JSON = {"Accept": "application/json"}
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


# Helpers ######################################################################


def request(base, method, path, body=None, headers=None, timeout=15):
    """One request on a fresh connection; return (status, headers, body, seconds)."""
    parts = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    started = time.monotonic()
    try:
        if isinstance(body, dict):
            body = urllib.parse.urlencode(body)
            headers = {**FORM, **(headers or {})}
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data, time.monotonic() - started
    finally:
        conn.close()


def register(base, username, password):
    status, _, body, _ = request(
        base,
        "POST",
        "/api/register",
        {
            "username": username,
            "email": f"{username}@example.org",
            "password": password,
            "password2": password,
        },
        JSON,
    )
    assert status == 200, (username, status, body)


def login(base, username, password):
    """Log in as a JSON client; return (status, session cookie or None)."""
    status, headers, body, _ = request(base, "POST", "/api/login", {"username": username, "password": password}, JSON)
    match = re.search(r"session=([^;]+)", headers.get("set-cookie", ""))
    return status, (match.group(1) if match else None), body


@contextlib.contextmanager
def fresh_database(private_postgres, pages=30, migrate=True):
    """A new database on the private server (migrated, with pages); dropped after."""
    name = f"whoknows_faults_{secrets.token_hex(4)}"
    with psycopg.connect(private_postgres.url(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = private_postgres.url(name)
    if migrate:
        whoknows.apply_migrations(url)
        with psycopg.connect(url) as conn:
            for n in range(pages):
                conn.execute(
                    "INSERT INTO pages (title, url, language, content) VALUES (%s, %s, %s, %s)",
                    (
                        f"Page {n} about search",
                        f"https://example.org/{n}",
                        "en" if n % 3 else "da",
                        f"Search engines index pages. Page number {n} talks about programming.",
                    ),
                )
    try:
        yield url
    finally:
        try:
            with psycopg.connect(private_postgres.url(), autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except psycopg.Error:
            pass


def access_log_timeline(output, origin):
    """Count the server's request-log lines by (second since origin, path, status)."""
    counts = {}
    for line in output.splitlines():
        match = re.match(r"^(\d{4}-\d\d-\d\dT\S+) (\S+) (\S+) (\d{3}) ", line)
        if match:
            second = int(dt.datetime.fromisoformat(match.group(1)).timestamp() - origin)
            key = (second, match.group(3), int(match.group(4)))
            counts[key] = counts.get(key, 0) + 1
    return counts


def wait_healthy(base, seconds):
    """Poll /healthz until 200; return the seconds it took, or None."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        try:
            if request(base, "GET", "/healthz", timeout=POOL_TIMEOUT + 2)[0] == 200:
                return time.monotonic() - started
        except OSError:
            pass
        time.sleep(0.2)
    return None


# Status counting for wrk: each thread counts statuses per code and per second
# (os.time()), and done() prints the sums as one JSON line after "WRK-RESULT ".
WRK_COUNTING_LUA = r"""
codes = {}
timeline = {}
local threads = {}

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function response(status, headers, body)
  local code = tostring(status)
  codes[code] = (codes[code] or 0) + 1
  local key = os.time() .. ":" .. code
  timeline[key] = (timeline[key] or 0) + 1
end

local function object(t)
  local parts = {}
  for k, v in pairs(t) do parts[#parts + 1] = string.format('"%s": %d', k, v) end
  return "{" .. table.concat(parts, ", ") .. "}"
end

function done(summary, latency, requests)
  local total, seconds = {}, {}
  for _, thread in ipairs(threads) do
    for k, n in pairs(thread:get("codes")) do total[k] = (total[k] or 0) + n end
    for k, n in pairs(thread:get("timeline")) do seconds[k] = (seconds[k] or 0) + n end
  end
  local e = summary.errors
  io.write(string.format(
    'WRK-RESULT {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, ' ..
    '"status_errors": %d, "timeout": %d, "p50_us": %d, "p99_us": %d, "max_us": %d, "codes": %s, "timeline": %s}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max, object(total), object(seconds)))
end
"""

# The outage mix: searches (the server under test caches nothing, so each one
# needs the database) and health checks, alternately.
OUTAGE_LUA = (
    WRK_COUNTING_LUA
    + r"""
local counter = 0

function request()
  counter = counter + 1
  if counter % 2 == 0 then
    return wrk.format("GET", "/healthz")
  end
  return wrk.format("GET", "/api/search?q=search", {["Accept"] = "application/json"})
end
"""
)


def start_wrk(base, script, seconds, tmp_path, connections=16, threads=4, timeout="10s", args=()):
    """Start wrk on base with a Lua script (args go to its init()); see wrk_result()."""
    path = tmp_path / "wrk.lua"
    path.write_text(script)
    command = [
        tool("wrk"),
        f"--threads={threads}",
        f"--connections={connections}",
        f"--duration={seconds}s",
        f"--timeout={timeout}",
        f"--script={path}",
        base + "/",
        "--",
        *args,
    ]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def socket_errors(result):
    return "/".join(str(result[k]) for k in ("connect", "read", "write", "timeout"))


def wrk_result(process, seconds):
    out, err = process.communicate(timeout=seconds)
    assert process.returncode == 0, (out, err)
    line = [x for x in out.splitlines() if x.startswith("WRK-RESULT ")]
    assert line, (out, err)
    return json.loads(line[-1].removeprefix("WRK-RESULT "))


# 1. Database outage under load ################################################


class Prober(threading.Thread):
    """A separate client: while running, GETs paths one after another and
    records (path, status, seconds, started, ended) for each request."""

    def __init__(self, base, paths):
        super().__init__(daemon=True)
        self.base, self.paths = base, paths
        self.running = threading.Event()
        self.running.set()
        self.records = []

    def run(self):
        while self.running.is_set():
            for path in self.paths:
                started = time.time()
                try:
                    status, _, _, seconds = request(self.base, "GET", path, headers=JSON, timeout=30)
                except OSError:
                    status, seconds = None, time.time() - started
                self.records.append((path, status, round(seconds, 2), started, started + seconds))

    def finish(self):
        self.running.clear()
        self.join(40)
        return self.records


def poll_until_200(base, path, limit):
    """Return the seconds until GET path answers 200 (polling), or None."""
    started = time.time()
    while time.time() < started + limit:
        try:
            if request(base, "GET", path, headers=JSON, timeout=POOL_TIMEOUT + 5)[0] == 200:
                return time.time() - started
        except OSError:
            pass
        time.sleep(0.2)
    return None


def test_database_outage_under_load_gives_503s_then_recovers_in_the_same_process(
    private_postgres, running_app, tmp_path
):
    """wrk runs 25 s; the database is down from ~5 s to ~13 s. No 500s, no hangs,
    503s within the pool timeout during the outage, 200s soon after the restart
    from the same process, and accounts made before the outage survive it."""
    load_seconds, outage_starts, outage_seconds, recovery_limit = 25, 5, 8, 10
    allowed = POOL_TIMEOUT + 2  # "within the pool timeout and a margin", for 503s and for recovery
    with fresh_database(private_postgres) as url:
        # The search cache is off so that every search needs the database.
        server = RunningApp(url, {"POOL_TIMEOUT": str(POOL_TIMEOUT), "SEARCH_CACHE_SECONDS": "0"})
        pid = server.process.pid
        try:
            database_down, wrk, prober, recovered_after = False, None, None, None
            stop_called = time.time()
            try:
                accounts = {
                    f"outage_{secrets.token_hex(3)}_{n}": f"password-{n}-{secrets.token_hex(4)}" for n in range(4)
                }
                for username, password in accounts.items():
                    register(server.base, username, password)

                wrk = start_wrk(server.base, OUTAGE_LUA, load_seconds, tmp_path)
                time.sleep(outage_starts)
                database_down = True
                stop_called = time.time()
                private_postgres.stop()
                stopped = time.time()
                prober = Prober(server.base, ["/healthz", "/api/search?q=programming", "/?q=programming"])
                prober.start()
                time.sleep(max(0.0, stop_called + outage_seconds - time.time()))
                prober.running.clear()  # no new probe starts once the database is back
                start_called = time.time()
                private_postgres.start()
                database_down = False
                restarted = time.time()
                recovered_after = poll_until_200(server.base, "/api/search?q=programming", recovery_limit)
                probes = prober.finish()
                result = wrk_result(wrk, load_seconds + 30)
            finally:
                if database_down:
                    private_postgres.start()
                if wrk is not None and wrk.poll() is None:
                    wrk.kill()
                    wrk.wait()
                if prober is not None:
                    prober.finish()
                # The shared server went through the outage too: let it recover
                # before other tests use it.
                wait_healthy(running_app.base, 60)

            codes = {int(k): v for k, v in result["codes"].items()}
            timeline = {}
            for key, n in result["timeline"].items():
                second, code = key.split(":")
                timeline.setdefault(int(second), {})[int(code)] = n
            during = [p for p in probes if p[3] < start_called]
            print(
                f"\noutage: wrk {result['requests']} requests, codes {codes}, p50 {result['p50_us'] / 1e3:.0f} ms, "
                f"p99 {result['p99_us'] / 1e3:.0f} ms, max {result['max_us'] / 1e3:.0f} ms, socket errors "
                f"connect/read/write/timeout {socket_errors(result)}; "
                f"database stopped {stopped - stop_called:.1f} s after the stop call, restarted after "
                f"{restarted - stop_called:.1f} s; probes during the outage (path, status, s): "
                f"{[p[:3] for p in during]}; first 200 {recovered_after and round(recovered_after, 1)} s "
                f"after restart"
            )
            print(
                "outage wrk timeline (second since stop: {status: count}):",
                {s - int(stop_called): timeline[s] for s in sorted(timeline)},
            )

            assert not {c: n for c, n in codes.items() if c >= 500 and c != 503}, f"5xx other than 503: {codes}"
            assert codes.get(503, 0) > 0 and codes.get(200, 0) > 0, codes
            assert result["timeout"] == 0, f"wrk saw {result['timeout']} requests time out (> 10 s): a hang"
            assert result["connect"] == result["read"] == result["write"] == 0, result
            # Probes that started while the database was down: 503, or 200 if they ended after the
            # restart began (pg_ctl -w returns a poll interval after the server accepts connections,
            # so a probe can be served before `restarted` is taken).
            assert during and all(p[1] == 503 or (p[1] == 200 and p[4] >= start_called) for p in during), during
            inside = [s for s in timeline if s >= int(stopped) + 1 and s + 1 <= start_called]
            assert inside and all(set(timeline[s]) == {503} for s in inside), {s: timeline.get(s) for s in inside}
            # The accounts made before the outage are still there, and work.
            with psycopg.connect(url) as conn:
                names = {
                    row[0]
                    for row in conn.execute("SELECT username FROM users WHERE username = ANY(%s)", (list(accounts),))
                }
            assert names == set(accounts)
            for username, password in accounts.items():
                status, cookie, body = login(server.base, username, password)
                assert status == 200 and cookie, (username, status, body)
            problems = []
            # The separate client, and every request of the load: a 503 within
            # the pool timeout and a margin, not a wait behind the queue.
            slow = [p[:3] for p in during if p[2] >= allowed]
            if slow:
                problems.append(f"during the outage, 503s took >= POOL_TIMEOUT + 2 = {allowed} s: {slow}")
            if result["max_us"] / 1e6 >= allowed:
                problems.append(
                    f"the slowest request of the load took {result['max_us'] / 1e6:.1f} s "
                    f"(p99 {result['p99_us'] / 1e6:.1f} s)"
                )
            # The same process serves again within a few seconds of the restart.
            if recovered_after is None or recovered_after >= allowed:
                problems.append(
                    f"the first 200 came {recovered_after and round(recovered_after, 1)} s after the "
                    f"database was back (allowed {allowed} s, polled for {recovery_limit} s)"
                )
            elif not any(200 in timeline[s] for s in timeline if s > restarted):
                problems.append("the load saw no 200 after the restart")
            if server.process.poll() is not None or server.process.pid != pid:
                problems.append("the server process did not survive the outage")
            assert not problems, "\n".join(problems)
        finally:
            log = access_log_timeline(server.output(), int(stop_called))
            print(
                "outage server log ((second since stop, path, status): count):",
                {k: log[k] for k in sorted(log) if k[0] >= -1},
            )
            reasons = {}
            for line in server.output().splitlines():
                if "database unavailable:" in line or "unhandled error" in line:
                    reason = re.sub(r"\d+(\.\d+)?", "N", re.sub(r"^.*?whoknows:\s*", "", line))[:160]
                    reasons[reason] = reasons.get(reason, 0) + 1
            print("outage server errors:", reasons)
            server.stop()


def test_recovery_after_a_longer_outage_takes_seconds_not_the_outage_again(private_postgres, running_app):
    """A 42 s outage with a little traffic: once the database is back, the same
    process serves 200s within a few seconds, not after a reconnect backoff that
    has grown with the outage. (42 s: with psycopg_pool's doubling backoff, from
    1 s, every retry chain is then between its ~31 s and ~63 s attempts.)"""
    outage_seconds, recovery_limit, allowed = 42, 6, POOL_TIMEOUT + 2
    with fresh_database(private_postgres) as url:
        server = RunningApp(url, {"POOL_TIMEOUT": str(POOL_TIMEOUT), "SEARCH_CACHE_SECONDS": "0"})
        pid = server.process.pid
        database_down, prober = False, None
        try:
            try:
                database_down = True
                private_postgres.stop()
                prober = Prober(server.base, ["/healthz"])
                prober.start()
                time.sleep(outage_seconds)
                prober.running.clear()
                private_postgres.start()
                database_down = False
                restarted = time.time()
                recovered_after = poll_until_200(server.base, "/api/search?q=programming", recovery_limit)
                probes = [p for p in prober.finish() if p[4] < restarted]
            finally:
                if database_down:
                    private_postgres.start()
                if prober is not None:
                    prober.finish()
                wait_healthy(running_app.base, 60)
            print(
                f"\nafter a {outage_seconds} s outage ({len(probes)} probes, statuses "
                f"{sorted({p[1] for p in probes})}): first 200 after "
                f"{recovered_after and round(recovered_after, 1)} s (allowed {allowed} s)"
            )
            assert probes and all(p[1] == 503 for p in probes), probes
            assert server.process.poll() is None and server.process.pid == pid
            assert recovered_after is not None and recovered_after < allowed, (
                f"first 200 came {recovered_after and round(recovered_after, 1)} s after the database was back "
                f"(polled for {recovery_limit} s)"
            )
        finally:
            server.stop()


# 2. Body, header and URL size limits ##########################################


def raw_exchange(port, data, timeout=15):
    """Send data (as much as the server reads) and collect the answer until the
    server closes the connection or one complete response has arrived.
    Return (status or None, raw answer, whether the connection was reset)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setblocking(False)
    pending, answer, reset = memoryview(data), b"", False
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            readable, writable, _ = select.select([sock], [sock] if pending else [], [], 0.5)
            if readable:
                try:
                    chunk = sock.recv(65536)
                except BlockingIOError:
                    chunk = None
                except ConnectionResetError:
                    reset = True
                    break
                if chunk == b"":
                    break
                if chunk:
                    answer += chunk
                    head, sep, body = answer.partition(b"\r\n\r\n")
                    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                    if sep and length and len(body) >= int(length.group(1)):
                        break
            if writable and pending:
                try:
                    pending = pending[sock.send(pending[:65536]) :]
                except BlockingIOError:
                    pass
                except (BrokenPipeError, ConnectionResetError):
                    pending = pending[:0]  # the server stopped reading: listen for its answer
        else:
            raise AssertionError(f"no answer and no close within {timeout} s: {answer[:200]!r}")
    finally:
        sock.close()
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", answer)
    return (int(match.group(1)) if match else None), answer, reset


def assert_refused_cleanly(outcome, expected=None):
    status, answer, reset = outcome
    print(f"\nrefused: status {status}, {len(answer)} bytes, reset {reset}: {answer[:40]!r}")
    if status is None:  # closed (or reset) without an answer is acceptable, a 5xx is not
        assert answer == b"", answer[:300]
        return
    assert 400 <= status < 500, answer[:500]
    if expected:
        assert status == expected, answer[:500]


def assert_refused_by_waitress(status, answer):
    """A 413 from waitress itself (its plain error page, signed with the
    server's ident), before the app read the body: not from Bottle."""
    assert status == 413, answer[:500]
    assert b"Request Entity Too Large" in answer, answer[:500]
    assert f"(generated by {served('ident')})".encode() in answer, answer[:500]


def test_production_limits_request_sizes():
    assert int(served("max-request-body-size")) == 1048576
    assert int(served("max-request-header-size")) == 65536


def test_a_2_mib_body_gets_413(running_app):
    body = b"username=" + b"a" * (2 * 1024 * 1024)
    head = (
        f"POST /api/register HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/json\r\n"
        f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    status, answer, reset = raw_exchange(running_app.port, head + body)
    print(f"\n2 MiB body: status {status}, reset {reset}")
    assert_refused_by_waitress(status, answer)
    assert running_app.healthy()


def test_a_2_mib_chunked_body_gets_413(running_app):
    form = b"username=" + b"a" * (2 * 1024 * 1024)
    chunks = [form[i : i + 65536] for i in range(0, len(form), 65536)]
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks) + b"0\r\n\r\n"
    head = (
        b"POST /api/register HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/json\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    status, answer, reset = raw_exchange(running_app.port, head + body)
    print(f"\n2 MiB body: status {status}, reset {reset}")
    assert_refused_by_waitress(status, answer)
    assert running_app.healthy()


def test_a_url_encoded_body_just_under_1_mib_gets_a_clean_answer(running_app):
    fields = {"username": "u" * 1000, "email": "big@example.org", "password2": "x"}
    filler = 1048576 - 4096 - len(urllib.parse.urlencode(fields))
    body = urllib.parse.urlencode({**fields, "password": "p" * filler})
    assert 1048576 - 8192 < len(body) < 1048576
    status, _, answer, _ = request(running_app.base, "POST", "/api/register", body, {**FORM, **JSON})
    print(f"\nbody of {len(body)} bytes: {status} {answer[:120]!r}")
    assert 200 <= status < 300 or 400 <= status < 500, (status, answer[:500])
    assert running_app.healthy()


def test_a_multipart_body_just_under_1_mib_gets_a_clean_answer(running_app):
    boundary = "whoknows" + secrets.token_hex(8)
    parts = [
        ("username", "multipart_" + secrets.token_hex(4)),
        ("email", "mp@example.org"),
        ("password", "p" * (1048576 - 8192)),
        ("password2", "x"),
    ]
    body = "".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n' for k, v in parts)
    body += f"--{boundary}--\r\n"
    assert len(body) < 1048576
    status, _, answer, _ = request(
        running_app.base,
        "POST",
        "/api/register",
        body.encode(),
        {"Content-Type": f"multipart/form-data; boundary={boundary}", **JSON},
    )
    print(f"\nbody of {len(body)} bytes: {status} {answer[:120]!r}")
    assert 200 <= status < 300 or 400 <= status < 500, (status, answer[:500])
    assert running_app.healthy()


def test_a_100_kb_header_is_refused_cleanly(running_app):
    data = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * 100_000 + b"\r\n\r\n"
    assert_refused_cleanly(raw_exchange(running_app.port, data), expected=431)
    assert running_app.healthy()


def test_many_headers_over_the_limit_are_refused_cleanly(running_app):
    headers = b"".join(b"X-H%d: %s\r\n" % (n, b"b" * 1000) for n in range(100))
    data = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + headers + b"\r\n"
    assert_refused_cleanly(raw_exchange(running_app.port, data), expected=431)
    assert running_app.healthy()


def test_a_100_kb_url_is_refused_cleanly(running_app):
    data = b"GET /api/search?q=" + b"s" * 100_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/json\r\n\r\n"
    assert_refused_cleanly(raw_exchange(running_app.port, data))
    assert running_app.healthy()


def test_a_long_query_under_the_header_limit_gets_a_422(running_app):
    status, _, body, _ = request(running_app.base, "GET", "/api/search?q=" + "s" * 30_000, headers=JSON)
    assert status == 422, body[:300]


# 3. Broken encodings ##########################################################

BAD_ENCODED = {
    "ff-fe": "%ff%fe",  # not UTF-8 at all
    "nul": "%00",
    "overlong": "%c0%af",  # an overlong "/"
    "surrogate": "%ed%a0%80",  # a UTF-16 surrogate, not allowed in UTF-8
    "truncated": "%e2%82",  # a sequence cut short
}
GARBAGE_IN_OUTPUT = ("\ufffd", "\x00", "ÿþ", "Ã¿", "Ã¾")


def assert_no_garbage(body):
    text = body.decode("utf-8")  # the answer itself is valid UTF-8
    assert not any(g in text for g in GARBAGE_IN_OUTPUT), text[:500]
    return text


@pytest.mark.parametrize("payload", BAD_ENCODED.values(), ids=BAD_ENCODED.keys())
@pytest.mark.parametrize("param", ["q", "language", "page"])
@pytest.mark.parametrize("path", ["/api/search", "/"])
def test_bad_encoding_in_search_parameters_gets_4xx(running_app, path, param, payload):
    values = {"q": "search", "language": "en", "page": "1"}
    values[param] += payload
    query = "&".join(f"{k}={v}" for k, v in values.items())
    status, _, body, _ = request(running_app.base, "GET", f"{path}?{query}", headers=JSON if path != "/" else {})
    assert 400 <= status < 500, (status, body[:300])
    text = assert_no_garbage(body)
    assert param in text  # the answer says which parameter is wrong


@pytest.fixture(scope="module")
def logged_in(running_app):
    """A session cookie of a fresh account on the shared server."""
    username, password = f"encoding_{secrets.token_hex(4)}", "encoding-password"
    register(running_app.base, username, password)
    status, cookie, body = login(running_app.base, username, password)
    assert status == 200 and cookie, body
    return {"username": username, "password": password, "cookie": f"session={cookie}"}


FORMS = {
    "/api/login": ["username", "password"],
    "/api/register": ["username", "email", "password", "password2"],
    "/api/change-password": ["old_password", "password", "password2"],
}


def valid_form(path, logged_in):
    if path == "/api/login":
        return {"username": logged_in["username"], "password": "not-the-password"}
    if path == "/api/register":
        name = f"enc_{secrets.token_hex(4)}"
        return {"username": name, "email": f"{name}@example.org", "password": "secret-pw", "password2": "secret-pw"}
    return {"old_password": logged_in["password"], "password": "new-secret-pw", "password2": "new-secret-pw"}


FORM_FIELDS = [(path, field) for path, fields in FORMS.items() for field in fields]


def post_form(running_app, path, body, logged_in, accept=JSON):
    headers = {**FORM, **accept}
    if path == "/api/change-password":
        headers["Cookie"] = logged_in["cookie"]
    return request(running_app.base, "POST", path, body, headers)


@pytest.mark.parametrize("payload", BAD_ENCODED.values(), ids=BAD_ENCODED.keys())
@pytest.mark.parametrize(("path", "field"), FORM_FIELDS, ids=[f"{p}:{f}" for p, f in FORM_FIELDS])
def test_bad_encoding_in_form_fields_gets_422(running_app, logged_in, path, field, payload):
    values = {k: urllib.parse.quote(v) for k, v in valid_form(path, logged_in).items()}
    values[field] += payload
    body = "&".join(f"{k}={v}" for k, v in values.items())
    status, _, answer, _ = post_form(running_app, path, body, logged_in)
    assert status == 422, (status, answer[:300])
    detail = json.loads(assert_no_garbage(answer))["detail"][0]
    assert detail["loc"] == ["body", field], detail


RAW_BAD = {"ff-fe": b"\xff\xfe", "nul": b"\x00", "lone-continuation": b"\x80", "truncated": b"\xe2\x82"}


@pytest.mark.parametrize("payload", RAW_BAD.values(), ids=RAW_BAD.keys())
@pytest.mark.parametrize(("path", "field"), FORM_FIELDS, ids=[f"{p}:{f}" for p, f in FORM_FIELDS])
def test_raw_invalid_bytes_in_a_form_body_get_422(running_app, logged_in, path, field, payload):
    values = {k: urllib.parse.quote(v).encode() for k, v in valid_form(path, logged_in).items()}
    values[field] += payload
    body = b"&".join(k.encode() + b"=" + v for k, v in values.items())
    status, _, answer, _ = post_form(running_app, path, body, logged_in)
    assert status == 422, (status, answer[:300])
    assert json.loads(assert_no_garbage(answer))["detail"][0]["loc"] == ["body", field]


@pytest.mark.parametrize("path", FORMS)
def test_bad_encoding_in_a_browser_form_post_is_refused_without_garbage(running_app, logged_in, path):
    """A browser (Accept: text/html) gets the form again with the message, or a
    4xx: never a 5xx, and never the bytes it sent echoed back as mojibake."""
    field = FORMS[path][0]
    values = {k: urllib.parse.quote(v) for k, v in valid_form(path, logged_in).items()}
    values[field] += "%ff%fe"
    status, _, answer, _ = post_form(
        running_app, path, "&".join(f"{k}={v}" for k, v in values.items()), logged_in, {"Accept": "text/html"}
    )
    text = assert_no_garbage(answer)
    assert 400 <= status < 500 or (status == 200 and "is not valid UTF-8" in text), (status, text[:500])


# 4. Slow clients ##############################################################


def seconds_until_closed(sock, limit, drip=None):
    """Wait until the server closes sock (recv gives b'' or a reset); optionally
    send one byte of drip every second meanwhile. Return the seconds, or None."""
    started = time.monotonic()
    next_drip = started
    sock.setblocking(False)
    while time.monotonic() - started < limit:
        if drip is not None and time.monotonic() >= next_drip:
            try:
                sock.send(next(drip))
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - started
            next_drip += 1
        readable, _, _ = select.select([sock], [], [], 0.1)
        if readable:
            try:
                if sock.recv(65536) == b"":
                    return time.monotonic() - started
            except ConnectionResetError:
                return time.monotonic() - started
    return None


def test_slow_clients_do_not_block_normal_requests(running_app):
    """20 connections: 10 drip a request one byte a second, 10 send half a
    request and go silent. Another client's requests still take < 1 s each."""
    request_bytes = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"s" * 100 + b"\r\n\r\n"
    dripping = [socket.create_connection(("127.0.0.1", running_app.port), timeout=5) for _ in range(10)]
    silent = [socket.create_connection(("127.0.0.1", running_app.port), timeout=5) for _ in range(10)]
    for sock in silent:
        sock.sendall(b"GET /api/search?q=search HTTP/1.1\r\nHost: 127.0.0.1\r\nAcc")
    stop = threading.Event()
    dripped = []

    def drip():
        for n in range(len(request_bytes) - 4):  # never the final blank line
            for sock in dripping:
                sock.send(request_bytes[n : n + 1])
            dripped.append(n)
            if stop.wait(1):
                return

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    timings = []
    try:
        time.sleep(1)
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            for path in ("/api/search?q=programming", "/about", "/healthz", "/?q=search"):
                status, _, body, seconds = request(running_app.base, "GET", path, timeout=10)
                timings.append((path, status, round(seconds, 3)))
                assert status == 200, (path, status, body[:200])
            time.sleep(0.2)
    finally:
        stop.set()
        dripper.join(5)
        for sock in dripping + silent:
            sock.close()
    print(
        f"\nslow clients: {len(dripped)} bytes dripped per connection; {len(timings)} normal requests, "
        f"slowest {max(t for _, _, t in timings):.3f} s"
    )
    assert len(dripped) >= 7  # the slow clients really were slow, all along
    slow = [t for t in timings if t[2] >= 1]
    assert not slow, slow


def test_production_sets_a_channel_timeout():
    assert 1 <= int(served("channel-timeout")) <= 120
    assert 1 <= int(served("cleanup-interval")) <= int(served("channel-timeout"))


@pytest.fixture(scope="module")
def short_timeout_app(app_database):
    """The Dockerfile's CMD, but with CHANNEL_TIMEOUT=3 (so a cleanup interval
    of 1, instead of 30 and 10) so that the idle close shows within seconds.
    Every other setting is production's."""
    server = RunningApp(app_database, {"CHANNEL_TIMEOUT": "3"})
    assert whoknows.cleanup_interval(3) == 1
    yield server
    server.stop()


@pytest.mark.parametrize(
    "sent", [b"", b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Part"], ids=["nothing", "partial"]
)
def test_the_channel_timeout_closes_an_idle_client(short_timeout_app, sent):
    sock = socket.create_connection(("127.0.0.1", short_timeout_app.port), timeout=5)
    try:
        sock.sendall(sent)
        seconds = seconds_until_closed(sock, 10)
    finally:
        sock.close()
    print(f"\nidle client ({len(sent)} bytes sent) closed after {seconds} s (channel-timeout=3, cleanup-interval=1)")
    assert seconds is not None, "the idle connection was still open after 10 s"
    assert 3 - 0.5 <= seconds <= 3 + 1 + 1.5


def nginx_header_timeout():
    """The shipped nginx config's client_header_timeout, in seconds."""
    text = (ROOT / "nginx" / "nginx.conf").read_text()
    return int(re.search(r"^\s*client_header_timeout (\d+)s;", text, re.M).group(1))


def test_waitress_alone_cannot_drop_a_slow_drip_client(short_timeout_app):
    """Why nginx is in front: a client that sends one header byte a second is
    never idle for waitress's 3 s channel timeout, so waitress keeps it."""
    sock = socket.create_connection(("127.0.0.1", short_timeout_app.port), timeout=5)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Drip: ")
    try:
        seconds = seconds_until_closed(sock, 8, drip=iter(lambda: b"d", None))
    finally:
        sock.close()
    assert seconds is None, f"waitress closed a slow-drip client after {seconds} s: nginx may no longer be needed"


def test_the_proxy_closes_a_slow_drip_client(nginx_front):
    """A client that sends one header byte a second must still be dropped, or
    enough of them hold every connection slot for ever. waitress cannot (see
    above); nginx's client_header_timeout is a deadline for the whole header."""
    timeout = nginx_header_timeout()
    sock = socket.create_connection(("127.0.0.1", nginx_front.port), timeout=5)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Drip: ")
    try:
        seconds = seconds_until_closed(sock, timeout + 5, drip=iter(lambda: b"d", None))
    finally:
        sock.close()
    print(f"\nslow-drip client closed by nginx after {seconds} s (client_header_timeout {timeout} s)")
    assert seconds is not None, (
        f"a client dripping one header byte a second was still connected after {timeout + 5} s "
        f"(nginx client_header_timeout {timeout} s)"
    )
    assert seconds >= timeout - 1


def test_slow_drip_clients_at_the_connection_limit_do_not_lock_out_others_for_ever(nginx_front):
    """As many slow-drip clients as the app accepts connections (one header
    byte every 5 s, so never idle for the channel timeout), through nginx as
    production runs. Meanwhile and after nginx's header timeout, a normal
    request is served, and the slow clients have been dropped."""
    limit = int(served("connection-limit"))
    patience = nginx_header_timeout() + 5
    socks, stop, dropped = [], threading.Event(), set()

    def drip():
        while not stop.wait(5):
            for n, sock in enumerate(socks):
                try:
                    sock.send(b"d")
                except OSError:
                    dropped.add(n)  # dropped by nginx: what should happen

    try:
        for _ in range(limit):
            sock = socket.create_connection(("127.0.0.1", nginx_front.port), timeout=5)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Drip: ")
            socks.append(sock)
        dripper = threading.Thread(target=drip, daemon=True)
        dripper.start()
        meanwhile = request(nginx_front.base, "GET", "/healthz", timeout=5)[0]
        time.sleep(patience)
        try:
            status, _, _, seconds = request(nginx_front.base, "GET", "/healthz", timeout=5)
        except OSError as exc:
            status, seconds = repr(exc), None
        for n, sock in enumerate(socks):
            sock.setblocking(False)
            try:
                if sock.recv(1) == b"":
                    dropped.add(n)
            except BlockingIOError:
                pass
            except OSError:
                dropped.add(n)
        print(
            f"\n{limit} slow-drip clients through nginx: a normal GET /healthz meanwhile -> {meanwhile}, "
            f"after {patience} s -> {status} in {seconds} s; {len(dropped)} slow clients dropped"
        )
        assert meanwhile == 200, "the slow clients locked others out while they dripped"
        assert status == 200, f"with {limit} clients dripping a byte every 5 s, a normal request got {status}"
        assert len(dropped) == limit, f"only {len(dropped)} of {limit} slow-drip clients were dropped"
    finally:
        stop.set()
        for sock in socks:
            sock.close()


# 5. Concurrent migrations #####################################################


def test_two_concurrent_yoyo_applies_give_one_correct_schema(private_postgres):
    """Two `yoyo apply --batch` at the same moment on an empty database, three
    times over: both succeed (one waits for yoyo's lock), and the schema is
    there once, with one row per migration."""
    yoyo = str(BIN / "yoyo")
    expected = whoknows.migration_ids()
    for round_ in range(3):
        with fresh_database(private_postgres, migrate=False) as url:
            env = {**os.environ, "DATABASE_URL": whoknows.yoyo_url(url)}
            go = threading.Barrier(2)
            results = [None, None]

            def run(i, go=go, env=env, results=results):
                go.wait()
                started = time.monotonic()
                done = subprocess.run(
                    [yoyo, "apply", "--batch"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=50
                )
                results[i] = (done.returncode, done.stdout, done.stderr, time.monotonic() - started)

            threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            print(f"\nround {round_}: " + "; ".join(f"exit {r[0]} in {r[3]:.1f} s" for r in results))
            for code, out, err, _ in results:
                assert code == 0, (out, err)
            with psycopg.connect(url) as conn:
                rows = [r[0] for r in conn.execute("SELECT migration_id FROM _yoyo_migration")]
                assert sorted(rows) == sorted(expected), rows
                applies = dict(
                    conn.execute(
                        "SELECT migration_id, count(*) FROM _yoyo_log WHERE operation = 'apply' GROUP BY migration_id"
                    ).fetchall()
                )
                assert applies == {m: 1 for m in expected}, applies
                tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
                assert {"users", "pages", "sessions", "login_failures"} <= tables, tables
                assert conn.execute("SELECT count(*) FROM yoyo_lock").fetchone()[0] == 0  # the lock was released
                versions = conn.execute("SELECT count(*), count(DISTINCT version) FROM _yoyo_version").fetchone()
                assert versions[0] == versions[1] >= 1, versions
            with psycopg.connect(url, row_factory=psycopg.rows.dict_row) as conn:
                assert whoknows.pending_migrations(conn) == []
