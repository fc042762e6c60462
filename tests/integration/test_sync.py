"""IMAP sync against the real servers (Dovecot where installed, pymap always) and real
PostgreSQL: byte-exact storage, incremental syncs, flags and expunges, recreated
mailboxes, folder discovery, oversize messages and the log lines."""

from __future__ import annotations

import threading

import pytest
from sync_helpers import (
    FIRST_SERVER,
    add_account,
    captured_log,
    digests,
    folder_of,
    on_server,
    run_sync,
    stored,
)

from supervisor_mail import folders, store
from supervisor_mail.embedded.imap_admin import fill_mailbox, sample_message
from supervisor_mail.imap_sync import AccountSession, discover_folders, sync_folder
from supervisor_mail.states import Role, TaskKind

FULL, RECENT = TaskKind.SYNC_FULL, TaskKind.SYNC_RECENT
# Messages whose bytes servers treat differently: bare LF, raw 8-bit headers, a lone
# dot line, a very long line, a message without a body.
ODD_MESSAGES = [
    b"From: lf@example.test\nSubject: LF only\nMessage-ID: <lf@example.test>\n\nline one\n.\n",
    "From: Grażyna <g@example.test>\r\nSubject: Zażółć gęślą jaźń\r\n"
    "Message-ID: <8bit@example.test>\r\n\r\nTreść po polsku.\r\n".encode(),
    b"Subject: long line\r\nMessage-ID: <long@example.test>\r\n\r\n" + b"x" * 5000 + b"\r\n",
    b"Subject: headers only\r\nMessage-ID: <nobody@example.test>\r\n",
]


def test_first_sync_stores_every_message_byte_exact(mailbox, imap_account, db, make_cfg,
                                                     db_dsn):
    """SHA-256 of each stored raw equals that of the server's BODY[], in batches of 4."""
    fill_mailbox(mailbox, "INBOX", 9)
    for raw in ODD_MESSAGES:
        mailbox.append("INBOX", raw)
    mailbox.set_flags("INBOX", mailbox.uids("INBOX")[0], [b"\\Flagged"])
    acntid = add_account(db, imap_account)
    result = run_sync(make_cfg(db_dsn, sync__batch_size=4), acntid)
    inbox = folder_of(db, acntid, "INBOX")
    reference = on_server(mailbox, "INBOX")
    assert result.new == len(reference) == 13 and result.bytes == sum(map(len, reference.values()))
    assert digests(stored(db, inbox.emfdid)) == digests(reference)
    assert inbox.last_uid == max(reference) and inbox.uidvalidity == mailbox.uidvalidity("INBOX")
    first = min(reference)
    row = db.execute("SELECT flags, size, internaldate, subject, message_id FROM email_messages"
                     " WHERE emfdid = %s AND uid = %s", (inbox.emfdid, first)).fetchone()
    raw, _ = sample_message(0)
    assert row[0] == ["\\Flagged"] and row[1] == len(reference[first]) and row[2] is not None
    assert row[3] and row[4] and row[4] in raw.decode()
    polish = db.execute("SELECT subject FROM email_messages WHERE message_id ="
                        " '<8bit@example.test>'").fetchone()[0]
    assert polish == "Zażółć gęślą jaźń"
    assert all(b"\\Seen" not in mailbox.flags("INBOX", uid) for uid in reference)  # PEEK


def test_second_sync_fetches_nothing(mailbox, imap_account, db, cfg):
    """A sync right after a sync stores nothing and rewrites nothing, recent or full."""
    fill_mailbox(mailbox, "INBOX", 5)
    acntid = add_account(db, imap_account)
    run_sync(cfg, acntid, kind=FULL)
    before = db.execute("SELECT emsgid, stored_at FROM email_messages ORDER BY 1").fetchall()
    for kind in (RECENT, FULL):
        result = run_sync(cfg, acntid, kind=kind)
        assert (result.new, result.bytes, result.flags_changed, result.expunged) == (0, 0, 0, 0)
    assert db.execute("SELECT emsgid, stored_at FROM email_messages ORDER BY 1").fetchall() == \
        before


def test_new_mail_arrives_on_a_recent_sync(mailbox, imap_account, db, cfg):
    """Messages appended after a sync are exactly what the next recent sync stores."""
    fill_mailbox(mailbox, "INBOX", 3)
    acntid = add_account(db, imap_account)
    assert run_sync(cfg, acntid).new == 3
    fill_mailbox(mailbox, "INBOX", 2, seed=7)
    result = run_sync(cfg, acntid)
    inbox = folder_of(db, acntid, "INBOX")
    assert result.new == 2
    assert digests(stored(db, inbox.emfdid)) == digests(on_server(mailbox, "INBOX"))


