"""IMAP commands whose answers are read straight off the connection, one response at a time.

imaplib collects a whole command's answer before returning it, so a FETCH of
500 messages would sit in memory twice and be parsed by a general-purpose lexer.
Here each untagged response is parsed as it arrives and handed to a callback, a
literal is read with one ``read()``, and a literal larger than the caller's cap
is drained in chunks instead of being held::

    def on_response(kind, data):      # kind b"FETCH": data = {b"UID": 7, b"BODY[]": b"..."}
        ...
    status, text = execute(client, b"UID FETCH 1:* (UID FLAGS BODY.PEEK[])", on_response)

The connection stays usable by imapclient afterwards: commands carry their own
tags and every byte up to the tagged answer is consumed.
"""

from __future__ import annotations

import itertools
import re
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass

import imapclient
from imapclient.exceptions import IMAPClientError

from supervisor_mail.errors import NetworkError, ProtocolError

DRAIN_CHUNK = 1 << 20  # bytes read at a time from a literal that is not kept
_tags = itertools.count(1)
_LITERAL_AT_END = re.compile(rb"~?\{(\d+)\+?\}\r?\n?$")
_TOKEN = re.compile(rb"""
    [ ]*(?:
      (?P<open>\() | (?P<close>\)) |
      "(?P<quoted>(?:[^"\\]|\\.)*)" |
      (?P<literal>\x00) |
      (?P<atom>(?:[^ ()"\x00\[]+|\[[^\]]*\])+)
    )""", re.VERBOSE)
_UNESCAPE = re.compile(rb"\\(.)")
_STATUS = re.compile(rb"\* (OK|NO|BAD|PREAUTH)\b ?", re.IGNORECASE)


@dataclass(frozen=True)
class Dropped:
    """A literal larger than the cap: drained from the socket, only its size kept."""

    size: int


Handler = Callable[[bytes, object], None]


def execute(client: imapclient.IMAPClient, command: bytes, on_response: Handler,
            literal_cap: int | None = None) -> tuple[bytes, bytes]:
    """Send ``command`` and feed each untagged response to ``on_response(kind, data)``.

    ``kind`` is the response's name (b"FETCH", b"LIST", b"VANISHED", b"EXISTS", ...).
    For FETCH, ``data`` is a dict of the attributes with the UID, sizes and
    MODSEQ as ints, FLAGS as a tuple of bytes and sections as bytes (or
    ``Dropped`` beyond ``literal_cap``); for other kinds it is the parsed list
    after the name. Returns the tagged status (b"OK", b"NO") and its text;
    a BAD or an unparsable response raises ``ProtocolError``, a broken
    connection ``NetworkError``.
    """
    imap = client._imap  # imaplib.IMAP4: its documented send/readline/read are the seam
    tag = b"SM%d" % next(_tags)
    try:
        imap.send(tag + b" " + command + b"\r\n")
        while True:
            parts = _read_response(imap, literal_cap)
            head = parts[0]
            if head.startswith(tag + b" "):
                status, _, said = head[len(tag) + 1:].rstrip(b"\r\n").partition(b" ")
                if status == b"BAD":
                    raise ProtocolError(f"server rejected {_shown(command)}: {text(said)}")
                return status, said
            if head.startswith(b"+"):
                raise ProtocolError(f"unexpected continuation request after {_shown(command)}")
            if not head.startswith(b"* "):
                raise ProtocolError(f"unexpected response to {_shown(command)}: {text(head)}")
            _dispatch(parts, on_response)
    except (OSError, ssl.SSLError, EOFError) as exc:
        reason = "timed out" if isinstance(exc, socket.timeout) else str(exc) or "closed"
        raise NetworkError(f"connection lost during {_shown(command)}: {reason}") from None
    except IMAPClientError as exc:  # imaplib's line-length guard
        raise ProtocolError(f"bad response to {_shown(command)}: {exc}") from None


