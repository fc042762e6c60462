"""The planner on real PostgreSQL and a real state DB: what a pass reads, which slices its
tasks land in, and the planner process's loop through a database failure."""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from datetime import timezone

from supervisor_mail import accounts, planner, store
from supervisor_mail.planner import AccountState, FolderState
from supervisor_mail.state import StateDB
from supervisor_mail.states import TaskKind

UTC = timezone.utc
NOW = 1_718_193_600.0  # 2024-06-12 12:00 UTC: the lo start (20:00) was yesterday evening
LAST_LO_START = NOW - 16 * 3600


def add_account(db, owner=None, enabled=True, imap_host="imap.example.org", auth_error=None,
                listed=NOW - 60, error=None):
    return db.execute(
        "INSERT INTO email_accounts (owner_id, email, enabled, imap_host, imap_auth_error_at,"
        " folders_listed_at, last_error_at) VALUES (%s, 'a@example.org', %s, %s,"
        " to_timestamp(%s), to_timestamp(%s), to_timestamp(%s)) RETURNING acntid",
        (owner, enabled, imap_host, auth_error, listed, error)).fetchone()[0]


def add_folder(db, acntid, name, priority="hi", user_priority=None, recent=NOW - 60,
               full=NOW - 60, error=None, gone=None):
    return db.execute(
        "INSERT INTO email_folders (acntid, server_name, display_name, priority, user_priority,"
        " last_recent_sync, last_full_sync, last_error_at, gone_at) VALUES (%s, %s, %s, %s, %s,"
        " to_timestamp(%s), to_timestamp(%s), to_timestamp(%s), to_timestamp(%s))"
        " RETURNING emfdid",
        (acntid, name, name, priority, user_priority, recent, full, error, gone)).fetchone()[0]


def set_active(db, user_id, at):
    db.execute("INSERT INTO email_user_activity (user_id, last_active)"
               " VALUES (%s, to_timestamp(%s))", (user_id, at))


def run_pass(cfg, statedb, now=NOW):
    with store.connect(cfg, "planner") as conn:
        return planner.plan_once(conn, statedb, cfg, now=now, tz=UTC)


def queued(statedb):
    return {(t.acntid, t.emfdid): (t.kind, t.priority) for t in statedb.tasks()}


def test_a_pass_queues_what_is_due_and_nothing_else(db, cfg):
    """Due folders get one task each with its kind and priority; off, gone, fresh folders
    and accounts disabled, without IMAP or in auth backoff get none; a new account gets
    its discovery."""
    me = add_account(db, owner=7)
    set_active(db, 7, NOW - 30)
    inbox = add_folder(db, me, "INBOX", recent=NOW - 700, full=NOW - 1000)
    archive = add_folder(db, me, "Archive", priority="lo", recent=None, full=NOW - 3 * 86400)
    add_folder(db, me, "Spam", priority="lo", user_priority="off", full=None)
    add_folder(db, me, "Old", gone=NOW - 10, full=None)
    add_folder(db, me, "Fresh", recent=NOW - 10, full=NOW - 10)
    new = add_account(db, listed=None)
    for kwargs in ({"enabled": False}, {"imap_host": None}, {"imap_host": ""},
                   {"auth_error": NOW - 60}):
        other = add_account(db, **kwargs)
        add_folder(db, other, "INBOX", full=None)
    statedb = StateDB.for_config(cfg)

    result = run_pass(cfg, statedb)

    assert queued(statedb) == {(me, inbox): (TaskKind.SYNC_RECENT, planner.HI_RECENT),
                               (me, archive): (TaskKind.SYNC_FULL, planner.LO_FULL),
                               (new, 0): (TaskKind.DISCOVER, planner.HI_RECENT)}
    assert (result.due, result.added, result.accounts, result.folders) == (3, 3, 2, 2)


