"""Several real engines on one PostgreSQL and one IMAP server with 40 accounts (issue 8):
the accounts are shared out fairly, a host that joins gets its share, a SIGKILLed host's
accounts move within the bound, a host cut off from PostgreSQL loses its leases and is
refused by fencing when it comes back. In each, every account is synchronized by one host
at a time — checked from the IMAP server's log (no two sessions of one user overlap) and
from the engine's batch records (no two holders' commits overlap) — no message is stored
twice and no outbox message is sent twice."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections import Counter

import pytest
from outbox_helpers import message_ids, smtp_account
from pg_cut_proxy import CutProxy
from running_engine import Engine, message
from sync_helpers import FIRST_SERVER

from supervisor_mail import accounts
from supervisor_mail.embedded import cluster_check
from supervisor_mail.embedded.imap_admin import Mailbox

ACCOUNTS = 40
LEASE_TTL = 6
CLUSTER = {"engine__max_workers": 4, "engine__send_workers": 1, "cluster__lease_ttl": LEASE_TTL,
           "planner__interval": 1, "sync__batch_size": 1,
           # a host cut off for longer than a lease must live through it, blocked, to be
           # refused when it comes back: no watchdog kill, no statement timeout on the way
           "watchdog__worker_timeout": 30, "watchdog__stall_timeout": 60,
           "database__statement_timeout": 30}
# Messages per account: enough that the sync still runs when the cluster changes; pymap
# is about fifteen times slower than Dovecot.
MAIL = {"dovecot": 40, "pymap": 8}
# A lease moves within lease_ttl and one planning pass; the slack is for a loaded machine.
TAKEOVER_BOUND = LEASE_TTL + 1 + 2


@pytest.fixture
def hosts(tmp_path, db_dsn):
    """``hosts("host-a", dsn=...)``: an engine with its own host_id and directories, not yet
    started; every one is stopped afterwards and leaves no process behind."""
    engines: list[Engine] = []

    def make(host_id: str, dsn: str | None = None, **changes) -> Engine:
        root = tmp_path / host_id
        root.mkdir()
        engines.append(Engine(root, dsn or db_dsn,
                              **{"engine__host_id": host_id, **CLUSTER, **changes}))
        return engines[-1]

    yield make
    for engine in engines:
        engine.__exit__(None, None, None)
    for engine in engines:
        assert engine.leftovers() == [], f"{engine.cfg.engine.host_id} left processes behind"


class Mail(dict):
    """40 accounts on the IMAP server, each with its mail waiting in INBOX, appended before
    any engine starts (so that every session the server logs later is an engine's); as a
    dict, ``{acntid: login}`` of the accounts added to the database so far."""

    def __init__(self, db, imap_server):
        super().__init__()
        self.db = db
        self.count = MAIL[imap_server.name]
        self.total = ACCOUNTS * self.count
        self.accounts = []
        for n in range(ACCOUNTS):
            account = imap_server.new_account()
            with Mailbox.for_account(account) as box:
                box.append_many("INBOX", [(message(n * 1000 + k), None)
                                          for k in range(self.count)])
            self.accounts.append(account)

    def add_accounts(self) -> None:
        """The accounts' rows, in one transaction: hosts already running see them at once
        and share them out in the same pass."""
        with self.db.transaction():
            for account in self.accounts:
                acntid = accounts.add(self.db, email=f"{account.login}@example.org",
                                      imap_host=account.server.host,
                                      imap_port=account.server.port, imap_security="plain",
                                      imap_login=account.login, imap_password=account.password)
                self[acntid] = account.login

    def pending(self, acntids: set[int]) -> set[int]:
        """Those of ``acntids`` whose mail is not all stored yet."""
        done = {a for a, n in self.db.execute(
            "SELECT f.acntid, count(*) FROM email_messages m JOIN email_folders f"
            " USING (emfdid) GROUP BY 1") if n == self.count}
        return set(acntids) - done


@pytest.fixture
def mail(db, imap_server) -> Mail:
    return Mail(db, imap_server)


def wait(predicate, timeout: float, what: str, *engines: Engine, step: float = 0.1):
    """Poll until ``predicate()`` is true; fail when a running engine's master exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        for engine in engines:
            if engine.proc is not None and engine.proc.poll() is not None:
                raise AssertionError(f"{engine.cfg.engine.host_id} exited while waiting for "
                                     f"{what}: {engine.stderr_tail()}")
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def leases(db) -> dict[str, set[int]]:
    """Live leases not being given up, by host."""
    held: dict[str, set[int]] = {}
    for host, acntid in db.execute("SELECT host_id, acntid FROM email_account_leases WHERE"
                                   " expires_at > now() AND NOT releasing"):
        held.setdefault(host, set()).add(acntid)
    return held


def shares(db) -> dict[str, int]:
    return {host: len(ids) for host, ids in leases(db).items()}


def releasing(db) -> int:
    return db.execute("SELECT count(*) FROM email_account_leases WHERE releasing AND"
                      " expires_at > now()").fetchone()[0]


def stored(db) -> int:
    return db.execute("SELECT count(*) FROM email_messages").fetchone()[0]


def moves(db) -> int:
    return db.execute("SELECT count(*) FROM email_lease_moves").fetchone()[0]


def assert_one_host_at_a_time(db, imap_server, mail) -> None:
    """No account had two IMAP sessions at once (the server's log) or commits under two
    holders at overlapping times (the batch records), and no message is stored twice."""
    found = cluster_check.sessions(imap_server)
    engine_sessions = [s for s in found if s.user in set(mail.values())]
    assert len(engine_sessions) > ACCOUNTS  # the fixture's own, then the engines'
    assert cluster_check.overlapping_users(found, set(mail.values())) == set()
    windows = cluster_check.commit_windows(db)
    assert {w.acntid for w in windows} == set(mail)
    assert cluster_check.double_committed(windows) == set()
    assert cluster_check.stored_twice(db) == 0


def test_two_hosts_split_the_accounts_and_a_third_gets_its_share(hosts, db, imap_server, mail,
                                                                 smtp_sink):
    """Shares go 40, 20/20, 14/14/12 as hosts join, then hold still; each syncs its own."""
    mail.add_accounts()
    outbox = smtp_account(db, smtp_sink)
    a, b, c = hosts("host-a"), hosts("host-b"), hosts("host-c")
    a.start()
    wait(lambda: shares(db) == {"host-a": ACCOUNTS}, 10, "host-a alone holding all", a)
    b.start()
    wait(lambda: shares(db) == {"host-a": 20, "host-b": 20} and not releasing(db),
         LEASE_TTL + 10, "20 leases each", a, b)
    c.start()
    wait(lambda: sorted(shares(db).values()) == [12, 14, 14] and not releasing(db),
         LEASE_TTL + 10, "14, 14 and 12 leases", a, b, c)
    held, settled = leases(db), moves(db)
    assert len(held["host-c"]) == 12 and set().union(*held.values()) == set(mail)
    assert settled == ACCOUNTS + 20 + 12  # a took all, gave b half, a and b gave c 12
    queue(db, outbox, range(10))  # three hosts' send workers race for them

    # Every folder due again: each host syncs exactly the accounts it holds, and over
    # more than a lease_ttl of renewals nothing moves.
    wait(lambda: stored(db) == mail.total, 90, "all mail stored", a, b, c)
    since = time.time()
    db.execute("UPDATE email_folders SET last_recent_sync = NULL, last_full_sync = NULL")
    for engine in (a, b, c):
        mine = held[engine.cfg.engine.host_id]
        wait(lambda e=engine, m=mine: synced_accounts(e, since) >= m, 30, "each host's syncs",
             engine)
        assert synced_accounts(engine, since) == mine
    time.sleep(max(0.0, since + LEASE_TTL + 1 - time.time()))
    assert moves(db) == settled and leases(db) == held

    result = c.command("status", "--cluster")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()
            if line.startswith("host-")}
    assert set(rows) == {"host-a", "host-b", "host-c"}
    assert [rows[h][rows[h].index("live") + 1] for h in sorted(rows)] == \
        [str(len(held[h])) for h in sorted(rows)]
    assert "none: every account is held" in result.stdout
    assert smtp_sink.wait_for(10, timeout=20)
    as_json = json.loads(c.command("status", "--cluster", "--json").stdout)
    assert {h["host_id"]: set(h["accounts"]) for h in as_json["hosts"]} == held
    assert all(h["live"] and h["heartbeat_age"] < LEASE_TTL for h in as_json["hosts"])
    assert as_json["unleased"] == [] and len(as_json["moves"]) == 20
    for engine in (a, b, c):
        engine.stop()
    assert_one_host_at_a_time(db, imap_server, mail)
    assert sorted(Counter(message_ids(smtp_sink)).values()) == [1] * 10


