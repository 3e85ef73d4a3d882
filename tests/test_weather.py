"""The weather page and API, against a local fake of the provider (no internet).

The fake is a real HTTP server on 127.0.0.1 whose answers each test sets:
normal JSON, garbage, an error status, too slow, or down (its port closed).
"""

import copy
import datetime as dt
import http.server
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import webtest

import app as whoknows

ROOT = Path(__file__).resolve().parent.parent

# Shaped like a real Open-Meteo answer to the app's request.
ANSWER = {
    "latitude": 55.68,
    "longitude": 12.57,
    "generationtime_ms": 0.06,
    "utc_offset_seconds": 3600,
    "timezone": "Europe/Copenhagen",
    "timezone_abbreviation": "GMT+1",
    "elevation": 9.0,
    "current_units": {
        "time": "iso8601",
        "interval": "seconds",
        "temperature_2m": "°C",
        "weather_code": "wmo code",
        "wind_speed_10m": "km/h",
    },
    "current": {
        "time": "2026-11-27T14:00",
        "interval": 900,
        "temperature_2m": 4.3,
        "weather_code": 3,
        "wind_speed_10m": 14.2,
    },
    "daily_units": {
        "time": "iso8601",
        "weather_code": "wmo code",
        "temperature_2m_max": "°C",
        "temperature_2m_min": "°C",
        "precipitation_sum": "mm",
    },
    "daily": {
        "time": ["2026-11-27", "2026-11-28", "2026-11-29"],
        "weather_code": [3, 61, 95],
        "temperature_2m_max": [6.1, 7.0, 5.5],
        "temperature_2m_min": [2.0, 3.4, -1.2],
        "precipitation_sum": [0.0, 4.2, 11.3],
    },
}
DELETE = object()


def answer_with(**changes):
    """Return ANSWER as JSON bytes with changes: current__temperature_2m=... (DELETE removes)."""
    doc = copy.deepcopy(ANSWER)
    for path, value in changes.items():
        *parents, name = path.split("__")
        target = doc
        for parent in parents:
            target = target[parent]
        if value is DELETE:
            del target[name]
        else:
            target[name] = value
    return json.dumps(doc).encode()


class FakeProvider:
    """A stand-in for Open-Meteo on 127.0.0.1:<free port>; the test sets its answer."""

    def __init__(self):
        self.status, self.body, self.delay = 200, answer_with(), 0.0
        self.requests = []  # path and query of every request received
        self.lock = threading.Lock()
        self.stopped = False
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                with fake.lock:
                    fake.requests.append(self.path)
                    status, body, delay = fake.status, fake.body, fake.delay
                time.sleep(delay)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json; charset=utf-8")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the app stopped waiting (the slow case)
                    pass

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, body=None, status=200, delay=0.0):
        """Set what every following request gets."""
        with self.lock:
            self.body = answer_with() if body is None else body
            self.status, self.delay = status, delay

    def stop(self):
        """Shut the server down and close its port: the provider is down."""
        if not self.stopped:
            self.stopped = True
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture
def provider():
    """A fake provider on 127.0.0.1."""
    fake = FakeProvider()
    yield fake
    fake.stop()


@pytest.fixture
def weather_app(make_app, provider):
    """Factory: an app pointed at the fake provider, with a short timeout and the given settings."""

    def make(**changes):
        settings = {"weather_base_url": provider.url, "weather_timeout": 0.5, "weather_cache_seconds": 600}
        return make_app(**{**settings, **changes})

    return make


@pytest.fixture
def app(weather_app):
    """The app under test: pointed at the fake provider."""
    return weather_app()


def age_cache(db, interval="1 hour"):
    """Make the cached weather older by interval; return its new fetched_at."""
    row = db.execute(
        "UPDATE weather_cache SET fetched_at = fetched_at - %s::interval RETURNING fetched_at", (interval,)
    ).fetchone()
    return row["fetched_at"]


