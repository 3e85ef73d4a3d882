"""¿Who Knows? crawler — fetches web pages into the index, politely, from a frontier in PostgreSQL.

Sections, in the order a URL travels through them:

  URLs          normalising links, the crawl's scope
  Safety        connections that refuse private addresses, checked at connect time
  Fetching      one GET: timeouts, body cap, gzip, redirects, conditional headers
  Robots        robots.txt per site, cached in PostgreSQL, and its Crawl-delay
  Extraction    title, main text, canonical link, language, links, meta robots
  Outcomes      what a fetch means for the frontier and the index
  Frontier      claims under a lease, one request at a time per host, limits
  Indexing      batched upserts through app.import_pages, so search sees them
  Crawl         worker threads, the progress line, the counts at the end
  Command line  flags, --status, and main()

Run `python crawler.py --help` (or `python app.py crawl --help`). Every crawler
process shares the frontier in PostgreSQL (migrations/0009), so more processes,
on any machine, crawl faster without fetching a URL twice. docs/crawling.md
explains the design.
"""

import argparse
import codecs
import contextlib
import dataclasses
import hashlib
import http.client
import io
import ipaddress
import logging
import re
import socket
import ssl
import sys
import threading
import time
import zlib
from urllib.parse import quote, urljoin, urlsplit, urlunsplit
from urllib.robotparser import RobotFileParser

import lxml.etree
import lxml.html
import psycopg
import py3langid

import app as whoknows
from app import sql

log = logging.getLogger("whoknows.crawler")

MAX_BODY_BYTES = 2 * 1024 * 1024  # a page larger than this is skipped, not truncated
MAX_REDIRECTS = 5
MAX_ATTEMPTS = 3  # a URL that fails with a 5xx or a timeout this often is given up
ROBOTS_SECONDS = 24 * 3600  # how long a fetched robots.txt is trusted
MAX_ROBOTS_DELAY = 60.0  # a larger Crawl-delay is capped: one page a minute is the least we ask for
BATCH_PAGES = 20  # pages written to the index together...
BATCH_SECONDS = 2.0  # ...or after this long, whichever comes first
# While one batch is written (the index work takes most of the time), the
# next grows; workers wait for the writer only beyond MAX_WAITING outcomes.
MAX_WAITING = 500
PROGRESS_SECONDS = 5.0
IDLE_FLUSH_SECONDS = 0.5  # a worker with nothing to claim for this long writes the batch at once
HTML_TYPES = {"text/html", "application/xhtml+xml"}
TEXT_TYPES = {"text/plain"}


class CrawlError(Exception):
    """Bad input to the crawler: one line on stderr, exit status 2."""


# URLs #########################################################################

# Characters left as they are when a URL is re-quoted: the reserved ones and %.
URL_SAFE = "/?#[]@!$&'()*+,;=:%~-._"


def normalise(url, base=None):
    """Return url (resolved against base) in canonical form — http(s) only,
    scheme and host in lower case, default port and fragment dropped, unsafe
    characters quoted — or None when it is not a crawlable URL."""
    url = (url or "").strip()
    if base is not None:
        try:
            url = urljoin(base, url)
        except ValueError:
            return None
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme, host = parts.scheme.lower(), (parts.hostname or "").rstrip(".")
    if scheme not in ("http", "https") or not host or parts.username or parts.password:
        return None
    try:
        host = host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return None
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    if port is not None and port != {"http": 80, "https": 443}[scheme]:
        host = f"{host}:{port}"
    path = quote(parts.path or "/", safe=URL_SAFE)
    query = quote(parts.query, safe=URL_SAFE)
    return urlunsplit((scheme, host, path, query, ""))


def host_key(url):
    """Return the politeness key of a normalised url: host[:port]."""
    return urlsplit(url).netloc


def origin(url):
    """Return scheme://host[:port] of a normalised url: where its robots.txt lives."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def hostname(url):
    """Return the host name of a normalised url, without port."""
    return (urlsplit(url).hostname or "").lower()


@dataclasses.dataclass(frozen=True)
class Scope:
    """Which hosts a crawl may enter: the named ones, or any under a domain suffix."""

    hosts: frozenset
    domain: str | None = None

    def allows(self, url):
        """True when url's host is in scope."""
        name = hostname(url)
        if name in self.hosts:
            return True
        return bool(self.domain) and (name == self.domain or name.endswith("." + self.domain))


# Safety #######################################################################


class RefusedAddress(Exception):
    """A host resolved to an address the crawler may not contact."""


def forbidden_kind(address):
    """Return why an IP address may not be crawled ('loopback', 'private', ...), or None."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    for kind, flag in (
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("reserved", ip.is_reserved or ip.is_unspecified),
        ("private", ip.is_private),
        ("non-public", not ip.is_global),
    ):
        if flag:
            return kind
    return None


def connect_checked(host, port, timeout, allow_private):
    """Resolve host, refuse it if any address is forbidden (unless
    allow_private), and return a socket connected to one of the checked
    addresses. Checking what we connect to, not what a name resolved to
    earlier, is what keeps DNS rebinding out."""
    infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    if not allow_private:
        for *_, sockaddr in infos:
            kind = forbidden_kind(sockaddr[0])
            if kind:
                raise RefusedAddress(f"{host} resolves to {sockaddr[0]}, a {kind} address (see --allow-private)")
    error = OSError(f"no address for {host}")
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        sock.settimeout(timeout)
        try:
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    raise error


class GuardedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection that connects only to checked addresses."""

    def __init__(self, host, port, *, timeouts, allow_private):
        super().__init__(host, port, timeout=timeouts.read)
        self.timeouts, self.allow_private = timeouts, allow_private

    def connect(self):
        self.sock = connect_checked(self.host, self.port, self.timeouts.connect, self.allow_private)
        self.sock.settimeout(self.timeouts.read)