def _change_flags_and_expunge(mailbox, acntid, db, cfg, **session_options):
    """Sync six messages, then set, clear and add flags and expunge on the server; full sync."""
    uids = fill_mailbox(mailbox, "INBOX", 6)
    mailbox.set_flags("INBOX", uids[1], [b"\\Seen", b"\\Answered"])
    run_sync(cfg, acntid, kind=FULL, **session_options)
    mailbox.add_flags("INBOX", uids[0], [b"\\Flagged"])
    mailbox.remove_flags("INBOX", uids[1], [b"\\Seen"])
    mailbox.add_flags("INBOX", uids[2], [b"\\Draft"])  # pymap keeps no keywords
    mailbox.expunge("INBOX", uids[3])
    recent = run_sync(cfg, acntid, kind=RECENT, **session_options)
    inbox = folder_of(db, acntid, "INBOX")
    unchanged = db.execute("SELECT count(*) FROM email_messages WHERE emfdid = %s AND"
                           " flags = '{}' AND deleted_at IS NULL", (inbox.emfdid,)).fetchone()[0]
    assert (recent.flags_changed, recent.expunged, unchanged) == (0, 0, 5)  # recent: new only
    result = run_sync(cfg, acntid, kind=FULL, **session_options)
    assert (result.flags_changed, result.expunged) == (3, 1)
    rows = dict(db.execute("SELECT uid, flags FROM email_messages WHERE emfdid = %s AND"
                           " deleted_at IS NULL", (inbox.emfdid,)).fetchall())
    assert rows == {uid: sorted(f.decode() for f in mailbox.flags("INBOX", uid))
                    for uid in mailbox.uids("INBOX")}
    assert uids[3] not in rows
    gone = db.execute("SELECT deleted_at IS NOT NULL, raw IS NOT NULL FROM email_messages"
                      " WHERE emfdid = %s AND uid = %s", (inbox.emfdid, uids[3])).fetchone()
    assert gone == (True, True)  # marked deleted, kept for what references it
    again = run_sync(cfg, acntid, kind=FULL, **session_options)
    assert (again.flags_changed, again.expunged) == (0, 0)
    return folder_of(db, acntid, "INBOX")


def test_flags_and_expunge_are_reflected_after_a_full_sync(mailbox, imap_account, imap_server,
                                                          db, cfg):
    """Flags set and cleared, one expunged: CONDSTORE+QRESYNC on Dovecot, the
    UID/FLAGS comparison on pymap (which has no CONDSTORE)."""
    inbox = _change_flags_and_expunge(mailbox, add_account(db, imap_account), db, cfg)
    assert (inbox.highestmodseq is not None) == (imap_server.name == "dovecot")


@pytest.mark.parametrize("imap_server", [FIRST_SERVER], indirect=True)
@pytest.mark.parametrize("ignored", [("QRESYNC",), ("QRESYNC", "CONDSTORE")],
                         ids=["condstore-without-qresync", "no-condstore"])
def test_flags_and_expunge_on_the_other_paths(mailbox, imap_account, db, cfg, ignored):
    """The same changes found with CONDSTORE alone (expunges by UID SEARCH) and with no
    CONDSTORE at all (UID/FLAGS compared in chunks), on the first server (Dovecot here)."""
    inbox = _change_flags_and_expunge(mailbox, add_account(db, imap_account), db, cfg,
                                      ignore_capabilities=ignored)
    condstore = "CONDSTORE" not in ignored and b"CONDSTORE" in mailbox.client.capabilities()
    assert (inbox.highestmodseq is not None) == condstore


def test_recreated_mailbox_retires_old_rows_and_keeps_referenced_ones(mailbox, imap_account,
                                                                    db, cfg):
    """A new UIDVALIDITY retires the old rows; a message that reappears (same Message-ID
    and size) takes its old row back, so its emsgid stays valid; nothing is duplicated."""
    originals = [sample_message(i, seed=3)[0] for i in range(5)]
    mailbox.create_folder("Archive")
    for raw in originals:
        mailbox.append("Archive", raw)
    acntid = add_account(db, imap_account)
    run_sync(cfg, acntid, "Archive", FULL)
    before = dict(db.execute("SELECT message_id, emsgid FROM email_messages").fetchall())
    new_validity = mailbox.recreate_folder("Archive")
    for raw in originals[:4] + [sample_message(9, seed=3)[0]]:
        mailbox.append("Archive", raw)
    result = run_sync(cfg, acntid, "Archive", FULL)
    archive = folder_of(db, acntid, "Archive")
    assert result.uidvalidity_changed and result.new == 5
    assert archive.uidvalidity == new_validity
    assert digests(stored(db, archive.emfdid)) == digests(on_server(mailbox, "Archive"))
    live = db.execute("SELECT message_id, emsgid, uidvalidity FROM email_messages"
                      " WHERE retired_at IS NULL").fetchall()
    assert len(live) == len({m for m, _, _ in live}) == 5
    assert all(validity == new_validity for _, _, validity in live)
    kept = {m: e for m, e, _ in live if m in before}
    assert len(kept) == 4 and all(before[m] == e for m, e in kept.items())
    retired = db.execute("SELECT message_id FROM email_messages WHERE retired_at IS NOT NULL"
                         ).fetchall()
    assert [m for (m,) in retired] == [m for m in before if m not in kept]


