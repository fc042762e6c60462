"""Crash semantics of the outbox: racing workers, a worker killed mid-batch, stale claims."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

import pytest
from outbox_helpers import Workers, message_ids, row, smtp_account, wait_state

from supervisor_mail import outbox


@pytest.fixture
def workers(tmp_path):
    started = Workers(tmp_path)
    yield started
    started.stop()


def wait_all_sent(db, count: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = dict(db.execute("SELECT state, count(*) FROM email_outbox GROUP BY state"))
        if states.get("sent", 0) == count:
            return
        time.sleep(0.05)
    raise AssertionError(f"not all {count} sent within {timeout}s: {states}")


def test_racing_workers_never_send_a_message_twice(db, make_cfg, db_dsn, smtp_sink, workers):
    """Three workers on one queue, rows queued before and while they run: each sent once."""
    cfg = make_cfg(db_dsn, outbox__poll_interval=1)
    acntids = [smtp_account(db, smtp_sink, email=f"u{i}@example.com") for i in range(3)]
    for i in range(60):
        outbox.queue(db, acntids[i % 3], to_addrs=[f"r{i}@example.com"], subject=f"early {i}")
    for slot in (7, 8, 9):
        workers.start(cfg, slot)
    for i in range(90):
        outbox.queue(db, acntids[i % 3], to_addrs=[f"r{i}@example.com"], subject=f"late {i}")
        if i % 10 == 0:
            time.sleep(0.01)
    wait_all_sent(db, 150)
    smtp_sink.wait_for(150)
    time.sleep(0.3)  # anything sent twice would arrive now
    ids = message_ids(smtp_sink)
    assert len(ids) == 150 and len(set(ids)) == 150
    stored = {m for (m,) in db.execute("SELECT message_id FROM email_outbox")}
    assert set(ids) == stored
    claimers = {c.split("/")[1] for (c,) in db.execute("SELECT claimed_by FROM email_outbox")}
    assert len(claimers) >= 2  # they really shared the queue


def test_worker_killed_mid_batch_loses_nothing(db, make_cfg, db_dsn, smtp_sink, workers):
    """SIGKILL mid-batch: every message still arrives, at most the one in flight twice."""
    cfg = make_cfg(db_dsn, outbox__claim_timeout=2, outbox__poll_interval=1)
    acntid = smtp_account(db, smtp_sink)
    emobids = [outbox.queue(db, acntid, to_addrs=["a@example.com"], subject=f"batch {i}")
               for i in range(300)]
    victim = workers.start(cfg, 8)
    smtp_sink.wait_for(20, timeout=10)
    os.kill(victim.pid, signal.SIGKILL)
    victim.join()
    received_before = len(smtp_sink.messages)
    assert received_before < 300, "the kill came after the batch"
    workers.start(cfg, 9)
    wait_all_sent(db, 300)
    time.sleep(0.3)
    counts = Counter(message_ids(smtp_sink))
    stored = {row(db, e)["message_id"] for e in emobids}
    assert set(counts) == stored
    assert sum(counts.values()) - len(counts) <= 1


def test_stale_claim_is_reconsidered_and_sent(db, make_cfg, db_dsn, smtp_sink, workers):
    """A claim whose worker vanished is taken again after claim_timeout, same Message-ID."""
    cfg = make_cfg(db_dsn, outbox__claim_timeout=60, outbox__poll_interval=1)
    acntid = smtp_account(db, smtp_sink)
    emobid = outbox.queue(db, acntid, to_addrs=["a@example.com"], message_id="<kept@example.com>")
    db.execute("UPDATE email_outbox SET state = 'sending', claimed_by = 'gone/send 3/1', "
               "claimed_at = now() - interval '61 s', next_attempt_at = now() + interval '1 s', "
               "attempts = 1 WHERE emobid = %s", (emobid,))
    workers.start(cfg)
    time.sleep(0.5)
    assert row(db, emobid)["state"] == "sending"  # not before its claim expires
    sent = wait_state(db, emobid, "sent")
    assert sent["attempts"] == 2 and sent["claimed_by"].startswith("127.0.0.1/send 9/")
    assert message_ids(smtp_sink) == ["<kept@example.com>"]