class GuardedHTTPSConnection(http.client.HTTPSConnection):
    """An HTTPS connection that connects only to checked addresses."""

    def __init__(self, host, port, *, timeouts, allow_private):
        super().__init__(host, port, timeout=timeouts.read, context=ssl.create_default_context())
        self.timeouts, self.allow_private = timeouts, allow_private

    def connect(self):
        sock = connect_checked(self.host, self.port, self.timeouts.connect, self.allow_private)
        sock.settimeout(self.timeouts.read)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host.strip("[]"))


# Fetching #####################################################################


@dataclasses.dataclass(frozen=True)
class Timeouts:
    """Seconds for connecting, for each read, and for a whole request."""

    connect: float
    read: float
    total: float


class FetchError(Exception):
    """A fetch that failed; transient ones (5xx, timeouts, resets) are retried."""

    def __init__(self, reason, transient=False, status=None):
        super().__init__(reason)
        self.reason, self.transient, self.status = reason, transient, status


class TooLarge(Exception):
    """A body over MAX_BODY_BYTES."""


@dataclasses.dataclass
class Response:
    """One HTTP answer: where it came from (after same-host redirects), its
    status and headers, and its body (read only for pages we index)."""

    url: str
    status: int
    headers: http.client.HTTPMessage
    body: bytes = b""
    redirects: tuple = ()

    def media_type(self):
        """Return the Content-Type without parameters, lower case."""
        return (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()


class Fetcher:
    """Makes GET requests as the crawler: its User-Agent, timeouts and address checks."""

    def __init__(self, user_agent, timeouts, allow_private):
        self.user_agent, self.timeouts, self.allow_private = user_agent, timeouts, allow_private

    def get(self, url, validators=None, allowed=None, pause=0.0):
        """GET url, following at most MAX_REDIRECTS same-host redirects (each
        checked by allowed(url), pause seconds after the last request); a
        redirect to another host is returned as is. validators: (etag,
        last_modified) for a conditional GET."""
        seen, hops = {url}, []
        headers = self.conditional_headers(*(validators or (None, None)))
        while True:
            response = self.request(url, headers)
            target = redirect_target(response)
            if target is None or host_key(target) != host_key(url):
                response.redirects = tuple(hops)
                return response
            if target in seen:
                raise FetchError(f"redirect loop at {target}", status=response.status)
            if len(hops) == MAX_REDIRECTS:
                raise FetchError(f"more than {MAX_REDIRECTS} redirects", status=response.status)
            if allowed is not None and not allowed(target):
                raise FetchError(f"redirect to {target}, which robots.txt disallows", status=response.status)
            seen.add(target)
            hops.append(target)
            time.sleep(pause)  # each hop is a request to the same host: keep its delay
            url, headers = target, self.conditional_headers(None, None)

    def conditional_headers(self, etag, last_modified):
        """Return the request headers, with If-None-Match/If-Modified-Since when known."""
        headers = {
            "User-Agent": self.user_agent,
            "Accept": "text/html,application/xhtml+xml,text/plain;q=0.9,*/*;q=0.1",
            "Accept-Encoding": "gzip",
            "Connection": "close",
        }
        if etag:
            headers["If-None-Match"] = etag
        if last_modified:
            headers["If-Modified-Since"] = last_modified
        return headers

    def request(self, url, headers):
        """Make one request; return its Response (body read for a 2xx page of a
        type we index). Raise FetchError or RefusedAddress."""
        parts = urlsplit(url)
        kind = GuardedHTTPSConnection if parts.scheme == "https" else GuardedHTTPConnection
        conn = kind(parts.hostname, parts.port, timeouts=self.timeouts, allow_private=self.allow_private)
        deadline = time.monotonic() + self.timeouts.total
        target = urlunsplit(("", "", parts.path or "/", parts.query, ""))
        try:
            conn.request("GET", target, headers=headers)
            answer = conn.getresponse()
            response = Response(url, answer.status, answer.headers)
            if 200 <= answer.status < 300 and response.media_type() in HTML_TYPES | TEXT_TYPES:
                response.body = read_body(answer, deadline)
            return response
        except TimeoutError:
            raise FetchError("timed out", transient=True) from None
        except (OSError, http.client.HTTPException) as exc:
            raise FetchError(f"connection failed: {whoknows.one_line(exc) or type(exc).__name__}", True) from None
        finally:
            conn.close()


def redirect_target(response):
    """Return the normalised Location of a redirect response, or None if it is not one."""
    if response.status not in (301, 302, 303, 307, 308):
        return None
    location = response.headers.get("Location")
    if not location:
        return None
    target = normalise(location, base=response.url)
    if target is None:
        raise FetchError(f"redirect to a URL we do not fetch: {location[:200]}", status=response.status)
    return target


def read_body(answer, deadline):
    """Read answer's body, gunzipped, within the deadline and MAX_BODY_BYTES."""
    declared = answer.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise TooLarge()
    gzipped = (answer.headers.get("Content-Encoding") or "").strip().lower() in ("gzip", "x-gzip")
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS) if gzipped else None
    chunks, size = [], 0
    while chunk := answer.read1(65536):
        if time.monotonic() > deadline:
            raise FetchError("timed out (total)", transient=True)
        if inflater is not None:
            # Inflate no more than the cap allows: a small gzip bomb stays small.
            chunk = inflater.decompress(chunk, MAX_BODY_BYTES + 1 - size)
            if inflater.unconsumed_tail:
                raise TooLarge()
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise TooLarge()
        chunks.append(chunk)
    return b"".join(chunks)


# Robots #######################################################################


@dataclasses.dataclass
class Robots:
    """The rules of one site's robots.txt for our user agent."""

    parser: RobotFileParser | None  # None: everything is allowed
    crawl_delay: float | None = None

    def allows(self, user_agent, url):
        """True when robots.txt lets user_agent fetch url."""
        return self.parser is None or self.parser.can_fetch(user_agent, url)


