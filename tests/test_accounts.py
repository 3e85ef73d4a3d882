"""Accounts: the legacy register/login/logout scenarios, JSON clients, security."""

import hashlib
import io
import sqlite3
import threading
import time

import pytest
import webtest

import app as whoknows

JSON = {"Accept": "application/json"}


# Helpers, as in the legacy test suite ##########################################


def register(client, username, password, password2=None, email=None, headers=None):
    if password2 is None:
        password2 = password
    if email is None:
        email = f"{username}@example.com"
    response = client.post(
        "/api/register",
        {"username": username, "password": password, "password2": password2, "email": email},
        headers=headers,
        expect_errors=True,
    )
    return response.follow() if response.status_int == 303 else response


def login(client, username, password, headers=None):
    response = client.post(
        "/api/login", {"username": username, "password": password}, headers=headers, expect_errors=True
    )
    return response.follow() if response.status_int == 303 else response


def register_and_login(client, username, password):
    register(client, username, password)
    return login(client, username, password)


def logout(client):
    return client.get("/api/logout").follow()


# The legacy scenarios ##########################################################


def test_register(client):
    assert "You were successfully registered and can login now" in register(client, "user1", "default").text
    assert "The username is already taken" in register(client, "user1", "default").text
    assert "You have to enter a username" in register(client, "", "default").text
    assert "You have to enter a password" in register(client, "meh", "").text
    assert "The two passwords do not match" in register(client, "meh", "x", "y").text
    assert "You have to enter a valid email address" in register(client, "meh", "foo", email="broken").text


def test_login_logout(client):
    page = register_and_login(client, "user1", "default")
    assert "You were logged in" in page.text
    assert "Log out [user1]" in page.text and 'id="nav-logout"' in page.text
    page = logout(client)
    assert "You were logged out" in page.text and 'id="nav-login"' in page.text
    assert "Invalid password" in login(client, "user1", "wrongpassword").text
    assert "Invalid username" in login(client, "user2", "wrongpassword").text


# More of the same flows ########################################################


def test_register_success_redirects_to_login_and_stores_the_account(client, db):
    response = client.post(
        "/api/register",
        {"username": "anna", "email": "anna@example.com", "password": "secret123", "password2": "secret123"},
    )
    assert response.status_int == 303 and response.headers["Location"].endswith("/login")
    row = db.execute("SELECT username, email, password_hash FROM users").fetchone()
    assert (row["username"], row["email"]) == ("anna", "anna@example.com")
    assert row["password_hash"].startswith("scrypt$15$8$1$") and "secret123" not in row["password_hash"]


def test_flash_is_shown_once(client):
    register(client, "once", "secret123")
    assert "You were successfully registered" not in client.get("/login").text


def test_tampered_flash_cookie_is_ignored(client, app):
    client.set_cookie("flash", whoknows.sign(b'["real"]', bytes(app.secret_key)).replace("real", "fake"))
    assert "fake" not in client.get("/").text
    client.set_cookie("flash", "garbage.!!!")
    assert client.get("/").status_int == 200


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"username": "u" * 65}, "The username is too long (at most 64 characters)"),
        ({"email": "a@" + "b" * 253}, "The email address is too long (at most 254 characters)"),
        ({"password": "p" * 257, "password2": "p" * 257}, "The password is too long (at most 256 characters)"),
        ({"password": "abc", "password2": "abc"}, "The password is too short (at least 6 characters)"),
        ({"username": "tab\there"}, "The username may not contain control characters"),
        ({"username": "nul\x00"}, "username must not contain NUL characters"),
    ],
)
def test_register_limits_say_which_limit(client, db, fields, message):
    form = {"username": "valid", "email": "valid@example.com", "password": "secret123", "password2": "secret123"}
    form.update(fields)
    assert message in client.post("/api/register", form).text
    assert db.execute("SELECT count(*) AS n FROM users").fetchone()["n"] == 0


def test_email_already_registered(client):
    register(client, "first", "secret123", email="same@example.com")
    assert (
        "This email address is already registered"
        in register(client, "second", "secret123", email="SAME@example.com").text
    )


def test_usernames_compare_case_insensitively(client):
    register(client, "Alice", "secret123")
    assert "The username is already taken" in register(client, "alice", "secret123", email="x@example.com").text
    assert "Log out [Alice]" in login(client, "ALICE", "secret123").text


def test_logged_in_user_skips_login_and_register_pages(client):
    register_and_login(client, "user1", "default")
    for path in ("/login", "/register"):
        response = client.get(path)
        assert response.status_int == 303 and response.headers["Location"].endswith("/")


