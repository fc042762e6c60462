"""The master: forks the planner and the workers, reaps and respawns them, runs the
watchdog, and handles signals. It never connects to PostgreSQL and never blocks on
anything but its own loop, so a hung database can never hang it.

Signal handlers only enqueue; the loop does everything else::

    start -> loop { handle queued signals, reap, watchdog, manage workers, beat, sleep }

Shutdown travels as ``StopMaster`` and is handled in one place, ``run``.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import time
from dataclasses import dataclass

from supervisor_mail import config as config_mod
from supervisor_mail import diagnose, logs, metrics, pidfile, privileges, proctitle, systemd
from supervisor_mail.config import Config
from supervisor_mail.errors import ConfigError, StateError
from supervisor_mail.state import MASTER_SLOT, PLANNER_SLOT, StateDB, remove_files
from supervisor_mail.states import ProcessRole
from supervisor_mail.sync_worker import SyncWorker
from supervisor_mail.watchdog import Watchdog
from supervisor_mail.worker import (
    WORKER_BOOT_ERROR,
    PlannerProcess,
    Process,
    SendProcess,
    boot_error_fact,
    run_in_child,
)

log = logging.getLogger("supervisor_mail.master")

PROCESS_CLASSES: dict[ProcessRole, type[Process]] = {
    ProcessRole.PLANNER: PlannerProcess, ProcessRole.SYNC: SyncWorker,
    ProcessRole.SEND: SendProcess}
RESPAWN_BACKOFF_MAX = 60.0  # seconds between attempts for a slot whose process dies at start
QUICK_EXIT = 10.0           # a process that exits sooner than this after its start "died at start"
BOOT_FAILURES_TO_HALT = 3   # consecutive boot errors of a slot before the master gives up


class StopMaster(Exception):
    """Leave the main loop; ``graceful`` says whether workers get ``stop_timeout``."""

    def __init__(self, graceful: bool, code: int = 0, reason: str = ""):
        super().__init__(reason)
        self.graceful, self.code, self.reason = graceful, code, reason


@dataclass
class Child:
    """A forked process the master knows by pid."""

    process: Process
    pid: int
    started: float
    replaces_hung: bool = False      # the slot's previous process was killed as hung
    predecessor_task: int | None = None  # the task that previous process hung on
    killed_at: float | None = None   # when the watchdog sent SIGTERM
    hung: bool = False


@dataclass
class SlotRecord:
    """Respawn bookkeeping of one slot, kept across its processes."""

    failures: int = 0
    boot_failures: int = 0
    not_before: float = 0.0
    last_hung: bool = False
    hung_task: int | None = None


def describe_status(status: int) -> str:
    """A wait status in words, as supervisor does: 'exited with status 3', 'killed by SIGKILL'."""
    if os.WIFSIGNALED(status):
        return f"terminated by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with status {os.WEXITSTATUS(status)}"


class Master:
    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)

    def __init__(self, cfg: Config, config_path: str | None = None, log_stderr: bool = False):
        self.cfg = cfg
        self.config_path = config_path
        self.log_stderr = log_stderr
        self.children: dict[int, Child] = {}   # pid -> child
        self.helpers: set[int] = set()         # short-lived diagnostic children
        self.slots: dict[int, SlotRecord] = {}
        self.signal_queue: list[int] = []
        self.pidfile = pidfile.MasterPidFile(cfg.engine.pid_dir)
        self.statedb = StateDB.for_config(cfg)
        self.watchdog = Watchdog(self)
        self.started = time.monotonic()
        self.replacing = False  # stopping or reloading: exits are expected, not failures
        self.halt_reason = ""   # why the master halted with a non-zero code, for `run`
        self._pipe_r = self._pipe_w = -1

    # --- the loop -------------------------------------------------------------------

    def run(self) -> int:
        self.start()
        try:
            while True:
                self.handle_signals()
                self.reap_workers()
                self.watchdog.check()
                self.manage_workers()
                self.beat()
                self.sleep()
        except StopMaster as stop:
            self.halt(stop)
            if stop.code:
                self.halt_reason = stop.reason
            return stop.code

    def start(self) -> None:
        privileges.drop(self.cfg)
        self.prepare_directories()
        self.pidfile.acquire()
        logs.setup(self.cfg, "m", stderr=self.log_stderr)
        if privileges.is_root():
            log.warning("running as root because [engine] allow_root = true")
        self.open_state_db()
        self.metrics = metrics.start_metrics(self.cfg, self.statedb.path)  # None when off
        self.install_signals()
        proctitle.set_title("master")
        log.info("supervisor_mail started: %d sync and %d send workers, state DB %s",
                 self.cfg.sync_workers, self.cfg.engine.send_workers, self.statedb.path)
        systemd.notify("READY=1")

    def prepare_directories(self) -> None:
        for path in (self.cfg.engine.data_dir, self.cfg.engine.pid_dir, self.cfg.engine.log_dir):
            try:
                os.makedirs(path, exist_ok=True)
            except OSError as exc:
                raise StateError(f"{path}: cannot create: {exc.strerror}; create it for the "
                                 "engine's user or change [engine] in the config") from None

    def open_state_db(self) -> None:
        """Open the state DB; rebuild it when unreadable (a tmpfs wiped at boot is normal)."""
        try:
            self.statedb.open()
            self.statedb.check()
        except StateError:
            raise
        except Exception as exc:  # sqlite3.DatabaseError: not a database, corrupt
            log.warning("state DB %s unreadable (%s): rebuilding it", self.statedb.path, exc)
            self.statedb.close()
            remove_files(self.statedb.path)
            self.statedb.open()
        self.statedb.set_fact("master_pid", os.getpid())
        self.statedb.set_fact("started_at", time.time())

    def install_signals(self) -> None:
        self._pipe_r, self._pipe_w = os.pipe()
        for fd in (self._pipe_r, self._pipe_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self._pipe_w)
        for sig in self.SIGNALS:
            signal.signal(sig, self._enqueue_signal)

    def _enqueue_signal(self, signum: int, frame: object) -> None:
        self.signal_queue.append(signum)  # nothing else here: the loop does the work

    def handle_signals(self) -> None:
        while self.signal_queue:
            signum = self.signal_queue.pop(0)
            if signum in (signal.SIGTERM, signal.SIGINT):
                raise StopMaster(graceful=True, reason=signal.Signals(signum).name)
            if signum == signal.SIGHUP:
                self.reload()

    def sleep(self) -> None:
        """Wait for a signal (the wakeup fd), the next watchdog check or a SIGKILL due."""
        timeout = float(self.cfg.watchdog.check_interval)
        deadline = self.watchdog.next_deadline()
        if deadline is not None:
            timeout = max(0.01, min(timeout, deadline - time.monotonic()))
        try:
            ready, _, _ = select.select([self._pipe_r], [], [], timeout)
        except InterruptedError:
            return
        if ready:
            try:
                while os.read(self._pipe_r, 4096):
                    pass
            except BlockingIOError:
                pass

    def beat(self) -> None:
        self.statedb.beat(MASTER_SLOT, ProcessRole.MASTER, os.getpid(), "running",
                          int(time.monotonic() - self.started))
        systemd.notify("WATCHDOG=1")

    # --- workers --------------------------------------------------------------------

    def wanted_slots(self) -> dict[int, ProcessRole]:
        """Planner, then sync slots 0..S-1 and send slots S..N-1, numbered across the engine."""
        wanted = {PLANNER_SLOT: ProcessRole.PLANNER}
        if self.cfg.sync.enabled:
            wanted.update(dict.fromkeys(range(self.cfg.sync_workers), ProcessRole.SYNC))
        if self.cfg.outbox.enabled:
            wanted.update(dict.fromkeys(range(self.cfg.sync_workers, self.cfg.engine.max_workers),
                                        ProcessRole.SEND))
        return wanted

    def manage_workers(self) -> None:
        """Spawn every wanted slot that has no process, unless it is backing off."""
        running = {child.process.slot for child in self.children.values()}
        now = time.monotonic()
        for slot, role in self.wanted_slots().items():
            record = self.slots.setdefault(slot, SlotRecord())
            if slot not in running and now >= record.not_before \
                    and self.watchdog.may_spawn(role):
                self.spawn_worker(slot, role)

    def spawn_worker(self, slot: int, role: ProcessRole) -> None:
        process = PROCESS_CLASSES[role](self.cfg, slot, self.log_stderr)
        self.statedb.close()  # no SQLite connection across fork(); reopened at next use
        pid = os.fork()
        if pid == 0:
            self._close_master_fds()
            run_in_child(process)
        record = self.slots.setdefault(slot, SlotRecord())
        self.children[pid] = Child(process, pid, time.monotonic(), replaces_hung=record.last_hung,
                                   predecessor_task=record.hung_task)
        record.last_hung, record.hung_task = False, None
        pidfile.write_worker(self.cfg.engine.pid_dir, process.name, pid)

    def _close_master_fds(self) -> None:
        signal.set_wakeup_fd(-1)
        for fd in (self._pipe_r, self._pipe_w, self.pidfile.fd):
            os.close(fd)

    def reap_workers(self) -> None:
        """Collect exited children; decide when their slot may be respawned."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is None:
                self.helpers.discard(pid)
                continue
            self.worker_exited(child, status)

    def worker_exited(self, child: Child, status: int) -> None:
        process = child.process
        pidfile.remove_worker(self.cfg.engine.pid_dir, process.name)
        self.statedb.forget_heartbeat(process.slot)
        if process.role == ProcessRole.SYNC:
            self.statedb.requeue_running(process.slot)  # what it held runs again, resumed
        record = self.slots.setdefault(process.slot, SlotRecord())
        how = describe_status(status)
        if child.hung:
            # the watchdog killed it: refill the slot at once, no respawn backoff
            record.failures, record.not_before, record.last_hung = 0, 0.0, True
            return
        if self.watchdog.resetting or self.replacing:
            return
        lived = time.monotonic() - child.started
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == WORKER_BOOT_ERROR:
            record.boot_failures += 1
            if record.boot_failures >= BOOT_FAILURES_TO_HALT:
                why = self.statedb.facts().get(boot_error_fact(process.name))
                raise StopMaster(graceful=True, code=1, reason=(
                    f"{process.name} cannot start ({record.boot_failures} times in a row)"
                    + (f": {why}" if why else
                       f"; see {os.path.join(self.cfg.engine.log_dir, logs.ERROR_FILE)}")))
        else:
            record.boot_failures = 0
        if lived < QUICK_EXIT:
            record.failures += 1
            delay = min(RESPAWN_BACKOFF_MAX, 2.0 ** (record.failures - 1))
            record.not_before = time.monotonic() + delay
            log.error("%s (pid %d) %s after %.1fs; respawning in %.0fs",
                      process.name, child.pid, how, lived, delay)
        else:
            record.failures, record.not_before = 0, 0.0
            if how != "exited with status 0":
                log.error("%s (pid %d) %s; respawning", process.name, child.pid, how)

    def diagnose_blocking(self, backend_pid: int, name: str) -> None:
        """Log which PostgreSQL backends block ``backend_pid``, from a short-lived child:
        the master itself never connects to PostgreSQL."""
        self.statedb.close()
        pid = os.fork()
        if pid == 0:
            self._close_master_fds()
            diagnose.run_in_child(self.cfg, backend_pid, name)
        self.helpers.add(pid)

    def signal_workers(self, sig: int, roles: set[ProcessRole] | None = None) -> list[Child]:
        """Send ``sig`` to our children (of ``roles``, or all); only pids we forked."""
        hit = []
        for child in list(self.children.values()):
            if roles is None or child.process.role in roles:
                try:
                    os.kill(child.pid, sig)
                    hit.append(child)
                except ProcessLookupError:
                    pass
        return hit

    def wait_for_children(self, timeout: float, pids: set[int] | None = None) -> None:
        """Reap until the children (or ``pids``) are gone or ``timeout`` passes, beating so
        that a long graceful stop is not mistaken for a hung master."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.beat()
            self.reap_workers()
            left = set(self.children) if pids is None else pids & set(self.children)
            if not left:
                return
            time.sleep(0.05)

    # --- reload and stop ----------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: read the configuration again and replace the workers gracefully."""
        try:
            new = config_mod.load(self.config_path)
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            return
        log.info("reloading: %d sync and %d send workers", new.sync_workers,
                 new.engine.send_workers)
        old = set(self.children)
        self.replacing = True
        try:
            self.signal_workers(signal.SIGTERM)
            self.wait_for_children(self.cfg.engine.stop_timeout, old)
            for child in self.signal_workers(signal.SIGKILL):
                log.error("%s (pid %d) did not stop within %ds; killed", child.process.name,
                          child.pid, self.cfg.engine.stop_timeout)
            self.wait_for_children(5, old)
        finally:
            self.replacing = False
        self.cfg = new
        self.watchdog.configure()
        self.slots.clear()

    def halt(self, stop: StopMaster) -> None:
        """Stop every child (SIGTERM, then SIGKILL after stop_timeout), then leave."""
        log.info("stopping (%s)", stop.reason) if stop.code == 0 else log.error(
            "halting: %s", stop.reason)
        systemd.notify("STOPPING=1")
        self.replacing = True
        self.signal_workers(signal.SIGTERM)
        self.wait_for_children(self.cfg.engine.stop_timeout if stop.graceful else 0.5)
        for child in self.signal_workers(signal.SIGKILL):
            log.error("%s (pid %d) did not stop within %ds; killed", child.process.name,
                      child.pid, self.cfg.engine.stop_timeout)
        self.wait_for_children(10)
        self.statedb.forget_heartbeat(MASTER_SLOT)
        log.info("supervisor_mail stopped")
        self.pidfile.release()
