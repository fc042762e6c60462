"""The embedded IMAP servers and the SMTP sink are real: every check goes over the wire."""

from __future__ import annotations

import email
import smtplib
import ssl
import time
from datetime import datetime, timezone
from email import policy
from pathlib import Path

import pytest
from imapclient import IMAPClient
from imapclient.exceptions import LoginError

from supervisor_mail.embedded.imap import available_servers, client_ssl_context, make_server
from supervisor_mail.embedded.imap_admin import Mailbox, fill_mailbox
from supervisor_mail.embedded.smtp import SmtpSink

CRLF_MESSAGE = (b"Message-ID: <harness-1@example.test>\r\nFrom: a@example.test\r\n"
                b"To: b@example.test\r\nSubject: harness\r\n\r\nline one\r\nline two\r\n")


def _other_session_fetch(account, folder: str, uid: int) -> bytes:
    """BODY[] through a second, independent IMAP session."""
    with IMAPClient(account.server.host, account.server.port, ssl=False, timeout=10) as client:
        client.login(account.login, account.password)
        client.select_folder(folder, readonly=True)
        return client.fetch([uid], ["BODY.PEEK[]"])[uid][b"BODY[]"]


# -- IMAP: messages ----------------------------------------------------------------------


def test_appended_message_comes_back_as_the_server_stores_it(imap_account, mailbox):
    """fetch_raw returns what the server sends to any session: CRLF kept by Dovecot, LF by pymap."""
    uid = mailbox.append("INBOX", CRLF_MESSAGE)

    raw = mailbox.fetch_raw("INBOX", uid)

    assert raw == _other_session_fetch(imap_account, "INBOX", uid)
    stored = {"dovecot": CRLF_MESSAGE, "pymap": CRLF_MESSAGE.replace(b"\r\n", b"\n")}
    assert raw == stored[imap_account.server.name]


def test_bare_line_endings_are_normalised_per_server(imap_account, mailbox):
    """A message with bare LF and bare CR comes back all-CRLF from Dovecot, all-LF from pymap."""
    uid = mailbox.append("INBOX", b"Subject: mixed\r\n\r\nbare lf\nbare cr\rcrlf\r\n")

    raw = mailbox.fetch_raw("INBOX", uid)

    eol = {"dovecot": b"\r\n", "pymap": b"\n"}[imap_account.server.name]
    assert raw == eol.join([b"Subject: mixed", b"", b"bare lf", b"bare cr", b"crlf", b""])


def test_append_sets_flags_and_internal_date(mailbox):
    """append() stores the given flags and INTERNALDATE and returns the server's UID."""
    date = datetime(2023, 5, 6, 7, 8, 9, tzinfo=timezone.utc)

    uid = mailbox.append("INBOX", CRLF_MESSAGE, flags=[b"\\Seen", b"\\Flagged"],
                         internal_date=date)

    assert mailbox.uids("INBOX") == [uid]
    assert mailbox.flags("INBOX", uid) == {b"\\Seen", b"\\Flagged"}
    mailbox.client.normalise_times = False  # keep the server's offset, for an exact compare
    assert mailbox.client.fetch([uid], ["INTERNALDATE"])[uid][b"INTERNALDATE"] == date


def test_flags_can_be_set_added_removed_and_cleared(mailbox):
    """Flag helpers change exactly the flags they name, as seen by the server."""
    uid = mailbox.append("INBOX", CRLF_MESSAGE)

    mailbox.set_flags("INBOX", uid, [b"\\Seen", b"\\Answered"])
    assert mailbox.flags("INBOX", uid) == {b"\\Seen", b"\\Answered"}
    mailbox.add_flags("INBOX", uid, [b"\\Flagged"])
    mailbox.remove_flags("INBOX", uid, [b"\\Seen"])
    assert mailbox.flags("INBOX", uid) == {b"\\Answered", b"\\Flagged"}
    mailbox.clear_flags("INBOX", uid)
    assert mailbox.flags("INBOX", uid) == set()


def test_expunge_removes_only_that_uid(mailbox):
    """expunge() deletes one UID for good and leaves other \\Deleted messages in place."""
    first, second, third = (mailbox.append("INBOX", CRLF_MESSAGE) for _ in range(3))
    mailbox.add_flags("INBOX", first, [b"\\Deleted"])

    mailbox.expunge("INBOX", second)

    assert mailbox.uids("INBOX") == [first, third]
    with pytest.raises(LookupError):
        mailbox.fetch_raw("INBOX", second)


def test_recreate_folder_empties_it_under_a_new_uidvalidity(mailbox):
    """recreate_folder() gives the folder a new UIDVALIDITY, as a server-side reset would."""
    fill_mailbox(mailbox, "Ważne", 2)
    old = mailbox.uidvalidity("Ważne")

    new = mailbox.recreate_folder("Ważne")

    assert new != old
    assert mailbox.uidvalidity("Ważne") == new
    assert mailbox.uids("Ważne") == []


