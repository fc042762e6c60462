"""Several hosts on one PostgreSQL: host registration, account leases with a fencing
generation, and the records ``status --cluster`` reads. Every statement on the tables of
migration 0005 is here.

The planner takes part in the cluster once a pass (``take_part``), in a fixed number of
single short statements whatever the number of accounts: it registers its host (or
refuses to start when another live engine has the host_id), renews its leases once a
third of ``cluster.lease_ttl`` has passed, claims free or expired leases up to its fair
share, ``ceil(accounts / live hosts)``, or gives up what it holds above it. Only hosts
below their share claim and only hosts above it give up, so the load spreads when a
host joins and settles without flapping. A lease given up is no longer renewed and
lapses at its expiry, so no worker that trusted it until then can overlap the next
holder; a dead host's leases lapse the same way and its accounts move within one
lease_ttl and a planning pass. One host alone is a cluster of one and holds them all.

A sync worker holds a ``Fence`` for the account it works on: the lease's generation and
a deadline on its own clock ahead of the lease's expiry on the database's clock. Each
batch rechecks the generation at the end of its own transaction (``Fence.hold``) and
is recorded with it (``Fence.record``), so a host that comes back from a pause or a cut
can never commit over the new holder. The IMAP session is used only before the
deadline, and a guard thread cuts it when the deadline passes while the worker is stuck
elsewhere (PostgreSQL unreachable), so the IMAP server never sees two hosts
synchronizing one account.

Delivery takes no lease: send workers claim outbox rows with SKIP LOCKED on any host.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field

import psycopg

from supervisor_mail import __version__
from supervisor_mail.config import Config
from supervisor_mail.errors import HostConflictError, LeaseLost
from supervisor_mail.logs import where

log = logging.getLogger("supervisor_mail.cluster")

RENEW_AFTER = 1 / 3      # of lease_ttl: a lease is renewed once this much of it has passed
REFRESH_BELOW = 1 / 2    # of lease_ttl: a worker rereads its lease when less is left locally
MARGIN = 1 / 6           # of lease_ttl: a worker stops this long before the lease expires
STALL_TTLS = 2           # lease_ttls after which the server ends a batch transaction gone idle
BATCHES_KEPT = "1 day"   # email_sync_batches rows older than this are pruned
MOVES_KEPT = "7 days"    # email_lease_moves rows older than this are pruned

# The accounts that need a lease: those the planner could plan a sync for.
ELIGIBLE = "a.enabled AND coalesce(a.imap_host, '') <> ''"
_LIVE_HOST = "h.heartbeat_at > now() - make_interval(secs => h.lease_ttl)"


# --- the fair share: pure -------------------------------------------------------------------

def fair_share(accounts: int, hosts: int) -> int:
    """The most leases one host should hold: ``ceil(accounts / hosts)`` (a host counts
    itself, so ``hosts`` is at least 1). The shares of all hosts cover every account."""
    return math.ceil(accounts / max(1, hosts))


def rebalance(held: int, share: int) -> tuple[int, int]:
    """(leases to claim, leases to give up) for a host holding ``held`` of a ``share``:
    claim up to the share, give up only what is above it, so that hosts at their share
    never move anything and a settled cluster stays settled."""
    return max(0, share - held), max(0, held - share)


# --- who this host is ---------------------------------------------------------------------------

def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "-"


def _start_ticks(pid: int) -> str:
    """When ``pid`` started, in clock ticks since boot: with the boot id, it tells a pid
    reused later from the process that had it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "-"


def instance_of(pid: int) -> str:
    """One run of one master: ``hostname/boot id/pid/start ticks``."""
    return f"{socket.gethostname()}/{_boot_id()}/{pid}/{_start_ticks(pid)}"


def ran_here_and_ended(instance: str) -> bool:
    """True when ``instance`` ran on this machine since its last boot and its master is
    gone: its heartbeat may still look fresh, but it cannot be a live duplicate."""
    parts = instance.split("/")
    if len(parts) != 4 or parts[0] != socket.gethostname() or parts[1] != _boot_id():
        return False
    return not parts[2].isdigit() or _start_ticks(int(parts[2])) != parts[3]


def group_gone(pid: int) -> bool:
    """True when no process is left in the process group ``pid`` led: a master's workers
    stay in its group (the engine's own start, supervisord and systemd all start it as a
    group leader), so none of them can be left running. A pid reused as another group's
    leader reads as not gone, which only costs waiting for the leases to lapse."""
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # there, another user's
    return False


