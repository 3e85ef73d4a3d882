"""End-to-end tests in a real browser (Debian's Chromium through Playwright)
against the app on a real waitress server and a fresh database.

Every test runs in a watched page (see conftest.PageWatch): it fails if any
page it visited logged a console error, threw, violated the CSP, failed to load
something, or was left without a screenshot in tests/e2e/screenshots/.
"""

import hashlib
import io
import re
import sqlite3
from urllib.parse import parse_qs, urlsplit

import pytest

import app as whoknows

try:
    from playwright.sync_api import expect
except ImportError:  # the browser fixture skips (or fails on CI) and says why
    expect = None


def path_is(path):
    """A URL pattern for expect(page).to_have_url: this path, any query."""
    return re.compile(rf"^http://127\.0\.0\.1:\d+{re.escape(path)}(\?.*)?$")


def query_of(page):
    """The current URL's query string as a dict of single values."""
    return {key: values[0] for key, values in parse_qs(urlsplit(page.url).query).items()}


# Search #######################################################################

SEARCH_PAGES = [
    ("en", "Python for beginners", "Python is a programming language that beginners love."),
    ("en", "Snakes of the world", "The python is a large snake that lives in warm places."),
    ("en", "Gardening", "Tomatoes need sun and water."),
    ("da", "Python for begyndere", "Python er et programmeringssprog. En søgemaskine finder det hurtigt."),
    ("da", "Søgemaskiner i Danmark", "En søgemaskine finder sider på nettet."),
    ("da", "Havearbejde", "Tomater skal have sol og vand."),
]

SEARCHES = {
    # language: (query, titles in order (title matches first), highlighted word)
    "en": ("python", ["Python for beginners", "Snakes of the world"], "python"),
    "da": ("søgemaskine", ["Søgemaskiner i Danmark", "Python for begyndere"], "søgemaskine"),
}


@pytest.mark.parametrize("language", ["en", "da"])
@pytest.mark.parametrize("submit", ["enter", "click"])
def test_search_from_the_search_box(watch, page, add_page, language, submit):
    for page_language, title, content in SEARCH_PAGES:
        add_page(title, content, language=page_language)
    query, titles, marked = SEARCHES[language]

    page.goto("/")
    expect(page.locator("#search-input")).to_be_focused()  # autofocus
    expect(page.locator("#search-language")).to_have_value("en")
    expect(page.locator(".search-result")).to_have_count(0)
    watch.shot("search-page")

    page.select_option("#search-language", language)
    page.fill("#search-input", query)
    if submit == "enter":
        page.press("#search-input", "Enter")
    else:
        page.click("#search-button")

    expect(page.locator(".result-count")).to_contain_text(f"{len(titles)} results for {query}")
    assert query_of(page) == {"q": query, "language": language}
    # Only pages in the chosen language, title matches first.
    expect(page.locator(".search-result-title")).to_have_text(titles)
    # Every snippet highlights the word with a real <mark> element, not escaped text.
    descriptions = page.locator(".search-result-description")
    expect(descriptions.filter(has=page.locator("mark"))).to_have_count(len(titles))
    for mark in descriptions.locator("mark").all():
        expect(mark).to_have_text(re.compile(rf"^{marked}$", re.IGNORECASE))
    expect(descriptions.first).not_to_contain_text("<mark>")
    expect(descriptions.first).not_to_contain_text("\ue000")
    # The form keeps the query and the language.
    expect(page.locator("#search-input")).to_have_value(query)
    expect(page.locator("#search-language")).to_have_value(language)
    expect(page).to_have_title(f"{query} – ¿Who Knows?")
    watch.shot("results")


def test_paging_through_results(watch, page, add_page):
    for number in range(1, 26):
        add_page(f"Paging result {number:02d}", "A page about paging through results.")
    titles = [f"Paging result {number:02d}" for number in range(1, 26)]
    results = page.locator(".search-result-title")
    count = page.locator(".result-count")

    page.goto("/")
    watch.shot("search-page")
    page.fill("#search-input", "paging")
    page.press("#search-input", "Enter")
    expect(count).to_have_text("25 results for paging")
    expect(results).to_have_text(titles[0:10])
    expect(page.locator("#prev-page")).to_have_count(0)
    watch.shot("page-1")

    page.click("#next-page")
    expect(count).to_have_text("25 results for paging · page 2")
    expect(results).to_have_text(titles[10:20])
    assert query_of(page) == {"q": "paging", "language": "en", "page": "2"}
    expect(page.locator("#prev-page")).to_be_visible()
    watch.shot("page-2")

    page.click("#next-page")
    expect(count).to_contain_text("page 3")
    expect(results).to_have_text(titles[20:25])
    expect(page.locator("#next-page")).to_have_count(0)
    watch.shot("page-3")

    page.click("#prev-page")
    expect(count).to_contain_text("page 2")
    expect(results).to_have_text(titles[10:20])
    watch.shot("back-to-page-2")

    page.click("#prev-page")
    expect(count).to_have_text("25 results for paging")
    expect(results).to_have_text(titles[0:10])
    expect(page.locator("#prev-page")).to_have_count(0)
    expect(page.locator("#next-page")).to_be_visible()
    watch.shot("back-to-page-1")


