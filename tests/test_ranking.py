"""Ranking: BM25F behaviours, soft matching, exact top-k against an
exhaustive evaluation, and statistics that follow every change."""

import io
import json
import random
import threading

import numpy
import pytest
import webtest

import app as whoknows


def titles(client, q, **params):
    return [item["title"] for item in client.get("/api/search", {"q": q, **params}).json["data"]]


def ranking(db, q, k=10, language="en", how="fast"):
    """The top k page ids of a search: the fast path, every posting (exact), or every vector."""
    search = whoknows.look_up(db, whoknows.parse_query(q), language)
    if how == "vectors":
        return [page_id for page_id, _, _ in whoknows.exhaustive_top(db, search, k)]
    return [c.page_id for c in whoknows.Ranker(db, search, exhaustive=how == "exact").top(k)]


# Behaviours of the ranking function ###########################################


def test_a_rare_word_outweighs_a_common_one(client, add_page):
    for n in range(8):
        add_page(f"Filler {n}", "common words fill this page")
    add_page("Has the common word", "a page with common in it and nothing else of note")
    add_page("Has the rare word", "a page with fortran in it and nothing else of note")
    assert titles(client, "common fortran")[:1] == ["Has the rare word"]


def test_a_title_match_outweighs_a_body_match(client, add_page):
    add_page("Other things", "this page mentions zebras once")
    add_page("Zebras", "this page mentions others once")
    assert titles(client, "zebras") == ["Zebras", "Other things"]


def test_pages_with_all_words_outrank_pages_with_some(client, add_page):
    add_page("Only one", "quantum quantum quantum quantum quantum, a short page")
    add_page("Both words", "a much longer page about quantum things and their harbor, with many more words in it")
    assert titles(client, "quantum harbor")[0] == "Both words"


def test_a_shorter_page_with_the_same_matches_ranks_higher(client, add_page):
    add_page("Long", "lantern " + " ".join(f"word{n}" for n in range(60)))
    add_page("Short", "lantern and a few words")
    assert titles(client, "lantern") == ["Short", "Long"]


def test_danish_pages_are_ranked_with_the_danish_statistics(client, add_page, db):
    # "kaffe" is on every Danish page but on one English page only: rare in
    # English, common in Danish, so each language weighs it on its own.
    for n in range(6):
        add_page(f"Dansk {n}", f"kaffe og brød nummer {n}", language="da")
    add_page("Dansk ost", "ost og brød", language="da")
    add_page("English coffee", "kaffe is coffee", language="en")
    for n in range(5):
        add_page(f"English {n}", "bread and butter", language="en")
    da = whoknows.look_up(db, whoknows.parse_query("kaffe ost"), "da")
    weights = {t.lexeme: t.weight for t in da.terms}
    assert weights["ost"] > weights["kaf"]  # kaffe is in 6 of 7 Danish pages, ost in 1
    assert titles(client, "kaffe ost", language="da")[0] == "Dansk ost"
    en = whoknows.look_up(db, whoknows.parse_query("kaffe"), "en")
    assert en.terms[0].df == 1 and en.pages == 6 and da.pages == 7


# Soft matching and the query syntax ##########################################


def test_a_word_that_matches_nothing_still_shows_the_best_partial_matches(client, add_page):
    add_page("Fortran", "Fortran is a language for numbers.")
    add_page("Cobol", "Cobol is a language for business.")
    body = client.get("/api/search", {"q": "fortran language xyzzyplugh"}).json
    assert [item["title"] for item in body["data"]] == ["Fortran", "Cobol"]
    page = client.get("/", {"q": "fortran language xyzzyplugh"}).text
    assert "Missing: <s>xyzzyplugh</s>" in page


