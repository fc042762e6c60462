"""Outbox delivery on real PostgreSQL and real aiosmtpd servers: each outcome ends in its state.

(Not ``test_outbox.py``: that basename is the unit tests', and pytest's default
import mode needs unique basenames.)
"""

from __future__ import annotations

import socket
import ssl
import time
from datetime import datetime, timezone

import pytest
from outbox_helpers import Workers, info_log, message_ids, smtp_account, wait_log, wait_state

from supervisor_mail import accounts, outbox
from supervisor_mail.compose import Parts, compose
from supervisor_mail.embedded.imap import free_port, issue_loopback_cert
from supervisor_mail.embedded.smtp import SmtpSink
from supervisor_mail.send_worker import SendWorker


@pytest.fixture
def workers(tmp_path):
    started = Workers(tmp_path)
    yield started
    started.stop()


@pytest.fixture
def fast_cfg(make_cfg, db_dsn):
    """Settings for delivery tests: a short poll, so a row made due by hand is seen soon."""
    return make_cfg(db_dsn, outbox__poll_interval=1, outbox__socket_timeout=2)


def seconds_from_now(when: datetime) -> float:
    return (when - datetime.now(timezone.utc)).total_seconds()


def test_queued_row_is_sent_at_once(db, fast_cfg, smtp_sink, workers):
    """An INSERT is delivered within moments: sent, with time, reply and the old log line."""
    acntid = smtp_account(db, smtp_sink)
    workers.start(fast_cfg)
    time.sleep(0.5)  # the worker is waiting on LISTEN, not polling
    emobid = outbox.queue(db, acntid, to_addrs=["a@example.com", "b@example.com"],
                          cc_addrs=["c@example.com"], subject="Hello", body_text="Hi")
    started = time.monotonic()
    received = smtp_sink.wait_for(1)[0]
    assert received.received_monotonic - started < 0.5
    done = wait_state(db, emobid, "sent")
    assert done["sent_at"] is not None and done["smtp_reply"].startswith("250 ")
    assert done["claimed_by"].startswith("127.0.0.1/send 9/") and done["attempts"] == 1
    assert done["message_id"] and message_ids(smtp_sink) == [done["message_id"]]
    assert received.mail_from == "me@example.com"
    assert received.rcpt_tos == ("a@example.com", "b@example.com", "c@example.com")
    line = wait_log(fast_cfg, r"\[#\d+\.t9\] sent message (\S+) to 3 recipients in \d+\.\ds "
                              r"\[(\d+),-\]")
    assert line[1] == done["message_id"] and int(line[2]) == acntid


def test_worker_beats_idle_and_busy_and_stops_on_request(db, fast_cfg, smtp_sink, workers):
    """Beats come while idle and after each delivery; SIGTERM ends the worker at once, cleanly."""
    acntid = smtp_account(db, smtp_sink)
    process = workers.start(fast_cfg)
    time.sleep(1.2)
    assert workers.beats().count("idle") >= 2
    wait_state(db, outbox.queue(db, acntid, to_addrs=["a@example.com"]), "sent")
    time.sleep(0.2)
    assert f"[{acntid},-] sent" in workers.beats()
    started = time.monotonic()
    workers.stop()
    assert process.exitcode == 0 and time.monotonic() - started < 2.5


def test_bcc_is_never_transmitted(db, fast_cfg, smtp_sink, workers):
    """Bcc recipients get the message, but no Bcc appears in what the server received."""
    acntid = smtp_account(db, smtp_sink)
    workers.start(fast_cfg)
    built = outbox.queue(db, acntid, to_addrs=["to@example.com"], bcc_addrs=["hidden@example.com"],
                         subject="parts", body_text="x")
    raw = outbox.queue(db, acntid, raw=b"From: me@example.com\r\nTo: to@example.com\r\n"
                                       b"Bcc: Secret <raw-hidden@example.com>\r\nSubject: raw\r\n"
                                       b"\r\nbody\r\n")
    wait_state(db, built, "sent")
    wait_state(db, raw, "sent")
    got = {m.data.split(b"Subject: ")[1][:3]: m for m in smtp_sink.wait_for(2)}
    assert got[b"par"].rcpt_tos == ("to@example.com", "hidden@example.com")
    assert got[b"raw"].rcpt_tos == ("to@example.com", "raw-hidden@example.com")
    for message in got.values():
        assert b"bcc" not in message.data.lower() and b"hidden" not in message.data


