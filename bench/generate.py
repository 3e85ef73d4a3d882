"""Generate a deterministic synthetic corpus (and query mix) to benchmark ¿Who Knows?.

Usage:
    python bench/generate.py N OUT.jsonl [--seed 1] [--queries QUERIES.txt] [--requests R] [--jobs J]
    python app.py import OUT.jsonl

Writes N pages as JSON Lines for `app.py import`: every fourth page Danish, the
rest English, each with 1,000-10,000 characters of sentences. Words follow a
Zipf-like distribution (weight ~ 1/rank^1.07) over real words, stop words first,
then 50,000 pronounceable pseudo-words per language. Some collocations ("climate
change") occur as phrases, and every page names one rare four-syllable name from
a pool sized so that each name occurs in about five pages, whatever N is. Titles
and urls are unique; last_updated spreads over 2015-2026. The same N and seed
always give the same bytes, whatever --jobs is (the vocabulary is fixed; the
seed only varies the pages). Chunks of pages are generated in J processes.

With --queries, also writes R lines (default 10000) of `language<TAB>query` in
shuffled order: 60% occur only once (the long tail), the rest repeat about 50
popular queries. Partial words (2-4 letters of a common stem) and pairs of
common words occur in both languages, among the popular queries and in the
tail. QUERIES.txt.kinds names one popular query per kind (common, rare,
two_words, phrase, danish, partial, short_partial, danish_pair,
danish_partial, two_letters) as `kind<TAB>language<TAB>query`, so a benchmark
can time each kind. A summary line goes to stderr. Standard library only.
"""

import argparse
import math
import multiprocessing
import os
import random
import sys
import time
from array import array
from datetime import UTC, datetime, timedelta, timezone
from itertools import accumulate
from operator import itemgetter
from pathlib import Path
from urllib.parse import quote

ZIPF_EXPONENT = 1.07
PSEUDO_WORDS = 50_000  # synthetic tail words per language
HEAD_WORDS = 1000  # the most frequent words, sampled from a small cache-friendly table
HEAD_SLOTS, TAIL_SLOTS = 1 << 16, 1 << 20  # enough for even the rarest word to get a few slots
TAIL = " %s"  # head slot standing for a word drawn from the tail table
SENTENCE_EVERY = 14  # one slot in 14 starts a new sentence
COMMA_EVERY = 17  # one slot in 17 follows a comma
PHRASE_EVERY = 1009  # one slot in 1009 holds a collocation
PAGES_PER_NAME = 5  # each rare name occurs in about this many pages
CHUNK = 1000  # pages per unit of parallel work; the output does not depend on --jobs
LENGTH_MEDIAN, LENGTH_SIGMA = 3000, 0.55  # log-normal target length in characters
LENGTH_MIN, LENGTH_MAX = 1500, 10_000  # targets; the text ends at a sentence in the last quarter
KIND_RANKS = {  # places among the popular queries
    "common": 0,
    "two_words": 2,
    "phrase": 4,
    "danish": 6,
    "partial": 8,
    "rare": 10,
    "short_partial": 12,
    "danish_pair": 14,
    "danish_partial": 16,
    "two_letters": 18,
}
COMMON_WORDS = 100  # pairs of common words come from the first 100 content words
PARTIAL_STEMS = 300  # partial words are 2-4 letters of one of the first 300
DATE_START = datetime(2015, 1, 1, tzinfo=UTC)
DATE_SPAN = int((datetime(2026, 10, 1, tzinfo=UTC) - DATE_START).total_seconds())
TAIL_MASK = bytes(b & 0x0F for b in range(256))  # keeps 4 bits of a third byte: 20-bit tail indices

