"""The planner: decides which folders are due and puts them into the sync workers' slices.

Deciding is a pure function, ``due_tasks(accounts, folders, cfg, now, tz)``, of the
accounts' and folders' state, the settings and the clock; the unit tests drive it
with a fake clock. A planning pass (``plan_once``) reads that state from PostgreSQL
in one query, already narrowed in SQL to the rows that can be due (the same
cutoffs, from ``Cutoffs.at``), lets the pure function decide, and hands the tasks
to ``StateDB.enqueue``, which keeps every account in one slice and every slice
under its cap. ``run_planner`` is the planner process: a pass every
``planner.interval`` seconds, a heartbeat on every loop, and a PostgreSQL outage
logged and retried, never a crash loop.

The rules (DESIGN.md, "The settings it inherits"; issue 5, point 4):

- hi folders (the Inbox and folders marked hi): a recent sync every
  ``sync.hi_recent_interval`` while the owner is logged in, else every
  ``hi_recent_interval_nl``; a full sync every ``hi_full_interval`` /
  ``hi_full_interval_nl``. A due full sync replaces the recent one (it fetches
  new mail too), and a hi folder never synced gets a full sync.
- lo folders: one full sync a day, due when the last one is older than the most
  recent daily start (``sync.lo_sync_start``, local time), so a start missed while
  the engine was down is made up at once.
- off folders, folders gone from the server, accounts in IMAP auth backoff: never.
  A folder whose last sync failed waits ``ERROR_RETRY`` first.
- an account whose folders were never listed gets a discovery task, again every
  ``hi_full_interval`` so that folders created on the server appear.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone, tzinfo
from datetime import time as time_of_day
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import psycopg
from psycopg import sql

from supervisor_mail import cluster, outbox, store
from supervisor_mail.config import BY_NAME, Config
from supervisor_mail.errors import DatabaseError, StateError
from supervisor_mail.state import NewTask, StateDB
from supervisor_mail.states import Priority, TaskKind

log = logging.getLogger("supervisor_mail.planner")

# Task priorities: lower runs first (StateDB.enqueue and StateDB.claim order by them).
HI_RECENT = 0  # new mail in a hi folder, and an account's first folder list: what people
               # wait for (a new account has nothing to sync until its folders are listed)
HI_FULL = 1
LO_FULL = 2
DISCOVER = 3   # listing folders again can wait behind the syncs of folders already known

# Seconds a folder (or an account's discovery) whose last attempt failed waits before
# the next one. Long enough that a broken folder costs one attempt per couple of
# minutes instead of one per planning pass (5 s), and twice the default socket timeout,
# so a server that times out takes at most about half of a worker's time; short against
# hi_recent_interval (600 s), so a passing failure delays new mail by two minutes at most.
ERROR_RETRY = 120

SLEEP_STEP = 0.2  # seconds; the idle loop beats and checks for a stop this often
SCHEMA_FACT = "schema_fingerprint"  # the state DB `engine` key the watchdog compares
DEFAULT_HOST = BY_NAME["engine.host_id"].default  # whose leases a bare candidates query reads


# --- the state the decision is made from -------------------------------------------------

@dataclass(frozen=True, slots=True)
class AccountState:
    """What the planner knows of one account; times are epoch seconds, None for never."""

    acntid: int
    imap_auth_error_at: float | None  # last IMAP login refusal (the auth backoff)
    owner_active_at: float | None     # the owner's last activity in the web application
    folders_listed_at: float | None   # last LIST of its folders
    last_error_at: float | None       # last account-wide failure (discovery's backoff)


@dataclass(frozen=True, slots=True)
class FolderState:
    """What the planner knows of one folder; times are epoch seconds, None for never."""

    acntid: int
    emfdid: int
    name: str                  # display name, for titles and status
    priority: str              # states.Priority, from the folder's role
    user_priority: str | None  # the user's override, when set
    last_recent_sync: float | None
    last_full_sync: float | None
    last_error_at: float | None
    gone_at: float | None      # no longer on the server

    @property
    def effective_priority(self) -> str:
        """The user's choice when there is one, else the role's."""
        return self.user_priority or self.priority


@dataclass(frozen=True)
class Cutoffs:
    """The instants (epoch seconds) one pass compares timestamps with, derived once from the
    settings and the clock. The SQL prefilter and ``due_tasks`` use the same ones."""

    now: float
    active_since: float  # the owner active at or after this: logged in
    auth_until: float    # an IMAP login refused after this: still in auth backoff
    error_until: float   # a failure after this: still waiting ERROR_RETRY
    recent_li: float     # a hi folder's newest sync at or before this: recent sync due
    recent_nl: float     # (li: owner logged in; nl: not)
    full_li: float       # a hi folder's full sync at or before this: full sync due
    full_nl: float
    lo_start: float      # a lo folder's full sync before this: its daily sync is due
    listed: float        # folders listed at or before this: discovery due again

    @classmethod
    def at(cls, cfg: Config, now: float, tz: tzinfo) -> Cutoffs:
        """The cutoffs at ``now``, the daily start taken in ``tz``."""
        s = cfg.sync
        return cls(now=now,
                   active_since=now - s.logged_in_window,
                   auth_until=now - s.auth_error_retry,
                   error_until=now - ERROR_RETRY,
                   recent_li=now - s.hi_recent_interval,
                   recent_nl=now - s.hi_recent_interval_nl,
                   full_li=now - s.hi_full_interval,
                   full_nl=now - s.hi_full_interval_nl,
                   lo_start=last_daily_start(now, s.lo_sync_start, tz),
                   listed=now - s.hi_full_interval)


# --- the daily start, across midnight and DST ----------------------------------------------

def daily_start(day: date, at: time_of_day, tz: tzinfo) -> float:
    """The first instant of local ``day`` whose wall clock reads ``at`` or later.

    Usually ``at`` itself. When ``at`` is repeated (the autumn hour) it is its first
    occurrence, so the daily sync runs once, not twice. When ``at`` does not exist
    (inside the spring-forward gap) it is the end of the gap, the moment the clock
    jumps past ``at`` (as cron does), not an hour later as ``fold=0`` arithmetic gives.
    """
    wanted = datetime.combine(day, at)
    instant = int(wanted.replace(tzinfo=tz, fold=0).timestamp())
    if _wall(instant, tz) == wanted:
        return float(instant)
    # In a gap: fold=1 lands before the jump, fold=0 after it; search the jump to the second.
    before = int(wanted.replace(tzinfo=tz, fold=1).timestamp())
    after = instant
    while after - before > 1:
        middle = (before + after) // 2
        if _wall(middle, tz) >= wanted:
            after = middle
        else:
            before = middle
    return float(after)


def last_daily_start(now: float, at: time_of_day, tz: tzinfo) -> float:
    """The most recent daily start (``daily_start``) at or before ``now``."""
    today = datetime.fromtimestamp(now, tz).date()
    start = daily_start(today, at, tz)
    return start if start <= now else daily_start(today - timedelta(days=1), at, tz)


def _wall(instant: float, tz: tzinfo) -> datetime:
    """The local wall-clock time of an instant, naive."""
    return datetime.fromtimestamp(instant, tz).replace(tzinfo=None)


def local_zone() -> tzinfo:
    """The host's time zone with its DST rules: ``$TZ`` if it names a zone, else
    /etc/localtime (the same the log file names follow), else UTC."""
    name = os.environ.get("TZ", "").lstrip(":")
    if name:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            pass  # a POSIX rule string such as "CET-1CEST": fall back to the system file
    try:
        with open("/etc/localtime", "rb") as f:
            return ZoneInfo.from_file(f, key="localtime")
    except (OSError, ValueError):
        return timezone.utc


# --- the decision: pure -----------------------------------------------------------------------

def due_tasks(accounts: Iterable[AccountState], folders: Iterable[FolderState], cfg: Config,
              now: float, tz: tzinfo) -> list[NewTask]:
    """The sync and discovery tasks due at ``now``: a pure function of its arguments.

    ``accounts`` are the accounts this host plans for (``accounts_mine``); a folder
    whose account is not among them is ignored. At most one task per folder::

        [NewTask(kind='sync_recent', acntid=53, emfdid=824, folder='INBOX', priority=0,
                 due=1700000000.0), ...]

    ``due`` is when the task became due (never after ``now``), so the longest
    overdue run first within a priority.
    """
    if not cfg.sync.enabled:
        return []
    cut = Cutoffs.at(cfg, now, tz)
    ready = {a.acntid: a for a in accounts if not _in_backoff(a.imap_auth_error_at,
                                                                  cut.auth_until)}
    tasks = [_discovery(a, cut, cfg) for a in ready.values() if _discovery_due(a, cut)]
    for folder in folders:
        account = ready.get(folder.acntid)
        if account is not None:
            task = _folder_task(folder, account, cut, cfg)
            if task is not None:
                tasks.append(task)
    return tasks


def _in_backoff(failed_at: float | None, until: float) -> bool:
    """True when a failure happened after ``until``: its backoff is still running."""
    return failed_at is not None and failed_at > until


def _discovery_due(account: AccountState, cut: Cutoffs) -> bool:
    """Never listed, or listed hi_full_interval ago, and no account failure just now."""
    if _in_backoff(account.last_error_at, cut.error_until):
        return False
    return account.folders_listed_at is None or account.folders_listed_at <= cut.listed


def _discovery(account: AccountState, cut: Cutoffs, cfg: Config) -> NewTask:
    """The account-wide task (emfdid 0) that lists its folders."""
    due = _became_due(account.folders_listed_at, cfg.sync.hi_full_interval, cut.now)
    priority = HI_RECENT if account.folders_listed_at is None else DISCOVER
    return NewTask(TaskKind.DISCOVER, account.acntid, 0, "", priority, due)


def _folder_task(folder: FolderState, account: AccountState, cut: Cutoffs,
                 cfg: Config) -> NewTask | None:
    """The one task this folder needs now, or None."""
    if folder.gone_at is not None or _in_backoff(folder.last_error_at, cut.error_until):
        return None
    priority = folder.effective_priority
    if priority == Priority.HI:
        return _hi_task(folder, _logged_in(account, cut), cut, cfg)
    if priority == Priority.LO:
        return _lo_task(folder, cut)
    return None  # off


def _logged_in(account: AccountState, cut: Cutoffs) -> bool:
    """The owner was active within sync.logged_in_window (no owner: not logged in)."""
    return account.owner_active_at is not None and account.owner_active_at >= cut.active_since


def _hi_task(folder: FolderState, logged_in: bool, cut: Cutoffs, cfg: Config) -> NewTask | None:
    """A full sync when one is due (or never ran), else a recent sync when one is due."""
    s = cfg.sync
    full_cut, full_every = ((cut.full_li, s.hi_full_interval) if logged_in
                            else (cut.full_nl, s.hi_full_interval_nl))
    if folder.last_full_sync is None or folder.last_full_sync <= full_cut:
        due = _became_due(folder.last_full_sync, full_every, cut.now)
        return _task(TaskKind.SYNC_FULL, folder, HI_FULL, due)
    recent_cut, recent_every = ((cut.recent_li, s.hi_recent_interval) if logged_in
                                else (cut.recent_nl, s.hi_recent_interval_nl))
    # A full sync fetches new mail too, so the newer of the two is the last recent sync.
    newest = folder.last_full_sync
    if folder.last_recent_sync is not None and folder.last_recent_sync > newest:
        newest = folder.last_recent_sync
    if newest <= recent_cut:
        return _task(TaskKind.SYNC_RECENT, folder, HI_RECENT,
                     _became_due(newest, recent_every, cut.now))
    return None


def _lo_task(folder: FolderState, cut: Cutoffs) -> NewTask | None:
    """A full sync when the last one is older than the most recent daily start."""
    if folder.last_full_sync is not None and folder.last_full_sync >= cut.lo_start:
        return None
    return _task(TaskKind.SYNC_FULL, folder, LO_FULL, cut.lo_start)


def _became_due(last: float | None, every: int, now: float) -> float:
    """When a task repeated ``every`` seconds became due; never done: now."""
    return now if last is None else min(now, last + every)


def _task(kind: TaskKind, folder: FolderState, priority: int, due: float) -> NewTask:
    """A folder's task."""
    return NewTask(kind, folder.acntid, folder.emfdid, folder.name, priority, due)


