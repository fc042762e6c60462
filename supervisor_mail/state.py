"""The state DB: ``<data_dir>/<host_id>.db``, SQLite in WAL mode on a ramdisk.

It holds only what can be rebuilt from PostgreSQL — the sync workers' queue
slices (``tasks``), one heartbeat row a process (``heartbeats``) and the master's
facts (``engine``) — so deleting it loses nothing. That is what makes the
watchdog's automatic reset safe.

Each process opens its own connection after the fork, and the master holds none
while it forks: SQLite's per-process lock bookkeeping, copied into a child, would
make the child's own connections misjudge their locks. Statements are single and
short, with a busy timeout, so fifteen processes share the file without
"database is locked" reaching anyone. Ages are measured on ``time.monotonic()``,
which on Linux is one clock for every process of the host and never jumps.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from urllib.parse import quote

from supervisor_mail.config import Config
from supervisor_mail.errors import StateError
from supervisor_mail.states import TaskState

MASTER_SLOT = -1
PLANNER_SLOT = -2
BUSY_TIMEOUT = 5.0  # seconds a statement waits for another process's write
SCHEMA_VERSION = 3  # PRAGMA user_version; a file of another version is rebuilt, not migrated
_ABANDONED: list[sqlite3.Connection] = []  # see StateDB.conn: never closed, never used

SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id        INTEGER PRIMARY KEY,
    kind      TEXT NOT NULL,             -- states.TaskKind
    acntid    INTEGER NOT NULL,
    emfdid    INTEGER NOT NULL,          -- 0 for an account-wide task (folder discovery)
    folder    TEXT NOT NULL DEFAULT '',  -- display name, for titles and status
    priority  INTEGER NOT NULL,          -- lower runs first: hi recent, hi full, lo full
    due       REAL NOT NULL,             -- wall clock (epoch seconds)
    slot      INTEGER NOT NULL,          -- the sync worker whose slice holds it
    state     TEXT NOT NULL DEFAULT 'queued',
    attempts  INTEGER NOT NULL DEFAULT 0,  -- times it hung its worker
    reason    TEXT,                      -- why it was set aside
    queued_at REAL NOT NULL,
    started   REAL,                      -- monotonic, when a worker took it
    UNIQUE (acntid, emfdid, kind)
);
CREATE INDEX IF NOT EXISTS tasks_slice ON tasks (slot, state, priority, due);
CREATE TABLE IF NOT EXISTS heartbeats (
    slot        INTEGER PRIMARY KEY,     -- -1 master, -2 planner, 0.. workers
    role        TEXT NOT NULL,           -- states.ProcessRole
    pid         INTEGER NOT NULL,
    backend_pid INTEGER,                 -- its PostgreSQL backend, for pg_blocking_pids
    task_id     INTEGER,
    acntid      INTEGER,
    emfdid      INTEGER,
    folder      TEXT,
    phase       TEXT NOT NULL DEFAULT 'starting',
    progress    INTEGER NOT NULL DEFAULT 0,
    done        INTEGER NOT NULL DEFAULT 0,  -- work completed: commits, tasks, deliveries
    beat        REAL NOT NULL,           -- monotonic time of the last beat
    started     REAL NOT NULL,           -- monotonic time the process started
    session_acntid INTEGER               -- the account whose IMAP session it holds open
);
CREATE TABLE IF NOT EXISTS engine (
    key   TEXT PRIMARY KEY,
    value TEXT
);
CREATE TABLE IF NOT EXISTS counters (   -- metrics: totals since the state DB was created
    name   TEXT NOT NULL,
    labels TEXT NOT NULL DEFAULT '',    -- Prometheus label text, e.g. outcome="sent"
    value  REAL NOT NULL,
    PRIMARY KEY (name, labels)
);
"""


@dataclass
class Task:
    id: int
    kind: str
    acntid: int
    emfdid: int  # 0: the task is about the whole account
    folder: str
    priority: int
    due: float
    slot: int
    state: str
    attempts: int
    reason: str | None
    queued_at: float
    started: float | None


@dataclass(frozen=True)
class NewTask:
    """What the planner decided is due; ``enqueue`` chooses its slice."""

    kind: str
    acntid: int
    emfdid: int  # 0: the whole account
    folder: str
    priority: int
    due: float


@dataclass
class Heartbeat:
    slot: int
    role: str
    pid: int
    backend_pid: int | None
    task_id: int | None
    acntid: int | None
    emfdid: int | None
    folder: str | None
    phase: str
    progress: int
    done: int
    beat: float
    started: float
    session_acntid: int | None = None

    def age(self, now: float | None = None) -> float:
        return (time.monotonic() if now is None else now) - self.beat


