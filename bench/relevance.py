"""The relevance benchmark, in one command: `make relevance`.

    .venv/bin/python bench/relevance.py [--cisi DIR]

1. reads the CISI test collection (../shared/relevance/cisi/ beside the
   repository: 1,460 abstracts, 112 questions, judgments for 76 of them);
2. writes the documents as JSON Lines and loads them with `python app.py
   import` into a fresh database (bench/run.py's server: the embedded
   PostgreSQL 18, or BENCH_DATABASE_URL), reporting how many it loaded;
3. serves the app as bench/run.py does and asks every judged question through
   GET /api/search, as the full question and as its 3 rarest words;
4. asks the same of the anchor, BM25 from bm25s, in the same run;
5. prints nDCG@10, P@10, MRR and the share with no result for each system and
   form, and writes the report to bench/results/relevance-DATE.md.

The harness relies only on `python app.py import`, GET /api/search's JSON
({"data": [{"url": ...}, ...]}) and bench/run.py's helpers, so it measures
any ranking behind that interface. The metrics and the rarest-words rule are
plain functions, for other benchmarks to reuse.
"""

import argparse
import collections
import datetime as dt
import json
import math
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlencode

import bm25s
import psycopg
import Stemmer

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
CISI = ROOT.parent / "shared" / "relevance" / "cisi"
DOC_URL = "https://cisi.example/doc/{}"
K = 10  # every metric looks at the first page: 10 results
FORMS = ("full question", "3 rarest words")
# The published BM25 figures on CISI (nDCG@10, P@10), which our anchor should reproduce.
PUBLISHED = {"full question": (0.381, 0.353), "3 rarest words": (0.230, 0.205)}
STEMMER = Stemmer.Stemmer("english")


