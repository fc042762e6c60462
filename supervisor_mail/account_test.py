"""``supervisor-mail account test N``: log in to the account's IMAP and SMTP servers the way the
engine does (``imap_client``, ``smtp_client``: same TLS verification, same timeouts), list its
folders and report what the servers offer, with every failure in plain words.

It changes nothing: no message is sent, no folder is selected read-write, and the
auth-error backoffs are left as they are (it says when one is running).
"""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass, field
from datetime import datetime

from imapclient.exceptions import IMAPClientError

from supervisor_mail import folders, imap_client, smtp_client
from supervisor_mail.accounts import DEFAULT_PORTS, Account
from supervisor_mail.config import Config
from supervisor_mail.errors import (
    AuthError,
    NetworkError,
    ServerError,
    TLSRequiredError,
    TransientServerError,
)
from supervisor_mail.states import Security

# What to do about each kind of failure, after the server's own words; the first match wins.
ADVICE = {
    AuthError: "the login or password is wrong, or the provider wants an app password; "
               "correct it (`supervisor-mail account add` again, or in the application)",
    TLSRequiredError: "",  # its message says what to do already
    NetworkError: "check the host name and port, and that this machine may reach them "
                  "(firewall, DNS)",
    TransientServerError: "the server refuses for now (busy, too many connections): "
                          "try again later",  # after NetworkError, its subclass
}
MAX_FOLDERS_SHOWN = 40


@dataclass
class Report:
    """What one protocol's check found: ``ok`` false when any step failed."""

    protocol: str
    where: str
    ok: bool = True
    lines: list[str] = field(default_factory=list)

    def step(self, text: str) -> None:
        self.lines.append(f"  ok    {text}")

    def info(self, text: str) -> None:
        self.lines.append(f"        {text}")

    def fail(self, exc: ServerError) -> None:
        self.ok = False
        self.lines.append(f"  FAIL  {exc}")
        advice = next((ADVICE[kind] for kind in ADVICE if isinstance(exc, kind)), "")
        if advice:
            self.lines.append(f"        {advice}")

    def text(self) -> str:
        return "\n".join([f"{self.protocol} {self.where}", *self.lines])


def tls_words(sock: object) -> str:
    """``TLS 1.3 (TLS_AES_256_GCM_SHA384), certificate verified`` or ``no TLS``."""
    if not isinstance(sock, ssl.SSLSocket):
        return "no TLS (the account says plain: passwords travel unencrypted)"
    version = (sock.version() or "TLS").replace("TLSv", "TLS ")
    cipher = sock.cipher()
    return f"{version} ({cipher[0] if cipher else '?'}), certificate verified"


def backoff_words(failed_at: datetime | None, error: str | None, retry: int) -> str | None:
    """The running auth-error backoff in words, or None when there is none."""
    if failed_at is None:
        return None
    until = failed_at.timestamp() + retry
    if until <= time.time():
        return None
    return (f"note: the engine will not try this login before "
            f"{datetime.fromtimestamp(until):%Y-%m-%d %H:%M:%S} after: {error}; "
            "changing the password or login clears that at once")


def check_imap(cfg: Config, account: Account) -> Report:
    security = Security(account.imap_security)
    port = account.imap_port or DEFAULT_PORTS[("imap", security)]
    report = Report("IMAP", f"{account.imap_host}:{port} ({security})")
    note = backoff_words(account.imap_auth_error_at, account.imap_auth_error,
                         cfg.sync.auth_error_retry)
    if note:
        report.info(note)
    try:
        client = imap_client.connect(cfg, account, login=False)
    except ServerError as exc:
        report.fail(exc)
        return report
    try:
        report.step(f"connected: {tls_words(client.socket())}")
        user = account.imap_login or account.email
        imap_client.login_account(client, account, f"IMAP server {report.where}")
        report.step(f"logged in as {user}")
        caps = sorted(c.decode("ascii", "replace") for c in client.capabilities())
        report.info("capabilities: " + " ".join(caps))
        listed = [folders.Listed(_text(name), _text(delimiter) if delimiter else None,
                                 tuple(flags))
                  for flags, delimiter, name in client.list_folders()]
        roles = folders.assign_roles(listed, "SPECIAL-USE" in caps)
        names = [folders.decode_name(f.server_name.encode("utf-8"))
                 + (f" ({roles[f.server_name]})" if f.server_name in roles else "")
                 for f in listed]
        shown = ", ".join(names[:MAX_FOLDERS_SHOWN])
        more = f", and {len(names) - MAX_FOLDERS_SHOWN} more" if len(names) > MAX_FOLDERS_SHOWN \
            else ""
        report.step(f"{len(names)} folder(s): {shown}{more}")
    except ServerError as exc:
        report.fail(exc)
    except (OSError, IMAPClientError) as exc:
        report.fail(NetworkError(f"IMAP server {report.where}: {exc}"))
    finally:
        imap_client.close(client)
    return report


def check_smtp(cfg: Config, account: Account) -> Report:
    security = Security(account.smtp_security)
    port = account.smtp_port or DEFAULT_PORTS[("smtp", security)]
    report = Report("SMTP", f"{account.smtp_host}:{port} ({security})")
    note = backoff_words(account.smtp_auth_error_at, account.smtp_auth_error,
                         cfg.sync.auth_error_retry)
    if note:
        report.info(note)
    try:
        session = smtp_client.Session(cfg, account)
    except ServerError as exc:
        report.fail(exc)
        return report
    try:
        report.step(f"connected: {tls_words(session.smtp.sock)}")
        if account.smtp_login or account.smtp_password:
            report.step(f"logged in as {account.smtp_login or account.email}")
        else:
            report.info("no SMTP login configured: the server relays without AUTH")
        features = [f"{name.upper()} {value}".strip()
                    for name, value in sorted(session.smtp.esmtp_features.items())]
        report.info("extensions: " + ", ".join(features))
    finally:
        session.close()
    return report


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def run(cfg: Config, account: Account) -> tuple[bool, str]:
    """Check each protocol the account has; (all ok, the report for people)."""
    reports = []
    if account.has_imap:
        reports.append(check_imap(cfg, account))
    if account.has_smtp:
        reports.append(check_smtp(cfg, account))
    head = f"account {account.acntid} <{account.email}>" + ("" if account.enabled
                                                            else " (disabled)")
    if not reports:
        return False, f"{head}\nneither an IMAP nor an SMTP server is set for it"
    verdict = ", ".join(f"{r.protocol} {'ok' if r.ok else 'FAILED'}" for r in reports)
    text = "\n".join([head, *(r.text() for r in reports), f"result: {verdict}"])
    return all(r.ok for r in reports), text

