"""IMAP connections: TLS as the account says (never a silent plain-text fallback), timeouts on
every socket, and a login whose failures are classified for the backoffs.

    client = imap_client.connect(cfg, account)   # connected, TLS up, logged in
    client.append("Sent", raw, flags=[b"\\Seen"])

Errors are the ``errors`` module's: ``AuthError`` for rejected credentials only,
``TransientServerError`` for refusals that pass (RFC 5530 ``[UNAVAILABLE]``,
``[LIMIT]``, ``[INUSE]``, too many connections), ``NetworkError`` for sockets,
``TLSRequiredError`` when STARTTLS is configured and not offered.
"""

from __future__ import annotations

import re
import socket
import ssl

import imapclient
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError, LoginError

from supervisor_mail.accounts import Account
from supervisor_mail.config import Config
from supervisor_mail.errors import (
    AuthError,
    NetworkError,
    ServerError,
    TLSRequiredError,
    TransientServerError,
)
from supervisor_mail.states import Security

# RFC 5530 response codes that say the credentials themselves were refused.
AUTH_CODES = frozenset({"AUTHENTICATIONFAILED", "AUTHORIZATIONFAILED", "EXPIRED"})
# RFC 5530 codes (and what servers write without one) that say "not now", not "wrong password".
TRANSIENT_CODES = frozenset({"UNAVAILABLE", "LIMIT", "INUSE", "SERVERBUG", "OVERQUOTA"})
_TRANSIENT_TEXT = re.compile(
    r"too many|maximum number of connections|try again|temporar|unavailable|"
    r"server (is )?busy|connection limit|rate limit", re.IGNORECASE)
_CODE = re.compile(r"\[([A-Z][A-Z0-9-]*)")


def connect(cfg: Config, account: Account, login: bool = True) -> imapclient.IMAPClient:
    """A connected IMAPClient for ``account``, TLS established as configured, logged in.

    ``folder_encode`` is off: folder names go to and come from the server as the
    server spells them (modified UTF-7), so a name is never re-encoded differently.
    Raises ``NetworkError``, ``TLSRequiredError``, ``AuthError`` or
    ``TransientServerError``; the socket is closed on any failure.
    """
    if not account.imap_host:
        raise ServerError(f"account {account.acntid} has no IMAP server: set imap_host")
    security = Security(account.imap_security)
    port = account.imap_port or (993 if security is Security.TLS else 143)
    where = f"IMAP server {account.imap_host}:{port}"
    timeout = imapclient.SocketTimeout(connect=cfg.sync.socket_timeout,
                                       read=cfg.sync.socket_timeout)
    context = tls_context(cfg)
    try:
        client = imapclient.IMAPClient(account.imap_host, port, ssl=security is Security.TLS,
                                       ssl_context=context, timeout=timeout)
    except ssl.SSLCertVerificationError as exc:
        raise ServerError(f"{where}: certificate not trusted ({exc.verify_message}); "
                          "set [engine] tls_ca_file to the CA that signed it") from None
    except (OSError, IMAPClientError) as exc:
        raise NetworkError(f"cannot connect to {where}: {_reason(exc)}") from None
    client.folder_encode = False
    try:
        if security is Security.STARTTLS:
            _starttls(client, context, where)
        if login:
            login_account(client, account, where)
    except BaseException:
        close(client)
        raise
    return client


def tls_context(cfg: Config) -> ssl.SSLContext:
    """Verification on: ``engine.tls_ca_file`` when set, else the system's trust store."""
    return ssl.create_default_context(cafile=cfg.engine.tls_ca_file)


def _starttls(client: imapclient.IMAPClient, context: ssl.SSLContext, where: str) -> None:
    try:
        offered = client.has_capability("STARTTLS")
    except (OSError, IMAPClientError) as exc:
        raise NetworkError(f"{where}: {_reason(exc)}") from None
    if not offered:
        raise TLSRequiredError(
            f"{where} does not offer STARTTLS, which the account requires: "
            "fix the server, or use imap_security 'tls' (or 'plain' to accept no encryption)")
    try:
        client.starttls(context)
    except ssl.SSLCertVerificationError as exc:
        raise ServerError(f"{where}: certificate not trusted ({exc.verify_message}); "
                          "set [engine] tls_ca_file to the CA that signed it") from None
    except (OSError, IMAPClientError) as exc:
        raise NetworkError(f"{where}: STARTTLS failed: {_reason(exc)}") from None


def login_account(client: imapclient.IMAPClient, account: Account, where: str) -> None:
    """LOGIN with the account's credentials, the failure classified by ``classify_refusal``."""
    user = account.imap_login or account.email
    try:
        client.login(user, account.imap_password or "")
    except LoginError as exc:
        text = _reason(exc).removeprefix("login failed: ")
        if isinstance(exc.__context__, IMAPClientAbortError):
            # BYE or EOF instead of a tagged answer: never a verdict on the password; a
            # BYE that names a connection limit is the server shedding load.
            kind = TransientServerError if _TRANSIENT_TEXT.search(text) else NetworkError
            raise kind(f"{where} closed the connection during the login of {user}: "
                       f"{text}") from None
        raise classify_refusal(text)(f"{where} refused the login of {user}: {text}") from None
    except (OSError, IMAPClientError) as exc:
        raise NetworkError(f"{where}: connection lost during login: {_reason(exc)}") from None


def classify_refusal(text: str) -> type[ServerError]:
    """``AuthError`` when a refusal is about the credentials, ``TransientServerError`` when it
    says "not now" (an RFC 5530 code, or the words servers use for connection limits).

    A bare NO without a code is taken as bad credentials: that is what LOGIN's NO
    means (RFC 3501) and what servers without RFC 5530 send for a wrong password.
    """
    codes = set(_CODE.findall(text.upper()))
    if codes & AUTH_CODES:
        return AuthError
    if codes & TRANSIENT_CODES or _TRANSIENT_TEXT.search(text):
        return TransientServerError
    return AuthError


def close(client: imapclient.IMAPClient) -> None:
    """LOGOUT if the server still listens, then close the socket; never raises."""
    try:
        client.logout()
    except Exception:  # a broken connection has nothing left to log out of
        try:
            client.shutdown()
        except Exception:
            pass


def _reason(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout):
        return "timed out"
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    # imapclient formats some server answers as a bytes repr: b'[CODE] text'
    text = re.sub(r"\bb'(.*)'", r"\1", text)
    return " ".join(text.split()) or type(exc).__name__
