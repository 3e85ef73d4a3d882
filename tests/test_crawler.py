"""The crawler against local sites on 127.0.0.1 (tests/crawl_site.py): the
traps of issue 12, limits, recrawls, two crawlers on one frontier, a crawler
killed with kill -9, and the refusal of private addresses.

Every request goes to servers these tests start on 127.0.0.1. Delays and
timeouts are lowered (--delay 0.05, read timeout 0.3 s) so that the file runs
in well under a minute and a half.
"""

import dataclasses
import io
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from crawl_site import GENERATED, Site, conditional, generated_site, page, trap_site

import app as whoknows
import crawler

ROOT = Path(__file__).resolve().parent.parent
FAST = {
    "crawler_connect_timeout": 1.0,
    "crawler_read_timeout": 0.3,
    "crawler_total_timeout": 2.0,
    "crawler_retry_seconds": 0.05,
    "crawler_lease_seconds": 3.0,
}


@pytest.fixture
def crawl_settings(settings):
    """The tests' settings with the crawler's timeouts and waits made short."""
    return dataclasses.replace(settings, **FAST)


@pytest.fixture
def site():
    """An empty local site, served while the test runs."""
    served = Site().start()
    yield served
    served.stop()


@pytest.fixture
def run(crawl_settings):
    """Run the crawler in this process: run(*argv) -> (exit status, what it printed)."""

    def crawl(*argv):
        out, progress = io.StringIO(), io.StringIO()
        status = crawler.main([str(a) for a in argv], settings=crawl_settings, out=out, progress=progress)
        return status, out.getvalue() + progress.getvalue()

    return crawl


def frontier(db):
    """Return the frontier as {url: row}."""
    rows = db.execute("SELECT url, state, depth, attempts, last_status, note, indexed FROM crawl_frontier")
    return {row["url"]: row for row in rows}


def pages(db):
    """Return the pages table as {url: row}."""
    return {row["url"]: row for row in db.execute("SELECT url, title, language, content FROM pages")}


def search_urls(app, q, language="en"):
    """Return the urls that the app's search finds for q (first page)."""
    with app.db.connection() as conn:
        return [row["url"] for row in whoknows.run_search(conn, q, language, 1).rows]


def crawler_env(database_url, **extra):
    """The environment of a crawler subprocess: the test database and short waits."""
    env = {**os.environ, "DATABASE_URL": database_url, **{k.upper(): str(v) for k, v in FAST.items()}}
    env.update(extra)
    return env


