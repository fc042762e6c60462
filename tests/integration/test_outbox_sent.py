"""The Sent copy on real IMAP servers (each test runs on every server this machine has):
filed with \\Seen, linked, never stored twice by the sync, never a cause to send again."""

from __future__ import annotations

import re
import time

import pytest
from outbox_helpers import Workers, message_ids, row, smtp_account, wait_log, wait_state

from supervisor_mail import accounts, outbox
from supervisor_mail.compose import Parts, compose
from supervisor_mail.embedded.imap import free_port
from supervisor_mail.imap_sync import AccountSession, discover_folders, sync_folder
from supervisor_mail.sent_copy import SentFolder, record
from supervisor_mail.states import TaskKind


@pytest.fixture
def workers(tmp_path):
    started = Workers(tmp_path)
    yield started
    started.stop()


@pytest.fixture
def cfg(make_cfg, db_dsn):
    return make_cfg(db_dsn, outbox__poll_interval=1, outbox__socket_timeout=5,
                    sync__socket_timeout=5)


def both_account(db, sink, imap_account, **values) -> int:
    """An account that sends through ``sink`` and has its mailbox on ``imap_account``."""
    server = imap_account.server
    settings = dict(imap_host=server.host, imap_port=server.port, imap_security="plain",
                    imap_login=imap_account.login, imap_password=imap_account.password)
    settings.update(values)
    return smtp_account(db, sink, **settings)


def sync_sent(db, cfg, acntid: int) -> int:
    """Run the real sync on the account's Sent folder; returns how many messages it stored."""
    with AccountSession(db, cfg, acntid) as session:
        sent = [f for f in discover_folders(db, session) if f.server_name == "Sent"]
        return sync_folder(db, session, sent[0], TaskKind.SYNC_RECENT, cfg,
                           beat=lambda *a: None).new


def local_copies(db, message_id: str) -> list[tuple]:
    return db.execute("SELECT m.emfdid, m.uid, m.flags FROM email_messages m "
                      "JOIN email_folders f USING (emfdid) "
                      "WHERE f.server_name = 'Sent' AND m.message_id = %s",
                      (message_id,)).fetchall()


def external(message_id: str) -> bytes:
    return (f"Message-ID: {message_id}\r\nFrom: me@example.com\r\nTo: a@example.com\r\n"
            f"Subject: sent elsewhere\r\n\r\nbody\r\n").encode()


def test_sent_copy_is_filed_and_the_next_sync_does_not_store_it_twice(
        db, cfg, smtp_sink, imap_account, mailbox, workers):
    """The copy is in Sent with \\Seen, linked and stored locally; the next sync adds nothing."""
    mailbox.create_folder("Sent")
    acntid = both_account(db, smtp_sink, imap_account)
    assert sync_sent(db, cfg, acntid) == 0
    workers.start(cfg)
    emobid = outbox.queue(db, acntid, to_addrs=["a@example.com"], bcc_addrs=["b@example.com"],
                          subject="filed", body_text="copy me")
    sent = wait_state(db, emobid, "sent")
    deadline = time.monotonic() + 10
    while row(db, emobid)["sent_uid"] is None and time.monotonic() < deadline:
        time.sleep(0.05)
    sent = row(db, emobid)
    assert mailbox.uids("Sent") == [sent["sent_uid"]]
    assert b"\\Seen" in mailbox.flags("Sent", sent["sent_uid"])
    assert sent["message_id"].encode() in mailbox.fetch_raw("Sent", sent["sent_uid"])
    assert local_copies(db, sent["message_id"]) == [(sent["sent_emfdid"], sent["sent_uid"],
                                                     ["\\Seen"])]
    assert sync_sent(db, cfg, acntid) == 0
    assert len(local_copies(db, sent["message_id"])) == 1
    assert message_ids(smtp_sink) == [sent["message_id"]]


def test_copy_behind_unsynced_mail_is_stored_once_by_the_sync(
        db, cfg, smtp_sink, imap_account, mailbox, workers):
    """When other mail came to Sent since the last sync, the sync stores the copy (once)."""
    mailbox.create_folder("Sent")
    acntid = both_account(db, smtp_sink, imap_account)
    sync_sent(db, cfg, acntid)
    mailbox.append("Sent", external("<elsewhere@example.com>"))
    workers.start(cfg)
    emobid = outbox.queue(db, acntid, to_addrs=["a@example.com"], subject="behind")
    wait_state(db, emobid, "sent")
    deadline = time.monotonic() + 10
    while row(db, emobid)["sent_uid"] is None and time.monotonic() < deadline:
        time.sleep(0.05)
    sent = row(db, emobid)
    assert sent["sent_uid"] == max(mailbox.uids("Sent"))
    assert local_copies(db, sent["message_id"]) == []  # not ahead of the sync
    assert sync_sent(db, cfg, acntid) == 2
    assert local_copies(db, sent["message_id"]) == [(sent["sent_emfdid"], sent["sent_uid"],
                                                     ["\\Seen"])]


def test_a_missing_sent_folder_is_created(db, cfg, smtp_sink, imap_account, mailbox, workers):
    """An account without any Sent mailbox gets one named Sent, holding the copy."""
    assert "Sent" not in mailbox.folders()
    acntid = both_account(db, smtp_sink, imap_account)
    workers.start(cfg)
    wait_state(db, outbox.queue(db, acntid, to_addrs=["a@example.com"]), "sent")
    deadline = time.monotonic() + 10
    while "Sent" not in mailbox.folders() or not mailbox.uids("Sent"):
        assert time.monotonic() < deadline, "no copy in a new Sent folder"
        time.sleep(0.05)


