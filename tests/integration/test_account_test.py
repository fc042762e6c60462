"""`supervisor-mail account test N` against real IMAP (Dovecot, pymap) and SMTP (aiosmtpd)
servers: a good account, a wrong password, an unreachable server, an untrusted certificate."""

import subprocess
import sys

import psycopg
import pytest

from supervisor_mail import accounts
from supervisor_mail.embedded.imap import free_port
from supervisor_mail.embedded.imap_admin import Mailbox, fill_mailbox
from supervisor_mail.embedded.smtp import SmtpSink


def run(conf, *args):
    """Run ``python -m supervisor_mail ... -c conf`` and return (exit code, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "supervisor_mail", *args, "-c", str(conf)],
                          capture_output=True, text=True, timeout=90)
    return proc.returncode, proc.stdout, proc.stderr


def config_file(tmp_path, dsn, extra=""):
    path = tmp_path / "engine.conf"
    path.write_text(f"[database]\ndsn = {dsn}\n[sync]\nsocket_timeout = 5\n"
                    f"[outbox]\nsocket_timeout = 5\n{extra}")
    return path


def add_account(db_dsn, imap=None, smtp=None, password=None):
    """An account row as `account add` writes it; returns its acntid."""
    values = {"email": "owner@example.test"}
    if imap:
        values.update(imap_host=imap[0], imap_port=imap[1], imap_security="plain",
                      imap_login=imap[2], imap_password=password or imap[3])
    if smtp:
        values.update(smtp_host=smtp[0], smtp_port=smtp[1], smtp_security=smtp[2],
                      smtp_login=smtp[3], smtp_password=smtp[4])
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        return accounts.add(conn, **values)


@pytest.fixture
def smtp_auth_sink():
    """An SMTP sink that offers STARTTLS and requires AUTH after it."""
    with SmtpSink(starttls=True, auth=("mailer", "smtp-secret-77")) as sink:
        yield sink


def test_a_working_account_reports_tls_folders_and_capabilities(db_dsn, tmp_path, imap_account,
                                                                  smtp_auth_sink):
    """Both logins succeed: folders with their roles, IMAP capabilities, SMTP STARTTLS with
    a verified certificate and its extensions; exit 0, and no password in the output."""
    with Mailbox.for_account(imap_account) as mailbox:
        fill_mailbox(mailbox, "Archive", 2)
        mailbox.create_folder("Sent")
    server = imap_account.server
    acntid = add_account(
        db_dsn, imap=(server.host, server.port, imap_account.login, imap_account.password),
        smtp=("127.0.0.1", smtp_auth_sink.port, "starttls", "mailer", "smtp-secret-77"))
    conf = config_file(tmp_path, db_dsn,
                       f"[engine]\ntls_ca_file = {smtp_auth_sink.ca_pem_path}\n")
    code, out, err = run(conf, "account", "test", str(acntid))
    assert code == 0, out + err
    assert f"account {acntid} <owner@example.test>" in out
    assert f"logged in as {imap_account.login}" in out
    assert "IMAP4REV1" in out.upper()
    assert "INBOX (inbox)" in out and "Archive (archive)" in out and "Sent (sent)" in out
    assert "no TLS (the account says plain" in out
    assert "connected: TLS 1." in out and "certificate verified" in out
    assert "logged in as mailer" in out and "AUTH" in out
    assert out.rstrip().endswith("result: IMAP ok, SMTP ok")
    assert imap_account.password not in out + err and "smtp-secret-77" not in out + err


def test_a_wrong_password_is_explained_and_nothing_is_recorded(db_dsn, tmp_path, imap_account):
    """A refused IMAP login says so with the advice, exits 5, and starts no backoff."""
    server = imap_account.server
    acntid = add_account(db_dsn, imap=(server.host, server.port, imap_account.login, ""),
                         password="wrong-password-1")
    code, out, _ = run(config_file(tmp_path, db_dsn), "account", "test", str(acntid))
    assert code == 5
    assert "FAIL" in out and f"refused the login of {imap_account.login}" in out
    assert "the login or password is wrong" in out
    assert "wrong-password-1" not in out
    assert out.rstrip().endswith("result: IMAP FAILED")
    with psycopg.connect(db_dsn) as conn:
        assert conn.execute("SELECT imap_auth_error_at FROM email_accounts WHERE acntid = %s",
                            (acntid,)).fetchone()[0] is None


def test_unreachable_and_untrusted_servers_in_plain_words(db_dsn, tmp_path, smtp_auth_sink):
    """A closed port names the server and what to check; a certificate the system does not
    trust names engine.tls_ca_file."""
    acntid = add_account(db_dsn, imap=("127.0.0.1", free_port(), "x", "y"),
                         smtp=("127.0.0.1", smtp_auth_sink.port, "starttls", "mailer",
                               "smtp-secret-77"))
    code, out, _ = run(config_file(tmp_path, db_dsn), "account", "test", str(acntid))
    assert code == 5
    assert "cannot connect to IMAP server 127.0.0.1:" in out
    assert "check the host name and port" in out
    assert "certificate not trusted" in out and "tls_ca_file" in out
    assert out.rstrip().endswith("result: IMAP FAILED, SMTP FAILED")


def test_an_unknown_account_is_one_line(db_dsn, tmp_path):
    """account test of an acntid that does not exist: one line, exit 1."""
    code, out, err = run(config_file(tmp_path, db_dsn), "account", "test", "999")
    assert code == 1 and err.strip() == \
        "supervisor-mail: no account 999: `supervisor-mail account list` shows them"