def start_crawler(database_url, *argv):
    """Start `python crawler.py argv...` against the test database."""
    command = [sys.executable, str(ROOT / "crawler.py"), *map(str, argv)]
    return subprocess.Popen(
        command, cwd=ROOT, env=crawler_env(database_url), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


# The trap site ################################################################


def test_a_crawl_of_the_trap_site(site, run, db, app, caplog):
    trap_site(site)
    with caplog.at_level(logging.WARNING, logger="whoknows.crawler"):
        status, printed = run(site.url("/"), "--allow-private", "--delay", "0.05")
    assert status == 0, printed
    assert re.search(r"crawl: fetched \d+, queued \d+, errors \d+, [\d.]+ pages/s", printed)  # progress
    counts = printed.split("crawled: ")[1].splitlines()[0]  # the counts at the end
    for count in ("indexed 25", "language 1", "duplicate 1", "noindex 1", "robots 1", "gone 2", "failed 3"):
        assert count in counts, counts

    indexed = {url.removeprefix(site.base) for url in pages(db)}
    generated = {f"/page/{n}" for n in range(1, GENERATED + 1)}
    assert indexed == generated | {
        "/",
        "/landing",  # where the redirect chain ends
        "/flaky",  # a 500, then fine on retry
        "/gzip",
        "/latin1",
        "/canonical",  # /alias names it as canonical
        "/from-noindex",  # linked from a noindex page that may be followed
        "/dup-a",  # /dup-b has the same content
        "/dansk",
        "/nolang",
        "/nofollow-meta",
        "/notes.txt",
        "/og",
    }

    # Asked once each; the 500 twice, the slow page until the attempts ran out.
    hits = dict(site.hits)
    assert hits.pop("/flaky") == 2
    assert hits.pop("/slow") == crawler.MAX_ATTEMPTS
    assert set(hits.values()) == {1}
    for never in ("/private/secret", "/never", "/hidden-by-rel", "/hop/7", "/hop/8"):
        assert never not in site.hits, never
    assert site.max_in_flight == 1
    # robots.txt's Crawl-delay (0.1 s) raised --delay (0.05): requests never
    # start closer together than that (a bound the crawler guarantees).
    starts = [t for t, _ in site.starts]
    assert min(b - a for a, b in zip(starts, starts[1:])) >= 0.09
    agents = {headers["User-Agent"] for seen in site.requests.values() for headers in seen}
    assert agents == {whoknows.Settings.crawler_user_agent} and "+https://" in agents.pop()

    rows = {url.removeprefix(site.base): row for url, row in frontier(db).items()}
    assert not [url for url in rows if not url.startswith("/")], "another host, mailto: or javascript: was queued"
    assert "/#top" not in rows and "/page/13" in rows  # fragment dropped; ../page/13 resolved
    notes = {url: (row["state"], row["note"]) for url, row in rows.items()}
    assert notes["/private/secret"] == ("skipped", "disallowed by robots.txt")
    assert notes["/missing"] == ("gone", "HTTP 404")
    assert notes["/loop/a"][0] == "failed" and "redirect loop" in notes["/loop/a"][1]
    assert notes["/hop/1"] == ("failed", "more than 5 redirects")
    assert notes["/away"] == ("done", "redirects to http://other.invalid/x (out of scope)")
    assert notes["/redirect/1"] == ("done", f"redirected to {site.url('/landing')}")
    assert notes["/file.pdf"] == ("skipped", "not HTML or text (application/pdf)")
    assert notes["/big"] == ("skipped", "larger than 2 MB")
    assert notes["/slow"] == ("failed", "gave up after 3 attempts: timed out")
    assert notes["/alias"] == ("skipped", f"canonical is {site.url('/canonical')}")
    assert notes["/noindex"] == ("skipped", "meta robots noindex")
    assert notes["/dup-b"] == ("skipped", f"duplicate of {site.url('/dup-a')}")
    assert notes["/deutsch"] == ("skipped", "language de")
    assert rows["/flaky"]["attempts"] == 2 and rows["/flaky"]["indexed"]
    assert max(row["depth"] for row in rows.values()) == 7  # /page/12 is six links below /page/1

    stored = {url.removeprefix(site.base): row for url, row in pages(db).items()}
    assert stored["/latin1"]["language"] == "da" and "Rødgrød med fløde på Østerbro" in stored["/latin1"]["content"]
    assert stored["/latin1"]["title"] == "Blåbærgrød på Østerbro"
    assert stored["/dansk"]["language"] == "da"  # lang="da-DK"
    assert stored["/nolang"]["language"] == "en"  # no lang: the detector
    assert stored["/nolang"]["title"] == "Heading as title"  # no <title>: the <h1>
    assert stored["/og"]["title"] == "Open Graph title"
    assert stored["/notes.txt"]["title"] == "Plain notes"
    assert "armadillo" in stored["/gzip"]["content"]
    assert "quokka" in stored["/page/1"]["content"]
    assert "sitewide" not in stored["/page/1"]["content"] and "footer" not in stored["/page/1"]["content"]

    # Searchable as soon as the crawl is done.
    found = search_urls(app, "quokka")
    assert len(found) == 10 and set(found) <= {site.url(p) for p in generated}
    assert search_urls(app, "narwhal") == [site.url("/canonical")]
    assert search_urls(app, "axolotl") == [site.url("/dup-a")]
    assert search_urls(app, "pelican") == [site.url("/landing")]
    assert search_urls(app, "wombat") == [site.url("/flaky")]
    assert search_urls(app, "platypus") == []  # noindex
    assert search_urls(app, "rødgrød", "da") == [site.url("/latin1")]
    assert search_urls(app, "søgemaskinen", "da") == [site.url("/dansk")]

    logged = "\n".join(record.getMessage() for record in caplog.records)
    for line in ("gone " + site.url("/missing"), "failed " + site.url("/slow"), "failed " + site.url("/loop/a")):
        assert line in logged


def test_limits_on_pages_depth_and_hosts(site, run, db):
    generated_site(site, 40)
    assert run(site.url("/g/1"), "--allow-private", "--delay", "0", "--max-depth", "2")[0] == 0
    rows = frontier(db)
    assert {row["depth"] for row in rows.values()} == {0, 1, 2}
    assert set(rows) == {site.url(f"/g/{n}") for n in range(1, 8)}

    db.execute("TRUNCATE crawl_frontier, crawl_hosts, crawl_robots, pages CASCADE")
    assert run(site.url("/g/1"), "--allow-private", "--delay", "0", "--max-pages", "5")[0] == 0
    assert len(frontier(db)) == 5 and len(pages(db)) == 5

    db.execute("TRUNCATE crawl_frontier, crawl_hosts, crawl_robots, pages CASCADE")
    assert run(site.url("/g/1"), "--allow-private", "--delay", "0", "--max-per-host", "3")[0] == 0
    assert len(frontier(db)) == 3


def test_a_crawl_delay_below_delay_does_not_lower_it(site, run):
    generated_site(site, 3)
    site.add("/robots.txt", "User-agent: *\nCrawl-delay: 0.01\n", content_type="text/plain")
    assert run(site.url("/g/1"), "--allow-private", "--delay", "0.2")[0] == 0
    starts = [t for t, _ in site.starts]
    assert len(starts) == 4  # robots.txt and three pages
    assert min(b - a for a, b in zip(starts, starts[1:])) >= 0.19


def test_other_hosts_are_crawled_only_when_allowed(run, db):
    first, second = generated_site(Site().start(), 3), generated_site(Site().start(), 3, word="kiwi")
    try:
        first.routes["/g/1"] = lambda request: (
            200,
            {"Content-Type": "text/html"},
            page("Start", "<p>start</p>", links=[f"http://localhost:{second.port}/g/1"]).encode(),
        )
        assert run(first.url("/g/1"), "--allow-private", "--delay", "0")[0] == 0
        assert not second.hits  # another host: out of scope by default
        db.execute("TRUNCATE crawl_frontier, crawl_hosts, crawl_robots, pages CASCADE")
        assert run(first.url("/g/1"), "--allow-private", "--delay", "0", "--allow-hosts", "localhost")[0] == 0
        assert second.hits["/g/1"] == 1 and second.hits["/g/3"] == 1
    finally:
        first.stop()
        second.stop()


# Recrawling ###################################################################


def test_recrawl_sends_conditional_gets_and_removes_pages_that_are_gone(site, run, db, app):
    stamp = "Wed, 01 Jan 2025 00:00:00 GMT"
    links = ["/etag", "/doomed"]
    site.add("/", page("Recrawl home", "<p>The home of the recrawl.</p>", links=links))
    site.routes["/etag"] = conditional(page("Tagged page", "<p>The okapi has an etag.</p>"), '"v1"', stamp)
    site.add("/doomed", page("Doomed page", "<p>The dodo will be gone.</p>"))
    assert run(site.url("/"), "--allow-private", "--delay", "0")[0] == 0
    assert search_urls(app, "okapi") == [site.url("/etag")]
    assert search_urls(app, "dodo") == [site.url("/doomed")]

    site.add("/doomed", "gone", status=410, content_type="text/plain")
    status, printed = run("--recrawl", "--allow-private", "--delay", "0")
    assert status == 0 and "Queued 3 known URLs again" in printed
    second = site.requests["/etag"][1]
    assert second["If-None-Match"] == '"v1"' and second["If-Modified-Since"] == stamp
    rows = frontier(db)
    assert rows[site.url("/etag")]["last_status"] == 304 and rows[site.url("/etag")]["indexed"]
    assert rows[site.url("/doomed")]["state"] == "gone"
    assert set(pages(db)) == {site.url("/"), site.url("/etag")}
    assert search_urls(app, "okapi") == [site.url("/etag")]  # 304 kept it
    assert search_urls(app, "dodo") == []


def test_status_prints_the_frontier_by_host(site, run, capsys):
    generated_site(site, 3)
    assert run(site.url("/g/1"), "--allow-private", "--delay", "0")[0] == 0
    assert run("--status")[0] == 0
    printed = capsys.readouterr().out
    assert "frontier: 3 URLs, queued 0, fetching 0, done 3, indexed 3" in printed
    assert f"127.0.0.1:{site.port}" in printed


# Many crawlers ################################################################


def test_two_crawler_processes_fetch_every_url_exactly_once(database_url, db):
    sites = [generated_site(Site().start(), 60), generated_site(Site().start(), 60, word="kiwi")]
    try:
        seeds = [s.url("/g/1") for s in sites]
        argv = [*seeds, "--allow-private", "--delay", "0.02", "--workers", "2"]
        crawlers = [start_crawler(database_url, *argv) for _ in range(2)]
        results = [process.communicate(timeout=60) for process in crawlers]
        assert [process.returncode for process in crawlers] == [0, 0], results
        for served in sites:
            assert set(served.hits) == {"/robots.txt"} | {f"/g/{n}" for n in range(1, 61)}
            assert set(served.hits.values()) == {1}, served.hits
            assert served.max_in_flight == 1
        fetched = [int(out.split("crawled: fetched ")[1].split(",")[0]) for out, _ in results]
        assert sum(fetched) == 120, fetched
        assert min(fetched) > 0, "both crawlers took part"
        assert len(pages(db)) == 120
        assert {row["state"] for row in frontier(db).values()} == {"done"}
    finally:
        for served in sites:
            served.stop()


def test_a_crawler_killed_with_kill_9_loses_nothing(database_url, site, db, run):
    generated_site(site, 60)
    argv = [site.url("/g/1"), "--allow-private", "--delay", "0.03", "--workers", "2"]
    victim = start_crawler(database_url, *argv)
    deadline = time.monotonic() + 30
    while sum(site.hits.values()) < 20 and time.monotonic() < deadline and victim.poll() is None:
        time.sleep(0.02)
    assert victim.poll() is None, "the crawl finished before it could be killed"
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate()
    written = {url for url, row in frontier(db).items() if row["state"] not in ("queued", "fetching")}
    assert written, "nothing was written before the kill"

    status, printed = run(*argv)  # leases of the killed crawler run out after 3 s
    assert status == 0, printed
    every = {site.url(f"/g/{n}") for n in range(1, 61)}
    assert set(pages(db)) == every
    assert {row["state"] for row in frontier(db).values()} == {"done"}
    # What the killed crawler had written is never fetched again; what it
    # held (leased, or fetched but not yet written) is fetched once more.
    for url in every:
        hits = site.hits[url.removeprefix(site.base)]
        if url in written:
            assert hits == 1, url
        else:
            assert 1 <= hits <= 2, url
    assert site.hits["/robots.txt"] == 1  # cached in the database


# Safety and bad input #########################################################


def test_a_private_address_is_refused_without_allow_private(site, run, capsys):
    generated_site(site, 2)
    status, _ = run(site.url("/g/1"))
    error = capsys.readouterr().err
    assert status == 2
    assert error.strip() == (
        f"crawler: error: {site.url('/g/1')} is a loopback address; use --allow-private to crawl a local site"
    )
    assert not site.hits


def test_a_host_name_that_resolves_to_loopback_is_refused_at_connect_time(site, run, db, caplog):
    generated_site(site, 2)
    url = f"http://localhost:{site.port}/g/1"
    with caplog.at_level(logging.WARNING, logger="whoknows.crawler"):
        assert run(url, "--delay", "0")[0] == 0
    assert not site.hits
    row = frontier(db)[url]
    assert row["state"] == "failed" and "a loopback address" in row["note"] and row["note"].startswith("refused")
    assert any("refused: localhost resolves to" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("192.168.0.1", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("0.0.0.0", "reserved"),
        ("100.64.0.1", "non-public"),
        ("93.184.216.34", None),
        ("2606:4700::1111", None),
    ],
)
def test_forbidden_addresses(address, kind):
    assert crawler.forbidden_kind(address) == kind


@pytest.mark.parametrize(
    "argv",
    [
        ["ftp://example.org/"],
        ["not a url"],
        ["--max-pages", "many", "http://example.org/"],
        ["--delay", "-1", "http://example.org/"],
        ["--workers", "0", "http://example.org/"],
        ["--bogus"],
        [],
    ],
)
def test_bad_input_is_one_line_on_stderr(argv, run, capsys):
    status, _ = run(*argv)
    error = capsys.readouterr().err
    assert status == 2
    assert len(error.splitlines()) == 1 and error.startswith("crawler: error: ")


def test_app_py_crawl_delegates_to_the_crawler(database_url):
    env = crawler_env(database_url)
    bad = subprocess.run(
        [sys.executable, "app.py", "crawl", "--max-depth", "deep"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert (
        bad.stderr.strip() == "crawler: error: argument --max-depth: must be a whole number of at least 0, not 'deep'"
    )
    status = subprocess.run(
        [sys.executable, "app.py", "crawl", "--status"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert status.returncode == 0 and "frontier: 0 URLs" in status.stdout


# URLs, robots.txt and extraction ###############################################


@pytest.mark.parametrize(
    ("url", "base", "expected"),
    [
        ("HTTP://Example.ORG:80/a#frag", None, "http://example.org/a"),
        ("https://example.org:443", None, "https://example.org/"),
        ("http://example.org:8080/x?q=1", None, "http://example.org:8080/x?q=1"),
        ("../b/c", "http://example.org/a/d/e", "http://example.org/a/b/c"),
        ("page 2", "http://example.org/", "http://example.org/page%202"),
        ("mailto:someone@example.org", "http://example.org/", None),
        ("javascript:void(0)", "http://example.org/", None),
        ("ftp://example.org/", None, None),
        ("http://user:pw@example.org/", None, None),
        ("http://[::1]:8000/", None, "http://[::1]:8000/"),
        ("http://bücher.example/", None, "http://xn--bcher-kva.example/"),
    ],
)
def test_normalise(url, base, expected):
    assert crawler.normalise(url, base) == expected


def test_robots_crawl_delay_prefers_our_group_and_reads_fractions():
    lines = "User-agent: *\nCrawl-delay: 5\n\nUser-agent: WhoKnowsBot\nCrawl-delay: 0.5\nDisallow: /x\n".splitlines()
    assert crawler.robots_crawl_delay(lines, "WhoKnowsBot/1.0 (+https://example.org/bot)") == 0.5
    assert crawler.robots_crawl_delay(lines, "OtherBot/2.0") == 5.0
    robots = crawler.parse_robots(200, "\n".join(lines), "WhoKnowsBot/1.0")
    assert not robots.allows("WhoKnowsBot/1.0", "http://example.org/x/1")
    assert crawler.parse_robots(404, "", "WhoKnowsBot/1.0").allows("WhoKnowsBot/1.0", "http://example.org/x/1")


def test_extraction_of_title_text_links_and_directives():
    text = page(
        "  The   title ",
        "<p>Body <b>text</b>.</p><script>var x = 1;</script><a href='/rel' rel='nofollow'>no</a>",
        head="<meta name='robots' content='NOINDEX'><link rel='canonical' href='/main'>",
        links=["/next", "mailto:x@example.org"],
    )
    extracted = crawler.extract_html(text, "http://example.org/dir/page")
    assert extracted.title == "The title"
    assert extracted.text.startswith("Body text .") and "var x" not in extracted.text
    assert "Home navigation" not in extracted.text and "Copyright" not in extracted.text
    assert extracted.links == ["http://example.org/", "http://example.org/next"]
    assert extracted.canonical == "http://example.org/main"
    assert extracted.noindex and not extracted.nofollow
    assert extracted.language == "en"


@pytest.mark.parametrize(
    ("body", "content_type", "expected"),
    [
        ("blåbær".encode("latin-1"), "text/html; charset=ISO-8859-1", "blåbær"),
        (b"<meta charset='iso-8859-1'>" + "blåbær".encode("latin-1"), "text/html", "blåbær"),
        ("blåbær".encode(), "text/html", "blåbær"),
        ("blåbær".encode("cp1252"), "text/html", "blåbær"),
        (b"\xef\xbb\xbf" + "blåbær".encode(), "text/html; charset=latin-1", "blåbær"),
    ],
)
def test_charset_from_header_document_or_guess(body, content_type, expected):
    assert crawler.decode(body, content_type).endswith(expected)
