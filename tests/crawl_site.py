"""A local web site on 127.0.0.1 for the crawler's tests and benchmark.

Site serves routes from a real threading HTTP server and counts what it is
asked: requests per path, their headers, and how many ran at once. trap_site()
fills one with generated pages and every trap of issue 12.
"""

import collections
import gzip
import html
import http.server
import threading
import time


def page(title, body, lang="en", head="", links=(), nav=True):
    """Return the HTML of a page: a nav bar and footer (boilerplate, unless
    nav is false) and a <main> with body and links."""
    lang_attr = f' lang="{lang}"' if lang else ""
    title_tag = f"<title>{html.escape(title)}</title>" if title is not None else ""
    anchors = "".join(f'<a href="{html.escape(href)}">{html.escape(href)}</a> ' for href in links)
    top = "<nav><a href='/'>Home navigation sitewide</a></nav>" if nav else ""
    bottom = "<footer>Copyright footer boilerplate</footer>" if nav else ""
    return (
        f"<!doctype html><html{lang_attr}><head><meta charset='utf-8'>{title_tag}{head}</head>"
        f"<body>{top}<main>{body}<p>{anchors}</p></main>{bottom}</body></html>"
    )


class Site:
    """A web site on 127.0.0.1: routes path -> handler(request) -> (status, headers, body)."""

    def __init__(self):
        self.routes = {}
        self.hits = collections.Counter()
        self.requests = collections.defaultdict(list)  # path -> [headers of each request]
        self.starts = []  # (monotonic time, path) of every request
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0
        # Paths whose answers outlast the crawler's timeout: it has hung up
        # and moved on while they sleep, so they do not count as in flight.
        self.abandoned = set()
        self.server = None

    def start(self):
        """Serve on a free port in a thread; return self."""
        site = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                site.serve(self)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self):
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()

    @property
    def port(self):
        return self.server.server_address[1]

    @property
    def base(self):
        return f"http://127.0.0.1:{self.port}"

    def url(self, path):
        """Return the full URL of path on this site."""
        return self.base + path

    def add(self, path, body="", status=200, content_type="text/html; charset=utf-8", headers=None):
        """Serve a fixed answer at path."""
        fixed = {"Content-Type": content_type, **(headers or {})} if content_type else dict(headers or {})
        data = body.encode("utf-8") if isinstance(body, str) else body
        self.routes[path] = lambda request: (status, fixed, data)

    def serve(self, handler):
        """Answer one request, counting it."""
        path = handler.path
        counted = path not in self.abandoned
        with self.lock:
            self.hits[path] += 1
            self.requests[path].append(dict(handler.headers.items()))
            self.starts.append((time.monotonic(), path))
            self.in_flight += counted
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            route = self.routes.get(path)
            status, headers, body = route(handler) if route else (404, {"Content-Type": "text/plain"}, b"not found")
            handler.send_response(status)
            for name, value in headers.items():
                handler.send_header(name, value)
            if body is not None and "Content-Length" not in headers and not headers.get("X-Stream"):
                handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            if body is not None:
                handler.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the crawler hung up (a body over its cap, a timeout)
        finally:
            with self.lock:
                self.in_flight -= counted


def flaky(status, then):
    """A handler that answers status the first time, then then()."""
    calls = []

    def handle(request):
        calls.append(1)
        return (status, {"Content-Type": "text/plain"}, b"try again") if len(calls) == 1 else then(request)

    return handle


def html_answer(text, **headers):
    """A handler answering HTML text."""
    return lambda request: (200, {"Content-Type": "text/html; charset=utf-8", **headers}, text.encode("utf-8"))


def slow(seconds):
    """A handler that answers only after seconds (longer than the crawler waits)."""

    def handle(request):
        time.sleep(seconds)
        return 200, {"Content-Type": "text/html"}, b"<title>Slow</title>too late"

    return handle


