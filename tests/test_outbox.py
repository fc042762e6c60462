"""Outbox logic that needs no server: the retry schedule, message composition, reply classes."""

from datetime import datetime, timezone
from email import message_from_bytes, policy

import pytest

from supervisor_mail import outbox
from supervisor_mail.compose import BadMessage, Parts, compose
from supervisor_mail.smtp_client import Refused, permanent, reply_text

QUEUED = datetime(2024, 3, 1, 12, 0, tzinfo=timezone.utc)


def parse(data: bytes):
    return message_from_bytes(data, policy=policy.SMTP)


def test_backoff_doubles_from_300s_to_an_hour():
    """Without jitter the schedule is 300, 600, 1200, 2400, then 3600 s for good."""
    middle = [outbox.backoff(n, rand=0.5) for n in range(1, 8)]
    assert middle == [300, 600, 1200, 2400, 3600, 3600, 3600]


def test_backoff_jitter_stays_within_ten_percent():
    """The jitter spreads retries by +-10 % and never beyond."""
    assert outbox.backoff(1, rand=0.0) == pytest.approx(270)
    assert outbox.backoff(1, rand=0.999999) == pytest.approx(330, abs=0.01)
    spread = {round(outbox.backoff(3)) for _ in range(200)}
    assert len(spread) > 10 and min(spread) >= 1080 and max(spread) <= 1320


def test_parts_put_bcc_in_the_envelope_only():
    """Bcc recipients are RCPT TO, never a header of the transmitted message."""
    out = compose(Parts(sender="me@example.com", subject="Hi", body_text="Hello",
                        to_addrs=["Ann <ann@example.com>"], cc_addrs=["cc@example.com"],
                        bcc_addrs=["secret@example.com"], from_name="Me", date=QUEUED))
    assert out.recipients == ["ann@example.com", "cc@example.com", "secret@example.com"]
    assert b"secret@example.com" not in out.data
    assert b"bcc" not in out.data.lower()
    msg = parse(out.data)
    assert msg["To"] == "Ann <ann@example.com>" and msg["Cc"] == "cc@example.com"
    assert msg["From"] == "Me <me@example.com>"
    assert msg["Date"] == "Fri, 01 Mar 2024 12:00:00 +0000"
    assert msg["Message-ID"] == out.message_id and out.message_id.endswith("@example.com>")
    assert msg.get_content().strip() == "Hello"
    assert b"\r\n" in out.data and b"\n" not in out.data.replace(b"\r\n", b"")


def test_given_message_id_is_kept_across_resends():
    """A stored Message-ID is used as it is, so a resend carries the same one."""
    parts = Parts(sender="me@example.com", to_addrs=["a@example.com"],
                  message_id="<abc.1@example.com>", date=QUEUED)
    assert compose(parts).message_id == "<abc.1@example.com>"
    assert parse(compose(parts).data)["Message-ID"] == "<abc.1@example.com>"


def test_html_and_text_make_an_alternative():
    """Both bodies give multipart/alternative with the text first."""
    out = compose(Parts(sender="me@example.com", to_addrs=["a@example.com"], subject="x",
                        body_text="plain", body_html="<p>rich</p>", date=QUEUED))
    msg = parse(out.data)
    assert msg.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/html"]


def test_explicit_recipients_win_over_the_headers():
    """``recipients`` is the envelope when given; the headers are left as they are."""
    out = compose(Parts(sender="me@example.com", recipients=["x@example.com", "X@example.com"],
                        to_addrs=["a@example.com"], date=QUEUED))
    assert out.recipients == ["x@example.com"]
    assert parse(out.data)["To"] == "a@example.com"


@pytest.mark.parametrize("field, value", [
    ("subject", "Hi\r\nBcc: victim@example.com"),
    ("subject", "Hi\nX-Evil: 1"),
    ("to_addrs", ["a@example.com\r\nBcc: victim@example.com"]),
    ("from_name", "Me\rX-Evil: 1"),
    ("message_id", "<a@b>\r\nX-Evil: 1"),
])
def test_header_injection_is_refused(field, value):
    """A line break in any header value is refused, naming the header injection."""
    parts = Parts(sender="me@example.com", to_addrs=["a@example.com"], date=QUEUED)
    setattr(parts, field, value)
    with pytest.raises(BadMessage, match="header injection refused"):
        compose(parts)