# --- reading the state from PostgreSQL ------------------------------------------------------

def accounts_mine(host_id: str = DEFAULT_HOST) -> sql.Composable:
    """The condition, on ``email_accounts a``, for the accounts this host plans for: the
    enabled accounts with an IMAP server on which it holds a live lease it is not
    giving up (supervisor_mail.cluster). This is the one place that says it; alone on
    its database a host holds every lease.
    """
    return sql.SQL(cluster.ELIGIBLE + " AND EXISTS (SELECT FROM email_account_leases l"
                   " WHERE l.acntid = a.acntid AND l.host_id = {host} AND NOT l.releasing"
                   " AND l.expires_at > now())").format(host=sql.Literal(host_id))


# The candidates, in three branches that each return only rows already due, at most
# %(limit)s of them, in the order StateDB.enqueue fills the slices (priority, then due):
# the hi folders, the lo folders, and the accounts whose folder list is due. The slices
# hold at most sync_workers x max_tasks_per_worker tasks (the limit), so more rows could
# not be queued anyway; a backlog (every lo folder at lo_sync_start, everything after an
# outage) then costs the server a sort, not the planner a longer pass. Some of the rows
# are queued already, but the rest still cover whatever room the slices have left. The
# filters are due_tasks's rules on the same cutoffs, exact rather than approximate, so no
# row that is not due takes a place under the limit; due_tasks still decides, and a test
# holds the two to the same answer.
_FOLDER_COLUMNS = """f.emfdid, f.display_name, f.priority, f.user_priority, f.last_recent_sync,
           f.last_full_sync, f.last_error_at, f.gone_at"""
