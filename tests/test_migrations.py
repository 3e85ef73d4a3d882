"""Migrations: apply, roll back all, apply again; and yoyo's own command line."""

import os
import subprocess
import sys
from pathlib import Path

import psycopg

import app as whoknows

ROOT = Path(__file__).resolve().parent.parent
YOYO = Path(sys.executable).parent / "yoyo"


def tables(url):
    with psycopg.connect(url) as conn:
        return {
            row[0]
            for row in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename NOT LIKE '%yoyo%'"
            )
        }


def test_every_migration_has_a_rollback():
    ids = whoknows.migration_ids()
    assert ids == sorted(ids) and ids
    for mid in ids:
        assert (ROOT / "migrations" / f"{mid}.rollback.sql").is_file(), mid


def test_apply_rollback_all_apply_again(make_database):
    from yoyo import get_backend, read_migrations

    url = make_database()
    assert whoknows.apply_migrations(url) == whoknows.migration_ids()
    assert {"users", "pages"} <= tables(url)
    assert whoknows.apply_migrations(url) == []

    backend = get_backend(whoknows.yoyo_url(url))
    migrations = read_migrations(str(ROOT / "migrations"))
    with backend.lock():
        backend.rollback_migrations(backend.to_rollback(migrations))
    backend.connection.close()
    assert tables(url) == set()

    assert whoknows.apply_migrations(url) == whoknows.migration_ids()
    assert {"users", "pages"} <= tables(url)


def test_yoyo_command_line_with_yoyo_ini(make_database):
    url = make_database()
    env = {**os.environ, "DATABASE_URL": whoknows.yoyo_url(url)}
    applied = subprocess.run([str(YOYO), "apply", "--batch"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert applied.returncode == 0, applied.stderr
    assert {"users", "pages"} <= tables(url)
    rolled = subprocess.run(
        [str(YOYO), "rollback", "--batch", "--all"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert rolled.returncode == 0, rolled.stderr
    assert tables(url) == set()


def test_schema_rules(db):
    db.execute("INSERT INTO users (username, email, password_hash) VALUES ('Alice', 'a@example.org', 'x')")
    for username, email in (("alice", "b@example.org"), ("bob", "A@EXAMPLE.ORG")):
        try:
            db.execute("INSERT INTO users (username, email, password_hash) VALUES (%s, %s, 'x')", (username, email))
            raise AssertionError("duplicate accepted")
        except psycopg.errors.UniqueViolation:
            pass
    try:
        db.execute("INSERT INTO pages (title, url, language, content) VALUES ('t', 'u', 'de', 'c')")
        raise AssertionError("language 'de' accepted")
    except psycopg.errors.CheckViolation:
        pass
    created = db.execute("SELECT created_at FROM users").fetchone()["created_at"]
    assert created.tzinfo is not None


def test_migrate_command_takes_the_url_the_app_takes(make_database):
    for url in (make_database(), whoknows.yoyo_url(make_database())):
        env = {k: v for k, v in os.environ.items() if not k.startswith("POSTGRES_")}
        env["DATABASE_URL"] = url
        result = subprocess.run(
            [sys.executable, str(ROOT / "app.py"), "migrate"], env=env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("Applied migrations: 0001.create-users")
        assert {"users", "pages"} <= tables(whoknows.database_url_text("DATABASE_URL", url))