@dataclass(frozen=True)
class Member:
    """This host as the planner registers it: its host_id, the master's instance and pid,
    and the lease_ttl it holds leases for."""

    host_id: str
    instance: str
    pid: int
    lease_ttl: int

    @classmethod
    def of(cls, cfg: Config, master_pid: int | None = None) -> Member:
        pid = os.getpid() if master_pid is None else master_pid
        return cls(cfg.engine.host_id, instance_of(pid), pid, cfg.cluster.lease_ttl)


# --- a planning pass's part ---------------------------------------------------------------------

@dataclass(frozen=True)
class Claimed:
    """A lease taken this pass: the account, its new generation, from whom and why."""

    acntid: int
    generation: int
    from_host: str | None
    reason: str  # 'new' (never held), 'released' (given up), 'expired' (its holder stopped)


@dataclass(frozen=True)
class Standing:
    """This host's place in the cluster after one pass."""

    hosts: int          # live hosts, this one included
    accounts: int       # accounts that need a lease
    share: int          # fair_share(accounts, hosts)
    held: int           # live leases held before this pass's claims and releases
    renewed: int        # of those, renewed this pass
    claimed: list[Claimed] = field(default_factory=list)
    released: list[int] = field(default_factory=list)


_REGISTER = f"""
WITH prev AS (
    SELECT instance, hostname, pid, date_part('epoch', now() - heartbeat_at) AS age
    FROM email_cluster_hosts WHERE host_id = %(host)s),
up AS (
    INSERT INTO email_cluster_hosts AS h (host_id, instance, hostname, pid, version, lease_ttl,
                                          started_at, heartbeat_at)
    VALUES (%(host)s, %(instance)s, %(hostname)s, %(pid)s, %(version)s, %(ttl)s, now(), now())
    ON CONFLICT (host_id) DO UPDATE SET
        instance = EXCLUDED.instance, hostname = EXCLUDED.hostname, pid = EXCLUDED.pid,
        version = EXCLUDED.version, lease_ttl = EXCLUDED.lease_ttl, heartbeat_at = now(),
        started_at = CASE WHEN h.instance = EXCLUDED.instance THEN h.started_at ELSE now() END
    WHERE h.instance = EXCLUDED.instance OR %(force)s OR NOT ({_LIVE_HOST})
    RETURNING 1),
-- A new instance under this host_id takes over what the last one held: at once under
-- new generations when that run and all its processes are known to be gone (adopt),
-- else by letting it lapse, to be claimed anew; either way none of the last run's
-- workers can commit under it any more.
handover AS (
    UPDATE email_account_leases
    SET releasing = NOT %(adopt)s,
        generation = generation + CASE WHEN %(adopt)s THEN 1 ELSE 0 END,
        acquired_at = CASE WHEN %(adopt)s THEN now() ELSE acquired_at END
    WHERE host_id = %(host)s AND expires_at > now() AND (%(adopt)s OR NOT releasing)
      AND EXISTS (SELECT FROM up) AND EXISTS (SELECT FROM prev WHERE instance <> %(instance)s)
    RETURNING 1)
SELECT EXISTS (SELECT FROM up), p.instance, p.hostname, p.pid, p.age,
       (SELECT count(*) FROM handover)
FROM (VALUES (1)) one LEFT JOIN prev p ON true"""

# One scan: live hosts, accounts needing a lease, those this host holds, and accounts
# without a lease row at all (inserted while triggers were off, as a restore or a replica
# may do: they would never be synchronized).
_STANDING = f"""
SELECT (SELECT count(*) FROM email_cluster_hosts h WHERE {_LIVE_HOST}),
       count(*) FILTER (WHERE {ELIGIBLE}),
       count(*) FILTER (WHERE {ELIGIBLE} AND l.host_id = %(host)s AND NOT l.releasing
                          AND l.expires_at > now()),
       count(*) FILTER (WHERE l.acntid IS NULL)
FROM email_accounts a LEFT JOIN email_account_leases l USING (acntid)"""

_ADD_MISSING = """
INSERT INTO email_account_leases (acntid)
SELECT a.acntid FROM email_accounts a LEFT JOIN email_account_leases l USING (acntid)
WHERE l.acntid IS NULL
ON CONFLICT DO NOTHING"""

