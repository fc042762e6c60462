"""Helpers for integration tests that run the real engine (supervisor_mail.embedded.engine):
accounts on the test servers, messages, and the counts that show nothing was lost."""

from __future__ import annotations

import time

from supervisor_mail import accounts
from supervisor_mail.embedded.engine import FAST, Engine, pid_alive, write_config

__all__ = ["FAST", "Engine", "pid_alive", "write_config", "message", "add_account", "stored",
           "duplicates", "queue"]


def message(n: int, subject: str = "engine test") -> bytes:
    return (f"From: a@example.org\r\nTo: b@example.org\r\nSubject: {subject} {n}\r\n"
            f"Message-ID: <engine-{n}-{time.time_ns()}@example.org>\r\n\r\nbody {n}\r\n"
            ).encode()


def add_account(db, imap_account=None, smtp_sink=None, *, imap_port: int | None = None,
                email: str | None = None) -> int:
    """An account on the test servers: IMAP (optionally through a proxy port), SMTP, or both."""
    values: dict = {"email": email or f"{imap_account.login}@example.org"}
    if imap_account is not None:
        values.update(imap_host=imap_account.server.host,
                      imap_port=imap_port or imap_account.server.port, imap_security="plain",
                      imap_login=imap_account.login, imap_password=imap_account.password)
    if smtp_sink is not None:
        values.update(smtp_host=smtp_sink.host, smtp_port=smtp_sink.port, smtp_security="plain")
    return accounts.add(db, **values)


def stored(db, acntid: int) -> int:
    return db.execute("SELECT count(*) FROM email_messages m JOIN email_folders f USING (emfdid) "
                      "WHERE f.acntid = %s AND m.deleted_at IS NULL AND m.retired_at IS NULL",
                      (acntid,)).fetchone()[0]


def duplicates(db) -> int:
    return db.execute("SELECT count(*) FROM (SELECT 1 FROM email_messages "
                      "GROUP BY emfdid, message_id HAVING count(*) > 1) d").fetchone()[0]


def queue(db, acntid: int, n: int) -> int:
    raw = message(n, "outbox")
    return db.execute("INSERT INTO email_outbox (acntid, recipients, raw) VALUES (%s, %s, %s) "
                      "RETURNING emobid", (acntid, ["rcpt@example.org"], raw)).fetchone()[0]
