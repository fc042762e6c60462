"""A sync worker: takes tasks from its own slice of the state DB and runs them, keeping one
IMAP session open per account across that account's folders.

The loop, top to bottom: claim the next task of my slice (the open account's first),
check that this host holds the account's lease (``cluster.Fence``), open the
account's session if it is not the open one, run the task, finish it — or hand it
back on a graceful stop, or put it back a little later when the database is busy,
or drop it when the lease is lost. Nothing here decides what is due: the planner does.
"""

from __future__ import annotations

import logging
import time

import psycopg

from supervisor_mail import accounts, cluster, folders, imap_sync, metrics, store
from supervisor_mail.errors import DatabaseError, LeaseLost, SupervisorMailError
from supervisor_mail.logs import where
from supervisor_mail.state import Task
from supervisor_mail.states import ProcessRole, TaskKind
from supervisor_mail.worker import Process

log = logging.getLogger("supervisor_mail.sync_worker")

IDLE_POLL = 0.25            # seconds between looks at an empty slice
SESSION_IDLE_CLOSE = 60.0   # seconds an idle IMAP session stays open for the next task
DB_BUSY_RETRY = 2.0         # seconds before a task that met a lock or statement timeout reruns


class SyncWorker(Process):
    role = ProcessRole.SYNC
    session: imap_sync.AccountSession | None = None  # the open account's, kept across tasks

    def work(self) -> None:
        self.conn: psycopg.Connection | None = None
        self.guard = cluster.Guard()
        idle_since = time.monotonic()
        try:
            while not self.stopping:
                task = self.statedb.claim(self.slot, self.session_acntid)
                if task is None:
                    if self.session and (time.monotonic() - idle_since > SESSION_IDLE_CLOSE
                                         or self.session.fence.left() <= 0):
                        self.close_session()
                    self.beat("idle", 0)
                    time.sleep(IDLE_POLL)
                    continue
                self.run_task(task)
                idle_since = time.monotonic()
        finally:
            self.close_session()
            if self.conn is not None:
                self.conn.close()

    @property
    def session_acntid(self) -> int | None:
        return self.session.acntid if self.session else None

    def run_task(self, task: Task) -> None:
        self.task = task
        self.beat("starting task", 0)
        try:
            finished = self.run_task_steps(task)
        except LeaseLost as exc:
            self.lease_lost(task, exc)
            finished = True
        except (psycopg.Error, DatabaseError) as exc:
            # The database is busy or away (a migration holds a lock): not the folder's
            # fault, so no folder error and no error backoff; the task runs again soon.
            log.warning("database busy, %s will run again in %.0fs: %s", task.kind,
                        DB_BUSY_RETRY, str(exc).strip().splitlines()[0],
                        extra=where(task.acntid, task.emfdid or None))
            self.drop_connection()
            self.statedb.retry_later(task.id, DB_BUSY_RETRY)
            return
        except SupervisorMailError:
            # imap_sync has logged it and recorded it on the folder; the planner retries
            # after its error backoff. The session may be unusable: start afresh.
            self.close_session()
            finished = True
        finally:
            self.task = None
        if finished:
            self.done += 1
            self.statedb.finish(task.id)
        else:
            self.statedb.hand_back(task.id)  # a graceful stop: the next worker resumes it

    def lease_lost(self, task: Task, exc: LeaseLost) -> None:
        """The account is (or is about to be) another host's: the batch in hand was not
        stored, the holder plans the work afresh, and the IMAP session goes now."""
        extra = where(task.acntid, task.emfdid or None)
        if self.session is None:  # refused at the task's start, before any IMAP
            log.info("%s not run here: %s", task.kind, exc, extra=extra)
            return
        log.warning("%s stopped: %s; its IMAP session is closed", task.kind, exc, extra=extra)
        self.close_session()

    def run_task_steps(self, task: Task) -> bool:
        """Run one task; False when a stop request interrupted it between batches."""
        conn = self.database()
        self.open_session(conn, task.acntid)
        assert self.session is not None
        if task.kind == TaskKind.DISCOVER:
            imap_sync.discover_folders(conn, self.session)
            accounts.mark_folders_listed(conn, task.acntid)
            return True
        folder = folders.get(conn, task.emfdid)
        result = imap_sync.sync_folder(conn, self.session, folder, TaskKind(task.kind),
                                       self.cfg, self.sync_beat, self.should_stop)
        metrics.count_sync(self.statedb, task.kind, result.new, result.bytes)
        return not result.stopped

    def sync_beat(self, phase: str, count: int) -> None:
        """imap_sync's beat: a commit is work done."""
        if phase == "commit":
            self.done += 1
        self.beat(phase, count)

    def database(self) -> psycopg.Connection:
        if self.conn is None or self.conn.closed:
            self.beat("connect database")
            self.conn = store.connect(self.cfg, "sync", self.slot)
            self.backend_pid = self.conn.info.backend_pid
        return self.conn

    def drop_connection(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
            self.backend_pid = None

    def open_session(self, conn: psycopg.Connection, acntid: int) -> None:
        """The account's IMAP session, kept from the last task while the lease it was opened
        under still holds; LeaseLost when this host holds no lease on the account."""
        if self.session is not None and self.session.acntid == acntid:
            try:
                self.session.fence.take(conn)
                return
            except LeaseLost:
                pass  # a lease lost in between: that session is done; a new one may be ours
        self.close_session()
        fence = cluster.Fence(self.cfg, acntid, self.guard)
        fence.take(conn)
        self.beat("connect imap")
        self.session = imap_sync.AccountSession(conn, self.cfg, acntid, fence=fence)
        self.session.open()
        # Recorded before the task can finish: from here the planner gives the account's
        # next tasks to this worker, whose session stays open for them.
        self.beat("imap session open")

    def close_session(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None
