"""The ``email_messages`` table: messages keyed by (folder, UIDVALIDITY, UID), stored
byte-exact with their listed headers beside them.

New messages go in with binary COPY (measured faster than batched INSERT: see
README "Performance"); callers hold the folder's cursor row lock, so a batch is
written once whatever crashes in between. Rows are never removed by a sync:
an expunged message gets ``deleted_at``, a message of a replaced UIDVALIDITY
``retired_at``, so whatever the web application references stays readable.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

import psycopg

from supervisor_mail.headers import Headers


@dataclass
class Fetched:
    """One message as the server returned it. ``raw`` is None when only the headers were
    kept, and ``skipped_reason`` then says why; ``undelivered`` when the server sent
    nothing of it (a full sync asks for it again)."""

    uid: int
    flags: list[str]
    internaldate: datetime | None
    size: int
    modseq: int | None
    raw: bytes | None
    headers: Headers
    skipped_reason: str | None = None
    undelivered: bool = False


COLUMNS = ("emfdid", "uidvalidity", "uid", "message_id", "subject", "from_addr", "to_addrs",
           "cc_addrs", "sent_date", "internaldate", "size", "flags", "modseq", "headers", "raw",
           "skipped_reason", "undelivered")
_COPY_TYPES = ("int8", "int8", "int8", "text", "text", "text", "text", "text", "timestamptz",
               "timestamptz", "int8", "text[]", "int8", "text", "bytea", "text", "bool")
_COPY = f"COPY email_messages ({', '.join(COLUMNS)}) FROM STDIN (FORMAT BINARY)"


def row(emfdid: int, uidvalidity: int, m: Fetched) -> tuple:
    """The values of ``COLUMNS`` for one message."""
    h = m.headers
    return (emfdid, uidvalidity, m.uid, h.message_id, h.subject, h.from_addr, h.to_addrs,
            h.cc_addrs, h.sent_date, m.internaldate, m.size, m.flags, m.modseq, h.block, m.raw,
            m.skipped_reason, m.undelivered)


def copy_new(conn: psycopg.Connection, emfdid: int, uidvalidity: int,
             batch: Sequence[Fetched]) -> None:
    """Insert new messages with one binary COPY."""
    if not batch:
        return
    with conn.cursor() as cur, cur.copy(_COPY) as copy:
        copy.set_types(_COPY_TYPES)
        for message in batch:
            copy.write_row(row(emfdid, uidvalidity, message))


def has_retired(conn: psycopg.Connection, emfdid: int) -> bool:
    """Whether the folder keeps rows of a replaced UIDVALIDITY that new messages may take over."""
    return conn.execute("SELECT EXISTS (SELECT 1 FROM email_messages WHERE emfdid = %s"
                        " AND retired_at IS NOT NULL AND deleted_at IS NULL"
                        " AND message_id IS NOT NULL)", (emfdid,)).fetchone()[0]


def retire(conn: psycopg.Connection, emfdid: int, uidvalidity: int) -> int:
    """Retire the folder's live rows of any other UIDVALIDITY; returns how many."""
    return conn.execute("UPDATE email_messages SET retired_at = now() WHERE emfdid = %s"
                        " AND uidvalidity <> %s AND retired_at IS NULL AND deleted_at IS NULL",
                        (emfdid, uidvalidity)).rowcount


def adopt_retired(conn: psycopg.Connection, emfdid: int, uidvalidity: int,
                  batch: Sequence[Fetched]) -> list[Fetched]:
    """Give messages that reappeared after a UIDVALIDITY change their old rows back.

    A retired row with the same Message-ID and size takes the new UID, flags and
    bytes, and keeps its ``emsgid``, so the web application's references still
    point at it. Returns the messages that matched no retired row.
    """
    ids = [m.headers.message_id for m in batch if m.headers.message_id]
    if not ids:
        return list(batch)
    waiting: dict[tuple[str, int], list[int]] = defaultdict(list)
    for emsgid, message_id, size in conn.execute(
            "SELECT emsgid, message_id, size FROM email_messages WHERE emfdid = %s"
            " AND retired_at IS NOT NULL AND deleted_at IS NULL AND message_id = ANY(%s)"
            " ORDER BY emsgid", (emfdid, ids)):
        waiting[(message_id, size)].append(emsgid)
    rest, adopted = [], []
    for m in batch:
        rows = waiting.get((m.headers.message_id, m.size))
        if rows:
            adopted.append((uidvalidity, m.uid, m.flags, m.modseq, m.internaldate, m.raw,
                            m.skipped_reason, m.undelivered, rows.pop(0)))
        else:
            rest.append(m)
    with conn.cursor() as cur:
        cur.executemany("UPDATE email_messages SET uidvalidity = %s, uid = %s, flags = %s,"
                        " modseq = %s, internaldate = %s, raw = %s, skipped_reason = %s,"
                        " undelivered = %s, retired_at = NULL WHERE emsgid = %s", adopted)
    return rest


