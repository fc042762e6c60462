"""Claims that never reached the SMTP server are given back, and only those."""

from running_engine import add_account, queue

from supervisor_mail import outbox


def test_release_gives_back_only_this_workers_unsent_claims(db, smtp_sink):
    """A released claim is queued and due at once; another worker's claim is untouched."""
    acntid = add_account(db, smtp_sink=smtp_sink, email="sender@example.org")
    mine, theirs = queue(db, acntid, 1), queue(db, acntid, 2)
    first = outbox.claim(db, "w1", claim_timeout=300, auth_error_retry=1800)
    second = outbox.claim(db, "w2", claim_timeout=300, auth_error_retry=1800)
    assert {first.emobid, second.emobid} == {mine, theirs}
    assert outbox.release(db, [first.emobid, second.emobid], "w1") == 1
    rows = {row[0]: row[1:] for row in db.execute(
        "SELECT emobid, state, claimed_by, next_attempt_at <= now(), attempts "
        "FROM email_outbox")}
    assert rows[first.emobid] == ("queued", None, True, 0)
    assert rows[second.emobid][:2] == ("sending", "w2")
    again = outbox.claim(db, "w3", claim_timeout=300, auth_error_retry=1800)
    assert again.emobid == first.emobid