def test_stop_words_are_not_searched_so_no_page_lacks_them(client, add_page):
    # "harbor" is on every filler page, so its weight is low: the page with
    # both words ranks first only because it has every word searched.
    for n in range(6):
        add_page(f"Filler {n}", "a harbor page")
    add_page("Only one", "quantum quantum quantum quantum quantum")
    add_page("Both words", "a much longer page about quantum things and their harbor, with many more words in it")
    for q in ("quantum harbor", "the quantum of the harbor", "what is quantum in a harbor"):
        assert titles(client, q)[:2] == ["Both words", "Only one"], q
    page = client.get("/", {"q": "the quantum of the harbor"}).text
    assert "Missing: <s>harbor</s>" in page  # Only one's; never a stop word
    assert "<s>the</s>" not in page and "<s>of</s>" not in page


def test_a_snippet_starts_at_the_first_word_searched_not_at_a_stop_word(client, add_page):
    add_page("Stripes", "At the start. " + "Filler words go on here. " * 30 + "A zebra with stripes.")
    api = client.get("/api/search", {"q": "the zebra"}).json["data"][0]
    assert "zebra" in api["snippet"]


def test_a_long_question_returns_results_and_over_the_limit_says_so(client, add_page):
    add_page("Retrieval", "information retrieval of articles from titles")
    question = "What problems are there in retrieving articles from approximate titles? " * 2
    assert titles(client, question) == ["Retrieval"]
    words = " ".join(f"filler{n}" for n in range(whoknows.MAX_QUERY_WORDS)) + " retrieval articles"
    body = client.get("/api/search", {"q": words}).json
    assert body["words_ignored"] == 2 and "Only the first 64 words were searched" in body["notice"]
    assert body["data"] == []  # the words that would have matched were left out
    page = client.get("/", {"q": words}).text
    assert "Only the first 64 words were searched; 2 words were left out." in page
    huge = client.get("/api/search", {"q": "retrieval " + "x" * 3000}).json
    assert huge["words_ignored"] == 1 and [i["title"] for i in huge["data"]] == ["Retrieval"]


def test_phrase_exclusion_and_or_still_work_with_soft_matching(client, add_page):
    add_page("Exact", "the quick brown fox")
    add_page("Scrambled", "brown quick fox")
    add_page("Other", "a lazy dog")
    assert titles(client, '"quick brown"') == ["Exact"]
    assert titles(client, '"quick brown" lazy') == ["Exact"]  # the phrase is required, lazy is not
    assert sorted(titles(client, "fox or dog")) == ["Exact", "Other", "Scrambled"]
    assert titles(client, "fox -scrambled") == ["Exact"]
    assert titles(client, "fox brown -quick") == []


def test_a_word_the_query_also_excludes_is_not_searched(client, add_page, db):
    """`fox -foxes` can find nothing, so the search does not read fox's
    postings to learn that; the other words still find their pages."""
    add_page("Fox", "the quick brown fox")
    add_page("Dog", "a lazy brown dog")
    search = whoknows.look_up(db, whoknows.parse_query("fox brown -foxes"), "en")
    assert [t.lexeme for t in search.terms] == ["brown"] and search.words == [["brown"]]
    assert titles(client, "fox brown -foxes") == ["Dog"]
    assert titles(client, "fox -fox") == []
    assert titles(client, '"quick brown" -quick') == []  # a phrase needs it
    for q in ("fox brown -foxes", "fox -fox", '"quick brown" -quick', "brown -lazy"):
        assert ranking(db, q) == ranking(db, q, how="vectors"), q


def test_a_partial_last_word_expands_to_its_most_frequent_completions_only(client, add_page, db):
    add_page("JavaScript", "A language for the web.")
    for n in range(whoknows.PREFIX_EXPANSIONS + 4):
        # completions of "pla": plan0a, plan1a, ... each on n + 1 pages
        for copy in range(n + 1):
            add_page(f"Plan {n}-{copy}", f"pla{n}z text", index=False)
    with db.transaction():
        whoknows.index_queued(db)
    assert titles(client, "javascr") == ["JavaScript"]
    search = whoknows.look_up(db, whoknows.parse_query("pla"), "en")
    kept = sorted(t.lexeme for t in search.terms)
    assert len(kept) == whoknows.PREFIX_EXPANSIONS
    assert "pla0z" not in kept and "pla11z" in kept  # the rarest completions are the ones left out
    assert whoknows.parse_query("javascr").prefix == 0
    assert whoknows.parse_query("javascr ").prefix is None  # a space after it: the word is finished
    assert whoknows.parse_query("what is javascr?").prefix is None