_CANDIDATES = f"""
WITH mine AS MATERIALIZED (
    SELECT a.acntid, a.imap_auth_error_at, u.last_active, a.folders_listed_at,
           a.last_error_at AS account_error_at,
           CASE WHEN o.logged_in THEN %(recent_li)s ELSE %(recent_nl)s END AS recent_cut,
           CASE WHEN o.logged_in THEN %(full_li)s ELSE %(full_nl)s END AS full_cut
    FROM email_accounts a
    LEFT JOIN email_user_activity u ON u.user_id = a.owner_id
    CROSS JOIN LATERAL (
        SELECT coalesce(u.last_active >= %(active_since)s, false) AS logged_in) o
    WHERE {{mine}}
      AND (a.imap_auth_error_at IS NULL OR a.imap_auth_error_at <= %(auth_until)s)
)
-- epoch seconds, converted for the rows returned only (date_part is float8; extract,
-- numeric since PostgreSQL 14, costs several times more)
SELECT acntid, date_part('epoch', imap_auth_error_at), date_part('epoch', last_active),
       date_part('epoch', folders_listed_at), date_part('epoch', account_error_at),
       emfdid, display_name, priority, user_priority, date_part('epoch', last_recent_sync),
       date_part('epoch', last_full_sync), date_part('epoch', last_error_at),
       date_part('epoch', gone_at)
FROM (
    (SELECT m.*, {_FOLDER_COLUMNS}
     FROM mine m
     JOIN email_folders f ON f.acntid = m.acntid
     CROSS JOIN LATERAL (
         SELECT f.last_full_sync IS NULL OR f.last_full_sync <= m.full_cut AS full,
                greatest(f.last_recent_sync, f.last_full_sync) AS newest) d
     WHERE f.gone_at IS NULL AND coalesce(f.user_priority, f.priority) = 'hi'
       AND (f.last_error_at IS NULL OR f.last_error_at <= %(error_until)s)
       AND (d.full OR d.newest <= m.recent_cut)
     -- recent syncs first, then the longest overdue (never synced: due now, so last)
     ORDER BY d.full, CASE WHEN d.full THEN m.full_cut - f.last_full_sync
                           ELSE m.recent_cut - d.newest END DESC NULLS LAST
     LIMIT %(limit)s)
    UNION ALL
    (SELECT m.*, {_FOLDER_COLUMNS}
     FROM mine m
     JOIN email_folders f ON f.acntid = m.acntid
     WHERE f.gone_at IS NULL AND coalesce(f.user_priority, f.priority) = 'lo'
       AND (f.last_full_sync IS NULL OR f.last_full_sync < %(lo_start)s)
       AND (f.last_error_at IS NULL OR f.last_error_at <= %(error_until)s)
     ORDER BY f.last_full_sync NULLS FIRST
     LIMIT %(limit)s)
    UNION ALL
    (SELECT m.*, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL
     FROM mine m
     WHERE (m.folders_listed_at IS NULL OR m.folders_listed_at <= %(listed)s)
       AND (m.account_error_at IS NULL OR m.account_error_at <= %(error_until)s)
     ORDER BY m.folders_listed_at NULLS FIRST
     LIMIT %(limit)s)
) due
"""


