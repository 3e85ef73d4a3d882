"""Search: ranking, language, partial words, phrases, hostile input, paging."""

import time
import tracemalloc

import pytest

import app as whoknows


def titles(response):
    return [item["title"] for item in response.json["data"]]


def test_title_match_ranks_above_content_match(client, add_page):
    add_page("Numbers", "Fortran is a language for numbers.")
    add_page("Fortran", "Numbers is a language for fortran.")
    response = client.get("/api/search", {"q": "fortran"})
    assert response.status == "200 OK"
    assert titles(response) == ["Fortran", "Numbers"]


def test_more_relevant_content_ranks_first_and_ties_break_on_id(client, add_page):
    add_page("B page", "python")
    add_page("A page", "python python python snakes python")
    add_page("C page", "python")
    assert titles(client.get("/api/search", {"q": "python"})) == ["A page", "B page", "C page"]


def test_language_filter_and_danish_stemming(client, add_page):
    add_page("Søgemaskiner", "En søgemaskine finder sider på nettet.", language="da")
    add_page("Search engines", "A search engine finds pages.", language="en")
    danish = client.get("/api/search", {"q": "søgemaskinen", "language": "da"})
    assert titles(danish) == ["Søgemaskiner"]
    assert danish.json["data"][0]["language"] == "da"
    assert titles(client.get("/api/search", {"q": "søgemaskinen", "language": "en"})) == []


def test_english_stemming(client, add_page):
    add_page("Runner", "She was running through programs.")
    assert titles(client.get("/api/search", {"q": "program run"})) == ["Runner"]


def test_partial_word_matches_rank_below_full_matches(client, add_page):
    add_page("Languages", "Some people write javascript for the web.")
    add_page("Typos", "Some people write javascr as a typo.")
    response = client.get("/api/search", {"q": "javascr"})
    assert titles(response) == ["Typos", "Languages"]


def test_substring_inside_a_title_matches(client, add_page):
    add_page("ECMAScript", "The standard behind a popular language.")
    assert titles(client.get("/api/search", {"q": "mascri"})) == ["ECMAScript"]


def test_phrase_or_and_exclusion(client, add_page):
    add_page("Exact", "the quick brown fox")
    add_page("Scrambled", "brown quick fox")
    add_page("Other", "a lazy dog")
    assert titles(client.get("/api/search", {"q": '"quick brown"'})) == ["Exact"]
    assert sorted(titles(client.get("/api/search", {"q": "fox or dog"}))) == ["Exact", "Other", "Scrambled"]
    assert titles(client.get("/api/search", {"q": "fox -scrambled"})) == ["Exact"]
    assert titles(client.get("/api/search", {"q": "quick -brown"})) == []


def test_snippet_highlights_on_page_and_is_plain_in_api(client, add_page):
    add_page("Tags", "Beware <img src=x onerror=alert(1)> near the keyword zebra here.")
    api = client.get("/api/search", {"q": "zebra"}).json["data"][0]
    assert "zebra" in api["snippet"] and "\ue000" not in api["snippet"]
    assert "content" not in api
    page = client.get("/", {"q": "zebra"})
    assert "<mark>zebra</mark>" in page.text
    assert "<img src=x" not in page.text
    assert "&lt;img src=x onerror=alert(1)&gt;" in page.text


def test_api_item_fields(client, add_page):
    add_page("Fields", "fields here", url="https://example.org/fields", last_updated="2024-05-06T07:08:09+00:00")
    body = client.get("/api/search", {"q": "fields"}).json
    item = body["data"][0]
    assert set(item) == {"title", "url", "language", "last_updated", "snippet"}
    assert item["url"] == "https://example.org/fields"
    assert item["last_updated"] == "2024-05-06T07:08:09+00:00"
    assert body["search_results"] == body["data"]
    assert (body["page"], body["total"], body["has_next"]) == (1, 1, False)


def test_paging(client, add_page):
    for n in range(25):
        add_page(f"Page {n:02}", "paging word")
    first = client.get("/api/search", {"q": "paging"}).json
    assert len(first["data"]) == 10 and first["total"] == 25 and first["has_next"]
    third = client.get("/api/search", {"q": "paging", "page": "3"}).json
    assert [i["title"] for i in third["data"]] == [f"Page {n:02}" for n in range(20, 25)]
    assert not third["has_next"]
    html = client.get("/", {"q": "paging", "page": "2"})
    assert 'id="prev-page"' in html.text and 'id="next-page"' in html.text
    assert html.text.count('class="search-result-title"') == 10
    assert "25 results" in html.text


def test_the_total_is_exact_for_one_word_and_marked_as_an_estimate_otherwise(client, add_page):
    for n in range(12):
        add_page(f"Walrus {n}", "walrus facts" + (" and seals" if n % 2 else ""))
    one = client.get("/api/search", {"q": "walrus"}).json
    assert (one["total"], one["total_is_estimate"], one["has_next"]) == (12, False, True)
    two = client.get("/api/search", {"q": "walrus seals"}).json
    assert two["total_is_estimate"] is True and two["total"] >= 12
    assert "About 12 results" in client.get("/", {"q": "walrus seals"}).text
    exact = client.get("/", {"q": "walrus"}).text
    assert "12 results" in exact and "About 12 results" not in exact