_RENEW = f"""
UPDATE email_account_leases l SET expires_at = now() + make_interval(secs => %(ttl)s)
FROM email_accounts a
WHERE a.acntid = l.acntid AND {ELIGIBLE}
  AND l.host_id = %(host)s AND NOT l.releasing AND l.expires_at > now()
  AND l.expires_at <= now() + make_interval(secs => %(ttl)s * %(keep)s)"""

# SKIP LOCKED: a lease whose last holder is committing a batch under it (Fence.hold keeps
# it share-locked) is taken at a later pass, after that commit, never under it.
_CLAIM = f"""
WITH free AS (
    SELECT l.acntid, l.host_id AS from_host,
           CASE WHEN l.host_id IS NULL THEN 'new' WHEN l.releasing THEN 'released'
                ELSE 'expired' END AS reason
    FROM email_account_leases l JOIN email_accounts a USING (acntid)
    WHERE {ELIGIBLE} AND l.expires_at <= now()
    ORDER BY l.acntid
    LIMIT %(n)s
    FOR UPDATE OF l SKIP LOCKED),
taken AS (
    UPDATE email_account_leases l
    SET host_id = %(host)s, generation = l.generation + 1, acquired_at = now(),
        expires_at = now() + make_interval(secs => %(ttl)s), releasing = false
    FROM free WHERE l.acntid = free.acntid
    RETURNING l.acntid, l.generation, free.from_host, free.reason),
moved AS (
    INSERT INTO email_lease_moves (acntid, from_host, to_host, generation, reason)
    SELECT acntid, from_host, %(host)s, generation, reason FROM taken)
SELECT acntid, generation, from_host, reason FROM taken ORDER BY acntid"""

# Accounts with no task in this host's slices are given up first, the newest leases first.
_RELEASE = f"""
WITH give AS (
    SELECT l.acntid FROM email_account_leases l JOIN email_accounts a USING (acntid)
    WHERE {ELIGIBLE} AND l.host_id = %(host)s AND NOT l.releasing AND l.expires_at > now()
    ORDER BY l.acntid = ANY (%(busy)s), l.acquired_at DESC, l.acntid DESC
    LIMIT %(n)s)
UPDATE email_account_leases l SET releasing = true
FROM give WHERE l.acntid = give.acntid
RETURNING l.acntid"""

_PRUNE = f"""
WITH batches AS (
    DELETE FROM email_sync_batches WHERE committed_at < now() - interval '{BATCHES_KEPT}')
DELETE FROM email_lease_moves WHERE moved_at < now() - interval '{MOVES_KEPT}'"""


def take_part(conn: psycopg.Connection, member: Member,
              busy: Collection[int] = ()) -> Standing:
    """The cluster's part of a planning pass: register, renew, claim or give up, prune.

    Raises HostConflictError when another live engine holds this host_id. ``busy`` are
    the accounts with tasks in this host's slices, given up last.
    """
    register(conn, member)
    params = {"host": member.host_id, "ttl": member.lease_ttl, "keep": 1 - RENEW_AFTER}
    hosts, accounts, held, missing = conn.execute(_STANDING, params).fetchone()
    if missing:
        added = conn.execute(_ADD_MISSING).rowcount
        log.warning("%d accounts had no lease row (inserted with triggers off?): added", added)
    renewed = conn.execute(_RENEW, params).rowcount
    share = fair_share(accounts, hosts)
    claim, give_up = rebalance(held, share)
    claimed = [Claimed(*row) for row in conn.execute(_CLAIM, {**params, "n": claim})]
    released = [acntid for (acntid,) in conn.execute(
        _RELEASE, {**params, "n": give_up, "busy": list(busy)})]
    conn.execute(_PRUNE)
    standing = Standing(hosts, accounts, share, held, renewed, claimed, released)
    _log_changes(member, standing)
    return standing


def register(conn: psycopg.Connection, member: Member) -> None:
    """Record this host's heartbeat; the first time, its registration.

    Refused, with a HostConflictError, while another instance of this host_id beats:
    unless that instance ran on this machine and its master is gone (an engine
    restarted at once after a crash or a stop); its leases then go on under new
    generations, or lapse first if a process of its group may still run.
    """
    ok, instance, hostname, pid, age, handed_over = _upsert(conn, member, False, False)
    adopt = False
    if not ok and instance and ran_here_and_ended(instance):
        adopt = group_gone(pid)
        ok, _, _, _, _, handed_over = _upsert(conn, member, True, adopt)
    if not ok:
        raise HostConflictError(
            f"host_id {member.host_id!r} is in use by a live engine on this database "
            f"(master pid {pid} on {hostname}, heartbeat {age:.0f}s ago): give every host "
            "its own [engine] host_id")
    if handed_over and adopt:
        log.info("host %s restarted, its previous run gone: its %d leases go on under new "
                 "generations", member.host_id, handed_over)
    elif handed_over:
        log.info("host %s starts anew: the %d leases of its previous run lapse and are "
                 "claimed again", member.host_id, handed_over)