def test_accounts_stay_in_one_slice_slices_are_capped_and_recent_syncs_go_first(db, make_cfg,
                                                                                db_dsn):
    """With more due than the slices hold, every hi recent sync is queued, each account's
    tasks share one slice, and no slice exceeds max_tasks_per_worker."""
    cfg = make_cfg(db_dsn, engine__max_workers=5, engine__send_workers=2,
                   engine__max_tasks_per_worker=8)
    recents = set()
    for _ in range(20):
        acntid = add_account(db)
        recents.add((acntid, add_folder(db, acntid, "INBOX", recent=NOW - 1900,
                                        full=NOW - 1900)))
        for n in range(4):
            add_folder(db, acntid, f"Folder {n}", priority="lo", full=LAST_LO_START - 60)
    statedb = StateDB.for_config(cfg)

    result = run_pass(cfg, statedb)

    tasks = statedb.tasks()
    assert result.added == len(tasks) <= 3 * 8
    assert recents <= {(t.acntid, t.emfdid) for t in tasks}
    assert all(len(statedb.tasks(slot)) <= 8 for slot in range(3))
    slots = {}
    for task in tasks:
        slots.setdefault(task.acntid, set()).add(task.slot)
    assert all(len(s) == 1 for s in slots.values())
    assert {t.slot for t in tasks} == {0, 1, 2}


def test_a_second_pass_adds_nothing_while_tasks_are_queued(db, cfg):
    """Tasks already in a slice are not queued twice: the second pass finds the same due
    work and adds none of it."""
    for n in range(5):
        acntid = add_account(db, listed=None if n == 0 else NOW - 60)
        add_folder(db, acntid, "INBOX", full=None)
        add_folder(db, acntid, "Archive", priority="lo", full=None)
    statedb = StateDB.for_config(cfg)

    first = run_pass(cfg, statedb)
    before = statedb.tasks()
    second = run_pass(cfg, statedb, now=NOW + 5)

    assert first.added == first.due == 11
    assert (second.due, second.added) == (11, 0)
    assert statedb.tasks() == before


def test_listing_folders_makes_discovery_wait_hi_full_interval(db, cfg):
    """After mark_folders_listed the account's discovery is due again only after
    hi_full_interval, and then behind the syncs."""
    acntid = add_account(db, listed=None)
    statedb = StateDB.for_config(cfg)
    assert queued(statedb) == {} and run_pass(cfg, statedb).added == 1
    statedb.clear_slices([0])
    accounts.mark_folders_listed(db, acntid)
    now = time.time()
    assert run_pass(cfg, statedb, now=now).due == 0
    run_pass(cfg, statedb, now=now + cfg.sync.hi_full_interval + 1)
    assert queued(statedb) == {(acntid, 0): (TaskKind.DISCOVER, planner.DISCOVER)}


