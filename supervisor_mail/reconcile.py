"""The second half of a full sync: flags and expunges of the messages already stored.

With CONDSTORE (RFC 7162) only what changed since the HIGHESTMODSEQ last
reconciled is fetched, and nothing at all when it has not moved; with QRESYNC the
server also names the expunged UIDs (VANISHED), with CONDSTORE alone they are the
stored UIDs that UID SEARCH no longer finds. Without either, UIDs and FLAGS are
compared in chunks. Expunged messages are marked ``deleted_at``, never removed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import psycopg

from supervisor_mail import cluster, folders, imap_wire, messages
from supervisor_mail.errors import DatabaseError, ServerError
from supervisor_mail.fetching import FolderState, flag_names, parse_uid_set

CHUNK = 5000  # stored UIDs compared per FETCH (UID FLAGS) without CONDSTORE


@dataclass
class Reconcile:
    """Reconciles the UIDs up to ``upto`` (those stored before this sync began)."""

    conn: psycopg.Connection
    session: object  # imap_sync.AccountSession
    emfdid: int
    state: FolderState
    upto: int
    beat: Callable[[str, int], None]
    changed: int = 0
    expunged: int = 0

    def run(self) -> tuple[int, int]:
        """Returns (messages whose flags changed, messages marked expunged)."""
        if self.upto == 0:
            return 0, 0  # everything in the folder was fetched just now
        known = self.conn.execute("SELECT highestmodseq FROM email_folders WHERE emfdid = %s",
                                  (self.emfdid,)).fetchone()[0]
        if self.session.condstore and self.state.highestmodseq and known is not None:
            if self.state.highestmodseq != known:
                self._changed_since(known)
        else:
            self._compare_all()
        return self.changed, self.expunged

    def _changed_since(self, modseq: int) -> None:
        changes, vanished = [], set()
        modifier = b"CHANGEDSINCE %d%s" % (modseq, b" VANISHED" if self.session.qresync else b"")

        def on_response(kind: bytes, data: object) -> None:
            if kind == b"FETCH" and isinstance(data.get(b"UID"), int):
                if data[b"UID"] <= self.upto and b"FLAGS" in data:
                    modseq = data.get(b"MODSEQ")
                    changes.append((data[b"UID"], flag_names(data[b"FLAGS"]),
                                    modseq if isinstance(modseq, int) else None))
            elif kind == b"VANISHED" and data:
                vanished.update(parse_uid_set(data[-1]))

        self._ok(b"UID FETCH 1:%d (UID FLAGS) (%s)" % (self.upto, modifier), on_response)
        if not self.session.qresync:
            vanished = set(self._stored(self.upto)) - self._server_uids()
        self.beat("flags", len(changes))
        self._write(changes, vanished)

    def _compare_all(self) -> None:
        stored = self._stored(self.upto)
        for start in range(0, len(stored), CHUNK):
            self.beat("flags", start)
            chunk = stored[start:start + CHUNK]
            on_server: dict[int, list[str]] = {}

            def on_response(kind: bytes, data: object, on_server=on_server) -> None:
                if kind == b"FETCH" and isinstance(data.get(b"UID"), int) and b"FLAGS" in data:
                    on_server[data[b"UID"]] = flag_names(data[b"FLAGS"])

            self._ok(b"UID FETCH %d:%d (UID FLAGS)" % (chunk[0], chunk[-1]), on_response)
            mine = messages.live_flags(self.conn, self.emfdid, self.state.uidvalidity, chunk)
            changes = [(uid, flags, None) for uid, flags in on_server.items()
                       if uid in mine and mine[uid] != flags]
            self._write(changes, set(chunk) - set(on_server))

    def _server_uids(self) -> set[int]:
        found: set[int] = set()
        esearch = b"ESEARCH" in self.session.capabilities

        def on_response(kind: bytes, data: object) -> None:
            if kind == b"SEARCH":
                found.update(n for n in data if isinstance(n, int))
            elif kind == b"ESEARCH" and b"ALL" in data[:-1]:
                found.update(parse_uid_set(data[data.index(b"ALL") + 1]))

        returns = b"RETURN (ALL) " if esearch else b""
        self._ok(b"UID SEARCH %sUID 1:%d" % (returns, self.upto), on_response)
        return found

    def _stored(self, upto: int) -> list[int]:
        return messages.live_uids(self.conn, self.emfdid, self.state.uidvalidity, upto)

    def _ok(self, command: bytes, on_response: imap_wire.Handler) -> None:
        status, text = self.session.execute(command, on_response)
        if status != b"OK":
            raise ServerError(f"{command.split(b' (')[0].decode()} failed: "
                              f"{imap_wire.text(text)}")

    def _write(self, changes: list, vanished: set[int]) -> None:
        if not changes and not vanished:
            return
        with cluster.fenced(self.conn, self.session.fence,
                         f"flag changes of folder {self.emfdid}"):
            validity, _ = folders.lock_cursor(self.conn, self.emfdid)
            if validity != self.state.uidvalidity:
                raise DatabaseError(f"folder {self.emfdid} was reset during its full sync")
            self.changed += messages.set_flags(self.conn, self.emfdid, validity, changes)
            self.expunged += messages.mark_deleted(self.conn, self.emfdid, validity,
                                                   sorted(vanished))

