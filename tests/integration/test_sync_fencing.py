"""A sync under a lease that moved writes nothing, on the real servers: not a batch (see
test_cluster_leases), nor a full sync's flag changes and expunges, nor a folder listing."""

from __future__ import annotations

import pytest
from sync_helpers import add_account, folder_of, run_sync

from supervisor_mail import cluster, folders, store
from supervisor_mail.embedded.imap_admin import fill_mailbox
from supervisor_mail.errors import LeaseLost
from supervisor_mail.imap_sync import AccountSession, discover_folders, sync_folder
from supervisor_mail.states import TaskKind


def live_rows(db, emfdid: int) -> dict[int, list[str]]:
    return dict(db.execute("SELECT uid, flags FROM email_messages WHERE emfdid = %s"
                           " AND deleted_at IS NULL", (emfdid,)).fetchall())


def move_lease(db, acntid: int, host_id: str) -> None:
    """What another host's claim does to the lease row: a new holder, a new generation."""
    db.execute("UPDATE email_account_leases SET host_id = %s, generation = generation + 1,"
               " expires_at = now() + interval '1 minute' WHERE acntid = %s", (host_id, acntid))


def test_a_moved_lease_refuses_flag_changes_expunges_and_the_listing(mailbox, imap_account,
                                                                    db, cfg):
    """The lease moves to another host while a full sync compares flags: the changes and
    the expunge are refused (LeaseLost) and nothing of them is stored; the next listing,
    which found a new folder, is refused too, and so is the session's next command once a
    commit was refused. The new holder finds everything to do."""
    uids = fill_mailbox(mailbox, "INBOX", 3)
    acntid = add_account(db, imap_account)
    cluster.take_part(db, cluster.Member.of(cfg))  # the only host: it leases the account

    def move_lease_at_flags(phase: str, progress: int | None) -> None:
        if phase == "flags":
            move_lease(db, acntid, "other")

    with store.connect(cfg, "test") as conn:
        fence = cluster.Fence(cfg, acntid)
        fence.take(conn)
        with AccountSession(conn, cfg, acntid, fence=fence) as session:
            inbox = folders.find(discover_folders(conn, session), "INBOX")
            assert sync_folder(conn, session, inbox, TaskKind.SYNC_FULL, cfg,
                               lambda phase, n: None).new == 3
            before = folder_of(db, acntid, "INBOX")
            listed = [f.server_name for f in folders.listing(db, acntid)]
            mailbox.add_flags("INBOX", uids[0], [b"\\Flagged"])
            mailbox.expunge("INBOX", uids[1])
            mailbox.create_folder("Later")

            with pytest.raises(LeaseLost, match=rf"flag changes of folder {inbox.emfdid} "
                                                r"refused: .* \(now held by other"):
                sync_folder(conn, session, inbox, TaskKind.SYNC_FULL, cfg, move_lease_at_flags)
            with pytest.raises(LeaseLost, match="runs out"):
                discover_folders(conn, session)  # a refused commit also ends the session's use

        move_lease(db, acntid, cfg.engine.host_id)
        fence = cluster.Fence(cfg, acntid)
        fence.take(conn)
        with AccountSession(conn, cfg, acntid, fence=fence) as session:
            session.open()
            move_lease(db, acntid, "other")
            with pytest.raises(LeaseLost, match=rf"folder listing of account {acntid} refused"):
                discover_folders(conn, session)

    assert live_rows(db, inbox.emfdid) == {uid: [] for uid in uids}
    after = folder_of(db, acntid, "INBOX")
    assert (after.last_full_sync, after.last_error) == (before.last_full_sync, None)
    assert [f.server_name for f in folders.listing(db, acntid)] == listed
    assert "Later" not in listed

    result = run_sync(cfg, acntid, kind=TaskKind.SYNC_FULL)  # as the new holder would
    assert (result.flags_changed, result.expunged) == (1, 1)
