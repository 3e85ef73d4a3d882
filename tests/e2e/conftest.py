"""Fixtures for the browser tests: a real waitress server, Debian's Chromium
driven by Playwright, and a watch on every page for console errors, uncaught
exceptions, CSP violations and failed loads.

The browser is /usr/bin/chromium (apt-get install -y chromium); Playwright never
downloads one of its own. Without it, or without the playwright package, the
tests are skipped, or fail when CI is set.
"""

import json
import os
import re
import threading
from pathlib import Path

import pytest
import waitress
from waitress import wasyncore

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    # headless=True makes Playwright pass --headless, which in Chromium 132 and
    # later is the new headless mode (the old one left the browser binary).
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = Path(__file__).resolve().parent / "screenshots"
TIMEOUT_MS = 10_000  # for actions and navigations; expect() gets 5 s

# Only launch a browser we installed: never fetch one.
os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")

# Runs in every page before its own scripts (CDP injects it, so the CSP does
# not apply to it): report each CSP violation to Python, and keep it on the
# page too, in case the page is still open when the test ends.
CSP_WATCH = """
(() => {
  window.__csp = [];
  document.addEventListener('securitypolicyviolation', (e) => {
    const v = {directive: e.violatedDirective, blocked: e.blockedURI, source: e.sourceFile,
               line: e.lineNumber, sample: e.sample, page: location.href};
    window.__csp.push(v);
    if (window.__reportCspViolation) window.__reportCspViolation(v);
  });
})();
"""


def browser_unavailable():
    """Return why the browser tests cannot run here, or None."""
    missing = []
    if not os.access(CHROMIUM, os.X_OK):
        missing.append(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package is missing (pip install -r requirements-dev.txt)")
    return "; ".join(missing) or None


@pytest.fixture(scope="package")
def browser():
    """Debian's Chromium, headless, launched once for the e2e tests."""
    reason = browser_unavailable()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"browser tests cannot run: {reason}", pytrace=False)
        pytest.skip(f"browser tests need Chromium and Playwright: {reason}")
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=5_000)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="package")
def live_server(session_app):
    """The app on a real waitress server on 127.0.0.1 (a free port), on the test database."""
    server = waitress.create_server(session_app, host="127.0.0.1", port=0, threads=8)
    thread = threading.Thread(target=server.run, daemon=True, name="e2e-waitress")
    thread.start()
    yield f"http://127.0.0.1:{server.effective_port}"
    # Close every socket from inside waitress's loop (closing them under a
    # running poll breaks it); an empty socket map ends the loop.
    server.trigger.pull_trigger(lambda: wasyncore.close_all(server._map))
    thread.join(timeout=10)
    server.task_dispatcher.shutdown()
    assert not thread.is_alive(), "the waitress server did not stop"


@pytest.fixture(scope="package", autouse=True)
def fresh_screenshots():
    """Start each run with an empty screenshot folder (it is git-ignored)."""
    SCREENSHOTS.mkdir(exist_ok=True)
    for old in SCREENSHOTS.glob("*.png"):
        old.unlink()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the item, so fixtures can see a failure."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