def parse_robots(status, body, user_agent):
    """Return Robots from a robots.txt answer: 4xx means no rules at all."""
    if status >= 400:
        return Robots(None)
    parser = RobotFileParser()
    lines = body.splitlines()
    parser.parse(lines)
    return Robots(parser, robots_crawl_delay(lines, user_agent))


def robots_crawl_delay(lines, user_agent):
    """Return the Crawl-delay (seconds, fractions allowed) of the group that
    names our agent, else of the * group, else None. urllib's parser reads
    whole seconds only."""
    token = user_agent.split("/")[0].strip().lower()
    delays, agents, in_rules = {}, [], False
    for line in lines:
        field, _, value = line.split("#")[0].partition(":")
        field, value = field.strip().lower(), value.strip()
        if field == "user-agent":
            agents = agents if not in_rules else []
            in_rules = False
            agents.append(value.lower())
        elif field:
            in_rules = True
            if field == "crawl-delay":
                with contextlib.suppress(ValueError):
                    for agent in agents:
                        delays[agent] = min(max(float(value), 0.0), MAX_ROBOTS_DELAY)
    for agent, delay in delays.items():
        if agent != "*" and agent in token:
            return delay
    return delays.get("*")


class RobotsCache:
    """robots.txt per site: in this process, then in crawl_robots (shared by
    every crawler), then from the site itself."""

    def __init__(self, database, fetcher):
        self.database, self.fetcher = database, fetcher
        self.known = {}  # origin -> (Robots, expires at, monotonic)
        self.lock = threading.Lock()

    def get(self, url):
        """Return (Robots for url's site, whether it was fetched over the network now)."""
        site = origin(url)
        with self.lock:
            cached = self.known.get(site)
        if cached and cached[1] > time.monotonic():
            return cached[0], False
        fetched = False
        with self.database.connection() as conn:
            row = conn.execute(sql("get_crawl_robots"), {"origin": site}).fetchone()
        if row is None:
            row, fetched = self.fetch(site), True
            with self.database.connection() as conn:
                conn.execute(sql("upsert_crawl_robots"), {**row, "origin": site, "seconds": ROBOTS_SECONDS})
        robots = parse_robots(row["status"], row["body"], self.fetcher.user_agent)
        with self.lock:
            self.known[site] = (robots, time.monotonic() + ROBOTS_SECONDS)
        return robots, fetched

    def fetch(self, site):
        """Fetch site's robots.txt: {'status', 'body'}. A 5xx or no answer
        raises a transient FetchError: the site's pages wait and retry."""
        try:
            response = self.fetcher.get(site + "/robots.txt")
        except FetchError as exc:
            if exc.transient:
                raise FetchError(f"robots.txt unavailable: {exc.reason}", transient=True) from None
            return {"status": 404, "body": ""}  # a redirect loop: as good as no robots.txt
        except TooLarge:
            return {"status": 404, "body": ""}
        if response.status >= 500:
            raise FetchError(f"robots.txt unavailable: HTTP {response.status}", transient=True)
        if not 200 <= response.status < 300 or response.media_type() not in TEXT_TYPES | HTML_TYPES:
            return {"status": response.status if response.status >= 400 else 404, "body": ""}
        return {"status": response.status, "body": response.body.decode("utf-8", errors="replace")}


# Extraction ###################################################################

