"""The Prometheus endpoint of a running engine: parseable text whose counters move as mail is
synced and delivered, gauges from the heartbeats and slices, and nothing left running."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from running_engine import Engine, add_account, queue

from supervisor_mail.embedded.imap import available_servers, free_port, make_server
from supervisor_mail.embedded.imap_admin import Mailbox, fill_mailbox


@pytest.fixture(scope="module")
def imap():
    """One IMAP server for the module (Dovecot where it runs): the endpoint, not the server,
    is under test here."""
    with make_server(available_servers()[0]) as server:
        yield server


def scrape(port: int) -> tuple[str, dict[tuple, float]]:
    """(Content-Type, every sample) of one scrape, parsed by prometheus-client's parser."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        kind, text = answer.headers["Content-Type"], answer.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return kind, samples


def value(port: int, name: str, **labels: str) -> float:
    return scrape(port)[1].get((name, tuple(sorted(labels.items()))), 0.0)


def test_counters_move_as_mail_is_synced_and_sent(tmp_path, db_dsn, db, imap, smtp_sink):
    """Five messages synced, then three more: messages_synced_total goes 5 -> 8 and bytes grow;
    a delivery counts under sends_total{outcome="sent"} and in the latency histogram; a
    deferred message shows in the outbox backlog."""
    account = imap.new_account()
    with Mailbox.for_account(account) as mailbox:
        fill_mailbox(mailbox, "INBOX", 5)
    acntid = add_account(db, account, smtp_sink)
    port = free_port()
    with Engine(tmp_path, db_dsn, metrics__listen=f"127.0.0.1:{port}",
                sync__hi_recent_interval=1, sync__hi_recent_interval_nl=1) as engine:
        kind, first = scrape(port)
        assert kind == "text/plain; version=0.0.4; charset=utf-8"
        assert first[("supervisor_mail_state_db_up", ())] == 1
        engine.wait_for(lambda: value(port, "supervisor_mail_messages_synced_total") == 5, 30,
                        "the first five messages to be counted")
        bytes_before = value(port, "supervisor_mail_sync_bytes_total")
        assert bytes_before > 5 * 300

        with Mailbox.for_account(account) as mailbox:
            fill_mailbox(mailbox, "INBOX", 3, seed=7)
        engine.wait_for(lambda: value(port, "supervisor_mail_messages_synced_total") == 8, 30,
                        "three more messages to be counted")
        assert value(port, "supervisor_mail_sync_bytes_total") > bytes_before

        queue(db, acntid, 1)
        smtp_sink.wait_for(1, timeout=20)
        engine.wait_for(lambda: value(port, "supervisor_mail_sends_total", outcome="sent") == 1,
                        10, "the delivery to be counted")
        _, samples = scrape(port)
        assert samples[("supervisor_mail_send_latency_seconds_count", ())] == 1
        assert samples[("supervisor_mail_send_latency_seconds_bucket", (("le", "+Inf"),))] == 1
        assert 0 < samples[("supervisor_mail_send_latency_seconds_sum", ())] < 10
        assert samples[("supervisor_mail_sync_tasks_total", (("kind", "sync_full"),))] >= 1

        assert samples[("supervisor_mail_processes", (("role", "sync"),))] == 2
        assert samples[("supervisor_mail_processes", (("role", "send"),))] == 2
        assert samples[("supervisor_mail_processes", (("role", "planner"),))] == 1
        for role, slot in (("planner", "-2"), ("sync", "0"), ("sync", "1"), ("send", "2")):
            age = samples[("supervisor_mail_heartbeat_age_seconds",
                           (("role", role), ("slot", slot)))]
            assert 0 <= age < 5, (role, slot, age)
        assert ("supervisor_mail_sync_queue_depth", (("slot", "1"),)) in samples
        assert samples[("supervisor_mail_resets_total", ())] == 0
        assert samples[("supervisor_mail_outbox_waiting", (("state", "queued"),))] == 0

        smtp_sink.fail_at("RCPT", "451 4.3.0 Try again later")
        queue(db, acntid, 2)
        engine.wait_for(lambda: value(port, "supervisor_mail_outbox_waiting",
                                      state="deferred") == 1, 20,
                        "the planner to count the deferred message")
        assert value(port, "supervisor_mail_outbox_oldest_waiting_seconds") > 0

        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=5)
        assert missing.value.code == 404
    assert engine.leftovers() == []
