"""Soak: a long mixed load with wrk at 16 connections (SOAK_SECONDS, default
180), watching the server's memory and database connections. Slow by design:
run it with `make verify`, or alone with -k soak.
"""

import os
import secrets
import statistics
import threading
import time

import psycopg

import app as whoknows

from .conftest import RunningApp
from .test_faults import WRK_COUNTING_LUA, fresh_database, request, socket_errors, start_wrk, wrk_result

SOAK_SECONDS = int(os.environ.get("SOAK_SECONDS", "180"))
POOL_MAX_SIZE = int(os.environ.get("POOL_MAX_SIZE", "12"))  # the app's default, unless set for the run
ACCOUNTS = 2000  # enough that wrong passwords rarely reach the lock (5 per username and address)
THREADS = 4

# Forty requests a cycle: searches (API and page; the same few words, cached,
# and a bounded set of others), page views, one registration (a new username
# every time) and two logins to accounts made beforehand, one of them with a
# wrong password. Accounts rotate so each takes few failures.
SOAK_LUA = (
    WRK_COUNTING_LUA
    + r"""
local counter, logins = 0, 0
local prefix, accounts, nthreads
local words = {"search", "programming", "page", "engines", "s%C3%B8gning", "index", "talks", "number"}
local json = {["Accept"] = "application/json"}
local form = {["Accept"] = "application/json", ["Content-Type"] = "application/x-www-form-urlencoded"}

function init(args)
  prefix, accounts, nthreads = args[1], tonumber(args[2]), tonumber(args[3])
end

function request()
  counter = counter + 1
  local slot = counter % 40
  local word = words[(counter % #words) + 1]
  if slot < 12 then
    return wrk.format("GET", "/api/search?q=" .. word .. "&page=" .. (counter % 3 + 1), json)
  elseif slot < 18 then
    local n = counter % 500
    return wrk.format("GET", "/api/search?q=search+-x" .. n .. "&language=" .. ((n % 2 == 0) and "en" or "da"), json)
  elseif slot < 26 then
    return wrk.format("GET", "/?q=" .. word .. ((counter % 2 == 0) and "&language=da" or ""))
  elseif slot < 31 then
    return wrk.format("GET", "/about")
  elseif slot < 36 then
    return wrk.format("GET", "/login")
  elseif slot < 37 then
    return wrk.format("GET", "/healthz")
  elseif slot < 38 then
    local name = prefix .. "new_" .. id .. "_" .. counter
    local body = "username=" .. name .. "&email=" .. name .. "%40example.org" ..
                 "&password=soak-password&password2=soak-password"
    return wrk.format("POST", "/api/register", form, body)
  else
    logins = logins + 1
    local wrong = (slot == 39)
    local user = (logins * nthreads + id + (wrong and math.floor(accounts / 2) or 0)) % accounts
    local password = wrong and "wrong-password" or "soak-password"
    return wrk.format("POST", "/api/login", form, "username=" .. prefix .. "acct_" .. user .. "&password=" .. password)
  end
end
"""
)


class Sampler(threading.Thread):
    """Every `every` seconds: the server's RSS and its open database connections."""

    def __init__(self, pid, url, every=1.0):
        super().__init__(daemon=True)
        self.pid, self.url, self.every = pid, url, every
        self.dbname = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
        self.stop_event = threading.Event()
        self.samples = []  # (seconds since start, RSS in MB, connections)
        self.started = time.monotonic()

    def rss_mb(self):
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def run(self):
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self.stop_event.is_set():
                connections = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'whoknows' AND datname = %s",
                    (self.dbname,),
                ).fetchone()[0]
                self.samples.append((time.monotonic() - self.started, self.rss_mb(), connections))
                self.stop_event.wait(self.every)

    def finish(self):
        self.stop_event.set()
        if self.ident is not None:  # started
            self.join(10)
        return self.samples


def window(samples, start, end, index):
    values = [s[index] for s in samples if start <= s[0] < end]
    assert values, f"no samples between {start} and {end} s"
    return values