def test_login_and_register_forms_keep_the_legacy_fields(client):
    login_page = client.get("/login").text
    for marker in ('action="/api/login"', 'name="username"', 'name="password"', 'id="login-button"'):
        assert marker in login_page
    register_page = client.get("/register").text
    for name in ("username", "email", "password", "password2"):
        assert f'name="{name}"' in register_page
    assert 'action="/api/register"' in register_page


def test_logout_accepts_post_and_deletes_the_session(client, db):
    register_and_login(client, "user1", "default")
    assert db.execute("SELECT count(*) AS n FROM sessions").fetchone()["n"] == 1
    response = client.post("/api/logout")
    assert response.status_int == 303
    assert db.execute("SELECT count(*) AS n FROM sessions").fetchone()["n"] == 0
    assert "You were logged out" in response.follow().text


# JSON clients ##################################################################


def test_json_register_login_logout(client):
    response = client.post(
        "/api/register", {"username": "j", "email": "j@example.com", "password": "secret123"}, headers=JSON
    )
    assert response.status_int == 200
    assert response.json == {"statusCode": 200, "message": "You were successfully registered and can login now"}
    response = client.post("/api/login", {"username": "j", "password": "secret123"}, headers=JSON)
    assert response.json == {"statusCode": 200, "message": "You were logged in"}
    assert "session" in client.cookies
    response = client.get("/api/logout", headers=JSON)
    assert response.json == {"statusCode": 200, "message": "You were logged out"}


@pytest.mark.parametrize(
    "form, field, message",
    [
        ({"username": "", "email": "a@b.c", "password": "secret123"}, "username", "You have to enter a username"),
        (
            {"username": "a", "email": "nope", "password": "secret123"},
            "email",
            "You have to enter a valid email address",
        ),
        ({"username": "a", "email": "a@b.c", "password": ""}, "password", "You have to enter a password"),
        (
            {"username": "a", "email": "a@b.c", "password": "secret123", "password2": "other123"},
            "password2",
            "The two passwords do not match",
        ),
    ],
)
def test_json_register_failures_are_422_detail(client, form, field, message):
    response = client.post("/api/register", form, headers=JSON, status=422)
    detail = response.json["detail"]
    assert len(detail) == 1 and detail[0]["loc"] == ["body", field] and detail[0]["msg"] == message
    assert detail[0]["type"]


def test_json_taken_and_login_failures_are_422_detail(client):
    register(client, "taken", "secret123")
    taken = register(client, "taken", "secret123", email="other@example.com", headers=JSON)
    assert taken.status_int == 422 and taken.json["detail"][0]["msg"] == "The username is already taken"
    bad_user = client.post("/api/login", {"username": "nobody", "password": "x"}, headers=JSON, status=422)
    assert bad_user.json["detail"][0] == {"loc": ["body", "username"], "msg": "Invalid username", "type": "value_error"}
    bad_password = client.post("/api/login", {"username": "taken", "password": "x"}, headers=JSON, status=422)
    assert bad_password.json["detail"][0]["loc"] == ["body", "password"]
    assert bad_password.json["detail"][0]["msg"] == "Invalid password"


def test_accept_preference_decides_json(client):
    form = {"username": "", "email": "", "password": ""}
    assert (
        client.post("/api/register", form, headers={"Accept": "text/html,application/json;q=0.9"}).content_type
        == "text/html"
    )
    assert (
        client.post(
            "/api/register", form, headers={"Accept": "application/json, text/html;q=0.5"}, status=422
        ).content_type
        == "application/json"
    )


# Legacy MD5 accounts ###########################################################


def import_legacy_user(app, tmp_path, username="legacy", password="password"):
    path = tmp_path / "whoknows.db"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE users (id INTEGER PRIMARY KEY, username TEXT, email TEXT, password TEXT);"
        "CREATE TABLE pages (title TEXT, url TEXT, language TEXT, last_updated TEXT, content TEXT);"
    )
    db.execute(
        "INSERT INTO users (username, email, password) VALUES (?, ?, ?)",
        (username, f"{username}@example.com", hashlib.md5(password.encode()).hexdigest()),
    )
    db.commit()
    db.close()
    whoknows.import_file(app.db, path, out=io.StringIO())


