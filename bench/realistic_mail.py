"""A realistic mailbox for the sync benchmarks: about 70 % plain text of 1-10 KB, 20 % HTML
of 10-100 KB and 10 % messages with an attachment of 100 KB-1 MB, as mail clients send
them (CRLF, MIME, RFC 2047 subjects and names, base64 attachments). Deterministic for a
given seed, so every contender syncs the same bytes.
"""

from __future__ import annotations

import base64
import random
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

_WORDS = ("faktura umowa spotkanie termin płatność zamówienie dostawa projekt raport "
          "the meeting invoice quarter figures please find attached regards thanks "
          "zażółć gęślą jaźń dzień dobry pozdrawiam w załączeniu proszę o kontakt").split()
_NAMES = ("=?UTF-8?Q?=C5=81ukasz_=C5=BBmuda?=", "Anna Nowak", "John Smith",
          "=?UTF-8?B?Wm9maWEgV8OzamNpaw==?=", "Grzegorz Kowalski")
_START = datetime(2023, 1, 2, 8, 0, tzinfo=timezone(timedelta(hours=1)))


def _text(rng: random.Random, size: int) -> bytes:
    lines, total = [], 0
    while total < size:
        line = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 12)))
        lines.append(line)
        total += len(line.encode()) + 2
    return ("\r\n".join(lines) + "\r\n").encode()


def message(index: int, rng: random.Random) -> bytes:
    """One message; the mix comes from ``rng``."""
    roll = rng.random()
    date = _START + timedelta(minutes=17 * index)
    head = (f"Return-Path: <sender{index % 97}@example.test>\r\n"
            f"Received: from mx.example.test (mx.example.test [192.0.2.{index % 250}])\r\n"
            f"\tby imap.example.test with ESMTPS id {index:08x}; {format_datetime(date)}\r\n"
            f"From: {_NAMES[index % len(_NAMES)]} <sender{index % 97}@example.test>\r\n"
            f"To: owner@example.test\r\n"
            f"Subject: =?UTF-8?Q?Zam=C3=B3wienie_nr_{index}?=\r\n"
            f"Date: {format_datetime(date)}\r\n"
            f"Message-ID: <bench.{index}.{rng.getrandbits(40):x}@example.test>\r\n"
            f"MIME-Version: 1.0\r\n").encode()
    if roll < 0.7:
        return (head + b"Content-Type: text/plain; charset=utf-8\r\n"
                b"Content-Transfer-Encoding: 8bit\r\n\r\n" + _text(rng, rng.randint(1000, 10000)))
    if roll < 0.9:
        body = _text(rng, rng.randint(10000, 100000)).replace(b"\r\n", b"<br>\r\n")
        return (head + b"Content-Type: text/html; charset=utf-8\r\n"
                b"Content-Transfer-Encoding: 8bit\r\n\r\n<html><body>\r\n" + body +
                b"</body></html>\r\n")
    payload = base64.encodebytes(rng.randbytes(rng.randint(75000, 750000))).replace(b"\n",
                                                                                     b"\r\n")
    return (head + b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n--b1\r\n'
            b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + _text(rng, 1500) +
            b'--b1\r\nContent-Type: application/pdf; name="skan.pdf"\r\n'
            b"Content-Transfer-Encoding: base64\r\n"
            b'Content-Disposition: attachment; filename="skan.pdf"\r\n\r\n' + payload +
            b"--b1--\r\n")


def messages(count: int, seed: int = 1) -> Iterator[bytes]:
    rng = random.Random(seed)
    for index in range(count):
        yield message(index, rng)
