"""The copy of a sent message in the account's Sent folder on the IMAP server.

    folder = SentFolder(cfg, account)        # logged in, Sent found (or created)
    filed = folder.append(outgoing)          # Filed(folder='Sent', uidvalidity=7, uid=42)
    filed.link(conn, acntid, outgoing.data)  # -> (emfdid, uid) of the local copy

The Sent mailbox is the one flagged ``\\Sent`` (RFC 6154 SPECIAL-USE), else the
first of the well-known names (Sent, Sent Items, Sent Messages), else a new
``Sent``. The copy's UID comes from APPENDUID where the server has UIDPLUS, else
from a search for its Message-ID; ``link`` stores the local row under that UID,
so the next sync of Sent finds it already there and does not store it twice.
Every failure is a ``ServerError``: the caller logs it, and never sends again.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass

import imapclient
import psycopg
from imapclient.exceptions import IMAPClientError

from supervisor_mail import imap_client
from supervisor_mail.accounts import Account
from supervisor_mail.compose import Outgoing
from supervisor_mail.config import Config
from supervisor_mail.errors import NetworkError, ServerError

NEW_SENT_NAME = "Sent"
_APPENDUID = re.compile(rb"\[APPENDUID (\d+) (\d+)\]", re.IGNORECASE)


@dataclass(frozen=True)
class Filed:
    """Where the copy is on the server: mailbox name as the server spells it, UIDVALIDITY, UID."""

    folder: str
    uidvalidity: int | None
    uid: int | None

    def link(self, conn: psycopg.Connection, acntid: int,
             data: bytes | None = None) -> tuple[int | None, int | None]:
        """The local Sent folder and UID for the outbox row, storing the copy when given.

        The copy is stored only when the local folder already has this UIDVALIDITY:
        otherwise the sync has not met the folder yet and will store it itself.
        """
        folder = conn.execute("SELECT emfdid, uidvalidity FROM email_folders "
                              "WHERE acntid = %s AND server_name = %s",
                              (acntid, self.folder)).fetchone()
        if folder is None:
            return None, None
        emfdid, uidvalidity = folder
        if self.uid is None or uidvalidity != self.uidvalidity:
            return emfdid, None
        if data is not None:
            store_copy(conn, emfdid, uidvalidity, self.uid, data)
        return emfdid, self.uid


def store_copy(conn: psycopg.Connection, emfdid: int, uidvalidity: int, uid: int,
               data: bytes) -> None:
    """Insert the local row of our own APPEND; a row the sync stored first is kept."""
    from supervisor_mail import imap_sync  # the sync's parsing, so both rows look alike

    imap_sync.store_own_message(conn, emfdid, uidvalidity, uid, data, [r"\Seen"])


class SentFolder:
    """An IMAP session on one account's Sent mailbox, reused for its consecutive messages."""

    def __init__(self, cfg: Config, account: Account):
        self.key = self.key_of(account)
        self.client = imap_client.connect(cfg, account)
        try:
            self.folder = self._sent_name()
            self.uidplus = self.client.has_capability("UIDPLUS")
        except BaseException:
            imap_client.close(self.client)
            raise

    @staticmethod
    def key_of(account: Account) -> tuple:
        """What the session depends on: a change of any of these opens a new one."""
        return (account.acntid, account.imap_host, account.imap_port, account.imap_security,
                account.imap_login, account.imap_password)

    def _sent_name(self) -> str:
        with _errors("looking for the Sent folder"):
            name = self.client.find_special_folder(imapclient.SENT)
            if name is None:
                self.client.create_folder(NEW_SENT_NAME)
                name = NEW_SENT_NAME
        return name.decode("ascii") if isinstance(name, bytes) else name

    def append(self, out: Outgoing) -> Filed:
        """APPEND with \\Seen; the copy's UID from APPENDUID, else from its Message-ID."""
        with _errors(f"filing {out.message_id} in {self.folder}"):
            response = self.client.append(self.folder, out.data, flags=[imapclient.SEEN])
            match = _APPENDUID.search(response or b"") if self.uidplus else None
            if match:
                return Filed(self.folder, int(match[1]), int(match[2]))
        return self.find(out.message_id) or Filed(self.folder, None, None)

    def find(self, message_id: str) -> Filed | None:
        """The copy with this Message-ID in Sent (the newest if several), or None."""
        with _errors(f"searching {self.folder} for {message_id}"):
            status = self.client.select_folder(self.folder, readonly=True)
            uids = self.client.search(["HEADER", "Message-ID", message_id])
        if not uids:
            return None
        return Filed(self.folder, status.get(b"UIDVALIDITY"), max(uids))

    def close(self) -> None:
        imap_client.close(self.client)


class _errors:
    """Turn what imapclient and sockets raise into one ``ServerError`` line naming the step."""

    def __init__(self, doing: str):
        self.doing = doing

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: object) -> bool:
        if exc is None:
            return False
        if isinstance(exc, (socket.timeout, OSError, imapclient.exceptions.IMAPClientAbortError)):
            raise NetworkError(f"IMAP {self.doing}: {exc or 'timed out'}") from None
        if isinstance(exc, IMAPClientError):
            raise ServerError(f"IMAP {self.doing}: {' '.join(str(exc).split())}") from None
        return False