def completions(db, prefix, language="en"):
    """A prefix's completions as the search takes them, and as term_stats has them now."""
    search = whoknows.look_up(db, whoknows.parse_query(prefix), language)
    current = db.execute(
        "SELECT array_agg(lexeme ORDER BY df DESC, lexeme) AS lexemes FROM ("
        "SELECT lexeme, df FROM term_stats WHERE language = %s AND starts_with(lexeme, %s) AND df > 0"
        " ORDER BY df DESC, lexeme LIMIT %s) AS top",
        (language, prefix, whoknows.PREFIX_EXPANSIONS),
    ).fetchone()["lexemes"]
    return sorted(t.lexeme for t in search.terms), sorted(current or [])


def listed(db, prefix, language="en"):
    row = db.execute(
        "SELECT lexemes FROM term_completions WHERE language = %s AND prefix = %s", (language, prefix)
    ).fetchone()
    return row and row["lexemes"]


def test_a_short_prefix_takes_its_listed_completions_and_they_follow_new_pages(client, add_page, db):
    for n in range(whoknows.PREFIX_EXPANSIONS + 4):  # wo0z on 1 page ... wo11z on 12
        for copy in range(n + 1):
            add_page(f"Page {n}-{copy}", f"wo{n}z text", index=False)
    with db.transaction():
        whoknows.index_queued(db)
    taken, current = completions(db, "wo")
    assert taken == current and "wo11z" in taken and "wo3z" not in taken
    assert sorted(listed(db, "wo")) == taken and sorted(listed(db, "wo1")) == ["wo10z", "wo11z", "wo1z"]
    assert listed(db, "wo11") is None  # longer prefixes are looked up in term_stats
    assert completions(db, "wo11") == (["wo11z"], ["wo11z"])

    # A new lexeme more frequent than the least listed one joins the list at its index build...
    for copy in range(9):
        add_page(f"Wozzle {copy}", "wozzle text", index=False)
    with db.transaction():
        whoknows.index_queued(db)
    taken, current = completions(db, "wo")
    assert taken == current and "wozzl" in taken and "wo4z" not in taken  # wozzle's lexeme
    assert titles(client, "wo")[0] == "Wozzle 0"  # the new completion, in a title
    # ...and a rarer one leaves the list as it was.
    add_page("Wobble", "wobble text")
    assert completions(db, "wo")[0] == taken and "wobbl" not in listed(db, "wo")
    assert completions(db, "wob") == (["wobbl"], ["wobbl"])

    # With no rows (as right after the migration), the prefix is looked up in term_stats.
    db.execute("TRUNCATE term_completions")
    assert completions(db, "wo") == (taken, current)
    # A full build lists every short prefix again, each as term_stats has it.
    with db.transaction():
        whoknows.rebuild_index(db)
    rows = db.execute("SELECT prefix FROM term_completions WHERE language = 'en'").fetchall()
    prefixes = {row["prefix"] for row in rows}
    assert {"wo", "wo1", "woz", "te", "tex"} <= prefixes and not any(len(p) > 3 for p in prefixes)
    for prefix in prefixes:
        assert sorted(listed(db, prefix)) == completions(db, prefix)[1], prefix


def test_unfinished_last_words_count_less_than_words_typed_in_full(client, add_page):
    add_page("Java", "java island coffee")
    add_page("Javanese", "javanese island coffee")
    assert titles(client, "java") == ["Java", "Javanese"]


# Exact top k ##################################################################


WORDS = [f"w{n}" for n in range(40)]


