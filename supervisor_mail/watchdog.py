"""The watchdog, run by the master every ``watchdog.check_interval`` from the state DB alone.

Three levels (DESIGN.md, "The watchdog"):

1. A hung process — no beat for ``worker_timeout``: its stack is asked for, it gets
   SIGTERM, then SIGKILL after ``kill_grace``; its task goes back to its slice with one
   more attempt (set aside after ``max_task_failures``); the slot is refilled at once.
2. A stalled role — sync work due but no sync beat for ``stall_timeout``, or a
   replacement that hangs again: that role's workers are killed, their slices and PID
   files cleared, and they restart; the other role goes on. Both roles stalled, a
   changed PostgreSQL schema fingerprint, or an unreadable state DB: the old manual
   procedure in full (kill everything, delete the state DB and PID files, respawn).
3. A hung master is the business of ``healthcheck`` and the supervisord listener.

Repeated stall resets back off exponentially (the counters live here, in the master,
so deleting the state DB does not forget them); a schema change resets at once.
"""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import time
from typing import TYPE_CHECKING

from supervisor_mail import pidfile
from supervisor_mail.state import remove_files
from supervisor_mail.states import ProcessRole, TaskState
from supervisor_mail.worker import STACK_SIGNAL

if TYPE_CHECKING:
    from supervisor_mail.master import Child, Master

log = logging.getLogger("supervisor_mail.watchdog")

WORKER_ROLES = (ProcessRole.SYNC, ProcessRole.SEND)