EN_STOP = """the of and to a in is that for it as was with be by on not he i this are or his from at which
but have an they you were her she there one all we their has been had its if more when will would who so no
him my them what can out up about into than only other some could these then do any like over also may most
such after how where our even well those both through just your much very should being before because
between each under while against without during since upon around here why again off own still must might
too yet"""
EN_WORDS = """time people year way day world life work government city history water school family country
system number part place music house information development state company team program power group research
health community book language science church market river island village century nature museum station
garden library harbor lantern quantum forest mountain ocean bridge castle energy network theory weather
summer winter season story letter engine picture film game player record paper space ground event matter
center project activity industry street image data practice piece land product doctor patient worker news
technology computer attention evidence population organization education experience relationship difference
building society position member president leader police office door morning reason teacher student child
woman man friend father mother son daughter model value action plan policy process field effort rate heart
voice light mind price report decision view road town art war party result change level face body name idea
law car home room area money fact month week night point word business issue side kind head service hand eye
job question problem case good great small large long little old big high different important public able
bad local social national political human early young federal economic real best sure free military true
whole clear full special easy strong possible late hard major better certain personal open red white black
green blue north south east west make know take see come think look want give use find tell ask seem feel
try leave call keep let begin help talk turn start show hear play run move live believe hold bring happen
write provide sit stand lose pay meet include continue set learn lead understand watch follow stop create
speak read allow add spend grow offer remember love consider appear buy wait serve die send expect build
stay fall cut reach remain suggest raise pass sell require decide explain hope develop carry break receive
agree support hit produce eat cover catch draw choose international environment temperature university
agriculture architecture electricity mathematics philosophy literature democracy parliament republic kingdom
railway airport hospital"""
EN_PHRASES = [
    "climate change",
    "prime minister",
    "united states",
    "world war",
    "new york",
    "human rights",
    "public health",
    "high school",
    "real estate",
    "machine learning",
]
DA_STOP = """og i at det en den til er som på de med han af for ikke der var mig sig men et har om vi min
havde ham hun nu over da fra du ud sin dem os op man hans hvor eller hvad skal selv her alle vil blev kunne
ind når være dog noget ville jo deres efter ned skulle denne end dette mit også under have dig anden hende
mine alt meget sit sine vor mod disse hvis din nogle hos blive mange ad bliver hendes været thi jer sådan"""
DA_WORDS = """år tid dag mand kvinde barn børn land by hus vej verden liv del sted arbejde skole familie
uge måned aften morgen nat vand mad penge bog side ord spørgsmål problem samfund regering kommune virksomhed
historie musik kunst sprog videnskab natur skov sø hav strand ø bjerg mark have blomst træ fugl hund kat
hest ko fisk brød øl kaffe mælk smør ost æble pære jordbær kartoffel grøntsag køkken stue værelse dør vindue
tag gade plads kirke slot museum bibliotek station tog bil cykel båd fly rejse ferie sommer vinter forår
efterår vejr regn sne sol måne stjerne himmel jord luft ild lys mørke farve rød grøn blå gul hvid sort stor
lille lang kort ny gammel god dårlig høj lav glad ked smuk varm kold hurtig langsom svær let rigtig forkert
første sidste næste få hele halv sjov dejlig hyggelig vigtig mulig nødvendig særlig offentlig økonomisk
politisk dansk europæisk københavn aarhus odense aalborg danmark jylland fyn sjælland bornholm grønland
færøerne møde aftale beslutning løsning udvikling forskning uddannelse sundhed sygehus læge sygeplejerske
lærer elev studerende minister folketing valg parti lov ret dom politi ulykke krig fred frihed kærlighed
venskab glæde sorg frygt håb drøm tanke følelse øje øre næse mund hånd fod ben arm hoved hjerte krop hår
tand skulder ryg mave gøre sige gå komme se give tage finde tænke vide kende ønske høre spørge svare læse
skrive spise drikke sove købe sælge betale åbne lukke begynde slutte lege synge danse løbe køre flyve svømme
bo leve dø vokse lære forstå glemme huske elske hjælpe bruge prøve vælge bestemme fortælle kongerige
grundlov søndag lørdag fødselsdag julemand påske kirkegård havn fjord"""
DA_PHRASES = ["danske bank", "aarhus universitet", "københavns kommune", "det kongelige teater", "region hovedstaden"]


