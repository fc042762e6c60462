"""Talking to a running engine from the command line, through its PID files and state DB
only: ``start`` (cron mode), ``stop``, ``reload``, ``reset`` and ``healthcheck``.

Processes are signalled by the PIDs their PID files name, never by name; a PID is
signalled only while its command line still says it is ours (a PID file that
survived a reboot may name someone else's process by now).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from supervisor_mail import pidfile
from supervisor_mail.config import Config
from supervisor_mail.errors import StateError
from supervisor_mail.state import MASTER_SLOT, db_path, read_snapshot, remove_files
from supervisor_mail.states import TaskState

HEALTHY, MASTER_HUNG, NOT_RUNNING, DEGRADED = 0, 1, 2, 3
START_WAIT = 15.0  # seconds `start` waits for the new master to hold its PID file


@dataclass
class Health:
    code: int
    reason: str
    master_pid: int | None = None


def is_ours(pid: int) -> bool:
    """True when ``pid`` runs supervisor_mail (its title or its command line says so)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ")
    except OSError:
        return False
    return b"supervisor_mail" in cmdline or b"supervisor-mail" in cmdline


def signal_pid(pid: int, sig: int) -> bool:
    if not is_ours(pid):
        return False
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def health(cfg: Config) -> Health:
    """What ``healthcheck`` answers, from the PID file lock and the state DB."""
    pid = pidfile.live_master(cfg.engine.pid_dir)
    if pid is None:
        return Health(NOT_RUNNING, "not running: no master holds "
                      f"{os.path.join(cfg.engine.pid_dir, pidfile.MASTER)}")
    snap = read_snapshot(db_path(cfg))  # read-only: a healthcheck never creates or rebuilds
    if snap.error:
        return Health(DEGRADED, f"degraded: master {pid} runs but its state DB cannot be read "
                      f"({snap.error}); the engine rebuilds it", pid)
    beats = {hb.slot: hb for hb in snap.heartbeats}
    facts = snap.facts
    aside = [t for t in snap.tasks if t.state == TaskState.SET_ASIDE]
    master = beats.get(MASTER_SLOT)
    if master is None or master.pid != pid:
        return Health(DEGRADED, f"degraded: master {pid} is starting or resetting", pid)
    age = master.age(snap.monotonic)
    if age > cfg.watchdog.master_timeout:
        return Health(MASTER_HUNG, f"hung: master {pid} has not beaten for {age:.0f}s", pid)
    backoff = float(facts.get("backoff_until") or 0)
    if backoff > time.time():
        return Health(DEGRADED, f"degraded: reset backoff for {backoff - time.time():.0f}s more "
                      f"after {facts.get('resets')} reset(s)", pid)
    if aside:
        first = aside[0]
        return Health(DEGRADED, f"degraded: {len(aside)} task(s) set aside, e.g. {first.kind} "
                      f"[{first.acntid},{first.emfdid or '-'}] {first.folder}: {first.reason}",
                      pid)
    workers = sum(1 for slot in beats if slot >= 0)
    return Health(HEALTHY, f"healthy: master {pid}, {workers} workers beating", pid)


def start(cfg: Config, config_path: str | None) -> str:
    """Cron mode: leave a healthy master alone; replace a hung one; otherwise start one."""
    state = health(cfg)
    if state.code in (HEALTHY, DEGRADED):
        return f"already running (master {state.master_pid})"
    notes = []
    if state.code == MASTER_HUNG:
        notes.append(reset(cfg, force=True))
    command = [sys.executable, "-m", "supervisor_mail", "run"]
    if config_path:
        command += ["-c", config_path]
    with open(os.devnull, "rb") as devnull_in, open(os.devnull, "wb") as devnull_out:
        subprocess.Popen(command, stdin=devnull_in, stdout=devnull_out, stderr=devnull_out,
                         start_new_session=True, close_fds=True)
    deadline = time.monotonic() + START_WAIT
    while time.monotonic() < deadline:
        pid = pidfile.live_master(cfg.engine.pid_dir)
        if pid:
            return "; ".join([*notes, f"started master {pid}"])
        time.sleep(0.1)
    raise StateError(f"the master did not start within {START_WAIT:.0f}s: see "
                     f"{cfg.engine.log_dir}/threading-error.txt, or run `supervisor-mail run` "
                     "in the foreground to see why")


def stop(cfg: Config) -> str:
    pid = pidfile.live_master(cfg.engine.pid_dir)
    if pid is None:
        return "not running"
    if not signal_pid(pid, signal.SIGTERM):
        raise StateError(f"master.pid names {pid}, which is not a supervisor_mail process: "
                         "run `supervisor-mail reset`")
    deadline = time.monotonic() + cfg.engine.stop_timeout + 15
    while time.monotonic() < deadline:
        # the lock goes a moment before the process: wait for both
        if pidfile.live_master(cfg.engine.pid_dir) is None and not is_ours(pid):
            return f"stopped master {pid}"
        time.sleep(0.1)
    raise StateError(f"master {pid} did not stop within {cfg.engine.stop_timeout + 15}s; "
                     "`supervisor-mail reset --force` kills it")


def reload(cfg: Config) -> str:
    pid = pidfile.live_master(cfg.engine.pid_dir)
    if pid is None or not signal_pid(pid, signal.SIGHUP):
        raise StateError("no master is running: nothing to reload")
    return f"sent SIGHUP to master {pid}"


def reset(cfg: Config, force: bool = False) -> str:
    """The old manual restart procedure: kill the engine's processes by their PID files,
    delete the state DB and the PID files. Refuses a healthy master unless ``force``."""
    state = health(cfg)
    if state.code == HEALTHY and not force:
        raise StateError(f"master {state.master_pid} is healthy; `supervisor-mail stop` stops it, "
                         "`reset --force` kills it anyway")
    killed = []
    master_pid = pidfile.read_pid(os.path.join(cfg.engine.pid_dir, pidfile.MASTER))
    for name, pid in pidfile.worker_pids(cfg.engine.pid_dir).items():
        if signal_pid(pid, signal.SIGKILL):
            killed.append(f"{name} {pid}")
        pidfile.remove_worker(cfg.engine.pid_dir, name)
    if master_pid and signal_pid(master_pid, signal.SIGKILL):
        killed.append(f"master {master_pid}")
        _wait_gone(master_pid)
    try:
        os.unlink(os.path.join(cfg.engine.pid_dir, pidfile.MASTER))
    except FileNotFoundError:
        pass
    removed = remove_files(db_path(cfg))
    return (f"killed {', '.join(killed) or 'no process'}; deleted "
            f"{', '.join(removed) or 'no state DB'} and the PID files")


def _wait_gone(pid: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and is_ours(pid):
        time.sleep(0.05)