def test_md5_upgrade_end_to_end(app, client, db, tmp_path):
    import_legacy_user(app, tmp_path)
    response = client.post("/api/login", {"username": "legacy", "password": "password"})
    assert response.headers["Location"].endswith("/change-password")
    page = response.follow()
    assert "You were logged in" in page.text and 'id="forced-change"' in page.text

    # Nothing else works before the change.
    assert client.get("/").headers["Location"].endswith("/change-password")
    assert client.get("/about").status_int == 303
    blocked = client.get("/api/search", {"q": "x"}, status=403)
    assert "must be changed" in blocked.json["message"]

    wrong = client.post(
        "/api/change-password", {"old_password": "nope", "password": "n3w-secret", "password2": "n3w-secret"}
    )
    assert "Your current password is wrong" in wrong.text
    done = client.post(
        "/api/change-password", {"old_password": "password", "password": "n3w-secret", "password2": "n3w-secret"}
    )
    assert done.headers["Location"].endswith("/")
    assert "Your password was changed" in done.follow().text
    stored = db.execute("SELECT password_hash FROM users WHERE username = 'legacy'").fetchone()["password_hash"]
    assert stored.startswith("scrypt$") and "5f4dcc3b" not in stored
    assert client.get("/").status_int == 200

    logout(client)
    assert "Invalid password" in login(client, "legacy", "password").text
    assert "Log out [legacy]" in login(client, "legacy", "n3w-secret").text


def test_json_login_for_a_legacy_account_says_to_change_the_password(app, client, tmp_path):
    import_legacy_user(app, tmp_path)
    response = client.post("/api/login", {"username": "legacy", "password": "password"}, headers=JSON)
    assert response.status_int == 200 and "must be changed" in response.json["message"]


def test_voluntary_password_change_needs_the_old_password_and_ends_other_sessions(app, client, db):
    register_and_login(client, "user1", "default")
    other = webtest.TestApp(app)
    login(other, "user1", "default")
    assert "Log out [user1]" in other.get("/").text
    missing = client.post("/api/change-password", {"password": "brand-new", "password2": "brand-new"})
    assert "You have to enter your current password" in missing.text
    same = client.post(
        "/api/change-password", {"old_password": "default", "password": "default", "password2": "default"}
    )
    assert "The new password must differ from the current one" in same.text
    client.post("/api/change-password", {"old_password": "default", "password": "brand-new", "password2": "brand-new"})
    assert "Log out [user1]" in client.get("/").text
    assert 'id="nav-login"' in other.get("/").text
    assert db.execute("SELECT count(*) AS n FROM sessions").fetchone()["n"] == 1


def test_change_password_requires_login(client):
    assert client.get("/change-password").headers["Location"].endswith("/login")
    assert client.get("/change-password", headers=JSON).headers["Location"].endswith("/login")  # a page redirects
    assert client.post("/api/change-password", {}, headers=JSON, status=401).json["statusCode"] == 401


# Sessions ######################################################################


def session_cookie_header(response):
    return next(v for k, v in response.headerlist if k == "Set-Cookie" and v.startswith("session="))


def test_session_cookie_flags(client, app):
    register(client, "user1", "default")
    header = session_cookie_header(client.post("/api/login", {"username": "user1", "password": "default"}))
    assert "HttpOnly" in header and "SameSite=lax" in header.replace("Lax", "lax")
    assert "Secure" not in header and "Max-Age=" in header
    https = webtest.TestApp(app, extra_environ={"wsgi.url_scheme": "https"})
    header = session_cookie_header(https.post("/api/login", {"username": "user1", "password": "default"}))
    assert "Secure" in header


def test_secure_cookie_when_configured(make_app):
    client = webtest.TestApp(make_app(cookie_secure=True))
    register(client, "user1", "default")
    assert "Secure" in session_cookie_header(client.post("/api/login", {"username": "user1", "password": "default"}))


def session_token(response):
    return session_cookie_header(response).split(";")[0].split("=", 1)[1]


def test_session_rotates_on_login_and_a_planted_id_is_useless(client, db):
    register(client, "user1", "default")
    form = {"username": "user1", "password": "default"}
    planted = client.post("/api/login", form, headers={"Cookie": "session=planted-by-attacker"})
    first = session_token(planted)
    assert first != "planted-by-attacker"
    second = session_token(client.post("/api/login", form, headers={"Cookie": f"session={first}"}))
    assert second != first
    stored = [bytes(r["token_hash"]) for r in db.execute("SELECT token_hash FROM sessions")]
    assert stored == [hashlib.sha256(second.encode()).digest()]  # a hash, never the token


def test_expired_sessions_end_and_are_cleaned_up(app, client, db):
    register_and_login(client, "user1", "default")
    db.execute("UPDATE sessions SET expires_at = now() - interval '1 second'")
    assert 'id="nav-login"' in client.get("/").text
    other = webtest.TestApp(app)
    login(other, "user1", "default")
    assert db.execute("SELECT count(*) AS n FROM sessions WHERE expires_at <= now()").fetchone()["n"] == 0


