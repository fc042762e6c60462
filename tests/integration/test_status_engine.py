"""`status` and `status --json` against a real engine: the right processes and queue figures
while it runs, "hung" while it is SIGSTOPped, and what it can while PostgreSQL is locked."""

from __future__ import annotations

import json
import os
import signal
import time

import psycopg
import pytest
from running_engine import Engine, add_account, stored

from supervisor_mail import accounts
from supervisor_mail.embedded.imap import available_servers, make_server
from supervisor_mail.embedded.imap_admin import Mailbox, fill_mailbox
from supervisor_mail.state import NewTask

FUTURE_ACCOUNT = 999_999  # a task for no real account, due in an hour: it stays queued


@pytest.fixture(scope="module")
def imap():
    """One IMAP server for the module (Dovecot where it runs): status is under test here."""
    with make_server(available_servers()[0]) as server:
        yield server


def status_json(engine: Engine, *args: str) -> dict:
    done = engine.command("status", "--json", *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def scenario(db, imap, smtp_sink) -> tuple[int, int]:
    """A synced account with 4 messages, and a disabled one holding 2 queued outbox rows (never
    claimed) and 1 failed row: figures that stay put while the engine runs."""
    account = imap.new_account()
    with Mailbox.for_account(account) as mailbox:
        fill_mailbox(mailbox, "INBOX", 4)
    live = add_account(db, account, smtp_sink)
    idle = accounts.add(db, email="idle@example.org", enabled=False, smtp_host="127.0.0.1",
                        smtp_port=smtp_sink.port, smtp_security="plain")
    for state in ("queued", "queued", "failed"):
        db.execute("INSERT INTO email_outbox (acntid, recipients, raw, state, queued_at) "
                   "VALUES (%s, %s, %s, %s, now() - interval '90 seconds')",
                   (idle, ["x@example.org"], b"Subject: x\r\n\r\nx\r\n", state))
    return live, idle


def test_status_of_a_running_engine(tmp_path, db_dsn, db, imap, smtp_sink):
    """--json names the master and every worker by the pids of their PID files, all ok; the
    slices, outbox counts and accounts are as arranged; the text screen and --account agree."""
    live, idle = scenario(db, imap, smtp_sink)
    with Engine(tmp_path, db_dsn) as engine:
        engine.wait_for(lambda: stored(db, live) == 4, 30, "the first sync")
        statedb = engine.statedb()
        statedb.enqueue([NewTask("sync_full", FUTURE_ACCOUNT, 1, "Later", 2, time.time() + 3600)],
                        slots=[1], max_per_slot=10)
        statedb.close()
        data = status_json(engine)
        pids = engine.worker_pids()

        assert data["health"]["code"] == 0 and data["health"]["state"] == "healthy"
        assert data["master"]["pid"] == engine.master_pid and data["master"]["state"] == "ok"
        assert data["master"]["uptime"] > 0
        names = {p["pid"]: ("planner" if p["role"] == "planner" else f"{p['role']}-{p['slot']}")
                 for p in data["processes"]}
        assert {name: pid for pid, name in names.items()} == pids
        assert sorted(names.values()) == ["planner", "send-2", "send-3", "sync-0", "sync-1"]
        assert all(p["state"] == "ok" and not p["hung"] for p in data["processes"])

        slices = {s["slot"]: s for s in data["slices"]}
        assert slices[1]["queued"] == 1 and slices[1]["due"] == 0
        assert slices[0]["queued"] == 0 and slices[0]["set_aside"] == 0

        counts = data["outbox"]["counts"]
        assert (counts["queued"], counts["failed"], counts["sent"]) == (2, 1, 0)
        assert 85 <= data["outbox"]["oldest_queued_age"] < 600
        by_id = {a["acntid"]: a for a in data["accounts"]}
        assert by_id[live]["last_full_sync"] is not None and by_id[live]["lag"] == 0
        assert by_id[idle]["enabled"] is False
        assert data["state_db"]["error"] is None and data["database"]["error"] is None

        text = engine.command("status")
        assert text.returncode == 0
        assert text.stdout.startswith(f"supervisor_mail on 127.0.0.1: healthy: master "
                                      f"{engine.master_pid}")
        for name, pid in pids.items():
            assert f" {pid} " in text.stdout, name
        assert "queued 2, sending 0, sent 0, deferred 0, failed 1" in text.stdout

        one = status_json(engine, "--account", str(live))
        assert [a["acntid"] for a in one["accounts"]] == [live]
        inbox = next(f for f in one["accounts"][0]["folders"] if f["name"] == "INBOX")
        assert inbox["last_uid"] == 4 and inbox["priority"] == "hi"
        assert one["outbox"]["counts"]["queued"] == 0
        missing = engine.command("status", "--account", "424242")
        assert missing.returncode == 1 and "no account 424242" in missing.stderr
    assert engine.leftovers() == []


def test_status_of_a_stopped_engine_says_hung(tmp_path, db_dsn, db, imap, smtp_sink):
    """With the master and every worker SIGSTOPped, status answers at once, calls the master
    hung and marks every process stopped (it cannot beat)."""
    scenario(db, imap, smtp_sink)
    with Engine(tmp_path, db_dsn, watchdog__master_timeout=2,
                watchdog__worker_timeout=3) as engine:
        stopped = [engine.master_pid, *engine.worker_pids().values()]
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(3.5)
            began = time.monotonic()
            data = status_json(engine)
            assert time.monotonic() - began < 10
            assert data["health"]["code"] == 1 and data["health"]["state"] == "hung", data["health"]
            assert data["master"]["state"] == "stopped" and data["master"]["hung"]
            assert data["master"]["beat_age"] > 2
            assert len(data["processes"]) == len(stopped) - 1
            assert all(p["state"] == "stopped" and p["hung"] for p in data["processes"])
            text = engine.command("status").stdout
            assert f"hung: master {engine.master_pid} has not beaten for" in text
            assert text.count(" stopped\n") == len(stopped) - 1
        finally:
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)
    assert engine.leftovers() == []


def test_status_says_what_it_can_while_the_database_is_locked(tmp_path, db_dsn, db, imap,
                                                              smtp_sink):
    """An exclusive lock on the outbox makes the PostgreSQL part time out (lock_timeout);
    status still shows the engine's processes and names the database problem."""
    scenario(db, imap, smtp_sink)
    with Engine(tmp_path, db_dsn) as engine, psycopg.connect(db_dsn) as locker:
        locker.execute("LOCK TABLE email_outbox IN ACCESS EXCLUSIVE MODE")
        began = time.monotonic()
        data = status_json(engine)
        assert time.monotonic() - began < 15
        locker.rollback()
        assert "lock timeout" in data["database"]["error"]
        assert data["outbox"] is None and data["accounts"] is None
        assert data["health"]["code"] == 0 and len(data["processes"]) == 5
    assert engine.leftovers() == []
