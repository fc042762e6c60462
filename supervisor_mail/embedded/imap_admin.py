"""Arranging and inspecting an account's mail over IMAP, for tests and the demo.

``Mailbox`` is one logged-in imapclient session with the operations a test needs
to set up a scenario (append, flag, expunge, recreate a folder for a new
UIDVALIDITY) and to read the reference bytes a synchronized copy must equal.
``sample_messages`` and ``fill_mailbox`` make realistic mail to sync.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta, timezone
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime
from pathlib import Path

from imapclient import IMAPClient

from .imap import Account, client_ssl_context

# Folders the demo fills: the usual ones, and one whose name needs modified UTF-7.
DEMO_FOLDERS = {"INBOX": 150, "Sent": 60, "Archive": 80, "Ważne": 20}
# MULTIAPPEND batches: one round trip for many messages, but commands of bounded size.
APPEND_BATCH = 50

_APPENDUID = re.compile(rb"\[APPENDUID (\d+) ([\d:,]+)\]", re.IGNORECASE)


class Mailbox:
    """``with Mailbox.for_account(account) as mailbox: uid = mailbox.append("INBOX", raw)``.

    Folder names are plain ``str`` (imapclient does the modified UTF-7); UIDs
    are ints; every method selects the folder it works on.
    """

    def __init__(self, host: str, port: int, login: str, password: str, *,
                 starttls: bool = False, ca_pem_path: Path | str | None = None,
                 timeout: float = 10.0) -> None:
        self.client = IMAPClient(host, port, ssl=False, timeout=timeout)
        try:
            if starttls:
                if ca_pem_path is None:
                    raise ValueError("starttls needs the CA to trust (ca_pem_path)")
                self.client.starttls(client_ssl_context(ca_pem_path))
            self.client.login(login, password)
        except BaseException:
            self.client.shutdown()
            raise

    @classmethod
    def for_account(cls, account: Account, **options: object) -> Mailbox:
        """Log in to ``account``, over STARTTLS when its server offers it."""
        server = account.server
        return cls(server.host, server.port, account.login, account.password,
                   starttls=server.starttls, ca_pem_path=server.ca_pem_path, **options)

    def close(self) -> None:
        """Log out; a connection that is already broken is just closed."""
        try:
            self.client.logout()
        except (OSError, IMAPClient.Error):  # imaplib.abort is an IMAP4.error too
            self.client.shutdown()

    def __enter__(self) -> Mailbox:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- folders -----------------------------------------------------------------

    def folders(self) -> list[str]:
        """Names of all folders, INBOX included."""
        return [name for _flags, _delimiter, name in self.client.list_folders()]

    def create_folder(self, name: str) -> None:
        self.client.create_folder(name)

    def delete_folder(self, name: str) -> None:
        self.client.delete_folder(name)

    def rename_folder(self, old: str, new: str) -> None:
        self.client.rename_folder(old, new)

    def select(self, folder: str) -> dict[bytes, object]:
        """SELECT ``folder`` read-write; returns imapclient's response (UIDVALIDITY, EXISTS...)."""
        return self.client.select_folder(folder)

    def uidvalidity(self, folder: str) -> int:
        """The folder's UIDVALIDITY, as SELECT reports it."""
        return int(self.select(folder)[b"UIDVALIDITY"])

    def recreate_folder(self, name: str) -> int:
        """Delete and create ``name`` (emptying it) so it gets a new UIDVALIDITY; returns it.

        Not for INBOX, which IMAP cannot delete: test UIDVALIDITY changes on another folder.
        """
        if name.upper() == "INBOX":
            raise ValueError("INBOX cannot be deleted over IMAP")
        old = self.uidvalidity(name)
        # Leave the folder before deleting it (pymap has no UNSELECT; CLOSE would expunge).
        self.select("INBOX")
        self.delete_folder(name)
        self.create_folder(name)
        new = self.uidvalidity(name)
        if new == old:
            raise RuntimeError(f"{name!r} kept UIDVALIDITY {old} after being recreated")
        return new

    # -- messages ----------------------------------------------------------------

    def append(self, folder: str, message: bytes, flags: Iterable[bytes | str] = (),
               internal_date: datetime | None = None) -> int:
        """APPEND ``message`` and return its UID (from the server's APPENDUID)."""
        response = self.client.append(folder, message, flags=tuple(flags), msg_time=internal_date)
        return _appended_uids(response)[0]

    def append_many(self, folder: str, messages: Sequence[tuple[bytes, datetime | None]]
                    ) -> list[int]:
        """APPEND (message, internal date) pairs in MULTIAPPEND batches; returns their UIDs."""
        uids: list[int] = []
        for start in range(0, len(messages), APPEND_BATCH):
            batch = [{"msg": raw, "date": date} if date else {"msg": raw}
                     for raw, date in messages[start:start + APPEND_BATCH]]
            # Unlike append(), imapclient's multiappend returns imaplib's (type, data).
            status, data = self.client.multiappend(folder, batch)
            if status != "OK":
                raise IMAPClient.Error(f"APPEND to {folder!r} failed: {data!r}")
            uids += _appended_uids(data[-1])
        return uids

    def uids(self, folder: str) -> list[int]:
        """UIDs of all messages in ``folder``, ascending."""
        self.select(folder)
        return sorted(self.client.search("ALL"))

    def fetch_raw(self, folder: str, uid: int) -> bytes:
        """BODY[] of one message as the server sends it (without setting \\Seen)."""
        self.select(folder)
        response = self.client.fetch([uid], ["BODY.PEEK[]"])
        if uid not in response:
            raise LookupError(f"no UID {uid} in {folder!r}")
        return response[uid][b"BODY[]"]

    def flags(self, folder: str, uid: int) -> set[bytes]:
        """The message's flags, without \\Recent (which is per session, not stored)."""
        self.select(folder)
        response = self.client.get_flags([uid])
        if uid not in response:
            raise LookupError(f"no UID {uid} in {folder!r}")
        return set(response[uid]) - {b"\\Recent"}

    def set_flags(self, folder: str, uid: int, flags: Iterable[bytes | str]) -> None:
        """Replace the message's flags with ``flags``."""
        self.select(folder)
        self.client.set_flags([uid], tuple(flags), silent=True)

    def add_flags(self, folder: str, uid: int, flags: Iterable[bytes | str]) -> None:
        self.select(folder)
        self.client.add_flags([uid], tuple(flags), silent=True)

    def remove_flags(self, folder: str, uid: int, flags: Iterable[bytes | str]) -> None:
        self.select(folder)
        self.client.remove_flags([uid], tuple(flags), silent=True)

    def clear_flags(self, folder: str, uid: int) -> None:
        """Remove every flag from the message."""
        self.set_flags(folder, uid, ())

    def expunge(self, folder: str, uid: int) -> None:
        """Delete one message for good (UID EXPUNGE: other \\Deleted messages stay)."""
        self.select(folder)
        self.client.add_flags([uid], [b"\\Deleted"], silent=True)
        self.client.uid_expunge([uid])


