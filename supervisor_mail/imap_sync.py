"""IMAP synchronization of one account's folders into PostgreSQL.

What the engine's sync worker (and ``supervisor-mail sync``) calls::

    with AccountSession(conn, cfg, acntid) as session:       # one connection per account
        for folder in discover_folders(conn, session):
            result = sync_folder(conn, session, folder, TaskKind.SYNC_RECENT, cfg,
                                 beat=heartbeat, should_stop=stopping)

A *recent* sync stores the messages above the folder's cursor; a *full* sync then
reconciles flags and expunges (CONDSTORE/QRESYNC where offered, else by comparing
UIDs and FLAGS in chunks). Every batch is stored and the cursor advanced in one
transaction, so a crash at any instant loses nothing and a replay adds nothing.
The next FETCH runs while the previous batch is written (one writer thread); the
caller's ``beat`` is only ever called from the calling thread.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import psycopg
import tenacity

from supervisor_mail import accounts, cluster, folders, imap_client, imap_wire, messages
from supervisor_mail.config import Config
from supervisor_mail.errors import (
    AuthError,
    DatabaseError,
    LeaseLost,
    NetworkError,
    ServerError,
    SupervisorMailError,
    TransientServerError,
)
from supervisor_mail.fetching import FolderState, Plan, fetch_batch, plan_batches, undeliverable
from supervisor_mail.folders import Folder
from supervisor_mail.logs import where
from supervisor_mail.reconcile import Reconcile
from supervisor_mail.states import TaskKind

log = logging.getLogger("supervisor_mail.imap_sync")

Beat = Callable[[str, int], None]


class AuthBackoffError(AuthError):
    """Raised before connecting when the account's IMAP login failed less than
    ``sync.auth_error_retry`` seconds ago (changing the credentials clears it)."""


def _log_retry(what: str) -> Callable[[tenacity.RetryCallState], None]:
    def before_sleep(state: tenacity.RetryCallState) -> None:
        log.warning("%s failed (%s), retry %d in %.1fs", what, state.outcome.exception(),
                    state.attempt_number, state.next_action.sleep)
    return before_sleep


# A refusal that passes ([UNAVAILABLE], [LIMIT], too many connections) is retried
# shortly; a bad password never is (AuthError is not transient), and an unreachable
# server is left to NETWORK_RETRY, which beats between its tries (a connect can take
# sync.socket_timeout).
LOGIN_RETRY = dict(retry=tenacity.retry_if_exception(
                       lambda exc: isinstance(exc, TransientServerError)
                       and not isinstance(exc, NetworkError)),
                   stop=tenacity.stop_after_attempt(3),
                   wait=tenacity.wait_exponential_jitter(multiplier=0.5, max=4, jitter=0.5),
                   before_sleep=_log_retry("IMAP connect"), reraise=True)
# A connection that cannot be opened, or is lost mid-sync, is opened again and the
# folder resumes from its committed cursor; each try beats first, and the waits
# (about 1 + 2 + 4 s) stay far below watchdog.worker_timeout.
NETWORK_RETRY = dict(retry=tenacity.retry_if_exception_type(NetworkError),
                     stop=tenacity.stop_after_attempt(4),
                     wait=tenacity.wait_exponential_jitter(multiplier=1, max=8),
                     before_sleep=_log_retry("folder sync"), reraise=True)


class AccountSession:
    """One IMAP connection for one account, opened on first use and reused across its folders.

    ``open()`` reads the account fresh (credentials may have changed) and refuses,
    without connecting, while the IMAP auth-error backoff runs; a rejected login
    starts that backoff, so a locking server sees one attempt per period however
    often a sync is asked for. ``ignore_capabilities`` turns server extensions off
    (for a server whose CONDSTORE is broken, and for tests of the plain path).
    With a ``fence`` (the engine's sync workers) the session is opened and used only
    while this host holds the account's lease, and every batch commits under it.
    """

    def __init__(self, conn: psycopg.Connection, cfg: Config, acntid: int,
                 ignore_capabilities: tuple[str, ...] = (), fence: cluster.Fence | None = None):
        self.conn, self.cfg, self.acntid, self.fence = conn, cfg, acntid, fence
        self.ignore = {c.upper().encode() for c in ignore_capabilities}
        self.client = None
        self.capabilities: frozenset[bytes] = frozenset()
        self.qresync = self.condstore = False

    def __enter__(self) -> AccountSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        if self.client is not None:
            return
        if self.fence is not None:
            self.fence.ensure(self.conn)
        account = accounts.get(self.conn, self.acntid)
        self._refuse_in_backoff()
        try:
            client = tenacity.Retrying(**LOGIN_RETRY)(imap_client.connect, self.cfg, account)
        except AuthError as exc:
            accounts.set_auth_error(self.conn, self.acntid, "imap", str(exc))
            log.error("IMAP login refused, not tried again for %ds: %s",
                      self.cfg.sync.auth_error_retry, exc, extra=where(self.acntid))
            raise
        self.client = client
        if self.fence is not None:  # guarded from the login on, before any other wait
            sock = client.socket()
            self.fence.attach(lambda: cluster.sever(sock))
        accounts.clear_auth_error(self.conn, self.acntid, "imap")
        try:
            self._enable_extensions()
        except BaseException:
            self.close()
            raise

    def _refuse_in_backoff(self) -> None:
        row = self.conn.execute(
            "SELECT imap_auth_error, imap_auth_error_at + make_interval(secs => %s)"
            " FROM email_accounts WHERE acntid = %s"
            " AND imap_auth_error_at + make_interval(secs => %s) > now()",
            (self.cfg.sync.auth_error_retry, self.acntid, self.cfg.sync.auth_error_retry)
        ).fetchone()
        if row:
            raise AuthBackoffError(
                f"account {self.acntid}: IMAP login not retried before "
                f"{row[1]:%Y-%m-%d %H:%M:%S %Z} after {row[0]}; correct the credentials "
                "to retry at once")

    def _enable_extensions(self) -> None:
        caps = set(self.client.capabilities()) - self.ignore
        self.capabilities = frozenset(caps)
        wanted = [c for c in (b"QRESYNC", b"CONDSTORE") if c in caps]
        if wanted and b"ENABLE" in caps:
            enabled: set[bytes] = set()
            self.execute(b"ENABLE " + wanted[0],
                         lambda kind, data: enabled.update(
                             d.upper() for d in data if isinstance(d, bytes))
                         if kind == b"ENABLED" else None)
            self.qresync = b"QRESYNC" in enabled
            self.condstore = self.qresync or b"CONDSTORE" in enabled
        else:
            self.condstore = b"CONDSTORE" in caps  # enabled by EXAMINE (CONDSTORE)

    def execute(self, command: bytes, on_response: imap_wire.Handler,
                literal_cap: int | None = None) -> tuple[bytes, bytes]:
        """``imap_wire.execute`` on this connection; a connection that failed is closed, so
        the next ``open()`` starts afresh."""
        self.open()
        try:
            if self.fence is not None:
                self.fence.ensure(self.conn)  # no IMAP command past the lease's deadline
            return imap_wire.execute(self.client, command, on_response, literal_cap)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.client is not None:
            if self.fence is not None:
                self.fence.detach()
            imap_client.close(self.client)
            self.client = None


def discover_folders(conn: psycopg.Connection, session: AccountSession) -> list[Folder]:
    """LIST the account's folders and record them (``folders.record_listing``): roles from
    SPECIAL-USE where offered, else well-known names; the folders now on the server."""
    session.open()
    special_use = b"SPECIAL-USE" in session.capabilities
    command = b'LIST "" "*"'
    if special_use and b"LIST-EXTENDED" in session.capabilities:
        command += b" RETURN (SPECIAL-USE)"
    listed: list[folders.Listed] = []

    def on_list(kind: bytes, data: object) -> None:
        if kind == b"LIST" and isinstance(data, list) and len(data) >= 3:
            attributes, delimiter, name = data[0], data[1], data[2]
            name = str(name).encode() if isinstance(name, int) else name
            listed.append(folders.Listed(
                imap_wire.text(name), imap_wire.text(delimiter) if delimiter else None,
                tuple(a for a in attributes or () if isinstance(a, bytes))))

    status, text = session.execute(command, on_list)
    if status != b"OK":
        raise ServerError(f"account {session.acntid}: LIST failed: {imap_wire.text(text)}")
    with cluster.fenced(conn, session.fence, f"folder listing of account {session.acntid}"):
        return folders.record_listing(conn, session.acntid, listed, special_use)


@dataclass
class SyncResult:
    """What one ``sync_folder`` did."""

    emfdid: int
    kind: TaskKind
    new: int = 0                 # messages stored
    bytes: int = 0               # their size
    skipped: int = 0             # of them, stored without their full bytes (reason recorded)
    flags_changed: int = 0
    expunged: int = 0            # marked deleted
    delivered_late: int = 0      # messages the server could not deliver before, stored now
    uidvalidity_changed: bool = False
    gone: bool = False           # the folder no longer exists on the server
    stopped: bool = False        # should_stop() said so; the folder resumes next time
    seconds: float = 0.0


@dataclass
class Progress:
    """For a progress bar: the new messages planned and stored so far."""

    messages_total: int = 0
    bytes_total: int = 0
    messages_done: int = 0
    bytes_done: int = 0


def sync_folder(conn: psycopg.Connection, session: AccountSession, folder: Folder,
                kind: TaskKind, cfg: Config, beat: Beat,
                should_stop: Callable[[], bool] = lambda: False,
                on_progress: Callable[[Progress], None] | None = None) -> SyncResult:
    """Synchronize one folder; returns a ``SyncResult``.

    ``beat(phase, progress)`` is called between FETCH batches and after every commit
    (phases "connect", "examine", "fetch", "commit", "flags"); ``should_stop()`` is
    checked between batches, and a stop leaves after the batch in hand is stored.
    A connection lost on the way is reopened (``NETWORK_RETRY``) and the folder
    resumes from its cursor. Errors are logged with the account and folder,
    recorded in the folder's ``last_error``, and raised.
    """
    job = _FolderSync(conn, session, folder, TaskKind(kind), cfg, beat, should_stop,
                      on_progress or (lambda progress: None))
    started = time.monotonic()
    try:
        tenacity.Retrying(**NETWORK_RETRY)(job.attempt)
    except LeaseLost:
        raise  # not the folder's fault: no folder error, the new holder syncs it at once
    except SupervisorMailError as exc:
        log.error("%s of %s failed: %s", job.kind.value, folder.display_name, exc,
                  extra=job.where)
        _record_error(conn, folder.emfdid, str(exc))
        raise
    except psycopg.Error as exc:
        log.error("%s of %s failed in PostgreSQL: %s", job.kind.value, folder.display_name,
                  exc, extra=job.where)
        raise DatabaseError(f"sync of folder {folder.emfdid}: {exc}") from None
    result = job.result
    result.seconds = time.monotonic() - started
    _log_result(folder, result, job.where)
    return result


def _record_error(conn: psycopg.Connection, emfdid: int, message: str) -> None:
    try:
        folders.record_error(conn, emfdid, message)
    except psycopg.Error:
        log.exception("cannot record the error of folder %d", emfdid)


def _log_result(folder: Folder, result: SyncResult, extra: dict) -> None:
    if result.gone:
        log.warning("folder %s is gone from the server; marked, not synchronized",
                    folder.display_name, extra=extra)
        return
    log.info("received %d new messages in %ds", result.new, round(result.seconds), extra=extra)
    if result.kind is TaskKind.SYNC_FULL and not result.stopped:
        log.info("flags changed on %d messages, %d expunged", result.flags_changed,
                 result.expunged, extra=extra)


@dataclass
class _FolderSync:
    """One folder's sync; ``attempt`` runs once for each try of ``NETWORK_RETRY``."""

    conn: psycopg.Connection
    session: AccountSession
    folder: Folder
    kind: TaskKind
    cfg: Config
    beat: Beat
    should_stop: Callable[[], bool]
    on_progress: Callable[[Progress], None]
    result: SyncResult = None
    progress: Progress = field(default_factory=Progress)
    attempts: int = 0
    fetched: int = 0  # messages fetched, committed or not
    cursor_before: int | None = None  # last_uid when the sync started: older UIDs reconcile
    suspects: set[int] = field(default_factory=set)  # UIDs being fetched when a connection broke
    state: FolderState | None = None  # what the last EXAMINE said
    has_retired: bool = False  # rows of a replaced UIDVALIDITY wait for their messages

    def __post_init__(self) -> None:
        self.result = SyncResult(self.folder.emfdid, self.kind)
        self.where = where(self.folder.acntid, self.folder.emfdid)

    def attempt(self) -> None:
        """One try from the committed state; a retry after a lost connection reconnects."""
        self.attempts += 1
        if self.attempts > 1:
            self.session.close()
        self.beat("connect", self.progress.messages_done)
        self.session.open()
        self.beat("examine", self.progress.messages_done)
        state = self.state = self._examine()
        if state is None:
            with self._fenced("marking gone"):
                folders.mark_gone(self.conn, self.folder.emfdid)
            self.result.gone = True
            return
        last_uid = self._check_uidvalidity(state)
        if self.cursor_before is None:
            self.cursor_before = last_uid
        if state.has_new(last_uid):
            self._fetch_new(state, last_uid)
        if self.result.stopped:
            return
        full = self.kind is TaskKind.SYNC_FULL
        if full:
            self._reconcile(state)
            self._fetch_undelivered(state)
        with self._fenced("end of sync"):
            folders.finish(self.conn, self.folder.emfdid, full,
                           state.highestmodseq if self.session.condstore else None)

    def _fenced(self, what: str) -> AbstractContextManager[object]:
        """A transaction on this folder's rows, committed only under the account's lease."""
        return cluster.fenced(self.conn, self.session.fence,
                              f"{what} of folder {self.folder.emfdid}")

    def _examine(self) -> FolderState | None:
        state = FolderState()
        command = b"EXAMINE " + quote(self.folder.server_name)
        if self.session.condstore and not self.session.qresync:
            command += b" (CONDSTORE)"
        status, text = self.session.execute(command, state.collect)
        if status != b"OK":
            if _NONEXISTENT.search(text):
                return None
            raise ServerError(f"EXAMINE {self.folder.display_name} refused: "
                              f"{imap_wire.text(text)}")
        return state.checked(self.folder.display_name)

    def _check_uidvalidity(self, state: FolderState) -> int:
        """The cursor to resume from; a new UIDVALIDITY retires the old rows and restarts it."""
        with self._fenced("UIDVALIDITY check"):
            stored, last_uid = folders.lock_cursor(self.conn, self.folder.emfdid)
            if stored == state.uidvalidity:
                self.has_retired = messages.has_retired(self.conn, self.folder.emfdid)
                return last_uid
            folders.start_uidvalidity(self.conn, self.folder.emfdid, state.uidvalidity)
            retired = messages.retire(self.conn, self.folder.emfdid, state.uidvalidity)
            self.has_retired = retired > 0 or messages.has_retired(self.conn, self.folder.emfdid)
        if stored is not None:
            self.result.uidvalidity_changed = True
            self.cursor_before = 0
            log.warning("UIDVALIDITY changed from %d to %d: %d messages retired, the folder is "
                        "synchronized again", stored, state.uidvalidity, retired, extra=self.where)
        return 0

    def _fetch_undelivered(self, state: FolderState) -> None:
        """Ask again, one at a time, for the messages the server could not deliver before.
        A NO leaves the row as it is; a dropped connection ends the attempts of this sync
        (a server that cannot read a file drops every session that asks for it), without
        failing it: the next full sync tries again."""
        waiting = messages.undelivered(self.conn, self.folder.emfdid, state.uidvalidity)
        limit = self.cfg.sync.max_message_size
        for uid, size in waiting:
            self.beat("fetch undelivered", self.result.delivered_late)
            try:
                fetched = fetch_batch(self.session, Plan((uid,), (size,), size > limit), self.cfg)
            except NetworkError as exc:
                log.warning("message UID %d still not delivered, the server dropped the "
                            "connection: %s", uid, exc, extra=self.where)
                return
            with self._fenced("late delivery"):
                self.result.delivered_late += messages.deliver_late(
                    self.conn, self.folder.emfdid, state.uidvalidity, fetched)
        if waiting:
            log.info("%d of %d messages the server could not deliver before are stored now",
                     self.result.delivered_late, len(waiting), extra=self.where)

    def _fetch_new(self, state: FolderState, last_uid: int) -> None:
        sizes: dict[int, int] = {}

        def on_size(kind: bytes, data: object) -> None:
            if kind == b"FETCH" and isinstance(data.get(b"UID"), int):
                size = data.get(b"RFC822.SIZE")
                if data[b"UID"] > last_uid and isinstance(size, int):
                    sizes[data[b"UID"]] = size

        status, text = self.session.execute(b"UID FETCH %d:* (UID RFC822.SIZE)" % (last_uid + 1),
                                            on_size)
        if status != b"OK":
            raise ServerError(f"listing new messages of {self.folder.display_name} failed: "
                              f"{imap_wire.text(text)}")
        plans = plan_batches(sorted(sizes.items()), self.cfg.sync.batch_size,
                             self.cfg.sync.batch_bytes, self.cfg.sync.max_message_size)
        self.progress.messages_total = self.progress.messages_done + len(sizes)
        self.progress.bytes_total = self.progress.bytes_done + sum(sizes.values())
        self.on_progress(self.progress)
        with _Writer(self, state.uidvalidity) as writer:
            for plan in self._careful(plans):
                if self.should_stop():
                    self.result.stopped = True
                    break
                batch = self._fetch(plan)
                self.fetched += len(batch)
                self.beat("fetch", self.fetched)
                writer.submit(plan, batch)

    def _careful(self, plans: list[Plan]) -> Iterator[Plan]:
        """The plans, except that a batch during which the connection was lost before is
        fetched one message at a time, to find the message the server cannot send."""
        for plan in plans:
            if len(plan.uids) > 1 and self.suspects.intersection(plan.uids):
                for uid, size in zip(plan.uids, plan.sizes, strict=True):
                    yield Plan((uid,), (size,), plan.headers_only)
            else:
                yield plan

    def _fetch(self, plan: Plan) -> list[messages.Fetched]:
        try:
            return fetch_batch(self.session, plan, self.cfg)
        except NetworkError as exc:
            if len(plan.uids) > 1 or plan.uids[0] not in self.suspects:
                self.suspects.update(plan.uids)
                raise
            reason = f"the server dropped the connection instead of sending it: {exc}"
        # Lost in its batch and lost again alone (Dovecot answers an unreadable message
        # with BYE): recorded with the reason, and the folder goes on on a new connection.
        state = self._examine()
        if state is None or state.uidvalidity != self.state.uidvalidity:
            raise NetworkError(f"{self.folder.display_name} changed while reconnecting")
        return [undeliverable(plan.uids[0], plan.sizes[0], reason)]

    def stored(self, plan: Plan, batch: list[messages.Fetched]) -> None:
        """Called in this thread once a batch is committed."""
        self.result.new += len(batch)
        self.result.bytes += sum(m.size for m in batch)
        self.result.skipped += sum(1 for m in batch if m.skipped_reason)
        for m in batch:
            if m.skipped_reason:
                log.warning("message UID %d stored without its body: %s", m.uid,
                            m.skipped_reason, extra=self.where)
        self.progress.messages_done += len(batch)
        self.progress.bytes_done += sum(m.size for m in batch)
        self.beat("commit", self.progress.messages_done)
        self.on_progress(self.progress)

    def _reconcile(self, state: FolderState) -> None:
        changed, expunged = Reconcile(self.conn, self.session, self.folder.emfdid, state,
                                      self.cursor_before, self.beat).run()
        self.result.flags_changed += changed
        self.result.expunged += expunged


class _Writer:
    """Stores batches on a helper thread while the next FETCH runs, one batch at a time.

    Only PostgreSQL work runs on the thread; ``beat`` and progress happen in the
    caller's thread when it collects a finished commit. Leaving the ``with``
    waits for the last commit, also on an error, so nothing is left half-done.
    """

    def __init__(self, job: _FolderSync, uidvalidity: int):
        self.job, self.uidvalidity = job, uidvalidity
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sync-store")
        self.pending: tuple[Plan, list, Future] | None = None

    def __enter__(self) -> _Writer:
        return self

    def submit(self, plan: Plan, batch: list[messages.Fetched]) -> None:
        self.collect()
        future = self.pool.submit(store_batch, self.job.conn, self.job.folder.emfdid,
                                  self.uidvalidity, plan.last_uid, batch, self.job.has_retired,
                                  self.job.session.fence)
        self.pending = (plan, batch, future)

    def collect(self) -> None:
        if self.pending is not None:
            plan, batch, future = self.pending
            self.pending = None
            self.job.stored(plan, future.result())

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.collect()
        finally:
            self.pool.shutdown(wait=True)


def store_batch(conn: psycopg.Connection, emfdid: int, uidvalidity: int, last_uid: int,
                batch: list[messages.Fetched], has_retired: bool,
                fence: cluster.Fence | None = None) -> list[messages.Fetched]:
    """Store a batch and advance the cursor to ``last_uid`` in one transaction.

    The cursor row is locked first and only UIDs above it are written, so a batch
    replayed after a crash, or written twice by two processes, is stored once.
    With a ``fence`` the transaction ends by checking that this host still holds the
    account's lease under the fence's generation (else LeaseLost, and nothing is
    written) and records the batch with its host and generation. Returns the messages
    actually written.
    """
    with cluster.fenced(conn, fence, f"batch of {len(batch)} messages for folder {emfdid}"):
        # Not waiting for the WAL flush loses nothing: a batch lost with a PostgreSQL
        # crash is lost with its cursor advance (one transaction), so it is fetched
        # again from the server, which still has it.
        conn.execute("SET LOCAL synchronous_commit = off")
        stored_validity, cursor = folders.lock_cursor(conn, emfdid)
        if stored_validity != uidvalidity:
            raise DatabaseError(f"folder {emfdid} was reset to UIDVALIDITY {stored_validity} "
                                "during its sync; it will be synchronized again")
        fresh = [m for m in batch if m.uid > cursor]
        rest = messages.adopt_retired(conn, emfdid, uidvalidity, fresh) if has_retired else fresh
        messages.copy_new(conn, emfdid, uidvalidity, rest)
        folders.advance(conn, emfdid, last_uid)
        if fence is not None:
            fence.record(conn, emfdid, last_uid, len(fresh))
    return fresh


_NONEXISTENT = re.compile(rb"\[NONEXISTENT\]|doesn't exist|does not exist|no such|not found|"
                          rb"unknown mailbox", re.IGNORECASE)


def quote(name: str) -> bytes:
    """A mailbox name as an IMAP quoted string."""
    data = name.encode("utf-8")
    return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'

