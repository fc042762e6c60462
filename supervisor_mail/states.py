"""States and kinds, as ``str`` enums whose values are what the databases store.

Standard library only, so every module (and the SQL check constraints in the
migrations) can agree on the same words.
"""

from enum import Enum


class StrEnum(str, Enum):
    """``str`` mixin so values compare and serialize as their text (Python 3.10 has no StrEnum)."""

    def __str__(self) -> str:
        return self.value


class Security(StrEnum):
    """How an IMAP or SMTP connection is protected (``email_accounts.*_security``)."""

    TLS = "tls"            # implicit TLS from the first byte (993, 465)
    STARTTLS = "starttls"  # plain connect, then STARTTLS, which the server must offer
    PLAIN = "plain"        # no TLS at all; only when an account says so explicitly


class Priority(StrEnum):
    """A folder's sync priority (``email_folders.priority``)."""

    HI = "hi"    # Inbox and folders marked high: recent and full syncs on intervals
    LO = "lo"    # one full sync a day from sync.lo_sync_start
    OFF = "off"  # never synchronized


class Role(StrEnum):
    """A folder's special role (RFC 6154 SPECIAL-USE, or guessed from its name)."""

    INBOX = "inbox"
    SENT = "sent"
    DRAFTS = "drafts"
    TRASH = "trash"
    JUNK = "junk"
    ARCHIVE = "archive"


class TaskKind(StrEnum):
    SYNC_RECENT = "sync_recent"  # new messages only
    SYNC_FULL = "sync_full"      # new messages, then flags and deletions
    DISCOVER = "discover"        # LIST the account's folders (emfdid 0: the whole account)


class TaskState(StrEnum):
    """A sync task in the state DB: QUEUED -> RUNNING -> (deleted when done) or SET_ASIDE."""

    QUEUED = "queued"
    RUNNING = "running"
    SET_ASIDE = "set_aside"  # hung its worker watchdog.max_task_failures times


class OutboxState(StrEnum):
    """An outbox row: QUEUED -> SENDING -> SENT | DEFERRED -> SENDING ... | FAILED."""

    QUEUED = "queued"
    SENDING = "sending"
    SENT = "sent"
    DEFERRED = "deferred"
    FAILED = "failed"


class ProcessRole(StrEnum):
    """Who a heartbeat row or a log tag belongs to."""

    MASTER = "master"
    PLANNER = "planner"
    SYNC = "sync"
    SEND = "send"
