"""The ``email_folders`` table: folders as the server lists them, their roles and priorities,
and the sync cursor (UIDVALIDITY, last UID stored, HIGHESTMODSEQ reconciled).

Names are kept as the server spells them (modified UTF-7, RFC 3501 5.1.3) in
``server_name`` and decoded for people in ``display_name``.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable
from dataclasses import dataclass, fields
from datetime import datetime

import psycopg
from psycopg.rows import class_row

from supervisor_mail import headers
from supervisor_mail.errors import NotFoundError
from supervisor_mail.states import Priority, Role

SPECIAL_USE = {b"\\sent": Role.SENT, b"\\drafts": Role.DRAFTS, b"\\trash": Role.TRASH,
               b"\\junk": Role.JUNK, b"\\archive": Role.ARCHIVE}
# Names that mean a role on servers without SPECIAL-USE (English, and Polish for this
# application's users), compared with the last level of the decoded name, lower-cased.
WELL_KNOWN = {
    Role.SENT: ("sent", "sent items", "sent messages", "sent mail", "wysłane",
                "elementy wysłane"),
    Role.DRAFTS: ("drafts", "draft", "kopie robocze", "szkice"),
    Role.TRASH: ("trash", "deleted items", "deleted messages", "bin", "kosz",
                 "elementy usunięte"),
    Role.JUNK: ("junk", "spam", "junk e-mail", "junk email", "bulk mail", "wiadomości-śmieci"),
    Role.ARCHIVE: ("archive", "archives", "archiwum"),
}
_BY_NAME = {name: role for role, names in WELL_KNOWN.items() for name in names}
_SHIFT = re.compile(rb"&([^-]*)-")


@dataclass
class Listed:
    """One LIST answer: the server's name, hierarchy delimiter and attributes."""

    server_name: str
    delimiter: str | None
    attributes: tuple[bytes, ...]

    @property
    def selectable(self) -> bool:
        lowered = {a.lower() for a in self.attributes}
        return not lowered & {b"\\noselect", b"\\nonexistent"}


@dataclass
class Folder:
    """One row of ``email_folders``."""

    emfdid: int
    acntid: int
    server_name: str
    display_name: str
    delimiter: str | None
    role: str | None
    priority: str
    user_priority: str | None
    uidvalidity: int | None
    last_uid: int
    highestmodseq: int | None
    last_recent_sync: datetime | None
    last_full_sync: datetime | None
    last_error: str | None
    gone_at: datetime | None

    @property
    def effective_priority(self) -> str:
        """The user's own setting when there is one, else the one given by the role."""
        return self.user_priority or self.priority


_COLUMNS = ", ".join(f.name for f in fields(Folder))


def decode_name(name: bytes) -> str:
    """A mailbox name for people: modified UTF-7 decoded (``Wys&AUI-ane`` -> ``Wysłane``).

    A server that sends 8-bit names (UTF-8, outside RFC 3501) gets them decoded
    as text; a shift sequence that does not decode is shown as it is.
    """
    if any(byte >= 0x80 for byte in name):
        return headers.text(name)
    out, pos = [], 0
    for match in _SHIFT.finditer(name):
        out.append(name[pos:match.start()].decode("ascii"))
        out.append(_unshift(match[1]) if match[1] else "&")
        pos = match.end()
    out.append(name[pos:].decode("ascii"))
    return "".join(out)


def _unshift(b64: bytes) -> str:
    try:
        data = base64.b64decode(b64.replace(b",", b"/") + b"=" * (-len(b64) % 4), validate=True)
        return data.decode("utf-16-be")
    except (binascii.Error, UnicodeDecodeError):
        return "&" + b64.decode("ascii") + "-"


def assign_roles(listed: list[Listed], special_use: bool) -> dict[str, Role]:
    """Roles by server name: INBOX always; then SPECIAL-USE attributes when the server
    offers them; then well-known names for the roles still missing (servers advertise
    SPECIAL-USE without flagging any mailbox). Each role goes to one folder at most:
    the shallowest, then the first by name.
    """
    roles: dict[str, Role] = {}
    ordered = sorted((f for f in listed if f.selectable), key=lambda f: (_depth(f), f.server_name))
    rules = [_by_inbox] + ([_by_attribute] if special_use else []) + [_by_name]
    for rule in rules:
        for item in ordered:
            role = rule(item)
            if role and item.server_name not in roles and role not in roles.values():
                roles[item.server_name] = role
    return roles


def _by_inbox(item: Listed) -> Role | None:
    return Role.INBOX if item.server_name.upper() == "INBOX" else None


def _by_attribute(item: Listed) -> Role | None:
    for attribute in item.attributes:
        if attribute.lower() in SPECIAL_USE:
            return SPECIAL_USE[attribute.lower()]
    return None


def _by_name(item: Listed) -> Role | None:
    leaf = decode_name(item.server_name.encode("utf-8"))
    if item.delimiter:
        leaf = leaf.rsplit(item.delimiter, 1)[-1]
    return _BY_NAME.get(leaf.strip().lower())


def _depth(item: Listed) -> int:
    return item.server_name.count(item.delimiter) if item.delimiter else 0


