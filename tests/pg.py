"""A throwaway PostgreSQL server for the tests: Debian's binaries, a fresh cluster in a
temporary folder, on a free loopback port, stopped by its pid; one empty database per hub."""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

from imagebridge.db import make_engine
from imagebridge.demo.network import free_port, wait_for_port
from imagebridge.migrate import upgrade

# A test server loses nothing worth keeping in a crash: skip the disk flushes that would
# otherwise dominate a run of short transactions. (The product's settings are not these.)
TEST_SERVER_OPTIONS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    # Every hub has a pool of up to 30 connections, and a test may run several hubs.
    "max_connections": "400",
    # Sessions answer in a zone that is never UTC, so a time handled without its zone shows.
    "timezone": "Asia/Kolkata",
}


# A server set as the deployment guide advises (README, National deployment): durable, and
# planned for a database on SSD or in memory, where a random read costs little more than a
# sequential one (the default, 4, prices a spinning disk and picks scans over index lookups).
DEPLOYED_SERVER_OPTIONS = {"random_page_cost": "1.1"}


def postgres_binaries() -> tuple[str, str]:
    """Debian's ``postgres`` and ``initdb`` of the newest version installed."""
    found = [
        sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) for name in ("postgres", "initdb")
    ]
    if not all(found):
        raise FileNotFoundError("PostgreSQL is not installed (apt-get install postgresql)")
    return found[0][-1], found[1][-1]


class PostgresServer:
    """Started with `start`, stopped with `stop`; `create` makes an empty database and answers
    its URL, `drop` removes it (whoever is still connected)."""

    def __init__(
        self, postgres: str, initdb: str, options: dict[str, str] = TEST_SERVER_OPTIONS
    ) -> None:
        """options: the server's settings (``-c``); a benchmark keeps the durable defaults."""
        self.postgres, self.initdb = postgres, initdb
        self.options = options
        self.folder = Path(tempfile.mkdtemp(prefix="ib-pg-"))
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._names = itertools.count(1)

    def start(self) -> None:
        # PostgreSQL refuses to run as root: run it as the postgres account then.
        user = "postgres" if os.geteuid() == 0 else None
        if user:
            self.folder.chmod(0o755)
            shutil.chown(self.folder, user)
        data = self.folder / "data"
        subprocess.run(
            [self.initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "-N"],
            user=user,
            check=True,
            capture_output=True,
            timeout=120,
        )
        self.port = free_port()
        # Its socket goes in the folder of its own, not Debian's /var/run/postgresql.
        options = ["-k", str(self.folder)]
        options += [arg for k, v in self.options.items() for arg in ("-c", f"{k}={v}")]
        with open(self.folder / "postgres.log", "wb") as log:
            self.process = subprocess.Popen(
                [self.postgres, "-D", str(data), "-h", "127.0.0.1", "-p", str(self.port), *options],
                user=user,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for_port(self.port, self.process)
        # Listening is not ready: while it starts up the server refuses connections.
        deadline = time.monotonic() + 30
        while True:
            try:
                self._admin("SELECT 1")
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGINT)  # fast shutdown
            self.process.wait(timeout=30)
        shutil.rmtree(self.folder, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create(self, template: str = "template1") -> str:
        name = f"ib_{next(self._names)}"
        self._admin(f"CREATE DATABASE {name} TEMPLATE {template}")
        return self.url(name)

    def drop(self, url: str) -> None:
        name = url.rsplit("/", 1)[-1]
        self._admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def _admin(self, statement: str) -> None:
        # CREATE and DROP DATABASE cannot run inside a transaction.
        conninfo = f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"
        with psycopg.connect(conninfo, autocommit=True) as connection:
            connection.execute(statement.encode())


class HubDatabases:
    """A database for each hub the tests start, copied from one migrated once per session:
    a copy takes a tenth of the time the migrations take. (The migrations themselves are
    tested on empty databases.)"""

    def __init__(self, server: PostgresServer) -> None:
        self.server = server
        self.template = ""

    def create(self) -> str:
        if not self.template:
            url = self.server.create()
            engine = make_engine(url)
            try:
                upgrade(engine)
            finally:
                engine.dispose()
            self.template = url.rsplit("/", 1)[-1]
        return self.server.create(self.template)

    def drop(self, url: str) -> None:
        self.server.drop(url)
