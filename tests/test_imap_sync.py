"""The sync's pure logic: folder roles and names, batching, UID sets, response parsing,
cheap header parsing, refusal classification. No server, no database."""

from datetime import datetime, timedelta, timezone

import pytest

from supervisor_mail import headers, imap_wire
from supervisor_mail.errors import AuthError, ProtocolError, TransientServerError
from supervisor_mail.fetching import (
    FolderState,
    Plan,
    flag_names,
    parse_internaldate,
    parse_uid_set,
    plan_batches,
    uid_set,
)
from supervisor_mail.folders import Listed, assign_roles, decode_name, priority_for
from supervisor_mail.imap_client import classify_refusal
from supervisor_mail.states import Priority, Role


def listed(name, *attributes, delimiter="/"):
    return Listed(name, delimiter, tuple(a.encode() for a in attributes))


# -- modified UTF-7 ---------------------------------------------------------------


@pytest.mark.parametrize("server, shown", [
    (b"INBOX", "INBOX"),
    (b"Wys&AUI-ane", "Wysłane"),
    (b"Wa&AXw-ne", "Ważne"),
    (b"&ZeVnLIqe-", "日本語"),
    (b"Tom &- Jerry", "Tom & Jerry"),
    (b"Kopie robocze/Za&AXwA8wFCAQc-", "Kopie robocze/Zażółć"),
])
def test_modified_utf7_names_are_decoded_for_display(server, shown):
    """RFC 3501 modified UTF-7 names decode to what people read, '&-' to '&'."""
    assert decode_name(server) == shown


def test_undecodable_names_are_shown_as_sent():
    """A broken shift sequence stays as the server wrote it; raw UTF-8 is taken as UTF-8."""
    assert decode_name(b"&Jj-x") == "&Jj-x"
    assert decode_name("Ważne".encode()) == "Ważne"


# -- roles and priorities -----------------------------------------------------------


def test_special_use_attributes_give_roles():
    """With SPECIAL-USE, attributes decide, whatever the folders are called."""
    roles = assign_roles([listed("INBOX"), listed("Poczta wysłana", "\\Sent"),
                          listed("Bin", "\\Trash"), listed("Sent"), listed("Spam", "\\Junk"),
                          listed("Stare", "\\Archive"), listed("Robocze", "\\Drafts")],
                         special_use=True)
    assert roles == {"INBOX": Role.INBOX, "Poczta wysłana": Role.SENT, "Bin": Role.TRASH,
                     "Spam": Role.JUNK, "Stare": Role.ARCHIVE, "Robocze": Role.DRAFTS}


def test_well_known_names_give_roles_without_special_use():
    """Without SPECIAL-USE, English and Polish well-known names map to roles, any case."""
    roles = assign_roles([listed("inbox"), listed("Wys&AUI-ane"), listed("Kosz"),
                          listed("Junk E-mail"), listed("Kopie robocze"), listed("Archiwum"),
                          listed("Projekty")], special_use=False)
    assert roles == {"inbox": Role.INBOX, "Wys&AUI-ane": Role.SENT, "Kosz": Role.TRASH,
                     "Junk E-mail": Role.JUNK, "Kopie robocze": Role.DRAFTS,
                     "Archiwum": Role.ARCHIVE}


def test_names_fill_roles_that_special_use_left_out():
    """A server that offers SPECIAL-USE but flags nothing still gets its Sent by name."""
    roles = assign_roles([listed("INBOX"), listed("Sent"), listed("Trash", "\\Trash")],
                         special_use=True)
    assert roles == {"INBOX": Role.INBOX, "Sent": Role.SENT, "Trash": Role.TRASH}


def test_each_role_goes_to_one_folder_the_shallowest():
    """Two candidates for one role: the shallowest wins, a nested one by its last level."""
    roles = assign_roles([listed("INBOX.Sent", delimiter="."), listed("Sent Items", delimiter="."),
                          listed("INBOX.Trash", delimiter=".")], special_use=False)
    assert roles == {"Sent Items": Role.SENT, "INBOX.Trash": Role.TRASH}