def test_temporary_failure_defers_on_the_backoff_then_sends(db, fast_cfg, smtp_sink, workers):
    """4xx -> deferred about 300 s with the reply; once due again it goes out, same Message-ID."""
    acntid = smtp_account(db, smtp_sink)
    smtp_sink.fail_at("RCPT", "451 4.3.0 Try again later")
    workers.start(fast_cfg)
    emobid = outbox.queue(db, acntid, to_addrs=["a@example.com"], subject="later")
    deferred = wait_state(db, emobid, "deferred")
    assert deferred["smtp_reply"] == "451 4.3.0 Try again later"
    assert "refused every recipient" in deferred["last_error"]
    assert 270 - 2 <= seconds_from_now(deferred["next_attempt_at"]) <= 330
    wait_log(fast_cfg, rf"deferred message \S+ \(outbox {emobid}\) until \d\d:\d\d:\d\d "
                       rf"\(attempt 1\): .*451 4.3.0 Try again later \[{acntid},-\]")
    smtp_sink.clear_failures()
    db.execute("UPDATE email_outbox SET next_attempt_at = now() WHERE emobid = %s", (emobid,))
    sent = wait_state(db, emobid, "sent")
    assert sent["attempts"] == 2 and message_ids(smtp_sink) == [deferred["message_id"]]


def test_deferred_past_max_lifetime_fails(db, make_cfg, db_dsn, smtp_sink, workers):
    """A message still refused with 4xx at the end of outbox.max_lifetime is failed."""
    cfg = make_cfg(db_dsn, outbox__poll_interval=1, outbox__max_lifetime=2)
    acntid = smtp_account(db, smtp_sink)
    smtp_sink.fail_at("DATA", "452 4.2.2 Mailbox full")
    workers.start(cfg)
    emobid = outbox.queue(db, acntid, to_addrs=["a@example.com"])
    # The backoff is capped by the lifetime: the last try comes at its end, about 2 s on.
    assert seconds_from_now(wait_state(db, emobid, "deferred")["next_attempt_at"]) < 2.5
    failed = wait_state(db, emobid, "failed", timeout=6)
    assert failed["attempts"] == 2 and failed["smtp_reply"] == "452 4.2.2 Mailbox full"
    assert failed["last_error"].startswith("gave up after 2 attempts: ")
    assert smtp_sink.messages == []


@pytest.mark.parametrize("stage, reply", [("DATA", "554 5.7.1 Rejected as spam"),
                                          ("RCPT", "550 5.1.1 No such user")])
def test_permanent_refusal_fails_with_the_reply(db, fast_cfg, smtp_sink, workers, stage, reply):
    """5xx at DATA, or for every recipient, fails at once with the reply for the user."""
    acntid = smtp_account(db, smtp_sink)
    smtp_sink.fail_at(stage, reply)
    workers.start(fast_cfg)
    emobid = outbox.queue(db, acntid, to_addrs=["a@example.com"])
    failed = wait_state(db, emobid, "failed")
    assert failed["smtp_reply"] == reply and reply in failed["last_error"]
    assert failed["attempts"] == 1 and smtp_sink.messages == []
    wait_log(fast_cfg, rf"failed message \S+ \(outbox {emobid}\): .*{reply} \[{acntid},-\]")


def test_partly_refused_recipients_are_recorded(db, fast_cfg, smtp_sink, workers):
    """The message goes to those accepted; the refused are listed on the row."""
    acntid = smtp_account(db, smtp_sink)
    smtp_sink.refuse_recipient("gone@example.com", "550 5.1.1 User unknown")
    workers.start(fast_cfg)
    emobid = outbox.queue(db, acntid, to_addrs=["a@example.com", "gone@example.com"],
                          cc_addrs=["b@example.com"])
    sent = wait_state(db, emobid, "sent")
    assert sent["refused_recipients"] == ["gone@example.com"]
    assert sent["last_error"] == "refused gone@example.com: 550 5.1.1 User unknown"
    assert smtp_sink.wait_for(1)[0].rcpt_tos == ("a@example.com", "b@example.com")
    wait_log(fast_cfg, "to 2 recipients in")


def test_unreachable_and_silent_servers_defer(db, fast_cfg, workers):
    """A refused connection and a server that never greets (timeout) both defer, on the backoff."""
    with socket.create_server(("127.0.0.1", 0)) as silent:  # listens, never answers
        closed = smtp_account(db, None, smtp_host="127.0.0.1", smtp_port=free_port())
        mute = smtp_account(db, None, email="mute@example.com", smtp_host="127.0.0.1",
                            smtp_port=silent.getsockname()[1])
        workers.start(fast_cfg)
        first = outbox.queue(db, closed, to_addrs=["a@example.com"])
        second = outbox.queue(db, mute, to_addrs=["a@example.com"])
        refused = wait_state(db, first, "deferred")
        timed_out = wait_state(db, second, "deferred", timeout=8)
    assert "cannot connect to SMTP server 127.0.0.1" in refused["last_error"]
    assert "timed out" in timed_out["last_error"]
    for row in (refused, timed_out):
        assert 268 <= seconds_from_now(row["next_attempt_at"]) <= 330


