"""The state DB: slices, claims, hangs, heartbeats, and a file replaced under a process."""

import os

from supervisor_mail.state import NewTask, StateDB, remove_files
from supervisor_mail.states import TaskKind, TaskState


def new(acntid, emfdid, priority=0, kind=TaskKind.SYNC_RECENT, due=0.0):
    return NewTask(kind, acntid, emfdid, f"folder {emfdid}", priority, due)


def test_one_account_stays_in_one_slice(tmp_path):
    """Every task of an account goes to the slice already holding one of its tasks."""
    db = StateDB(str(tmp_path / "h.db"))
    assert db.enqueue([new(1, 10), new(2, 20)], slots=[0, 1], max_per_slot=10) == 2
    assert db.enqueue([new(1, 11), new(2, 21), new(1, 12)], slots=[0, 1], max_per_slot=10) == 3
    by_account = {}
    for task in db.tasks():
        by_account.setdefault(task.acntid, set()).add(task.slot)
    assert by_account == {1: {0}, 2: {1}}


def test_an_accounts_tasks_go_to_the_worker_keeping_its_session(tmp_path):
    """With no task of account 7 left, the worker of slot 1 still keeps its IMAP session
    open: the account's next tasks go to slot 1, not to the emptier slot 0; once the
    session is closed, they go where there is room."""
    db = StateDB(str(tmp_path / "h.db"))
    db.enqueue([new(2, 20), new(3, 30)], slots=[0, 1], max_per_slot=10)  # one each
    db.beat(1, "sync", os.getpid(), "idle", 0, session_acntid=7)
    assert db.enqueue([new(7, 70), new(7, 71)], slots=[0, 1], max_per_slot=10) == 2
    assert {t.slot for t in db.tasks() if t.acntid == 7} == {1}
    assert db.heartbeats()[0].session_acntid == 7

    for task in db.tasks():
        db.finish(task.id)
    db.beat(1, "sync", os.getpid(), "idle", 0)  # the session is closed
    db.enqueue([new(2, 20)], slots=[0, 1], max_per_slot=10)
    db.enqueue([new(7, 72)], slots=[0, 1], max_per_slot=10)
    assert {t.acntid: t.slot for t in db.tasks()} == {2: 0, 7: 1}


def test_set_facts_writes_all_of_them(tmp_path):
    db = StateDB(str(tmp_path / "h.db"))
    db.set_facts({"a": 1, "b": None})
    assert db.facts() == {"a": "1", "b": None}


def test_slices_are_capped_and_duplicates_ignored(tmp_path):
    """No slice holds more than max_per_slot; a task already queued is not added twice."""
    db = StateDB(str(tmp_path / "h.db"))
    assert db.enqueue([new(1, n) for n in range(1, 6)], slots=[0], max_per_slot=3) == 3
    assert db.enqueue([new(1, 1)], slots=[0], max_per_slot=10) == 0
    assert len(db.tasks(0)) == 3


def test_claim_prefers_priority_then_open_account(tmp_path):
    """Hi recent syncs run before full syncs; the open account's tasks come first."""
    db = StateDB(str(tmp_path / "h.db"))
    db.enqueue([new(1, 1, priority=2, kind=TaskKind.SYNC_FULL), new(1, 2, priority=0)],
               slots=[0], max_per_slot=10)
    first = db.claim(0)
    assert first.emfdid == 2 and first.state == TaskState.RUNNING
    db.enqueue([new(2, 3, priority=0)], slots=[0], max_per_slot=10)
    assert db.claim(0, prefer_acntid=1).emfdid == 1
    assert db.claim(0).emfdid == 3
    assert db.claim(0) is None


def test_tasks_not_yet_due_wait(tmp_path):
    """A task due in the future is not claimed."""
    import time

    db = StateDB(str(tmp_path / "h.db"))
    db.enqueue([new(1, 1, due=time.time() + 60)], slots=[0], max_per_slot=10)
    assert db.claim(0) is None