def test_folders_that_cannot_hold_mail_get_no_role_and_priority_off():
    """A \\Noselect hierarchy node is kept but never synchronized."""
    node = listed("Sent", "\\Noselect", "\\HasChildren")
    assert not node.selectable
    assert assign_roles([node], special_use=False) == {}
    assert priority_for(None, selectable=False) is Priority.OFF
    assert priority_for(Role.INBOX, selectable=True) is Priority.HI
    assert priority_for(Role.SENT, selectable=True) is Priority.LO
    assert priority_for(None, selectable=True) is Priority.LO


# -- batches and UID sets ------------------------------------------------------------


def test_batches_are_capped_by_count():
    """batch_size messages at most per FETCH."""
    plans = plan_batches([(uid, 100) for uid in range(1, 12)], 5, 10**6, 10**6)
    assert [p.uids for p in plans] == [(1, 2, 3, 4, 5), (6, 7, 8, 9, 10), (11,)]


def test_batches_are_capped_by_bytes():
    """batch_bytes at most per FETCH; a message bigger than that goes alone."""
    plans = plan_batches([(1, 400), (2, 400), (3, 400), (4, 1500), (5, 100)], 100, 1000, 10**6)
    assert [p.uids for p in plans] == [(1, 2), (3,), (4,), (5,)]
    assert all(p.bytes <= 1000 or len(p.uids) == 1 for p in plans)
    assert not any(p.headers_only for p in plans)


def test_oversize_messages_are_fetched_alone_headers_only():
    """A message over max_message_size is its own headers-only FETCH, between full batches."""
    plans = plan_batches([(1, 10), (2, 5000), (3, 10)], 100, 10**6, 4096)
    assert plans == [Plan((1,), (10,)), Plan((2,), (5000,), headers_only=True),
                     Plan((3,), (10,))]


def test_uid_sets_round_trip():
    """UIDs compress to ranges and parse back, single UIDs included."""
    assert uid_set([1, 2, 3, 7, 9, 10]) == b"1:3,7,9:10"
    assert uid_set([5]) == b"5"
    assert parse_uid_set(b"1:3,7,10:9") == {1, 2, 3, 7, 9, 10}
    assert parse_uid_set(42) == {42}
    with pytest.raises(ProtocolError):
        parse_uid_set(b"1:*")


def test_folder_state_from_examine():
    """UIDVALIDITY, UIDNEXT, HIGHESTMODSEQ and EXISTS are read from the untagged answers."""
    state = FolderState()
    state.collect(b"OK", b"[UIDVALIDITY 1700000001] UIDs valid")
    state.collect(b"OK", b"[UIDNEXT 43] Predicted next UID")
    state.collect(b"OK", b"[HIGHESTMODSEQ 99] Highest")
    state.collect(b"EXISTS", 42)
    assert (state.uidvalidity, state.uidnext, state.highestmodseq, state.exists) == \
        (1700000001, 43, 99, 42)
    assert not state.has_new(42) and state.has_new(41)
    with pytest.raises(ProtocolError, match="no UIDVALIDITY"):
        FolderState().checked("INBOX")


# -- wire parsing -----------------------------------------------------------------


def test_fetch_response_is_parsed_with_literals_and_sections():
    """A FETCH line with a literal placeholder, nested lists, a section with spaces."""
    line = (b'12 FETCH (UID 34 FLAGS (\\Seen $Label) INTERNALDATE "01-Jan-2024 10:00:00 +0000" '
            b'RFC822.SIZE 5 MODSEQ (77) BODY[HEADER.FIELDS (SUBJECT)] \x00 BODY[] \x00)')
    items = imap_wire.parse(line, [b"Subject: x\r\n", b"hello"])
    assert items[:2] == [12, b"FETCH"]
    data = imap_wire.fetch_dict(items[2])
    assert data[b"UID"] == 34 and data[b"MODSEQ"] == 77 and data[b"RFC822.SIZE"] == 5
    assert data[b"FLAGS"] == (b"\\Seen", b"$Label")
    assert data[b"BODY[]"] == b"hello"
    assert data[b"BODY[HEADER.FIELDS (SUBJECT)]"] == b"Subject: x\r\n"


