"""PID files in ``engine.pid_dir``: ``master.pid``, held with an exclusive lock for the
master's whole life, and one file a worker (``sync-3.pid``, ``send-9.pid``, ``planner.pid``).

The lock, not the file's existence, says a master is alive: a file left by a
killed master is not locked, so it is detected as stale and replaced.
"""

from __future__ import annotations

import fcntl
import glob
import os

from supervisor_mail.errors import StateError

MASTER = "master.pid"


class MasterPidFile:
    """``master.pid``, locked while this process lives; ``acquire`` fails if another holds it."""

    def __init__(self, pid_dir: str):
        self.path = os.path.join(pid_dir, MASTER)
        self._fd = -1

    def acquire(self) -> None:
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StateError(f"{self.path}: cannot create the PID file: {exc.strerror}; "
                             "fix [engine] pid_dir or its permissions") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateError(f"a master is already running (pid {read_pid(self.path)}, "
                             f"{self.path}); `supervisor-mail stop` stops it") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            os.close(self._fd)
            self._fd = -1

    @property
    def fd(self) -> int:
        return self._fd


def read_pid(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


def live_master(pid_dir: str) -> int | None:
    """The pid of the master holding ``master.pid``'s lock, or None when none does."""
    path = os.path.join(pid_dir, MASTER)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return read_pid(path)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def worker_path(pid_dir: str, name: str) -> str:
    return os.path.join(pid_dir, f"{name}.pid")


def write_worker(pid_dir: str, name: str, pid: int) -> None:
    path = worker_path(pid_dir, name)
    tmp = f"{path}.{pid}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{pid}\n")
    os.replace(tmp, path)  # never a half-written file for `reset` to read


def remove_worker(pid_dir: str, name: str) -> None:
    try:
        os.unlink(worker_path(pid_dir, name))
    except FileNotFoundError:
        pass


def worker_pids(pid_dir: str) -> dict[str, int]:
    """Every worker PID file: name -> pid (``reset`` signals exactly these)."""
    found = {}
    for path in glob.glob(os.path.join(pid_dir, "*.pid")):
        name = os.path.basename(path)[:-4]
        pid = read_pid(path)
        if name != MASTER[:-4] and pid:
            found[name] = pid
    return found
