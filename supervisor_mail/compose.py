"""What an outbox row becomes on the wire: the envelope and the transmitted bytes.

The web application gives either a complete RFC 5322 message (``raw``) or the
parts to build one from (subject, bodies, To/Cc/Bcc). Either way the message
sent keeps its Message-ID and Date or gets them (stable across resends: the
Message-ID is stored on the row before the first attempt, the Date is the time
the row was queued), and Bcc is in the envelope only, never in the header.

Bad input is refused with ``BadMessage``, whose text is stored on the row for
the user to read: a line break in a header value (header injection), no
recipients, an address that does not parse.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, formataddr, getaddresses, make_msgid

# RFC 5322 atext plus the dot, and any non-ASCII character (RFC 6531 local parts).
_ALNUM = r"A-Za-z0-9\u0080-\U0010ffff"
_LOCAL = rf"[{_ALNUM}!#$%&'*+/=?^_`{{|}}~.\-]+"
_LABEL = rf"[{_ALNUM}](?:[{_ALNUM}\-]*[{_ALNUM}])?"
_DOMAIN = rf"(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9A-Fa-f:.]+\])"
_ADDR_SPEC = re.compile(rf"{_LOCAL}@{_DOMAIN}")
_NAMED = re.compile(r"(?s)(.*)<([^<>]*)>\s*")
_FIELD_NAME = re.compile(rb"[!-9;-~]+:")
_MESSAGE_ID = re.compile(r"<[^<>\s]+@[^<>\s]+>")
_EOL = re.compile(rb"\r\n|\r|\n")
_BCC_FIELDS = {b"bcc", b"resent-bcc"}


class BadMessage(ValueError):
    """Raised when an outbox row cannot become a message; the text says what to fix."""


@dataclass
class Parts:
    """The columns of an outbox row that make the message (see ``email_outbox``)."""

    sender: str
    recipients: list[str] = field(default_factory=list)
    raw: bytes | None = None
    subject: str | None = None
    body_text: str | None = None
    body_html: str | None = None
    to_addrs: list[str] = field(default_factory=list)
    cc_addrs: list[str] = field(default_factory=list)
    bcc_addrs: list[str] = field(default_factory=list)
    message_id: str | None = None
    from_name: str = ""
    date: datetime | None = None


@dataclass(frozen=True)
class Outgoing:
    """A message ready for SMTP: ``data`` has CRLF line ends and no Bcc field."""

    message_id: str
    sender: str
    recipients: list[str]
    data: bytes


def compose(parts: Parts) -> Outgoing:
    """The envelope and bytes to send for ``parts``; raises ``BadMessage``."""
    sender = address(parts.sender, "the envelope sender")
    if parts.raw is not None:
        return _from_raw(parts, sender)
    return _from_parts(parts, sender)


def address(text: str | None, what: str) -> str:
    """The bare addr-spec of ``a@b`` or ``Name <a@b>``; raises ``BadMessage`` naming ``what``."""
    return mailbox(text, what)[1]


def mailbox(text: str | None, what: str) -> tuple[str, str]:
    """(display name, addr-spec) of ``a@b`` or ``Name <a@b>``; raises ``BadMessage``."""
    if not text or not text.strip():
        raise BadMessage(f"{what} is empty")
    no_injection(text, what)
    named = _NAMED.fullmatch(text.strip())
    name, spec = (named[1].strip().strip('"'), named[2].strip()) if named else ("", text.strip())
    if not _ADDR_SPEC.fullmatch(spec):
        raise BadMessage(f"{what} {text.strip()!r} is not an e-mail address")
    return name, spec


def no_injection(text: str, what: str) -> None:
    """Refuse CR, LF and NUL in a header value: they would start a header of the sender's."""
    if any(c in text for c in "\r\n\0"):
        raise BadMessage(f"{what} contains a line break (header injection refused): {text!r}")


def envelope(recipients: list[str], what: str = "recipient") -> list[str]:
    """Addr-specs, each checked, duplicates (any case) dropped, order kept."""
    seen, out = set(), []
    for text in recipients:
        spec = address(text, what)
        if spec.lower() not in seen:
            seen.add(spec.lower())
            out.append(spec)
    return out


def _recipients_or_refuse(recipients: list[str]) -> list[str]:
    if not recipients:
        raise BadMessage("no recipients: set recipients, or to_addrs, cc_addrs or bcc_addrs")
    return recipients