def random_page(rng, n):
    """A page whose words follow a skewed distribution, some in the title."""
    weights = [1 / (rank + 1) for rank in range(len(WORDS))]
    body = rng.choices(WORDS, weights, k=rng.randint(3, 60))
    title = " ".join(rng.choices(WORDS, weights, k=rng.randint(1, 3)))
    return {"title": f"{title} {n}", "url": f"https://example.org/r/{n}", "language": "en", "content": " ".join(body)}


def import_pages(app, path, pages):
    """Import pages (dicts) from a file at path, as `python app.py import` does."""
    path.write_text("".join(json.dumps(p) + "\n" for p in pages))
    whoknows.import_file(app.db, path, out=io.StringIO())


def random_queries(rng):
    queries = [" ".join(rng.sample(WORDS, rng.randint(1, 4))) + " " for _ in range(40)]
    queries += [f"w{rng.randint(0, 9)} w{rng.randint(10, 39)} " for _ in range(10)]
    queries += ['"w0 w1" w2 ', "w0 -w1 ", "w3 or w30 w5 ", "w1", "w2", "w0 w1 w2 w3 w4 w5 w6 w7 ", "the w2 of w7 "]
    queries += ['w4 "w2 w0 w1" ', '"w1 nosuchword" w2 ', '"w5 w9" or w3 ']
    queries += [f"w{rng.randint(0, 9)} w{rng.randint(1, 3)}" for _ in range(4)]  # a prefix: w1 is w1, w10..w19
    return queries


@pytest.fixture(
    params=[(0, True), (256, True), (256, False)], ids=["lists-by-level", "short-lists-whole", "no-dead-postings"]
)
def random_corpus(app, db, tmp_path, monkeypatch, request):
    """300 pages imported in two imports and some single-page changes, so
    that several segments and dead postings are in play; every posting list
    split by impact level, or (as by default) the short ones in one row;
    or new pages only, so that nothing is dead. In each, a search's first
    round comes with its lookup (lookup_terms)."""
    whole_below, changes = request.param
    monkeypatch.setattr(whoknows, "WHOLE_LIST_BELOW", whole_below)
    rng = random.Random(7)
    pages = [random_page(rng, n) for n in range(300)]
    monkeypatch.setattr(whoknows, "BULK_IMPORT_ROWS", 100)
    import_pages(app, tmp_path / "first.jsonl", pages[:200])  # a bulk import: a full build
    import_pages(app, tmp_path / "second.jsonl", pages[200:])  # new segments
    if changes:
        db.execute("UPDATE pages SET content = content || ' w0 w0' WHERE id % 17 = 0")
        db.execute("DELETE FROM pages WHERE id % 23 = 0")
    else:  # new pages only: a new segment, and nothing dead
        db.execute(
            "INSERT INTO pages (title, url, language, content)"
            " SELECT title, url || '/again', language, content || ' w1' FROM pages WHERE id % 7 = 0"
        )
    with db.transaction():
        whoknows.index_queued(db)
    state = db.execute(whoknows.sql("get_index_state")).fetchone()
    assert state["segments"] >= 2 and (state["dead"] > 0) == changes and state["queued"] == 0
    search = whoknows.look_up(db, whoknows.parse_query("w0 w5"), "en")
    assert all(term.first is not None for term in search.terms)
    return rng


@pytest.mark.parametrize("k", [1, 10, 31])
def test_the_fast_path_finds_the_exact_top_k(db, random_corpus, k):
    for q in random_queries(random_corpus):
        exhaustive = ranking(db, q, k, how="vectors")
        assert ranking(db, q, k) == exhaustive, q
        assert ranking(db, q, k, how="exact") == exhaustive, q