META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([a-zA-Z0-9_.:-]+)""", re.IGNORECASE)
# Elements that are never main text, and regions that only navigate or frame.
NEVER_TEXT = ("script", "style", "noscript", "template", "svg", "iframe", "object", "select", "button", "form")
BOILERPLATE = ("nav", "aside")
FRAME = ("header", "footer")  # boilerplate unless inside <main> or <article>
BOILERPLATE_ROLES = {"navigation", "banner", "contentinfo", "complementary", "search"}


@dataclasses.dataclass
class Extracted:
    """What a page says about itself."""

    title: str
    text: str
    language: str | None
    canonical: str | None = None
    links: list = dataclasses.field(default_factory=list)
    noindex: bool = False
    nofollow: bool = False


def decode(body, content_type):
    """Return body as text: the charset from the header, else from the
    document, else UTF-8, else windows-1252 (what browsers assume)."""
    if body.startswith(codecs.BOM_UTF8):
        return body[3:].decode("utf-8", errors="replace")
    match = re.search(r"charset\s*=\s*[\"']?([\w.:-]+)", content_type or "", re.IGNORECASE)
    charset = match.group(1) if match else None
    if charset is None and (found := META_CHARSET.search(body[:4096])):
        charset = found.group(1).decode("ascii")
    if charset:
        with contextlib.suppress(LookupError):
            return body.decode(codecs.lookup(charset).name, errors="replace")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return body.decode("windows-1252", errors="replace")


def squeeze(text):
    """Return text with runs of whitespace as single spaces."""
    return " ".join(text.split())


def parse_html(text):
    """Return the lxml document of an HTML text (an empty one if it has none)."""
    parser = lxml.html.HTMLParser(encoding="utf-8")
    try:
        return lxml.html.document_fromstring(text.encode("utf-8", errors="replace"), parser=parser)
    except (lxml.etree.ParserError, ValueError):
        return lxml.html.document_fromstring(b"<html><body></body></html>", parser=parser)


def meta_robots(doc):
    """Return the set of directives in <meta name="robots"> (noindex, nofollow, none...)."""
    directives = set()
    for meta in doc.iter("meta"):
        if (meta.get("name") or "").strip().lower() in ("robots", "whoknowsbot"):
            directives |= {d.strip().lower() for d in (meta.get("content") or "").split(",")}
    if "none" in directives:
        directives |= {"noindex", "nofollow"}
    return directives


def page_title(doc):
    """Return <title>, else og:title, else the first <h1>, else ''."""
    title = squeeze(doc.findtext(".//title") or "")
    if not title:
        og = doc.xpath("//meta[@property='og:title']/@content")
        title = squeeze(og[0]) if og else ""
    if not title:
        h1 = doc.find(".//h1")
        title = squeeze(h1.text_content()) if h1 is not None else ""
    return title


def page_links(doc, base):
    """Return the normalised http(s) links of doc in order, without rel=nofollow ones."""
    links = []
    for element in doc.iter("a", "area"):
        href = element.get("href")
        if not href or "nofollow" in (element.get("rel") or "").lower().split():
            continue
        url = normalise(href, base=base)
        if url is not None:
            links.append(url)
    return list(dict.fromkeys(links))


def canonical_link(doc, base):
    """Return the normalised <link rel="canonical"> of doc, or None."""
    for link in doc.iter("link"):
        if "canonical" in (link.get("rel") or "").lower().split() and link.get("href"):
            return normalise(link.get("href"), base=base)
    return None


def main_text(doc):
    """Return the page's main text: <main> or a lone <article> when there is
    one, else the body, without scripts, navigation, headers and footers."""
    body = doc.find("body")
    root = body if body is not None else doc
    for element in list(root.iter(*NEVER_TEXT, *BOILERPLATE)):
        element.drop_tree()
    for element in list(root.iter(*FRAME)):
        if not any(a.tag in ("main", "article") for a in element.iterancestors()):
            element.drop_tree()
    for element in list(root.xpath(".//*[@role]")):
        if element.get("role", "").strip().lower() in BOILERPLATE_ROLES and element.getparent() is not None:
            element.drop_tree()
    main, articles = root.find(".//main"), root.findall(".//article")
    chosen = main if main is not None else articles[0] if len(articles) == 1 else root
    return squeeze(" ".join(chosen.itertext()))


def extract_html(text, url):
    """Return what an HTML page says: title, main text, language, links..."""
    doc = parse_html(text)
    base = url
    for element in doc.iter("base"):
        base = normalise(element.get("href") or "", base=url) or url
        break
    directives = meta_robots(doc)
    html_lang = doc.get("lang") or doc.get("{http://www.w3.org/XML/1998/namespace}lang")
    title, canonical = page_title(doc), canonical_link(doc, base)
    links = [] if "nofollow" in directives else page_links(doc, base)
    body = main_text(doc)
    return Extracted(
        title=title,
        text=body,
        language=language_of(html_lang, body),
        canonical=canonical,
        links=links,
        noindex="noindex" in directives,
        nofollow="nofollow" in directives,
    )


def extract_text(text):
    """Return what a plain-text page says: its first line as title."""
    body = squeeze(text)
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return Extracted(title=first[:200], text=body, language=language_of(None, body))


_classify_lock = threading.Lock()


def detect_language(text):
    """Return the language py3langid finds in text. Its model ships in the
    wheel and loads on first use; the lock makes that happen once."""
    with _classify_lock:
        return py3langid.classify(text[:5000])[0]


def language_of(declared, text):
    """Return the page's language: <html lang> (its primary subtag) when set,
    else the detector's guess, else None for a page with no words."""
    primary = (declared or "").strip().lower().replace("_", "-").split("-")[0]
    if primary:
        return primary
    return detect_language(text) if text.strip() else None


# Outcomes #####################################################################


@dataclasses.dataclass
class Outcome:
    """What fetching one frontier URL came to, and what it asks of the index."""

    url: str
    host: str
    depth: int
    state: str  # the URL's new state in crawl_frontier
    kind: str  # the count it adds to: indexed, unchanged, robots, gone, failed...
    status: int | None = None
    note: str | None = None
    etag: str | None = None
    last_modified: str | None = None
    content_hash: str | None = None
    indexed: bool = False
    retry_after: float = 0.0
    page: dict | None = None  # the page to upsert (an import record)
    page_url: str | None = None  # where the page lives (after same-host redirects)
    links: list = dataclasses.field(default_factory=list)  # next depth
    moved_to: str | None = None  # a redirect to another host: same depth
    remove: list = dataclasses.field(default_factory=list)  # urls whose pages go

    def frontier_row(self):
        """Return the parameters of finish_crawl_url."""
        return {
            "url": self.url,
            "state": self.state,
            "status": self.status,
            "note": self.note,
            "etag": self.etag,
            "last_modified": self.last_modified,
            "content_hash": self.content_hash,
            "indexed": self.indexed,
            "retry_after": self.retry_after,
        }


def content_hash(title, text):
    """Return the hash that finds the same content under two URLs."""
    return hashlib.sha256(f"{title}\n{text}".lower().encode("utf-8")).hexdigest()


def failure(row, error, retry_seconds):
    """Return the Outcome of a failed fetch: queued again with a doubling wait
    while attempts are left and the error is transient, else failed."""
    base = dict(url=row["url"], host=row["host"], depth=row["depth"], status=error.status)
    keep = dict(etag=row["etag"], last_modified=row["last_modified"])
    keep.update(content_hash=row["content_hash"], indexed=row["indexed"])
    if error.transient and row["attempts"] < MAX_ATTEMPTS:
        wait = retry_seconds * 2 ** (row["attempts"] - 1)
        return Outcome(**base, **keep, state="queued", kind="retried", note=error.reason, retry_after=wait)
    reason = f"gave up after {row['attempts']} attempts: {error.reason}" if error.transient else error.reason
    return Outcome(**base, **keep, state="failed", kind="failed", note=reason)


def skipped(row, kind, note, status=None, url=None):
    """Return the Outcome of a URL fetched but not indexed: its page goes from the index."""
    urls = list(dict.fromkeys([row["url"], url or row["url"]]))
    return Outcome(row["url"], row["host"], row["depth"], "skipped", kind, status, note, remove=urls)