def log(message):
    print(f"[relevance {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def collapse(text):
    """Return text with every run of whitespace made one space, and trimmed."""
    return " ".join(text.split())


# The collection ###############################################################

MARKER = re.compile(r"\.(?:I\s+(?P<id>\d+)|(?P<field>[A-Z]))\s*")


def parse_records(text):
    """Return {id: {field letter: text}} from CISI.ALL or CISI.QRY.

    A record opens with `.I id`; a line `.T` (or `.A`, `.W`, ...; trailing
    spaces allowed) opens a field that runs to the next marker. A field that
    occurs twice (several `.A` lines) keeps both texts, one per line.
    """
    records, record, field = {}, None, None
    for line in text.splitlines():
        marker = MARKER.fullmatch(line)
        if marker and marker.group("id"):
            record, field = records.setdefault(int(marker.group("id")), {}), None
        elif marker and record is not None:
            field = marker.group("field")
            record.setdefault(field, [])
        elif field is not None:
            record[field].append(line)
    return {rid: {name: "\n".join(lines) for name, lines in fields.items()} for rid, fields in records.items()}


def parse_judgments(text):
    """Return {question id: set of relevant document ids} from CISI.REL lines
    `qid docid 0 0.000000`."""
    judgments = collections.defaultdict(set)
    for line in text.splitlines():
        if line.strip():
            question, document = line.split()[:2]
            judgments[int(question)].add(int(document))
    return dict(judgments)


def page_record(doc_id, fields):
    """Return the import record of one CISI document (an empty title becomes
    'Untitled', which the importer requires)."""
    return {
        "title": collapse(fields.get("T", "")) or "Untitled",
        "url": DOC_URL.format(doc_id),
        "language": "en",
        "last_updated": None,
        "content": collapse(fields.get("W", "")),
    }


def doc_id_from_url(url):
    """Return the CISI id in one of our urls, or None for any other url."""
    match = re.fullmatch(re.escape(DOC_URL).replace(r"\{\}", r"(\d+)"), url)
    return int(match.group(1)) if match else None


def indexed_text(fields):
    """Return what the anchor indexes and counts words in: title + " " + abstract."""
    return collapse(fields.get("T", "")) + " " + collapse(fields.get("W", ""))


# Words: bm25s's tokenizer and the rarest-words rule ###########################


def tokenize(texts, stem=True):
    """Return each text's tokens as bm25s makes them: lowercased words of two
    or more word characters, English stop words left out, Snowball-stemmed
    unless stem=False (then the words themselves, in order)."""
    return bm25s.tokenize(
        list(texts), stopwords="en", stemmer=STEMMER if stem else None, return_ids=False, show_progress=False
    )


def document_frequencies(texts):
    """Return a Counter: for each stemmed token, how many of the texts contain it."""
    df = collections.Counter()
    for tokens in tokenize(texts):
        df.update(set(tokens))
    return df


def rarest_words(question, df, n=3):
    """Return the question's n distinct words of lowest document frequency, in
    the order they appear in the question.

    Words are bm25s's tokens (lowercased, no stop words); a word's frequency is
    that of its stem, and words of the same stem count once (the first form
    seen). Words found in no document are left out; a tie goes to the word
    that comes first in the question.
    """
    seen = {}
    for position, word in enumerate(tokenize([question], stem=False)[0]):
        stem = STEMMER.stemWord(word)
        if df[stem] and stem not in seen:
            seen[stem] = (df[stem], position, word)
    chosen = sorted(seen.values())[:n]
    return [word for _, _, word in sorted(chosen, key=lambda c: c[1])]


# Metrics ######################################################################


def dcg(ranked, relevant, k=K):
    """Discounted cumulative gain of the first k results, binary gains: a
    relevant result at rank r adds 1 / log2(r + 1)."""
    return sum(1 / math.log2(rank + 1) for rank, doc in enumerate(ranked[:k], start=1) if doc in relevant)


def ndcg(ranked, relevant, k=K):
    """nDCG@k: the ranking's DCG divided by that of an ideal ranking, which puts
    min(k, number of relevant documents) relevant documents first."""
    ideal = sum(1 / math.log2(rank + 1) for rank in range(1, min(k, len(relevant)) + 1))
    return dcg(ranked, relevant, k) / ideal if ideal else 0.0


def precision(ranked, relevant, k=K):
    """P@k: the share of the first k places that hold a relevant document
    (a short list loses the empty places)."""
    return sum(doc in relevant for doc in ranked[:k]) / k


def reciprocal_rank(ranked, relevant, k=K):
    """1 / the rank of the first relevant result in the first k, or 0 if none."""
    return next((1 / rank for rank, doc in enumerate(ranked[:k], start=1) if doc in relevant), 0.0)


def evaluate(rankings, judgments, k=K):
    """Return the means of nDCG@k, P@k and reciprocal rank, and the share of
    questions with no result, over the questions in judgments; rankings maps a
    question id to its ranked document ids (missing or empty: no result)."""
    runs = [(rankings.get(q) or [], relevant) for q, relevant in judgments.items()]
    return {
        "ndcg": sum(ndcg(r, rel, k) for r, rel in runs) / len(runs),
        "precision": sum(precision(r, rel, k) for r, rel in runs) / len(runs),
        "mrr": sum(reciprocal_rank(r, rel, k) for r, rel in runs) / len(runs),
        "no_result": sum(not r for r, _ in runs) / len(runs),
        "questions": len(runs),
    }


# The anchor: BM25 #############################################################


class BM25Anchor:
    """BM25 over the documents' title + abstract: bm25s 0.3.16 with its default
    method ("lucene" idf and scoring), k1=1.2, b=0.75, English stop words and
    the Snowball English stemmer."""

    def __init__(self, doc_ids, texts):
        self.doc_ids = list(doc_ids)
        self.retriever = bm25s.BM25(k1=1.2, b=0.75, method="lucene")
        self.retriever.index(bm25s.tokenize(list(texts), stopwords="en", stemmer=STEMMER, show_progress=False))

    def search(self, text, k=K):
        """Return the ids of the top k documents with a score above 0 (bm25s
        fills its k places with zero-score documents when fewer match)."""
        tokens = [t for t in tokenize([text])[0] if t in self.retriever.vocab_dict]
        if not tokens:
            return []
        found, scores = self.retriever.retrieve([tokens], k=k, show_progress=False)
        return [self.doc_ids[i] for i, score in zip(found[0], scores[0]) if score > 0]


# Our app, over HTTP ###########################################################


def bench_run():
    """Return bench/run.py as a module, for its server helpers. Imported on
    use, so the metrics above load without the app, and run.py may import them."""
    sys.path.insert(0, str(BENCH))
    import run

    return run


def import_pages(url, pages_file):
    """Load pages_file with `python app.py import` into url; return (pages
    loaded, {line number: why it was skipped}) read from its output."""
    env = {**os.environ, "DATABASE_URL": url}
    done = subprocess.run(
        [sys.executable, str(ROOT / "app.py"), "import", str(pages_file)], env=env, capture_output=True, text=True
    )
    output = done.stdout + done.stderr
    summary = re.search(r"^pages: inserted ([\d,]+), updated ([\d,]+), unchanged ([\d,]+)", output, re.MULTILINE)
    if done.returncode != 0 or not summary:
        raise SystemExit(f"relevance: the import failed (exit {done.returncode}):\n{output[-3000:]}")
    loaded = sum(int(n.replace(",", "")) for n in summary.groups())
    skipped = {int(m[1]): m[2] for m in re.finditer(r"^skipped line (\d+): (.*)$", output, re.MULTILINE)}
    return loaded, skipped


def search_our_app(port, q):
    """Return (HTTP status, ranked CISI ids) of page 1 of GET /api/search for q."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/search?" + urlencode({"q": q, "language": "en"}),
        headers={"Accept": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # nosec B310
            return response.status, [doc_id_from_url(hit["url"]) for hit in json.load(response)["data"]]
    except urllib.error.HTTPError as exc:
        return exc.code, []


def ask_our_app(pages_file, questions):
    """Import pages_file into a fresh database, serve the app on it, and ask it
    every question; return (pages loaded, skipped lines, {form: {question id:
    (status, ranked ids)}}). Stops the app and drops the database after."""
    run = bench_run()
    server_url, stop_server = run.start_server()
    name = "whoknows_relevance"
    try:
        url = run.fresh_database(server_url, name)
        try:
            log("importing the collection with `python app.py import`")
            loaded, skipped = import_pages(url, pages_file)
            port = run.free_port()
            server = run.serve(url, port)
            try:
                log(f"asking {sum(map(len, questions.values()))} questions through /api/search")
                answers = {
                    form: {q: search_our_app(port, text) for q, text in asked.items()}
                    for form, asked in questions.items()
                }
            finally:
                server.terminate()
                server.wait(30)
        finally:
            with psycopg.connect(server_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        stop_server()
    return loaded, skipped, answers


# Report #######################################################################


def table(results):
    """Return the figures as a Markdown table: one row per system and form."""
    lines = [
        "| system | form | nDCG@10 | P@10 | MRR | no result | questions asked |",
        "|---|---|---|---|---|---|---|",
    ]
    for (system, form), m in results.items():
        lines.append(
            f"| {system} | {form} | {m['ndcg']:.3f} | {m['precision']:.3f} | {m['mrr']:.3f} | "
            f"{m['no_result']:.0%} | {m['questions']} |"
        )
    return "\n".join(lines)


def counted(counter):
    """Return 'a × 3, b × 1' for a Counter, most common first."""
    return ", ".join(f"{key} × {n}" for key, n in counter.most_common()) or "none"


def load_collection(folder):
    """Return (documents, questions, judgments) of the CISI files in folder;
    judgments only for questions that exist, in question order."""
    documents = parse_records((folder / "CISI.ALL").read_text(encoding="utf-8"))
    questions = parse_records((folder / "CISI.QRY").read_text(encoding="utf-8"))
    judgments = parse_judgments((folder / "CISI.REL").read_text(encoding="utf-8"))
    return documents, questions, {q: judgments[q] for q in sorted(judgments) if q in questions}


def compare(bm25, answers, judgments):
    """Return ({(system, form): figures}, report lines) from BM25's rankings and
    our app's (status, ranking) answers, per form and question."""
    results, notes = {}, []
    for form in FORMS:
        ours = {q: ranked for q, (_, ranked) in answers[form].items()}
        results["BM25 (bm25s)", form] = evaluate(bm25[form], judgments)
        results["ours (/api/search)", form] = evaluate(ours, judgments)
        statuses = collections.Counter(status for status, _ in answers[form].values())
        missed = sum(1 for q, rel in judgments.items() if set(bm25[form][q][:K]) & rel and not ours[q])
        notes += [
            f"- {form}: /api/search answered {counted(statuses)}",
            f"- {form}: BM25 has a relevant document in its top {K} but ours returns nothing: {missed} questions",
        ]
    return results, notes


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cisi", type=Path, default=CISI, help=f"the collection's folder (default {CISI})")
    args = parser.parse_args()
    if not (args.cisi / "CISI.ALL").is_file():
        raise SystemExit(f"relevance: no CISI collection in {args.cisi} (CISI.ALL, CISI.QRY, CISI.REL); see --cisi")
    started = time.monotonic()
    documents, all_questions, judgments = load_collection(args.cisi)
    doc_ids = sorted(documents)
    texts = [indexed_text(documents[d]) for d in doc_ids]
    df = document_frequencies(texts)
    questions = {
        "full question": {q: collapse(all_questions[q].get("W", "")) for q in judgments},
        "3 rarest words": {q: " ".join(rarest_words(all_questions[q].get("W", ""), df)) for q in judgments},
    }

    (BENCH / "data").mkdir(exist_ok=True)
    pages_file = BENCH / "data" / "cisi.jsonl"
    records = [page_record(d, documents[d]) for d in doc_ids]
    pages_file.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")

    anchor = BM25Anchor(doc_ids, texts)
    bm25 = {form: {q: anchor.search(text) for q, text in asked.items()} for form, asked in questions.items()}
    loaded, skipped, answers = ask_our_app(pages_file, questions)
    results, notes = compare(bm25, answers, judgments)
    seconds = time.monotonic() - started

    # What the import lost (skipped line n is document doc_ids[n - 1]), and the titles behind it.
    lost = {doc_ids[line - 1] for line in skipped if 0 < line <= len(doc_ids)}
    lost_judged = sum(len(rel & lost) for rel in judgments.values())
    reasons = collections.Counter(re.sub(r" \(.*\)$|'.*'|\".*\"", "…", why) for why in skipped.values())
    titles = collections.Counter(r["title"] for r in records)
    shared_titles = {t: n for t, n in titles.items() if n > 1}
    untitled = sum(not collapse(documents[d].get("T", "")) for d in doc_ids)

    stamp = dt.datetime.now().strftime("%Y-%m-%dT%H%M")
    published = "; ".join(f"{form} {n:.3f} / {p:.3f}" for form, (n, p) in PUBLISHED.items())
    command = " ".join(["make relevance", *([f"RELEVANCE_ARGS='{' '.join(sys.argv[1:])}'"] if sys.argv[1:] else [])])
    lines = [
        f"# Relevance benchmark, CISI ({stamp})",
        "",
        f"Command: `{command}` ({seconds:.0f} s). {len(judgments)} judged questions of {len(all_questions)}, "
        f"{len(documents):,} documents; page 1 of each system (top {K}).",
        "",
        table(results),
        "",
        f"- published BM25 reference (nDCG@10 / P@10): {published}",
        f"- BM25: bm25s {bm25s.__version__}, method lucene, k1=1.2, b=0.75, English stop words, "
        "Snowball English stemmer (PyStemmer), title + abstract",
        *notes,
        f"- import: {loaded:,} of {len(documents):,} documents loaded; skipped: {counted(reasons)}",
        f"- lost in the import: {len(lost)} documents, {lost_judged} of the {sum(map(len, judgments.values())):,} "
        f"judgments of relevance point at them",
        f"- titles: {len(shared_titles)} titles shared by {sum(shared_titles.values())} documents; "
        f"{untitled} empty (sent as 'Untitled')",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    out = BENCH / "results" / f"relevance-{stamp}.md"
    out.write_text(report, encoding="utf-8")
    log(f"written to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