def _upsert(conn: psycopg.Connection, member: Member, force: bool, adopt: bool) -> tuple:
    return conn.execute(_REGISTER, {
        "host": member.host_id, "instance": member.instance, "hostname": socket.gethostname(),
        "pid": member.pid, "version": __version__, "ttl": member.lease_ttl,
        "force": force, "adopt": adopt}).fetchone()


def _log_changes(member: Member, standing: Standing) -> None:
    for c in standing.claimed:
        how = {"new": "never held before", "released": f"given up by {c.from_host}",
               "expired": f"expired on {c.from_host}"}[c.reason]
        log.info("lease taken, generation %d (%s)", c.generation, how, extra=where(c.acntid))
    for acntid in standing.released:
        log.info("lease given up: above the fair share; it lapses and moves", extra=where(acntid))
    if standing.claimed or standing.released:
        log.info("host %s: %d live hosts, %d accounts, fair share %d; took %d leases, "
                 "gave up %d", member.host_id, standing.hosts, standing.accounts, standing.share,
                 len(standing.claimed), len(standing.released))


# --- a sync worker's fence ------------------------------------------------------------------------

_LEASE = """
SELECT generation, date_part('epoch', expires_at - clock_timestamp())
FROM email_account_leases
WHERE acntid = %(acntid)s AND host_id = %(host)s AND expires_at > clock_timestamp()"""


# set_config: the stall bound for the rest of the transaction, in the same round trip.
_HOLD = f"""
SELECT l.*, set_config('idle_in_transaction_session_timeout', %(stall)s, true)
FROM ({_LEASE} AND generation = %(generation)s FOR KEY SHARE) l"""