def test_a_failure_to_file_never_sends_again(db, cfg, smtp_sink, workers):
    """An unreachable IMAP server: sent once, stays sent, and the log says it was not filed."""
    acntid = smtp_account(db, smtp_sink, imap_host="127.0.0.1", imap_port=free_port(),
                          imap_security="plain", imap_login="me", imap_password="pw")
    workers.start(cfg)
    emobid = outbox.queue(db, acntid, to_addrs=["a@example.com"])
    sent = wait_state(db, emobid, "sent")
    time.sleep(1.5)  # a poll later
    assert row(db, emobid)["state"] == "sent" and row(db, emobid)["sent_uid"] is None
    assert message_ids(smtp_sink) == [sent["message_id"]]
    wait_log(cfg, re.escape(f"sent message {sent['message_id']} but could not file it in Sent"))


def stale_claim(db, emobid: int) -> None:
    """Make the row look like a claim whose worker died mid-delivery, long ago."""
    db.execute("UPDATE email_outbox SET state = 'sending', claimed_by = 'gone/send 3/1', "
               "claimed_at = now() - interval '1 hour', next_attempt_at = now(), attempts = 1 "
               "WHERE emobid = %s", (emobid,))


def test_crashed_claim_found_in_sent_is_not_resent(db, cfg, smtp_sink, imap_account, mailbox,
                                                   workers):
    """A stale claim whose Message-ID is already in Sent is marked sent and linked, not sent."""
    mailbox.create_folder("Sent")
    uid = mailbox.append("Sent", external("<went-out@example.com>"), flags=[b"\\Seen"])
    acntid = both_account(db, smtp_sink, imap_account)
    sync_sent(db, cfg, acntid)
    emobid = outbox.queue(db, acntid, to_addrs=["a@example.com"],
                          message_id="<went-out@example.com>")
    stale_claim(db, emobid)
    workers.start(cfg)
    done = wait_state(db, emobid, "sent")
    assert done["smtp_reply"].startswith("not sent again: found in the Sent folder")
    assert done["sent_uid"] == uid and done["sent_emfdid"] is not None
    time.sleep(0.5)
    assert smtp_sink.messages == [] and mailbox.uids("Sent") == [uid]
    wait_log(cfg, "is in Sent: marked sent, not resent")


def test_crashed_claim_not_in_sent_is_resent_with_its_message_id(
        db, cfg, smtp_sink, imap_account, mailbox, workers):
    """A stale claim that never reached Sent is sent again, with the Message-ID it had."""
    mailbox.create_folder("Sent")
    acntid = both_account(db, smtp_sink, imap_account)
    emobid = outbox.queue(db, acntid, to_addrs=["a@example.com"],
                          message_id="<never-left@example.com>")
    stale_claim(db, emobid)
    workers.start(cfg)
    done = wait_state(db, emobid, "sent")
    assert done["smtp_reply"].startswith("250 ")
    assert message_ids(smtp_sink) == ["<never-left@example.com>"]


def test_without_uidplus_the_copy_is_found_by_message_id(db, cfg, imap_account, mailbox):
    """A server without APPENDUID: the copy's UID comes from a search for its Message-ID."""
    mailbox.create_folder("Sent")
    acntid = both_account(db, None, imap_account)
    sync_sent(db, cfg, acntid)
    folder = SentFolder(cfg, accounts.get(db, acntid))
    try:
        folder.uidplus = False
        out = compose(Parts(sender="me@example.com", to_addrs=["a@example.com"]))
        filed = folder.append(out)
        assert filed.uid == mailbox.uids("Sent")[-1] and filed.uidvalidity is not None
        emfdid, uid = record(db, acntid, filed, folder)
    finally:
        folder.close()
    assert uid == filed.uid and local_copies(db, out.message_id) == [(emfdid, uid, ["\\Seen"])]


def test_sent_but_not_recorded_is_found_in_sent_not_resent(db, make_cfg, db_dsn, smtp_sink,
                                                           imap_account, mailbox, workers):
    """PostgreSQL refuses 'sent' after the 250: filed anyway, then found in Sent, not resent."""
    cfg = make_cfg(db_dsn, outbox__claim_timeout=2, outbox__poll_interval=1,
                   outbox__socket_timeout=5, sync__socket_timeout=5)
    mailbox.create_folder("Sent")
    acntid = both_account(db, smtp_sink, imap_account)
    db.execute("CREATE FUNCTION refuse_sent() RETURNS trigger LANGUAGE plpgsql AS "
               "$$ BEGIN RAISE EXCEPTION 'could not extend file (test)'; END $$")
    db.execute("CREATE TRIGGER refuse_sent BEFORE UPDATE ON email_outbox FOR EACH ROW "
               "WHEN (NEW.state = 'sent') EXECUTE FUNCTION refuse_sent()")
    workers.start(cfg)
    emobid = outbox.queue(db, acntid, to_addrs=["a@example.com"], subject="unrecorded")
    smtp_sink.wait_for(1)
    deadline = time.monotonic() + 10
    while not mailbox.uids("Sent"):
        assert time.monotonic() < deadline, "the copy was not filed"
        time.sleep(0.05)
    assert row(db, emobid)["state"] == "sending"
    wait_log(cfg, "but could not record it .*could not extend file")
    db.execute("DROP TRIGGER refuse_sent ON email_outbox")
    done = wait_state(db, emobid, "sent", timeout=10)
    assert done["smtp_reply"].startswith("not sent again: found in the Sent folder")
    time.sleep(0.3)
    assert len(smtp_sink.messages) == 1 and len(mailbox.uids("Sent")) == 1