def test_folders_can_be_created_renamed_and_deleted(mailbox):
    """Folder helpers work with non-ASCII names (modified UTF-7 on the wire)."""
    mailbox.create_folder("Faktury 2024")
    mailbox.rename_folder("Faktury 2024", "Zażółć")
    mailbox.create_folder("Kosz")
    mailbox.delete_folder("Kosz")

    assert sorted(mailbox.folders()) == ["INBOX", "Zażółć"]


def test_fill_mailbox_appends_realistic_sample_messages(mailbox):
    """fill_mailbox() creates the folder and appends plain, HTML and attachment messages."""
    uids = fill_mailbox(mailbox, "Archive", 6)

    assert mailbox.uids("Archive") == uids
    parsed = [email.message_from_bytes(mailbox.fetch_raw("Archive", uid), policy=policy.default)
              for uid in uids]
    assert len({message["Message-ID"] for message in parsed}) == 6
    assert all(message["Date"] and message["From"] and message["To"] for message in parsed)
    types = {part.get_content_type() for message in parsed for part in message.walk()}
    assert {"text/plain", "text/html", "application/pdf"} <= types
    # Non-ASCII names travel as RFC 2047 encoded words and decode back.
    assert any(not message["From"].isascii() for message in parsed)
    raw_headers = mailbox.fetch_raw("Archive", uids[0]).replace(b"\r\n", b"\n").split(b"\n\n")[0]
    assert raw_headers.isascii()


# -- IMAP: logins ------------------------------------------------------------------------


def test_login_attempts_count_good_and_bad_logins(imap_account):
    """One good and one bad LOGIN make two attempts for that user, none for another."""
    server = imap_account.server
    bystander = server.new_account()

    Mailbox.for_account(imap_account).close()
    with pytest.raises(LoginError):
        Mailbox(server.host, server.port, imap_account.login, "wrong password")

    assert server.login_attempts(imap_account.login) == 2
    assert server.login_attempts(bystander.login) == 0


def test_login_attempts_count_authenticate_plain(imap_account):
    """AUTHENTICATE PLAIN attempts count like LOGIN ones, good or bad."""
    server = imap_account.server
    for password in (imap_account.password, "wrong password"):
        with IMAPClient(server.host, server.port, ssl=False, timeout=10) as client:
            try:
                client.plain_login(imap_account.login, password)
            except LoginError:
                pass

    assert server.login_attempts(imap_account.login) == 2


def test_unknown_user_attempts_are_counted(imap_server):
    """A login for a user the server does not know still counts for that name."""
    with pytest.raises(LoginError):
        Mailbox(imap_server.host, imap_server.port, "nosuchuser", "whatever")

    assert imap_server.login_attempts("nosuchuser") == 1


# -- IMAP: TLS and processes ---------------------------------------------------------------


@pytest.mark.parametrize("name", available_servers())
def test_imap_starttls_trusts_the_trustme_ca_only(name):
    """A STARTTLS server's certificate verifies against ca_pem_path and not the system CAs."""
    with make_server(name, starttls=True) as server:
        account = server.new_account()
        with IMAPClient(server.host, server.port, ssl=False, timeout=10) as client:
            assert b"STARTTLS" in client.capabilities()
            with pytest.raises(ssl.SSLCertVerificationError):
                client.starttls(ssl.create_default_context())

        with Mailbox.for_account(account) as mailbox:
            uid = mailbox.append("INBOX", CRLF_MESSAGE)
            assert mailbox.uids("INBOX") == [uid]
        assert server.login_attempts(account.login) == 1