STATE_DB_TIMEOUT = 1.0  # seconds a read-only snapshot waits for a writer's lock


@dataclass
class StateSnapshot:
    """What the state DB held at one instant, or ``error`` saying why it could not be read."""

    path: str
    heartbeats: list[Heartbeat] = field(default_factory=list)
    tasks: list[Task] = field(default_factory=list)
    facts: dict[str, str | None] = field(default_factory=dict)
    counters: list[tuple[str, str, float]] = field(default_factory=list)
    monotonic: float = 0.0  # time.monotonic() of the read: heartbeat ages are measured on it
    wall: float = 0.0       # time.time() of the read
    error: str | None = None


def read_snapshot(path: str, timeout: float = STATE_DB_TIMEOUT) -> StateSnapshot:
    """Read every table of the state DB in one read transaction, never writing or creating it.

    A missing, unreadable or locked file gives a snapshot with ``error`` set, not an
    exception: status and metrics report that and go on.
    """
    snap = StateSnapshot(path, monotonic=time.monotonic(), wall=time.time())
    if not os.path.exists(path):
        snap.error = f"{path} does not exist (the engine has not run since boot, or is resetting)"
        return snap
    try:
        conn = sqlite3.connect(f"file:{quote(path)}?mode=ro", uri=True, timeout=timeout,
                               isolation_level=None)
    except sqlite3.Error as exc:
        snap.error = f"{path}: {exc}"
        return snap
    conn.row_factory = sqlite3.Row
    try:
        conn.execute("BEGIN")  # one snapshot of all four tables
        snap.heartbeats = [Heartbeat(**dict(r)) for r in
                           conn.execute("SELECT * FROM heartbeats ORDER BY slot")]
        snap.tasks = [Task(**dict(r)) for r in
                      conn.execute("SELECT * FROM tasks ORDER BY slot, priority, due")]
        snap.facts = {r["key"]: r["value"] for r in conn.execute("SELECT key, value FROM engine")}
        snap.counters = [tuple(r) for r in
                         conn.execute("SELECT name, labels, value FROM counters ORDER BY 1, 2")]
        snap.monotonic, snap.wall = time.monotonic(), time.time()
    except sqlite3.Error as exc:
        snap.error = f"{path}: {exc}"
    finally:
        conn.close()
    return snap


def db_path(cfg: Config) -> str:
    return os.path.join(cfg.engine.data_dir, f"{cfg.engine.host_id}.db")


def remove_files(path: str) -> list[str]:
    """Delete the DB with its -wal and -shm files; return what was there."""
    removed = []
    for name in (path, path + "-wal", path + "-shm"):
        try:
            os.unlink(name)
            removed.append(name)
        except FileNotFoundError:
            pass
    return removed