def candidates_query(host_id: str = DEFAULT_HOST) -> sql.Composed:
    """The planner's one SELECT of candidates (the benchmark times it bare, too)."""
    return sql.SQL(_CANDIDATES).format(mine=accounts_mine(host_id))


def candidates_params(cut: Cutoffs, limit: int | None) -> dict[str, object]:
    """The parameters of ``candidates_query``: the cutoffs as timestamptz, and the most
    rows a branch returns (None: no limit)."""
    names = ("active_since", "auth_until", "error_until", "recent_li", "recent_nl", "full_li",
             "full_nl", "lo_start", "listed")
    params: dict[str, object] = {n: datetime.fromtimestamp(getattr(cut, n), timezone.utc)
                                 for n in names}
    params["limit"] = limit
    return params


def read_candidates(conn: psycopg.Connection, cut: Cutoffs, limit: int | None,
                    host_id: str = DEFAULT_HOST) -> tuple[list[AccountState], list[FolderState]]:
    """The accounts and folders due at ``cut.now`` (``limit`` of each kind), in one query.

    Not prepared: the best plan depends on the cutoffs' values, so it is made for them.
    """
    rows = conn.execute(candidates_query(host_id), candidates_params(cut, limit),
                        prepare=False).fetchall()
    accounts: dict[int, AccountState] = {}
    folders = []
    for row in rows:
        if row[0] not in accounts:
            accounts[row[0]] = AccountState(*row[:5])
        if row[5] is not None:
            folders.append(FolderState(row[0], *row[5:]))
    return list(accounts.values()), folders