# Accounts #####################################################################


def log_in(page, username, password):
    page.fill("#username", username)
    page.fill("#password", password)
    page.click("#login-button")


def test_register_login_logout(watch, page):
    page.goto("/")
    watch.shot("start")
    page.click("#nav-register")
    expect(page).to_have_url(path_is("/register"))
    watch.shot("register-form")

    page.fill("#username", "alice")
    page.fill("#email", "alice@example.com")
    page.fill("#password", "s3cret-pass")
    page.fill("#password2", "s3cret-pass")
    page.click("#register-button")
    expect(page).to_have_url(path_is("/login"))
    expect(page.locator(".flash")).to_have_text("You were successfully registered and can login now")
    watch.shot("registered")

    log_in(page, "alice", "s3cret-pass")
    expect(page).to_have_url(path_is("/"))
    expect(page.locator(".flash")).to_have_text("You were logged in")
    expect(page.locator("#nav-logout")).to_have_text("Log out [alice]")
    expect(page.locator("#nav-login")).to_have_count(0)
    watch.shot("logged-in")

    page.reload()  # a flash message shows once; the login stays
    expect(page.locator("#nav-logout")).to_have_text("Log out [alice]")
    expect(page.locator(".flash")).to_have_count(0)
    watch.shot("reloaded")

    page.click("#nav-logout")
    expect(page).to_have_url(path_is("/"))
    expect(page.locator(".flash")).to_have_text("You were logged out")
    expect(page.locator("#nav-logout")).to_have_count(0)
    expect(page.locator("#nav-login")).to_be_visible()
    watch.shot("logged-out")


def test_register_shows_validation_errors(watch, page, db):
    page.goto("/register")
    watch.shot("register-form")
    page.fill("#username", "bob")
    page.fill("#email", "bob@example.com")
    page.fill("#password", "s3cret-pass")
    page.fill("#password2", "another-pass")
    page.click("#register-button")
    expect(page.locator(".error")).to_have_text("Error: The two passwords do not match")
    # The form comes back with what was typed, except the passwords.
    expect(page.locator("#username")).to_have_value("bob")
    expect(page.locator("#email")).to_have_value("bob@example.com")
    expect(page.locator("#password")).to_have_value("")
    watch.shot("passwords-differ")

    page.fill("#password", "short")
    page.fill("#password2", "short")
    page.click("#register-button")
    expect(page.locator(".error")).to_have_text("Error: The password is too short (at least 6 characters)")
    watch.shot("password-too-short")
    assert db.execute("SELECT count(*) AS n FROM users").fetchone()["n"] == 0

    page.fill("#password", "s3cret-pass")
    page.fill("#password2", "s3cret-pass")
    page.click("#register-button")
    expect(page).to_have_url(path_is("/login"))
    expect(page.locator(".flash")).to_have_text("You were successfully registered and can login now")
    watch.shot("registered")


def import_legacy_user(database, tmp_path, username, password):
    """Import one user from a legacy whoknows.db, keeping the unsalted MD5 hash."""
    path = tmp_path / "whoknows.db"
    legacy = sqlite3.connect(path)
    legacy.executescript(
        "CREATE TABLE users (id INTEGER PRIMARY KEY, username TEXT, email TEXT, password TEXT);"
        "CREATE TABLE pages (title TEXT, url TEXT, language TEXT, last_updated TEXT, content TEXT);"
    )
    legacy.execute(
        "INSERT INTO users (username, email, password) VALUES (?, ?, ?)",
        (username, f"{username}@example.com", hashlib.md5(password.encode()).hexdigest()),
    )
    legacy.commit()
    legacy.close()
    whoknows.import_file(database, path, out=io.StringIO())