def page_outcome(row, response, extracted, scope):
    """Return the Outcome of a page that was fetched and read."""
    url, status = response.url, response.status
    follow = [link for link in extracted.links if scope.allows(link)]
    reason = skip_reason(extracted, url)
    if reason is None:
        outcome = indexed_outcome(row, response, extracted)
    else:
        outcome = skipped(row, *reason, status, url)
        if reason[0] == "canonical" and scope.allows(extracted.canonical):
            follow.insert(0, extracted.canonical)
    if response.redirects:
        outcome.note = f"redirected to {url}" + (f"; {outcome.note}" if outcome.note else "")
    outcome.etag, outcome.last_modified = response.headers.get("ETag"), response.headers.get("Last-Modified")
    outcome.links = follow
    return outcome


def skip_reason(extracted, url):
    """Return (kind, note) when a page is not to be indexed, else None."""
    if extracted.noindex:
        return "noindex", "meta robots noindex"
    if extracted.canonical and extracted.canonical != url:
        return "canonical", f"canonical is {extracted.canonical}"
    if extracted.language not in whoknows.LANGUAGES:
        return "language", f"language {extracted.language or 'unknown'}"
    return None


def indexed_outcome(row, response, extracted):
    """Return the Outcome of a page to index, or to keep as it is when a
    recrawl finds the same text (a new last_updated would re-index it for nothing)."""
    url = response.url
    record = {
        "title": extracted.title or url,
        "url": url,
        "language": extracted.language,
        "last_updated": last_updated(response),
        "content": extracted.text[: whoknows.MAX_CONTENT_LENGTH],
    }
    try:
        whoknows.validate_page(record)
    except ValueError as exc:
        return skipped(row, "invalid", str(exc), response.status, url)
    digest = content_hash(record["title"], record["content"])
    done = (row["url"], row["host"], row["depth"], "done")
    if digest == row["content_hash"] and row["indexed"] and url == row["url"]:
        return Outcome(*done, "unchanged", response.status, "same content", content_hash=digest, indexed=True)
    return Outcome(*done, "indexed", response.status, content_hash=digest, indexed=True, page=record, page_url=url)


def last_updated(response):
    """Return the page's Last-Modified as ISO 8601, else now."""
    stamp = response.headers.get("Last-Modified")
    if stamp:
        with contextlib.suppress(TypeError, ValueError, IndexError):
            from email.utils import parsedate_to_datetime

            return parsedate_to_datetime(stamp).isoformat()
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())


def response_outcome(row, response, scope):
    """Return the Outcome of any HTTP answer to a frontier URL."""
    status = response.status
    base = dict(url=row["url"], host=row["host"], depth=row["depth"], status=status)
    if status == 304:
        keep = dict(etag=response.headers.get("ETag") or row["etag"], last_modified=row["last_modified"])
        keep.update(content_hash=row["content_hash"], indexed=row["indexed"])
        return Outcome(**base, **keep, state="done", kind="unchanged", note="not modified")
    if status in (404, 410):
        return Outcome(**base, state="gone", kind="gone", note=f"HTTP {status}", remove=[row["url"], response.url])
    target = redirect_target(response)
    if target is not None:  # to another host (same-host redirects were followed)
        moved = target if scope.allows(target) else None
        note = f"redirects to {target}" + ("" if moved else " (out of scope)")
        return Outcome(**base, state="done", kind="redirect", note=note, moved_to=moved)
    if status >= 500 or status == 429:
        raise FetchError(f"HTTP {status}", transient=True, status=status)
    if not 200 <= status < 300:
        return Outcome(**base, state="failed", kind="failed", note=f"HTTP {status}")
    media = response.media_type()
    if media not in HTML_TYPES | TEXT_TYPES:
        return skipped(row, "not_html", f"not HTML or text ({media or 'no type'})", status, response.url)
    text = decode(response.body, response.headers.get("Content-Type"))
    extracted = extract_html(text, response.url) if media in HTML_TYPES else extract_text(text)
    robots_header = (response.headers.get("X-Robots-Tag") or "").lower()
    extracted.noindex = extracted.noindex or "noindex" in robots_header or "none" in robots_header
    return page_outcome(row, response, extracted, scope)


# Frontier #####################################################################


class Frontier:
    """The shared crawl frontier in PostgreSQL: claims, leases, limits."""

    def __init__(self, database, limits):
        self.database, self.limits = database, limits

    def claim(self, lease):
        """Lease the best due URL (and its host) for lease seconds; return its row or None."""
        with self.database.connection() as conn:
            # Two commits a page (claim, release): waiting for each to reach
            # disk was most of a claim's time, and losing one is harmless.
            conn.execute(sql("set_async_commit"))
            return conn.execute(sql("claim_crawl_url"), {"lease": lease}).fetchone()

    def release(self, host, delay):
        """End the request in flight to host; the next may start after delay seconds."""
        with self.database.connection() as conn:
            conn.execute(sql("set_async_commit"))
            conn.execute(sql("release_crawl_host"), {"host": host, "delay": delay})

    def outlook(self):
        """Return (URLs still waiting, seconds until the first may be claimed or None)."""
        with self.database.connection() as conn:
            row = conn.execute(sql("get_crawl_outlook")).fetchone()
        return row["waiting"], row["wait_seconds"]

    def enqueue(self, conn, urls, depth, priority=0):
        """Add urls at depth within the limits; return how many were new."""
        if depth > self.limits.max_depth or not urls:
            return 0
        params = {
            "urls": urls,
            "hosts": [host_key(url) for url in urls],
            "depth": depth,
            "priority": priority,
            "max_pages": self.limits.max_pages,
            "max_per_host": self.limits.max_per_host,
        }
        return len(conn.execute(sql("enqueue_crawl_urls"), params).fetchall())

    def counts_by_host(self):
        """Return the frontier's counts per host (count_crawl_frontier rows)."""
        with self.database.connection() as conn:
            return conn.execute(sql("count_crawl_frontier")).fetchall()