def undelivered(conn: psycopg.Connection, emfdid: int, uidvalidity: int) -> list[tuple[int, int]]:
    """(uid, size) of the folder's live messages the server could not deliver, ascending."""
    return conn.execute(
        "SELECT uid, size FROM email_messages WHERE emfdid = %s AND uidvalidity = %s"
        " AND undelivered AND deleted_at IS NULL ORDER BY uid", (emfdid, uidvalidity)).fetchall()


def deliver_late(conn: psycopg.Connection, emfdid: int, uidvalidity: int,
                 fetched: Sequence[Fetched]) -> int:
    """Fill in the rows of messages the server could not deliver before with what it
    sent now (those it sent, still undelivered rows only); returns how many."""
    names = COLUMNS[3:]  # all but the key (emfdid, uidvalidity, uid)
    sent = [m for m in fetched if not m.undelivered]
    with conn.cursor() as cur:
        cur.executemany(
            f"UPDATE email_messages SET ({', '.join(names)}) = "
            f"({', '.join(['%s'] * len(names))}) WHERE emfdid = %s AND uidvalidity = %s"
            " AND uid = %s AND undelivered AND deleted_at IS NULL",
            [(*row(emfdid, uidvalidity, m)[3:], emfdid, uidvalidity, m.uid) for m in sent])
    return len(sent)


def live_uids(conn: psycopg.Connection, emfdid: int, uidvalidity: int, upto: int) -> list[int]:
    """UIDs of the folder's messages not known to be expunged, up to ``upto``, ascending."""
    return [uid for (uid,) in conn.execute(
        "SELECT uid FROM email_messages WHERE emfdid = %s AND uidvalidity = %s AND uid <= %s"
        " AND deleted_at IS NULL ORDER BY uid", (emfdid, uidvalidity, upto))]


def live_flags(conn: psycopg.Connection, emfdid: int, uidvalidity: int,
               uids: Iterable[int]) -> dict[int, list[str]]:
    """Stored flags of live messages, by UID."""
    return dict(conn.execute(
        "SELECT uid, flags FROM email_messages WHERE emfdid = %s AND uidvalidity = %s"
        " AND uid = ANY(%s) AND deleted_at IS NULL", (emfdid, uidvalidity, list(uids))))


def set_flags(conn: psycopg.Connection, emfdid: int, uidvalidity: int,
              changes: Sequence[tuple[int, list[str], int | None]]) -> int:
    """Store (uid, flags, modseq) for live messages whose flags differ; returns how many."""
    if not changes:
        return 0
    return conn.execute(
        "UPDATE email_messages m SET flags = string_to_array(c.flags, ' '),"
        " modseq = coalesce(c.modseq, m.modseq)"
        " FROM unnest(%s::bigint[], %s::text[], %s::bigint[]) AS c(uid, flags, modseq)"
        " WHERE m.emfdid = %s AND m.uidvalidity = %s AND m.uid = c.uid"
        " AND m.deleted_at IS NULL AND m.flags IS DISTINCT FROM string_to_array(c.flags, ' ')",
        ([c[0] for c in changes], [" ".join(c[1]) for c in changes], [c[2] for c in changes],
         emfdid, uidvalidity)).rowcount


def mark_deleted(conn: psycopg.Connection, emfdid: int, uidvalidity: int,
                 uids: Iterable[int]) -> int:
    """Mark messages expunged on the server; returns how many were live."""
    uids = list(uids)
    if not uids:
        return 0
    return conn.execute("UPDATE email_messages SET deleted_at = now() WHERE emfdid = %s"
                        " AND uidvalidity = %s AND uid = ANY(%s) AND deleted_at IS NULL",
                        (emfdid, uidvalidity, uids)).rowcount