# Cross-site requests, brute force, escaping ####################################


@pytest.mark.parametrize(
    "headers, status",
    [
        ({"Sec-Fetch-Site": "cross-site"}, 403),
        ({"Sec-Fetch-Site": "same-site"}, 403),
        ({"Origin": "https://evil.example"}, 403),
        ({"Origin": "null"}, 403),
        ({"Sec-Fetch-Site": "same-origin", "Origin": "http://localhost:80"}, 200),
        ({"Sec-Fetch-Site": "none"}, 200),
        ({"Origin": "http://localhost:80"}, 200),
        ({}, 200),
    ],
)
def test_cross_site_posts_are_refused(client, db, headers, status):
    response = client.post(
        "/api/register",
        {"username": "csrf", "email": "c@example.com", "password": "secret123"},
        headers={**JSON, **headers},
        expect_errors=True,
    )
    assert response.status_int == status
    assert db.execute("SELECT count(*) AS n FROM users").fetchone()["n"] == (1 if status == 200 else 0)
    if status == 403:
        assert response.json["message"] == "Cross-site request refused."


def test_cross_site_logout_post_and_html_answer(client):
    page = client.post("/api/logout", headers={"Sec-Fetch-Site": "cross-site", "Accept": "text/html"}, status=403)
    assert "Cross-site request refused." in page.text and page.content_type == "text/html"


def test_repeated_failed_logins_get_429(client, app, db):
    register(client, "victim", "default")
    for _ in range(app.settings.login_max_failures):
        assert "Invalid password" in login(client, "victim", "guess").text
    locked = client.post("/api/login", {"username": "victim", "password": "default"}, status=429)
    assert "Too many failed logins. Try again in 15 minutes." in locked.text
    assert int(locked.headers["Retry-After"]) > 0
    as_json = client.post("/api/login", {"username": "VICTIM", "password": "x"}, headers=JSON, status=429)
    assert as_json.json["statusCode"] == 429
    other_address = webtest.TestApp(app, extra_environ={"REMOTE_ADDR": "192.0.2.7"})
    assert "You were logged in" in login(other_address, "victim", "default").text
    row = db.execute("SELECT username, client, failures FROM login_failures").fetchone()
    assert row["username"] == "victim" and row["failures"] == app.settings.login_max_failures
    assert "127.0.0.1" not in row["client"]


def test_a_success_resets_the_failure_count(client, db):
    register(client, "user1", "default")
    login(client, "user1", "wrong")
    login(client, "user1", "default")
    assert db.execute("SELECT count(*) AS n FROM login_failures").fetchone()["n"] == 0


def test_usernames_are_escaped_everywhere(client):
    name = "<script>alert(1)</script>"
    register(client, name, "default")
    page = login(client, name, "default")
    assert "<script>alert(1)</script>" not in page.text
    assert "Log out [&lt;script&gt;alert(1)&lt;/script&gt;]" in page.text
    failed = client.post("/api/register", {"username": name, "email": "bad"})
    assert "<script>" not in failed.text and "&lt;script&gt;" in failed.text


def test_security_headers_on_redirects(client):
    response = client.get("/api/logout")
    assert response.status_int == 303
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]


# Races and defaults ############################################################


