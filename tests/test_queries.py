"""Every query file is documented, parameterized, and used by the app or the crawler."""

import re
from pathlib import Path

import pytest

import app as whoknows

ROOT = Path(__file__).resolve().parent.parent
QUERY_FILES = sorted((ROOT / "queries").glob("*.sql"))
USERS = ("app.py", "crawler.py")  # the modules that run queries


@pytest.mark.parametrize("path", QUERY_FILES, ids=lambda p: p.name)
def test_query_file_is_documented_and_used(path):
    text = path.read_text(encoding="utf-8")
    assert text.startswith("-- "), "the first line documents what the query returns"
    assert "{" not in text.replace("'{a}'", ""), "no templating: values go in as %(name)s"
    code = "".join((ROOT / name).read_text(encoding="utf-8") for name in USERS)
    assert f'sql("{path.stem}")' in code, "unused query file"


def test_unknown_query_fails_loudly():
    with pytest.raises(LookupError, match="queries/nope.sql"):
        whoknows.sql("nope")


@pytest.mark.parametrize("module", ["app.py", "crawler.py"])
def test_the_table_of_contents_names_every_section_in_order(module):
    text = (ROOT / module).read_text(encoding="utf-8")
    contents = re.findall(r"^  (\w[\w ]*?) {2,}\S", text.split('"""')[1], re.MULTILINE)
    sections = re.findall(r"^# (.+?) #{5,}$", text, re.MULTILINE)
    assert contents == sections


def test_array_parameters_reach_the_database_as_they_were(db):
    texts = ["", "NULL", "null", 'a"b', "a\\b", '\\"', "{x}", "a,b", " spaced ", "æøå", "日本"]
    row = db.execute(
        "SELECT %(t)s::text[] AS t, %(i)s::integer[] AS i, %(b)s::bigint[] AS b,"
        " %(f)s::float8[] AS f, %(e)s::text[] AS e",
        {
            "t": whoknows.TextArray(texts),
            "i": whoknows.IntArray([0, -3, 7]),
            "b": whoknows.IntArray([2**40, 1]),
            "f": whoknows.IntArray([1500]),
            "e": whoknows.TextArray([]),
        },
    ).fetchone()
    assert row == {"t": texts, "i": [0, -3, 7], "b": [2**40, 1], "f": [1500.0], "e": []}


@pytest.mark.parametrize(
    "prefix", ["gove", "a", "æb", "zø", "x\U0010fffe", "tilde~", "a\u00ff", "k\ud7ff", "q\U0010ffff"]
)
def test_a_prefix_range_holds_exactly_the_strings_that_start_with_it(db, prefix):
    low, high = whoknows.prefix_range(prefix)
    candidates = [prefix, prefix + "a", prefix + "\U0010ffff", prefix[:-1], high, "", "zzzz", "\ue000"]
    inside = db.execute(
        "SELECT array_agg(s ORDER BY s) AS s FROM unnest(%(c)s::text[]) AS s"
        ' WHERE s COLLATE "C" >= %(low)s AND s COLLATE "C" < %(high)s',
        {"c": whoknows.TextArray(candidates), "low": low, "high": high},
    ).fetchone()["s"]
    assert sorted(inside or []) == sorted(c for c in candidates if c.startswith(prefix))
    # The same bound in SQL, for the listed completions; NULL where there is none.
    end = db.execute("SELECT whoknows_prefix_end(%s) AS e", (prefix,)).fetchone()["e"]
    assert end == (high if high != low else None)


def test_statements_outside_transactions_use_generic_plans_and_transactions_choose(app):
    with app.db.connection() as conn:
        assert conn.execute("SHOW plan_cache_mode").fetchone()["plan_cache_mode"] == "force_generic_plan"
    with app.db.transaction() as conn:
        assert conn.execute("SHOW plan_cache_mode").fetchone()["plan_cache_mode"] == "auto"
    with app.db.connection() as conn:  # SET LOCAL ended with its transaction
        assert conn.execute("SHOW plan_cache_mode").fetchone()["plan_cache_mode"] == "force_generic_plan"