def test_the_query_and_due_tasks_agree_on_a_random_population(db, make_cfg, db_dsn):
    """What the SQL filter lets through and due_tasks decides equals due_tasks on every row,
    and the filter lets through nothing else, whatever the mix of states around the
    cutoffs."""
    cfg = make_cfg(db_dsn, engine__max_tasks_per_worker=100_000)
    rnd = random.Random(8)

    def near(*intervals):
        """An instant one of these intervals before NOW, give or take a second."""
        return NOW - rnd.choice(intervals) + rnd.choice((-1, 0, 1))

    def maybe(value, p=0.5):
        return value if rnd.random() < p else None

    states, folders = [], []
    for n in range(150):
        owner = n if rnd.random() < 0.7 else None
        if owner is not None and rnd.random() < 0.6:
            set_active(db, owner, near(900, 0, 5000))
        kwargs = dict(owner=owner, auth_error=maybe(near(1800, 10), 0.2),
                      listed=maybe(near(3600, 60), 0.8), error=maybe(near(120, 5), 0.2))
        acntid = add_account(db, **kwargs)
        active = db.execute("SELECT extract(epoch FROM last_active)::float8 FROM"
                            " email_user_activity WHERE user_id = %s", (owner,)).fetchone()
        states.append(AccountState(acntid, kwargs["auth_error"], active and active[0],
                                   kwargs["listed"], kwargs["error"]))
        for k in range(6):
            f = dict(priority=rnd.choice(("hi", "lo", "off")),
                     user_priority=maybe(rnd.choice(("hi", "lo", "off")), 0.3),
                     recent=maybe(near(600, 1800, 60), 0.8),
                     full=maybe(near(3600, 4800, 16 * 3600, 17 * 3600), 0.9),
                     error=maybe(near(120, 10), 0.15), gone=maybe(NOW - 10, 0.1))
            emfdid = add_folder(db, acntid, f"F{k}", **f)
            folders.append(FolderState(acntid, emfdid, f"F{k}", f["priority"],
                                       f["user_priority"], f["recent"], f["full"], f["error"],
                                       f["gone"]))
    expected = planner.due_tasks(states, folders, cfg, NOW, UTC)
    statedb = StateDB.for_config(cfg)

    result = run_pass(cfg, statedb)

    assert len(expected) > 100 and result.due == result.added == len(expected)
    # and exact: every folder read is due, so none takes a place under the limit in vain
    assert result.folders == sum(1 for t in expected if t.emfdid)
    assert {(t.kind, t.acntid, t.emfdid, t.priority, t.due) for t in statedb.tasks()} == {
        (t.kind, t.acntid, t.emfdid, t.priority, t.due) for t in expected}


def test_a_backlog_is_read_most_urgent_first_up_to_the_slices_capacity(db, make_cfg, db_dsn):
    """Each kind of candidate is read at most capacity rows, the most urgent first, so the
    tasks that fill the slices are the longest overdue hi recent syncs."""
    cfg = make_cfg(db_dsn, engine__max_workers=3, engine__send_workers=2,
                   engine__max_tasks_per_worker=3)
    overdue = {}
    for n in range(6):
        acntid = add_account(db)
        overdue[acntid] = add_folder(db, acntid, "INBOX", recent=NOW - 1800 - 100 * n,
                                     full=NOW - 1800 - 100 * n)
        add_folder(db, acntid, "Archive", priority="lo", full=None)
    statedb = StateDB.for_config(cfg)

    result = run_pass(cfg, statedb)

    assert (result.folders, result.due, result.added) == (6, 6, 3)
    assert {(t.acntid, t.emfdid) for t in statedb.tasks()} == {
        (a, overdue[a]) for a in sorted(overdue)[-3:]}


def test_a_pass_records_the_schema_fingerprint(db, cfg):
    """Every pass returns the schema fingerprint and writes it to the state DB for the
    watchdog."""
    statedb = StateDB.for_config(cfg)
    result = run_pass(cfg, statedb)
    assert result.fingerprint == store.fingerprint(db)
    assert statedb.facts()[planner.SCHEMA_FACT] == result.fingerprint


def test_sync_disabled_queues_nothing(db, make_cfg, db_dsn):
    """sync.enabled = false: a pass queues nothing but still reports the fingerprint."""
    cfg = make_cfg(db_dsn, sync__enabled=False)
    add_folder(db, add_account(db, listed=None), "INBOX", full=None)
    statedb = StateDB.for_config(cfg)
    result = run_pass(cfg, statedb)
    assert (result.due, result.added, statedb.tasks()) == (0, 0, [])
    assert result.fingerprint


# --- the planner process's loop -------------------------------------------------------------