# --- a planning pass, and the planner process ----------------------------------------------

@dataclass(frozen=True)
class PassResult:
    """What one planning pass did."""

    fingerprint: str  # store.fingerprint of the PostgreSQL schema, also in the state DB
    accounts: int     # candidate accounts read
    folders: int      # candidate folders read
    due: int          # tasks found due
    added: int        # of those, newly put into a slice; the rest were queued already,
                      # or their slice was full and they wait for a later pass
    seconds: float    # the pass's duration
    standing: cluster.Standing | None = None  # this host's leases after the pass


Beat = Callable[[str, int | None], None]  # (phase, progress): the process's heartbeat


def plan_once(conn: psycopg.Connection, statedb: StateDB, cfg: Config,
              now: float | None = None, tz: tzinfo | None = None,
              beat: Beat | None = None, member: cluster.Member | None = None) -> PassResult:
    """One planning pass: fingerprint, the cluster's part (``cluster.take_part``: this
    host's registration and leases, as ``member``, by default this process), read,
    decide, enqueue.

    A fixed number of statements whatever the number of accounts: the fingerprint's,
    the cluster's, one SELECT, and the outbox's backlog, which the planner records for
    the metrics (the master serves them and never reads PostgreSQL). The fingerprint
    comes first so that an upgrade which breaks the rest is still reported to the
    watchdog. Raises HostConflictError when another live engine holds this host_id.
    """
    started = time.monotonic()
    now = time.time() if now is None else now
    tz = local_zone() if tz is None else tz

    fingerprint = store.fingerprint(conn)
    statedb.set_fact(SCHEMA_FACT, fingerprint)

    member = cluster.Member.of(cfg) if member is None else member
    standing = cluster.take_part(conn, member, busy={t.acntid for t in statedb.tasks()})

    slots = list(range(cfg.sync_workers))
    capacity = len(slots) * cfg.engine.max_tasks_per_worker
    accounts: list[AccountState] = []
    folders: list[FolderState] = []
    if cfg.sync.enabled:  # due_tasks would return nothing: spare the database the read
        accounts, folders = read_candidates(conn, Cutoffs.at(cfg, now, tz), capacity,
                                            member.host_id)

    tasks = due_tasks(accounts, folders, cfg, now, tz)
    if beat is not None:
        beat("enqueueing", None)

    added = statedb.enqueue(tasks, slots=slots, max_per_slot=cfg.engine.max_tasks_per_worker)
    record_backlog(statedb, outbox.counts(conn, waiting_only=True), now)
    return PassResult(fingerprint, len(accounts), len(folders), len(tasks), added,
                      time.monotonic() - started, standing)


