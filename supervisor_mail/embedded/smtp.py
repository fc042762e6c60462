"""A real SMTP server on loopback that keeps what it receives: aiosmtpd in a thread.

``SmtpSink`` accepts mail for any recipient and records each envelope; a test can
make it answer 4xx/5xx at RCPT or DATA, refuse chosen recipients, require AUTH,
offer or require STARTTLS (a trustme certificate, ``ca_pem_path`` to trust) and
advertise a SIZE limit. DATA is recorded as received: CRLF line endings, dot
stuffing undone, the final ``.`` line removed.
"""

from __future__ import annotations

import re
import shutil
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .imap import LOOPBACK, START_ATTEMPTS, free_port, issue_loopback_cert

_REPLY = re.compile(r"^[45]\d\d[ -]")
STAGES = ("RCPT", "DATA")


@dataclass(frozen=True)
class ReceivedMessage:
    """One accepted message: its envelope, its bytes, when and how it arrived."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    received_monotonic: float  # time.monotonic(), to measure delays on this host
    received_at: float  # time.time()
    mail_options: tuple[str, ...] = ()
    authenticated_as: str | None = None
    tls: bool = False


@dataclass
class _Failure:
    reply: str
    remaining: int | None  # None: until cleared


@dataclass
class _Rules:
    failures: dict[str, _Failure] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # lower-cased address -> reply


class SmtpSink:
    """``with SmtpSink() as sink: ...; sink.wait_for(1)`` — an SMTP server that keeps the mail.

    Args:
        starttls: offer STARTTLS with a fresh trustme certificate.
        require_starttls: refuse everything but EHLO/STARTTLS before TLS (implies starttls).
        auth: ``(user, password)``: require AUTH PLAIN/LOGIN with these; anything else is 535.
            With STARTTLS, AUTH is offered only after it, as real servers do.
        size_limit: the SIZE to advertise and enforce (aiosmtpd's 32 MiB if None).
    """

    def __init__(self, *, starttls: bool = False, require_starttls: bool = False,
                 auth: tuple[str, str] | None = None, size_limit: int | None = None) -> None:
        self.host = LOOPBACK
        self.port = 0
        self.starttls = starttls or require_starttls
        self.require_starttls = require_starttls
        self.auth = auth
        self.size_limit = size_limit
        self.ca_pem_path: Path | None = None
        self._directory: Path | None = None
        self._controller: Any = None
        self._messages: list[ReceivedMessage] = []
        self._rules = _Rules()
        self._changed = threading.Condition()

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> SmtpSink:
        """Listen on a free loopback port; returns once the server answers."""
        from aiosmtpd.controller import Controller  # in the test extra, like the sink

        if self._controller is not None:
            raise RuntimeError("the SMTP sink is already running")
        options = self._server_options()
        for attempt in range(1, START_ATTEMPTS + 1):
            self.port = free_port()
            controller = Controller(_Handler(self), hostname=self.host, port=self.port,
                                    server_hostname="sink.supervisor-mail.test", **options)
            try:
                controller.start()
            except OSError:  # the port was taken after free_port() chose it
                controller.stop(no_assert=True)  # ends its thread
                if attempt == START_ATTEMPTS:
                    self.stop()
                    raise
                continue
            self._controller = controller
            return self
        raise AssertionError("unreachable: the last attempt returns or raises")

    def stop(self) -> None:
        """Stop the server thread and delete the certificate files."""
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _server_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if self.size_limit is not None:
            options["data_size_limit"] = self.size_limit
        if self.starttls:
            self._directory = Path(tempfile.mkdtemp(prefix="supervisor_mail-smtp-"))
            tls = issue_loopback_cert(self._directory)
            self.ca_pem_path = tls.ca_pem_path
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(tls.cert_path, tls.key_path)
            options.update(tls_context=context, require_starttls=self.require_starttls)
        if self.auth is not None:
            options.update(authenticator=self._authenticate, auth_required=True,
                           auth_require_tls=self.starttls)
        return options

    def _authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str,
                      auth_data: Any) -> Any:
        from aiosmtpd.smtp import AuthResult, LoginPassword

        assert self.auth is not None
        user, password = self.auth
        ok = (isinstance(auth_data, LoginPassword)
              and auth_data.login == user.encode() and auth_data.password == password.encode())
        # handled=False: aiosmtpd answers itself, "535 5.7.8 Authentication credentials
        # invalid" on failure (its default, handled=True, would leave the client waiting).
        return AuthResult(success=ok, handled=False, auth_data=user if ok else None)

    # -- what it received --------------------------------------------------------

    @property
    def messages(self) -> list[ReceivedMessage]:
        """A copy of the messages received so far, oldest first."""
        with self._changed:
            return list(self._messages)

    def wait_for(self, count: int, timeout: float = 5.0) -> list[ReceivedMessage]:
        """Block until at least ``count`` messages arrived; returns them all.

        Raises TimeoutError (naming how many arrived) when ``timeout`` passes first.
        """
        with self._changed:
            if not self._changed.wait_for(lambda: len(self._messages) >= count, timeout):
                raise TimeoutError(f"SMTP sink got {len(self._messages)} of {count} messages"
                                   f" within {timeout}s")
            return list(self._messages)

    def reset(self) -> None:
        """Forget received messages and every fail_at/refuse_recipient rule."""
        with self._changed:
            self._messages.clear()
            self._rules = _Rules()

    # -- making it fail ----------------------------------------------------------

    def fail_at(self, stage: str, reply: str, times: int | None = None) -> None:
        """Answer ``reply`` (e.g. "451 4.3.0 Try again later") at RCPT or DATA.

        ``times``: that many times, then accept again; None: until ``clear_failures``.
        A message failed at DATA is not recorded; a failed RCPT adds no recipient.
        """
        stage = stage.upper()
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, not {stage!r}")
        _check_reply(reply)
        with self._changed:
            self._rules.failures[stage] = _Failure(reply, times)

    def refuse_recipient(self, address: str,
                         reply: str = "550 5.1.1 Recipient address rejected") -> None:
        """Answer ``reply`` at RCPT for this address (case-insensitive), every time."""
        _check_reply(reply)
        with self._changed:
            self._rules.refused[address.lower()] = reply

    def clear_failures(self) -> None:
        """Accept everything again (received messages stay)."""
        with self._changed:
            self._rules = _Rules()

    def _failure_reply(self, stage: str, address: str | None = None) -> str | None:
        """The reply a rule gives now, using up one of its ``times``; None to accept."""
        with self._changed:
            if address is not None and address.lower() in self._rules.refused:
                return self._rules.refused[address.lower()]
            failure = self._rules.failures.get(stage)
            if failure is None:
                return None
            if failure.remaining is not None:
                failure.remaining -= 1
                if failure.remaining <= 0:
                    del self._rules.failures[stage]
            return failure.reply

    def _record(self, message: ReceivedMessage) -> None:
        with self._changed:
            self._messages.append(message)
            self._changed.notify_all()


def _check_reply(reply: str) -> None:
    if not _REPLY.match(reply):
        raise ValueError(f"a failure reply starts with a 4xx or 5xx code and a space: {reply!r}")


class _Handler:
    """aiosmtpd's handler hooks, run in the server thread; state lives in the sink."""

    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        reply = self.sink._failure_reply("RCPT", address)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        reply = self.sink._failure_reply("DATA")
        if reply is not None:
            return reply
        self.sink._record(ReceivedMessage(
            mail_from=envelope.mail_from,
            rcpt_tos=tuple(envelope.rcpt_tos),
            data=envelope.original_content,
            received_monotonic=time.monotonic(),
            received_at=time.time(),
            mail_options=tuple(envelope.mail_options),
            authenticated_as=session.auth_data if session.authenticated else None,
            tls=session.ssl is not None,
        ))
        return "250 2.0.0 Message accepted for delivery"
