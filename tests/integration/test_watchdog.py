"""Self-healing with the real engine and real servers: each test provokes one failure and
asserts the exact recovery, and that no message was lost or duplicated."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import warnings

import psycopg
import pytest
from imap_proxy import ImapProxy
from running_engine import add_account, duplicates, message, pid_alive, queue, stored

from supervisor_mail import control
from supervisor_mail.state import remove_files
from supervisor_mail.states import TaskState

BIG = 200  # messages: with batches of 2, a sync that is still running when the lock comes
WATCHDOG = {"watchdog__worker_timeout": 4, "watchdog__kill_grace": 1,
            "watchdog__check_interval": 1, "watchdog__stall_timeout": 15,
            "watchdog__max_task_failures": 2, "watchdog__max_reset_backoff": 20,
            "sync__socket_timeout": 60}


@pytest.fixture
def engine_factory(engine_factory):
    """Engines with the small watchdog timeouts above."""
    return lambda **changes: engine_factory(**{**WATCHDOG, **changes})


def sent_ids(sink) -> list[str]:
    ids = []
    for received in sink.messages:
        match = re.search(rb"(?im)^Message-ID:\s*(<[^>]+>)", received.data)
        ids.append(match.group(1).decode() if match else "")
    return ids


def test_frozen_worker_is_replaced_and_its_task_rerun(engine_factory, db, mailbox,
                                                     imap_account, smtp_sink):
    """A SIGSTOPped sync worker is killed and replaced, and the replacement runs the same
    task, within worker_timeout + kill_grace + one check (plus a second of slack)."""
    acntid = add_account(db, imap_account, smtp_sink)
    mailbox.append_many("INBOX", [(message(n), None) for n in range(80)])
    with engine_factory(sync__batch_size=2).start() as engine:
        busy = engine.wait_for(lambda: [hb for hb in engine.heartbeats()
                                        if hb.role == "sync" and hb.emfdid], 60,
                               "a sync worker on a folder", step=0.02)[0]
        os.kill(busy.pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        again = engine.wait_for(lambda: [hb for hb in engine.heartbeats()
                                         if hb.slot == busy.slot and hb.pid != busy.pid
                                         and hb.task_id == busy.task_id], 30,
                                "the same task on a new worker", step=0.02)[0]
        took = time.monotonic() - frozen_at
        cfg = engine.cfg.watchdog
        assert took <= cfg.worker_timeout + cfg.kill_grace + cfg.check_interval + 1, took
        assert not pid_alive(busy.pid)
        assert again.acntid == acntid
        engine.wait_for(lambda: stored(db, acntid) == 80, 60, "all 80 messages stored")
    assert duplicates(db) == 0
    errors = (engine.root / "log" / "threading-error.txt").read_text()
    assert f"(pid {busy.pid}) hung" in errors


def test_poison_task_is_set_aside(engine_factory, db, imap_server, smtp_sink):
    """A folder whose sync always hangs is set aside after max_task_failures hangs, with its
    reason in the state DB, the error log and healthcheck; other accounts keep syncing."""
    from supervisor_mail.embedded.imap_admin import Mailbox

    poisoned, healthy = imap_server.new_account(), imap_server.new_account()
    with Mailbox.for_account(poisoned) as box:
        box.create_folder("Poison")
        box.append("Poison", message(1))
        box.append("INBOX", message(2))
    with ImapProxy(imap_server.host, imap_server.port, stall_on=b'"Poison"') as proxy, \
            Mailbox.for_account(healthy) as other:
        sick = add_account(db, poisoned, imap_port=proxy.port)
        well = add_account(db, healthy)
        other.append("INBOX", message(3))
        with engine_factory().start() as engine:
            engine.wait_for(lambda: stored(db, well) == 1 and stored(db, sick) == 1, 60,
                            "both INBOXes stored")
            aside = engine.wait_for(lambda: [t for t in engine.statedb().tasks()
                                             if t.state == TaskState.SET_ASIDE], 90,
                                    "the poison task set aside")[0]
            assert aside.acntid == sick and aside.folder == "Poison" and aside.attempts == 2
            assert "hung its worker" in aside.reason
            assert proxy.stalls == 2
            other.append("INBOX", message(4))
            db.execute("UPDATE email_folders SET last_recent_sync = NULL, last_full_sync = NULL "
                       "WHERE acntid = %s", (well,))
            engine.wait_for(lambda: stored(db, well) == 2, 60, "the healthy account goes on")
            state = control.health(engine.cfg)
            assert state.code == control.DEGRADED and "set aside" in state.reason
            assert "Poison" in state.reason
            errors = (engine.root / "log" / "threading-error.txt").read_text()
            assert "set aside after 2 hangs" in errors
            # a process blocked on a socket still answers faulthandler: its stack is there
            assert "Current thread" in errors and "socket.py" in errors


def test_wiped_ramdisk_is_rebuilt_and_sync_continues(engine_factory, db, mailbox,
                                                     imap_account, smtp_sink):
    """The state DB deleted under a running engine is rebuilt, and new mail still arrives."""
    acntid = add_account(db, imap_account, smtp_sink)
    mailbox.append("INBOX", message(1))
    with engine_factory().start() as engine:
        engine.wait_for(lambda: stored(db, acntid) == 1, 60, "the first message")
        assert remove_files(engine.statedb().path)
        mailbox.append("INBOX", message(2))
        db.execute("UPDATE email_folders SET last_recent_sync = NULL, last_full_sync = NULL "
                   "WHERE acntid = %s", (acntid,))
        engine.wait_for(lambda: stored(db, acntid) == 2, 60, "the second message")
        assert os.path.exists(engine.statedb().path)
    assert duplicates(db) == 0


def test_cron_start_replaces_a_hung_master(engine_factory):
    """Cron mode: `start` against a SIGSTOPped master resets by PID files, then starts anew."""
    engine = engine_factory(watchdog__master_timeout=3)
    first = engine.command("start")
    master = int(first.stdout.split("started master ")[1].split()[0])
    engine.seen_pids.add(master)
    engine.wait_for(lambda: len(engine.worker_pids()) == engine.expected_workers(), 30,
                    "workers")
    os.kill(master, signal.SIGSTOP)
    engine.wait_for(lambda: engine.command("healthcheck").returncode == 1, 10,
                    "healthcheck to say hung")
    again = engine.command("start")
    assert again.returncode == 0, again.stderr
    assert f"master {master}" in again.stdout and "started master" in again.stdout
    assert not pid_alive(master)
    new = int(again.stdout.split("started master ")[1].split()[0])
    engine.seen_pids.add(new)
    engine.wait_for(lambda: engine.command("healthcheck").returncode == 0, 20, "healthy again")
    assert engine.command("stop").returncode == 0


def test_reset_refuses_a_healthy_master(engine_factory):
    """`reset` will not kill a healthy engine without --force, and says what it did with it."""
    engine = engine_factory().start()
    engine.wait_for(lambda: engine.command("healthcheck").returncode == 0, 20, "healthy")
    refused = engine.command("reset")
    assert refused.returncode != 0 and "is healthy" in refused.stderr
    forced = engine.command("reset", "--force")
    assert forced.returncode == 0 and f"master {engine.master_pid}" in forced.stdout
    engine.proc.wait(10)
    assert engine.leftovers() == [] or not any(pid_alive(p) for p in engine.leftovers())
    assert engine.command("healthcheck").returncode == 2


class Locker:
    """Another session that takes ACCESS EXCLUSIVE locks on engine tables, as a migration does."""

    def __init__(self, dsn: str, tables: list[str], alter: str | None = None):
        self.conn = psycopg.connect(dsn)
        self.tables, self.alter = tables, alter

    def __enter__(self) -> Locker:
        self.conn.execute(f"LOCK TABLE {', '.join(self.tables)} IN ACCESS EXCLUSIVE MODE")
        if self.alter:
            self.conn.execute(self.alter)
        return self

    def release(self) -> float:
        self.conn.commit()
        return time.monotonic()

    def __exit__(self, *exc: object) -> None:
        self.conn.close()


def feed(db_dsn: str, acntid: int, count: int, every: float, stop: threading.Event) -> list:
    """Queue outbox messages through the documented SQL contract, in a thread."""
    queued: list[int] = []

    def run() -> None:
        with psycopg.connect(db_dsn, autocommit=True) as conn:
            for n in range(count):
                if stop.is_set():
                    return
                queued.append(queue(conn, acntid, n))
                time.sleep(every)
    threading.Thread(target=run, daemon=True).start()
    return queued


def a_big_sync_and_a_sender(db, mailbox, imap_account, smtp_sink) -> tuple[int, int]:
    """An IMAP account with BIG messages waiting, and an SMTP-only account to send from
    (no Sent copy to file, so a locked messages table does not slow its deliveries)."""
    mailbox.append_many("INBOX", [(message(n), None) for n in range(BIG)])
    return (add_account(db, imap_account),
            add_account(db, smtp_sink=smtp_sink, email="sender@example.org"))


def test_sync_stall_resets_sync_while_sends_flow(engine_factory, db, db_dsn, mailbox,
                                                 imap_account, smtp_sink):
    """With the messages table locked, sync is reset (with backoff) while delivery goes on;
    after the lock is released every message is stored once."""
    acntid, sender = a_big_sync_and_a_sender(db, mailbox, imap_account, smtp_sink)
    with engine_factory(database__lock_timeout=2, sync__batch_size=2,
                        watchdog__stall_timeout=8).start() as engine:
        engine.wait_for(lambda: stored(db, acntid) > 0, 60, "the sync to start", step=0.01)
        with Locker(db_dsn, ["email_messages"]) as lock:
            mailbox.append("INBOX", message(99))
            stop = threading.Event()
            queued = feed(db_dsn, sender, 20, 0.5, stop)
            smtp_sink.wait_for(20, timeout=40)
            engine.wait_for(lambda: any("sync workers are stalled" in line
                                        for line in engine.info_lines()), 40, "a sync reset")
            lock.release()
        db.execute("UPDATE email_folders SET last_recent_sync = NULL, last_full_sync = NULL "
                   "WHERE acntid = %s",
                   (acntid,))
        engine.wait_for(lambda: stored(db, acntid) == BIG + 1, 60, "every message stored")
    assert len(queued) == 20
    assert sorted(sent_ids(smtp_sink)) == sorted(set(sent_ids(smtp_sink)))
    assert duplicates(db) == 0
    resets = [line for line in engine.info_lines() if "engine reset #" in line]
    assert resets and len(resets) <= 6, resets


def test_upgrade_hang_resets_and_resumes(engine_factory, db, db_dsn, mailbox, imap_account,
                                         smtp_sink):
    """A migration locks the engine's tables and alters a column while a large sync and a
    stream of sends run: the watchdog resets and backs off while it holds, then, after the
    release and the schema change, every message is stored once and every send made once."""
    acntid, sender = a_big_sync_and_a_sender(db, mailbox, imap_account, smtp_sink)
    with engine_factory(database__lock_timeout=2, sync__batch_size=2,
                        watchdog__stall_timeout=8).start() as engine:
        engine.wait_for(lambda: stored(db, acntid) > 0, 60, "the sync to start", step=0.01)
        stop = threading.Event()
        queued = feed(db_dsn, sender, 10, 0.1, stop)
        engine.wait_for(lambda: len(queued) == 10, 20, "10 messages queued")
        tables = ["email_messages", "email_outbox"]
        before = stored(db, acntid)  # nothing can be stored while the lock holds
        with Locker(db_dsn, tables, "ALTER TABLE email_messages ADD COLUMN app_label text") \
                as lock:
            mailbox.append_many("INBOX", [(message(100 + n), None) for n in range(5)])
            db.execute("UPDATE email_folders SET last_recent_sync = NULL, last_full_sync = NULL "
                       "WHERE acntid = %s",
                       (acntid,))
            engine.wait_for(lambda: any("engine reset #" in line
                                        for line in engine.info_lines()), 40, "a reset")
            released = lock.release()
        engine.wait_for(lambda: stored_now(db_dsn, acntid) > before, 30, "the next message")
        resumed = time.monotonic() - released
        # reported in the run's warnings summary, so every CI log carries the figure
        warnings.warn(f"upgrade hang: {resumed:.2f}s from lock release to the next stored "
                      "message", stacklevel=1)
        db.execute("UPDATE email_folders SET last_recent_sync = NULL, last_full_sync = NULL "
                   "WHERE acntid = %s",
                   (acntid,))
        engine.wait_for(lambda: stored(db, acntid) == BIG + 5, 60, "every message stored")
        smtp_sink.wait_for(10, timeout=30)
        engine.wait_for(lambda: any("schema changed" in line for line in engine.info_lines()),
                        10, "the schema-change reset")
    ids = sent_ids(smtp_sink)
    assert len(ids) == 10 and len(set(ids)) == 10
    assert duplicates(db) == 0
    assert resumed <= 10, resumed


def stored_now(dsn: str, acntid: int) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return stored(conn, acntid)