def test_hangs_set_a_task_aside(tmp_path):
    """A task that hung its worker max_failures times is set aside with the reason."""
    db = StateDB(str(tmp_path / "h.db"))
    db.enqueue([new(1, 1)], slots=[0], max_per_slot=10)
    task = db.claim(0)
    assert db.record_hang(task.id, 2, "hung in fetch").state == TaskState.QUEUED
    db.claim(0)
    aside = db.record_hang(task.id, 2, "hung in fetch")
    assert aside.state == TaskState.SET_ASIDE and aside.reason == "hung in fetch"
    assert db.claim(0) is None
    assert db.clear_slices([0]) == 0 and len(db.tasks()) == 1
    db.enqueue([new(1, 2)], slots=[0], max_per_slot=10)
    assert db.clear_slices([0]) == 1 and len(db.tasks()) == 1


def test_heartbeat_upsert_keeps_start_of_same_pid(tmp_path):
    """A beat updates the row; its start time changes only when another pid takes the slot."""
    db = StateDB(str(tmp_path / "h.db"))
    db.beat(3, "sync", 100, "idle", 0)
    started = db.heartbeats()[0].started
    db.beat(3, "sync", 100, "fetch", 5)
    row = db.heartbeats()[0]
    assert (row.phase, row.progress, row.started) == ("fetch", 5, started)
    db.beat(3, "sync", 101, "idle", 0)
    assert db.heartbeats()[0].started > started


def test_deleted_file_is_recreated_on_next_use(tmp_path):
    """Deleting the DB (a reset, a wiped tmpfs) makes the next statement open a fresh one."""
    path = str(tmp_path / "h.db")
    db = StateDB(path)
    db.beat(0, "sync", os.getpid(), "idle", 0)
    assert remove_files(path)
    assert db.heartbeats() == []
    assert os.path.exists(path)


def test_facts(tmp_path):
    """Engine facts are simple key/value rows."""
    db = StateDB(str(tmp_path / "h.db"))
    db.set_fact("master_pid", 42)
    db.set_fact("master_pid", 43)
    assert db.facts() == {"master_pid": "43"}


def test_counters_add_up(tmp_path):
    """Counters are totals: each count adds to the row of its name and labels."""
    db = StateDB(str(tmp_path / "h.db"))
    db.count("messages_synced", 3)
    db.count("messages_synced", 2)
    db.count("sends", 1, 'outcome="sent"')
    assert db.counters() == [("messages_synced", "", 5.0), ("sends", 'outcome="sent"', 1.0)]


def test_a_file_of_another_version_is_rebuilt(tmp_path):
    """A state DB left by another engine version is replaced, not half-used."""
    import sqlite3

    path = str(tmp_path / "h.db")
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE heartbeats (slot INTEGER PRIMARY KEY, pid INTEGER)")
    old.execute("INSERT INTO heartbeats VALUES (1, 2)")
    old.commit()
    old.close()
    db = StateDB(path)
    db.beat(0, "sync", 5, "idle", 0, done=3)
    assert [(hb.slot, hb.done) for hb in db.heartbeats()] == [(0, 3)]


def test_writers_forked_the_way_the_master_forks_lose_nothing(tmp_path):
    """The master closes its connection before each fork and reopens after: children beating
    hard while the parent reads and closes lose no write and corrupt nothing."""
    path = str(tmp_path / "h.db")
    parent = StateDB(path)
    parent.beat(-1, "master", os.getpid(), "running", 0)
    children = []
    for slot in (2, 3):
        parent.close()  # as Master.spawn_worker does
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                child = StateDB(path)
                for n in range(3000):
                    child.beat(slot, "send", os.getpid(), "idle", n)
            except Exception:
                code = 1
            os._exit(code)
        children.append(pid)
    for _ in range(30):
        parent.heartbeats()
        parent.close()
    assert [os.waitpid(pid, 0)[1] for pid in children] == [0, 0]
    final = {hb.slot: hb.progress for hb in StateDB(path).heartbeats()}
    assert final == {-1: 0, 2: 2999, 3: 2999}
