"""The sync when things go wrong, against the real servers: a process killed mid-sync, a
wrong password, a server refusing for load, a connection cut mid-FETCH, a garbled
response, TLS that is required but missing or not trusted."""

from __future__ import annotations

import os
import signal
import ssl
import time

import pytest
from imap_proxy import ImapProxy
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

from supervisor_mail import accounts
from supervisor_mail.embedded.imap import issue_loopback_cert, make_server
from supervisor_mail.embedded.imap_admin import Mailbox, fill_mailbox
from supervisor_mail.errors import (
    AuthError,
    ProtocolError,
    ServerError,
    TLSRequiredError,
    TransientServerError,
)
from supervisor_mail.imap_sync import AuthBackoffError
from supervisor_mail.states import TaskKind


def _wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.005)


def test_sigkill_mid_sync_leaves_no_duplicate_and_the_next_sync_completes(
        mailbox, imap_account, imap_server, db, db_dsn, make_cfg):
    """A forked child syncing a large folder in batches of 5 is SIGKILLed after some
    commits: what it stored is whole and matches its cursor; the next sync adds exactly
    the rest, byte-exact, once."""
    count = 150 if imap_server.name == "dovecot" else 40  # pymap appends slowly
    fill_mailbox(mailbox, "INBOX", count)
    acntid = add_account(db, imap_account)
    cfg = make_cfg(db_dsn, sync__batch_size=5)
    pid = os.fork()
    if pid == 0:  # the child: its own connections, and a pause after each commit
        try:
            run_sync(cfg, acntid, beat=lambda phase, n: time.sleep(0.03) if phase == "commit"
                     else None)
        finally:
            os._exit(0)
    try:
        _wait_for(lambda: db.execute("SELECT count(*) FROM email_messages").fetchone()[0] >= 15)
        os.kill(pid, signal.SIGKILL)
    finally:
        _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    inbox = folder_of(db, acntid, "INBOX")
    partial = stored(db, inbox.emfdid)
    assert 15 <= len(partial) < count
    assert inbox.last_uid == max(partial)  # cursor and rows committed together
    result = run_sync(cfg, acntid)
    assert result.new == count - len(partial)
    total, distinct = db.execute("SELECT count(*), count(DISTINCT uid) FROM email_messages"
                                 ).fetchone()
    assert total == distinct == count
    assert digests(stored(db, inbox.emfdid)) == digests(on_server(mailbox, "INBOX"))


def test_wrong_password_is_tried_once_per_retry_period(imap_account, imap_server, db,
                                                       make_cfg, db_dsn):
    """However often a sync is asked for, the server sees one login per
    sync.auth_error_retry (counted in its own log); new credentials re-arm at once."""
    cfg = make_cfg(db_dsn, sync__auth_error_retry=2)
    acntid = add_account(db, imap_account, password="not-the-password")
    with pytest.raises(AuthError) as first:
        run_sync(cfg, acntid)
    assert not isinstance(first.value, AuthBackoffError)
    for _ in range(5):
        with pytest.raises(AuthBackoffError, match="correct the credentials"):
            run_sync(cfg, acntid)
    assert imap_server.login_attempts(imap_account.login) == 1
    account = accounts.get(db, acntid)
    assert account.imap_auth_error_at is not None and "refused" in account.imap_auth_error
    time.sleep(2.2)  # the period is over: exactly one more attempt, then backoff again
    for _ in range(3):
        with pytest.raises(AuthError):
            run_sync(cfg, acntid)
    assert imap_server.login_attempts(imap_account.login) == 2
    accounts.update(db, acntid, imap_password=imap_account.password)
    assert run_sync(cfg, acntid).new == 0
    assert imap_server.login_attempts(imap_account.login) == 3
    assert accounts.get(db, acntid).imap_auth_error_at is None


@pytest.mark.parametrize("imap_server", [FIRST_SERVER], indirect=True)
@pytest.mark.parametrize("refusal", [
    b"NO [LIMIT] Too many connections from 127.0.0.1",
    b"NO [UNAVAILABLE] Temporary authentication failure, try again later",
    b"* BYE Maximum number of connections from user+IP exceeded "
    b"(mail_max_userip_connections=1)",
], ids=["limit", "unavailable", "bye-max-connections"])
def test_load_refusal_is_transient_and_never_an_auth_error(imap_account, db, cfg, refusal):
    """A LOGIN refused for load (a proxy in front of the real server answers it) is a
    transient error, retried shortly, and starts no auth backoff: once the server
    accepts again, the next sync logs in at once."""
    with ImapProxy(imap_account.server.host, imap_account.server.port,
                   refuse_login=refusal) as proxy:
        acntid = add_account(db, imap_account, host=proxy.host, port=proxy.port)
        with pytest.raises(TransientServerError) as error:
            run_sync(cfg, acntid)
        assert not isinstance(error.value, AuthError)
        assert proxy.logins_refused == 3  # imap_sync.LOGIN_RETRY: three tries, seconds apart
        account = accounts.get(db, acntid)
        assert account.imap_auth_error_at is None and account.imap_auth_error is None
        proxy.refuse_login = None
        assert run_sync(cfg, acntid).new == 0