def test_bad_input_fails_with_a_clear_error_and_the_queue_goes_on(db, fast_cfg, workers):
    """Injection, no recipients, a bad address, over SIZE: each failed, unsent; the next is sent."""
    with SmtpSink(size_limit=3000) as sink:
        acntid = smtp_account(db, sink)
        bad = {
            outbox.queue(db, acntid, to_addrs=["a@example.com"],
                         subject="Hi\r\nBcc: victim@example.com"): "header injection refused",
            outbox.queue(db, acntid, subject="nobody"): "no recipients",
            outbox.queue(db, acntid, to_addrs=["not-an-address"]): "is not an e-mail address",
            outbox.queue(db, acntid, to_addrs=["a@example.com"], body_text="x" * 5000):
                "over the 3000 bytes SMTP server 127.0.0.1",
        }
        good = outbox.queue(db, acntid, to_addrs=["a@example.com"], subject="fine")
        workers.start(fast_cfg)
        assert wait_state(db, good, "sent")
        for emobid, error in bad.items():
            failed = wait_state(db, emobid, "failed")
            assert failed["last_error"].startswith("refused, not sent: ")
            assert error in failed["last_error"]
        assert len(sink.wait_for(1)) == 1 and b"Subject: fine" in sink.messages[0].data


def test_smtp_auth_failure_backs_off_the_account_then_rearms(db, fast_cfg, workers):
    """A refused login backs off the account's SMTP only; new credentials send it all at once."""
    with SmtpSink(auth=("me@example.com", "right-pw")) as sink:
        acntid = smtp_account(db, sink, smtp_login="me@example.com", smtp_password="wrong-pw",
                              imap_host="127.0.0.1")
        other = smtp_account(db, sink, email="other@example.com",
                             smtp_login="me@example.com", smtp_password="right-pw")
        waiting = [outbox.queue(db, acntid, to_addrs=[f"r{i}@example.com"]) for i in range(3)]
        workers.start(fast_cfg)
        for emobid in waiting:
            deferred = wait_state(db, emobid, "deferred")
            assert "refused the login of me@example.com: 535" in deferred["last_error"]
            assert 1795 <= seconds_from_now(deferred["next_attempt_at"]) <= 1800
        account = accounts.get(db, acntid)
        assert account.smtp_auth_error_at is not None and "535" in account.smtp_auth_error
        assert account.imap_auth_error_at is None
        assert "wrong-pw" not in account.smtp_auth_error + info_log(fast_cfg)
        late = outbox.queue(db, acntid, to_addrs=["late@example.com"])
        assert wait_state(db, outbox.queue(db, other, to_addrs=["x@example.com"]), "sent")
        assert outbox_row_attempts(db, late) == 0  # in backoff: not even tried
        accounts.update(db, acntid, smtp_password="right-pw")
        for emobid in [*waiting, late]:
            assert wait_state(db, emobid, "sent", timeout=3)
        assert accounts.get(db, acntid).smtp_auth_error_at is None
        assert all(m.authenticated_as == "me@example.com" for m in sink.wait_for(5))


def outbox_row_attempts(db, emobid: int) -> int:
    return db.execute("SELECT attempts FROM email_outbox WHERE emobid = %s",
                      (emobid,)).fetchone()[0]


def test_starttls_with_auth_on_a_trusted_certificate(db, make_cfg, db_dsn, workers):
    """STARTTLS then AUTH, the certificate checked against engine.tls_ca_file."""
    with SmtpSink(starttls=True, auth=("me@example.com", "pw")) as sink:
        cfg = make_cfg(db_dsn, engine__tls_ca_file=str(sink.ca_pem_path))
        acntid = smtp_account(db, sink, smtp_security="starttls", smtp_login="me@example.com",
                              smtp_password="pw")
        workers.start(cfg)
        wait_state(db, outbox.queue(db, acntid, to_addrs=["a@example.com"]), "sent")
        received = sink.wait_for(1)[0]
    assert received.tls and received.authenticated_as == "me@example.com"


def test_starttls_not_offered_or_untrusted_defers(db, fast_cfg, smtp_sink, workers):
    """STARTTLS required but not offered, or a certificate not trusted: deferred, never plain."""
    with SmtpSink(starttls=True) as tls_sink:  # its CA is not in fast_cfg
        no_tls = smtp_account(db, smtp_sink, smtp_security="starttls")
        untrusted = smtp_account(db, tls_sink, email="u@example.com", smtp_security="starttls")
        workers.start(fast_cfg)
        first = wait_state(db, outbox.queue(db, no_tls, to_addrs=["a@example.com"]), "deferred")
        second = wait_state(db, outbox.queue(db, untrusted, to_addrs=["a@example.com"]),
                            "deferred")
        assert tls_sink.messages == []
    assert "does not offer STARTTLS, which the account requires" in first["last_error"]
    assert "certificate not trusted" in second["last_error"]
    assert smtp_sink.messages == []