def record_backlog(statedb: StateDB, backlog: outbox.Counts, now: float) -> None:
    """The outbox rows waiting, per state, and since when the oldest waits, as engine facts."""
    age = backlog.oldest_waiting_age
    statedb.set_facts({**{f"outbox_{state}": n for state, n in backlog.by_state.items()},
                       "outbox_oldest_since": None if age is None else now - age})


def run_planner(cfg: Config, beat: Beat, should_stop: Callable[[], bool],
                on_connect: Callable[[int | None], None] | None = None,
                master_pid: int | None = None) -> None:
    """The planner process's loop, run after the fork until ``should_stop()``.

    Opens its own PostgreSQL session and state DB, runs a pass every
    ``planner.interval`` seconds and beats on every turn of the loop, idle included.
    A database error is logged (once while it lasts) and the pass retried at the
    next interval on a new session. ``on_connect`` receives the session's backend pid
    (None once it is closed), for the heartbeat row's ``backend_pid``. The host
    registers as the instance of ``master_pid`` (default: this process); another live
    engine with the same host_id ends the loop with HostConflictError.
    """
    planner = _Planner(cfg, beat, on_connect or (lambda pid: None),
                       cluster.Member.of(cfg, master_pid))
    try:
        next_pass = time.monotonic()
        while not should_stop():
            wait = next_pass - time.monotonic()
            if wait > 0:
                beat("idle", planner.passes)
                time.sleep(min(SLEEP_STEP, wait))
                continue
            next_pass = time.monotonic() + cfg.planner.interval
            planner.run_pass()
    finally:
        planner.close()


class _Planner:
    """The planner process's resources between passes: its session, its state DB, and
    the failure being reported, so an outage is one log line, not one a pass."""

    def __init__(self, cfg: Config, beat: Beat, on_connect: Callable[[int | None], None],
                 member: cluster.Member):
        self.cfg = cfg
        self.beat = beat
        self.on_connect = on_connect
        self.member = member
        self.statedb = StateDB.for_config(cfg)
        self.tz = local_zone()
        self.conn: psycopg.Connection | None = None
        self.failure: str | None = None
        self.passes = 0

    def run_pass(self) -> None:
        """One pass on the open session (or a new one); a failure is logged, not raised."""
        self.passes += 1
        self.beat("planning", self.passes)
        try:
            if self.conn is None:
                self.conn = store.connect(self.cfg, "planner")
                self.on_connect(self.conn.info.backend_pid)
            result = plan_once(self.conn, self.statedb, self.cfg, tz=self.tz, beat=self.beat,
                               member=self.member)
        except (psycopg.Error, DatabaseError) as exc:
            self.failed(f"PostgreSQL: {_first_line(exc)}")
            self.disconnect()
            return
        except (StateError, sqlite3.Error) as exc:
            self.failed(f"state DB: {_first_line(exc)}")
            return
        if self.failure is not None:
            log.info("planning works again")
            self.failure = None
        if result.added:
            log.info("planned %d tasks (%d due, %d folders and %d accounts read) in %dms",
                     result.added, result.due, result.folders, result.accounts,
                     round(result.seconds * 1000))

    def failed(self, reason: str) -> None:
        """Log a failure unless it is the one already reported."""
        if reason != self.failure:
            log.error("planning pass failed, retrying every %ds: %s",
                      self.cfg.planner.interval, reason)
        self.failure = reason

    def disconnect(self) -> None:
        """Drop the session, so the next pass starts on a fresh one."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None
            self.on_connect(None)

    def close(self) -> None:
        """Close the session and the state DB (the loop has ended)."""
        self.disconnect()
        self.statedb.close()


def _first_line(exc: BaseException) -> str:
    """An error's first line, for a one-line log message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