@pytest.mark.parametrize("field, value, match", [
    ("to_addrs", ["not an address"], "To address 'not an address' is not an e-mail address"),
    ("cc_addrs", ["a@"], "Cc address 'a@' is not an e-mail address"),
    ("bcc_addrs", ["<>"], "Bcc address '<>' is not an e-mail address"),
    ("recipients", ["a@b..c"], "recipient 'a@b..c' is not an e-mail address"),
    ("sender", "nobody", "the envelope sender 'nobody' is not an e-mail address"),
    ("message_id", "no-at-sign", "is not of the form <id@domain>"),
])
def test_bad_addresses_are_refused(field, value, match):
    """An address that does not parse is refused with the field and the value."""
    parts = Parts(sender="me@example.com", to_addrs=["a@example.com"], date=QUEUED)
    setattr(parts, field, value)
    with pytest.raises(BadMessage, match=match):
        compose(parts)


def test_no_recipients_is_refused():
    """A message nobody would receive is refused, saying where recipients go."""
    with pytest.raises(BadMessage, match="no recipients"):
        compose(Parts(sender="me@example.com", subject="alone", date=QUEUED))
    with pytest.raises(BadMessage, match="no recipients"):
        compose(Parts(sender="me@example.com", raw=b"Subject: alone\r\n\r\nbody\r\n"))


RAW = (b"From: Me <me@example.com>\n"
       b"To: ann@example.com\n"
       b"Bcc: hidden@example.com,\n"
       b"\tother-hidden@example.com\n"
       b"Subject: =?utf-8?q?Za=C5=BC=C3=B3=C5=82=C4=87?=\n"
       b"\n"
       b"Body line\n.leading dot\n\xc5\xbc\n")


def test_raw_bcc_is_stripped_but_kept_in_the_envelope():
    """A raw message's Bcc field (folded lines too) is removed; its addresses stay RCPT TO."""
    out = compose(Parts(sender="me@example.com", raw=RAW, date=QUEUED))
    assert out.recipients == ["ann@example.com", "hidden@example.com",
                              "other-hidden@example.com"]
    assert b"hidden" not in out.data and b"bcc" not in out.data.lower()


def test_raw_keeps_its_body_and_gets_message_id_and_date():
    """The body is byte-exact but for CRLF line ends; Message-ID and Date are added."""
    out = compose(Parts(sender="me@example.com", raw=RAW, message_id="<id.7@example.com>",
                        date=QUEUED))
    head, _, body = out.data.partition(b"\r\n\r\n")
    assert body == b"Body line\r\n.leading dot\r\n\xc5\xbc\r\n"
    assert head.startswith(b"Message-ID: <id.7@example.com>\r\nDate: Fri, 01 Mar 2024 12:00:00")
    assert out.message_id == "<id.7@example.com>"
    assert head.endswith(b"\r\nSubject: =?utf-8?q?Za=C5=BC=C3=B3=C5=82=C4=87?=")


def test_raw_message_id_wins_and_nothing_is_added_twice():
    """A raw message with Message-ID and Date keeps both and gains no second copy."""
    raw = (b"Message-ID: <own@example.com>\r\nDate: Fri, 01 Mar 2024 10:00:00 +0000\r\n"
           b"From: me@example.com\r\nTo: a@example.com\r\n\r\nx\r\n")
    out = compose(Parts(sender="me@example.com", raw=raw, message_id="<other@example.com>"))
    assert out.message_id == "<own@example.com>"
    assert out.data == raw


def test_raw_with_a_broken_header_line_is_refused():
    """A header line that is no field (an injected or mangled line) is refused."""
    with pytest.raises(BadMessage, match="line 2 of the raw message's header"):
        compose(Parts(sender="me@example.com", raw=b"To: a@example.com\r\nno colon here\r\n\r\n"
                                                   b"x\r\n"))


def test_reply_classes():
    """5xx is final, 4xx and broken sessions pass; replies are stored on one line."""
    assert permanent(550) and permanent(554) and not permanent(451) and not permanent(-1)
    assert reply_text(451, b"4.3.0 Try\n again") == "451 4.3.0 Try again"
    assert Refused("x", 552, "552 too big").permanent
    assert not Refused("x", 421, "421 closing").permanent