def test_legacy_user_must_change_password(watch, page, db, tmp_path, session_app):
    import_legacy_user(session_app.db, tmp_path, "legacy", "password")

    page.goto("/login")
    watch.shot("login-form")
    log_in(page, "legacy", "password")
    expect(page).to_have_url(path_is("/change-password"))
    expect(page.locator(".flash")).to_contain_text("You were logged in")
    expect(page.locator("#forced-change")).to_be_visible()
    watch.shot("forced-change")

    page.goto("/")  # nothing else works before the change
    expect(page).to_have_url(path_is("/change-password"))
    expect(page.locator("#forced-change")).to_be_visible()
    watch.shot("search-redirects-back")

    page.fill("#old_password", "not-my-password")
    page.fill("#password", "n3w-secret")
    page.fill("#password2", "n3w-secret")
    page.click("#change-password-button")
    expect(page.locator(".error")).to_have_text("Error: Your current password is wrong")
    expect(page.locator("#forced-change")).to_be_visible()
    watch.shot("wrong-old-password")

    page.fill("#old_password", "password")
    page.fill("#password", "n3w-secret")
    page.fill("#password2", "n3w-secret")
    page.click("#change-password-button")
    expect(page).to_have_url(path_is("/"))
    expect(page.locator(".flash")).to_have_text("Your password was changed")
    expect(page.locator("#nav-logout")).to_have_text("Log out [legacy]")
    expect(page.locator("#search-input")).to_be_visible()
    watch.shot("password-changed")
    stored = db.execute("SELECT password_hash FROM users WHERE username = 'legacy'").fetchone()["password_hash"]
    assert stored.startswith("scrypt$")

    page.click("#nav-logout")
    expect(page.locator(".flash")).to_have_text("You were logged out")
    watch.shot("logged-out")

    page.click("#nav-login")
    expect(page).to_have_url(path_is("/login"))
    watch.shot("login-form-again")
    log_in(page, "legacy", "n3w-secret")
    expect(page).to_have_url(path_is("/"))
    expect(page.locator(".flash")).to_have_text("You were logged in")
    expect(page.locator("#nav-logout")).to_have_text("Log out [legacy]")
    watch.shot("logged-in-with-new-password")


# Every page, and the watch itself ##############################################


@pytest.mark.parametrize(
    "path, heading",
    [
        ("/about", "About ¿Who Knows?"),
        ("/login", "Log in"),
        ("/register", "Register"),
    ],
    ids=["about", "login", "register"],
)
def test_page_renders_cleanly(watch, page, path, heading):
    response = page.goto(path)
    assert response.status == 200
    expect(page.locator("h1")).to_have_text(heading)
    expect(page.locator("#nav-logo")).to_be_visible()
    expect(page.locator(".footer")).to_contain_text("¿Who Knows?")
    watch.shot(path.strip("/"))


def test_404_page(watch, page):
    # The document itself answers 404, and Chromium logs every 4xx load as a
    # console error, the document included: that one error is expected, for
    # this URL only. Everything the 404 page loads itself (its stylesheet)
    # must still load without any error.
    watch.expect_problem("HTTP error", r"^404 GET http://127\.0\.0\.1:\d+/no/such/page @ ")
    watch.expect_problem(
        "console error",
        r"^Failed to load resource: the server responded with a status of 404 "
        r"\(Not Found\) @ http://127\.0\.0\.1:\d+/no/such/page$",
    )
    response = page.goto("/no/such/page")
    assert response.status == 404
    expect(page.locator("h1")).to_have_text("404")
    expect(page.locator(".error")).to_have_text("There is no page at this address.")
    # The stylesheet loaded and applies (under the CSP, with nosniff).
    expect(page.locator(".error")).to_have_css("color", "rgb(164, 14, 38)")
    watch.shot("not-found")

    page.click("text=Back to search")
    expect(page).to_have_url(path_is("/"))
    watch.shot("back-to-search")


def test_watch_catches_csp_violations_and_errors(watch, page):
    """The watch every test relies on does see violations and errors."""
    page.goto("/about")
    watch.shot("about")

    def blocked(message):
        return "Content Security Policy" in message.text

    with page.expect_console_message(blocked):
        page.evaluate("""() => {
            const script = document.createElement('script');
            script.textContent = 'window.inlineRan = true';
            document.body.append(script);
        }""")
    with page.expect_console_message(blocked):
        page.evaluate("() => document.querySelector('h1').setAttribute('style', 'color: red')")
    with page.expect_event("pageerror"):
        page.evaluate("() => { setTimeout(() => { throw new Error('thrown on purpose') }, 0) }")
    page.wait_for_function("() => window.__csp.length === 2")
    assert page.evaluate("() => window.inlineRan") is None

    problems = watch.take_problems()
    kinds = sorted(kind for kind, _, _ in problems)
    assert kinds == ["CSP violation", "CSP violation", "console error", "console error", "uncaught exception"], problems
    violations = " ".join(text for kind, text, _ in problems if kind == "CSP violation")
    assert "script-src-elem" in violations and "style-src-attr" in violations
    assert any("thrown on purpose" in text for kind, text, _ in problems if kind == "uncaught exception")
