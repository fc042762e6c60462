"""The real engine (fork, signals, PostgreSQL, IMAP, SMTP) driven only through its command line."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess

from running_engine import Engine, add_account, duplicates, message, pid_alive, queue, stored

from supervisor_mail.embedded import cluster_check
from supervisor_mail.embedded.imap_admin import Mailbox
from supervisor_mail.state import PLANNER_SLOT, remove_files

LINE = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\]\[#\d+\.(m|p|t\d+)\] \S.*?"
                  r"( \[\d+,(\d+|-)\])?$")



def test_mail_flows_with_run_only(engine_factory, db, mailbox, imap_account, smtp_sink):
    """Mail on the IMAP server reaches PostgreSQL and an outbox row reaches the SMTP sink."""
    acntid = add_account(db, imap_account, smtp_sink)
    for n in range(3):
        mailbox.append("INBOX", message(n))
    with engine_factory().start() as engine:
        engine.wait_for(lambda: stored(db, acntid) == 3, 60, "3 messages stored")
        queue(db, acntid, 1)
        assert smtp_sink.wait_for(1, timeout=10)
        mailbox.append("INBOX", message(3))
        db.execute("UPDATE email_folders SET last_recent_sync = now() - interval '1 day', "
                   "last_full_sync = now() - interval '1 day' WHERE acntid = %s", (acntid,))
        engine.wait_for(lambda: stored(db, acntid) == 4, 60, "the new message stored")
        titles = {open(f"/proc/{pid}/cmdline").read() for pid in engine.worker_pids().values()}
        assert "supervisor_mail: planner" in "".join(titles)
        assert any(t.startswith("supervisor_mail: send ") for t in titles)
    assert duplicates(db) == 0
    lines = engine.info_lines()
    assert lines and all(LINE.match(line) for line in lines), \
        [line for line in lines if not LINE.match(line)][:5]
    assert any(re.search(rf"received \d+ new messages? in \d+s \[{acntid},\d+\]$", line)
               for line in lines)
    assert any(line.endswith(f"[{acntid},-]") and "sent message" in line for line in lines)


def test_sigterm_stops_everything_in_time(engine_factory):
    """SIGTERM stops the master and every worker within the stop timeout, by pid."""
    engine = engine_factory().start()
    pids = set(engine.worker_pids().values())
    assert len(pids) == engine.expected_workers()
    took = engine.stop()
    assert took <= engine.cfg.engine.stop_timeout + 2
    assert [pid for pid in pids | {engine.master_pid} if pid_alive(pid)] == []
    assert engine.proc.returncode == 0
    assert not os.listdir(engine.cfg.engine.pid_dir)


def test_sighup_changes_the_worker_count(engine_factory):
    """SIGHUP rereads the configuration: a smaller max_workers means fewer processes."""
    engine = engine_factory().start()
    before = set(engine.worker_pids().values())
    text = engine.conf.read_text().replace("max_workers = 4", "max_workers = 3")
    engine.conf.write_text(text.replace("send_workers = 2", "send_workers = 1"))
    os.kill(engine.master_pid, signal.SIGHUP)
    engine.wait_for(lambda: len(engine.worker_pids()) == 4
                    and not before & set(engine.worker_pids().values()), 30,
                    "3 workers and the planner, all new")
    engine.stop()


def test_killed_worker_is_replaced_and_task_completed(engine_factory, db, mailbox,
                                                      imap_account, smtp_sink):
    """A sync worker SIGKILLed mid-sync is replaced; the folder completes with no duplicate."""
    acntid = add_account(db, imap_account, smtp_sink)
    mailbox.append_many("INBOX", [(message(n), None) for n in range(60)])
    with engine_factory(sync__batch_size=5).start() as engine:
        def syncing():
            return [hb for hb in engine.heartbeats() if hb.role == "sync" and hb.emfdid]
        busy = engine.wait_for(syncing, 60, "a sync worker on a folder", step=0.02)[0]
        os.kill(busy.pid, signal.SIGKILL)
        engine.wait_for(lambda: any(hb.slot == busy.slot and hb.pid != busy.pid
                                    for hb in engine.heartbeats()), 20, "the slot refilled")
        engine.wait_for(lambda: stored(db, acntid) == 60, 90, "all 60 messages stored")
    assert duplicates(db) == 0


def test_start_twice_starts_one_master(engine_factory):
    """Cron mode: a second `start` sees the live master and starts nothing."""
    engine = engine_factory()
    first = engine.command("start")
    assert first.returncode == 0, first.stderr
    assert "started master" in first.stdout
    second = engine.command("start")
    assert second.returncode == 0 and "already running" in second.stdout
    master = int(first.stdout.split("started master ")[1].split()[0])
    engine.seen_pids.add(master)
    engine.wait_for(lambda: len(engine.worker_pids()) == engine.expected_workers(), 30,
                    "workers")
    stop = engine.command("stop")
    assert stop.returncode == 0 and f"stopped master {master}" in stop.stdout
    assert not pid_alive(master)
    engine.wait_for(lambda: not engine.worker_pids(), 10, "workers gone")


def test_deleted_state_db_is_rebuilt(engine_factory):
    """The state DB deleted under a running engine is recreated and beaten into again."""
    engine = engine_factory().start()
    path = engine.statedb().path
    assert remove_files(path)
    engine.wait_for(lambda: os.path.exists(path) and
                    {hb.slot for hb in engine.heartbeats()} >= {-1, PLANNER_SLOT, 0, 1, 2, 3},
                    20, "every process beating in a new state DB")
    engine.stop()


def test_root_without_user_is_refused(engine_factory):
    """Started as root with no engine.user (and allow_root off), run refuses with one line."""
    engine = engine_factory(engine__allow_root=False)
    prefix = [] if os.geteuid() == 0 else [shutil.which("unshare"), "--user", "--map-root-user"]
    result = subprocess.run([*prefix, *engine_command(engine, "run")], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 3
    assert "refusing to run as root: set [engine] user" in result.stderr
    assert result.stderr.count("\n") == 1


def engine_command(engine: Engine, *args: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "supervisor_mail", *args, "-c", str(engine.conf)]


def test_workers_record_their_backend(engine_factory, db, mailbox, imap_account, smtp_sink):
    """Heartbeats carry the PostgreSQL backend pid, which pg_stat_activity knows by name."""
    acntid = add_account(db, imap_account, smtp_sink)
    mailbox.append("INBOX", message(1))
    with engine_factory().start() as engine:
        engine.wait_for(lambda: stored(db, acntid) == 1, 60, "a message stored")
        beat = engine.wait_for(lambda: [hb for hb in engine.heartbeats()
                                        if hb.role == "sync" and hb.backend_pid], 10,
                               "a sync heartbeat with a backend pid")[0]
        name = db.execute("SELECT application_name FROM pg_stat_activity WHERE pid = %s",
                          (beat.backend_pid,)).fetchone()
        assert name == (f"supervisor_mail sync {beat.slot}",)


def test_one_imap_session_per_account_across_workers(engine_factory, db, imap_server):
    """Two accounts synced every second by two sync workers, whose sessions stay open
    between tasks: the server never sees two sessions of one account at once (its own
    log). Without the routing by open session, an account whose next task lands in the
    other, idle slice is logged in to twice."""
    logins = {}
    for n in range(2):
        account = imap_server.new_account()
        with Mailbox.for_account(account) as box:  # logged out before the engine starts
            box.append("INBOX", message(n))
        logins[add_account(db, account)] = account.login
    users = set(logins.values())
    before = [s for s in cluster_check.sessions(imap_server) if s.user in users]
    with engine_factory(sync__hi_recent_interval=1, sync__hi_recent_interval_nl=1) as engine:
        engine.wait_for(lambda: all(stored(db, a) == 1 for a in logins), 60, "all mail stored")
        engine.wait_for(lambda: len(synced_again(engine)) >= 16, 60, "sixteen more syncs")
    found = [s for s in cluster_check.sessions(imap_server) if s.user in users]
    assert len(found) >= len(before) + len(logins)  # the engine's own sessions are in it
    assert cluster_check.overlapping_users(found, users) == set()


def synced_again(engine) -> list[str]:
    """The info log's lines of syncs that found nothing new (every one after the first)."""
    return [line for line in engine.info_lines() if " received 0 new messages " in line]