def test_soak_mixed_load_keeps_memory_and_connections_flat(private_postgres, tmp_path):
    duration = SOAK_SECONDS
    prefix = f"s{secrets.token_hex(3)}_"
    with fresh_database(private_postgres, pages=200) as url:
        # Accounts for the logins, straight into the database with one real hash.
        password_hash = whoknows.hash_password("soak-password")
        with psycopg.connect(url) as conn, conn.cursor() as cur:
            cur.executemany(
                whoknows.sql("insert_user"),
                [
                    {
                        "username": f"{prefix}acct_{n}",
                        "email": f"{prefix}acct_{n}@example.org",
                        "password_hash": password_hash,
                    }
                    for n in range(ACCOUNTS)
                ],
            )
        server = RunningApp(url)
        sampler = Sampler(server.process.pid, url, every=0.25)
        wrk = None
        try:
            status, _, body, _ = request(
                server.base,
                "POST",
                "/api/login",
                {"username": f"{prefix}acct_1", "password": "soak-password"},
                {"Accept": "application/json"},
            )
            assert status == 200, body  # the accounts work
            sampler.start()
            wrk = start_wrk(
                server.base,
                SOAK_LUA,
                duration,
                tmp_path,
                connections=16,
                threads=THREADS,
                timeout="10s",
                args=[prefix, str(ACCOUNTS), str(THREADS)],
            )
            result = wrk_result(wrk, duration + 60)
            samples = sampler.finish()
            alive = server.process.poll() is None
            healthy_after = server.healthy()
            with psycopg.connect(url) as conn:
                registered = conn.execute(
                    "SELECT count(*) FROM users WHERE username LIKE %s", (f"{prefix}new_%",)
                ).fetchone()[0]
        finally:
            sampler.finish()
            if wrk is not None and wrk.poll() is None:
                wrk.kill()
                wrk.wait()
            output = server.output()
            server.stop()

    codes = {int(k): v for k, v in result["codes"].items()}
    seconds = result["duration_us"] / 1e6
    if duration >= 120:
        warm, last, first_minute, last_minute = (30, 60), (duration - 30, duration), (0, 60), (duration - 60, duration)
    else:  # a short run (a smoke test): halves and quarters, and no flatness verdict on memory
        warm, last = (duration / 4, duration / 2), (duration * 3 / 4, duration)
        first_minute, last_minute = (0, duration / 2), (duration / 2, duration)
    # Each password hash maps a 32 MiB scrypt buffer for ~80 ms (two at most),
    # so a sample shows 0, 32 or 64 MiB on top of the heap, and a window's
    # median can flip by 32 MiB with no leak. At this load a hash is in
    # flight most of the time, so even a window's low decile of one sample a
    # second flipped (CI: 88.5 MB, then 108.7, while the lows of the samples
    # in between stayed at 86-91). The floor, the lowest of four samples a
    # second, is the RSS between hashes: what a leak would raise. The medians
    # are printed as well.
    rss_warm = statistics.median(window(samples, *warm, 1))
    rss_last = statistics.median(window(samples, *last, 1))
    low_warm = min(window(samples, *warm, 1))
    low_last = min(window(samples, *last, 1))
    conns_first_max = max(window(samples, *first_minute, 2))
    conns_last_mean = statistics.mean(window(samples, *last_minute, 2))
    conns_max = max(s[2] for s in samples)
    errors = [line for line in output.splitlines() if "unhandled error" in line or "Traceback" in line]
    print(
        f"\nsoak: {duration} s, {result['requests']} requests, {result['requests'] / seconds:.0f} req/s, "
        f"statuses {dict(sorted(codes.items()))}, registrations stored {registered}, "
        f"latency p50 {result['p50_us'] / 1e3:.1f} ms p99 {result['p99_us'] / 1e3:.0f} ms "
        f"max {result['max_us'] / 1e3:.0f} ms, socket errors connect/read/write/timeout {socket_errors(result)}; "
        f"RSS median {rss_warm:.1f} MB at {warm[0]:.0f}-{warm[1]:.0f} s, "
        f"{rss_last:.1f} MB at {last[0]:.0f}-{last[1]:.0f} s, floor {low_warm:.1f} -> {low_last:.1f} MB "
        f"(min {min(s[1] for s in samples):.1f}, max {max(s[1] for s in samples):.1f}); "
        f"db connections first-minute max {conns_first_max}, last-minute mean {conns_last_mean:.1f}, "
        f"max {conns_max} (pool max {POOL_MAX_SIZE}); {len(samples)} samples"
    )
    print("soak samples (s, RSS MB, connections):", [(round(t), round(r, 1), c) for t, r, c in samples[::40]])

    fivexx = {c: n for c, n in codes.items() if c >= 500}
    assert not fivexx, f"5xx responses: {fivexx}; server errors: {errors[:5]}"
    assert not errors, errors[:5]
    assert set(codes) <= {200, 422, 429}, codes  # 422: wrong password; 429: a rare lock
    assert codes.get(429, 0) <= result["requests"] * 0.01, codes
    assert result["timeout"] == result["connect"] == result["read"] == result["write"] == 0, result
    assert registered > 0
    assert alive and healthy_after
    assert conns_max <= POOL_MAX_SIZE, f"{conns_max} connections, pool max {POOL_MAX_SIZE}"
    if duration < 120:
        print("soak: under 120 s, too short to judge memory growth (the first minute is warm-up)")
        return
    assert low_last <= max(low_warm * 1.15, low_warm + 20), (
        f"memory grew: RSS floor {low_warm:.1f} MB in {warm} s, {low_last:.1f} MB in {last} s "
        f"(medians {rss_warm:.1f} and {rss_last:.1f} MB)"
    )
    # Flat, not growing: later minutes may reach what the server can use at
    # once (a connection per waitress thread, and the search log's writer)
    # even if the first minute did not; beyond that would be a leak.
    ceiling = max(conns_first_max, whoknows.Settings.from_env(environ={}, dotenv_path=None).threads + 1)
    assert conns_last_mean <= ceiling, (conns_first_max, conns_last_mean, ceiling)