def _appended_uids(response: bytes) -> list[int]:
    """UIDs from an APPEND response's ``[APPENDUID <validity> <uid-set>]`` (RFC 4315)."""
    match = _APPENDUID.search(response)
    if match is None:
        raise RuntimeError(f"server sent no APPENDUID (needs UIDPLUS): {response!r}")
    uids: list[int] = []
    for part in match[2].decode().split(","):
        first, _, last = part.partition(":")
        low, high = sorted((int(first), int(last or first)))
        uids += range(low, high + 1)
    return uids


# -- sample mail ---------------------------------------------------------------------

_PEOPLE = [
    ("Zofia Wójcik", "zofia.wojcik@example.test"),
    ("Łukasz Żmuda", "lukasz.zmuda@example.test"),
    ("Anna Nowak", "anna.nowak@example.test"),
    ("Grzegorz Brzęczyszczykiewicz", "g.brzeczyszczykiewicz@example.test"),
    ("John Smith", "john.smith@example.test"),
    ("Björk Guðmundsdóttir", "bjork@example.test"),
]
_SUBJECTS = [
    "Faktura VAT nr {n}/2024",
    "Re: Spotkanie w czwartek",
    "Zamówienie #{n} — potwierdzenie",
    "Quarterly report {n}",
    "Umowa do podpisu (wersja {n})",
    "Fwd: Zdjęcia z wyjazdu",
    "Przypomnienie: płatność zaległa",
    "Meeting notes {n}",
]
_PARAGRAPHS = [
    "Dzień dobry,\n\nw załączeniu przesyłam dokumenty, o które Pan prosił. "
    "Proszę o potwierdzenie otrzymania.",
    "Hello,\n\nplease find the figures below. Let me know if anything looks off.",
    "Cześć!\n\nDzięki za szybką odpowiedź — zgadzam się ze wszystkimi poprawkami. "
    "Żółć, gęślą jaźń: sprawdzamy polskie znaki.",
    "Szanowni Państwo,\n\nuprzejmie przypominamy o terminie płatności. "
    "W razie pytań prosimy o kontakt.",
]
_BASE_DATE = datetime(2024, 3, 1, 8, 0, tzinfo=timezone(timedelta(hours=1)))