def synced_accounts(engine: Engine, since: float) -> set[int]:
    """Accounts whose INBOX the engine finished syncing after ``since`` (its info log)."""
    found = set()
    for line in engine.info_lines():
        match = re.match(r"\[([\d-]+ [\d:]+)\].* received \d+ new messages? in \d+s "
                         r"\[(\d+),\d+\]$", line)
        if match and time.mktime(time.strptime(match[1], "%Y-%m-%d %H:%M:%S")) >= int(since):
            found.add(int(match[2]))
    return found


def start_sharing(hosts, db, mail, **changes) -> tuple[Engine, Engine]:
    """host-a and host-b running, then the 40 accounts added: each takes 20 in its next
    pass and starts on their mail at once."""
    a, b = hosts("host-a", **changes), hosts("host-b")
    a.start()
    b.start()
    mail.add_accounts()
    wait(lambda: shares(db) == {"host-a": 20, "host-b": 20}, 10, "20 leases each", a, b)
    wait(lambda: db.execute("SELECT count(DISTINCT host_id) FROM email_sync_batches")
         .fetchone()[0] == 2, 20, "both hosts committing", a, b)
    return a, b


def queue(db, acntid: int, numbers: range) -> None:
    for n in numbers:
        db.execute("INSERT INTO email_outbox (acntid, recipients, raw) VALUES (%s, %s, %s)",
                   (acntid, ["rcpt@example.org"], message(90_000 + n)))


