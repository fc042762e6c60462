"""What the sync tests share: an account row for a test server's account, one sync run
the way the engine runs it, and the two sides a byte-exactness check compares."""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator

import psycopg

from supervisor_mail import accounts, folders, logs, store
from supervisor_mail.config import Config
from supervisor_mail.embedded.imap import Account, dovecot_binary
from supervisor_mail.embedded.imap_admin import Mailbox
from supervisor_mail.imap_sync import AccountSession, SyncResult, discover_folders, sync_folder
from supervisor_mail.states import TaskKind

# The server for tests of one server's paths or of volume: Dovecot where installed
# (pymap is about 15 times slower), pymap otherwise, never skipped.
FIRST_SERVER = "dovecot" if dovecot_binary() else "pymap"


def add_account(db: psycopg.Connection, account: Account, *, host: str | None = None,
                port: int | None = None, security: str = "plain",
                password: str | None = None) -> int:
    """An email_accounts row for ``account`` (or for a proxy in front of its server)."""
    return accounts.add(db, email=f"{account.login}@example.test",
                        imap_host=host or account.server.host,
                        imap_port=port or account.server.port, imap_security=security,
                        imap_login=account.login,
                        imap_password=account.password if password is None else password)


def run_sync(cfg: Config, acntid: int, folder: str = "INBOX",
             kind: TaskKind = TaskKind.SYNC_RECENT, beat=None, **session_options) -> SyncResult:
    """Discover the account's folders and sync one, on a connection and session of its own."""
    with store.connect(cfg, "test") as conn, \
            AccountSession(conn, cfg, acntid, **session_options) as session:
        found = folders.find(discover_folders(conn, session), folder)
        return sync_folder(conn, session, found, kind, cfg, beat or (lambda phase, n: None))


def folder_of(db: psycopg.Connection, acntid: int, name: str) -> folders.Folder:
    return folders.find(folders.listing(db, acntid, include_gone=True), name)


def stored(db: psycopg.Connection, emfdid: int) -> dict[int, bytes]:
    """The raw bytes of the folder's live messages, by UID."""
    return dict(db.execute("SELECT uid, raw FROM email_messages WHERE emfdid = %s AND"
                           " deleted_at IS NULL AND retired_at IS NULL", (emfdid,)).fetchall())


def on_server(mailbox: Mailbox, folder: str) -> dict[int, bytes]:
    """What the server returns for BODY[] of every message of ``folder``, by UID: the
    reference (servers may rewrite line endings on APPEND)."""
    uids = mailbox.uids(folder)
    bodies: dict[int, bytes] = {}
    for start in range(0, len(uids), 50):
        fetched = mailbox.client.fetch(uids[start:start + 50], ["BODY.PEEK[]"])
        bodies.update((uid, data[b"BODY[]"]) for uid, data in fetched.items())
    return bodies


def digests(bodies: dict[int, bytes]) -> dict[int, str]:
    return {uid: hashlib.sha256(raw).hexdigest() for uid, raw in bodies.items()}


@contextlib.contextmanager
def captured_log() -> Iterator[list[str]]:
    """The imap_sync logger's lines, formatted as the engine's info log writes them."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.setFormatter(logs.OldEngineFormatter("t1"))
    handler.emit = lambda record: lines.append(handler.format(record))
    logger = logging.getLogger("supervisor_mail.imap_sync")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