def _from_parts(parts: Parts, sender: str) -> Outgoing:
    to = envelope(parts.to_addrs, "To address")
    cc = envelope(parts.cc_addrs, "Cc address")
    bcc = envelope(parts.bcc_addrs, "Bcc address")
    rcpts = envelope(parts.recipients) if parts.recipients else envelope(to + cc + bcc)
    _recipients_or_refuse(rcpts)
    subject = parts.subject or ""
    no_injection(subject, "the subject")
    no_injection(parts.from_name, "the sender's name")
    message_id = _message_id(parts.message_id, sender)
    msg = EmailMessage(policy=SMTP)
    msg["From"] = formataddr((parts.from_name, sender))
    for header, texts in (("To", parts.to_addrs), ("Cc", parts.cc_addrs)):
        if texts:
            msg[header] = ", ".join(formataddr(mailbox(t, f"{header} address")) for t in texts)
    msg["Subject"] = subject
    msg["Date"] = format_datetime(parts.date) if parts.date else format_datetime(
        datetime.now().astimezone())
    msg["Message-ID"] = message_id
    msg.set_content(parts.body_text or "")
    if parts.body_html:
        msg.add_alternative(parts.body_html, subtype="html")
    return Outgoing(message_id, sender, rcpts, msg.as_bytes(policy=SMTP))


def _message_id(given: str | None, sender: str) -> str:
    if given:
        no_injection(given, "the Message-ID")
        given = given.strip()
        if not given.startswith("<"):
            given = f"<{given}>"
        if not _MESSAGE_ID.fullmatch(given):
            raise BadMessage(f"the Message-ID {given!r} is not of the form <id@domain>")
        return given
    return make_msgid(domain=sender.rpartition("@")[2].strip("[]"))


def _from_raw(parts: Parts, sender: str) -> Outgoing:
    """Keep the raw message as it is, but for CRLF line ends, no Bcc, and the fields added."""
    if not parts.raw.strip():
        raise BadMessage("raw is empty: give a complete RFC 5322 message, or NULL and the parts")
    data = _EOL.sub(b"\r\n", parts.raw)
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep and head.endswith(b"\r\n"):
        head = head[:-2]  # a message of header fields only
    fields = _fields(head + b"\r\n") if head else []
    kept = [(name, text) for name, text in fields if name.lower() not in _BCC_FIELDS]
    values = {name.lower(): _value(text) for name, text in reversed(fields)}
    added = []
    message_id = values.get(b"message-id", "").strip()
    if message_id:
        if not _MESSAGE_ID.fullmatch(message_id):
            raise BadMessage(f"the raw message's Message-ID {message_id!r} is not of the "
                             "form <id@domain>")
    else:
        message_id = _message_id(parts.message_id, sender)
        added.append(f"Message-ID: {message_id}")
    if b"date" not in values:
        added.append(f"Date: {format_datetime(parts.date or datetime.now().astimezone())}")
    if b"from" not in values:
        added.append(f"From: {formataddr((parts.from_name, sender))}")
    if parts.recipients:
        rcpts = envelope(parts.recipients)
    else:
        headers = [values.get(name, "") for name in (b"to", b"cc", b"bcc")]
        rcpts = envelope([formataddr(pair) for pair in getaddresses(headers) if pair[1]])
    _recipients_or_refuse(rcpts)
    new_head = b"".join(line.encode() + b"\r\n" for line in added)
    new_head += b"".join(text for _, text in kept)
    return Outgoing(message_id, sender, rcpts, new_head + b"\r\n" + body if sep else new_head)


def _fields(head: bytes) -> list[tuple[bytes, bytes]]:
    """The header block as (name, whole field with its folded lines and CRLF)."""
    fields: list[tuple[bytes, bytes]] = []
    for number, line in enumerate(head.split(b"\r\n")[:-1], 1):
        if line[:1] in (b" ", b"\t") and fields:
            name, text = fields[-1]
            fields[-1] = (name, text + line + b"\r\n")
            continue
        match = _FIELD_NAME.match(line)
        if not match:
            raise BadMessage(f"line {number} of the raw message's header is not a "
                             f"'Name: value' field: {line[:60]!r}")
        fields.append((match[0][:-1], line + b"\r\n"))
    return fields


def _value(text: bytes) -> str:
    """A field's unfolded value as text (undecoded RFC 2047 words stay as they are)."""
    value = text.split(b":", 1)[1]
    return " ".join(value.decode("utf-8", "replace").split())