def test_concurrent_registration_of_one_name_gives_one_account(app, db):
    results, barrier = [], threading.Barrier(8)

    def attempt(n):
        client = webtest.TestApp(app)
        barrier.wait()
        response = client.post(
            "/api/register",
            {"username": "racer", "email": f"r{n}@example.com", "password": "secret123"},
            headers=JSON,
            expect_errors=True,
        )
        results.append((response.status_int, response.json))

    threads = [threading.Thread(target=attempt, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    statuses = sorted(status for status, _ in results)
    assert statuses == [200] + [422] * 7
    assert all(body["detail"][0]["msg"] == "The username is already taken" for status, body in results if status == 422)
    assert db.execute("SELECT count(*) AS n FROM users").fetchone()["n"] == 1


def test_migrations_create_no_accounts(make_database):
    import psycopg

    url = make_database()
    whoknows.apply_migrations(url)
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM users").fetchone()[0] == 0


def test_password_hashes_are_salted_and_verify():
    first, second = whoknows.hash_password("same"), whoknows.hash_password("same")
    assert first != second
    assert whoknows.check_password(first, "same") and not whoknows.check_password(first, "other")
    assert whoknows.check_password("md5$" + hashlib.md5(b"pw").hexdigest(), "pw")
    assert not whoknows.check_password("md5$" + hashlib.md5(b"pw").hexdigest(), "PW")


def test_hash_slots_go_to_waiters_in_their_order_of_arrival():
    """A freed slot goes to the first waiter, never to a newcomer (threading's
    Semaphore lets the newcomer overtake, and the overtaken waiter queues again
    at the back: a soak saw logins wait over 10 s)."""
    slots = whoknows.FairSlots(1)
    assert slots.acquire(timeout=0)
    order, threads, go = [], [], threading.Event()

    def waiter(name):
        if slots.acquire(timeout=10):
            order.append(name)
            go.wait(10)  # "a" holds its slot until the newcomer has tried
            slots.release()

    for name in "abc":
        threads.append(threading.Thread(target=waiter, args=(name,)))
        threads[-1].start()
        deadline = time.monotonic() + 10
        while len(slots._waiting) < len(threads) and time.monotonic() < deadline:
            time.sleep(0.001)
    assert len(slots._waiting) == 3
    slots.release()
    try:
        assert not slots.acquire(timeout=0)  # a newcomer does not take the slot handed to "a"
    finally:
        go.set()
        for thread in threads:
            thread.join()
    assert order == ["a", "b", "c"]
    assert slots.acquire(timeout=0)  # the last release freed it
    slots.release()
    with pytest.raises(ValueError):
        slots.release()  # more releases than acquisitions


def test_logins_beyond_the_hash_queue_get_a_503_and_change_nothing(client, db, monkeypatch):
    register(client, "queued", "secret123")
    monkeypatch.setattr(whoknows, "HASH_WAIT_SECONDS", 0.2)
    held = [whoknows._hash_slots.acquire(timeout=5) for _ in range(2)]  # both slots busy
    try:
        assert held == [True, True]
        response = register(client, "late", "secret123", headers=JSON)
        assert response.status_int == 503 and response.headers["Retry-After"] == "1"
        assert response.json["message"] == "The server is busy right now. Please try again in a moment."
        page = client.post("/api/login", {"username": "queued", "password": "secret123"}, status=503)
        assert "The server is busy right now" in page.text
    finally:
        for taken in held:
            if taken:
                whoknows._hash_slots.release()
    assert db.execute("SELECT count(*) AS n FROM users WHERE username = 'late'").fetchone()["n"] == 0
    assert db.execute("SELECT count(*) AS n FROM login_failures").fetchone()["n"] == 0
    assert "session" not in client.cookies
    assert client.post("/api/login", {"username": "queued", "password": "secret123"}, headers=JSON).status_int == 200


def test_registrations_waiting_for_their_hash_hold_no_database_connection(make_app, db):
    """A queued hash must not pin a pool connection: with a pool of 2, two
    registrations waiting for their hashes leave a search its connection."""
    small = make_app(pool_max_size=2, pool_timeout=1)
    small.db.pool().wait(10)
    clients = [webtest.TestApp(small) for _ in range(3)]
    assert clients[0].get("/api/search?q=anything").status_int == 200
    responses = []
    waiters = [
        threading.Thread(target=lambda c=c, n=n: responses.append(register(c, n, "secret123", headers=JSON)))
        for c, n in zip(clients[1:], ("patient", "patienter"))
    ]
    held = [whoknows._hash_slots.acquire(timeout=5) for _ in range(2)]  # both slots busy
    try:
        assert held == [True, True]
        for waiter in waiters:
            waiter.start()
        deadline = time.monotonic() + 10
        while len(whoknows._hash_slots._waiting) < 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert len(whoknows._hash_slots._waiting) == 2  # both registrations wait for their hash
        # Another query: a repeated one would come from the result cache, without the database.
        assert clients[0].get("/api/search?q=different", expect_errors=True).status_int == 200
    finally:
        for taken in held:
            if taken:
                whoknows._hash_slots.release()
        for waiter in waiters:
            if waiter.ident is not None:
                waiter.join(10)
    assert [response.status_int for response in responses] == [200, 200]
    assert db.execute("SELECT count(*) AS n FROM users WHERE username LIKE 'patient%'").fetchone()["n"] == 2


def test_multipart_forms_are_decoded_once(client, db):
    """Browsers may post multipart/form-data; Bottle decodes those fields itself."""
    fields = [("username", "Åse"), ("email", "åse@example.org"), ("password", "hemmeligt"), ("password2", "hemmeligt")]
    response = client.post("/api/register", upload_files=[], params=fields, content_type="multipart/form-data")
    assert response.status_int == 303
    assert db.execute("SELECT username FROM users").fetchone()["username"] == "Åse"
    login = client.post(
        "/api/login", params=[("username", "Åse"), ("password", "hemmeligt")], content_type="multipart/form-data"
    )
    assert login.status_int == 303 and "Log out [Åse]" in login.follow().text
