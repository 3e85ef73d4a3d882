"""The cluster benchmark, in one command: `make bench-cluster CLUSTER_N=20000`.

    .venv/bin/python bench/cluster.py --pages N [--duration S] [--connections C]

1. generates N pages and a query mix (bench/generate.py; cached in bench/data/);
2. starts a primary PostgreSQL 18 and a streaming standby cloned from it with
   pg_basebackup -R (tests/replication.py, durable: fsync on), and imports
   the pages with `python app.py import`;
3. runs each kind of request with wrk for S seconds:
   (a) against one app process on the primary, straight;
   (b) against two app processes behind nginx (nginx/nginx.conf), which read
       searches and result pages from the standby;
4. measures the CPU time each part spends per request (app processes, nginx,
   primary, standby: psutil, before and after each run), which is what the
   capacity model in bench/README.md is built from;
5. prints a table and writes it to bench/results/cluster-N-<time>.md.

The search cache is off (SEARCH_CACHE_SECONDS=0), so every search reaches the
database; the search log is on, so the primary's cost per search is what
recording it costs. Needs wrk and nginx (`apt-get install wrk nginx`).
"""

import argparse
import datetime as dt
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlencode

import psutil
import psycopg

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PYTHON = sys.executable
sys.path.insert(0, str(ROOT / "tests"))  # the standby and nginx helpers the tests use
from cluster import Nginx  # noqa: E402
from replication import StreamingPair, free_port  # noqa: E402

