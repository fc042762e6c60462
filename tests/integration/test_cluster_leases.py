"""The cluster's statements on real PostgreSQL, without engines: registration and the
host_id conflict, claims, renewals and releases of a planning pass, and the fence of a
sync batch's transaction."""

from __future__ import annotations

import os

import pytest

from supervisor_mail import cluster, folders, headers, messages
from supervisor_mail.errors import HostConflictError, LeaseLost
from supervisor_mail.imap_sync import store_batch


def add_accounts(db, n: int) -> list[int]:
    return [db.execute("INSERT INTO email_accounts (email, imap_host) VALUES (%s, 'imap.test')"
                       " RETURNING acntid", (f"u{k}@example.org",)).fetchone()[0]
            for k in range(n)]


def member(cfg, host_id: str, instance: str | None = None, pid: int = 4711) -> cluster.Member:
    return cluster.Member(host_id, instance or f"test/{host_id}", pid, cfg.cluster.lease_ttl)


def held(db, host_id: str) -> set[int]:
    return {a for (a,) in db.execute("SELECT acntid FROM email_account_leases WHERE host_id = %s"
                                     " AND expires_at > now() AND NOT releasing", (host_id,))}


def lapse(db) -> None:
    """What lease_ttl would do to the leases being given up."""
    db.execute("UPDATE email_account_leases SET expires_at = now() WHERE releasing")


def test_a_host_alone_claims_every_account_and_a_second_gets_half(db, cfg):
    """A lone host claims every lease; a second gets the half the first gives up."""
    ids = add_accounts(db, 10)
    db.execute("INSERT INTO email_accounts (email, smtp_host) VALUES ('smtp@x', 'smtp.test')")
    a, b = member(cfg, "a"), member(cfg, "b")
    first = cluster.take_part(db, a)
    assert (first.hosts, first.accounts, first.share, first.held) == (1, 10, 10, 0)
    assert [(c.acntid, c.generation, c.reason) for c in first.claimed] == \
        [(i, 1, "new") for i in ids]
    assert held(db, "a") == set(ids)

    joined = cluster.take_part(db, b)
    assert (joined.share, joined.claimed) == (5, [])  # nothing is free yet
    given = cluster.take_part(db, a, busy=ids[:3])
    assert len(given.released) == 5 and not set(given.released) & set(ids[:3])
    lapse(db)
    taken = cluster.take_part(db, b)
    assert {c.acntid for c in taken.claimed} == set(given.released)
    assert {(c.generation, c.from_host, c.reason) for c in taken.claimed} == {(2, "a", "released")}
    assert len(held(db, "a")) == len(held(db, "b")) == 5
    settled = [cluster.take_part(db, m) for m in (a, b, a, b)]
    assert all(not s.claimed and not s.released for s in settled)


def test_an_account_without_a_lease_row_gets_one(db, cfg):
    """An account inserted while triggers were off is still claimed by the next pass."""
    db.execute("SET session_replication_role = replica")
    acntid, = add_accounts(db, 1)
    db.execute("RESET session_replication_role")
    assert db.execute("SELECT count(*) FROM email_account_leases").fetchone() == (0,)
    assert [c.acntid for c in cluster.take_part(db, member(cfg, "a")).claimed] == [acntid]


def test_leases_are_renewed_once_a_third_of_lease_ttl_has_passed(db, cfg):
    """Only a lease with less than two thirds of lease_ttl left is renewed, same generation."""
    acntid, = add_accounts(db, 1)
    a = member(cfg, "a")
    cluster.take_part(db, a)
    assert cluster.take_part(db, a).renewed == 0
    ttl = cfg.cluster.lease_ttl
    db.execute("UPDATE email_account_leases SET expires_at = now() + make_interval(secs => %s)",
               (ttl * 2 / 3 - 1,))
    assert cluster.take_part(db, a).renewed == 1
    left, generation = db.execute("SELECT date_part('epoch', expires_at - now()), generation"
                                  " FROM email_account_leases").fetchone()
    assert ttl - 1 < left <= ttl and generation == 1


def test_a_dead_hosts_expired_leases_go_to_the_survivor(db, cfg):
    """A silent host's expired leases go to a live one under a new generation."""
    ids = add_accounts(db, 4)
    a, b = member(cfg, "a"), member(cfg, "b")
    cluster.take_part(db, a)
    cluster.take_part(db, b)
    db.execute("UPDATE email_cluster_hosts SET heartbeat_at = now() - interval '1 hour'"
               " WHERE host_id = 'a'")
    db.execute("UPDATE email_account_leases SET expires_at = now() WHERE host_id = 'a'")
    taken = cluster.take_part(db, b)
    assert taken.hosts == 1 and {c.acntid for c in taken.claimed} == set(ids)
    assert {(c.generation, c.from_host, c.reason) for c in taken.claimed} == {(2, "a", "expired")}


