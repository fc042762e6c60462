"""Known account passwords — an IMAP one, an SMTP one that works and an SMTP one that is
refused — appear nowhere a run leaves words: process titles and command lines of every
engine process, the logs, `status`, `status --json`, `account test`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from running_engine import Engine, queue, stored

from supervisor_mail import accounts
from supervisor_mail.embedded.imap import available_servers, make_server
from supervisor_mail.embedded.imap_admin import Mailbox, fill_mailbox
from supervisor_mail.embedded.smtp import SmtpSink

IMAP_PASSWORD = "Imap-Known-Passw0rd-4711"
SMTP_PASSWORD = "Smtp-Known-Passw0rd-0815"
WRONG_PASSWORD = "Smtp-Wrong-Passw0rd-1234"
SECRETS = (IMAP_PASSWORD, SMTP_PASSWORD, WRONG_PASSWORD)


@pytest.fixture(scope="module")
def imap():
    """One IMAP server for the module (Dovecot where it runs)."""
    with make_server(available_servers()[0]) as server:
        yield server


def cmdline(pid: int) -> str:
    """What ps shows for a process: its title (setproctitle writes it over argv)."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode(errors="replace")


def assert_no_secret(where: str, text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"a password appears in {where}"


def test_known_passwords_appear_nowhere(tmp_path, db_dsn, db, imap):
    """Sync with a known IMAP password, a delivery with a known SMTP password and a login
    refused with a known wrong one: none of the three is in any title, log or status."""
    login = imap.add_user("secretive", IMAP_PASSWORD)
    with Mailbox.for_account(login) as mailbox:
        fill_mailbox(mailbox, "INBOX", 3)
    with SmtpSink(auth=("mailer", SMTP_PASSWORD)) as sink:
        good = accounts.add(db, email="good@example.org", imap_host=imap.host,
                            imap_port=imap.port, imap_security="plain", imap_login=login.login,
                            imap_password=IMAP_PASSWORD, smtp_host=sink.host,
                            smtp_port=sink.port, smtp_security="plain", smtp_login="mailer",
                            smtp_password=SMTP_PASSWORD)
        refused = accounts.add(db, email="refused@example.org", smtp_host=sink.host,
                               smtp_port=sink.port, smtp_security="plain",
                               smtp_login="mailer", smtp_password=WRONG_PASSWORD)
        with Engine(tmp_path, db_dsn) as engine:
            engine.wait_for(lambda: stored(db, good) == 3, 30, "the sync")
            queue(db, good, 1)
            queue(db, refused, 2)
            sink.wait_for(1, timeout=20)
            engine.wait_for(lambda: db.execute(
                "SELECT smtp_auth_error_at IS NOT NULL FROM email_accounts WHERE acntid = %s",
                (refused,)).fetchone()[0], 20, "the refused SMTP login")

            pids = [engine.master_pid, *engine.worker_pids().values()]
            assert len(pids) == engine.expected_workers() + 1
            titles = {pid: cmdline(pid) for pid in pids}
            assert sum("supervisor_mail: " in title for title in titles.values()) == len(pids)
            for pid, title in titles.items():
                assert_no_secret(f"the title of pid {pid} ({title})", title)

            outputs = {"status": engine.command("status"),
                       "status --json": engine.command("status", "--json"),
                       "status --account": engine.command("status", "--json", "--account",
                                                          str(refused)),
                       "account test": engine.command("account", "test", str(good))}
            for name, done in outputs.items():
                assert done.returncode == 0, (name, done.stderr)
                assert_no_secret(name, done.stdout + done.stderr)
            shown = json.loads(outputs["status --account"].stdout)["accounts"][0]
            assert "refused the login of mailer" in shown["smtp_auth_error"]
            engine.stop()
            stderr = engine.stderr_tail()

    logs = list(Path(engine.cfg.engine.log_dir).iterdir())
    assert any(p.name.endswith("-info.log") for p in logs)
    text = "".join(p.read_text(errors="replace") for p in logs)
    assert "refused the login of mailer" in text  # the refusal is logged, its password is not
    assert_no_secret("the logs", text)
    assert_no_secret("the engine's stderr", stderr)
    assert engine.leftovers() == []