def rounds_and_agreement(db, queries):
    """Return the rounds of each fast search, asserting it found the exhaustive top 10."""
    rounds = []
    for q in queries:
        search = whoknows.look_up(db, whoknows.parse_query(q), "en")
        ranker = whoknows.Ranker(db, search)
        top = [c.page_id for c in ranker.top(10)]
        rounds.append(ranker.rounds)
        assert top == [p for p, _, _ in whoknows.exhaustive_top(db, search, 10)], q
    return rounds


def test_a_deep_search_reads_more_rounds_and_still_agrees(db, random_corpus, monkeypatch):
    monkeypatch.setattr(whoknows, "INITIAL_DEPTH", 2)
    monkeypatch.setattr(whoknows, "RANDOM_ACCESS_LIMIT", 1)
    monkeypatch.setattr(whoknows, "READ_REST_BELOW", 0)
    monkeypatch.setattr(whoknows, "READ_REST_RATIO", 0)
    rounds = rounds_and_agreement(db, random_queries(random_corpus)[:20])
    assert max(rounds) > 2  # the shallow start made it read deeper


def test_a_search_reads_a_small_rest_at_once(db, random_corpus, monkeypatch):
    monkeypatch.setattr(whoknows, "INITIAL_DEPTH", 2)
    monkeypatch.setattr(whoknows, "RANDOM_ACCESS_LIMIT", 1)
    # Every list of the test corpus is far below READ_REST_BELOW: the second
    # round reads everything, where rounds four times deeper would take more.
    rounds = rounds_and_agreement(db, random_queries(random_corpus)[:20])
    assert max(rounds) == 2


@pytest.mark.parametrize(
    "check_price, checks",
    [(whoknows.ENTRIES_PER_CHECK, False), (1, True)],
    ids=["reading-the-rest-is-cheaper", "checking-is-cheaper"],
)
def test_a_search_reads_a_short_rest_rather_than_check_more_pages(app, db, tmp_path, monkeypatch, check_price, checks):
    """A common word on 600 pages, and a rarer one on 30 long pages where
    the common word occurs once: its best postings, read first,
    do not name those 30, so they stay open. Reading the common word's
    other entries settles them all, for less than checking 30 pages at the
    default price: the search reads on and checks none. At 1 entry a page,
    checking is the cheaper, and it checks. Both find the exhaustive top 10."""
    monkeypatch.setattr(whoknows, "ENTRIES_PER_CHECK", check_price)
    rng = random.Random(11)
    pages = []
    for n in range(600):
        if n % 20:
            words = ["harbor"] * rng.randint(1, 4) + rng.choices(WORDS, k=rng.randint(5, 20))
        else:
            words = ["harbor", "lantern"] + rng.choices(WORDS, k=80)
        rng.shuffle(words)
        url = f"https://example.org/rest/{n}"
        pages.append({"title": f"Page {n}", "url": url, "language": "en", "content": " ".join(words)})
    import_pages(app, tmp_path / "rest.jsonl", pages)
    search = whoknows.look_up(db, whoknows.parse_query("harbor lantern "), "en")
    ranker = whoknows.Ranker(db, search)
    assert [c.page_id for c in ranker.top(10)] == [p for p, _, _ in whoknows.exhaustive_top(db, search, 10)]
    assert (ranker.checks > 0) == checks, ranker.checks
    assert ranker.rounds == (1 if checks else 2)  # the checks settle it; else a second round reads the rest