def test_a_live_host_id_is_refused_and_a_dead_local_one_taken_over(db, cfg):
    """A live host_id is refused; one whose local master and group are gone goes on at once."""
    add_accounts(db, 2)
    live = member(cfg, "a", cluster.instance_of(4711))
    cluster.take_part(db, live)
    with pytest.raises(HostConflictError, match=r"host_id 'a' is in use by a live engine on "
                                                r"this database \(master pid 4711 on .*give "
                                                r"every host its own \[engine\] host_id"):
        cluster.register(db, member(cfg, "a", "elsewhere/boot/1/1"))
    # the row as a run of pid 4711 (no such group here) that started at another time
    gone = cluster.instance_of(4711).rsplit("/", 1)[0] + "/not-its-start-time"
    db.execute("UPDATE email_cluster_hosts SET instance = %s", (gone,))
    cluster.register(db, live)
    assert db.execute("SELECT instance FROM email_cluster_hosts").fetchone() == (live.instance,)
    assert db.execute("SELECT releasing, generation FROM email_account_leases"
                      " WHERE host_id = 'a'").fetchall() == [(False, 2)] * 2


def test_a_restart_whose_old_processes_may_live_waits_for_its_leases_to_lapse(db, cfg):
    """Its master gone but its process group still there: the old leases lapse first."""
    add_accounts(db, 2)
    leader = os.getpgrp()  # a group that exists: this test's own
    cluster.take_part(db, member(cfg, "a", cluster.instance_of(leader), leader))
    gone = cluster.instance_of(leader).rsplit("/", 1)[0] + "/not-its-start-time"
    db.execute("UPDATE email_cluster_hosts SET instance = %s", (gone,))
    cluster.register(db, member(cfg, "a", cluster.instance_of(leader), leader))
    assert db.execute("SELECT releasing, generation FROM email_account_leases"
                      " WHERE host_id = 'a'").fetchall() == [(True, 1)] * 2


@pytest.fixture
def folder(db):
    acntid, = add_accounts(db, 1)
    emfdid = db.execute("INSERT INTO email_folders (acntid, server_name, display_name,"
                        " uidvalidity) VALUES (%s, 'INBOX', 'INBOX', 7) RETURNING emfdid",
                        (acntid,)).fetchone()[0]
    return acntid, emfdid


def batch(uids: range) -> list[messages.Fetched]:
    raws = [f"Message-ID: <{u}@test>\r\nSubject: {u}\r\n\r\nbody\r\n".encode() for u in uids]
    return [messages.Fetched(u, [], None, len(r), None, r, headers.parse(r))
            for u, r in zip(uids, raws, strict=True)]


def test_a_batch_commits_only_under_the_current_generation(db, cfg, folder):
    """store_batch commits and records under the held generation, else LeaseLost, nothing."""
    acntid, emfdid = folder
    cluster.take_part(db, member(cfg, cfg.engine.host_id))
    fence = cluster.Fence(cfg, acntid)
    assert fence.take(db) == 1
    store_batch(db, emfdid, 7, 3, batch(range(1, 4)), False, fence)
    assert folders.lock_cursor(db, emfdid) == (7, 3)
    assert db.execute("SELECT host_id, generation, last_uid, messages FROM email_sync_batches"
                      ).fetchall() == [(cfg.engine.host_id, 1, 3, 3)]
    assert fence.left() > 0

    db.execute("UPDATE email_account_leases SET host_id = 'other', generation = 2")
    with pytest.raises(LeaseLost, match=rf"batch of 2 messages for folder {emfdid} refused: "
                                        rf"host {cfg.engine.host_id} no longer holds the lease "
                                        rf"of account {acntid} under generation 1 \(now held "
                                        r"by other under generation 2\)"):
        store_batch(db, emfdid, 7, 5, batch(range(4, 6)), False, fence)
    assert folders.lock_cursor(db, emfdid) == (7, 3)
    assert db.execute("SELECT count(*) FROM email_messages").fetchone()[0] == 3
    assert db.execute("SELECT count(*) FROM email_sync_batches").fetchone()[0] == 1
    with pytest.raises(LeaseLost):
        fence.check()  # and its IMAP session may not be used any more


def test_a_task_starts_only_under_a_lease_held_and_not_being_given_up(db, cfg, folder):
    """Fence.take refuses an account this host holds no lease on, or one it is giving up."""
    acntid, _ = folder
    fence = cluster.Fence(cfg, acntid)
    with pytest.raises(LeaseLost, match="holds no lease on account"):
        fence.take(db)
    cluster.take_part(db, member(cfg, cfg.engine.host_id))
    db.execute("UPDATE email_account_leases SET releasing = true")
    with pytest.raises(LeaseLost):
        cluster.Fence(cfg, acntid).take(db)