class PlannerThread:
    """run_planner in a thread, recording its beats, backend pids and log lines."""

    def __init__(self, cfg):
        self.beats: list[tuple[str, int | None]] = []
        self.backends: list[int | None] = []
        self.lines: list[str] = []
        self.stop = threading.Event()
        handler = logging.Handler()
        handler.emit = lambda record: self.lines.append(record.getMessage())
        self.handler = handler
        self.thread = threading.Thread(target=planner.run_planner, args=(
            cfg, lambda phase, progress: self.beats.append((phase, progress)),
            self.stop.is_set, self.backends.append))

    def __enter__(self):
        logging.getLogger("supervisor_mail.planner").addHandler(self.handler)
        logging.getLogger("supervisor_mail.planner").setLevel(logging.INFO)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=5)
        logging.getLogger("supervisor_mail.planner").removeHandler(self.handler)
        assert not self.thread.is_alive(), "run_planner did not stop"

    def wait(self, what, condition, timeout=15):
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.thread.is_alive(), f"run_planner ended while waiting for {what}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {self.lines}"
            time.sleep(0.05)


def test_run_planner_plans_every_interval_beats_when_idle_and_stops(db, make_cfg, db_dsn):
    """The loop plans, logs one line for a pass that queued tasks, beats while idle, picks
    up new work at the next interval and stops promptly when asked."""
    cfg = make_cfg(db_dsn, planner__interval=1)
    first = add_account(db, listed=None)
    statedb = StateDB.for_config(cfg)
    with PlannerThread(cfg) as loop:
        loop.wait("the first pass", lambda: statedb.tasks())
        second = add_account(db, listed=None)
        loop.wait("the second account", lambda: len(statedb.tasks()) == 2)
        loop.wait("idle beats", lambda: loop.beats.count(("idle", 2)) >= 2)
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 1
    assert {t.acntid for t in statedb.tasks()} == {first, second}
    phases = [phase for phase, _ in loop.beats]
    assert {"planning", "enqueueing", "idle"} <= set(phases)
    planned = [re.sub(r"in \d+ms$", "in Nms", line) for line in loop.lines]
    assert planned == ["planned 1 tasks (1 due, 0 folders and 1 accounts read) in Nms",
                       "planned 1 tasks (2 due, 0 folders and 2 accounts read) in Nms"]
    assert isinstance(loop.backends[0], int)
    assert statedb.facts()[planner.SCHEMA_FACT] == store.fingerprint(db)


def test_run_planner_survives_a_broken_schema_and_a_killed_session(db, make_cfg, db_dsn):
    """A PostgreSQL error fails the pass, is logged once however long it lasts, and the
    loop keeps beating and retries every interval; when the database is back (or its
    session was killed) it plans again, on a new session where needed."""
    cfg = make_cfg(db_dsn, planner__interval=1)
    statedb = StateDB.for_config(cfg)
    with PlannerThread(cfg) as loop:
        loop.wait("the first pass", lambda: loop.backends)
        db.execute("ALTER TABLE email_folders RENAME TO email_folders_away")
        loop.wait("the failure", lambda: any("failed" in line for line in loop.lines))
        failing_since = len(loop.beats)
        loop.wait("three more passes", lambda: [p for p, _ in loop.beats[failing_since:]]
                  .count("planning") >= 3)
        db.execute("ALTER TABLE email_folders_away RENAME TO email_folders")
        add_account(db, listed=None)
        loop.wait("recovery", lambda: statedb.tasks())

        backend = next(pid for pid in reversed(loop.backends) if pid)
        db.execute("SELECT pg_terminate_backend(%s)", (backend,))
        add_account(db, listed=None)
        loop.wait("a new session", lambda: len(statedb.tasks()) == 2, timeout=20)

    failures = [line for line in loop.lines if "failed" in line]
    assert "relation \"email_folders\" does not exist" in failures[0]
    assert failures[0].startswith("planning pass failed, retrying every 1s: PostgreSQL: ")
    assert len(failures) == 2, failures  # the broken schema once, the killed session once
    assert loop.lines.count("planning works again") == 2
    sessions = [pid for pid in loop.backends if pid is not None]
    assert sessions[-1] != backend and loop.backends[-1] is None  # closed when it stopped

