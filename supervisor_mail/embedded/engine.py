"""A real engine for tests, benchmarks and the demo: ``supervisor-mail run`` in a subprocess
with its own config file, directories and small timeouts, stopped (and every pid it ever
had checked gone) when done.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from supervisor_mail import config, pidfile
from supervisor_mail.state import StateDB, db_path, read_snapshot

FAST = {
    "engine.max_workers": 4, "engine.send_workers": 2, "engine.stop_timeout": 5,
    "engine.allow_root": True, "planner.interval": 1, "outbox.poll_interval": 1,
    "watchdog.check_interval": 1, "watchdog.worker_timeout": 10, "watchdog.kill_grace": 2,
    "watchdog.stall_timeout": 30, "watchdog.master_timeout": 5, "sync.socket_timeout": 10,
    "database.statement_timeout": 10, "database.lock_timeout": 5,
}


def write_config(path: Path, dsn: str, root: Path, **changes) -> Path:
    values = dict(FAST)
    values.update({"database.dsn": dsn, "engine.data_dir": str(root / "run"),
                   "engine.pid_dir": str(root / "run" / "pid"),
                   "engine.log_dir": str(root / "log")})
    values.update({k.replace("__", ".", 1): v for k, v in changes.items()})
    sections: dict[str, list[str]] = {}
    for name, value in values.items():
        setting = config.BY_NAME[name]
        text = setting.kind.format(value) if not isinstance(value, str) else value
        sections.setdefault(setting.section, []).append(f"{setting.key} = {text}")
    path.write_text("".join(f"[{s}]\n" + "\n".join(lines) + "\n\n"
                            for s, lines in sections.items()))
    return path


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Engine:
    """``with Engine(tmp_path, dsn) as engine:`` — a running master; ``engine.cfg`` its settings."""

    def __init__(self, root: Path, dsn: str, **changes):
        self.root = root
        self.conf = write_config(root / "engine.conf", dsn, root, **changes)
        self.cfg = config.load(str(self.conf), environ={})
        self.proc: subprocess.Popen | None = None
        self.seen_pids: set[int] = set()

    def command(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "supervisor_mail", *args,
                               "-c", str(self.conf)], capture_output=True, text=True,
                              timeout=timeout)

    def start(self) -> Engine:
        self.proc = subprocess.Popen([sys.executable, "-m", "supervisor_mail", "run",
                                      "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True)
        self.wait_for(lambda: len(self.worker_pids()) >= self.expected_workers(), 30,
                      "all workers to start")
        # A process writes its PID file before its first beat, and the master forks its
        # workers before its own: until all have beaten, status rightly says "starting",
        # which a test that stops the engine at once must not see.
        self.wait_for(self.all_beating, 30, "every process's first heartbeat")
        return self

    def all_beating(self) -> bool:
        beating = {hb.pid for hb in read_snapshot(db_path(self.cfg)).heartbeats}
        return {self.master_pid, *self.worker_pids().values()} <= beating

    def expected_workers(self) -> int:
        return self.cfg.engine.max_workers + 1  # and the planner

    @property
    def master_pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def worker_pids(self) -> dict[str, int]:
        pids = {name: pid for name, pid in pidfile.worker_pids(self.cfg.engine.pid_dir).items()
                if pid_alive(pid)}
        self.seen_pids.update(pids.values())
        return pids

    def statedb(self) -> StateDB:
        return StateDB.for_config(self.cfg)

    def heartbeats(self):
        db = self.statedb()
        try:
            return db.heartbeats()
        finally:
            db.close()

    def info_lines(self) -> list[str]:
        lines = []
        for path in sorted(Path(self.cfg.engine.log_dir).glob("*-info.log")):
            lines += path.read_text().splitlines()
        return lines

    def wait_for(self, predicate, timeout: float, what: str, step: float = 0.1):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = predicate()
            if result:
                return result
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"the master exited ({self.proc.returncode}) while "
                                     f"waiting for {what}: {self.stderr_tail()}")
            time.sleep(step)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; "
                             f"log tail: {self.info_lines()[-15:]}")

    def stderr_tail(self) -> str:
        if self.proc is None or self.proc.stderr is None or self.proc.poll() is None:
            return ""
        return self.proc.stderr.read().decode(errors="replace")[-2000:]

    def stop(self, timeout: float | None = None) -> float:
        """SIGTERM the master and wait; return how long the stop took."""
        assert self.proc is not None
        self.worker_pids()
        began = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout or self.cfg.engine.stop_timeout + 15)
        return time.monotonic() - began

    def leftovers(self) -> list[int]:
        pids = set(self.seen_pids)
        if self.proc is not None:
            pids.add(self.proc.pid)
        return [pid for pid in pids if pid_alive(pid)]

    def __enter__(self) -> Engine:
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.stop()
        finally:
            for pid in self.leftovers():  # only pids this engine had
                os.kill(pid, signal.SIGKILL)
            if self.proc is not None and self.proc.stderr is not None:
                self.proc.stderr.close()
