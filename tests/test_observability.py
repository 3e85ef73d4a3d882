"""The search log, the `searches` report, and /metrics."""

import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import webtest
from prometheus_client.parser import text_string_to_metric_families

import app as whoknows

ROOT = Path(__file__).resolve().parent.parent
LOCAL = {"REMOTE_ADDR": "127.0.0.1"}


def logged(db, app):
    app.search_log.flush()
    return db.execute("SELECT query, language, results, duration_ms, logged_in FROM search_log ORDER BY id").fetchall()


def test_every_search_is_recorded(app, client, db, add_page):
    add_page("Fortran", "numbers")
    client.get("/api/search", {"q": "  FORTRAN  "})
    client.get("/", {"q": "nothing here", "language": "da"})
    rows = logged(db, app)
    assert [(r["query"], r["language"], r["results"], r["logged_in"]) for r in rows] == [
        ("fortran", "en", 1, False),
        ("nothing here", "da", 0, False),
    ]
    assert all(r["duration_ms"] >= 0 for r in rows)


def test_logged_in_searches_are_marked_and_no_client_data_is_kept(app, client, db):
    client.post(
        "/api/register", {"username": "u", "email": "u@example.org", "password": "secret1", "password2": "secret1"}
    )
    client.post("/api/login", {"username": "u", "password": "secret1"})
    client.get("/api/search", {"q": "anything"})
    assert logged(db, app)[-1]["logged_in"] is True
    columns = {
        r["column_name"]
        for r in db.execute("SELECT column_name FROM information_schema.columns WHERE table_name = 'search_log'")
    }
    assert columns == {"id", "searched_at", "query", "language", "results", "duration_ms", "logged_in"}


def test_search_log_can_be_switched_off(app, client, db, monkeypatch):
    monkeypatch.setattr(app.search_log, "enabled", False)
    client.get("/api/search", {"q": "quiet"})
    assert logged(db, app) == []


def test_a_failed_write_is_logged_and_dropped(app, client, db, proxy, caplog):
    client.get("/api/search", {"q": "lost"})
    proxy.stop()
    with caplog.at_level(logging.WARNING, logger="whoknows"):
        app.search_log.flush()
    assert "search log: dropped 1 searches" in caplog.text
    assert app.search_log.queue == []
    proxy.start()


def test_concurrent_searches_are_all_recorded(app, db, add_page):
    add_page("Busy", "busy page")

    def worker(n):
        client = webtest.TestApp(app)
        for i in range(10):
            client.get("/api/search", {"q": f"busy {n} {i}"})

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(logged(db, app)) == 80


def test_old_rows_are_pruned(app, client, db, monkeypatch):
    client.get("/api/search", {"q": "old"})
    client.get("/api/search", {"q": "new"})
    logged(db, app)
    db.execute("UPDATE search_log SET searched_at = now() - interval '100 days' WHERE query = 'old'")
    monkeypatch.setattr(app.search_log, "retention_days", 90)
    app.search_log.prune()
    assert [r["query"] for r in logged(db, app)] == ["new"]


def test_searches_report(app, client, db, add_page, database_url):
    add_page("Python", "a language")
    for q in ["python", "python", "python", "cobol", "cobol", "rust"]:
        client.get("/api/search", {"q": q})
    logged(db, app)
    env = {**os.environ, "DATABASE_URL": database_url}
    run = lambda *args: subprocess.run(
        [sys.executable, str(ROOT / "app.py"), "searches", *args], env=env, capture_output=True, text=True, timeout=60
    )
    both = run("--days", "1")
    assert both.returncode == 0, both.stderr
    top, zero = both.stdout.split("Top searches that found nothing")
    assert top.index("python") < top.index("cobol") < top.index("rust")
    assert "python" not in zero and zero.index("cobol") < zero.index("rust")
    assert "searches  language  avg_results" in top
    only_zero = run("--zero")
    assert "Top searches that found nothing" in only_zero.stdout and "Top searches," not in only_zero.stdout
    bad = run("--days", "0")
    assert bad.returncode == 2 and "must be a whole number of at least 1" in bad.stderr


def scrape(client, **kwargs):
    response = client.get("/metrics", extra_environ=LOCAL, **kwargs)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def test_metrics_are_scraped_in_prometheus_text_format(client, add_page):
    before = scrape(client)
    add_page("Metric", "measured")
    client.get("/api/search", {"q": "measured"})
    client.get("/api/search", {"q": "absent", "language": "da"})
    client.get("/static/style.css")
    client.get("/no/such/page", status=404)
    client.post("/api/register", {"username": "m", "email": "m@example.org", "password": "secret1"})
    client.post("/api/login", {"username": "m", "password": "secret1"})
    client.post("/api/login", {"username": "m", "password": "wrong"})
    after = scrape(client)
    # Counters live for the whole process: compare with the scrape before.
    samples = {
        key: value - before.get(key, 0) if "_total" in key[0] or key[0].endswith("_count") else value
        for key, value in after.items()
    }
    req = lambda route, status, method="GET": samples[
        ("whoknows_http_requests_total", (("method", method), ("route", route), ("status", status)))
    ]
    assert req("/api/search", "200") == 2
    assert req("/static/<path:path>", "200") == 1  # the pattern, not the path
    assert req("unmatched", "404") == 1
    assert samples[("whoknows_http_request_duration_seconds_count", (("route", "/api/search"),))] == 2
    assert ("whoknows_http_request_duration_seconds_bucket", (("le", "0.1"), ("route", "/api/search"))) in samples
    assert samples[("whoknows_searches_total", (("language", "en"),))] == 1
    assert samples[("whoknows_searches_total", (("language", "da"),))] == 1
    assert samples[("whoknows_zero_result_searches_total", (("language", "da"),))] == 1
    assert samples.get(("whoknows_zero_result_searches_total", (("language", "en"),)), 0) == 0
    assert samples[("whoknows_registrations_total", ())] == 1
    assert samples[("whoknows_logins_total", ())] == 1
    assert samples[("whoknows_failed_logins_total", ())] == 1
    assert samples[("whoknows_database_up", ())] == 1
    primary = (("pool", "primary"),)
    assert samples[("whoknows_db_pool_size", primary)] >= 1
    assert ("whoknows_db_pool_connections_in_use", primary) in samples
    assert ("whoknows_db_pool_requests_waiting", primary) in samples


def test_metrics_report_the_database_down(client, proxy):
    assert scrape(client)[("whoknows_database_up", ())] == 1  # the pool has connected
    proxy.stop()
    assert scrape(client)[("whoknows_database_up", ())] == 0
    proxy.start()


def test_metrics_are_limited_to_allowed_addresses(client, make_app):
    client.get("/metrics", extra_environ={"REMOTE_ADDR": "203.0.113.9"}, status=403)
    allowed = webtest.TestApp(make_app(metrics_allow=whoknows.networks("METRICS_ALLOW", "203.0.113.0/24")))
    allowed.get("/metrics", extra_environ={"REMOTE_ADDR": "203.0.113.9"}, status=200)
    allowed.get("/metrics", extra_environ=LOCAL, status=403)


def test_metrics_token(make_app):
    client = webtest.TestApp(make_app(metrics_token="s3cret-token"))
    client.get("/metrics", extra_environ=LOCAL, status=403)
    client.get("/metrics", extra_environ=LOCAL, headers={"Authorization": "Bearer wrong"}, status=403)
    client.get("/metrics", extra_environ=LOCAL, headers={"Authorization": "Bearer s3cret-token"}, status=200)
