"""The relevance benchmark's parts: the CISI parser, the rarest-words rule, the
metrics and the BM25 anchor (bench/relevance.py; no database needed)."""

import collections
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("relevance", ROOT / "bench" / "relevance.py")
relevance = importlib.util.module_from_spec(spec)
spec.loader.exec_module(relevance)


@pytest.fixture(autouse=True)
def clean_state():
    """Replaces conftest's per-test truncate: these tests touch no database."""
    yield


CISI_SAMPLE = """\
.I 1
.T
18 Editions of the Dewey
Decimal Classifications
.A
Comaromi, J.P.
.A
Satija, M.P.
.W
   The present study is a history
of the DEWEY Decimal Classification.
.X
1\t5\t1
.I 2
.T\x20\x20
.A\x20
Slater, M.
.W
This report is an analysis of 6300 acts of use.
.I 3
.W
No title or author at all.
"""


def test_parser_reads_fields_across_lines_and_markers_with_trailing_spaces():
    records = relevance.parse_records(CISI_SAMPLE)
    assert sorted(records) == [1, 2, 3]
    assert records[1]["T"] == "18 Editions of the Dewey\nDecimal Classifications"
    assert records[1]["A"] == "Comaromi, J.P.\nSatija, M.P."  # both .A fields kept
    assert relevance.collapse(records[1]["W"]) == "The present study is a history of the DEWEY Decimal Classification."
    assert records[1]["X"] == "1\t5\t1"
    assert records[2]["T"] == "" and records[2]["A"] == "Slater, M."  # ".T " and ".A " open fields too
    assert records[3] == {"W": "No title or author at all."}


def test_pages_collapse_titles_and_name_empty_ones_untitled():
    records = relevance.parse_records(CISI_SAMPLE)
    first = relevance.page_record(1, records[1])
    assert first == {
        "title": "18 Editions of the Dewey Decimal Classifications",
        "url": "https://cisi.example/doc/1",
        "language": "en",
        "last_updated": None,
        "content": "The present study is a history of the DEWEY Decimal Classification.",
    }
    assert relevance.page_record(2, records[2])["title"] == "Untitled"
    assert relevance.page_record(3, records[3])["title"] == "Untitled"
    assert relevance.doc_id_from_url(first["url"]) == 1
    assert relevance.doc_id_from_url("https://cisi.example/doc/1/x") is None
    assert relevance.doc_id_from_url("https://example.org/doc/1") is None


def test_judgments_are_sets_per_question():
    text = "1\t28\t0\t0.000000\n1 35 0 0.000000\n1\t28\t0\t0.000000\n\n2\t7\t0\t0.000000"
    assert relevance.parse_judgments(text) == {1: {28, 35}, 2: {7}}


def test_rarest_words_by_stem_frequency_ties_to_the_earlier_word_in_question_order():
    df = relevance.document_frequencies(["the cat sat", "cats and dogs", "a dog barks"])
    assert df == collections.Counter({"cat": 2, "dog": 2, "sat": 1, "bark": 1})
    question = "Dogs, dog and cats: do zebras bark?"
    # bark (df 1); then dog and cat tie at 2 and dog comes first; zebras are in no document.
    assert relevance.rarest_words(question, df, n=2) == ["dogs", "bark"]
    assert relevance.rarest_words(question, df) == ["dogs", "cats", "bark"]  # "dog" is the same stem as "dogs"
    assert relevance.rarest_words("the zebras", df) == []


def test_ndcg_binary_gains_log2_discount():
    # DCG = 1/log2(2) + 1/log2(4) = 1.5; ideal (3 relevant) = 1 + 1/log2(3) + 1/log2(4) = 2.1309
    assert relevance.ndcg([1, 9, 2], {1, 2, 3}) == pytest.approx(1.5 / 2.130930, abs=1e-6)
    assert relevance.ndcg([3, 2, 1, 9], {1, 2, 3}) == pytest.approx(1.0)
    assert relevance.ndcg([9, 8], {1, 2}) == 0.0
    assert relevance.ndcg([], {1}) == 0.0


def test_ndcg_ideal_counts_at_most_k_relevant_documents():
    relevant = set(range(1, 13))  # 12 relevant, only 10 places
    assert relevance.ndcg(list(range(1, 11)), relevant) == pytest.approx(1.0)
    # One relevant document at rank 2, ideal = sum over ranks 1..10 of 1/log2(r + 1) = 4.543559
    assert relevance.ndcg([99, 5], relevant) == pytest.approx((1 / 1.584963) / 4.543559, abs=1e-6)


def test_precision_counts_empty_places_as_misses():
    assert relevance.precision([1, 9, 2], {1, 2, 3}) == pytest.approx(0.2)
    assert relevance.precision(list(range(1, 21)), {11, 12}) == 0.0  # beyond the first 10


def test_reciprocal_rank_within_the_first_ten():
    assert relevance.reciprocal_rank([9, 8, 2], {2}) == pytest.approx(1 / 3)
    assert relevance.reciprocal_rank([2, 1], {1, 2}) == 1.0
    assert relevance.reciprocal_rank(list(range(100, 110)) + [2], {2}) == 0.0


def test_evaluate_averages_over_judged_questions_and_counts_no_result():
    judgments = {1: {1, 2}, 2: {5}, 3: {7}}
    rankings = {1: [2, 9], 2: [], 4: [1]}  # 2 found nothing, 3 was not answered, 4 is not judged
    figures = relevance.evaluate(rankings, judgments)
    assert figures["ndcg"] == pytest.approx((1 / (1 + 1 / 1.584963)) / 3, abs=1e-6)
    assert figures["precision"] == pytest.approx(0.1 / 3)
    assert figures["mrr"] == pytest.approx(1 / 3)
    assert figures["no_result"] == pytest.approx(2 / 3)
    assert figures["questions"] == 3


def test_bm25_anchor_returns_only_matching_documents_best_first():
    texts = [f"filler text number {n}" for n in range(10)] + ["zebra stripes", "zebra zebra zebras herd"]
    anchor = relevance.BM25Anchor(range(100, 112), texts)
    assert anchor.search("Zebras?") == [111, 110]  # more occurrences in a similar length ranks first
    assert anchor.search("unicorn") == []
    assert anchor.search("the and of") == []