class Fence:
    """A sync worker's hold on one account's lease, for one IMAP session.

    ``deadline`` is on this host's monotonic clock: the lease's time left, measured
    on the database's clock and counted from just before it was asked, less ``margin``.
    It moves forward at every confirmation (``take``, ``ensure``, each commit's ``hold``);
    once it passes the session may not be used, and ``guard`` (when given) cuts it.
    """

    def __init__(self, cfg: Config, acntid: int, guard: Guard | None = None):
        self.acntid = acntid
        self.host_id = cfg.engine.host_id
        self.ttl = ttl = cfg.cluster.lease_ttl
        self.margin, self.refresh_below = ttl * MARGIN, ttl * REFRESH_BELOW
        self.guard = guard
        self.generation: int | None = None
        self.deadline = 0.0
        # Held around a batch's transaction on the writer thread, so that a lease reread
        # from the worker's thread never runs inside that transaction on the shared session.
        self._session_lock = threading.Lock()

    def take(self, conn: psycopg.Connection) -> int:
        """At a task's start: the generation of the lease this host holds on the account
        and is not giving up. LeaseLost when there is none, or when it is not the
        generation this fence was taken under (the lease was lost in between)."""
        asked = time.monotonic()
        row = conn.execute(_LEASE + " AND NOT releasing",
                           {"acntid": self.acntid, "host": self.host_id}).fetchone()
        if row is None or (self.generation is not None and row[0] != self.generation):
            raise LeaseLost(f"this host ({self.host_id}) holds no lease on account "
                            f"{self.acntid} to synchronize it under")
        self.generation = row[0]
        self._confirm(asked, row[1])
        return self.generation

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def check(self) -> None:
        """LeaseLost once the deadline has passed."""
        if self.left() <= 0:
            raise LeaseLost(f"the lease of host {self.host_id} on account {self.acntid} "
                            f"(generation {self.generation}) runs out")

    def ensure(self, conn: psycopg.Connection) -> None:
        """Before using the IMAP session: reread the lease when less than half of it is left
        here (its own planner renews it at two thirds), then ``check``. Skipped while a
        batch commits: that commit confirms the lease anyway."""
        if self.left() < self.refresh_below and self._session_lock.acquire(blocking=False):
            try:
                asked = time.monotonic()
                row = conn.execute(_LEASE + " AND generation = %(generation)s",
                                   self._params()).fetchone()
                if row is None:
                    self.deadline = asked
                else:
                    self._confirm(asked, row[1])
            finally:
                self._session_lock.release()
        self.check()

    @contextmanager
    def committing(self) -> Iterator[None]:
        """Around a batch's transaction (on the writer thread)."""
        with self._session_lock:
            yield

    @contextmanager
    def transaction(self, conn: psycopg.Connection, what: str) -> Iterator[None]:
        """One transaction on the account's data (a batch, flag changes, a listing, a
        cursor reset) that commits only while this host holds the lease under this
        generation: ``bound_stall`` at its start, ``hold`` at its end (LeaseLost rolls
        all of it back)."""
        with self.committing(), conn.transaction():
            self.bound_stall(conn)
            yield
            self.hold(conn, what)

    def bound_stall(self, conn: psycopg.Connection) -> None:
        """At a batch transaction's start: should this host stall inside it (cut off from
        the database), the server ends it after ``STALL_TTLS`` lease_ttl, releasing the
        folder's cursor row for the lease's next holder. Longer than one lease_ttl, so that
        a host back from a short cut reaches ``hold`` and is refused there."""
        conn.execute(f"SET LOCAL idle_in_transaction_session_timeout = "
                     f"{int(self.ttl * STALL_TTLS * 1000)}")

    def hold(self, conn: psycopg.Connection, what: str) -> None:
        """At a batch transaction's end, before the commit: share-lock the lease row if this
        host still holds this generation, else LeaseLost (the transaction rolls back).
        Another host's claim skips a locked row, so the lease cannot move between this
        check and the commit; a claim made before it raised the generation. The lock is
        what holds the lease's next claim back, so from here the server ends a stalled
        transaction within ``margin``, before the lease's expiry plus a planning pass."""
        asked = time.monotonic()
        row = conn.execute(_HOLD, {**self._params(),
                                   "stall": str(max(1, int(self.margin * 1000)))}).fetchone()
        if row is None:
            self.deadline = asked
            holder = conn.execute("SELECT host_id, generation FROM email_account_leases "
                                  "WHERE acntid = %s", (self.acntid,)).fetchone()
            now_held = f"held by {holder[0]} under generation {holder[1]}" \
                if holder and holder[0] else "held by no host"
            raise LeaseLost(f"{what} refused: host {self.host_id} no longer holds the lease "
                            f"of account {self.acntid} under generation {self.generation} "
                            f"(now {now_held})")
        self._confirm(asked, row[1])

    def record(self, conn: psycopg.Connection, emfdid: int, last_uid: int, messages: int) -> None:
        """In the same transaction: the batch's host, generation and last UID."""
        conn.execute("INSERT INTO email_sync_batches (acntid, emfdid, host_id, generation, "
                     "last_uid, messages) VALUES (%s, %s, %s, %s, %s, %s)",
                     (self.acntid, emfdid, self.host_id, self.generation, last_uid, messages))

    def attach(self, cut: Callable[[], None]) -> None:
        """The IMAP session is open: ``cut`` severs it should the deadline pass."""
        if self.guard is not None:
            self.guard.watch(self, cut)

    def detach(self) -> None:
        """The IMAP session is being closed by its own thread: nothing to cut any more."""
        if self.guard is not None:
            self.guard.unwatch(self)

    def _confirm(self, asked: float, remaining: float) -> None:
        self.deadline = asked + remaining - self.margin

    def _params(self) -> dict[str, object]:
        return {"acntid": self.acntid, "host": self.host_id, "generation": self.generation}