class Language:
    """Vocabulary, sampling tables and syllables of one language."""

    def __init__(self, code, share, stop, words, phrases, onsets, vowels, codas, utc_offset):
        """Build the vocabulary and the sampling tables (deterministic, independent of the seed)."""
        self.code, self.share, self.phrases = code, share, phrases
        self.timezone = timezone(timedelta(hours=utc_offset))
        stop_words = list(dict.fromkeys(stop.split()))
        self.content = [w for w in dict.fromkeys(words.split()) if w not in stop_words]
        self.syllables = [o + v for o in onsets.split() for v in vowels.split()]
        real = stop_words + self.content
        self.pseudo = pseudo_words(random.Random(f"vocabulary/{code}"), self.syllables, codas.split(","), real)
        vocab = real + self.pseudo
        if any(c in '"\\%' or c < " " for c in "".join(vocab + phrases)):
            raise ValueError(f"{code} words must not need escaping in JSON or %-formatting")
        weights = [rank**-ZIPF_EXPONENT for rank in range(1, len(vocab) + 1)]
        self.head = punctuate(
            zipf_slots(
                [" " + w for w in vocab[:HEAD_WORDS]] + [TAIL],
                weights[:HEAD_WORDS] + [sum(weights[HEAD_WORDS:])],
                HEAD_SLOTS,
            ),
            phrases,
        )
        self.tail = zipf_slots(vocab[HEAD_WORDS:], weights[HEAD_WORDS:], TAIL_SLOTS)
        self.title_words = self.content + self.pseudo[: len(self.content)]
        # Mean characters per token; each "%s" placeholder becomes a tail word.
        head_length = sum(len(slot.replace("%s", "")) for slot in self.head) / len(self.head)
        tail_length = sum(map(len, self.tail)) / len(self.tail)
        self.token_length = head_length + sum("%s" in slot for slot in self.head) / len(self.head) * tail_length

    def name(self, index):
        """Return rare name number index: four syllables, one distinct name per index."""
        base = len(self.syllables)
        value = (index + 1) * 2_654_435_761 % base**4  # a prime multiplier makes this a bijection
        parts = []
        for _ in range(4):
            value, digit = divmod(value, base)
            parts.append(self.syllables[digit])
        return "".join(parts).capitalize()

    def pool_size(self, pages):
        """Return how many rare names N pages share, so each occurs in about PAGES_PER_NAME pages."""
        return max(1, round(pages * self.share / PAGES_PER_NAME))

    def tokens(self, rng, count):
        """Return count tokens, each with its leading space or punctuation, as one string."""
        slots = array("H", rng.randbytes(2 * count))
        if sys.byteorder == "big":
            slots.byteswap()
        template = "".join(itemgetter(*slots)(self.head))
        holes = template.count("%")
        return template % itemgetter(*tail_indices(rng, holes + 2))(self.tail)[:holes]  # 2+ items: a tuple


def tail_indices(rng, count):
    """Return count random indices into a tail table, from three random bytes each."""
    raw = rng.randbytes(3 * count)
    buffer = bytearray(4 * count)
    buffer[0::4], buffer[1::4], buffer[2::4] = raw[0::3], raw[1::3], raw[2::3].translate(TAIL_MASK)
    indices = array("I", buffer)
    if sys.byteorder == "big":
        indices.byteswap()
    return indices


def pseudo_words(rng, syllables, codas, taken):
    """Return PSEUDO_WORDS new words of two or three syllables and an optional coda."""
    seen, words = set(taken), []
    while len(words) < PSEUDO_WORDS:
        word = "".join(rng.choices(syllables, k=rng.choice((2, 2, 3)))) + rng.choice(codas)
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def zipf_slots(tokens, weights, size):
    """Return size slots, each token filling a share of them proportional to its weight."""
    cumulative = list(accumulate(weights))
    slots, filled = [], 0
    for token, total in zip(tokens, cumulative):
        end = round(total / cumulative[-1] * size)
        slots += [token] * (end - filled)
        filled = end
    return slots


