"""X-Forwarded-For and X-Forwarded-Proto are believed only from TRUSTED_PROXIES:
the login throttle, /metrics and the request log see the real client behind
the proxy, and a client cannot pick its own address by sending the header."""

import pytest
import webtest

import app as whoknows

PROXY = "10.0.0.5"
PROXIES = whoknows.networks("TRUSTED_PROXIES", "10.0.0.0/24")


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("198.51.100.7", "198.51.100.7"),
        ("203.0.113.1, 198.51.100.7", "198.51.100.7"),  # the left one is the client's to forge
        ("198.51.100.7, 10.0.0.9", "198.51.100.7"),  # a second proxy of ours is skipped
        ("10.0.0.9, 10.0.0.8", "10.0.0.9"),  # only proxies: the leftmost
        ("not-an-address", None),
        ("198.51.100.7, garbage", None),
        ("", None),
        (None, None),
    ],
)
def test_forwarded_client(header, expected):
    assert whoknows.forwarded_client(header, PROXIES) == expected


def seen_address(app, peer, forwarded_for=None, proto=None):
    """The client address and scheme the app makes of one request."""
    seen = {}

    def probe():
        environ = whoknows.bottle.request.environ
        seen.update(address=environ["REMOTE_ADDR"], peer=environ["whoknows.peer"])
        seen.update(scheme=whoknows.bottle.request.urlparts.scheme, forwarded="HTTP_X_FORWARDED_FOR" in environ)
        return "ok"

    app.route("/_probe", "GET", probe)
    headers = {}
    if forwarded_for:
        headers["X-Forwarded-For"] = forwarded_for
    if proto:
        headers["X-Forwarded-Proto"] = proto
    webtest.TestApp(app).get("/_probe", headers=headers, extra_environ={"REMOTE_ADDR": peer})
    return seen


def test_the_forwarded_client_is_believed_from_a_trusted_proxy(make_app):
    app = make_app(trusted_proxies=PROXIES)
    seen = seen_address(app, PROXY, "198.51.100.7", "https")
    assert seen == {"address": "198.51.100.7", "peer": PROXY, "scheme": "https", "forwarded": False}


@pytest.mark.parametrize("proxies", [(), PROXIES], ids=["none-trusted", "other-peer"])
def test_forwarded_headers_from_anyone_else_are_dropped(make_app, proxies):
    app = make_app(trusted_proxies=proxies)
    seen = seen_address(app, "192.0.2.44", "198.51.100.7", "https")
    assert seen == {"address": "192.0.2.44", "peer": "192.0.2.44", "scheme": "http", "forwarded": False}


def register(client):
    form = {"username": "victim", "email": "v@example.org", "password": "default", "password2": "default"}
    client.post("/api/register", form, headers={"Accept": "application/json"}, status=200)


def failed_login(client, environ, forwarded_for):
    client.post(
        "/api/login",
        {"username": "victim", "password": "guess"},
        headers={"X-Forwarded-For": forwarded_for, "Accept": "application/json"},
        extra_environ=environ,
        status=(200, 422, 429),
    )


def test_the_login_throttle_counts_the_client_behind_the_proxy(make_app, db):
    app = make_app(trusted_proxies=PROXIES)
    client = webtest.TestApp(app)
    register(client)
    behind = {"REMOTE_ADDR": PROXY}
    for _ in range(app.settings.login_max_failures):
        failed_login(client, behind, "198.51.100.7")
    locked = client.post(
        "/api/login",
        {"username": "victim", "password": "default"},
        headers={"X-Forwarded-For": "198.51.100.7"},
        extra_environ=behind,
        status=429,
    )
    assert "Too many failed logins" in locked.text
    # Another client behind the same proxy is not locked out with it.
    other = client.post(
        "/api/login",
        {"username": "victim", "password": "default"},
        headers={"X-Forwarded-For": "198.51.100.8", "Accept": "application/json"},
        extra_environ=behind,
        status=200,
    )
    assert other.json["message"] == "You were logged in"


def test_a_client_cannot_escape_the_throttle_by_forging_x_forwarded_for(make_app):
    app = make_app(trusted_proxies=PROXIES)
    client = webtest.TestApp(app)
    register(client)
    direct = {"REMOTE_ADDR": "192.0.2.44"}  # not through the proxy
    for n in range(app.settings.login_max_failures):
        failed_login(client, direct, f"198.51.100.{n}")  # a new address each time
    client.post(
        "/api/login",
        {"username": "victim", "password": "default"},
        headers={"X-Forwarded-For": "198.51.100.200"},
        extra_environ=direct,
        status=429,
    )


def test_metrics_allow_checks_the_client_not_the_proxy(make_app):
    app = make_app(trusted_proxies=PROXIES, metrics_allow=whoknows.networks("METRICS_ALLOW", "127.0.0.1/32"))
    client = webtest.TestApp(app)
    # The proxy itself is not allowed, and neither is an outside client behind it.
    client.get(
        "/metrics", headers={"X-Forwarded-For": "198.51.100.7"}, extra_environ={"REMOTE_ADDR": PROXY}, status=403
    )
    client.get("/metrics", headers={"X-Forwarded-For": "127.0.0.1"}, extra_environ={"REMOTE_ADDR": PROXY}, status=200)
    client.get(
        "/metrics", headers={"X-Forwarded-For": "127.0.0.1"}, extra_environ={"REMOTE_ADDR": "192.0.2.1"}, status=403
    )