class Guard:
    """A sync worker's guard thread: cuts the open IMAP session whose fence deadline passes
    while the worker's own thread is stuck elsewhere (a PostgreSQL call through a stalled
    network has no timeout of ours). The worker's thread then fails its next read, and
    reconnects only if its fence, reread, allows. Never beats and never logs: it only
    keeps the one-host-per-account promise on the IMAP server's side."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._fence: Fence | None = None
        self._cut: Callable[[], None] | None = None
        self._thread: threading.Thread | None = None

    def watch(self, fence: Fence, cut: Callable[[], None]) -> None:
        with self._cond:
            if self._thread is None:  # started on first use, after the fork
                self._thread = threading.Thread(target=self._run, name="fence-guard",
                                                daemon=True)
                self._thread.start()
            self._fence, self._cut = fence, cut
            self._cond.notify()

    def unwatch(self, fence: Fence) -> None:
        # Under the lock: once this returns the guard cannot cut, so the session's socket
        # may be closed and its descriptor reused safely.
        with self._cond:
            if self._fence is fence:
                self._fence = self._cut = None

    def _run(self) -> None:
        with self._cond:
            while True:
                if self._fence is None:
                    self._cond.wait()
                    continue
                left = self._fence.left()
                if left > 0:
                    self._cond.wait(left)  # a confirmation moves the deadline: look again
                    continue
                cut, self._fence, self._cut = self._cut, None, None
                cut()


def sever(sock: socket.socket) -> None:
    """Shut a connected socket down from any thread: the peer sees the connection end at
    once and the thread reading it gets end-of-file. Done on a duplicate descriptor, so
    the owner's socket object (and its TLS state) is left for its owner to close."""
    try:
        fd = os.dup(sock.fileno())
    except OSError:
        return  # already closed by its owner
    with socket.socket(fileno=fd) as dup:
        try:
            dup.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already disconnected


# --- status --cluster -----------------------------------------------------------------------------

_HOSTS = f"""
SELECT h.host_id, h.hostname, h.pid, h.version, h.lease_ttl,
       date_part('epoch', h.started_at), date_part('epoch', now() - h.heartbeat_at),
       {_LIVE_HOST},
       count(l.acntid) FILTER (WHERE l.expires_at > now() AND NOT l.releasing),
       count(l.acntid) FILTER (WHERE l.expires_at > now() AND l.releasing),
       coalesce(array_agg(l.acntid ORDER BY l.acntid)
                FILTER (WHERE l.expires_at > now()), '{{}}'),
       (SELECT count(DISTINCT b.acntid) FROM email_sync_batches b
        WHERE b.host_id = h.host_id AND b.committed_at > now() - interval '1 hour')
FROM email_cluster_hosts h
LEFT JOIN email_account_leases l ON l.host_id = h.host_id
GROUP BY h.host_id ORDER BY h.host_id"""

_UNLEASED = f"""
SELECT coalesce(array_agg(a.acntid ORDER BY a.acntid), '{{}}')
FROM email_accounts a JOIN email_account_leases l USING (acntid)
WHERE {ELIGIBLE} AND l.expires_at <= now()"""

_MOVES = """
SELECT acntid, from_host, to_host, generation, reason, date_part('epoch', moved_at)
FROM email_lease_moves ORDER BY id DESC LIMIT %s"""


def overview(conn: psycopg.Connection, moves: int = 20) -> dict[str, object]:
    """Hosts, their leases and the last ``moves`` claims, for ``status --cluster``::

        {"hosts": [{"host_id": "mail-a", "hostname": "a.example.org", "pid": 4711,
                    "version": "0.1.0", "lease_ttl": 60, "started_at": 1700000000.0,
                    "heartbeat_age": 1.2, "live": true, "leases": 20, "releasing": 0,
                    "accounts": [1, 2, ...], "synced_last_hour": 18}, ...],
         "unleased": [41],
         "moves": [{"acntid": 7, "from": "mail-b", "to": "mail-a", "generation": 3,
                    "reason": "expired", "moved_at": 1700000100.0}, ...]}
    """
    hosts = [{"host_id": r[0], "hostname": r[1], "pid": r[2], "version": r[3],
              "lease_ttl": r[4], "started_at": r[5], "heartbeat_age": r[6], "live": r[7],
              "leases": r[8], "releasing": r[9], "accounts": list(r[10]),
              "synced_last_hour": r[11]}
             for r in conn.execute(_HOSTS)]
    unleased = conn.execute(_UNLEASED).fetchone()[0]
    recent = [{"acntid": r[0], "from": r[1], "to": r[2], "generation": r[3], "reason": r[4],
               "moved_at": r[5]} for r in conn.execute(_MOVES, (moves,))]
    return {"hosts": hosts, "unleased": list(unleased), "moves": recent}


def fenced(conn: psycopg.Connection, fence: Fence | None,
           what: str) -> AbstractContextManager[object]:
    """A transaction on an account's data: fenced by its lease in the engine's workers
    (``Fence.transaction``), plain for ``supervisor-mail sync``, which has none."""
    return fence.transaction(conn, what) if fence is not None else conn.transaction()