class _Keep:
    """An aiosmtpd handler that keeps envelopes (for the implicit-TLS server below)."""

    def __init__(self):
        self.envelopes = []

    async def handle_DATA(self, server, session, envelope):
        self.envelopes.append((envelope, server.transport.get_extra_info("ssl_object") is not None))
        return "250 2.0.0 kept"


def test_implicit_tls(db, make_cfg, db_dsn, tmp_path, workers):
    """smtp_security 'tls' speaks TLS from the first byte (port 465 style)."""
    from aiosmtpd.controller import Controller

    tls = issue_loopback_cert(tmp_path / "tls")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.cert_path, tls.key_path)
    handler = _Keep()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port(),
                            ssl_context=context)
    controller.start()
    try:
        cfg = make_cfg(db_dsn, engine__tls_ca_file=str(tls.ca_pem_path))
        acntid = accounts.add(db, email="me@example.com", smtp_host="127.0.0.1",
                              smtp_port=controller.port, smtp_security="tls")
        workers.start(cfg)
        sent = wait_state(db, outbox.queue(db, acntid, to_addrs=["a@example.com"]), "sent")
    finally:
        controller.stop()
    assert sent["smtp_reply"] == "250 2.0.0 kept"
    assert [is_tls for _, is_tls in handler.envelopes] == [True]


def test_one_session_serves_consecutive_messages_of_an_account(db, fast_cfg, smtp_sink):
    """One SMTP session serves an account's consecutive messages; another account gets its own."""
    first = accounts.get(db, smtp_account(db, smtp_sink))
    second = accounts.get(db, smtp_account(db, smtp_sink, email="two@example.com"))
    worker = SendWorker(fast_cfg, 9, lambda *a: None, lambda: False, "test")
    messages = [compose(Parts(sender=a.email, to_addrs=["x@example.com"]))
                for a in (first, first, first, second)]
    try:
        worker.transmit(first, messages[0])
        session = worker.smtp
        worker.transmit(first, messages[1])
        worker.transmit(first, messages[2])
        assert worker.smtp is session and session.sent == 3
        worker.transmit(second, messages[3])
        assert worker.smtp is not session and worker.smtp.sent == 1
    finally:
        worker.close_sessions()
    assert len(smtp_sink.wait_for(4)) == 4


def test_smtp_auth_backoff_ends_after_auth_error_retry(db, make_cfg, db_dsn, workers):
    """After sync.auth_error_retry the account's messages are tried again: a pause, not an end."""
    cfg = make_cfg(db_dsn, outbox__poll_interval=1, sync__auth_error_retry=2)
    with SmtpSink(auth=("me@example.com", "right-pw")) as sink:
        acntid = smtp_account(db, sink, smtp_login="me@example.com", smtp_password="wrong-pw")
        emobid = outbox.queue(db, acntid, to_addrs=["a@example.com"])
        workers.start(cfg)
        first = wait_state(db, emobid, "deferred")
        deadline = time.monotonic() + 8
        while outbox_row_attempts(db, emobid) < 2:
            assert time.monotonic() < deadline, "not tried again after the backoff"
            time.sleep(0.05)
        again = wait_state(db, emobid, "deferred")
        assert again["next_attempt_at"] > first["next_attempt_at"]
        assert sink.messages == []


def test_requeued_failed_message_is_sent_at_once(db, make_cfg, db_dsn, smtp_sink, workers):
    """Setting a failed row back to 'queued' wakes the workers (a trigger), no poll needed."""
    cfg = make_cfg(db_dsn, outbox__poll_interval=60)
    acntid = smtp_account(db, smtp_sink)
    smtp_sink.fail_at("DATA", "554 5.7.1 Not today", times=1)
    workers.start(cfg)
    emobid = outbox.queue(db, acntid, to_addrs=["a@example.com"])
    failed = wait_state(db, emobid, "failed")
    time.sleep(1.2)  # past the first poll: only a NOTIFY can wake the worker now
    db.execute("UPDATE email_outbox SET state = 'queued', next_attempt_at = now(), "
               "queued_at = now() WHERE emobid = %s", (emobid,))
    sent = wait_state(db, emobid, "sent", timeout=3)
    assert sent["message_id"] == failed["message_id"] == message_ids(smtp_sink)[0]