class PageWatch:
    """Watches one page: records every problem, and takes named screenshots.

    Problems are console errors, uncaught exceptions, CSP violations (from the
    securitypolicyviolation event and from console text), failed requests and
    HTTP responses of 400 or more. A test that provokes one on purpose declares
    it with expect_problem(); it must then happen exactly once.
    """

    def __init__(self, page, test_name):
        self.page = page
        self.test_name = re.sub(r"[^A-Za-z0-9_.-]+", "-", test_name).strip("-")
        self.problems = []  # (kind, text, page url)
        self.expected = []  # [kind, compiled regex, times seen]
        self.csp_seen = set()
        self.visits = []  # [url, screenshot taken]
        self.shots = 0
        page.on("console", self._on_console)
        page.on("pageerror", lambda error: self._problem("uncaught exception", f"{error.name}: {error.message}"))
        page.on("requestfailed", self._on_request_failed)
        page.on("response", self._on_response)
        page.on("framenavigated", self._on_navigated)

    # Recording ----------------------------------------------------------------

    def _problem(self, kind, text, url=None):
        url = url or self.page.url
        for expected in self.expected:
            if expected[0] == kind and expected[1].search(f"{text} @ {url}"):
                expected[2] += 1
                return
        self.problems.append((kind, text, url))

    def _on_console(self, message):
        location = message.location.get("url") or self.page.url
        if message.type == "error":
            self._problem("console error", message.text, location)
        elif "Content Security Policy" in message.text:
            self._problem(f"console {message.type} about CSP", message.text, location)

    def _on_request_failed(self, request):
        # The browser cancels a page's remaining loads (often the favicon) when
        # a test navigates on: that is not the server failing.
        if request.failure == "net::ERR_ABORTED":
            return
        self._problem("failed request", f"{request.method} {request.url}: {request.failure}")

    def _on_response(self, response):
        if response.status >= 400:
            self._problem("HTTP error", f"{response.status} {response.request.method} {response.url}")

    def _on_navigated(self, frame):
        if frame == self.page.main_frame:
            self.visits.append([frame.url, False])

    def csp_violation(self, violation):
        """Binding target of CSP_WATCH: one securitypolicyviolation event."""
        key = json.dumps(violation, sort_keys=True)
        if key not in self.csp_seen:
            self.csp_seen.add(key)
            self._problem(
                "CSP violation",
                f"{violation.get('directive')} blocked {violation.get('blocked')!r} "
                f"(source {violation.get('source')}:{violation.get('line')}, sample {violation.get('sample')!r})",
                violation.get("page"),
            )

    def collect_csp_left_on_page(self):
        """Pick up violations still queued on the open page."""
        try:
            left = self.page.evaluate("() => window.__csp || []")
        except Exception:  # the page is gone or mid-navigation: nothing to collect
            return
        for violation in left:
            self.csp_violation(violation)

    # For tests -----------------------------------------------------------------

    def expect_problem(self, kind, pattern):
        """Allow one problem of kind whose 'text @ url' matches pattern; it must happen once."""
        self.expected.append([kind, re.compile(pattern), 0])

    def take_problems(self):
        """Return and forget the problems so far (for a test of this watch itself)."""
        self.collect_csp_left_on_page()
        problems, self.problems = self.problems, []
        return problems

    def shot(self, step, check_style=True):
        """Screenshot the whole page as <test>--NN-<step>.png, after checking its stylesheet loaded."""
        if check_style:
            sheets = self.page.evaluate(
                "() => [...document.styleSheets].map(s => { try { return s.cssRules.length } catch (e) { return -1 } })"
            )
            assert sheets and all(rules > 0 for rules in sheets), f"stylesheet not applied on {self.page.url}: {sheets}"
        self.shots += 1
        step = re.sub(r"[^A-Za-z0-9_.-]+", "-", step)
        self.page.screenshot(path=SCREENSHOTS / f"{self.test_name}--{self.shots:02d}-{step}.png", full_page=True)
        if self.visits:
            self.visits[-1][1] = True

    def report(self):
        """Return the failures: problems, expected problems not seen once, pages without a screenshot."""
        self.collect_csp_left_on_page()
        lines = [f"{kind} on {url}: {text}" for kind, text, url in self.problems]
        lines += [
            f"expected exactly one {kind} matching {regex.pattern!r}, saw {seen}"
            for kind, regex, seen in self.expected
            if seen != 1
        ]
        lines += [f"no screenshot of the page visited at {url}" for url, shot in self.visits if not shot]
        return lines


@pytest.fixture
def watch(browser, live_server, request):
    """A fresh browser context and page on the live server, watched for problems.

    At the end the test fails if any page it visited logged a console error,
    threw, violated the CSP or failed to load something, or was not screenshotted.
    """
    context = browser.new_context(
        base_url=live_server, viewport={"width": 1280, "height": 800}, locale="en-US", timezone_id="UTC"
    )
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    monitor = PageWatch(page, request.node.name)
    page.expose_function("__reportCspViolation", monitor.csp_violation)
    page.add_init_script(CSP_WATCH)
    yield monitor
    failed = any(getattr(getattr(request.node, f"report_{when}", None), "failed", False) for when in ("setup", "call"))
    if failed:
        try:
            monitor.shot("failure", check_style=False)
        except Exception:  # noqa: S110 (best effort: the page may be gone)
            pass
    problems = monitor.report()
    context.close()
    if failed:  # the test's own failure comes first; show these beside it
        print("browser problems:", *problems, sep="\n  ")
    else:
        assert not problems, "browser problems:\n  " + "\n  ".join(problems)


@pytest.fixture
def page(watch):
    """The watched page (see watch)."""
    return watch.page