@pytest.mark.parametrize(
    "q",
    [
        '"',
        '""',
        "\\",
        "%",
        "_",
        "%_%",
        "😀",
        "the",
        "the and of",
        "or",
        "-",
        "!",
        "&|!():*",
        "'; DROP TABLE pages; --",
        "a:*",
        "\\'",
        "<script>alert(1)</script>",
        "x" * 2000,
        " ".join(["w"] * 100),
        "-a -b -c",
        '"the of"',
    ],
)
def test_hostile_queries_answer_cleanly(client, add_page, q):
    add_page("Survivor", "the page that must survive 100% _ of queries")
    response = client.get("/api/search", {"q": q})
    assert response.status_int == 200
    assert isinstance(response.json["data"], list)
    page = client.get("/", {"q": q})
    assert page.status_int == 200
    assert "<script>alert(1)</script>" not in page.text
    assert client.get("/api/search", {"q": "survive"}).json["total"] == 1


def test_percent_and_underscore_are_literal_in_title_search(client, add_page):
    add_page("zq%w", "nothing")
    add_page("zqxw", "nothing")
    # Unescaped, the title pattern '%zq%w%' would also match "zqxw".
    assert titles(client.get("/api/search", {"q": "zq%w"})) == ["zq%w"]


@pytest.mark.parametrize(
    "params, message",
    [
        ({}, "q is required"),
        ({"q": "   "}, "q is required"),
        ({"q": "x", "language": "de"}, "language must be 'en' or 'da'"),
        ({"q": "x", "page": "0"}, "page must be a whole number from 1 to 10"),
        ({"q": "x", "page": "-1"}, "page must be a whole number"),
        ({"q": "x", "page": "abc"}, "page must be a whole number"),
        ({"q": "x", "page": "21"}, "page must be a whole number"),
        ({"q": "nul\x00byte"}, "q must not contain NUL characters"),
    ],
)
def test_api_search_rejects_bad_input_with_422(client, params, message):
    response = client.get("/api/search", params, status=422)
    assert response.json["statusCode"] == 422
    assert message in response.json["message"]


def test_invalid_utf8_is_a_422(client):
    response = client.get("/api/search?q=%ff%fe", status=422)
    assert response.json["message"] == "q is not valid UTF-8"
    page = client.get("/?q=%ff", status=422)
    assert "q is not valid UTF-8" in page.text


def test_search_page_shows_bad_input_on_the_page(client):
    page = client.get("/", {"q": "x", "language": "xx"}, status=422)
    assert "language must be &#39;en&#39; or &#39;da&#39;" in page.text
    assert 'id="search-input"' in page.text


def test_search_page_form_and_legacy_ids(client):
    page = client.get("/")
    for marker in (
        'id="search-input"',
        'id="search-button"',
        'id="results"',
        'id="nav-logo"',
        'id="nav-login"',
        'id="nav-register"',
        'method="get"',
        'name="language"',
    ):
        assert marker in page.text


def test_search_page_results_and_no_results(client, add_page):
    add_page("Fortran", "Formula translation", url="https://example.org/fortran")
    page = client.get("/", {"q": "fortran"})
    assert 'class="search-result-title" href="https://example.org/fortran"' in page.text
    assert 'class="search-result-description"' in page.text
    assert "2025-01-01" in page.text and "English" in page.text
    none = client.get("/", {"q": "nothingmatchesthis"})
    assert "No results for <strong>nothingmatchesthis</strong>" in none.text


def test_danish_query_from_the_form_is_decoded(client, add_page):
    add_page("Smørrebrød", "rugbrød med pålæg", language="da")
    page = client.get("/?q=sm%C3%B8rrebr%C3%B8d&language=da")
    assert "Smørrebrød" in page.text and "1 result " in page.text


def test_a_repeated_search_from_the_result_cache_answers_as_the_first(client, app, add_page):
    add_page("Blåbær og hindbær", "Blåbær vokser i skoven, hindbær i haven.", language="da")
    add_page("Blåbær", "Blåbær om sommeren.", language="da", last_updated=None)
    add_page("Hindbær", "Hindbær om efteråret.", language="da")
    long_question = " ".join(["blåbær", "hindbær"] + [f"ord{n}" for n in range(70)])
    answers = {}
    for q in ("blåbær hindbær", long_question):
        params = {"q": q, "language": "da"}
        answers[q] = client.get("/api/search", params).json, client.get("/", params).text
        assert (q.lower(), "da", 1) in app.search_cache.entries  # the repeat is served from the cache
        assert (client.get("/api/search", params).json, client.get("/", params).text) == answers[q]
    api, page = answers["blåbær hindbær"]
    assert "Missing:" in page and [item["last_updated"] for item in api["data"]].count(None) == 1
    assert "were left out" in answers[long_question][1]  # the notice comes from the cache too


def test_the_result_cache_keeps_to_its_memory_budget(db, add_page):
    for n in range(20):
        add_page(f"Page {n} about budgets", f"budget {n} " + "words about budgets and their keeping " * 20)
    result = whoknows.run_search(db, "budget", "en", 1)
    cache = whoknows.SearchCache(60, size_bytes=400_000)
    tracemalloc.start()
    for n in range(150):
        cache.put((f"query {n}", "en", 1), result)
        assert cache.get(("query 0", "en", 1)) == result  # asked for again and again
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert 0 < cache.used <= 400_000 and held <= 400_000 * 1.25  # what it counts is what it holds
    kept = [n for n in range(150) if (f"query {n}", "en", 1) in cache.entries]
    assert kept[0] == 0 and kept[1:] == list(range(150 - len(kept) + 1, 150))  # the least recently used went
    key, (_, encoded) = next(iter(cache.entries.items()))
    cache.entries[key] = (time.monotonic() - 61, encoded)  # stored 61 seconds ago
    used = cache.used
    assert cache.get(key) is None and key not in cache.entries and cache.used < used