def test_oversize_message_is_stored_headers_only_with_reason(mailbox, imap_account, db,
                                                             make_cfg, db_dsn):
    """A message over sync.max_message_size gets its headers and the reason, and the
    folder goes on past it."""
    small = sample_message(0)[0]
    big = (b"Subject: big scan\r\nMessage-ID: <big@example.test>\r\n\r\n" +
           b"0123456789abcdef" * 700)
    for raw in (small, big, sample_message(1)[0]):
        mailbox.append("INBOX", raw)
    acntid = add_account(db, imap_account)
    result = run_sync(make_cfg(db_dsn, sync__max_message_size=4096), acntid)
    assert (result.new, result.skipped) == (3, 1)
    row = db.execute("SELECT raw, subject, skipped_reason, size FROM email_messages WHERE"
                     " message_id = '<big@example.test>'").fetchone()
    assert row[0] is None and row[1] == "big scan"
    assert "max_message_size" in row[2] and row[3] > 4096
    inbox = folder_of(db, acntid, "INBOX")
    assert inbox.last_uid == max(mailbox.uids("INBOX"))
    complete = db.execute("SELECT count(*) FROM email_messages WHERE raw IS NOT NULL"
                          ).fetchone()[0]
    assert complete == 2


def test_folders_are_discovered_with_roles_names_and_priorities(mailbox, imap_account, db,
                                                               cfg):
    """INBOX hi, Sent by role, Polish names decoded, the user's priority kept, a folder
    deleted on the server marked gone and back when it returns."""
    for name in ("Sent", "Ważne", "Projekty"):
        mailbox.create_folder(name)
    acntid = add_account(db, imap_account)
    run_sync(cfg, acntid)
    by_name = {f.display_name: f for f in folders.listing(db, acntid)}
    assert by_name["INBOX"].role == Role.INBOX and by_name["INBOX"].priority == "hi"
    assert by_name["Sent"].role == Role.SENT and by_name["Sent"].priority == "lo"
    assert by_name["Ważne"].server_name == "Wa&AXw-ne" and by_name["Ważne"].role is None
    db.execute("UPDATE email_folders SET user_priority = 'hi' WHERE emfdid = %s",
               (by_name["Projekty"].emfdid,))
    mailbox.delete_folder("Ważne")
    run_sync(cfg, acntid)
    after = {f.display_name: f for f in folders.listing(db, acntid, include_gone=True)}
    assert after["Projekty"].effective_priority == "hi"
    assert after["Ważne"].gone_at is not None and after["Sent"].gone_at is None
    mailbox.create_folder("Ważne")
    run_sync(cfg, acntid, "Ważne")
    assert folder_of(db, acntid, "Ważne").gone_at is None


def test_each_sync_logs_in_the_old_format(mailbox, imap_account, db, cfg):
    """'received N new messages in Ns [acntid,emfdid]', and a flags/expunge line for a full."""
    fill_mailbox(mailbox, "INBOX", 3)
    acntid = add_account(db, imap_account)
    with captured_log() as sync_log:
        run_sync(cfg, acntid, kind=FULL)
    emfdid = folder_of(db, acntid, "INBOX").emfdid
    assert sync_log[0].endswith(f"] received 3 new messages in 0s [{acntid},{emfdid}]")
    assert sync_log[1].endswith(f"] flags changed on 0 messages, 0 expunged [{acntid},{emfdid}]")
    assert sync_log[0].startswith("[") and "][#" in sync_log[0] and ".t1] " in sync_log[0]


def test_a_stop_between_batches_keeps_what_was_stored(mailbox, imap_account, db, make_cfg,
                                                      db_dsn):
    """should_stop() is asked between batches: the sync leaves once the batches in hand
    are committed, beats only from the caller's thread, and the next sync finishes."""
    fill_mailbox(mailbox, "INBOX", 7)
    acntid = add_account(db, imap_account)
    cfg = make_cfg(db_dsn, sync__batch_size=3)
    beats: list[tuple[str, int, int]] = []
    with store.connect(cfg, "test") as conn, AccountSession(conn, cfg, acntid) as session:
        inbox = folders.find(discover_folders(conn, session), "INBOX")
        result = sync_folder(conn, session, inbox, RECENT, cfg,
                             beat=lambda phase, n: beats.append((phase, n,
                                                                threading.get_ident())),
                             should_stop=lambda: any(b[0] == "commit" for b in beats))
    assert result.stopped and result.new == 6  # the batch fetched meanwhile is stored too
    assert {ident for _, _, ident in beats} == {threading.get_ident()}
    assert [b[:2] for b in beats if b[0] in ("fetch", "commit")] == \
        [("fetch", 3), ("fetch", 6), ("commit", 3), ("commit", 6)]
    stopped = folder_of(db, acntid, "INBOX")
    assert stopped.last_recent_sync is None and len(stored(db, stopped.emfdid)) == 6
    assert run_sync(cfg, acntid).new == 1