@dataclasses.dataclass(frozen=True)
class Limits:
    """How far a crawl may go: URLs in the frontier, in it per host, and link depth."""

    max_pages: int
    max_per_host: int
    max_depth: int


# Indexing #####################################################################


class Indexer:
    """Collects outcomes and writes them in batches (BATCH_PAGES, or after
    BATCH_SECONDS, or whenever the workers run out of work; larger while the
    previous batch is being written): pages through
    app.import_pages, removals, the frontier rows and the new links, in one
    transaction, so that a crash loses a batch whole (its URLs' leases run out
    and they are fetched again) and never half of one."""

    def __init__(self, database, frontier, counts):
        self.database, self.frontier, self.counts = database, frontier, counts
        self.waiting, self.since = [], None
        self.lock, self.write_lock = threading.Lock(), threading.Lock()

    def add(self, outcome):
        """Queue an outcome; write the batch if it is full or old, unless
        another thread is writing one (then the next batch grows meanwhile)."""
        with self.lock:
            self.waiting.append(outcome)
            self.since = self.since or time.monotonic()
            backlog = len(self.waiting) >= MAX_WAITING
        if backlog or self.is_due():
            self.flush(wait=backlog)

    def is_due(self):
        """True when the waiting batch is full or old enough to be written."""
        with self.lock:
            full = len(self.waiting) >= BATCH_PAGES
            return full or (self.since is not None and time.monotonic() - self.since >= BATCH_SECONDS)

    def flush(self, wait=True):
        """Write every waiting outcome now. With wait false, return at once
        if another thread is writing: it, or the next flush, takes them."""
        if not self.write_lock.acquire(blocking=wait):
            return
        try:
            with self.lock:
                batch, self.waiting, self.since = self.waiting, [], None
            if batch:
                with self.database.transaction() as conn:
                    self.write(conn, batch)
        finally:
            self.write_lock.release()

    def write(self, conn, batch):
        """Write one batch in conn's transaction."""
        # The index lock (which index_queued takes anyway) first: crawlers
        # write one at a time, so two of them never index the same content
        # under two URLs at once.
        conn.execute(sql("lock_index"))
        pages = self.without_duplicates(conn, [o for o in batch if o.page])
        removed = [url for o in batch for url in o.remove]
        if removed:
            conn.execute(sql("delete_pages_by_url"), {"urls": removed})
        for outcome in batch:
            self.record(conn, outcome)
        if pages:
            # Last: an index build may change planner settings for the rest
            # of the transaction (enable_sort off made enqueuing take a second).
            out = io.StringIO()
            whoknows.import_pages(conn, [(n, o.page, None) for n, o in enumerate(pages, 1)], out)
            for line in out.getvalue().splitlines():
                if line.startswith("skipped"):
                    log.warning("index: %s", line)
        self.counts.add_batch(batch)

    def without_duplicates(self, conn, pages):
        """Return pages minus those whose content is indexed under another URL
        (already, or earlier in this batch); those become skipped outcomes."""
        hashes = [o.content_hash for o in pages]
        params = {"hashes": hashes, "urls": [o.page_url for o in pages]}
        indexed = {row["content_hash"]: row["url"] for row in conn.execute(sql("find_duplicate_content"), params)}
        kept = []
        for outcome in pages:
            first = indexed.setdefault(outcome.content_hash, outcome.page_url)
            if first != outcome.page_url:
                outcome.page, outcome.state, outcome.kind = None, "skipped", "duplicate"
                outcome.note, outcome.remove = f"duplicate of {first}", [outcome.url, outcome.page_url]
                outcome.content_hash, outcome.indexed = None, False
            else:
                kept.append(outcome)
        return kept

    def record(self, conn, outcome):
        """Write one outcome's frontier rows and enqueue its links."""
        row = outcome.frontier_row()
        if outcome.page_url and outcome.page_url != outcome.url:
            # After same-host redirects the page and its validators belong to
            # where they ended, which is recorded as fetched too.
            target = {"url": outcome.page_url, "host": host_key(outcome.page_url), "depth": outcome.depth}
            conn.execute(sql("insert_crawled_url"), target)
            conn.execute(sql("finish_crawl_url"), {**row, "url": outcome.page_url})
            row.update(etag=None, last_modified=None, content_hash=None, indexed=False)
        conn.execute(sql("finish_crawl_url"), row)
        added = self.frontier.enqueue(conn, outcome.links, outcome.depth + 1)
        if outcome.moved_to:
            added += self.frontier.enqueue(conn, [outcome.moved_to], outcome.depth)
        self.counts.bump("queued", added)


# Crawl ########################################################################


class Counts:
    """This process's counts, shared by its threads."""

    KINDS = (
        "indexed",
        "unchanged",
        "duplicate",
        "canonical",
        "noindex",
        "language",
        "robots",
        "not_html",
        "too_large",
        "invalid",
        "redirect",
        "gone",
        "retried",
        "failed",
    )

    def __init__(self):
        self.values = dict.fromkeys(("fetched", "queued", *self.KINDS), 0)
        self.lock = threading.Lock()

    def bump(self, name, by=1):
        """Add by to one count."""
        with self.lock:
            self.values[name] += by

    def add_batch(self, batch):
        """Count the written outcomes by kind."""
        with self.lock:
            for outcome in batch:
                self.values[outcome.kind] += 1

    def get(self, name):
        """Return one count."""
        with self.lock:
            return self.values[name]

    def summary(self):
        """Return the counts as one line, kinds with a zero count left out."""
        with self.lock:
            parts = [f"{name.replace('_', ' ')} {n:,}" for name, n in self.values.items() if n or name == "fetched"]
        return ", ".join(parts)


