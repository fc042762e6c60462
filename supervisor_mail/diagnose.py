"""Who blocks a hung worker in PostgreSQL: run in a short-lived child of the master (which
never connects itself), with strict timeouts, from the backend pid in the worker's
heartbeat row. The answer goes to the info and error logs."""

from __future__ import annotations

import logging
import os

import psycopg

from supervisor_mail import logs, store
from supervisor_mail.config import Config

log = logging.getLogger("supervisor_mail.diagnose")
TIMEOUT = 3  # seconds for connecting and for the query: a hung database must not hang this


def blocking_backends(cfg: Config, backend_pid: int) -> list[tuple]:
    with psycopg.connect(store.dsn_of(cfg), autocommit=True, connect_timeout=TIMEOUT,
                         application_name="supervisor_mail diagnose") as conn:
        conn.execute("SELECT set_config('statement_timeout', %s, false)", (f"{TIMEOUT}s",))
        return conn.execute("""
            SELECT b.pid, b.application_name, b.state, now() - b.xact_start,
                   left(b.query, 300)
            FROM unnest(pg_blocking_pids(%s)) AS blocker(pid)
            JOIN pg_stat_activity b ON b.pid = blocker.pid""", (backend_pid,)).fetchall()


def run_in_child(cfg: Config, backend_pid: int, name: str) -> None:
    code = 0
    try:
        logs.setup(cfg, "m")
        rows = blocking_backends(cfg, backend_pid)
        if not rows:
            log.info("%s: its PostgreSQL backend %d was not blocked by another session",
                      name, backend_pid)
        for pid, app, state, age, query in rows:
            log.error("%s: its PostgreSQL backend %d is blocked by backend %d (%s, %s for %s): %s",
                      name, backend_pid, pid, app or "no application_name", state, age, query)
    except Exception as exc:
        log.error("%s: could not ask PostgreSQL who blocks backend %d: %s", name, backend_pid,
                  str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        code = 1
    finally:
        os._exit(code)