def priority_for(role: Role | None, selectable: bool) -> Priority:
    """A new folder's priority: Inbox hi, the rest lo; a folder that cannot hold mail off."""
    if not selectable:
        return Priority.OFF
    return Priority.HI if role is Role.INBOX else Priority.LO


def record_listing(conn: psycopg.Connection, acntid: int, listed: list[Listed],
                   special_use: bool) -> list[Folder]:
    """Store what LIST returned: folders added or updated with a priority from their role
    (``priority``; the user's own choice lives in ``user_priority`` and is never
    touched), folders no longer listed marked gone (``gone_at``), not dropped.
    Returns the account's folders now listed.
    """
    roles = assign_roles(listed, special_use)
    with conn.transaction():
        for item in listed:
            role = roles.get(item.server_name)
            conn.execute(
                "INSERT INTO email_folders (acntid, server_name, display_name, delimiter, role,"
                " priority) VALUES (%s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (acntid, server_name) DO UPDATE SET"
                " display_name = EXCLUDED.display_name, delimiter = EXCLUDED.delimiter,"
                " role = EXCLUDED.role, priority = EXCLUDED.priority, gone_at = NULL",
                (acntid, item.server_name, decode_name(item.server_name.encode("utf-8")),
                 item.delimiter, role and role.value,
                 priority_for(role, item.selectable).value))
        conn.execute("UPDATE email_folders SET gone_at = now() WHERE acntid = %s"
                     " AND gone_at IS NULL AND NOT (server_name = ANY(%s))",
                     (acntid, [item.server_name for item in listed]))
    return listing(conn, acntid)


def listing(conn: psycopg.Connection, acntid: int, include_gone: bool = False) -> list[Folder]:
    """The account's folders, Inbox first, then by name."""
    gone = "" if include_gone else " AND gone_at IS NULL"
    with conn.cursor(row_factory=class_row(Folder)) as cur:
        return cur.execute(f"SELECT {_COLUMNS} FROM email_folders WHERE acntid = %s{gone}"
                           " ORDER BY role IS DISTINCT FROM 'inbox', server_name",
                           (acntid,)).fetchall()


def get(conn: psycopg.Connection, emfdid: int) -> Folder:
    with conn.cursor(row_factory=class_row(Folder)) as cur:
        folder = cur.execute(f"SELECT {_COLUMNS} FROM email_folders WHERE emfdid = %s",
                             (emfdid,)).fetchone()
    if folder is None:
        raise NotFoundError(f"no folder {emfdid}")
    return folder


def find(folders: Iterable[Folder], name: str) -> Folder:
    """The folder named ``name`` as the server spells it or as people read it (any case)."""
    folders = list(folders)
    for test in (lambda f: f.server_name == name, lambda f: f.display_name == name,
                 lambda f: f.display_name.lower() == name.lower()):
        found = [f for f in folders if test(f)]
        if len(found) == 1:
            return found[0]
    names = ", ".join(f.display_name for f in folders) or "none"
    raise NotFoundError(f"no folder {name!r} on this account; folders: {names}")


def lock_cursor(conn: psycopg.Connection, emfdid: int) -> tuple[int | None, int]:
    """(uidvalidity, last_uid), the row locked until the transaction ends: writers of one
    folder take turns, and each sees the cursor the previous one committed.
    """
    row = conn.execute("SELECT uidvalidity, last_uid FROM email_folders WHERE emfdid = %s"
                       " FOR UPDATE", (emfdid,)).fetchone()
    if row is None:
        raise NotFoundError(f"folder {emfdid} was removed during its sync")
    return row[0], row[1]


def advance(conn: psycopg.Connection, emfdid: int, last_uid: int) -> None:
    conn.execute("UPDATE email_folders SET last_uid = greatest(last_uid, %s) WHERE emfdid = %s",
                 (last_uid, emfdid))


def start_uidvalidity(conn: psycopg.Connection, emfdid: int, uidvalidity: int) -> None:
    """A new UIDVALIDITY (first sync, or the mailbox was recreated): the cursor starts over."""
    conn.execute("UPDATE email_folders SET uidvalidity = %s, last_uid = 0, highestmodseq = NULL"
                 " WHERE emfdid = %s", (uidvalidity, emfdid))


def finish(conn: psycopg.Connection, emfdid: int, full: bool,
           highestmodseq: int | None = None) -> None:
    """Record a completed sync (a full one also records the HIGHESTMODSEQ reconciled)."""
    if full:
        conn.execute("UPDATE email_folders SET last_full_sync = now(), last_recent_sync = now(),"
                     " highestmodseq = %s, last_error = NULL, last_error_at = NULL"
                     " WHERE emfdid = %s", (highestmodseq, emfdid))
    else:
        conn.execute("UPDATE email_folders SET last_recent_sync = now(), last_error = NULL,"
                     " last_error_at = NULL WHERE emfdid = %s", (emfdid,))


def record_error(conn: psycopg.Connection, emfdid: int, message: str) -> None:
    conn.execute("UPDATE email_folders SET last_error = %s, last_error_at = now()"
                 " WHERE emfdid = %s", (message, emfdid))


def mark_gone(conn: psycopg.Connection, emfdid: int) -> None:
    conn.execute("UPDATE email_folders SET gone_at = now() WHERE emfdid = %s AND gone_at IS NULL",
                 (emfdid,))