class Watchdog:
    def __init__(self, master: Master):
        self.master = master
        self.resets = 0                  # full and role resets since the master started
        self.backoff_level = 0           # exponent of the stall-reset backoff
        self.backoff_until = 0.0         # monotonic; no stall reset (or respawn) before
        self.paused_roles: set[ProcessRole] = set()
        self.last_reset_at = 0.0
        self.fingerprint: str | None = None
        self.resetting = False
        self.done_seen: dict[int, int] = {}   # pid -> its heartbeat's `done` at the last check
        self.progress_at = dict.fromkeys(WORKER_ROLES, time.monotonic())  # work done, or none due
        self.work_at = dict.fromkeys(WORKER_ROLES, 0.0)  # work really done
        self.reset_roles: set[ProcessRole] = set()  # what the running backoff is about
        self.configure()

    def configure(self) -> None:
        w = self.master.cfg.watchdog
        self.timeout, self.grace = float(w.worker_timeout), float(w.kill_grace)
        self.stall_timeout, self.max_failures = float(w.stall_timeout), w.max_task_failures
        self.max_backoff = float(w.max_reset_backoff)

    # --- one check ---------------------------------------------------------------------

    def check(self) -> None:
        now = time.monotonic()
        try:
            beats = {hb.slot: hb for hb in self.master.statedb.heartbeats()}
            facts = self.master.statedb.facts()
            due_sync = self._sync_work_due()
        except sqlite3.DatabaseError as exc:
            self.full_reset(f"state DB unreadable ({exc})")
            return
        self.kill_stragglers(now)
        hung_roles = self.murder_hung(beats, now)
        if self._schema_changed(facts.get("schema_fingerprint")):
            self.full_reset("the PostgreSQL schema changed (an application upgrade)")
            return
        self.note_progress(beats, due_sync, now)
        stalled = set(hung_roles)
        if now - self.progress_at[ProcessRole.SYNC] >= self.stall_timeout:
            stalled.add(ProcessRole.SYNC)
        self.handle_stalls(stalled, now)
        self.recover_backoff(now)
        self.publish()

    def murder_hung(self, beats: dict, now: float) -> set[ProcessRole]:
        """Kill every process without a beat for worker_timeout; return the roles whose
        replacement hung again (a stall, not a single stuck process)."""
        stalled: set[ProcessRole] = set()
        for child in list(self.master.children.values()):
            if child.killed_at is not None:
                continue
            hb = beats.get(child.process.slot)
            last = hb.beat if hb is not None and hb.pid == child.pid else child.started
            age = now - max(last, child.started)
            if age < self.timeout:
                continue
            own = hb if hb is not None and hb.pid == child.pid else None
            self.kill_hung(child, own, age)
            task = own.task_id if own is not None else None
            self.master.slots[child.process.slot].hung_task = task
            # A replacement hanging on the task its predecessor hung on is that task's
            # fault (it will be set aside); hanging on anything else is the engine's.
            if child.replaces_hung and child.process.role in WORKER_ROLES \
                    and (task is None or task != child.predecessor_task):
                stalled.add(child.process.role)
        return stalled

    def kill_hung(self, child: Child, hb, age: float) -> None:
        process = child.process
        where = f" on [{hb.acntid},{hb.emfdid or '-'}] {hb.folder or ''}".rstrip() \
            if hb is not None and hb.acntid else ""
        phase = hb.phase if hb is not None else "starting"
        log.error("%s (pid %d) hung: no progress for %.0fs in phase %r%s; dumping its stack "
                  "to the error log and killing it", process.name, child.pid, age, phase, where)
        for sig in (STACK_SIGNAL, signal.SIGTERM):
            self._kill(child.pid, sig)
        child.killed_at, child.hung = time.monotonic(), True
        if hb is not None and hb.backend_pid:
            self.master.diagnose_blocking(hb.backend_pid, process.name)
        if hb is not None and hb.task_id:
            task = self.master.statedb.record_hang(hb.task_id, self.max_failures,
                                                   f"hung its worker in phase {phase!r}")
            if task is not None and task.state == TaskState.SET_ASIDE:
                log.error("task %s of [%d,%s] %s set aside after %d hangs: %s", task.kind,
                          task.acntid, task.emfdid or "-", task.folder, task.attempts,
                          task.reason)

    def kill_stragglers(self, now: float) -> None:
        """SIGKILL what was asked to stop ``kill_grace`` ago and is still there (a SIGSTOPped
        process answers no other signal)."""
        for child in list(self.master.children.values()):
            if child.killed_at is not None and now - child.killed_at >= self.grace:
                self._kill(child.pid, signal.SIGKILL)

    def next_deadline(self) -> float | None:
        """The monotonic time of the next SIGKILL due, so the master can wake for it."""
        pending = [c.killed_at + self.grace for c in self.master.children.values()
                   if c.killed_at is not None]
        return min(pending, default=None)

    # --- stalls and resets -------------------------------------------------------------

    def _sync_work_due(self) -> bool:
        """The planner only queues tasks that are due, so any task in a slice (even one put
        back for a few seconds because the database was busy) is due work."""
        return any(t.state != TaskState.SET_ASIDE for t in self.master.statedb.tasks())

    def note_progress(self, beats: dict, due_sync: bool, now: float) -> None:
        """A role progresses when a process of it reports more work done; sync with nothing
        due counts as progressing (an idle engine is not a stalled one)."""
        seen = {}
        for hb in beats.values():
            if hb.role in WORKER_ROLES:
                if hb.done > self.done_seen.get(hb.pid, 0):
                    self.progress_at[ProcessRole(hb.role)] = now
                    self.work_at[ProcessRole(hb.role)] = now
                seen[hb.pid] = hb.done
        self.done_seen = seen
        if not due_sync:
            self.progress_at[ProcessRole.SYNC] = now

    def _schema_changed(self, current: str | None) -> bool:
        if current is None:
            return False
        changed = self.fingerprint is not None and current != self.fingerprint
        self.fingerprint = current
        return changed

    def handle_stalls(self, stalled: set[ProcessRole], now: float) -> None:
        if not stalled:
            return
        if now < self.backoff_until:
            self.paused_roles |= stalled  # their slots stay empty until the backoff ends
            return
        if stalled >= {ProcessRole.SYNC, ProcessRole.SEND}:
            self.full_reset("both sync and delivery are stalled", backoff=True)
        else:
            for role in stalled:
                self.role_reset(role)

    def role_reset(self, role: ProcessRole) -> None:
        """Kill one role's workers, clear their slices and PID files, and restart them."""
        self.resets += 1
        log.error("engine reset #%d: %s workers are stalled; restarting them", self.resets, role)
        children = [c for c in self.master.children.values() if c.process.role == role]
        self._kill_and_wait(children)
        slots = [slot for slot, r in self.master.wanted_slots().items() if r == role]
        if role == ProcessRole.SYNC and slots:
            self.master.statedb.clear_slices(slots)
        for slot in slots:
            self.master.statedb.forget_heartbeat(slot)
        self._remove_pid_files({c.process.name for c in children})
        self.progress_at[role] = time.monotonic()
        self._start_backoff({role})

    def full_reset(self, reason: str, backoff: bool = False) -> None:
        """The old manual procedure: kill every worker, delete the state DB and the workers'
        PID files, recreate, respawn."""
        self.resets += 1
        log.error("engine reset #%d: %s", self.resets, reason)
        children = list(self.master.children.values())
        self._kill_and_wait(children)
        self.master.statedb.close()
        removed = remove_files(self.master.statedb.path)
        self._remove_pid_files(set(pidfile.worker_pids(self.master.cfg.engine.pid_dir)))
        self.master.open_state_db()
        log.info("engine reset #%d: killed %d processes, deleted %s", self.resets, len(children),
                 ", ".join(os.path.basename(p) for p in removed) or "no state DB files")
        self.progress_at = dict.fromkeys(WORKER_ROLES, time.monotonic())
        if backoff:
            self._start_backoff(set(WORKER_ROLES))
        self.publish()

    def _kill_and_wait(self, children: list[Child]) -> None:
        self.resetting = True
        try:
            for child in children:
                self._kill(child.pid, signal.SIGTERM)
            pids = {c.pid for c in children}
            self.master.wait_for_children(self.grace, pids)
            for child in children:
                if child.pid in self.master.children:
                    self._kill(child.pid, signal.SIGKILL)
            self.master.wait_for_children(5.0, pids)
        finally:
            self.resetting = False

    def _remove_pid_files(self, names: set[str]) -> None:
        for name in names:
            pidfile.remove_worker(self.master.cfg.engine.pid_dir, name)

    def _start_backoff(self, roles: set[ProcessRole]) -> None:
        self.reset_roles = roles
        delay = min(self.max_backoff, (self.timeout + self.grace) * 2 ** self.backoff_level)
        self.backoff_level += 1
        self.last_reset_at = time.monotonic()
        self.backoff_until = self.last_reset_at + delay
        log.info("next stall reset no sooner than %.0fs from now", delay)

    def recover_backoff(self, now: float) -> None:
        """Resume paused roles when the backoff ends; forget the backoff once work gets done
        again after the last reset."""
        if self.paused_roles and now >= self.backoff_until:
            self.paused_roles.clear()
        resumed = any(self.work_at[role] > self.last_reset_at for role in self.reset_roles)
        if self.backoff_level and now >= self.backoff_until and resumed:
            log.info("progress resumed: the reset backoff is cleared")
            self.backoff_level = 0

    def may_spawn(self, role: ProcessRole) -> bool:
        return role not in self.paused_roles

    def publish(self) -> None:
        """Write the counters to the state DB for status and healthcheck."""
        db = self.master.statedb
        db.set_fact("resets", self.resets)
        remaining = max(0.0, self.backoff_until - time.monotonic())
        db.set_fact("backoff_until", time.time() + remaining if remaining else None)

    @staticmethod
    def _kill(pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