def warnings_logged(caplog):
    """Return the app's warning lines about the weather provider."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "whoknows" and r.levelname == "WARNING" and "weather provider" in r.getMessage()
    ]


def iso(stamp):
    """Return a timestamp as the API shows it."""
    return stamp.astimezone(dt.UTC).isoformat(timespec="seconds")


FAILURES = {
    "down": lambda fake: fake.stop(),
    "http 500": lambda fake: fake.answer(b'{"error": true, "reason": "Internal error"}', status=500),
    "not json": lambda fake: fake.answer(b"<html><body>502 Bad Gateway</body></html>"),
    "wrong shape": lambda fake: fake.answer(b'{"error": false, "results": []}'),
    "slower than the timeout": lambda fake: fake.answer(delay=2.0),
}


# A fresh fetch ################################################################


def test_a_fresh_fetch_asks_the_provider_once_and_serves_the_data(app, client, provider, db):
    before = dt.datetime.now(dt.UTC)
    response = client.get("/api/weather")
    assert response.status_code == 200 and response.content_type == "application/json"
    data = response.json["data"]
    assert set(response.json) == {"data"}
    assert data["location"] == "København" and data["latitude"] == 55.6761 and data["longitude"] == 12.5683
    assert data["current"] == {
        "time": "2026-11-27T14:00",
        "temperature_c": 4.3,
        "wind_speed_kmh": 14.2,
        "weather_code": 3,
        "description": "Overcast",
    }
    assert data["forecast"] == [
        {
            "date": "2026-11-27",
            "min_c": 2.0,
            "max_c": 6.1,
            "precipitation_mm": 0.0,
            "weather_code": 3,
            "description": "Overcast",
        },
        {
            "date": "2026-11-28",
            "min_c": 3.4,
            "max_c": 7.0,
            "precipitation_mm": 4.2,
            "weather_code": 61,
            "description": "Slight rain",
        },
        {
            "date": "2026-11-29",
            "min_c": -1.2,
            "max_c": 5.5,
            "precipitation_mm": 11.3,
            "weather_code": 95,
            "description": "Thunderstorm",
        },
    ]
    assert data["stale"] is False and data["source"] == "Open-Meteo" and data["timezone"] == "Europe/Copenhagen"
    fetched_at = dt.datetime.fromisoformat(data["fetched_at"])
    assert before - dt.timedelta(seconds=5) <= fetched_at <= dt.datetime.now(dt.UTC) + dt.timedelta(seconds=5)

    assert len(provider.requests) == 1
    url = urlsplit(provider.requests[0])
    assert url.path == "/v1/forecast"
    assert "timezone=Europe%2FCopenhagen" in url.query and "current=temperature_2m,weather_code," in url.query
    assert {name: values[0] for name, values in parse_qs(url.query).items()} == {
        "latitude": "55.6761",
        "longitude": "12.5683",
        "current": "temperature_2m,weather_code,wind_speed_10m",
        "daily": "weather_code,temperature_2m_max,temperature_2m_min,precipitation_sum",
        "timezone": "Europe/Copenhagen",
        "forecast_days": "3",
    }
    row = db.execute("SELECT location, data, fetched_at FROM weather_cache").fetchone()
    assert row["location"] == app.weather.key and row["data"]["current"]["temperature_c"] == 4.3
    assert iso(row["fetched_at"]) == data["fetched_at"]


def test_the_configured_place_is_asked_for(weather_app, provider):
    place = {"weather_latitude": 56.1567, "weather_longitude": 10.2108, "weather_location": "Aarhus"}
    client = webtest.TestApp(weather_app(**place))
    data = client.get("/api/weather").json["data"]
    assert (data["location"], data["latitude"], data["longitude"]) == ("Aarhus", 56.1567, 10.2108)
    query = parse_qs(urlsplit(provider.requests[0]).query)
    assert (query["latitude"], query["longitude"]) == (["56.1567"], ["10.2108"])


def test_the_weather_page_shows_the_data_in_the_layout(client, provider):
    page = client.get("/weather")
    assert page.status_code == 200 and page.content_type == "text/html"
    text = page.text
    assert "<h1>Weather in København</h1>" in text
    assert "4.3 °C" in text and "Overcast, wind 14 km/h" in text
    for day, description, low, high, rain in (
        ("Friday 27 November", "Overcast", "2.0", "6.1", "0.0"),
        ("Saturday 28 November", "Slight rain", "3.4", "7.0", "4.2"),
        ("Sunday 29 November", "Thunderstorm", "-1.2", "5.5", "11.3"),
    ):
        row = re.search(rf'<time datetime="[0-9-]+">{day}</time>.*?</tr>', text, re.S)
        assert row, day
        assert description in row.group(0) and f"{low} °C" in row.group(0) and f"{high} °C" in row.group(0)
        assert f"{rain} mm" in row.group(0)
    assert "Open-Meteo" in text and 'id="weather-stale"' not in text
    assert 'id="nav-logo"' in text and 'class="footer"' in text and 'id="nav-weather"' in text
    assert len(provider.requests) == 1


def test_the_weather_page_holds_to_the_csp(client, provider):
    page = client.get("/weather")
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "style-src 'self'" in csp and "unsafe-inline" not in csp
    assert "<script" not in page.text and "<style" not in page.text
    assert not re.search(r"\sstyle=|\son[a-z]+=", page.text), "no inline style or event handler"
    stylesheet = client.get("/static/style.css").text
    for name in set(re.findall(r'class="([^"]+)"', page.text)):
        if name.startswith("weather"):
            assert f".{name}" in stylesheet, name


def test_the_nav_links_to_the_weather_next_to_about(client):
    text = client.get("/about").text
    about, weather = text.index('id="nav-about"'), text.index('<a id="nav-weather" href="/weather">Weather</a>')
    assert about < weather < text.index('class="nav-spacer"')


# The cache ####################################################################


def test_a_fresh_cache_is_served_without_asking_the_provider(client, provider):
    first = client.get("/api/weather").json["data"]
    provider.answer(answer_with(current__temperature_2m=9.9))
    assert client.get("/api/weather").json["data"] == first
    assert "4.3 °C" in client.get("/weather").text
    assert len(provider.requests) == 1


@pytest.mark.parametrize("expire", ["cache seconds 0", "row aged past the cache time"])
def test_an_expired_cache_is_fetched_again(client, weather_app, provider, db, expire):
    first = client.get("/api/weather").json["data"]
    provider.answer(answer_with(current__temperature_2m=9.9))
    if expire == "cache seconds 0":  # another process, with the cache off, on the same cache table
        client = webtest.TestApp(weather_app(weather_cache_seconds=0))
    else:
        age_cache(db, "601 seconds")
    second = client.get("/api/weather").json["data"]
    assert len(provider.requests) == 2
    assert second["current"]["temperature_c"] == 9.9 and second["stale"] is False
    assert second["fetched_at"] >= first["fetched_at"]
    stored = db.execute("SELECT data, fetched_at FROM weather_cache").fetchall()
    assert len(stored) == 1 and stored[0]["data"]["current"]["temperature_c"] == 9.9


def test_a_copy_just_inside_the_cache_time_is_still_fresh(client, provider, db):
    client.get("/api/weather")
    age_cache(db, "590 seconds")
    assert client.get("/api/weather").json["data"]["stale"] is False
    assert len(provider.requests) == 1


# Provider failures ############################################################


@pytest.mark.parametrize("failure", FAILURES)
def test_a_failing_provider_with_a_stale_copy_serves_it_marked_stale(client, provider, db, caplog, failure):
    first = client.get("/api/weather").json["data"]
    fetched_at = age_cache(db)
    FAILURES[failure](provider)
    response = client.get("/api/weather")
    assert response.status_code == 200
    data = response.json["data"]
    assert data["stale"] is True and data["fetched_at"] == iso(fetched_at)
    assert {k: v for k, v in data.items() if k not in ("stale", "fetched_at")} == {
        k: v for k, v in first.items() if k not in ("stale", "fetched_at")
    }
    assert len(warnings_logged(caplog)) == 1 and "serving the stale copy" in warnings_logged(caplog)[0]

    page = client.get("/weather")
    assert page.status_code == 200
    assert 'id="weather-stale"' in page.text and "may be out of date" in page.text and "4.3 °C" in page.text
    # The provider is left alone for a while after a failure: one more
    # request at most (the failed one), and one log line.
    assert len(provider.requests) == (1 if failure == "down" else 2)
    assert len(warnings_logged(caplog)) == 1


@pytest.mark.parametrize("failure", FAILURES)
def test_a_failing_provider_with_nothing_cached_is_a_503(client, provider, db, caplog, failure):
    FAILURES[failure](provider)
    response = client.get("/api/weather", status=503)
    assert response.content_type == "application/json"
    assert response.json == {"statusCode": 503, "message": whoknows.WEATHER_UNAVAILABLE_MESSAGE}
    assert "weather service is not answering" in response.json["message"]
    assert response.headers["Retry-After"] == str(whoknows.WEATHER_RETRY_SECONDS)

    page = client.get("/weather", status=503)
    assert page.content_type == "text/html"
    assert "<h1>503</h1>" in page.text and whoknows.WEATHER_UNAVAILABLE_MESSAGE in page.text
    assert 'id="nav-logo"' in page.text and 'class="footer"' in page.text
    assert db.execute("SELECT count(*) AS n FROM weather_cache").fetchone()["n"] == 0
    lines = warnings_logged(caplog)
    assert len(lines) == 1 and "nothing cached" in lines[0], lines


MALFORMED = {
    "empty body": b"",
    "not utf-8": b"\xff\xfe\x00{",
    "a json list": b"[]",
    "json null": b"null",
    "no current": answer_with(current=DELETE),
    "no daily": answer_with(daily=DELETE),
    "current is a list": answer_with(current=[1, 2]),
    "temperature as text": answer_with(current__temperature_2m="4.3"),
    "temperature true": answer_with(current__temperature_2m=True),
    "temperature NaN": answer_with(current__temperature_2m=float("nan")),
    "temperature missing": answer_with(current__temperature_2m=DELETE),
    "wind null": answer_with(current__wind_speed_10m=None),
    "weather code fractional": answer_with(current__weather_code=3.5),
    "weather code out of range": answer_with(current__weather_code=150),
    "time not a time": answer_with(current__time="yesterday"),
    "time a number": answer_with(current__time=1764248400),
    "two days only": answer_with(daily__time=["2026-11-27", "2026-11-28"]),
    "daily dates not dates": answer_with(daily__time=["today", "tomorrow", "later"]),
    "daily column not a list": answer_with(daily__temperature_2m_max="6.1"),
    "daily value null": answer_with(daily__temperature_2m_min=[2.0, None, -1.2]),
    "daily code text": answer_with(daily__weather_code=["3", 61, 95]),
    "minimum above maximum": answer_with(daily__temperature_2m_min=[9.0, 3.4, -1.2]),
    "negative precipitation": answer_with(daily__precipitation_sum=[0.0, -4.2, 11.3]),
}


@pytest.mark.parametrize("body", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_answer_is_treated_like_an_outage(client, provider, db, caplog, body):
    provider.answer(body)
    assert client.get("/api/weather", status=503).json["statusCode"] == 503
    assert db.execute("SELECT count(*) AS n FROM weather_cache").fetchone()["n"] == 0
    lines = warnings_logged(caplog)
    assert len(lines) == 1 and "unexpected answer" in lines[0], lines


@pytest.mark.parametrize("status", [204, 302, 404, 429, 500, 503])
def test_a_non_200_answer_is_treated_like_an_outage(client, provider, db, caplog, status):
    client.get("/api/weather")
    age_cache(db)
    provider.answer(status=status)  # a valid body, but the wrong status
    assert client.get("/api/weather").json["data"]["stale"] is True
    assert f"HTTP {status}" in warnings_logged(caplog)[0]


def test_an_oversized_answer_is_refused(client, provider, monkeypatch, caplog):
    monkeypatch.setattr(whoknows, "WEATHER_MAX_BYTES", 100)
    client.get("/api/weather", status=503)
    assert "more than 100 bytes" in warnings_logged(caplog)[0]


def test_after_a_failure_the_provider_is_left_alone_for_a_while(client, provider, monkeypatch):
    monkeypatch.setattr(whoknows, "WEATHER_RETRY_SECONDS", 1.0)
    provider.answer(status=500)
    client.get("/api/weather", status=503)
    provider.answer()  # back up, but not asked until the back-off has passed
    client.get("/api/weather", status=503)
    assert len(provider.requests) == 1
    time.sleep(1.1)
    assert client.get("/api/weather").json["data"]["stale"] is False
    assert len(provider.requests) == 2


def test_the_provider_recovers_after_serving_stale(client, provider, db, monkeypatch):
    monkeypatch.setattr(whoknows, "WEATHER_RETRY_SECONDS", 0)
    client.get("/api/weather")
    age_cache(db)
    provider.answer(b"garbage")
    assert client.get("/api/weather").json["data"]["stale"] is True
    provider.answer(answer_with(current__temperature_2m=9.9))
    data = client.get("/api/weather").json["data"]
    assert data["stale"] is False and data["current"]["temperature_c"] == 9.9
    assert len(provider.requests) == 3


# Concurrency ##################################################################


def get_concurrently(app, path, count, status="*"):
    """GET path from count threads at once, each with its own client; return the responses."""
    barrier = threading.Barrier(count)
    responses, errors = [None] * count, []

    def run(index):
        try:
            barrier.wait()
            responses[index] = webtest.TestApp(app).get(path, status=status)
        except Exception as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, errors
    return responses


def test_concurrent_requests_with_an_expired_cache_make_one_provider_request(app, client, provider, db):
    client.get("/api/weather")
    old_fetched_at = iso(age_cache(db))
    provider.answer(answer_with(current__temperature_2m=9.9), delay=0.3)
    responses = get_concurrently(app, "/api/weather", 8)
    assert len(provider.requests) == 2
    assert all(r.status_code == 200 for r in responses)
    for data in (r.json["data"] for r in responses):
        if data["stale"]:  # served the stored copy while one thread asked
            assert data["current"]["temperature_c"] == 4.3 and data["fetched_at"] == old_fetched_at
        else:
            assert data["current"]["temperature_c"] == 9.9
    assert any(not r.json["data"]["stale"] for r in responses)
    assert client.get("/api/weather").json["data"]["current"]["temperature_c"] == 9.9
    assert len(provider.requests) == 2


def test_concurrent_requests_with_nothing_cached_wait_for_one_provider_request(app, provider):
    provider.answer(delay=0.3)
    responses = get_concurrently(app, "/api/weather", 8)
    assert len(provider.requests) == 1
    assert all(r.status_code == 200 and r.json["data"]["stale"] is False for r in responses)
    assert len({r.json["data"]["fetched_at"] for r in responses}) == 1


def test_concurrent_requests_while_the_provider_fails_ask_it_once(app, provider, caplog):
    provider.answer(status=500, delay=0.2)
    responses = get_concurrently(app, "/api/weather", 8)
    assert all(r.status_code == 503 for r in responses)
    assert len(provider.requests) == 1 and len(warnings_logged(caplog)) == 1


# Settings and codes ###########################################################


def run_app(*args, env):
    """Run app.py with env added to the environment (DATABASE_URL pointing nowhere)."""
    full_env = {**os.environ, "DATABASE_URL": "postgresql://postgres@127.0.0.1:1/nowhere", **env}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=60)


def weather_settings(settings):
    return (
        settings.weather_base_url,
        settings.weather_latitude,
        settings.weather_longitude,
        settings.weather_location,
        settings.weather_cache_seconds,
        settings.weather_timeout,
    )


def test_weather_settings_have_the_documented_defaults():
    blank = {name: "" for name in ("WEATHER_BASE_URL", "WEATHER_LATITUDE", "WEATHER_LOCATION", "WEATHER_TIMEOUT")}
    settings = whoknows.Settings.from_env(environ=blank, dotenv_path=None)
    assert weather_settings(settings) == ("https://api.open-meteo.com", 55.6761, 12.5683, "København", 600, 3.0)


def test_weather_settings_are_read_from_the_environment():
    env = {
        "WEATHER_BASE_URL": "http://weather.internal:8080/",
        "WEATHER_LATITUDE": "56.1567",
        "WEATHER_LONGITUDE": "-10.5",
        "WEATHER_LOCATION": "Aarhus",
        "WEATHER_CACHE_SECONDS": "0",
        "WEATHER_TIMEOUT": "1.5",
    }
    settings = whoknows.Settings.from_env(environ=env, dotenv_path=None)
    assert weather_settings(settings) == ("http://weather.internal:8080", 56.1567, -10.5, "Aarhus", 0, 1.5)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"WEATHER_LATITUDE": "north"}, "WEATHER_LATITUDE must be a number, not 'north'"),
        ({"WEATHER_LATITUDE": "91"}, "WEATHER_LATITUDE must be between -90 and 90"),
        ({"WEATHER_LONGITUDE": "nan"}, "WEATHER_LONGITUDE must be between -180 and 180"),
        ({"WEATHER_TIMEOUT": "0"}, "WEATHER_TIMEOUT must be between 0.1 and 60"),
        ({"WEATHER_CACHE_SECONDS": "-1"}, "WEATHER_CACHE_SECONDS must be between 0 and 86400"),
        ({"WEATHER_CACHE_SECONDS": "ten"}, "WEATHER_CACHE_SECONDS must be a whole number"),
        ({"WEATHER_BASE_URL": "file:///etc"}, "WEATHER_BASE_URL must be an http:// or https:// base URL"),
        ({"WEATHER_BASE_URL": "api.open-meteo.com"}, "WEATHER_BASE_URL must be an http:// or https:// base URL"),
    ],
)
def test_bad_weather_settings_give_one_clear_line(env, message):
    result = run_app(str(ROOT / "app.py"), "migrate", env=env)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


@pytest.mark.parametrize(
    "code, description",
    [
        (0, "Clear sky"),
        (3, "Overcast"),
        (45, "Fog"),
        (61, "Slight rain"),
        (75, "Heavy snowfall"),
        (82, "Violent rain showers"),
        (99, "Thunderstorm with heavy hail"),
        (42, "Unknown weather (WMO code 42)"),
    ],
)
def test_wmo_codes_have_short_english_descriptions(code, description):
    assert whoknows.weather_description(code) == description