def big(size):
    """A handler streaming size bytes of HTML without a Content-Length."""

    def handle(request):
        chunk = b"<p>" + b"bulk " * 2000 + b"</p>\n"
        return 200, {"Content-Type": "text/html", "X-Stream": "1"}, chunk * (size // len(chunk) + 1)

    return handle


def conditional(text, etag, last_modified):
    """A handler with validators that answers 304 to a matching conditional GET."""

    def handle(request):
        if request.headers.get("If-None-Match") == etag:
            return 304, {"ETag": etag}, b""
        headers = {"Content-Type": "text/html; charset=utf-8", "ETag": etag, "Last-Modified": last_modified}
        return 200, headers, text.encode("utf-8")

    return handle


GENERATED = 12  # /page/1 .. /page/12


def trap_site(site):
    """Fill site with generated pages and every trap the crawler must handle; return site."""
    site.add("/robots.txt", "User-agent: *\nDisallow: /private/\nCrawl-delay: 0.1\n", content_type="text/plain")
    traps = [
        "/page/1",
        "/redirect/1",
        "/loop/a",
        "/missing",
        "/flaky",
        "/file.pdf",
        "/big",
        "/slow",
        "/gzip",
        "/latin1",
        "/alias",
        "/noindex",
        "/dup-a",
        "/dup-b",
        "/dansk",
        "/nolang",
        "/deutsch",
        "/private/secret",
        "/nofollow-meta",
        "/notes.txt",
        "/og",
        "/hop/1",
        "/away",
        "mailto:someone@example.org",
        "javascript:void(0)",
        "http://other.invalid/elsewhere",
        "/#top",
    ]
    home = page("Trap home", "<h1>Welcome</h1><p>The zanzibar home page.</p>", links=traps)
    home = home.replace("</main>", "<a rel='nofollow' href='/hidden-by-rel'>hidden</a></main>")
    site.add("/", home)
    for n in range(1, GENERATED + 1):
        # Relative links, one of them with dot segments.
        links = [f"{n + 1}", f"../page/{n + 2}"] if n < GENERATED else []
        site.add(f"/page/{n}", page(f"Generated page {n}", f"<p>Generated quokka text number w{n}x.</p>", links=links))
    site.add("/redirect/1", status=301, content_type=None, headers={"Location": "/redirect/2"})
    site.add("/redirect/2", status=302, content_type=None, headers={"Location": site.url("/redirect/3")})
    site.add("/redirect/3", status=307, content_type=None, headers={"Location": "/landing"})
    site.add("/landing", page("Landing after redirects", "<p>The pelican landing page.</p>"))
    site.add("/loop/a", status=302, content_type=None, headers={"Location": "/loop/b"})
    site.add("/loop/b", status=302, content_type=None, headers={"Location": "/loop/a"})
    site.routes["/flaky"] = flaky(500, html_answer(page("Flaky but fine", "<p>The wombat survived a 500.</p>")))
    site.add("/file.pdf", b"%PDF-1.4 not a page", content_type="application/pdf")
    site.routes["/big"] = big(5 * 1024 * 1024)
    site.routes["/slow"] = slow(2.0)
    site.abandoned.add("/slow")
    zipped = gzip.compress(page("Gzipped page", "<p>The armadillo was compressed.</p>").encode())
    site.routes["/gzip"] = lambda request: (200, {"Content-Type": "text/html", "Content-Encoding": "gzip"}, zipped)
    latin = page("Blåbærgrød på Østerbro", "<p>Rødgrød med fløde på Østerbro, sagde bageren.</p>", lang="da")
    latin = latin.replace("<meta charset='utf-8'>", "<meta charset='iso-8859-1'>")
    site.add("/latin1", latin.encode("latin-1"), content_type="text/html")
    canonical = f'<link rel="canonical" href="{site.url("/canonical")}">'
    site.add("/alias", page("Alias", "<p>The narwhal alias.</p>", head=canonical))
    site.add("/canonical", page("The canonical narwhal", "<p>The narwhal alias.</p>"))
    noindex = '<meta name="robots" content="noindex, follow">'
    site.add("/noindex", page("Hidden page", "<p>The secretive platypus.</p>", head=noindex, links=["/from-noindex"]))
    site.add("/from-noindex", page("Found through noindex", "<p>The chinchilla was linked.</p>"))
    duplicate = page("Same content", "<p>The identical axolotl text.</p>")
    site.add("/dup-a", duplicate)
    site.add("/dup-b", duplicate)
    dansk = "<p>Søgemaskinen finder danske sider om cykler og smørrebrød i København, og den er hurtig.</p>"
    site.add("/dansk", page("En dansk side", dansk, lang="da-DK"))
    english = "<p>This page declares no language at all, but the detector reads plain English words here.</p>"
    site.add("/nolang", page(None, english, lang=None).replace("<main>", "<main><h1>Heading as title</h1>"))
    deutsch = "<p>Diese Seite ist auf Deutsch geschrieben und wird nicht indiziert.</p>"
    site.add("/deutsch", page("Eine deutsche Seite", deutsch, lang="de"))
    site.add("/private/secret", page("Secret", "<p>Robots keep this out.</p>"))
    nofollow = '<meta name="robots" content="nofollow">'
    site.add("/nofollow-meta", page("No follow", "<p>The quiet ocelot.</p>", head=nofollow, links=["/never"]))
    site.add("/never", page("Never", "<p>Never fetched.</p>"))
    site.add("/hidden-by-rel", page("Hidden", "<p>Never fetched.</p>"))
    site.add("/notes.txt", "Plain notes\nThe tapir notes are plain text.\n", content_type="text/plain; charset=utf-8")
    og = "<meta property='og:title' content='Open Graph title'>"
    site.add("/og", page(None, "<p>The kinkajou has only an og:title.</p>", head=og))
    for n in range(1, 8):  # seven redirects in a row: more than the crawler follows
        site.add(f"/hop/{n}", status=302, content_type=None, headers={"Location": f"/hop/{n + 1}"})
    site.add("/hop/8", page("Too far", "<p>Never reached.</p>"))
    site.add("/away", status=301, content_type=None, headers={"Location": "http://other.invalid/x"})
    return site


def generated_site(site, pages, word="quokka"):
    """Fill site with pages /g/1 .. /g/pages, each linking to /g/2n and /g/2n+1
    (a binary tree: many URLs wait at once); return site."""
    for n in range(1, pages + 1):
        links = [f"/g/{k}" for k in (2 * n, 2 * n + 1) if k <= pages]
        text = f"<p>{word} page {n} with the unique word {word}{n}x.</p>"
        site.add(f"/g/{n}", page(f"{word.title()} page {n}", text, links=links, nav=False))
    site.add("/robots.txt", "User-agent: *\nAllow: /\n", content_type="text/plain")
    return site
