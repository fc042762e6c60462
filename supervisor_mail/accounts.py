"""The ``email_accounts`` table: mail accounts with their IMAP and SMTP settings, and the
separate IMAP and SMTP auth-error backoffs.

Clearing a backoff when credentials change is done by a trigger in the schema, so
that it also happens when the web application edits an account.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime

import psycopg
from psycopg.rows import class_row

from supervisor_mail.errors import ConfigError, NotFoundError
from supervisor_mail.states import Security

DEFAULT_PORTS = {
    ("imap", Security.TLS): 993, ("imap", Security.STARTTLS): 143, ("imap", Security.PLAIN): 143,
    ("smtp", Security.TLS): 465, ("smtp", Security.STARTTLS): 587, ("smtp", Security.PLAIN): 25,
}


@dataclass
class Account:
    """One row of ``email_accounts``; ``repr`` never shows a password."""

    acntid: int
    owner_id: int | None
    name: str
    email: str
    enabled: bool
    imap_host: str | None
    imap_port: int | None
    imap_security: str
    imap_login: str | None
    imap_password: str | None
    imap_auth_error_at: datetime | None
    imap_auth_error: str | None
    smtp_host: str | None
    smtp_port: int | None
    smtp_security: str
    smtp_login: str | None
    smtp_password: str | None
    smtp_auth_error_at: datetime | None
    smtp_auth_error: str | None
    last_error: str | None
    last_error_at: datetime | None
    created_at: datetime
    updated_at: datetime

    def __repr__(self) -> str:
        return f"Account(acntid={self.acntid}, email={self.email!r})"

    @property
    def has_imap(self) -> bool:
        return bool(self.imap_host)

    @property
    def has_smtp(self) -> bool:
        return bool(self.smtp_host)


_COLUMNS = ", ".join(f.name for f in fields(Account))
_WRITABLE = {"owner_id", "name", "email", "enabled", "imap_host", "imap_port", "imap_security",
             "imap_login", "imap_password", "smtp_host", "smtp_port", "smtp_security",
             "smtp_login", "smtp_password"}


def add(conn: psycopg.Connection, **values: object) -> int:
    """Insert an account and return its acntid; ports default from the security mode."""
    _check(values)
    for proto in ("imap", "smtp"):
        if values.get(f"{proto}_host") and not values.get(f"{proto}_port"):
            security = Security(values.get(f"{proto}_security") or _default_security(proto))
            values[f"{proto}_port"] = DEFAULT_PORTS[(proto, security)]
    names = list(values)
    row = conn.execute(
        f"INSERT INTO email_accounts ({', '.join(names)}) "
        f"VALUES ({', '.join(['%s'] * len(names))}) RETURNING acntid",
        [values[n] for n in names]).fetchone()
    return row[0]


def update(conn: psycopg.Connection, acntid: int, **values: object) -> None:
    _check(values)
    sets = ", ".join(f"{name} = %s" for name in values)
    conn.execute(f"UPDATE email_accounts SET {sets} WHERE acntid = %s",
                 [*values.values(), acntid])


def _default_security(proto: str) -> str:
    return Security.TLS if proto == "imap" else Security.STARTTLS


def _check(values: dict) -> None:
    unknown = set(values) - _WRITABLE
    if unknown:
        raise ValueError(f"not account columns: {', '.join(sorted(unknown))}")
    for proto in ("imap", "smtp"):
        security = values.get(f"{proto}_security")
        if security is not None and security not in {s.value for s in Security}:
            raise ConfigError(f"{proto} security {security!r} is not one of tls, starttls, plain")


def get(conn: psycopg.Connection, ref: int | str) -> Account:
    """The account with acntid ``ref``, or with that e-mail address."""
    with conn.cursor(row_factory=class_row(Account)) as cur:
        if isinstance(ref, int) or str(ref).isdigit():
            cur.execute(f"SELECT {_COLUMNS} FROM email_accounts WHERE acntid = %s", (int(ref),))
        else:
            cur.execute(f"SELECT {_COLUMNS} FROM email_accounts WHERE lower(email) = lower(%s)",
                        (ref,))
        account = cur.fetchone()
    if account is None:
        raise NotFoundError(f"no account {ref}: `supervisor-mail account list` shows them")
    return account


def list_all(conn: psycopg.Connection) -> list[Account]:
    with conn.cursor(row_factory=class_row(Account)) as cur:
        return cur.execute(f"SELECT {_COLUMNS} FROM email_accounts ORDER BY acntid").fetchall()


def remove(conn: psycopg.Connection, acntid: int) -> None:
    """Delete an account with its folders, messages and outbox rows."""
    if conn.execute("DELETE FROM email_accounts WHERE acntid = %s", (acntid,)).rowcount == 0:
        raise NotFoundError(f"no account {acntid}: `supervisor-mail account list` shows them")


def set_auth_error(conn: psycopg.Connection, acntid: int, proto: str, message: str) -> None:
    """Start the auth-error backoff of one protocol ('imap' or 'smtp') of an account."""
    assert proto in ("imap", "smtp")
    conn.execute(f"UPDATE email_accounts SET {proto}_auth_error_at = now(), "
                 f"{proto}_auth_error = %s WHERE acntid = %s", (message, acntid))


def clear_auth_error(conn: psycopg.Connection, acntid: int, proto: str) -> None:
    assert proto in ("imap", "smtp")
    conn.execute(f"UPDATE email_accounts SET {proto}_auth_error_at = NULL, "
                 f"{proto}_auth_error = NULL WHERE acntid = %s "
                 f"AND {proto}_auth_error_at IS NOT NULL", (acntid,))


def mark_folders_listed(conn: psycopg.Connection, acntid: int) -> None:
    """Record that the account's folder list was just read, so discovery waits its interval."""
    conn.execute("UPDATE email_accounts SET folders_listed_at = now() WHERE acntid = %s",
                 (acntid,))


def record_activity(conn: psycopg.Connection, user_id: int) -> None:
    """Mark a user active now (the web application does this; tests and the demo too)."""
    conn.execute("INSERT INTO email_user_activity (user_id, last_active) VALUES (%s, now()) "
                 "ON CONFLICT (user_id) DO UPDATE SET last_active = now()", (user_id,))
