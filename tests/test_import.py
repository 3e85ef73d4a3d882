"""Importing pages from JSON Lines and from a legacy SQLite whoknows.db."""

import io
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import app as whoknows

ROOT = Path(__file__).resolve().parent.parent


def page(n, **overrides):
    record = {
        "title": f"Title {n}",
        "url": f"https://example.org/{n}",
        "language": "en",
        "last_updated": "2009-01-10 00:00:00",
        "content": f"content number {n}",
    }
    record.update(overrides)
    return record


def write_jsonl(path, lines):
    path.write_text(
        "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n", encoding="utf-8"
    )
    return path


def import_quietly(path, database):
    out = io.StringIO()
    return whoknows.import_file(database, path, out=out), out.getvalue()


def test_jsonl_import_then_reimport_updates_in_place(app, tmp_path, db):
    source = write_jsonl(
        tmp_path / "pages.jsonl", [page(1), page(2, language="da", content="dansk tekst"), page(3, content="")]
    )  # legacy pages may be empty
    summary, _ = import_quietly(source, app.db)
    assert summary["pages"] == {"inserted": 3, "updated": 0, "unchanged": 0, "skipped": 0}
    row = db.execute("SELECT language, last_updated, content FROM pages WHERE url = 'https://example.org/2'").fetchone()
    assert row["language"] == "da" and row["content"] == "dansk tekst"
    assert row["last_updated"].isoformat() == "2009-01-10T00:00:00+00:00"

    write_jsonl(source, [page(1), page(2, content="changed"), page(3, content=""), page(4)])
    summary, _ = import_quietly(source, app.db)
    assert summary["pages"] == {"inserted": 1, "updated": 1, "unchanged": 2, "skipped": 0}
    assert db.execute("SELECT count(*) AS n FROM pages").fetchone()["n"] == 4
    assert (
        db.execute("SELECT content FROM pages WHERE url = 'https://example.org/2'").fetchone()["content"] == "changed"
    )


def test_bad_rows_are_reported_with_line_numbers_and_skipped(app, tmp_path, db):
    source = write_jsonl(
        tmp_path / "pages.jsonl",
        [
            page(1),
            "{not json",
            page(3, language="de"),
            page(4, title=""),
            page(5, url="ftp://nope"),
            page(6, last_updated="yesterday"),
            page(7, content="nul\x00byte"),
            "[1, 2]",
            page(9, content=None),
            page(10),
            page(11, url="https://example.org/10"),  # same url again: the later line wins
        ],
    )
    summary, report = import_quietly(source, app.db)
    assert summary["pages"] == {"inserted": 2, "updated": 0, "unchanged": 0, "skipped": 9}
    for lineno, reason in [
        (2, "not valid JSON"),
        (3, "language must be 'en' or 'da'"),
        (4, "title is missing"),
        (5, "url must be an http(s) URL"),
        (6, "last_updated is not a timestamp"),
        (7, "content contains a NUL character"),
        (8, "not an object"),
        (9, "content is missing"),
        (10, "the same url appears again later"),
    ]:
        assert f"skipped line {lineno}: {reason}" in report
    titles = [r["title"] for r in db.execute("SELECT title FROM pages ORDER BY title")]
    assert titles == ["Title 1", "Title 11"]


def test_pages_may_share_a_title(app, tmp_path, db, client):
    import_quietly(write_jsonl(tmp_path / "a.jsonl", [page(1, title="Home", content="first home page")]), app.db)
    summary, _ = import_quietly(write_jsonl(tmp_path / "b.jsonl", [page(2, title="Home", content="second")]), app.db)
    assert summary["pages"] == {"inserted": 1, "updated": 0, "unchanged": 0, "skipped": 0}
    found = client.get("/api/search", {"q": "home"}).json["data"]
    assert sorted(r["url"] for r in found) == ["https://example.org/1", "https://example.org/2"]


