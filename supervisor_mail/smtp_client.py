"""SMTP sessions: TLS as the account says (never a silent plain-text fallback), a timeout on
every socket, AUTH when the account has credentials, and every reply classified.

    session = smtp_client.Session(cfg, account)   # connected, TLS up, logged in
    delivery = session.send(outgoing)             # Delivery(reply='250 2.0.0 queued', ...)

Failures are exceptions: ``Refused`` (the server answered 4xx or 5xx; ``permanent``
says which), ``TooLarge`` (over the server's SIZE), ``errors.AuthError`` (the
credentials were refused), ``errors.TLSRequiredError`` (STARTTLS configured, not
offered), ``errors.NetworkError`` (connect, timeout, a broken connection) and
``Stale`` (a reused connection turned out to be closed before anything was sent).
"""

from __future__ import annotations

import functools
import smtplib
import socket
import ssl
from dataclasses import dataclass, field

from supervisor_mail.accounts import DEFAULT_PORTS, Account
from supervisor_mail.compose import Outgoing
from supervisor_mail.config import Config
from supervisor_mail.errors import (
    AuthError,
    NetworkError,
    ServerError,
    TLSRequiredError,
    TransientServerError,
)
from supervisor_mail.states import Security


class Refused(ServerError):
    """Raised when the server answers a command with 4xx (``permanent`` False) or 5xx."""

    def __init__(self, message: str, code: int, reply: str):
        super().__init__(message)
        self.code = code
        self.reply = reply

    @property
    def permanent(self) -> bool:
        return permanent(self.code)


class TooLarge(ServerError):
    """Raised before MAIL FROM when the message is over the server's advertised SIZE."""


class Stale(NetworkError):
    """Raised when a reused connection is found closed at MAIL FROM: nothing was sent yet."""


def permanent(code: int) -> bool:
    """5xx is final (RFC 5321 4.2.1); 4xx, and anything a broken session gives, passes."""
    return 500 <= code <= 599


def reply_text(code: int, message: bytes | str) -> str:
    """``550 5.1.1 no such user`` on one line, as stored on the row and logged."""
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    return " ".join(f"{code} {message}".split())


@dataclass
class Delivery:
    """The server took the message: its final reply, and the recipients it refused."""

    reply: str
    refused: dict[str, str] = field(default_factory=dict)  # address -> reply


@functools.cache
def _ehlo_name() -> str:
    """Our name in EHLO, looked up once a process (``getfqdn`` can wait on DNS)."""
    return socket.getfqdn()


def tls_context(cfg: Config) -> ssl.SSLContext:
    """Verification on: ``engine.tls_ca_file`` when set, else the system's trust store."""
    return _context(cfg.engine.tls_ca_file)


@functools.lru_cache(maxsize=4)
def _context(cafile: str | None) -> ssl.SSLContext:
    """One context a process and CA file: loading a trust store takes about 20 ms, which
    would otherwise be paid again by every new session (a reload starts new workers)."""
    return ssl.create_default_context(cafile=cafile)


def settings_key(account: Account) -> tuple:
    """What a reusable session depends on: a change of any of these opens a new one."""
    return (account.acntid, account.smtp_host, account.smtp_port, account.smtp_security,
            account.smtp_login, account.smtp_password)