def test_a_sigkilled_host_hands_its_accounts_over_within_the_bound(hosts, db, imap_server, mail,
                                                                     smtp_sink):
    """A host's process group SIGKILLed mid-sync: the other takes all within the bound."""
    outbox = smtp_account(db, smtp_sink)  # SMTP only: it needs no lease
    queue(db, outbox, range(5))
    a, b = start_sharing(hosts, db, mail)
    assert smtp_sink.wait_for(5, timeout=20)
    held = leases(db)["host-a"]
    left = mail.pending(held)
    assert len(left) >= 5, "host-a had nearly finished before the kill: more mail is needed"

    a.worker_pids()  # every pid it has, for the leftovers check
    os.killpg(a.master_pid, signal.SIGKILL)
    killed = time.time()
    a.proc.wait(5)
    wait(lambda: not a.leftovers(), 10, "every process of host-a gone")
    took_over = wait(lambda: shares(db) == {"host-b": ACCOUNTS} and time.time(),
                     TAKEOVER_BOUND + 2, "host-b holding all", b) - killed
    assert took_over <= TAKEOVER_BOUND, took_over
    queue(db, outbox, range(5, 10))
    wait(lambda: stored(db) == mail.total, 90, "all mail stored", b)
    assert smtp_sink.wait_for(10, timeout=20)
    b.stop()

    first = min(w.first for w in cluster_check.commit_windows(db)
                if w.host_id == "host-b" and w.acntid in left)
    assert first - killed <= LEASE_TTL + 5
    assert_one_host_at_a_time(db, imap_server, mail)
    assert max(Counter(message_ids(smtp_sink)).values()) == 1
    assert len(smtp_sink.messages) == 10


