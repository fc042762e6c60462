"""The processes the master forks: the planner, sync workers and send workers.

Contract (as gunicorn's workers): ``__init__`` runs in the master before the fork
and touches nothing process-wide; ``init_process`` runs in the child after the
fork — it resets signals, opens the child's own state DB connection and logs, sets
the title — and then ``run`` does the work. PostgreSQL connections are opened by
the work itself, after the fork, from the DSN.

Every process beats its heartbeat row from its work loop, idle or busy, through
``beat``; a beat also notices a dead parent and exits, so no worker outlives its
master.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import time

import psycopg

from supervisor_mail import logs, planner, proctitle
from supervisor_mail.config import Config
from supervisor_mail.errors import DatabaseError, HostConflictError
from supervisor_mail.send_worker import SendWorker
from supervisor_mail.state import PLANNER_SLOT, StateDB, Task
from supervisor_mail.states import ProcessRole

WORKER_BOOT_ERROR = 3  # exit code: cannot start at all; the master stops respawning
STACK_SIGNAL = signal.SIGUSR1  # the watchdog asks a hung process for its Python stack
DB_RETRY = 2.0  # seconds a send worker waits after a database error before resuming

log = logging.getLogger("supervisor_mail.worker")


class ParentGone(Exception):
    """Raised from ``beat`` when the master has died: the worker must exit."""


class Process:
    """Base of every forked process; subclasses implement ``work``."""

    role: ProcessRole

    def __init__(self, cfg: Config, slot: int, log_stderr: bool = False):
        self.cfg = cfg
        self.slot = slot
        self.log_stderr = log_stderr
        self.master_pid = os.getpid()
        self.stopping = False
        self.statedb: StateDB | None = None
        self.task: Task | None = None
        self.backend_pid: int | None = None
        self.done = 0  # units of work completed, for the watchdog's stall check
        self._progress = 0

    @property
    def name(self) -> str:
        """The PID file and heartbeat name: ``planner``, ``sync-3``, ``send-9``."""
        return "planner" if self.slot == PLANNER_SLOT else f"{self.role}-{self.slot}"

    @property
    def session_acntid(self) -> int | None:
        """The account whose IMAP session this process keeps open between tasks (a sync
        worker's), recorded with every beat."""
        return None

    @property
    def tag(self) -> str:
        return "p" if self.slot == PLANNER_SLOT else f"t{self.slot}"

    def init_process(self) -> None:
        """After the fork: own signals, own files, own title."""
        for sig in (signal.SIGHUP, signal.SIGCHLD, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal's ^C is the master's
        signal.signal(signal.SIGTERM, self._handle_term)
        signal.set_wakeup_fd(-1)
        logs.setup(self.cfg, self.tag, stderr=self.log_stderr)
        self._register_stack_dump()
        self.statedb = StateDB.for_config(self.cfg)
        self.set_title("starting")
        self.beat("starting")

    def _register_stack_dump(self) -> None:
        """On STACK_SIGNAL, faulthandler writes every thread's stack to the error log, even
        when the process is stuck inside C code where no Python handler would run."""
        path = os.path.join(self.cfg.engine.log_dir, logs.ERROR_FILE)
        self._stack_file = open(path, "a")  # noqa: SIM115 - must stay open for faulthandler
        faulthandler.register(STACK_SIGNAL, file=self._stack_file, all_threads=True)

    def _handle_term(self, signum: int, frame: object) -> None:
        self.stopping = True  # only a flag: the work loop stops at its next check

    def should_stop(self) -> bool:
        return self.stopping

    def beat(self, phase: str, progress: int | None = None) -> None:
        """Record progress in the heartbeat row; called from the work loop only."""
        if os.getppid() != self.master_pid:
            raise ParentGone()
        if progress is not None:
            self._progress = progress
        assert self.statedb is not None
        self.statedb.beat(self.slot, self.role, os.getpid(), phase, self._progress,
                          task=self.task, backend_pid=self.backend_pid, done=self.done,
                          session_acntid=self.session_acntid)
        self.set_title(phase)

    def set_title(self, phase: str) -> None:
        label = "planner" if self.slot == PLANNER_SLOT else f"{self.role} {self.slot}"
        if self.task is not None:
            label += f" [{self.task.acntid},{self.task.emfdid or '-'}] {self.task.folder}"
        else:
            label += f" {phase}"
        proctitle.set_title(label.rstrip())

    def run(self) -> int:
        """Run the work; the return value is the exit code."""
        self.init_process()
        try:
            self.work()
        except ParentGone:
            log.warning("%s exiting: the master is gone", self.name)
        except BootError as exc:
            log.error("%s cannot start: %s", self.name, exc)
            assert self.statedb is not None
            self.statedb.set_fact(boot_error_fact(self.name), str(exc))  # for the master's halt
            return WORKER_BOOT_ERROR
        return 0

    def work(self) -> None:
        raise NotImplementedError

    def sleep(self, seconds: float, phase: str = "idle") -> None:
        """Sleep in short steps, beating, so a stop or a dead parent is noticed quickly."""
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            self.beat(phase)
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))


class BootError(Exception):
    """Raised by a process that can never start with this configuration (exit 3)."""


def boot_error_fact(name: str) -> str:
    """The state DB ``engine`` key under which process ``name`` leaves why it cannot start."""
    return f"boot_error {name}"


def run_in_child(process: Process) -> None:
    """The child side of the fork: run, then leave without running the master's cleanup."""
    code = 1
    try:
        code = process.run()
    except BaseException:
        logging.getLogger("supervisor_mail.worker").exception("%s crashed", process.name)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class PlannerProcess(Process):
    """Decides what is due and fills the sync slices (supervisor_mail.planner)."""

    role = ProcessRole.PLANNER

    def work(self) -> None:
        try:
            planner.run_planner(self.cfg, self.beat, self.should_stop,
                                on_connect=self.record_backend, master_pid=self.master_pid)
        except HostConflictError as exc:
            raise BootError(str(exc)) from None  # another engine is this host: never start

    def record_backend(self, pid: int | None) -> None:
        """The planner's PostgreSQL backend, for the watchdog's pg_blocking_pids helper."""
        self.backend_pid = pid


class SendProcess(Process):
    """LISTENs for outbox rows and delivers them (supervisor_mail.send_worker)."""

    role = ProcessRole.SEND

    def work(self) -> None:
        name = f"{self.cfg.engine.host_id}/send {self.slot}/{os.getpid()}"
        while not self.stopping:
            try:
                SendWorker(self.cfg, self.slot, self.send_beat, self.should_stop, name).run()
            except (psycopg.Error, DatabaseError) as exc:
                # A lock or statement timeout, or a database away for a moment: the claim
                # was not taken or is rolled back, so start the loop again shortly.
                log.warning("%s: database unavailable, resuming in %.0fs: %s", self.name,
                            DB_RETRY, " ".join(str(exc).split()))
                self.sleep(DB_RETRY, "waiting for database")

    def send_beat(self, phase: str, handled: int) -> None:
        """The send loop's beat: its progress is the number of messages it handled."""
        self.done = handled
        self.beat(phase, handled)

