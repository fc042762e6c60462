"""The Prometheus exposition, written from fixed state DB data and from real counting calls."""

import os

from prometheus_client.parser import text_string_to_metric_families

from supervisor_mail import metrics
from supervisor_mail.config import SETTINGS, Config
from supervisor_mail.state import (
    MASTER_SLOT,
    Heartbeat,
    StateDB,
    StateSnapshot,
    Task,
    read_snapshot,
)


def make_cfg() -> Config:
    values = {s.name: s.default for s in SETTINGS}
    values.update({"engine.max_workers": 4, "engine.send_workers": 2})
    return Config(values)


def samples(text: str) -> dict[tuple, float]:
    """Every sample of the exposition, parsed by prometheus-client's own parser."""
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def test_counting_calls_become_counters_and_a_cumulative_histogram(tmp_path):
    """count_sync and count_send, run against a real state DB, give totals and a histogram
    whose buckets add up, as Prometheus requires."""
    db = StateDB(str(tmp_path / "s.db"))
    metrics.count_sync(db, "sync_recent", 10, 12345)
    metrics.count_sync(db, "sync_full", 5, 55)
    metrics.count_sync(db, "discover", 0, 0)
    for outcome, seconds in (("sent", 0.03), ("sent", 0.4), ("sent", 100.0),
                             ("deferred", 2.0), ("failed", None)):
        metrics.count_send(db, outcome, seconds)
    text = metrics.exposition(make_cfg(), read_snapshot(db.path))
    got = samples(text)
    assert got[("supervisor_mail_messages_synced_total", ())] == 15
    assert got[("supervisor_mail_sync_bytes_total", ())] == 12400
    assert got[("supervisor_mail_sync_tasks_total", (("kind", "discover"),))] == 1
    assert got[("supervisor_mail_sends_total", (("outcome", "sent"),))] == 3
    assert got[("supervisor_mail_sends_total", (("outcome", "failed"),))] == 1
    bucket = "supervisor_mail_send_latency_seconds_bucket"
    assert got[(bucket, (("le", "0.05"),))] == 1
    assert got[(bucket, (("le", "0.5"),))] == 2
    assert got[(bucket, (("le", "2.5"),))] == 3
    assert got[(bucket, (("le", "60.0"),))] == 3
    assert got[(bucket, (("le", "+Inf"),))] == 4
    assert got[("supervisor_mail_send_latency_seconds_count", ())] == 4
    assert abs(got[("supervisor_mail_send_latency_seconds_sum", ())] - 102.43) < 1e-9
    db.close()


def test_engine_gauges_from_heartbeats_slices_and_facts():
    """Heartbeat ages, workers by role, queue depth per sync slot, resets and backoff."""
    def hb(slot, role, age):
        return Heartbeat(slot=slot, role=role, pid=os.getpid(), backend_pid=None, task_id=None,
                         acntid=None, emfdid=None, folder=None, phase="idle", progress=0,
                         done=0, beat=100.0 - age, started=0.0)

    def task(slot, state, due):
        return Task(id=1, kind="sync_recent", acntid=53, emfdid=824, folder="INBOX", priority=0,
                    due=due, slot=slot, state=state, attempts=0, reason=None, queued_at=0.0,
                    started=None)

    snap = StateSnapshot(
        "x.db", heartbeats=[hb(MASTER_SLOT, "master", 0.5), hb(0, "sync", 1.5),
                            hb(2, "send", 3.0)],
        tasks=[task(0, "queued", 900.0), task(0, "queued", 2000.0), task(1, "set_aside", 1.0)],
        facts={"resets": "3", "backoff_until": "1060", "started_at": "500",
               "outbox_queued": "4", "outbox_deferred": "2", "outbox_sending": "1",
               "outbox_oldest_since": "880.5"},
        monotonic=100.0, wall=1000.0)
    got = samples(metrics.exposition(make_cfg(), snap))
    assert got[("supervisor_mail_heartbeat_age_seconds", (("role", "sync"), ("slot", "0")))] \
        == 1.5
    assert got[("supervisor_mail_processes", (("role", "send"),))] == 1
    assert got[("supervisor_mail_processes", (("role", "planner"),))] == 0
    assert got[("supervisor_mail_sync_queue_depth", (("slot", "0"),))] == 2
    assert got[("supervisor_mail_sync_queue_depth", (("slot", "1"),))] == 0
    assert got[("supervisor_mail_sync_tasks_due", ())] == 1
    assert got[("supervisor_mail_sync_tasks_set_aside", ())] == 1
    assert got[("supervisor_mail_resets_total", ())] == 3
    assert got[("supervisor_mail_reset_backoff_seconds", ())] == 60
    assert got[("supervisor_mail_master_start_time_seconds", ())] == 500
    assert got[("supervisor_mail_state_db_up", ())] == 1
    assert got[("supervisor_mail_outbox_waiting", (("state", "queued"),))] == 4
    assert got[("supervisor_mail_outbox_waiting", (("state", "deferred"),))] == 2
    assert got[("supervisor_mail_outbox_oldest_waiting_seconds", ())] == 119.5


def test_no_outbox_gauges_before_the_planner_has_counted():
    """Before the planner's first pass there is no backlog to report, rather than a false 0."""
    snap = StateSnapshot("x.db", facts={"outbox_oldest_since": None}, monotonic=1.0, wall=1.0)
    got = samples(metrics.exposition(make_cfg(), snap))
    assert not any(name.startswith("supervisor_mail_outbox") for name, _ in got)


def test_an_unreadable_state_db_still_gives_valid_text(tmp_path):
    """With no state DB the endpoint says state_db_up 0 and zero counters, still parseable."""
    text = metrics.exposition(make_cfg(), read_snapshot(str(tmp_path / "missing.db")))
    got = samples(text)
    assert got[("supervisor_mail_state_db_up", ())] == 0
    assert got[("supervisor_mail_messages_synced_total", ())] == 0
    assert text.count("# TYPE supervisor_mail_send_latency_seconds histogram") == 1
