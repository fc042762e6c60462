"""Fetching new messages: what EXAMINE said, batches planned by count and bytes, and one
batch's FETCH turned into rows, with what a server cannot deliver recorded, not fatal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from supervisor_mail import headers, imap_wire
from supervisor_mail.config import Config
from supervisor_mail.errors import ProtocolError
from supervisor_mail.messages import Fetched

_CODE = re.compile(rb"\[(UIDVALIDITY|UIDNEXT|HIGHESTMODSEQ) (\d+)\]", re.IGNORECASE)
_MONTHS = {m: i for i, m in enumerate(
    (b"JAN", b"FEB", b"MAR", b"APR", b"MAY", b"JUN", b"JUL", b"AUG", b"SEP", b"OCT", b"NOV",
     b"DEC"), start=1)}
_INTERNALDATE = re.compile(
    rb" ?(\d{1,2})-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)")


@dataclass
class FolderState:
    """What EXAMINE reported about a mailbox."""

    uidvalidity: int | None = None
    uidnext: int | None = None
    exists: int | None = None
    highestmodseq: int | None = None

    def collect(self, kind: bytes, data: object) -> None:
        """An ``imap_wire`` handler for the EXAMINE answer."""
        if kind == b"OK" and isinstance(data, bytes):
            for name, value in _CODE.findall(data):
                setattr(self, name.decode().lower(), int(value))
        elif kind == b"EXISTS":
            self.exists = data

    def checked(self, mailbox: str) -> FolderState:
        if self.uidvalidity is None:
            raise ProtocolError(f"EXAMINE {mailbox}: the server sent no UIDVALIDITY")
        return self

    def has_new(self, last_uid: int) -> bool:
        """Whether messages above ``last_uid`` may exist (UIDNEXT says so cheaply)."""
        if self.exists == 0:
            return False
        return self.uidnext is None or self.uidnext > last_uid + 1


@dataclass(frozen=True)
class Plan:
    """One FETCH: UIDs with their announced sizes; ``headers_only`` for an oversize message."""

    uids: tuple[int, ...]
    sizes: tuple[int, ...]
    headers_only: bool = False

    @property
    def last_uid(self) -> int:
        return self.uids[-1]

    @property
    def bytes(self) -> int:
        return sum(self.sizes)


def plan_batches(sizes: list[tuple[int, int]], max_count: int, max_bytes: int,
                 max_message_size: int) -> list[Plan]:
    """Consecutive (uid, size) pairs in batches of at most ``max_count`` messages and
    ``max_bytes`` bytes (a message bigger than that alone); a message over
    ``max_message_size`` alone, headers only."""
    plans: list[Plan] = []
    uids: list[int] = []
    lengths: list[int] = []
    for uid, size in sizes:
        if size > max_message_size:
            if uids:
                plans.append(Plan(tuple(uids), tuple(lengths)))
                uids, lengths = [], []
            plans.append(Plan((uid,), (size,), headers_only=True))
            continue
        if uids and (len(uids) >= max_count or sum(lengths) + size > max_bytes):
            plans.append(Plan(tuple(uids), tuple(lengths)))
            uids, lengths = [], []
        uids.append(uid)
        lengths.append(size)
    if uids:
        plans.append(Plan(tuple(uids), tuple(lengths)))
    return plans


def uid_set(uids: list[int] | tuple[int, ...]) -> bytes:
    """Ascending UIDs as a compact IMAP set: ``[1, 2, 3, 7]`` -> ``b"1:3,7"``."""
    parts, start, prev = [], None, None
    for uid in uids:
        if start is None:
            start = prev = uid
        elif uid == prev + 1:
            prev = uid
        else:
            parts.append(b"%d" % start if start == prev else b"%d:%d" % (start, prev))
            start = prev = uid
    if start is not None:
        parts.append(b"%d" % start if start == prev else b"%d:%d" % (start, prev))
    return b",".join(parts)


def parse_uid_set(value: object) -> set[int]:
    """``b"1:3,7"`` (or a lone int) as ``{1, 2, 3, 7}``; ``*`` is not allowed here."""
    if isinstance(value, int):
        return {value}
    out: set[int] = set()
    try:
        for part in bytes(value).split(b","):
            low, _, high = part.partition(b":")
            low_n, high_n = int(low), int(high or low)
            out.update(range(min(low_n, high_n), max(low_n, high_n) + 1))
    except (TypeError, ValueError):
        raise ProtocolError(f"bad UID set from the server: {value!r}") from None
    return out


def parse_internaldate(value: object) -> datetime | None:
    """``b"17-Jul-1996 02:44:25 -0700"`` as an aware datetime; None when malformed."""
    match = _INTERNALDATE.fullmatch(value) if isinstance(value, bytes) else None
    if not match or match[2].upper() not in _MONTHS:
        return None
    offset = timedelta(hours=int(match[8]), minutes=int(match[9]))
    try:
        return datetime(int(match[3]), _MONTHS[match[2].upper()], int(match[1]), int(match[4]),
                        int(match[5]), int(match[6]),
                        tzinfo=timezone(-offset if match[7] == b"-" else offset))
    except ValueError:
        return None


def flag_names(flags: tuple) -> list[str]:
    """Flags as stored: text, sorted, without the per-session ``\\Recent``."""
    names = {imap_wire.text(f) if isinstance(f, bytes) else str(f) for f in flags}
    names.discard("\\Recent")
    return sorted(names)


def fetch_batch(session, plan: Plan, cfg: Config) -> list[Fetched]:
    """FETCH one planned batch (``BODY.PEEK[]``: never sets \\Seen) and make its rows.

    A UID the server no longer has (expunged since it was listed) gives no row.
    When the server answers NO, the messages it did not deliver are fetched one
    by one, and one it still cannot deliver is recorded with the server's reason,
    so it never blocks the folder.
    """
    key = b"BODY[HEADER]" if plan.headers_only else b"BODY[]"
    got, status, text = _fetch(session, plan, cfg, key)
    out = []
    for uid, size in zip(plan.uids, plan.sizes, strict=True):
        data = got.get(uid, {})
        if data.get(key) is not None:
            out.append(_message(uid, size, data, key, plan.headers_only, cfg))
        elif status != b"OK" and len(plan.uids) > 1:
            out.extend(fetch_batch(session, Plan((uid,), (size,), plan.headers_only), cfg))
        elif status != b"OK":
            out.append(undeliverable(uid, size, "the server could not deliver it: "
                                     + imap_wire.text(text)))
    return out


def undeliverable(uid: int, size: int, reason: str) -> Fetched:
    """The row of a message the server will not send: its UID, size and why, nothing else."""
    return Fetched(uid, [], None, size, None, None, headers.Headers(), reason, undelivered=True)


def _fetch(session, plan: Plan, cfg: Config, key: bytes) -> tuple[dict, bytes, bytes]:
    items = b"UID FLAGS INTERNALDATE RFC822.SIZE "
    items += b"BODY.PEEK[HEADER]" if plan.headers_only else b"BODY.PEEK[]"
    if session.condstore:
        items += b" MODSEQ"
    wanted = set(plan.uids)
    got: dict[int, dict] = {}
    # Memory stays bounded whatever the server sends: each literal is capped by the
    # reader, and the batch as a whole by what the server announced plus one message.
    budget = [plan.bytes + cfg.sync.max_message_size]

    def on_fetch(kind: bytes, data: object) -> None:
        if kind != b"FETCH" or data.get(b"UID") not in wanted:
            return  # an unsolicited update about another message
        body = data.get(key)
        if isinstance(body, bytes):
            budget[0] -= len(body)
            if budget[0] < 0:
                raise ProtocolError(f"the server sent more than the {plan.bytes} bytes it "
                                    f"announced for UIDs {uid_set(plan.uids).decode()}")
        got.setdefault(data[b"UID"], {}).update(data)

    command = b"UID FETCH " + uid_set(plan.uids) + b" (" + items + b")"
    status, text = session.execute(command, on_fetch, literal_cap=cfg.sync.max_message_size)
    return got, status, text


def _message(uid: int, size: int, data: dict, key: bytes, headers_only: bool,
             cfg: Config) -> Fetched:
    body = data[key]
    size = data.get(b"RFC822.SIZE") if isinstance(data.get(b"RFC822.SIZE"), int) else size
    modseq = data.get(b"MODSEQ") if isinstance(data.get(b"MODSEQ"), int) else None
    limit = cfg.sync.max_message_size
    reason, raw = None, body
    if isinstance(body, imap_wire.Dropped):
        reason, raw = f"the server sent {body.size} bytes, over sync.max_message_size {limit}", None
        body = b""
    elif not isinstance(body, bytes):
        raise ProtocolError(f"UID {uid}: {key.decode()} is not a string: {body!r}")
    elif headers_only:
        reason, raw = f"{size} bytes, over sync.max_message_size {limit}: headers only", None
    return Fetched(uid, flag_names(data.get(b"FLAGS", ())),
                   parse_internaldate(data.get(b"INTERNALDATE")), size, modseq, raw,
                   headers.parse(body), reason)