def test_a_prefixs_completions_share_one_words_first_round(app, db, tmp_path, monkeypatch):
    """Eight completions of "pla", each on 60 pages at impacts spread over
    many levels: their first round reads about what one word's does, not
    eight times as much, and the search still finds the exhaustive top 10."""
    monkeypatch.setattr(whoknows, "WHOLE_LIST_BELOW", 0)
    monkeypatch.setattr(whoknows, "INITIAL_DEPTH", 32)
    rng = random.Random(5)
    pages = []
    for n in range(whoknows.PREFIX_EXPANSIONS):
        for copy in range(60):
            words = [f"pla{n}z"] * rng.randint(1, 6) + rng.choices(WORDS, k=rng.randint(2, 80))
            rng.shuffle(words)
            url = f"https://example.org/p/{n}/{copy}"
            pages.append({"title": f"Page {n} {copy}", "url": url, "language": "en", "content": " ".join(words)})
    import_pages(app, tmp_path / "prefix.jsonl", pages)
    search = whoknows.look_up(db, whoknows.parse_query("pla"), "en")
    assert len(search.terms) == whoknows.PREFIX_EXPANSIONS
    first = [len(whoknows.decode_chunks(*term.first[1:], False)[0]) for term in search.terms]
    assert all(count >= 32 / whoknows.PREFIX_EXPANSIONS for count in first)
    assert sum(first) < 32 * whoknows.PREFIX_EXPANSIONS / 2, first
    ranker = whoknows.Ranker(db, search)
    assert [c.page_id for c in ranker.top(10)] == [p for p, _, _ in whoknows.exhaustive_top(db, search, 10)]
    assert ranker.entries_read < 2 * 32, ranker.entries_read  # about one word's depth, not eight


@pytest.mark.parametrize(
    "both, alone, q, narrowed",
    [(40, 20, "harbor lantern ", True), (4, 56, "harbor lantern ", False), (40, 0, "harbor lantern -beacon ", False)],
    ids=["enough-pages-hold-both", "too-few-hold-both", "too-few-pass-the-filter"],
)
def test_a_rare_word_narrows_the_decision_to_its_own_pages(app, db, tmp_path, both, alone, q, narrowed):
    """A common word (600 pages) with a rare one (in `both` of them, and
    alone in `alone` more). Once the rare word is read to the end, only its
    pages can match both words: with at least 10 of those, the decision
    looks at them alone (narrowed); with fewer, or when a filter rejects all
    but 4 of them (beacon), pages with one word fill the top 10 (with the
    filter, pages with the common word only), and the whole read is used.
    In those two, the rare word's 60 pages may all hold the common word at
    first, so they are looked up first (resolutions), and only then does
    the search turn to every page read. Each agrees with the exhaustive
    ranking."""
    rng = random.Random(3)
    pages = []
    for n in range(600 + alone):
        words = ["harbor"] * rng.randint(1, 4) if n < 600 else []
        if n < both or n >= 600:
            words += ["lantern"] * rng.randint(1, 3)
        if 4 <= n < both:
            words.append("beacon")
        words += rng.choices(WORDS, k=rng.randint(5, 40))
        rng.shuffle(words)
        url = f"https://example.org/n/{n}"
        pages.append({"title": f"Page {n}", "url": url, "language": "en", "content": " ".join(words)})
    import_pages(app, tmp_path / "narrow.jsonl", pages)
    search = whoknows.look_up(db, whoknows.parse_query(q), "en")
    ranker = whoknows.Ranker(db, search)
    top = ranker.top(10)
    assert [c.page_id for c in top] == [p for p, _, _ in whoknows.exhaustive_top(db, search, 10)]
    assert sum(c.matched == search.all_groups for c in top) == (10 if narrowed else 4)
    assert ranker.narrowed == narrowed
    assert (ranker.resolutions > 0) == (not narrowed)


@pytest.mark.parametrize("spread", [1000, 1 << 40], ids=["by-table", "by-sorting"])
def test_among_matches_page_ids_over_any_range(spread):
    rng = random.Random(spread)
    ids = numpy.array([rng.randrange(spread) for _ in range(50)] + [0], numpy.int64)
    values = numpy.array([rng.randrange(spread) for _ in range(500)] + list(ids[:10]), numpy.int64)
    expected = [int(v) in set(ids.tolist()) for v in values]
    assert whoknows.among(values, ids).tolist() == expected
    assert whoknows.among(values, ids[:0]).tolist() == [False] * len(values)


