"""What the cluster tests and ``bench/scale_out.py`` check on engines sharing one database,
from both sides:

- the IMAP server's own log: the sessions of each user, from its login to its
  disconnection, in the order the server wrote them; two that overlap mean two IMAP
  sessions on one account at once (``sessions``, ``overlapping_users``);
- the engine's records: each committed sync batch with the host and lease generation
  it committed under (``email_sync_batches``); the batches of one account under two
  holders at overlapping times mean two hosts synchronized it at once
  (``commit_windows``, ``double_committed``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import psycopg

from supervisor_mail.embedded.imap import ImapServer

# Dovecot: imap-login logs the login with the session id, the imap process its end.
_DOVECOT_LOGIN = re.compile(r" imap-login: Info: Login: user=<(?P<user>[^>]*)>.*"
                            r"session=<(?P<key>[^>]*)>")
_DOVECOT_END = re.compile(r" imap\((?P<user>[^)]*)\)<\d+><(?P<key>[^>]*)>: Info: "
                          r"(?:Disconnected|Logged out|Connection closed)")
# pymap --debug: every line a client sends, and the end of each connection.
_PYMAP_LOGIN = re.compile(r'^DEBUG:pymap\.imap:(?P<key>\w+) -->\| \S+ LOGIN '
                          r'(?P<user>"(?:[^"\\]|\\.)*"|[^\s"{]+)', re.IGNORECASE)
_PYMAP_END = re.compile(r"^DEBUG:pymap\.imap:(?P<key>\w+) ---\| <disconnected>")


@dataclass(frozen=True)
class Session:
    """One logged-in IMAP session as the server logged it; lines count from 0."""

    user: str
    key: str          # the server's session (Dovecot) or connection (pymap) id
    start: int        # the line of its login
    end: int | None   # the line of its end; None while it is open


def sessions(server: ImapServer) -> list[Session]:
    """Every logged-in session in the server's log so far, in login order.

    Dovecot's processes log through its log service, which may write a short session's
    end (from the imap process) before its login (from imap-login); such a session
    spans both lines, whichever comes first."""
    login, end = ((_DOVECOT_LOGIN, _DOVECOT_END) if server.name == "dovecot"
                  else (_PYMAP_LOGIN, _PYMAP_END))
    started: dict[str, tuple[str, int]] = {}
    ended: dict[str, int] = {}
    for n, line in enumerate(server.log_path.read_text(errors="replace").splitlines()):
        if match := login.search(line):
            started[match["key"]] = (match["user"].strip('"'), n)
        elif match := end.search(line):
            ended.setdefault(match["key"], n)
    found = []
    for key, (user, start) in started.items():
        stop = ended.get(key)
        found.append(Session(user, key, start if stop is None else min(start, stop),
                             None if stop is None else max(start, stop)))
    return sorted(found, key=lambda s: s.start)


def overlapping_users(found: list[Session], users: set[str] | None = None) -> set[str]:
    """The users (of ``users``, or all) with a session that logged in before another of
    theirs had ended."""
    open_until: dict[str, float] = {}
    overlapping = set()
    for s in found:  # in login order
        if users is not None and s.user not in users:
            continue
        if s.start < open_until.get(s.user, -1):
            overlapping.add(s.user)
        end = float("inf") if s.end is None else s.end
        open_until[s.user] = max(open_until.get(s.user, -1), end)
    return overlapping


@dataclass(frozen=True)
class Window:
    """The batches one holder (host and generation) committed for one account."""

    acntid: int
    host_id: str
    generation: int
    first: float      # epoch seconds, the database's clock
    last: float
    batches: int
    messages: int


def commit_windows(conn: psycopg.Connection) -> list[Window]:
    """Every (account, host, generation) that committed batches, by account and time."""
    rows = conn.execute(
        "SELECT acntid, host_id, generation, date_part('epoch', min(committed_at)),"
        " date_part('epoch', max(committed_at)), count(*), sum(messages)"
        " FROM email_sync_batches GROUP BY 1, 2, 3 ORDER BY 1, 4").fetchall()
    return [Window(*row) for row in rows]


def double_committed(windows: list[Window]) -> set[int]:
    """Accounts for which two holders' commits overlap in time, or an older generation
    committed after a newer one."""
    bad = set()
    previous: dict[int, Window] = {}
    for w in windows:  # by account, then first commit
        before = previous.get(w.acntid)
        if before is not None and (w.first <= before.last or w.generation <= before.generation):
            bad.add(w.acntid)
        if before is None or w.last > before.last:
            previous[w.acntid] = w
    return bad


def stored_twice(conn: psycopg.Connection) -> int:
    """Messages stored more than once: the same Message-ID twice in one folder."""
    return conn.execute("SELECT coalesce(sum(n - 1), 0) FROM (SELECT count(*) AS n"
                        " FROM email_messages WHERE retired_at IS NULL"
                        " GROUP BY emfdid, message_id) c").fetchone()[0]
