"""The real-world corpus (../shared/corpus/real: 290 hard messages other people wrote,
LF-only and mixed line endings, NUL bytes, an empty file, 3,000-part and 200 KB-header
monsters) through APPEND and a first sync, byte-exact.

It runs on one server, Dovecot where installed (5 s): on pymap, which appends and
serves about 15 times slower, the same test passes too but takes 35 s of the
suite's time for the same sync code.
"""

from __future__ import annotations

import csv
import os
import warnings
from pathlib import Path

import pytest
from imapclient import IMAPClient
from sync_helpers import FIRST_SERVER, add_account, digests, folder_of, on_server, run_sync, stored

from supervisor_mail.embedded.imap_admin import Mailbox
from supervisor_mail.states import TaskKind

CORPUS = Path(os.environ.get("SUPERVISOR_MAIL_CORPUS",
                             Path(__file__).resolve().parents[3] / "shared" / "corpus"))
# The traits that make a message legal as a file but refusable over IMAP (README there).
REFUSABLE = {"nul", "empty"}


def _traits() -> dict[str, set[str]]:
    with open(CORPUS / "MANIFEST.tsv", newline="") as f:
        return {row["file"]: set(row["traits"].split(","))
                for row in csv.DictReader(f, delimiter="\t")}


@pytest.mark.skipif(not (CORPUS / "real").is_dir(), reason=f"no corpus at {CORPUS}/real "
                    "(set SUPERVISOR_MAIL_CORPUS to the directory holding real/)")
@pytest.mark.parametrize("imap_server", [FIRST_SERVER], indirect=True)
def test_every_corpus_message_the_server_accepts_is_stored_byte_exact(imap_account, db, cfg):
    """Each accepted message's stored SHA-256 equals the server's BODY[]; the ones the
    server refuses are reported (as a warning in the summary) and are only NUL/empty ones."""
    traits = _traits()
    refused: dict[str, str] = {}
    mailbox = Mailbox.for_account(imap_account, timeout=60)
    try:
        for path in sorted((CORPUS / "real").glob("*.eml")):
            try:
                mailbox.append("INBOX", path.read_bytes())
            except (IMAPClient.Error, OSError) as exc:
                refused[path.name] = " ".join(str(exc).split())[:120]
                mailbox.close()  # a refused literal may leave the session unusable
                mailbox = Mailbox.for_account(imap_account, timeout=60)
        acntid = add_account(db, imap_account)
        result = run_sync(cfg, acntid, kind=TaskKind.SYNC_FULL)
        reference = on_server(mailbox, "INBOX")
    finally:
        mailbox.close()
    if refused:
        server = imap_account.server.name
        warnings.warn(f"{server} refused {len(refused)} of {len(traits)} corpus messages: "
                      + "; ".join(f"{name}: {why}" for name, why in refused.items()),
                      stacklevel=1)
    assert len(reference) == len(traits) - len(refused) and result.new == len(reference)
    assert all(traits[name] & REFUSABLE for name in refused), refused
    inbox = folder_of(db, acntid, "INBOX")
    assert digests(stored(db, inbox.emfdid)) == digests(reference)
    unparsed = db.execute("SELECT count(*) FROM email_messages WHERE headers IS NULL"
                          ).fetchone()[0]
    assert unparsed == 0