# A throwaway account on a throwaway server.
PASSWORD = "bench-password-1"  # noqa: S105  # nosec B105
WRK_LUA = r"""
local paths, method, body_of = {}, "GET", nil
local counter, prefix = 0, "u"
local threads = 0

function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

function init(args)
  prefix = (args[1] or "u") .. "t" .. tostring(tid)
  for line in io.lines(os.getenv("BENCH_PATHS")) do paths[#paths + 1] = line end
  if os.getenv("BENCH_KIND") == "login" then
    method = "POST"
    body_of = function() return "username=bench&password=" .. os.getenv("BENCH_PASSWORD") end
  elseif os.getenv("BENCH_KIND") == "register" then
    method = "POST"
    body_of = function()
      counter = counter + 1
      local name = prefix .. "_" .. tostring(counter) .. "_" .. tostring(math.random(1e9))
      local pw = os.getenv("BENCH_PASSWORD")
      return "username=" .. name .. "&email=" .. name .. "%40example.org&password=" .. pw .. "&password2=" .. pw
    end
  end
end

function request()
  counter = counter + 1
  local headers = {["Accept"] = "application/json"}
  if os.getenv("BENCH_COOKIE") ~= "" then headers["Cookie"] = os.getenv("BENCH_COOKIE") end
  if method == "POST" then
    headers["Content-Type"] = "application/x-www-form-urlencoded"
    return wrk.format("POST", paths[1], headers, body_of())
  end
  return wrk.format("GET", paths[counter % #paths + 1], headers)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK-RESULT {"requests": %d, "duration_us": %d, "non2xx": %d, "socket": %d, "p50_us": %d, "p99_us": %d}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""
KINDS = ("search", "search (logged in)", "result page", "login", "register")


def log(message):
    print(f"[bench-cluster {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def ensure_data(pages):
    """Generate (or reuse) N pages and a query mix with bench/generate.py."""
    data = BENCH / "data"
    data.mkdir(exist_ok=True)
    pages_file, queries_file = data / f"pages-{pages}.jsonl", data / f"queries-{pages}.txt"
    if not pages_file.exists() or not queries_file.exists():
        log(f"generating {pages:,} pages")
        command = [PYTHON, str(BENCH / "generate.py"), str(pages), str(pages_file), "--queries", str(queries_file)]
        subprocess.run(command, check=True)
    return pages_file, queries_file


def paths_file(queries_file, folder):
    """Write the request paths of each kind; return {kind: file}."""
    queries = [line.split("\t", 1) for line in queries_file.read_text(encoding="utf-8").splitlines() if "\t" in line]
    files = {}
    for kind, prefix in (("search", "/api/search?"), ("result page", "/?")):
        files[kind] = folder / f"{kind.replace(' ', '-')}.paths"
        files[kind].write_text("".join(f"{prefix}{urlencode({'q': q, 'language': lang})}\n" for lang, q in queries))
    files["search (logged in)"] = files["search"]
    for kind in ("login", "register"):
        files[kind] = folder / f"{kind}.paths"
        files[kind].write_text(f"/api/{kind}\n")
    return files


def serve(primary_url, folder, replica_url=None):
    """Start `python app.py serve` on a free port; return (process, port) once healthy."""
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": primary_url,
        "SECRET_KEY": secrets.token_hex(32),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "SEARCH_CACHE_SECONDS": "0",
        "ACCESS_LOG": "false",
        "TRUSTED_PROXIES": "127.0.0.1/32",
        "LOGIN_MAX_FAILURES": "1000",
    }
    if replica_url:
        env["DATABASE_REPLICA_URL"] = replica_url
    output = open(folder / f"app-{port}.log", "w")  # noqa: SIM115 (the process keeps it)
    process = subprocess.Popen([PYTHON, "app.py", "serve"], cwd=ROOT, env=env, stdout=output, stderr=output)
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).close()  # nosec B310
            return process, port
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the app did not become healthy") from None
            time.sleep(0.2)


def cpu_seconds(pids):
    """CPU time (user + system) of these processes and their children, by process id."""
    seen = {}
    for pid in pids:
        try:
            root = psutil.Process(pid)
            for proc in [root, *root.children(recursive=True)]:
                times = proc.cpu_times()
                seen[proc.pid] = times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return seen


def spent(before, after):
    """CPU seconds spent between two cpu_seconds() samples (new processes count whole)."""
    return sum(after[pid] - before.get(pid, 0.0) for pid in after)


def postmaster_pid(node):
    return int((node.pgdata / "postmaster.pid").read_text().split()[0])


def wrk(base, kind, paths, duration, connections, tiers, folder, cookie=""):
    """Run wrk for one kind; return its figures and CPU ms per request of each tier."""
    script = folder / "bench.lua"
    script.write_text(WRK_LUA)
    env = {**os.environ, "BENCH_PATHS": str(paths[kind]), "BENCH_KIND": kind, "BENCH_PASSWORD": PASSWORD}
    env["BENCH_COOKIE"] = cookie
    before = {name: cpu_seconds(pids) for name, pids in tiers.items()}
    command = ["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--timeout=10s", f"-s{script}", base]
    done = subprocess.run([*command, "--", secrets.token_hex(3)], capture_output=True, text=True, env=env)
    after = {name: cpu_seconds(pids) for name, pids in tiers.items()}
    line = next(x for x in done.stdout.splitlines() if x.startswith("WRK-RESULT "))
    result = json.loads(line.removeprefix("WRK-RESULT "))
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    result["cpu_ms"] = {name: 1000 * spent(before[name], after[name]) / max(result["requests"], 1) for name in tiers}
    return result


def bench_session(base):
    """Register the bench user (once) and log in; return the session cookie."""
    body = urlencode({"username": "bench", "email": "bench@example.org", "password": PASSWORD, "password2": PASSWORD})
    request = urllib.request.Request(f"{base}/api/register", data=body.encode(), headers={"Accept": "application/json"})
    try:
        urllib.request.urlopen(request, timeout=30).close()  # nosec B310
    except urllib.error.HTTPError as exc:  # already there (a second setup)
        if exc.code != 422:
            raise
    body = urlencode({"username": "bench", "password": PASSWORD}).encode()
    request = urllib.request.Request(f"{base}/api/login", data=body, headers={"Accept": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:  # nosec B310
        return response.headers["Set-Cookie"].split(";")[0]


def run_setup(name, base, tiers, paths, args, folder):
    """Every kind of request against one setup; return {kind: result}."""
    cookie = bench_session(base)
    results = {}
    for kind in KINDS:
        log(f"{name}: {kind} for {args.duration} s")
        session = cookie if kind == "search (logged in)" else ""
        results[kind] = wrk(base, kind, paths, args.duration, args.connections, tiers, folder, session)
    return results


def direct(pair, paths, args, folder):
    """(a) One app process on the primary, straight."""
    process, port = serve(pair.primary.url("whoknows"), folder)
    try:
        tiers = {"app": [process.pid], "primary": [postmaster_pid(pair.primary)]}
        return run_setup("one process", f"http://127.0.0.1:{port}", tiers, paths, args, folder)
    finally:
        process.terminate()
        process.wait(30)


def behind_nginx(pair, paths, args, folder):
    """(b) Two app processes behind nginx, searches on the standby."""
    apps = [serve(pair.primary.url("whoknows"), folder, pair.standby.url("whoknows")) for _ in range(2)]
    proxy = Nginx(free_port(), [port for _, port in apps]).start()
    try:
        tiers = {
            "app": [process.pid for process, _ in apps],
            "nginx": [proxy.process.pid],
            "primary": [postmaster_pid(pair.primary)],
            "standby": [postmaster_pid(pair.standby)],
        }
        return run_setup("two processes + nginx + standby", proxy.base, tiers, paths, args, folder)
    finally:
        proxy.stop()
        for process, _ in apps:
            process.terminate()
            process.wait(30)


TIERS = ("app", "nginx", "primary", "standby")


def table(results):
    """Return the figures as a markdown table."""
    lines = [
        "| setup | request | req/s | p50 ms | p99 ms | errors | CPU ms/request: app | nginx | primary | standby |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for setup, kinds in results.items():
        for kind, r in kinds.items():
            cpu = " | ".join(f"{r['cpu_ms'][t]:.3f}" if t in r["cpu_ms"] else "—" for t in TIERS)
            errors = r["non2xx"] + r["socket"]
            lines.append(
                f"| {setup} | {kind} | {r['rps']:,.0f} | {r['p50_us'] / 1000:.1f} | {r['p99_us'] / 1000:.1f} "
                f"| {errors} | {cpu} |"
            )
    return "\n".join(lines) + "\n"


def capacity(results):
    """Return the capacity model's lines: requests per second one core of each tier sustains, by kind."""
    lines = [
        "| request | one app process (core) | one standby (core) | the primary (core) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for kind, r in results["two processes + nginx + standby"].items():
        cells = []
        for tier in ("app", "standby", "primary"):
            ms = r["cpu_ms"][tier]
            cells.append(f"{1000 / ms:,.0f}" if ms >= 0.1 else "> 10,000")
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def settle(url):
    """Vacuum, analyze and checkpoint after the import, so that autovacuum and
    the checkpointer do not run during (and count in) the first measurements."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE)")
        conn.execute("CHECKPOINT")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=20_000, help="pages in the corpus (default 20000)")
    parser.add_argument("--duration", type=int, default=10, help="seconds of wrk per request kind (default 10)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (default 16)")
    args = parser.parse_args()
    pages_file, queries_file = ensure_data(args.pages)
    folder = Path(tempfile.mkdtemp(prefix="whoknows-bench-cluster-"))
    paths = paths_file(queries_file, folder)
    log("starting a primary and a standby (pg_basebackup -R)")
    pair = StreamingPair(durable=True, settings="max_connections = 100\nshared_buffers = 256MB\n").start()
    try:
        primary_url, _ = pair.create_database("whoknows")
        log(f"importing {args.pages:,} pages")
        env = {**os.environ, "DATABASE_URL": primary_url}
        subprocess.run([PYTHON, "app.py", "import", str(pages_file)], cwd=ROOT, env=env, check=True)
        settle(primary_url)
        pair.wait_replayed(timeout=300)
        results = {"one process": direct(pair, paths, args, folder)}
        results["two processes + nginx + standby"] = behind_nginx(pair, paths, args, folder)
    finally:
        pair.cleanup()
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H%M")
    command = f"make bench-cluster N={args.pages} (--duration {args.duration} --connections {args.connections})"
    report = (
        f"# Cluster benchmark, {args.pages:,} pages, {stamp} UTC\n\n`{command}` on {os.cpu_count()} cores "
        f"(wrk, nginx, both app processes and both servers share them).\n\n{table(results)}\n"
        f"Requests per second that one core of each part sustains (1000 / CPU ms per request, setup b):\n\n"
        f"{capacity(results)}"
    )
    out = BENCH / "results" / f"cluster-{args.pages}-{stamp}.md"
    out.write_text(report)
    print(report)
    log(f"written to {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