@dataclasses.dataclass(frozen=True)
class CrawlOptions:
    """What one crawl process does: its scope, delay, workers, and the settings it runs with."""

    scope: Scope
    limits: Limits
    delay: float
    workers: int
    allow_private: bool
    settings: whoknows.Settings


class Crawl:
    """One crawler process: worker threads that claim URLs, fetch, extract, and
    hand outcomes to the Indexer, until the frontier within the limits is done."""

    def __init__(self, database, options, progress_stream=sys.stderr):
        settings = options.settings
        self.options, self.database = options, database
        self.counts = Counts()
        self.frontier = Frontier(database, options.limits)
        self.indexer = Indexer(database, self.frontier, self.counts)
        timeouts = Timeouts(
            settings.crawler_connect_timeout, settings.crawler_read_timeout, settings.crawler_total_timeout
        )
        self.fetcher = Fetcher(settings.crawler_user_agent, timeouts, options.allow_private)
        self.robots = RobotsCache(database, self.fetcher)
        # A URL stays leased while it is fetched and while its outcome waits
        # in a batch: the lease must outlast both, or another crawler would
        # fetch it again.
        self.lease = max(settings.crawler_lease_seconds, timeouts.total + BATCH_SECONDS + 1)
        self.stopping = threading.Event()
        self.error = None
        self.progress_stream = progress_stream

    def run(self):
        """Crawl until nothing is left to fetch; return the counts."""
        threads = [
            threading.Thread(target=self.work, daemon=True, name=f"crawl-{n}") for n in range(self.options.workers)
        ]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        try:
            while any(thread.is_alive() for thread in threads):
                for thread in threads:
                    thread.join(timeout=PROGRESS_SECONDS / len(threads))
                self.show_progress(started)
        except KeyboardInterrupt:
            self.stopping.set()
            for thread in threads:
                thread.join()
            raise
        finally:
            self.indexer.flush()
        if self.error is not None:
            raise self.error
        return self.counts

    def show_progress(self, started):
        """Print the progress line: fetched, queued, errors, pages/s."""
        try:
            waiting, _ = self.frontier.outlook()
        except psycopg.Error:
            return
        fetched = self.counts.get("fetched")
        errors = self.counts.get("failed") + self.counts.get("retried")
        rate = fetched / max(time.monotonic() - started, 1e-6)
        line = f"crawl: fetched {fetched:,}, queued {waiting:,}, errors {errors:,}, {rate:,.1f} pages/s"
        print(line, file=self.progress_stream, flush=True)

    def work(self):
        """One worker: claim, fetch, hand over; stop when the frontier is done."""
        try:
            while not self.stopping.is_set():
                row = self.frontier.claim(self.lease)
                if row is None:
                    waiting, wait = self.frontier.outlook()
                    if waiting == 0:
                        return
                    if wait is None or wait > IDLE_FLUSH_SECONDS or self.indexer.is_due():
                        # Nothing to fetch soon: write what waits now, so that
                        # its links become claimable and its pages searchable.
                        self.indexer.flush(wait=False)
                    time.sleep(min(max(wait or 0.0, 0.005), 0.1))
                    continue
                self.indexer.add(self.visit(row))
        except Exception as exc:  # a database outage, or a bug: stop the crawl, report it once
            self.error = self.error or exc
            self.stopping.set()

    def visit(self, row):
        """Fetch one claimed URL politely; return its Outcome. The site's faults
        become outcomes; only the database's propagate."""
        delay = self.options.delay
        try:
            robots, fetched = self.robots.get(row["url"])
            delay = max(delay, robots.crawl_delay or 0.0)
            outcome = self.fetch(row, robots, delay, fetched)
        except FetchError as exc:
            outcome = failure(row, exc, self.options.settings.crawler_retry_seconds)
        except TooLarge:
            outcome = skipped(row, "too_large", f"larger than {MAX_BODY_BYTES // (1024 * 1024)} MB", 200)
        except RefusedAddress as exc:
            outcome = Outcome(row["url"], row["host"], row["depth"], "failed", "failed", note=f"refused: {exc}")
        except psycopg.Error:
            raise
        except Exception as exc:  # a page that trips the parser must not stop the crawl
            log.exception("unexpected error on %s", row["url"])
            outcome = Outcome(row["url"], row["host"], row["depth"], "failed", "failed", note=f"error: {exc!r}")
        finally:
            self.frontier.release(row["host"], delay)
        if outcome.state in ("queued", "failed", "gone"):
            log.warning(
                "%s %s: %s", "will retry" if outcome.state == "queued" else outcome.state, row["url"], outcome.note
            )
        return outcome

    def fetch(self, row, robots, delay, robots_fetched):
        """Fetch a URL that robots.txt allows, delay seconds apart from any
        other request to its host; return its Outcome."""
        agent = self.fetcher.user_agent
        if not robots.allows(agent, row["url"]):
            return skipped(row, "robots", "disallowed by robots.txt")
        if robots_fetched:
            time.sleep(delay)  # robots.txt was just fetched: that was a request to this host too
        self.counts.bump("fetched")
        validators = (row["etag"], row["last_modified"])
        response = self.fetcher.get(row["url"], validators, lambda url: robots.allows(agent, url), delay)
        return response_outcome(row, response, self.options.scope)


# Command line #################################################################


class Arguments(argparse.ArgumentParser):
    """argparse whose errors raise CrawlError: main() prints one line, not the usage."""

    def error(self, message):
        raise CrawlError(message)


def non_negative(text):
    """argparse type: seconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, not {text!r}") from None
    if not 0 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"must be between 0 and 3600 seconds, not {text!r}")
    return value


def depth(text):
    """argparse type: a whole number of at least 0."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 0, not {text!r}")
    return int(text)