def make_legacy_db(path, users=(("admin", "admin@example.org", "5f4dcc3b5aa765d61d8327deb882cf99"),)):
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE users (id INTEGER PRIMARY KEY AUTOINCREMENT, username TEXT NOT NULL UNIQUE,
                            email TEXT NOT NULL UNIQUE, password TEXT NOT NULL);
        CREATE TABLE pages (title TEXT PRIMARY KEY UNIQUE, url TEXT NOT NULL UNIQUE,
                            language TEXT NOT NULL DEFAULT 'en', last_updated TIMESTAMP, content TEXT NOT NULL);
    """)
    db.executemany(
        "INSERT INTO pages VALUES (?, ?, ?, ?, ?)",
        [
            ("Fortran", "http://en.wikipedia.org/wiki/Fortran", "en", "2008-12-20 00:00:00", "Fortran is a language."),
            ("MATLAB", "http://en.wikipedia.org/wiki/Matlab", "en", None, "MATLAB does matrices."),
            ("Broken", "not a url", "en", None, "x"),
        ],
    )
    db.executemany("INSERT INTO users (username, email, password) VALUES (?, ?, ?)", users)
    db.commit()
    db.close()
    return path


def test_legacy_sqlite_import_with_users(app, tmp_path, db, client):
    legacy = make_legacy_db(
        tmp_path / "whoknows.db",
        users=[
            ("admin", "admin@example.org", "5f4dcc3b5aa765d61d8327deb882cf99"),
            ("bad", "bad@example.org", "not-a-hash"),
        ],
    )
    summary, report = import_quietly(legacy, app.db)
    assert summary["pages"] == {"inserted": 2, "updated": 0, "unchanged": 0, "skipped": 1}
    assert summary["users"] == {"inserted": 1, "existing": 0, "skipped": 1}
    assert "skipped line 3: url must be an http(s) URL" in report
    assert "skipped user row 2" in report
    user = db.execute("SELECT username, email, password_hash FROM users").fetchone()
    assert user == {
        "username": "admin",
        "email": "admin@example.org",
        "password_hash": "md5$5f4dcc3b5aa765d61d8327deb882cf99",
    }
    assert client.get("/api/search", {"q": "fortran"}).json["data"][0]["title"] == "Fortran"

    summary, _ = import_quietly(legacy, app.db)
    assert summary["pages"] == {"inserted": 0, "updated": 0, "unchanged": 2, "skipped": 1}
    assert summary["users"] == {"inserted": 0, "existing": 1, "skipped": 1}
    assert db.execute("SELECT count(*) AS n FROM users").fetchone()["n"] == 1


def test_reimport_never_resets_an_upgraded_password(app, tmp_path, db):
    legacy = make_legacy_db(tmp_path / "whoknows.db")
    import_quietly(legacy, app.db)
    db.execute("UPDATE users SET password_hash = 'scrypt$upgraded' WHERE username = 'admin'")
    import_quietly(legacy, app.db)
    assert db.execute("SELECT password_hash FROM users").fetchone()["password_hash"] == "scrypt$upgraded"


def test_import_command_line(tmp_path, database_url):
    source = write_jsonl(tmp_path / "pages.jsonl", [page(1), "{bad"])
    env = {**os.environ, "DATABASE_URL": database_url}
    result = subprocess.run(
        [sys.executable, str(ROOT / "app.py"), "import", str(source)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "pages: inserted 1, updated 0, unchanged 0, skipped 1" in result.stdout
    assert "skipped line 2: not valid JSON" in result.stderr
    missing = subprocess.run(
        [sys.executable, str(ROOT / "app.py"), "import", str(tmp_path / "nope.jsonl")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2 and missing.stderr.strip().endswith("nope.jsonl")
    assert "Traceback" not in missing.stderr


def test_sample_pages_load_only_into_an_empty_table(app, db, client):
    assert whoknows.load_sample_pages(app.db) is True
    count = db.execute("SELECT count(*) AS n, count(DISTINCT language) AS langs FROM pages").fetchone()
    assert count["n"] >= 30 and count["langs"] == 2
    assert whoknows.load_sample_pages(app.db) is False
    assert client.get("/api/search", {"q": "fortran"}).json["total"] >= 1
    assert client.get("/api/search", {"q": "søgemaskine", "language": "da"}).json["total"] >= 1


def test_bulk_import_rebuilds_the_title_index_and_the_whole_search_index(app, tmp_path, db, client, monkeypatch):
    def definitions():
        return sorted(
            r["indexdef"]
            for r in db.execute(
                "SELECT indexdef FROM pg_indexes WHERE tablename = 'pages' AND indexdef LIKE '%USING gin%'"
            )
        )

    before = definitions()
    assert len(before) == 1  # the title trigram index; postings replace the page-wide one
    import_quietly(write_jsonl(tmp_path / "small.jsonl", [page(9, content="small first import")]), app.db)
    monkeypatch.setattr(whoknows, "BULK_IMPORT_ROWS", 2)
    pages = [page(1), page(2), page(3, content="bulky"), page(4), page(5)]
    summary, _ = import_quietly(write_jsonl(tmp_path / "bulk.jsonl", pages), app.db)
    assert summary["pages"]["inserted"] == 5
    assert definitions() == before
    state = db.execute("SELECT * FROM corpus_stats").fetchone()
    assert (state["pages"], state["average_pages"]) == (6, 6)  # recounted after the triggers stood aside
    assert db.execute("SELECT df FROM term_stats WHERE lexeme = 'content'").fetchone()["df"] == 4
    assert db.execute("SELECT count(*) AS n FROM page_segments").fetchone()["n"] == 6
    assert client.get("/api/search", {"q": "bulky"}).json["data"][0]["title"] == "Title 3"
    assert client.get("/api/search", {"q": "small"}).json["data"][0]["title"] == "Title 9"


def test_every_write_keeps_a_pages_vector_in_step_with_its_text(app, tmp_path, db, client, monkeypatch):
    """A bulk import supplies the vectors it computed in parallel, with its
    page triggers off; every other write gets its vector from the trigger."""

    def out_of_step():
        stale = "SELECT count(*) AS n FROM pages WHERE search IS DISTINCT FROM "
        stale += "whoknows_page_vector(language, title, content)"
        return db.execute(stale).fetchone()["n"]

    def top_title(q, language="en"):
        data = client.get("/api/search", {"q": q, "language": language}).json["data"]
        return data[0]["title"] if data else None

    import_quietly(write_jsonl(tmp_path / "first.jsonl", [page(1, content="original words")]), app.db)
    monkeypatch.setattr(whoknows, "BULK_IMPORT_ROWS", 2)
    pages = [page(1, content="rewritten gazelle", language="da"), page(2, content="zebra"), page(3)]
    summary, _ = import_quietly(write_jsonl(tmp_path / "bulk.jsonl", pages), app.db)
    assert summary["pages"] == {"inserted": 2, "updated": 1, "unchanged": 0, "skipped": 0}
    assert out_of_step() == 0
    assert top_title("gazelle", "da") == "Title 1" and top_title("original") is None and top_title("zebra") == "Title 2"
    leftovers = db.execute("SELECT to_regclass('import_texts') AS t, to_regclass('import_vectors') AS v").fetchone()
    assert leftovers == {"t": None, "v": None}

    # The trigger is on again after the bulk import, and no writer sets a vector of its own.
    db.execute("UPDATE pages SET content = 'antelope' WHERE url = 'https://example.org/2'")
    db.execute("UPDATE pages SET search = to_tsvector('simple', 'forged') WHERE url = 'https://example.org/3'")
    db.execute(
        "INSERT INTO pages (title, url, content, search) VALUES ('New', 'https://example.org/9', 'okapi', 'forged')"
    )
    assert out_of_step() == 0
    assert db.execute("SELECT count(*) AS n FROM pages WHERE search @@ 'forged'").fetchone()["n"] == 0
    assert top_title("antelope") == "Title 2" and top_title("okapi") == "New"


def test_a_bulk_import_leaves_its_transaction_with_the_usual_planner_settings(app, tmp_path, monkeypatch):
    """The index build turns sorts off and raises work_mem for itself only:
    the caller's later queries in the same transaction (the crawler's) plan as usual."""
    monkeypatch.setattr(whoknows, "BULK_IMPORT_ROWS", 2)
    records = [(n, page(n), None) for n in range(1, 6)]
    with app.db.transaction() as conn:
        before = {name: conn.execute(f"SHOW {name}").fetchone()[name] for name in ("enable_sort", "work_mem")}
        _, bulk = whoknows.import_pages(conn, records, io.StringIO())
        after = {name: conn.execute(f"SHOW {name}").fetchone()[name] for name in ("enable_sort", "work_mem")}
    assert bulk and after == before


def test_a_long_import_shows_its_progress_in_a_log(app, tmp_path, db, monkeypatch):
    source = write_jsonl(tmp_path / "pages.jsonl", [page(n) for n in range(1, 4)])
    _, quick = import_quietly(source, app.db)
    assert "rows (" not in quick and "merging" not in quick  # a short run into a log stays quiet
    monkeypatch.setattr(whoknows.Progress, "LOG_SECONDS", 0)  # every row counts as "a while later"
    monkeypatch.setattr(whoknows, "BULK_IMPORT_ROWS", 2)
    db.execute("TRUNCATE pages")
    _, slow = import_quietly(source, app.db)
    lines = slow.splitlines()
    assert "\r" not in slow and "reading pages: 1 rows (" in lines[0] and "reading pages: 3 rows (" in slow
    assert "merging into pages..." in lines and "rebuilding the title index..." in lines
    assert "indexing pages: segment 1 of 1..." in lines