def punctuate(slots, phrases):
    """Return the head slots, changed in place to add commas, sentence starts and collocations."""
    for i in range(0, len(slots), COMMA_EVERY):
        slots[i] = sys.intern("," + slots[i])  # shared strings stay in cache
    for i in range(SENTENCE_EVERY // 2, len(slots), SENTENCE_EVERY):
        if TAIL not in slots[i]:
            ending = "?" if i % 19 == 0 else "!" if i % 23 == 0 else "."
            slots[i] = sys.intern(ending + slots[i].lstrip(",").title())
    for i in range(3, len(slots), PHRASE_EVERY):
        slots[i] = " " + phrases[i // PHRASE_EVERY % len(phrases)]
    return slots


EN = Language(
    "en",
    0.75,
    EN_STOP,
    EN_WORDS,
    EN_PHRASES,
    "b bl br c ch cl d dr f fl g gr h j k l m n p pl r s sh st t th tr v w z",
    "a e i o u ai ea oo",
    ",,,n,r,l,s,t,nd,st,ng,m,ck",
    0,
)
DA = Language(
    "da",
    0.25,
    DA_STOP,
    DA_WORDS,
    DA_PHRASES,
    "b bl br d dr f fl fr g gl gr h j k kl kr l m n p r s sk sl sn sp st sv t tr v",
    "a e i o u y æ ø å ej øj",
    ",,,n,r,l,s,t,nd,ng,rt,ld,st,k",
    1,
)


def page_text(rng, lang, length, name):
    """Return sentences of at most `length` characters mentioning `name` in the first half."""
    text = lang.tokens(rng, int(length * 1.05 / lang.token_length) + 20)
    at = text.find(" ", rng.randrange(length // 2))
    text = f"{text[:at]} {name}{text[at:]}"
    cut = text.rfind(". ", length * 3 // 4, length)  # end at a sentence in the last quarter,
    if cut < 0:
        cut = text.rfind(" ", 0, length)  # or else between words
    text = text[:cut].strip(" ,.?!")
    return text[:1].upper() + text[1:] + "."


def page_chunk(task):
    """Return pages start..stop as UTF-8 JSON Lines; each chunk has its own generator."""
    start, stop, pages, seed = task
    rng = random.Random(f"{seed}/{start}")
    modulus = 10 ** max(5, len(str(pages)))  # 7919 * i mod 10^k is unique for i < 10^k
    lines = []
    for i in range(start, stop):
        # Every fourth page is Danish, so the k-th page of a language is known without counting.
        lang, k = (DA, i // 4) if i % 4 == 3 else (EN, i - i // 4)
        number = (7919 * i + 104_729 * seed) % modulus
        words = [w.capitalize() for w in rng.choices(lang.title_words, k=rng.randint(2, 4))]
        length = round(rng.lognormvariate(math.log(LENGTH_MEDIAN), LENGTH_SIGMA))
        updated = DATE_START + timedelta(seconds=rng.randrange(DATE_SPAN))
        title = f"{' '.join(words)} {number}"
        url = f"https://{lang.code}.bench.example/wiki/{number}-{quote('-'.join(words).lower())}"
        stamp = updated.astimezone(lang.timezone).isoformat()
        name = lang.name(k % lang.pool_size(pages))
        content = page_text(rng, lang, min(LENGTH_MAX, max(LENGTH_MIN, length)), name)
        # Language() made sure no word needs escaping in JSON, so plain formatting is valid JSON.
        lines.append(
            f'{{"title": "{title}", "url": "{url}", "language": "{lang.code}", '
            f'"last_updated": "{stamp}", "content": "{content}"}}'
        )
    lines.append("")
    return "\n".join(lines).encode()


def write_pages(path, pages, seed, jobs):
    """Write the pages as JSON Lines, generating chunks in parallel but writing them in order."""
    tasks = [(start, min(start + CHUNK, pages), pages, seed) for start in range(0, pages, CHUNK)]
    with open(path, "wb") as out, multiprocessing.Pool(jobs) as pool:
        for data in pool.imap(page_chunk, tasks):
            out.write(data)


def popular_queries():
    """Return the kinds as (kind, language, query) and about 50 popular (language, query) pairs."""
    kinds = [
        ("common", "en", EN.content[0]),
        ("rare", "en", EN.name(0).lower()),
        ("two_words", "en", f"{EN.content[1]} {EN.content[3]}"),
        ("phrase", "en", f'"{EN.phrases[0]}"'),
        ("danish", "da", next(w for w in DA.content if set(w) & set("æøå"))),
        ("partial", "en", next(w for w in EN.content if len(w) >= 9)[:5]),
        ("short_partial", "en", next(w for w in EN.content if len(w) >= 7)[:4]),
        ("danish_pair", "da", f"{DA.content[0]} {DA.content[2]}"),
        ("danish_partial", "da", next(w for w in DA.content if len(w) >= 7)[:4]),
        ("two_letters", "en", EN.content[5][:2]),
    ]
    others = [("en", w) for w in EN.content[1:26]] + [("da", w) for w in DA.content[:12]]
    others += [("en", f"{a} {b}") for a, b in zip(EN.content[30:36], EN.content[40:46])]
    others += [("en", f'"{p}"') for p in EN.phrases[1:3]]
    others += [(lang.code, w[:n]) for lang in (EN, DA) for n, w in zip((2, 3, 4), lang.content[10:13])]
    others += [("da", f"{a} {b}") for a, b in zip(DA.content[3:6], DA.content[7:10])]
    taken = {(lang, query) for _, lang, query in kinds}
    popular = [pair for pair in dict.fromkeys(others) if pair not in taken]
    for kind, lang, query in sorted(kinds, key=lambda row: KIND_RANKS[row[0]]):
        popular.insert(KIND_RANKS[kind], (lang, query))
    return kinds, popular


def tail_queries(rng, count, pages, taken):
    """Return count distinct (language, query) pairs from the long tail, none of them in taken."""
    seen, queries = set(taken), []
    while len(queries) < count:
        lang = EN if rng.random() < EN.share else DA
        roll = rng.random()
        if roll < 0.12:  # a partial word: 2-4 letters of a common stem
            query = rng.choice(lang.content[:PARTIAL_STEMS])[: rng.randint(2, 4)]
        elif roll < 0.22:  # two common words
            query = " ".join(rng.sample(lang.content[:COMMON_WORDS], 2))
        elif roll < 0.50:
            query = f"{rng.choice(lang.content)} {rng.choice(lang.pseudo)}"
        elif roll < 0.85:
            query = rng.choice(lang.pseudo)
        else:
            query = lang.name(rng.randrange(lang.pool_size(pages))).lower()
        if (lang.code, query) not in seen:
            seen.add((lang.code, query))
            queries.append((lang.code, query))
    return queries


def write_queries(path, requests, pages, seed):
    """Write the shuffled query mix and its .kinds sidecar."""
    rng = random.Random(f"queries/{seed}")
    kinds, popular = popular_queries()
    once = math.ceil(requests * 0.6)
    head = popular[: (requests - once) // 2]  # every popular query occurs at least twice
    counts = [2] * len(head)
    for index in rng.choices(
        range(len(head)), weights=[1 / r for r in range(1, len(head) + 1)], k=requests - once - 2 * len(head)
    ):
        counts[index] += 1
    lines = [pair for pair, count in zip(head, counts) for _ in range(count)]
    lines += tail_queries(rng, requests - len(lines), pages, popular)
    rng.shuffle(lines)
    Path(path).write_text("".join(f"{lang}\t{query}\n" for lang, query in lines), encoding="utf-8", newline="\n")
    Path(f"{path}.kinds").write_text(
        "".join(f"{kind}\t{lang}\t{query}\n" for kind, lang, query in kinds), encoding="utf-8", newline="\n"
    )


def main(argv=None):
    """Parse the command line, write the files and print a summary to stderr."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pages", type=int, metavar="N", help="number of pages to write")
    parser.add_argument("out", metavar="OUT.jsonl", help="JSON Lines file to write")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument("--queries", metavar="QUERIES.txt", help="also write a query mix here")
    parser.add_argument("--requests", type=int, default=10_000, metavar="R", help="query lines (default 10000)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="worker processes (default: all CPUs)")
    args = parser.parse_args(argv)
    if args.pages < 1:
        parser.error("N must be at least 1")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if args.requests < 60:
        parser.error("R must be at least 60, so that every query kind repeats")
    for path in (args.out, args.queries):
        if path:
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                parser.error(f"cannot create the folder for {path}: {exc.strerror}")
    started = time.perf_counter()
    write_pages(args.out, args.pages, args.seed, args.jobs)
    summary = f"wrote {args.pages:,} pages ({Path(args.out).stat().st_size:,} bytes) to {args.out}"
    if args.queries:
        write_queries(args.queries, args.requests, args.pages, args.seed)
        summary += f" and {args.requests:,} queries to {args.queries}"
    seconds = time.perf_counter() - started
    print(f"{summary} in {seconds:.1f}s ({args.pages / seconds:,.0f} pages/s)", file=sys.stderr)


if __name__ == "__main__":
    main()