def test_connection_cut_mid_fetch_is_recovered(mailbox, imap_account, db, make_cfg, db_dsn):
    """A connection closed halfway through the message bytes is reopened, the folder
    resumes from its committed cursor, and every message ends up stored once, exact."""
    uids = fill_mailbox(mailbox, "INBOX", 24)
    reference = on_server(mailbox, "INBOX")
    with ImapProxy(imap_account.server.host, imap_account.server.port,
                   cut_after=sum(map(len, reference.values())) // 2) as proxy:
        acntid = add_account(db, imap_account, host=proxy.host, port=proxy.port)
        with captured_log() as lines:
            result = run_sync(make_cfg(db_dsn, sync__batch_size=4), acntid)
    assert proxy.cuts_done == 1 and proxy.connections == 2
    assert any("connection lost during UID FETCH" in line for line in lines)
    assert result.new == len(uids)
    inbox = folder_of(db, acntid, "INBOX")
    assert digests(stored(db, inbox.emfdid)) == digests(reference)
    assert db.execute("SELECT count(*) FROM email_messages").fetchone()[0] == len(uids)


def test_garbled_response_fails_the_task_with_a_clear_error(mailbox, imap_account, db, cfg):
    """A FETCH response that is not IMAP fails that sync with a ProtocolError recorded on
    the folder and logged with [acntid,emfdid]; the next sync, clean, stores everything."""
    fill_mailbox(mailbox, "INBOX", 3)
    with ImapProxy(imap_account.server.host, imap_account.server.port) as proxy:
        proxy.rewrite = lambda data: data.replace(b"RFC822.SIZE ", b"RFC822.SIZE ((")
        acntid = add_account(db, imap_account, host=proxy.host, port=proxy.port)
        with captured_log() as lines, pytest.raises(ProtocolError, match="unbalanced"):
            run_sync(cfg, acntid)
        inbox = folder_of(db, acntid, "INBOX")
        assert "unbalanced" in inbox.last_error
        assert lines[-1].endswith(f"[{acntid},{inbox.emfdid}]") and "failed" in lines[-1]
        proxy.rewrite = None
        assert run_sync(cfg, acntid).new == 3
    assert folder_of(db, acntid, "INBOX").last_error is None


def test_starttls_required_but_not_offered_is_refused(imap_account, imap_server, db, cfg):
    """An account that requires STARTTLS never talks in plain text to a server without
    it: TLSRequiredError, no login sent, no auth backoff."""
    acntid = add_account(db, imap_account, security="starttls")
    with pytest.raises(TLSRequiredError, match="does not offer STARTTLS"):
        run_sync(cfg, acntid)
    assert imap_server.login_attempts(imap_account.login) == 0
    assert accounts.get(db, acntid).imap_auth_error_at is None


def test_starttls_verifies_the_certificate(imap_server, db, make_cfg, db_dsn):
    """Over STARTTLS an untrusted certificate is refused before the login; with the CA
    in engine.tls_ca_file the same account syncs."""
    with make_server(imap_server.name, starttls=True) as tls_server:
        account = tls_server.new_account()
        with Mailbox.for_account(account) as mailbox:
            fill_mailbox(mailbox, "INBOX", 2)
        acntid = add_account(db, account, security="starttls")
        _refused_until_trusted(tls_server, account.login, acntid, make_cfg, db_dsn,
                               tls_server.ca_pem_path)


def _refused_until_trusted(server, login, acntid, make_cfg, db_dsn, ca_pem_path) -> None:
    """The sync fails on the untrusted certificate before any login (not as an auth
    error), then stores the two waiting messages once engine.tls_ca_file names the CA."""
    logins = server.login_attempts(login)  # the filling session's
    with pytest.raises(ServerError, match="certificate not trusted") as error:
        run_sync(make_cfg(db_dsn), acntid)
    assert not isinstance(error.value, AuthError)
    assert server.login_attempts(login) == logins
    trusted = make_cfg(db_dsn, engine__tls_ca_file=str(ca_pem_path))
    assert run_sync(trusted, acntid).new == 2


def test_implicit_tls_verifies_the_certificate(mailbox, imap_account, db, make_cfg, db_dsn,
                                              tmp_path):
    """An account on implicit TLS (993 style: a TLS front on loopback before the real
    server) is refused before any login while the certificate is not trusted, and
    syncs once engine.tls_ca_file names its CA."""
    fill_mailbox(mailbox, "INBOX", 2)
    files = issue_loopback_cert(tmp_path / "tls")
    front = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    front.load_cert_chain(files.cert_path, files.key_path)
    server = imap_account.server
    with ImapProxy(server.host, server.port, tls=front) as proxy:
        acntid = add_account(db, imap_account, host=proxy.host, port=proxy.port, security="tls")
        _refused_until_trusted(server, imap_account.login, acntid, make_cfg, db_dsn,
                               files.ca_pem_path)


def _unreadable_on_dovecot(imap_account, uid):
    """Make the message's file unreadable to Dovecot (it reads mail as nobody); returns
    what makes it readable again."""
    maildir = imap_account.server.directory / "mail" / imap_account.login
    uidlist = (maildir / "dovecot-uidlist").read_text().splitlines()[1:]
    base = next(line.split(":", 1)[1] for line in uidlist if line.split()[0] == str(uid))
    modes = {path: path.stat().st_mode for path in maildir.glob(f"*/{base}*")}
    for path in modes:
        path.chmod(0)
    return lambda: [path.chmod(mode) for path, mode in modes.items()]


# The real server's own failure where it can be provoked (Dovecot cannot read a file:
# BYE mid-FETCH); on any server, the same answer from a proxy when that UID is asked for.
BREAKAGES = ["proxy-bye"] + (["unreadable-file"] if FIRST_SERVER == "dovecot" else [])


@pytest.mark.parametrize("imap_server", [FIRST_SERVER], indirect=True)
@pytest.mark.parametrize("breakage", BREAKAGES)
def test_message_the_server_cannot_send_is_recorded_and_the_folder_goes_on(
        mailbox, imap_account, db, make_cfg, db_dsn, breakage):
    """A message whose FETCH makes the server drop the connection, batch after batch,
    is found by fetching its batch one by one and stored as a row with the reason; the
    other messages are stored and the cursor passes it."""
    uids = fill_mailbox(mailbox, "INBOX", 8)
    reference = on_server(mailbox, "INBOX")  # before the file breaks
    victim = uids[4]
    with ImapProxy(imap_account.server.host, imap_account.server.port) as proxy:
        if breakage == "proxy-bye":
            proxy.drop_fetch_of = victim
        else:
            _unreadable_on_dovecot(imap_account, victim)
        acntid = add_account(db, imap_account, host=proxy.host, port=proxy.port)
        with captured_log() as lines:
            result = run_sync(make_cfg(db_dsn, sync__batch_size=3), acntid)
    assert (result.new, result.skipped) == (8, 1)
    inbox = folder_of(db, acntid, "INBOX")
    assert inbox.last_uid == max(uids) and inbox.last_error is None
    row = db.execute("SELECT raw, skipped_reason FROM email_messages WHERE uid = %s",
                     (victim,)).fetchone()
    assert row[0] is None and "the server dropped the connection" in row[1]
    assert any(f"message UID {victim} stored without its body" in line for line in lines)
    del reference[victim]
    assert digests({u: r for u, r in stored(db, inbox.emfdid).items() if r}) == \
        digests(reference)


@pytest.mark.parametrize("imap_server", [FIRST_SERVER], indirect=True)
@pytest.mark.parametrize("breakage", BREAKAGES)
def test_a_message_not_delivered_is_asked_for_again_by_each_full_sync(
        mailbox, imap_account, db, make_cfg, db_dsn, breakage):
    """While the server still cannot send it, a full sync succeeds and leaves its row as
    it was; once the server can, the next full sync stores it byte-exact, and it is a
    message like the others."""
    uids = fill_mailbox(mailbox, "INBOX", 5)
    reference = on_server(mailbox, "INBOX")
    victim = uids[2]
    cfg = make_cfg(db_dsn, sync__batch_size=3)
    with ImapProxy(imap_account.server.host, imap_account.server.port) as proxy:
        if breakage == "proxy-bye":
            proxy.drop_fetch_of = victim
            repair = lambda: setattr(proxy, "drop_fetch_of", None)  # noqa: E731
        else:
            repair = _unreadable_on_dovecot(imap_account, victim)
        acntid = add_account(db, imap_account, host=proxy.host, port=proxy.port)
        assert run_sync(cfg, acntid).skipped == 1
        emfdid = folder_of(db, acntid, "INBOX").emfdid

        def victim_row():
            return db.execute("SELECT raw IS NULL, undelivered, skipped_reason FROM"
                              " email_messages WHERE emfdid = %s AND uid = %s",
                              (emfdid, victim)).fetchone()

        with captured_log() as lines:
            still = run_sync(cfg, acntid, kind=TaskKind.SYNC_FULL)
        assert still.delivered_late == 0 and victim_row()[:2] == (True, True)
        assert any(f"message UID {victim} still not delivered" in line for line in lines)
        assert folder_of(db, acntid, "INBOX").last_error is None

        repair()
        with captured_log() as lines:
            late = run_sync(cfg, acntid, kind=TaskKind.SYNC_FULL)
        assert late.delivered_late == 1 and victim_row() == (False, False, None)
        assert any("1 of 1 messages the server could not deliver before are stored now"
                   in line for line in lines)
        assert run_sync(cfg, acntid, kind=TaskKind.SYNC_FULL).delivered_late == 0
    assert digests(stored(db, emfdid)) == digests(reference)