class StateDB:
    """One process's connection to the state DB, reopened when the file is replaced."""

    def __init__(self, path: str):
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._inode: int | None = None

    @classmethod
    def for_config(cls, cfg: Config) -> StateDB:
        return cls(db_path(cfg))

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is not None and self._replaced():
            # The file was deleted or recreated under us (a reset, a wiped tmpfs). Closing
            # this connection now would make SQLite, believing it held the last one,
            # checkpoint and unlink "<db>-wal" and "<db>-shm" by name: the new file's,
            # which other processes are writing. So it is dropped unclosed.
            _ABANDONED.append(self._conn)
            self._conn = None
        if self._conn is None:
            self.open()
        assert self._conn is not None
        return self._conn

    def _replaced(self) -> bool:
        """True when the file was deleted or recreated under us (a reset, a wiped tmpfs)."""
        try:
            return os.stat(self.path).st_ino != self._inode
        except FileNotFoundError:
            return True

    def open(self) -> None:
        """Open (creating it and its schema when missing); a full or read-only disk is a
        StateError naming the file."""
        self.close()
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            conn = self._connect()
            if conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                conn = self._rebuild_if_foreign(conn)
        except (sqlite3.OperationalError, OSError) as exc:
            raise StateError(f"state DB {self.path}: {exc}: free space on its filesystem or "
                             "fix [engine] data_dir") from None
        self._conn = conn
        self._inode = os.stat(self.path).st_ino

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")  # a ramdisk: durability is not the point
        return conn

    def _rebuild_if_foreign(self, conn: sqlite3.Connection) -> sqlite3.Connection:
        """Create the schema in a new file; a file left by another engine version holds
        nothing PostgreSQL cannot give back, so it is replaced rather than migrated."""
        if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            conn.close()
            remove_files(self.path)
            conn = self._connect()
        conn.executescript(SCHEMA + f"PRAGMA user_version = {SCHEMA_VERSION};")
        return conn

    def check(self) -> None:
        """Raise sqlite3.DatabaseError when the file is unreadable (corrupt, not a DB)."""
        self.conn.execute("PRAGMA quick_check").fetchone()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # --- heartbeats ---------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A short write transaction, taken at once (BEGIN IMMEDIATE) so it cannot deadlock
        upgrading a read lock; rolled back on any exception."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def beat(self, slot: int, role: str, pid: int, phase: str, progress: int,
             task: Task | None = None, backend_pid: int | None = None, done: int = 0,
             session_acntid: int | None = None) -> None:
        """Record that the process in ``slot`` is alive now, and what it has done (one UPSERT).

        ``beat`` ages say a process is alive (the watchdog kills the silent ones);
        ``done`` growing says its role gets work done (the watchdog resets a role that
        has due work but stopped getting it done); ``session_acntid`` is the account
        whose IMAP session a sync worker keeps open, whose next tasks ``enqueue`` gives
        it rather than have a second worker log in to the same account.
        """
        now = time.monotonic()
        self.conn.execute("""
            INSERT INTO heartbeats (slot, role, pid, backend_pid, task_id, acntid, emfdid,
                                    folder, phase, progress, done, beat, started,
                                    session_acntid)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
            ON CONFLICT (slot) DO UPDATE SET
                role = excluded.role, backend_pid = excluded.backend_pid,
                task_id = excluded.task_id, acntid = excluded.acntid, emfdid = excluded.emfdid,
                folder = excluded.folder, phase = excluded.phase, progress = excluded.progress,
                done = excluded.done, beat = excluded.beat,
                session_acntid = excluded.session_acntid,
                started = CASE WHEN heartbeats.pid = excluded.pid THEN heartbeats.started
                               ELSE excluded.started END,
                pid = excluded.pid""",
            (slot, role, pid, backend_pid, task.id if task else None,
             task.acntid if task else None, task.emfdid if task else None,
             task.folder if task else None, phase, progress, done, now, now, session_acntid))

    def heartbeats(self) -> list[Heartbeat]:
        rows = self.conn.execute("SELECT * FROM heartbeats ORDER BY slot").fetchall()
        return [Heartbeat(**dict(row)) for row in rows]

    def forget_heartbeat(self, slot: int) -> None:
        self.conn.execute("DELETE FROM heartbeats WHERE slot = ?", (slot,))

    # --- tasks (the slices) -----------------------------------------------------------

    def claim(self, slot: int, prefer_acntid: int | None = None) -> Task | None:
        """Take the next due task of this slot's slice, preferring the open account's."""
        row = self.conn.execute("""
            UPDATE tasks SET state = ?, started = ?
            WHERE id = (SELECT id FROM tasks WHERE slot = ? AND state = ? AND due <= ?
                        ORDER BY acntid = ? DESC, priority, due LIMIT 1)
            RETURNING *""",
            (TaskState.RUNNING, time.monotonic(), slot, TaskState.QUEUED, time.time(),
             prefer_acntid or -1)).fetchone()
        return Task(**dict(row)) if row else None

    def finish(self, task_id: int) -> None:
        """A task is done (or failed cleanly: the failure is recorded in PostgreSQL)."""
        self.conn.execute("DELETE FROM tasks WHERE id = ?", (task_id,))

    def hand_back(self, task_id: int) -> None:
        """Return a running task to its slice untouched (graceful stop)."""
        self.conn.execute("UPDATE tasks SET state = ?, started = NULL WHERE id = ?",
                          (TaskState.QUEUED, task_id))

    def requeue_running(self, slot: int) -> int:
        """Return the tasks a dead worker of ``slot`` was running to its slice."""
        return self.conn.execute("UPDATE tasks SET state = ?, started = NULL "
                                 "WHERE slot = ? AND state = ?",
                                 (TaskState.QUEUED, slot, TaskState.RUNNING)).rowcount

    def retry_later(self, task_id: int, delay: float) -> None:
        """Return a task to its slice, due again in ``delay`` seconds."""
        self.conn.execute("UPDATE tasks SET state = ?, started = NULL, due = ? WHERE id = ?",
                          (TaskState.QUEUED, time.time() + delay, task_id))

    def record_hang(self, task_id: int, max_failures: int, reason: str) -> Task | None:
        """Count a hang against a task: back to its slice, or set aside after the last one."""
        row = self.conn.execute("""
            UPDATE tasks SET attempts = attempts + 1, started = NULL,
                state = CASE WHEN attempts + 1 >= ? THEN ? ELSE ? END,
                reason = CASE WHEN attempts + 1 >= ? THEN ? ELSE reason END
            WHERE id = ? RETURNING *""",
            (max_failures, TaskState.SET_ASIDE, TaskState.QUEUED, max_failures, reason,
             task_id)).fetchone()
        return Task(**dict(row)) if row else None

    def enqueue(self, new: list[NewTask], slots: list[int], max_per_slot: int) -> int:
        """Put due tasks into the sync slices, in one short transaction; return how many.

        All tasks of one account go to the slice that already holds one of its
        tasks, or else to the worker that keeps the account's IMAP session open, so
        one account never has two IMAP sessions; otherwise to the least loaded slice.
        A slice never holds more than ``max_per_slot``: what does not fit waits for
        the next planning pass. A task already queued is left alone.
        """
        with self.transaction() as conn:
            owner = dict(conn.execute("SELECT session_acntid, slot FROM heartbeats "
                                      "WHERE session_acntid IS NOT NULL").fetchall())
            owner.update(conn.execute("SELECT acntid, slot FROM tasks WHERE state != ? "
                                      "GROUP BY acntid", (TaskState.SET_ASIDE,)).fetchall())
            load = dict.fromkeys(slots, 0)
            load.update((s, n) for s, n in conn.execute(
                "SELECT slot, count(*) FROM tasks WHERE state != ? GROUP BY slot",
                (TaskState.SET_ASIDE,)).fetchall() if s in load)
            now, added = time.time(), 0
            for task in sorted(new, key=lambda t: (t.priority, t.due)):
                if min(load.values()) >= max_per_slot:
                    break  # every slice is full: the rest waits for a later pass
                slot = owner.get(task.acntid)
                if slot is None or slot not in load:
                    slot = min(load, key=lambda s: (load[s], s))
                if load[slot] >= max_per_slot:
                    continue
                cur = conn.execute(
                    "INSERT INTO tasks (kind, acntid, emfdid, folder, priority, due, slot, "
                    "queued_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (acntid, emfdid, kind) DO NOTHING",
                    (task.kind, task.acntid, task.emfdid, task.folder, task.priority, task.due,
                     slot, now))
                if cur.rowcount:
                    owner[task.acntid] = slot
                    load[slot] += 1
                    added += 1
        return added

    def tasks(self, slot: int | None = None) -> list[Task]:
        if slot is None:
            rows = self.conn.execute("SELECT * FROM tasks ORDER BY slot, priority, due")
        else:
            rows = self.conn.execute("SELECT * FROM tasks WHERE slot = ? "
                                     "ORDER BY priority, due", (slot,))
        return [Task(**dict(row)) for row in rows.fetchall()]

    def clear_slices(self, slots: list[int]) -> int:
        """Drop the tasks of these slots, so the planner plans them afresh. Tasks that have
        hung a worker keep their count (a reset must not launder a poison task), and
        set-aside ones stay set aside."""
        marks = ",".join("?" * len(slots))
        self.conn.execute(f"UPDATE tasks SET state = ?, started = NULL WHERE slot IN ({marks}) "
                          "AND state = ? AND attempts > 0",
                          (TaskState.QUEUED, *slots, TaskState.RUNNING))
        return self.conn.execute(f"DELETE FROM tasks WHERE slot IN ({marks}) AND attempts = 0",
                                 slots).rowcount

    # --- counters (metrics) ---------------------------------------------------------

    def count(self, name: str, value: float = 1, labels: str = "") -> None:
        """Add ``value`` to a counter; one short UPSERT, done after the work it counts."""
        self.conn.execute("INSERT INTO counters (name, labels, value) VALUES (?, ?, ?) "
                          "ON CONFLICT (name, labels) DO UPDATE SET value = value + excluded.value",
                          (name, labels, value))

    def counters(self) -> list[tuple[str, str, float]]:
        return [tuple(row) for row in
                self.conn.execute("SELECT name, labels, value FROM counters ORDER BY 1, 2")]

    # --- engine facts ---------------------------------------------------------------

    def set_fact(self, key: str, value: object) -> None:
        self.set_facts({key: value})

    def set_facts(self, facts: dict[str, object]) -> None:
        """Set several facts in one transaction, so a reader sees all of them or none."""
        with self.transaction() as conn:
            conn.executemany("INSERT INTO engine (key, value) VALUES (?, ?) ON CONFLICT (key) "
                             "DO UPDATE SET value = excluded.value",
                             [(key, None if value is None else str(value))
                              for key, value in facts.items()])

    def facts(self) -> dict[str, str | None]:
        return {row["key"]: row["value"]
                for row in self.conn.execute("SELECT key, value FROM engine").fetchall()}