def _read_response(imap, literal_cap: int | None) -> list:
    """One response: its lines with a NUL standing for each literal, and the literals."""
    lines, literals = [], []
    while True:
        line = imap.readline()
        if not line.endswith(b"\n"):  # nothing, or a line cut short: the connection is gone
            raise EOFError("server closed the connection")
        match = _LITERAL_AT_END.search(line)
        if not match:
            lines.append(line.rstrip(b"\r\n"))
            break
        lines.append(line[:match.start()] + b"\x00")
        literals.append(_read_literal(imap, int(match[1]), literal_cap))
    return [b"".join(lines), literals]


def _read_literal(imap, size: int, cap: int | None) -> bytes | Dropped:
    if cap is not None and size > cap:
        left = size
        while left:
            chunk = imap.read(min(left, DRAIN_CHUNK))
            if not chunk:
                raise EOFError("server closed the connection inside a literal")
            left -= len(chunk)
        return Dropped(size)
    data = imap.read(size)
    if len(data) != size:
        raise EOFError("server closed the connection inside a literal")
    return data


def _dispatch(parts: list, on_response: Handler) -> None:
    line, literals = parts
    if line.startswith(b"* BYE"):
        raise EOFError("server said " + text(line[2:]))
    status = _STATUS.match(line)
    if status:  # free text after the code: not IMAP syntax, so not parsed
        on_response(status[1].upper(), line[status.end():])
        return
    items = parse(line[2:], literals)
    if len(items) >= 2 and isinstance(items[0], int):
        number, kind = items[0], items[1].upper()
        if kind == b"FETCH":
            if len(items) != 3 or not isinstance(items[2], list):
                raise ProtocolError(f"malformed FETCH response: {text(line[:200])}")
            on_response(kind, fetch_dict(items[2]))
        else:
            on_response(kind, number)
    elif items and isinstance(items[0], bytes):
        on_response(items[0].upper(), items[1:])


def parse(line: bytes, literals: list | tuple = ()) -> list:
    """The items of one response line: ints, bytes, nested lists; NIL is None.

    A NUL byte in ``line`` stands for the next literal of ``literals``.
    """
    stack: list[list] = [[]]
    pending = iter(literals)
    pos, end = 0, len(line)
    while pos < end:
        match = _TOKEN.match(line, pos)
        if not match or match.end() == pos:
            if line[pos:].strip(b" ") == b"":
                break
            raise ProtocolError(f"cannot parse server response at {text(line[pos:pos + 60])}")
        pos = match.end()
        kind = match.lastgroup
        if kind == "open":
            stack.append([])
        elif kind == "close":
            if len(stack) == 1:
                raise ProtocolError(f"unbalanced ')' in server response: {text(line[:80])}")
            done = stack.pop()
            stack[-1].append(done)
        elif kind == "quoted":
            stack[-1].append(_UNESCAPE.sub(rb"\1", match["quoted"]))
        elif kind == "literal":
            stack[-1].append(next(pending, b""))
        else:
            atom = match["atom"]
            stack[-1].append(int(atom) if atom.isdigit() else None if atom == b"NIL" else atom)
    if len(stack) != 1:
        raise ProtocolError(f"unbalanced '(' in server response: {text(line[:80])}")
    return stack[0]


def fetch_dict(items: list) -> dict:
    """``[b"UID", 7, b"FLAGS", [b"\\\\Seen"]]`` as ``{b"UID": 7, b"FLAGS": (b"\\\\Seen",)}``."""
    if len(items) % 2:
        raise ProtocolError(f"FETCH response with an odd number of items: {items[:6]!r}")
    out = {}
    for name, value in zip(items[0::2], items[1::2], strict=True):
        if not isinstance(name, bytes):
            raise ProtocolError(f"FETCH item name is not an atom: {name!r}")
        name = name.upper()
        if name == b"FLAGS":
            value = tuple(value or ())
        elif name == b"MODSEQ":
            value = value[0] if isinstance(value, list) and value else value
        out[name] = value
    return out


def _shown(command: bytes) -> str:
    """A command as logged: never more than its verb and arguments' start (no literals)."""
    return text(command[:80])


def text(data: bytes) -> str:
    """Server bytes as one line of text for messages and logs."""
    return " ".join(data.decode("utf-8", "replace").split())
