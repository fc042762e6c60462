"""``supervisor-mail sync`` as an administrator runs it: a real process, a real server,
a progress bar on a terminal, log lines otherwise, one clear line for each mistake."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys

import pytest
from sync_helpers import FIRST_SERVER, add_account

from supervisor_mail.embedded.imap_admin import fill_mailbox

pytestmark = pytest.mark.parametrize("imap_server", [FIRST_SERVER], indirect=True)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def conf(db_dsn, tmp_path):
    path = tmp_path / "supervisor_mail.conf"
    path.write_text(f"[database]\ndsn = {db_dsn}\n[engine]\nlog_dir = {tmp_path / 'log'}\n")
    return str(path)


def sync(conf: str, *args: str, stderr=subprocess.PIPE) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "supervisor_mail", "sync", "-c", conf, *args],
                          cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": REPO})


def test_sync_without_a_terminal_prints_log_lines_and_a_summary(mailbox, imap_account, db,
                                                                 conf):
    """Not a terminal: the engine's log lines on stderr, one summary line a folder."""
    fill_mailbox(mailbox, "INBOX", 4)
    acntid = add_account(db, imap_account)
    done = sync(conf, f"{imap_account.login}@example.test", "--folder", "INBOX", "--full")
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"INBOX: 4 new messages, [\d.]+ MB in [\d.]+s \(\d+ msg/s\), "
                        r"0 flag changes, 0 expunged\n", done.stdout)
    assert re.search(rf"\]\[#\d+\.c\] received 4 new messages in \d+s \[{acntid},\d+\]",
                     done.stderr)
    assert db.execute("SELECT count(*) FROM email_messages").fetchone()[0] == 4


def test_sync_on_a_terminal_draws_a_progress_bar(mailbox, imap_account, db, conf):
    """On a terminal: messages, bytes, rate and ETA, redrawn on one line."""
    fill_mailbox(mailbox, "INBOX", 6)
    acntid = add_account(db, imap_account)
    leader, follower = pty.openpty()
    try:
        done = sync(conf, str(acntid), "--folder", "INBOX", stderr=follower)
        os.close(follower)
        drawn = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal's other end is closed: all was read
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        os.close(leader)
    assert done.returncode == 0
    assert re.search(rb"\rINBOX  6/6 msg  [\d.]+/[\d.]+ MB  \d+ msg/s  ETA \d+:\d\d", drawn)
    assert b"received 6 new messages" not in drawn  # info lines would break the bar
    assert done.stdout.startswith("INBOX: 6 new messages")


@pytest.mark.parametrize("args, message, code", [
    (["4242"], r"no account 4242: `supervisor-mail account list` shows them", 1),
    (["{acntid}", "--folder", "Nowhere"], r"no folder 'Nowhere' on this account; folders: INBOX",
     1),
    (["{bad}"], r"refused the login of \S+: \[AUTHENTICATIONFAILED\]", 5),
])
def test_mistakes_are_one_line_and_an_exit_code(imap_account, db, conf, args, message, code):
    """An unknown account or folder, a bad password: one line naming it, no traceback."""
    ids = {"acntid": add_account(db, imap_account),
           "bad": add_account(db, imap_account, password="wrong")}
    done = sync(conf, *[arg.format(**ids) for arg in args])
    errors = [line for line in done.stderr.splitlines() if line.startswith("supervisor-mail:")]
    assert done.returncode == code
    assert len(errors) == 1 and re.search(message, errors[0]), done.stderr
    assert "Traceback" not in done.stderr


def test_sync_without_folder_takes_every_folder_not_switched_off(mailbox, imap_account, db,
                                                                 conf):
    """No --folder: every folder whose priority is not off, one summary line each."""
    fill_mailbox(mailbox, "INBOX", 2)
    fill_mailbox(mailbox, "Archiwum", 1)
    fill_mailbox(mailbox, "Stare", 1)
    acntid = add_account(db, imap_account)
    assert sync(conf, str(acntid)).returncode == 0  # discovers the folders
    db.execute("UPDATE email_folders SET user_priority = 'off' WHERE server_name = 'Stare'")
    fill_mailbox(mailbox, "INBOX", 1, seed=5)
    done = sync(conf, str(acntid))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert sorted(line.split(":")[0] for line in lines) == ["Archiwum", "INBOX"]
    assert any(line.startswith("INBOX: 1 new messages,") for line in lines)
    assert any(line.startswith("Archiwum: 0 new messages,") for line in lines)
