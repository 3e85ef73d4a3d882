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