def sample_message(index: int, *, seed: int = 0,
                   recipient: str = "owner@example.test") -> tuple[bytes, datetime]:
    """One realistic message (CRLF line endings) and its date; the same for the same input.

    Every third message is plain text, HTML with a text alternative, or text with
    a PDF attachment; names and subjects use non-ASCII (sent as encoded words).
    """
    rng = random.Random(f"{seed}:{index}")
    name, address = rng.choice(_PEOPLE)
    date = _BASE_DATE + timedelta(hours=index * 7, minutes=rng.randrange(60))
    text = rng.choice(_PARAGRAPHS) + f"\n\n-- \n{name}\n"

    message = EmailMessage(policy=SMTP)
    message["Message-ID"] = f"<{seed}.{index}.{rng.getrandbits(48):x}@example.test>"
    message["Date"] = format_datetime(date)
    message["From"] = f"{name} <{address}>"
    message["To"] = recipient
    message["Subject"] = rng.choice(_SUBJECTS).format(n=1000 + index)
    kind = index % 3
    message.set_content(text, cte="quoted-printable")
    if kind == 1:
        paragraphs = "".join(f"<p>{part}</p>" for part in text.split("\n\n"))
        message.add_alternative(f"<html><body>{paragraphs}</body></html>", subtype="html")
    elif kind == 2:
        # A tiny but well-formed-looking PDF: bytes a real attachment would be.
        pdf = b"%PDF-1.4\n" + rng.randbytes(600) + b"\n%%EOF\n"
        message.add_attachment(pdf, maintype="application", subtype="pdf",
                               filename=f"faktura-{1000 + index}.pdf")
    return message.as_bytes(), date


def sample_messages(count: int, *, seed: int = 0, recipient: str = "owner@example.test"
                    ) -> list[tuple[bytes, datetime]]:
    """``count`` sample messages with their dates, oldest first."""
    return [sample_message(index, seed=seed, recipient=recipient) for index in range(count)]


def fill_mailbox(mailbox: Mailbox, folder: str, count: int, *, seed: int = 0) -> list[int]:
    """Create ``folder`` if needed and append ``count`` sample messages; returns their UIDs.

    The messages' Date headers double as their internal dates. pymap is slow to
    append; keep its folders to tens of messages in tests.
    """
    if folder not in mailbox.folders():
        mailbox.create_folder(folder)
    return mailbox.append_many(folder, sample_messages(count, seed=seed))


def fill_demo_account(mailbox: Mailbox, counts: dict[str, int] | None = None
                      ) -> dict[str, list[int]]:
    """Fill the demo's folders (``DEMO_FOLDERS`` by default); returns the UIDs per folder."""
    counts = DEMO_FOLDERS if counts is None else counts
    return {folder: fill_mailbox(mailbox, folder, count, seed=position)
            for position, (folder, count) in enumerate(counts.items())}