def parse_arguments(argv):
    """Return the parsed command line."""
    parser = Arguments(
        prog="crawler.py",
        description="Crawl web pages into ¿Who Knows?'s index, from seed URLs, within their sites.",
    )
    parser.add_argument("seeds", nargs="*", metavar="URL", help="where to start (http or https)")
    parser.add_argument("--seeds-file", metavar="FILE", help="more seed URLs, one a line (# comments)")
    parser.add_argument("--max-pages", type=whoknows.positive_int, default=10_000, help="URLs in the frontier at most")
    parser.add_argument("--max-per-host", type=whoknows.positive_int, help="URLs per host at most (default: max-pages)")
    parser.add_argument("--max-depth", type=depth, default=10, help="links followed from a seed at most (default 10)")
    parser.add_argument(
        "--delay", type=non_negative, default=1.0, help="seconds between requests to a host (default 1)"
    )
    parser.add_argument("--workers", type=whoknows.positive_int, default=4, help="fetching threads (default 4)")
    parser.add_argument("--allow-private", action="store_true", help="allow loopback and private addresses")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--allow-hosts", metavar="HOST,...", help="also crawl these hosts (comma-separated)")
    scope.add_argument("--allow-domain", metavar="SUFFIX", help="crawl any host under this domain")
    parser.add_argument("--recrawl", action="store_true", help="fetch every known URL again (conditional GET)")
    parser.add_argument("--status", action="store_true", help="print the frontier by host and exit")
    args = parser.parse_args(argv)
    if args.workers > 64:
        parser.error("--workers must be at most 64")
    return args


def read_seeds(args):
    """Return the normalised seed URLs from the command line and --seeds-file."""
    given = list(args.seeds)
    if args.seeds_file:
        try:
            with open(args.seeds_file, encoding="utf-8") as lines:
                given += [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise CrawlError(f"cannot read --seeds-file: {whoknows.one_line(exc)}") from None
    seeds = []
    for text in given:
        url = normalise(text)
        if url is None:
            raise CrawlError(f"not an http(s) URL: {text!r}")
        seeds.append(url)
    return list(dict.fromkeys(seeds))


def refuse_private_literals(seeds):
    """Raise CrawlError for a seed whose host is a forbidden IP address:
    that is known before any connection (names are checked at connect time)."""
    for url in seeds:
        host = hostname(url).strip("[]")
        with contextlib.suppress(ValueError):
            kind = forbidden_kind(host)
            if kind:
                raise CrawlError(f"{url} is a {kind} address; use --allow-private to crawl a local site")


def make_scope(args, seeds, frontier):
    """Return the crawl's Scope: the seeds' hosts (or, without seeds, the
    frontier's), plus --allow-hosts, or --allow-domain."""
    hosts = {hostname(url) for url in seeds}
    if not seeds:
        hosts = {(urlsplit("//" + row["host"]).hostname or "") for row in frontier.counts_by_host()}
    if args.allow_hosts:
        hosts |= {h.strip().lower() for h in args.allow_hosts.split(",") if h.strip()}
    domain = args.allow_domain.strip().strip(".").lower() if args.allow_domain else None
    return Scope(frozenset(hosts), domain)


def print_status(frontier):
    """Print the frontier's totals and a table by host."""
    rows = frontier.counts_by_host()
    columns = ("queued", "fetching", "done", "indexed", "skipped", "failed", "gone")
    totals = {name: sum(row[name] for row in rows) for name in columns}
    print(
        f"frontier: {sum(totals[n] for n in columns if n != 'indexed'):,} URLs, "
        + ", ".join(f"{name} {totals[name]:,}" for name in columns)
    )
    if rows:
        print()
        whoknows.print_table(rows, ("host", *columns))


def crawl(settings, args, out=sys.stdout, progress=sys.stderr):
    """Run the crawl (or --status) that args describe; return the exit status."""
    seeds = read_seeds(args)
    if not args.allow_private:
        refuse_private_literals(seeds)
    # Room for every worker, the writer and the progress line.
    settings = dataclasses.replace(settings, pool_max_size=max(settings.pool_max_size, args.workers + 3))
    database = whoknows.Database(settings)
    try:
        whoknows.prepare_database(database, migrate=True)
        limits = Limits(args.max_pages, args.max_per_host or args.max_pages, args.max_depth)
        frontier = Frontier(database, limits)
        if args.status:
            print_status(frontier)
            return 0
        if not seeds and not frontier.counts_by_host():
            raise CrawlError("no seed URLs and an empty frontier: give a URL to start from")
        options = CrawlOptions(
            make_scope(args, seeds, frontier), limits, args.delay, args.workers, args.allow_private, settings
        )
        with database.transaction() as conn:
            if args.recrawl:
                requeued = conn.execute(sql("requeue_crawled_urls")).fetchone()["requeued"]
                print(f"Queued {requeued:,} known URLs again", file=out, flush=True)
            added = frontier.enqueue(conn, seeds, 0, priority=1)
        if seeds and not added and frontier.outlook()[0] == 0:
            print("The seeds are known and nothing waits: nothing to fetch (--recrawl fetches again)", file=out)
        started = time.monotonic()
        counts = Crawl(database, options, progress).run()
        seconds = time.monotonic() - started
    finally:
        database.close()
    fetched = counts.get("fetched")
    print(f"crawled: {counts.summary()}", file=out)
    print(f"{fetched:,} pages fetched in {seconds:.1f} s ({fetched / max(seconds, 1e-6):,.1f} pages/s)", file=out)
    return 0


def main(argv=None, settings=None, out=sys.stdout, progress=sys.stderr):
    """Run the crawler's command line; return the exit status."""
    try:
        args = parse_arguments(argv)
    except CrawlError as exc:
        print(f"crawler: error: {exc}", file=sys.stderr)
        return 2
    return whoknows.run_command(
        "crawler", lambda: crawl(settings or whoknows.Settings.from_env(), args, out, progress), (CrawlError,)
    )


if __name__ == "__main__":
    sys.exit(main())
