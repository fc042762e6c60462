"""The copy of a sent message in the account's Sent folder on the IMAP server.

    folder = SentFolder(cfg, account)       # logged in, Sent found (or created)
    filed = folder.append(outgoing)         # Filed(folder='Sent', uidvalidity=7, uid=42)
    record(conn, acntid, filed, folder)     # -> (emfdid, uid) of the local Sent folder

The Sent mailbox is the one flagged ``\\Sent`` (RFC 6154 SPECIAL-USE), else the
one with a well-known name (Sent, Sent Items, ...), chosen by the same rules as the
sync's roles, else a new ``Sent``. The copy's UID comes from APPENDUID where the
server has UIDPLUS, else from a search for its Message-ID.

The sync stores a folder's messages above its cursor and advances the cursor in
the same transaction (``imap_sync.store_batch``). ``record`` stores our copy the
same way — only when it is the next message the sync would store (nothing on the
server between the cursor and its UID), under the cursor's row lock — so the copy
shows in the local Sent folder at once and the next sync skips it; otherwise the
next sync stores it, once, like any other message. Every failure here is a
``ServerError``: the caller logs it, and never sends again.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass

import imapclient
import psycopg
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError

from supervisor_mail import folders, headers, imap_client, messages
from supervisor_mail.accounts import Account
from supervisor_mail.compose import Outgoing
from supervisor_mail.config import Config
from supervisor_mail.errors import NetworkError, ServerError
from supervisor_mail.fetching import flag_names
from supervisor_mail.imap_wire import text
from supervisor_mail.states import Role

NEW_SENT_NAME = "Sent"
_APPENDUID = re.compile(rb"\[APPENDUID (\d+) (\d+)\]", re.IGNORECASE)
_BODY = b"BODY[]"


@dataclass(frozen=True)
class Filed:
    """Where the copy is on the server: mailbox name as the server spells it, UIDVALIDITY, UID."""

    folder: str
    uidvalidity: int | None
    uid: int | None


class SentFolder:
    """An IMAP session on one account's Sent mailbox, reused for its consecutive messages."""

    def __init__(self, cfg: Config, account: Account):
        self.key = self.key_of(account)
        self.cfg = cfg
        self.client = imap_client.connect(cfg, account)
        self.client.normalise_times = False  # INTERNALDATE with its zone, as the sync stores it
        try:
            self.mailbox, self.folder = self._sent_name()
            self.uidplus = self.client.has_capability("UIDPLUS")
        except BaseException:
            imap_client.close(self.client)
            raise

    @staticmethod
    def key_of(account: Account) -> tuple:
        """What the session depends on: a change of any of these opens a new one."""
        return (account.acntid, account.imap_host, account.imap_port, account.imap_security,
                account.imap_login, account.imap_password)

    def _sent_name(self) -> tuple[bytes, str]:
        """The Sent mailbox by the sync's own rules (``folders.assign_roles``), so the copy
        goes where the local folder with role 'sent' comes from; created when missing."""
        with _errors("looking for the Sent folder"):
            answers = self.client.list_folders()
            listed = {text(name): name for _, _, name in answers}
            items = [folders.Listed(text(name), text(delimiter) if delimiter else None,
                                    tuple(flags)) for flags, delimiter, name in answers]
            special_use = self.client.has_capability("SPECIAL-USE")
            # A server with SPECIAL-USE but no \Sent mailbox may still have one by name.
            for by_attribute in dict.fromkeys((special_use, False)):
                roles = folders.assign_roles(items, by_attribute)
                for name, role in roles.items():
                    if role is Role.SENT:
                        return listed[name], name
            self.client.create_folder(NEW_SENT_NAME)
        return NEW_SENT_NAME.encode(), NEW_SENT_NAME

    def append(self, out: Outgoing) -> Filed:
        """APPEND with \\Seen; the copy's UID from APPENDUID, else from its Message-ID."""
        with _errors(f"filing {out.message_id} in {self.folder}"):
            response = self.client.append(self.mailbox, out.data, flags=[imapclient.SEEN])
        match = _APPENDUID.search(response or b"") if self.uidplus else None
        if match:
            return Filed(self.folder, int(match[1]), int(match[2]))
        return self.find(out.message_id) or Filed(self.folder, None, None)

    def find(self, message_id: str) -> Filed | None:
        """The copy with this Message-ID in Sent (the newest if several), or None."""
        with _errors(f"searching {self.folder} for {message_id}"):
            status = self.client.select_folder(self.mailbox, readonly=True)
            uids = self.client.search(["HEADER", "Message-ID", message_id])
        if not uids:
            return None
        return Filed(self.folder, status.get(b"UIDVALIDITY"), max(uids))

    def next_after(self, filed: Filed, cursor: int) -> messages.Fetched | None:
        """The copy as the sync would fetch it, when no message lies between ``cursor`` and it."""
        with _errors(f"reading back {filed.uid} in {self.folder}"):
            self.client.select_folder(self.mailbox, readonly=True)
            if cursor + 1 < filed.uid and self.client.search(
                    ["UID", f"{cursor + 1}:{filed.uid - 1}"]):
                return None
            data = self.client.fetch([filed.uid], ["FLAGS", "INTERNALDATE", "RFC822.SIZE",
                                                   "BODY.PEEK[]"]).get(filed.uid)
        if not data or not isinstance(data.get(_BODY), bytes):
            return None
        raw = data[_BODY]
        if len(raw) > self.cfg.sync.max_message_size:
            return None  # the sync stores it as headers only, with its reason
        return messages.Fetched(filed.uid, flag_names(data.get(b"FLAGS", ())),
                                data.get(b"INTERNALDATE"), data.get(b"RFC822.SIZE", len(raw)),
                                None, raw, headers.parse(raw))

    def close(self) -> None:
        imap_client.close(self.client)


def record(conn: psycopg.Connection, acntid: int, filed: Filed,
           session: SentFolder | None = None) -> tuple[int | None, int | None]:
    """The local Sent folder and UID to link the outbox row to, storing the local copy
    when ``session`` is given and the copy is the next message of the folder."""
    local = conn.execute("SELECT emfdid, uidvalidity, last_uid FROM email_folders "
                         "WHERE acntid = %s AND server_name = %s AND gone_at IS NULL",
                         (acntid, filed.folder)).fetchone()
    if local is None:
        return None, None  # the sync has not met this folder yet: it will store the copy
    emfdid, uidvalidity, cursor = local
    if filed.uid is None or uidvalidity != filed.uidvalidity:
        return emfdid, None
    if session is not None and cursor < filed.uid:
        copy = session.next_after(filed, cursor)
        if copy is not None:
            with conn.transaction():
                locked_validity, locked_cursor = folders.lock_cursor(conn, emfdid)
                # UIDs only grow: no message can have come between cursor and ours since.
                if locked_validity == uidvalidity and cursor <= locked_cursor < filed.uid:
                    messages.copy_new(conn, emfdid, uidvalidity, [copy])
                    folders.advance(conn, emfdid, filed.uid)
    return emfdid, filed.uid


class _errors:
    """Turn what imapclient and sockets raise into one ``ServerError`` line naming the step."""

    def __init__(self, doing: str):
        self.doing = doing

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: object) -> bool:
        if isinstance(exc, (socket.timeout, OSError, IMAPClientAbortError)):
            raise NetworkError(f"IMAP {self.doing}: {exc or 'timed out'}") from None
        if isinstance(exc, IMAPClientError):
            raise ServerError(f"IMAP {self.doing}: {' '.join(str(exc).split())}") from None
        return False