def _descendants(pid: int) -> set[int]:
    """PIDs of all live descendants of ``pid``, from /proc."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited while we looked
        if fields[0] != "Z":
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.mark.parametrize("name", available_servers())
def test_stopped_imap_server_leaves_no_process_or_file(name):
    """stop() ends the server and every process it spawned, and deletes its directory."""
    server = make_server(name).start()
    account = server.new_account()
    mailbox = Mailbox.for_account(account)  # makes Dovecot fork login and mail processes
    processes = {server.pid} | _descendants(server.pid)
    directory = server.directory

    server.stop()
    mailbox.close()

    assert not [pid for pid in processes if _alive(pid)]
    assert not directory.exists()
    assert server.pid is None


# -- SMTP ------------------------------------------------------------------------------------


def _send(sink: SmtpSink, message: bytes = CRLF_MESSAGE, to=("b@example.test",)) -> dict:
    with smtplib.SMTP(sink.host, sink.port, timeout=10) as client:
        return client.sendmail("a@example.test", list(to), message)


def test_sink_records_a_message_sent_with_smtplib(smtp_sink):
    """The sink keeps the envelope, the DATA bytes (dot stuffing undone) and arrival times."""
    message = CRLF_MESSAGE + b".a line starting with a dot\r\n"
    before_monotonic, before = time.monotonic(), time.time()

    refused = _send(smtp_sink, message, to=("b@example.test", "c@example.test"))

    [received] = smtp_sink.wait_for(1)
    assert refused == {}
    assert received.mail_from == "a@example.test"
    assert received.rcpt_tos == ("b@example.test", "c@example.test")
    assert received.data == message
    assert before_monotonic <= received.received_monotonic <= time.monotonic()
    assert before <= received.received_at <= time.time()
    assert (received.tls, received.authenticated_as) == (False, None)


def test_sink_answers_4xx_at_rcpt_when_told_then_accepts(smtp_sink):
    """fail_at("RCPT", 4xx, times=1) defers one attempt; the retry is delivered."""
    smtp_sink.fail_at("RCPT", "451 4.3.0 Try again later", times=1)

    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        _send(smtp_sink)
    _send(smtp_sink)

    assert refused.value.recipients == {"b@example.test": (451, b"4.3.0 Try again later")}
    assert len(smtp_sink.wait_for(1)) == 1


def test_sink_answers_5xx_at_data_until_cleared(smtp_sink):
    """fail_at("DATA", 5xx) rejects every message, records none, until clear_failures()."""
    smtp_sink.fail_at("DATA", "554 5.6.0 Message content rejected")

    for _ in range(2):
        with pytest.raises(smtplib.SMTPDataError) as rejected:
            _send(smtp_sink)
        assert rejected.value.smtp_code == 554
    assert smtp_sink.messages == []
    smtp_sink.clear_failures()
    _send(smtp_sink)

    assert len(smtp_sink.wait_for(1)) == 1


def test_sink_refuses_chosen_recipients_only(smtp_sink):
    """refuse_recipient() rejects that address at RCPT; the message still reaches the others."""
    smtp_sink.refuse_recipient("Gone@example.test")

    refused = _send(smtp_sink, to=("gone@example.test", "b@example.test"))

    assert refused == {"gone@example.test": (550, b"5.1.1 Recipient address rejected")}
    assert smtp_sink.wait_for(1)[0].rcpt_tos == ("b@example.test",)


def test_sink_requires_auth_and_rejects_bad_credentials_with_535():
    """With auth set, MAIL before AUTH gets 530, a bad password 535; the right one is accepted."""
    with SmtpSink(auth=("sender", "s3cret")) as sink:
        with smtplib.SMTP(sink.host, sink.port, timeout=10) as client:
            with pytest.raises(smtplib.SMTPSenderRefused) as unauthenticated:
                client.sendmail("a@example.test", ["b@example.test"], CRLF_MESSAGE)
            with pytest.raises(smtplib.SMTPAuthenticationError) as bad:
                client.login("sender", "wrong")
            client.login("sender", "s3cret")
            client.sendmail("a@example.test", ["b@example.test"], CRLF_MESSAGE)

        assert unauthenticated.value.smtp_code == 530
        assert bad.value.smtp_code == 535
        assert sink.wait_for(1)[0].authenticated_as == "sender"


def test_sink_starttls_verifies_with_the_trustme_ca():
    """require_starttls refuses mail in plaintext; STARTTLS verifies against ca_pem_path only."""
    with SmtpSink(require_starttls=True) as sink:
        with pytest.raises(smtplib.SMTPSenderRefused) as plaintext:
            _send(sink)
        with smtplib.SMTP(sink.host, sink.port, timeout=10) as client:
            with pytest.raises(ssl.SSLCertVerificationError):
                client.starttls(context=ssl.create_default_context())
        with smtplib.SMTP(sink.host, sink.port, timeout=10) as client:
            client.starttls(context=client_ssl_context(sink.ca_pem_path))
            client.sendmail("a@example.test", ["b@example.test"], CRLF_MESSAGE)

        assert plaintext.value.smtp_code == 530
        assert sink.wait_for(1)[0].tls is True


def test_sink_advertises_and_enforces_its_size_limit():
    """size_limit is advertised in EHLO and a larger message is refused with 552."""
    with SmtpSink(size_limit=2000) as sink:
        with smtplib.SMTP(sink.host, sink.port, timeout=10) as client:
            client.ehlo()
            advertised = client.esmtp_features["size"]
        with pytest.raises(smtplib.SMTPSenderRefused) as too_big:
            _send(sink, CRLF_MESSAGE + b"x" * 3000 + b"\r\n")

        assert advertised == "2000"
        assert too_big.value.smtp_code == 552
        assert sink.messages == []


def test_sink_wait_for_times_out_naming_the_count(smtp_sink):
    """wait_for() raises TimeoutError saying how many messages did arrive."""
    _send(smtp_sink)

    with pytest.raises(TimeoutError, match="1 of 2"):
        smtp_sink.wait_for(2, timeout=0.2)


def test_sink_reset_forgets_messages_and_rules(smtp_sink):
    """reset() empties the message list and drops failure rules."""
    _send(smtp_sink)
    smtp_sink.fail_at("DATA", "451 4.3.0 Later")

    smtp_sink.reset()
    _send(smtp_sink)

    assert len(smtp_sink.wait_for(1)) == 1
