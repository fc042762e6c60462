"""Send workers started by a test itself (forked, as the engine forks them), and the outbox
rows and accounts the tests use. Every worker started is stopped by ``Workers.stop``.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import time
from pathlib import Path

import psycopg

from supervisor_mail import accounts, logs
from supervisor_mail.config import Config
from supervisor_mail.send_worker import SendWorker

FORK = multiprocessing.get_context("fork")


def _child(cfg: Config, slot: int, beats: Path) -> None:
    """The worker process: its own logs and connections, SIGTERM = graceful stop."""
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    logs.setup(cfg, f"t{slot}")
    parent = os.getppid()
    fd = os.open(beats, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def beat(phase: str, progress: int) -> None:
        os.write(fd, f"{phase}\t{progress}\n".encode())

    name = f"{cfg.engine.host_id}/send {slot}/{os.getpid()}"
    SendWorker(cfg, slot, beat, lambda: bool(stopping) or os.getppid() != parent, name).run()


class Workers:
    """``workers.start(cfg)`` forks a send worker; ``stop()`` ends every one started."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.processes: list[multiprocessing.Process] = []

    def start(self, cfg: Config, slot: int = 9) -> multiprocessing.Process:
        process = FORK.Process(target=_child, args=(cfg, slot, self.beats_path(slot)),
                               daemon=True)
        process.start()
        self.processes.append(process)
        return process

    def beats_path(self, slot: int) -> Path:
        return self.directory / f"beats-{slot}.txt"

    def beats(self, slot: int = 9) -> list[str]:
        path = self.beats_path(slot)
        return [line.split("\t")[0] for line in path.read_text().splitlines()] \
            if path.exists() else []

    def stop(self, timeout: float = 10.0) -> None:
        for process in self.processes:
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)
        for process in self.processes:
            process.join(timeout)
            if process.is_alive():
                os.kill(process.pid, signal.SIGKILL)
                process.join()


def smtp_account(conn: psycopg.Connection, sink, **values) -> int:
    """An account whose SMTP server is ``sink`` (plain unless told), no IMAP."""
    settings = {"email": "me@example.com", "name": "Me", "smtp_security": "plain"}
    if sink is not None:
        settings.update(smtp_host=sink.host, smtp_port=sink.port)
    settings.update(values)
    return accounts.add(conn, **settings)


def row(conn: psycopg.Connection, emobid: int) -> dict:
    cur = conn.execute("SELECT * FROM email_outbox WHERE emobid = %s", (emobid,))
    names = [c.name for c in cur.description]
    return dict(zip(names, cur.fetchone(), strict=True))


def wait_state(conn: psycopg.Connection, emobid: int, states: set[str] | str,
               timeout: float = 10.0) -> dict:
    """The row once its state is one of ``states``; fails the test naming the state it had."""
    states = {states} if isinstance(states, str) else states
    deadline = time.monotonic() + timeout
    while True:
        current = row(conn, emobid)
        if current["state"] in states:
            return current
        if time.monotonic() > deadline:
            raise AssertionError(f"outbox {emobid} is {current['state']!r}, not {states} "
                                 f"after {timeout}s: {current['last_error']}")
        time.sleep(0.02)


def info_log(cfg: Config) -> str:
    """Every line the workers wrote to the info logs."""
    directory = Path(cfg.engine.log_dir)
    return "".join(p.read_text() for p in sorted(directory.glob("*" + logs.INFO_SUFFIX)))


def wait_log(cfg: Config, pattern: str, timeout: float = 5.0) -> re.Match:
    """The first match of ``pattern`` in the info logs, once a worker wrote it (a line comes
    just after the row's new state is committed)."""
    deadline = time.monotonic() + timeout
    while not (match := re.search(pattern, info_log(cfg))):
        if time.monotonic() > deadline:
            raise AssertionError(f"no log line matches {pattern!r}:\n{info_log(cfg)}")
        time.sleep(0.02)
    return match


def message_ids(sink) -> list[str]:
    """The Message-ID of every message the sink received, in order."""
    from email.parser import BytesHeaderParser

    return [BytesHeaderParser().parsebytes(m.data)["Message-ID"] for m in sink.messages]
