"""Fixtures for the Scale pipeline's tests: a throwaway PostgreSQL 15 cluster and one
local Spark session for the whole run, the job's and viewer's modules importable.

PostgreSQL refuses to run as root, and CI runs as root: then the server runs as the
Debian `postgres` user (runuser), in a temporary directory that user owns.
"""

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg import sql
import pytest

SCALE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(SCALE / "batch"))
sys.path.insert(0, str(SCALE / "viewer"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
APP_USER = "scale"

# Numbers the tests measure, printed at the end of the run (see pytest_terminal_summary).
MEASURED = {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Postgres:
    def __init__(self):
        self.port = free_port()
        self.password = secrets.token_urlsafe(16)
        self.dir = Path(tempfile.mkdtemp(prefix="scale-pg-"))
        self.as_owner = []
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
            self.as_owner = ["runuser", "-u", "postgres", "--"]
        self.data = self.dir / "data"

    def _run(self, *args):
        subprocess.run([*self.as_owner, *args], check=True, capture_output=True, text=True)

    def start(self):
        pwfile = self.dir / "pwfile"
        pwfile.write_text(self.password)
        if self.as_owner:
            shutil.chown(pwfile, "postgres", "postgres")
        self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=scram-sha-256",
                  f"--pwfile={pwfile}", "--encoding=UTF8", "--no-locale")
        # fsync and friends off: the cluster lives for one test run.
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.dir}"
                   " -c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "log"), "-w", "-t", "60",
                  "-o", options, "start")
        with self.admin() as conn:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(APP_USER), sql.Literal(self.password)))

    def stop(self):
        try:
            self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def admin(self):
        return psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                               password=self.password, autocommit=True)

    def create_database(self, name) -> str:
        """A fresh database owned by the app role; returns its URL (no password in it)."""
        with self.admin() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(name), sql.Identifier(APP_USER)))
        return f"postgresql://{APP_USER}@127.0.0.1:{self.port}/{name}"


@pytest.fixture(scope="session")
def postgres():
    if not (PG_BIN / "initdb").exists():
        pytest.fail(f"PostgreSQL 15 is not installed ({PG_BIN}/initdb is missing): apt-get install postgresql-15")
    server = Postgres()
    server.start()
    # The job and the viewer read the password where they would in a pod.
    os.environ["PGPASSWORD"] = server.password
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def spark():
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    session = (SparkSession.builder.master("local[2]").appName("scale-tests")
               .config("spark.ui.enabled", "false")
               .config("spark.sql.shuffle.partitions", "4")
               .getOrCreate())
    session.sparkContext.setLogLevel("WARN")
    yield session
    session.stop()


def run_job(spark, *argv):
    """Runs the job in the shared session with the command line's arguments."""
    import midi_batch

    started = time.monotonic()
    counts = midi_batch.run(spark, midi_batch.parse_args([str(a) for a in argv]))
    return counts, time.monotonic() - started


def query(url, sql, params=()):
    with psycopg.connect(url) as conn:
        return conn.execute(sql, params).fetchall()


def pytest_terminal_summary(terminalreporter):
    if MEASURED:
        terminalreporter.section("Scale pipeline: measured")
        for name, value in MEASURED.items():
            terminalreporter.write_line(f"{name}: {value}")