def test_quoted_strings_and_nil_are_parsed():
    """Escapes inside quoted strings are undone; NIL is None; bracketed names are atoms."""
    assert imap_wire.parse(b'LIST (\\HasNoChildren) "/" "a \\"q\\" \\\\b"') == \
        [b"LIST", [b"\\HasNoChildren"], b"/", b'a "q" \\b']
    assert imap_wire.parse(b"LIST () NIL [Gmail]/Sent") == [b"LIST", [], None, b"[Gmail]/Sent"]


@pytest.mark.parametrize("garbage", [b"1 FETCH (UID 1", b"1 FETCH UID 1)", b'1 FETCH ("x)'])
def test_malformed_responses_raise_protocol_error(garbage):
    """Unbalanced parentheses or quotes are a ProtocolError, never a crash."""
    with pytest.raises(ProtocolError):
        imap_wire.fetch_dict(imap_wire.parse(garbage)[2])


def test_internaldate_and_flags():
    """INTERNALDATE keeps its zone (space-padded day too); \\Recent is not a stored flag."""
    assert parse_internaldate(b" 7-Jul-1996 02:44:25 -0700") == \
        datetime(1996, 7, 7, 2, 44, 25, tzinfo=timezone(-timedelta(hours=7)))
    assert parse_internaldate(b"31-Feb-2024 00:00:00 +0000") is None
    assert parse_internaldate(b"garbage") is None
    assert flag_names((b"\\Seen", b"\\Recent", b"$Forwarded")) == ["$Forwarded", "\\Seen"]


# -- headers ------------------------------------------------------------------------


def test_headers_are_parsed_cheaply_and_decoded():
    """Folded RFC 2047 Polish subject, names, first Message-ID, a date with its zone."""
    raw = (b"From: =?UTF-8?Q?=C5=81ukasz_=C5=BBmuda?= <l@example.test>\r\n"
           b"Subject: =?ISO-8859-2?Q?Zam=F3wienie?=\r\n =?UTF-8?B?IG5yIDE=?=\r\n"
           b"To: a@example.test,\r\n\tb@example.test\r\n"
           b"Message-ID: <one@example.test> <two@example.test>\r\n"
           b"Date: Tue, 5 Mar 2024 10:00:00 +0100\r\n\r\nFrom: not a header\r\n")
    h = headers.parse(raw)
    assert h.from_addr == "Łukasz Żmuda <l@example.test>"
    assert h.subject == "Zamówienie nr 1"
    assert h.to_addrs == "a@example.test,\tb@example.test"
    assert h.message_id == "<one@example.test>"
    assert h.sent_date == datetime(2024, 3, 5, 9, 0, tzinfo=timezone.utc)
    assert "not a header" not in h.block


def test_bad_headers_never_raise():
    """Bad dates, unknown charsets, raw Latin-2 bytes, NULs, LF-only, no body: all kept."""
    raw = (b"Subject: =?x-unknown?Q?abc?=\nDate: yesterday\nFrom: Gra\xbfyna\x00 <g@x>\n"
           b"Message-ID: no-brackets\n")
    h = headers.parse(raw)
    assert h.subject == "=?x-unknown?Q?abc?="
    assert h.sent_date is None
    assert h.from_addr == "Gra¿yna <g@x>" and "\x00" not in h.block
    assert h.message_id == "no-brackets"
    assert headers.parse(b"") == headers.Headers()


# -- refusals -----------------------------------------------------------------------


@pytest.mark.parametrize("text, kind", [
    ("[AUTHENTICATIONFAILED] Authentication failed.", AuthError),
    ("[AUTHORIZATIONFAILED] No access", AuthError),
    ("[EXPIRED] Password expired", AuthError),
    ("Invalid login or password", AuthError),
    ("[UNAVAILABLE] Temporary authentication failure", TransientServerError),
    ("[LIMIT] Too many connections from this IP", TransientServerError),
    ("[INUSE] Mailbox in use", TransientServerError),
    ("Maximum number of connections from user+IP exceeded", TransientServerError),
    ("Too many simultaneous connections, try again later", TransientServerError),
])
def test_login_refusals_are_classified(text, kind):
    """Only credential refusals are AuthError; RFC 5530 'not now' codes are transient."""
    assert classify_refusal(text) is kind