@pytest.mark.parametrize(
    "terms, phrases",
    [(2, []), (4, []), (5, []), (3, ["w0 w1", "w2 w3"])],
    ids=["2-tests", "4-tests", "5-tests-copied", "3-terms-2-phrases-copied"],
)
def test_a_check_names_exactly_the_terms_a_vector_holds_whether_or_not_it_is_copied(db, terms, phrases):
    """check_pages copies a page's vector once only for more than 4 tests
    (else each test reads it again, which costs less): either way it names
    the query terms each page holds, and a phrase passes where the page has it."""
    words = ["w0", "w1", "w2", "w3", "w4", "w5"][:terms]
    rng = random.Random(terms)
    for n in range(40):
        body = " ".join(rng.choices(["w0", "w1", "w2", "w3", "w4", "w5", "x"], k=rng.randint(1, 12)))
        db.execute(
            "INSERT INTO pages (title, url, language, content) VALUES (%s, %s, 'en', %s)",
            (f"page {n}", f"https://example.org/c/{n}", body),
        )
    pages = db.execute("SELECT id, content FROM pages").fetchall()
    params = {
        "lexemes": whoknows.TextArray(words),
        "page_ids": whoknows.IntArray([page["id"] for page in pages]),
        "phrases": whoknows.TextArray(phrases),
        "excluded": whoknows.TextArray([]),
        "config": "english",
    }
    found = {row["id"]: (row["terms"], row["phrases_ok"]) for row in db.execute(whoknows.sql("check_pages"), params)}
    expected = {
        page["id"]: (
            [place + 1 for place, word in enumerate(words) if word in page["content"].split()],
            all(f" {phrase} " in f" {page['content']} " for phrase in phrases),
        )
        for page in pages
    }
    assert found == expected