class Session:
    """One SMTP connection for one account, kept open for its consecutive messages."""

    def __init__(self, cfg: Config, account: Account):
        if not account.smtp_host:
            raise ServerError(f"account {account.acntid} has no SMTP server: set smtp_host")
        self.key = settings_key(account)
        self.sent = 0
        security = Security(account.smtp_security)
        port = account.smtp_port or DEFAULT_PORTS[("smtp", security)]
        self.where = f"SMTP server {account.smtp_host}:{port}"
        context = tls_context(cfg) if security is not Security.PLAIN else None
        timeout = cfg.outbox.socket_timeout
        try:
            if security is Security.TLS:
                self.smtp = smtplib.SMTP_SSL(account.smtp_host, port, _ehlo_name(),
                                             timeout=timeout, context=context)
            else:
                self.smtp = smtplib.SMTP(account.smtp_host, port, _ehlo_name(), timeout=timeout)
        except ssl.SSLCertVerificationError as exc:
            raise _untrusted(self.where, exc) from None
        except (OSError, smtplib.SMTPException) as exc:
            raise NetworkError(f"cannot connect to {self.where}: {_reason(exc)}") from None
        try:
            self._ehlo()
            if security is Security.STARTTLS:
                self._starttls(context)
            if account.smtp_login or account.smtp_password:
                self._login(account.smtp_login or account.email, account.smtp_password or "")
        except BaseException:
            self.close()
            raise

    def _ehlo(self) -> None:
        code, message = self.smtp.ehlo()
        if not 200 <= code <= 299:
            code, message = self.smtp.helo()
            if not 200 <= code <= 299:
                raise _refused(self.where, "EHLO", code, message)

    def _starttls(self, context: ssl.SSLContext | None) -> None:
        if not self.smtp.has_extn("starttls"):
            raise TLSRequiredError(
                f"{self.where} does not offer STARTTLS, which the account requires: fix the "
                "server, or use smtp_security 'tls' (or 'plain' to accept no encryption)")
        try:
            code, message = self.smtp.starttls(context=context)
        except ssl.SSLCertVerificationError as exc:
            raise _untrusted(self.where, exc) from None
        except smtplib.SMTPResponseException as exc:
            raise _refused(self.where, "STARTTLS", exc.smtp_code, exc.smtp_error) from None
        except (OSError, smtplib.SMTPException) as exc:
            raise NetworkError(f"{self.where}: STARTTLS failed: {_reason(exc)}") from None
        self._ehlo()

    def _login(self, user: str, password: str) -> None:
        """AUTH; a refusal of the credentials is ``AuthError``, a 4xx one passes."""
        try:
            self.smtp.login(user, password)
        except smtplib.SMTPNotSupportedError:
            raise AuthError(f"{self.where} does not offer AUTH, but the account has SMTP "
                            "credentials: clear smtp_login and smtp_password, or fix the "
                            "server") from None
        except smtplib.SMTPAuthenticationError as exc:
            text = reply_text(exc.smtp_code, exc.smtp_error)
            kind = AuthError if permanent(exc.smtp_code) else TransientServerError
            raise kind(f"{self.where} refused the login of {user}: {text}") from None
        except smtplib.SMTPException as exc:
            raise AuthError(f"{self.where}: no AUTH mechanism works for {user}: "
                            f"{_reason(exc)}") from None

    def send(self, out: Outgoing) -> Delivery:
        """MAIL, RCPT for each recipient, DATA; the final reply, or an exception (see module)."""
        limit = self.smtp.esmtp_features.get("size", "").strip()
        if limit.isdigit() and int(limit) and len(out.data) > int(limit):
            raise TooLarge(f"the message is {len(out.data)} bytes, over the {limit} bytes "
                           f"{self.where} accepts (SIZE)")
        try:
            return self._transaction(out)
        except (OSError, smtplib.SMTPServerDisconnected) as exc:
            raise NetworkError(f"{self.where}: {_reason(exc)}") from None

    def _transaction(self, out: Outgoing) -> Delivery:
        options = self._mail_options(out)
        try:
            code, message = self.smtp.mail(out.sender, options)
        except (OSError, smtplib.SMTPServerDisconnected) as exc:
            if self.sent:
                raise Stale(f"{self.where}: the kept connection was closed: "
                            f"{_reason(exc)}") from None
            raise
        if code != 250:
            self._rset()
            raise _refused(self.where, f"MAIL FROM:<{out.sender}>", code, message)
        refused = {}
        for rcpt in out.recipients:
            code, message = self.smtp.rcpt(rcpt)
            if code not in (250, 251):
                refused[rcpt] = reply_text(code, message)
        if len(refused) == len(out.recipients):
            self._rset()
            # One recipient that may pass makes the whole message worth retrying.
            worst = min((int(r[:3]) for r in refused.values()), default=554)
            raise Refused(f"{self.where} refused every recipient: "
                          + "; ".join(f"{a}: {r}" for a, r in refused.items()),
                          worst, "; ".join(refused.values()))
        try:
            code, message = self.smtp.data(out.data)
        except smtplib.SMTPDataError as exc:
            self._rset()
            raise _refused(self.where, "DATA", exc.smtp_code, exc.smtp_error) from None
        if code != 250:
            self._rset()
            raise _refused(self.where, "the message", code, message)
        self.sent += 1
        return Delivery(reply_text(code, message), refused)

    def _mail_options(self, out: Outgoing) -> list[str]:
        options = []
        if self.smtp.has_extn("size"):
            options.append(f"SIZE={len(out.data)}")
        if not out.data.isascii() and self.smtp.has_extn("8bitmime"):
            options.append("BODY=8BITMIME")
        if not all(a.isascii() for a in (out.sender, *out.recipients)):
            if not self.smtp.has_extn("smtputf8"):
                raise Refused(f"{self.where} does not offer SMTPUTF8, which the non-ASCII "
                              "addresses of this message need", 553, "553 SMTPUTF8 not offered")
            options.append("SMTPUTF8")
        return options

    def _rset(self) -> None:
        """Leave the session clean for the next message; a failure here shows at the next MAIL."""
        try:
            self.smtp.rset()
        except (OSError, smtplib.SMTPException):
            pass

    def close(self) -> None:
        """QUIT if the server still listens, then close the socket; never raises."""
        try:
            self.smtp.quit()
        except (OSError, smtplib.SMTPException):
            self.smtp.close()


def _refused(where: str, command: str, code: int, message: bytes | str) -> Refused:
    text = reply_text(code, message)
    return Refused(f"{where} refused {command}: {text}", code, text)


def _untrusted(where: str, exc: ssl.SSLCertVerificationError) -> ServerError:
    return ServerError(f"{where}: certificate not trusted ({exc.verify_message}); "
                       "set [engine] tls_ca_file to the CA that signed it")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout):
        return "timed out"
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return " ".join(text.split()) or type(exc).__name__