@pytest.mark.parametrize("imap_server", [FIRST_SERVER], indirect=True)
def test_a_host_cut_off_from_postgresql_loses_its_leases_and_is_fenced(hosts, db, db_dsn,
                                                                       imap_server, mail,
                                                                       smtp_sink):
    """A host cut off from PostgreSQL loses its leases; healed, its stale batch is refused."""
    outbox = smtp_account(db, smtp_sink)
    with CutProxy(db_dsn) as proxy:
        a, b = start_sharing(hosts, db, mail, dsn=proxy.dsn)
        queue(db, outbox, range(5))
        assert smtp_sink.wait_for(5, timeout=20)
        assert len(mail.pending(leases(db)["host-a"])) >= 5, \
            "host-a had nearly finished before the cut: more mail is needed"
        # cut while each sync worker of host-a is between FETCH and commit, batch in hand
        wait(lambda: [hb.phase for hb in a.heartbeats() if hb.role == "sync"]
             == ["fetch"] * 3, 20, "host-a's workers all fetching", a, step=0.01)
        proxy.cut()
        cut = time.time()
        took_over = wait(lambda: shares(db) == {"host-b": ACCOUNTS} and time.time(),
                         TAKEOVER_BOUND + 2, "host-b holding all", b) - cut
        assert took_over <= TAKEOVER_BOUND, took_over
        queue(db, outbox, range(5, 10))  # host-b delivers them, host-a cannot claim any
        assert smtp_sink.wait_for(10, timeout=20)
        proxy.heal()
        refused = wait(lambda: [line for line in a.info_lines() if "refused: host host-a no "
                                "longer holds the lease" in line], 30, "the stale batch refused",
                       a, b)
        assert re.search(r"batch of \d+ messages for folder \d+ refused: host host-a no longer "
                         r"holds the lease of account \d+ under generation \d+ \(now held by "
                         r"host-b under generation \d+\)", refused[0]), refused[0]
        wait(lambda: shares(db) == {"host-a": 20, "host-b": 20}, LEASE_TTL + 15,
             "20 leases each again", a, b)
        wait(lambda: stored(db) == mail.total, 90, "all mail stored", a, b)
        a.stop()
        b.stop()
    assert_one_host_at_a_time(db, imap_server, mail)
    assert sorted(Counter(message_ids(smtp_sink)).values()) == [1] * 10
    late = db.execute("SELECT count(*) FROM email_sync_batches s JOIN email_lease_moves m"
                      " ON m.acntid = s.acntid AND m.to_host = 'host-b'"
                      " WHERE s.host_id = 'host-a' AND s.generation < m.generation"
                      " AND s.committed_at > m.moved_at").fetchone()[0]
    assert late == 0, "host-a committed under a generation host-b had already replaced"


def test_a_second_engine_with_a_live_host_id_refuses_to_start(hosts, db):
    """A second engine with a live host_id halts with one line naming it and the fix."""
    first = hosts("host-a").start()
    wait(lambda: db.execute("SELECT count(*) FROM email_cluster_hosts").fetchone()[0], 10,
         "host-a registered", first)
    second = hosts("host-a-again", engine__host_id="host-a")
    started = time.monotonic()
    result = second.command("run", timeout=60)
    assert time.monotonic() - started < 30
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert re.fullmatch(r"supervisor-mail: planner cannot start \(3 times in a row\): host_id "
                        r"'host-a' is in use by a live engine on this database \(master pid "
                        rf"{first.master_pid} on \S+, heartbeat \d+s ago\): give every host its "
                        r"own \[engine\] host_id\n", result.stderr), result.stderr
    assert first.proc.poll() is None
    assert db.execute("SELECT pid FROM email_cluster_hosts").fetchall() == [(first.master_pid,)]


def test_a_host_restarted_goes_on_with_its_leases_at_once(hosts, db):
    """Stopped and started again, a host takes its leases back at once, new generations."""
    for n in range(3):  # no IMAP server behind them: only the leases matter here
        accounts.add(db, email=f"r{n}@example.org", imap_host="127.0.0.1", imap_port=1,
                     imap_security="plain", imap_login="r", imap_password="r")
    engine = hosts("host-a").start()
    wait(lambda: shares(db) == {"host-a": 3}, 10, "the leases taken", engine)
    engine.stop()
    engine.start()
    started = time.monotonic()
    wait(lambda: db.execute("SELECT count(*) FROM email_account_leases WHERE host_id = 'host-a'"
                            " AND generation = 2 AND NOT releasing").fetchone()[0] == 3, 10,
         "the leases under new generations", engine)
    assert time.monotonic() - started < LEASE_TTL / 2
    # the planner logs it just after the pass that committed the new generations
    wait(lambda: any("host host-a restarted, its previous run gone: its 3 leases go on under "
                     "new generations" in line for line in engine.info_lines()), 5,
         "the restart logged", engine)