def test_a_search_ends_when_more_pages_tie_than_it_would_look_up_in_one_go(app, db, tmp_path, monkeypatch):
    """A filter (-word) leaves every candidate open until its vector is
    checked; 150 identical pages all tie with the 10th, more than one round's
    budget of checks (64 at the defaults). Once everything is read the search
    must look them all up and end, with the exact answer (it looped for ever)."""
    pages = [
        {"title": f"Page {n}", "url": f"https://example.org/tie/{n}", "language": "en", "content": "search engines"}
        for n in range(150)
    ]
    import_pages(app, tmp_path / "ties.jsonl", pages)
    answers = {}

    def rank_all():
        for q in ["search -x1", "search -x1 page", '"search engines" -x2']:
            answers[q] = (ranking(db, q, 10), ranking(db, q, 31), ranking(db, q, 10, how="vectors"))

    worker = threading.Thread(target=rank_all, daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "a search never ended"
    for q, (fast, deeper, exhaustive) in answers.items():
        assert fast == exhaustive and deeper[:10] == exhaustive, q


def test_a_phrase_that_few_pages_hold_takes_few_look_ups(app, db, tmp_path, monkeypatch):
    """Both words are on 600 pages, the phrase on the 3 longest (which rank
    last): every other page must be looked up in its vector and rejected.
    The look-ups grow with the pages rejected, so the search takes a few
    round trips, not one for every k pages (at k=1 it took 597 of them, each
    a level of recursion)."""
    pages = [
        {
            "title": f"Page {n}",
            "url": f"https://example.org/phrase/{n}",
            "language": "en",
            "content": ("alpha beta" if n >= 597 else "beta and alpha") + "".join(f" w{i}" for i in range(n)),
        }
        for n in range(600)
    ]
    import_pages(app, tmp_path / "phrase.jsonl", pages)
    look_ups = []
    vector_rows = whoknows.Ranker.vector_rows

    def counted(self, query, page_ids):
        look_ups.append(len(page_ids))
        return vector_rows(self, query, page_ids)

    monkeypatch.setattr(whoknows.Ranker, "vector_rows", counted)
    for k in (1, 10):
        look_ups.clear()
        fast = ranking(db, '"alpha beta"', k)
        assert fast == ranking(db, '"alpha beta"', k, how="vectors") and len(fast) == min(k, 3)
        assert sum(look_ups) >= 597 and len(look_ups) <= 20, (k, look_ups)


def test_only_pages_with_every_word_of_a_phrase_are_looked_up_for_it(app, db, tmp_path, monkeypatch):
    """Each word of the phrase is on 200 pages of its own, all three on 20
    (the phrase on 2 of them): only those 20 can hold the phrase, so only
    they are looked up in their vectors, not the 600 that have some word."""

    def page(n, content):
        return {"title": f"Page {n}", "url": f"https://example.org/req/{n}", "language": "en", "content": content}

    words = ["alpha", "beta", "gamma"]
    pages = [page(n, f"{words[n % 3]} {words[n % 3]} filler") for n in range(600)]
    pages += [page(600 + n, "gamma then beta then alpha" + " filler" * n) for n in range(18)]
    pages += [page(700 + n, "alpha beta gamma" + " filler" * (20 + n)) for n in range(2)]
    import_pages(app, tmp_path / "required.jsonl", pages)
    looked_up = []
    vector_rows = whoknows.Ranker.vector_rows

    def counted(self, query, page_ids):
        looked_up.extend(page_ids)
        return vector_rows(self, query, page_ids)

    monkeypatch.setattr(whoknows.Ranker, "vector_rows", counted)
    for q in ('"alpha beta gamma"', 'alpha "beta gamma"', '"alpha beta" delta'):
        looked_up.clear()
        fast = ranking(db, q, 10)
        assert fast == ranking(db, q, 10, how="vectors") and len(fast) == 2, q
        assert 0 < len(set(looked_up)) <= 20, (q, len(set(looked_up)))
    looked_up.clear()
    assert ranking(db, '"alpha zzyzx"', 10) == [] and looked_up == []  # a word no page has: nothing to look up


def test_pages_not_indexed_yet_are_found_and_ranked_exactly(client, add_page, db):
    add_page("Indexed", "harbor lantern")
    add_page("Waiting", "harbor lantern lantern", index=False)
    assert db.execute("SELECT count(*) AS n FROM index_queue").fetchone()["n"] == 1
    assert titles(client, "lantern") == ["Waiting", "Indexed"]
    assert ranking(db, "lantern harbor") == ranking(db, "lantern harbor", how="vectors")


# Statistics follow changes ###################################################


def test_statistics_follow_single_page_changes(client, add_page, db, app):
    first = add_page("One", "alpha beta")
    add_page("Two", "alpha gamma")

    def df(lexeme):
        row = db.execute("SELECT df FROM term_stats WHERE language = 'en' AND lexeme = %s", (lexeme,)).fetchone()
        return row["df"] if row else 0

    assert (df("alpha"), df("beta"), df("gamma")) == (2, 1, 1)
    db.execute("UPDATE pages SET content = 'gamma delta' WHERE id = %s", (first,))
    assert (df("alpha"), df("beta"), df("gamma"), df("delta")) == (1, 0, 2, 1)
    app.search_cache.clear()
    assert titles(client, "delta") == ["One"]  # the change waits in the queue and is found
    with db.transaction():
        whoknows.index_queued(db)
    assert titles(client, "delta") == ["One"] and titles(client, "beta") == []
    db.execute("DELETE FROM pages WHERE id = %s", (first,))
    assert (df("gamma"), df("delta")) == (1, 0)
    assert db.execute("SELECT pages FROM corpus_stats WHERE language = 'en'").fetchone()["pages"] == 1
    app.search_cache.clear()
    assert titles(client, "gamma") == ["Two"]


def test_other_processes_see_a_change_within_the_cache_time(make_app, add_page):
    fresh = webtest.TestApp(make_app(search_cache_seconds=0))
    add_page("Before", "searchable words")
    assert [i["title"] for i in fresh.get("/api/search", {"q": "searchable"}).json["data"]] == ["Before"]
    add_page("After", "searchable words")
    assert len(fresh.get("/api/search", {"q": "searchable"}).json["data"]) == 2
