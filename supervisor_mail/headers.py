"""The few header fields the web application lists messages by, parsed cheaply from raw bytes.

Python's ``email`` parser builds the whole MIME tree; a sync only needs the top
header block's Message-ID, Subject, From, To, Cc and Date, so this reads just
that block, unfolds it, and decodes RFC 2047 words only in the fields it keeps.
Nothing here raises on bad input: an undecodable field is kept as its text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from email.header import decode_header, make_header
from email.utils import parsedate_to_datetime

WANTED = {b"message-id": "message_id", b"subject": "subject", b"from": "from_addr",
          b"to": "to_addrs", b"cc": "cc_addrs", b"date": "sent_date"}
_END_OF_HEADER = re.compile(rb"\r?\n\r?\n")
_FOLD = re.compile(rb"\r?\n(?=[ \t])")
_LINE = re.compile(rb"([!-9;-~]+)[ \t]*:[ \t]*(.*)")
_MESSAGE_ID = re.compile(r"<[^<>\s]*>")


@dataclass
class Headers:
    """What a message row holds besides its raw bytes; all text is free of NUL."""

    message_id: str | None = None
    subject: str | None = None
    from_addr: str | None = None
    to_addrs: str | None = None
    cc_addrs: str | None = None
    sent_date: datetime | None = None
    block: str = ""  # the whole header block, decoded for display


def header_block(raw: bytes) -> bytes:
    """The bytes before the first empty line (all of ``raw`` when there is none)."""
    match = _END_OF_HEADER.search(raw)
    return raw[:match.start()] if match else raw


def parse(raw: bytes) -> Headers:
    """The listed fields of the top header block (the first occurrence of each)."""
    block = header_block(raw)
    found: dict[str, bytes] = {}
    for line in _FOLD.sub(b"", block).splitlines():
        match = _LINE.match(line)
        if match:
            field = WANTED.get(match[1].lower())
            if field and field not in found:
                found[field] = match[2].strip()
    out = Headers(block=text(block))
    for field, value in found.items():
        if field == "sent_date":
            out.sent_date = parse_date(text(value))
        elif field == "message_id":
            ids = _MESSAGE_ID.findall(text(value))
            out.message_id = ids[0] if ids else (text(value) or None)
        else:
            setattr(out, field, decode_words(text(value)))
    return out


def text(data: bytes) -> str:
    """Bytes as text: UTF-8 when they are, else Latin-1 (never fails); NULs dropped."""
    try:
        out = data.decode("utf-8")
    except UnicodeDecodeError:
        out = data.decode("latin-1")
    return out.replace("\x00", "")


def decode_words(value: str) -> str:
    """RFC 2047 encoded words decoded; the text as it is when they cannot be."""
    if "=?" not in value:
        return value
    try:
        return str(make_header(decode_header(value))).replace("\x00", "")
    except (LookupError, ValueError, UnicodeError, AssertionError):
        return value


def parse_date(value: str) -> datetime | None:
    """An RFC 5322 date as an aware datetime (UTC when it names no zone), or None."""
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when
