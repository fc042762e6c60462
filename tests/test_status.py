"""The status screen and its JSON shape, rendered from fixed state DB and PostgreSQL data."""

import json
import os
import re
import time

from supervisor_mail import state, status
from supervisor_mail.config import SETTINGS, Config
from supervisor_mail.state import MASTER_SLOT, PLANNER_SLOT, Heartbeat, Task

NOW = 1_700_000_000.0
MONO = 50_000.0
NO_SUCH_PID = 4_194_305  # above Linux's largest pid_max: never a live process


def make_cfg(**changes) -> Config:
    values = {s.name: s.default for s in SETTINGS}
    values.update({"database.dsn": "dbname=x", "engine.max_workers": 4,
                   "engine.send_workers": 2, "watchdog.worker_timeout": 10,
                   "watchdog.master_timeout": 5})
    values.update({k.replace("__", ".", 1): v for k, v in changes.items()})
    return Config(values)


def beat(slot, role, pid, age, **task):
    return Heartbeat(slot=slot, role=role, pid=pid, backend_pid=None,
                     task_id=task.get("task_id"), acntid=task.get("acntid"),
                     emfdid=task.get("emfdid"), folder=task.get("folder"),
                     phase=task.get("phase", "idle"), progress=task.get("progress", 0),
                     done=0, beat=MONO - age, started=MONO - 3600)


def task(id, slot, state, due, acntid=53, emfdid=824, kind="sync_recent", reason=None):
    return Task(id=id, kind=kind, acntid=acntid, emfdid=emfdid, folder="INBOX", priority=0,
                due=due, slot=slot, state=state, attempts=3 if reason else 0, reason=reason,
                queued_at=NOW - 500, started=None)


def snapshot() -> state.StateSnapshot:
    me = os.getpid()
    return state.StateSnapshot(
        path="/run/supervisor_mail/127.0.0.1.db",
        heartbeats=[
            beat(MASTER_SLOT, "master", me, 0.3),
            beat(PLANNER_SLOT, "planner", me, 0.5, progress=12),
            beat(0, "sync", me, 2.0, task_id=7, acntid=53, emfdid=824, folder="INBOX",
                 phase="fetching", progress=120),
            beat(1, "sync", me, 45.0, phase="idle"),
            beat(2, "send", NO_SUCH_PID, 1.0),
        ],
        tasks=[task(7, 0, "running", NOW - 30), task(8, 0, "queued", NOW - 192, emfdid=825),
               task(9, 0, "queued", NOW + 600, emfdid=826),
               task(10, 1, "set_aside", NOW - 999, acntid=60, emfdid=900,
                    reason="hung its worker in phase 'fetching'")],
        facts={"master_pid": str(me), "started_at": str(NOW - 7380), "resets": "2",
               "backoff_until": None},
        monotonic=MONO, wall=NOW)


def account_rows():
    """Rows as status._ACCOUNTS returns them: account 53 healthy, 60 in IMAP auth backoff."""
    return [
        (53, "anna@example.test", True, True, None, None, None, None, None, None,
         NOW - 60, NOW - 30),
        (60, "bob@example.test", True, True, NOW - 100, "refused the login", None, None,
         None, None, NOW - 60, None),
    ]


def folder_rows():
    """Rows as status._FOLDERS returns them: INBOX of 53 is 300 s overdue for a recent sync."""
    return [
        (53, 824, "INBOX", "hi", None, NOW - 900, NOW - 1200, None, None, None, 4000),
        (53, 825, "Archive", "lo", None, None, NOW - 60, None, None, None, 10),
        (53, 826, "Ważne", "hi", None, NOW - 10, NOW - 100, NOW - 5, None,
         "FETCH failed: server said NO", 77),
        (60, 900, "INBOX", "hi", None, None, None, None, None, None, 0),
    ]


def full_status(acntid=None, **cfg_changes):
    cfg = make_cfg(**cfg_changes)
    out = {"version": status.VERSION, "host_id": "127.0.0.1", "generated_at": NOW,
           "account": acntid,
           "health": {"code": 0, "state": "healthy", "reason": "healthy: master 1, 4 workers"}}
    out.update(status.engine_part(cfg, snapshot(), acntid))
    out["outbox"] = {"counts": {"queued": 2, "sending": 1, "sent": 40, "deferred": 0,
                                "failed": 1}, "oldest_queued_age": 75.0}
    out["accounts"] = status.accounts_part(cfg, account_rows(), folder_rows(), NOW,
                                           with_folders=acntid is not None)
    out["state_db"] = {"path": "/run/supervisor_mail/127.0.0.1.db", "error": None}
    out["database"] = {"error": None}
    return out


def test_processes_are_judged_by_heartbeat_age_and_proc():
    """A fresh beat is ok, one older than worker_timeout is hung, a vanished pid is gone."""
    data = full_status()
    by_slot = {p["slot"]: p for p in data["processes"]}
    assert [p["slot"] for p in data["processes"]] == [PLANNER_SLOT, 0, 1, 2]
    assert by_slot[0]["state"] == "ok" and not by_slot[0]["hung"]
    assert by_slot[0]["task"] == {"id": 7, "kind": "sync_recent", "acntid": 53, "emfdid": 824,
                                  "folder": "INBOX", "where": "[53,824]"}
    assert by_slot[1]["state"] == "hung" and by_slot[1]["hung"]
    assert by_slot[2]["state"] == "gone"
    assert data["master"]["pid"] == os.getpid() and data["master"]["state"] == "ok"
    assert abs(data["master"]["uptime"] - 7380) < 1e-6


def test_slices_count_queued_running_due_and_set_aside():
    """Queue depth per sync slot: a future task is queued but not due; empty slots show 0."""
    data = full_status()
    assert data["slices"] == [
        {"slot": 0, "queued": 2, "running": 1, "due": 1, "set_aside": 0,
         "oldest_due_age": 192.0},
        {"slot": 1, "queued": 0, "running": 0, "due": 0, "set_aside": 1,
         "oldest_due_age": None},
    ]
    assert data["set_aside"][0]["reason"] == "hung its worker in phase 'fetching'"
    assert data["watchdog"] == {"resets": 2, "backoff_until": None}


def test_account_lag_backoff_and_errors_come_from_the_planners_rules():
    """INBOX last synced 900 s ago with a 600 s interval lags 300 s; a recent IMAP refusal
    shows its backoff end and message; the newest folder error is the account's last error."""
    data = full_status()
    anna, bob = data["accounts"]
    assert anna["lag"] == 300.0 and anna["due_folders"] == 1
    assert anna["last_recent_sync"] == NOW - 10 and anna["last_full_sync"] == NOW - 60
    assert anna["last_error"] == "Ważne: FETCH failed: server said NO"
    assert anna["imap_backoff_until"] is None
    assert bob["imap_backoff_until"] == NOW - 100 + 1800
    assert bob["imap_auth_error"] == "refused the login"
    assert bob["lag"] == 0.0  # in auth backoff: nothing is due, by the planner's rule
    assert "folders" not in anna


def test_one_account_narrows_everything_and_lists_its_folders():
    """--account 53: only its process, its tasks and its folders, with per-folder lag."""
    data = full_status(acntid=53)
    assert [p["slot"] for p in data["processes"]] == [0]
    assert not data["set_aside"]
    folders = {f["name"]: f for f in data["accounts"][0]["folders"]}
    assert folders["INBOX"]["lag"] == 300.0 and folders["Archive"]["lag"] is None
    assert folders["Ważne"]["last_uid"] == 77


def test_json_shape_is_plain_json():
    """The dict round-trips through JSON unchanged: no datetimes, enums or dataclasses."""
    data = full_status(acntid=53)
    assert json.loads(json.dumps(data)) == data


def test_render_shows_every_part_aligned():
    """The text screen names the health, each process with its task, the slices, the outbox
    and the accounts, in columns that line up."""
    text = status.render(full_status())
    lines = text.splitlines()
    assert lines[0] == "supervisor_mail on 127.0.0.1: healthy: master 1, 4 workers"
    assert "up 2h03m" in lines[1]
    assert "2 reset(s)" in text
    header = next(line for line in lines if line.startswith("slot  role"))
    row = next(line for line in lines if "[53,824] INBOX" in line)
    assert row.index("sync_recent") == header.index("kind")
    assert re.search(r"\bfetching\s+120\s+2\.0s\s+ok$", row)
    assert re.search(r"\bsend\s+4194305 .*gone$", text, re.M)
    assert "queued 2, sending 1, sent 40, deferred 0, failed 1; oldest waiting 1m15s" in text
    assert re.search(r"anna@example.test .* 10s ago +1m00s ago +5m00s \(1 due\) ", text)
    assert re.search(r"bob@example.test .* never +never +- +28m20s left +- +IMAP login: "
                     r"refused the login$", text, re.M)
    assert "hung its worker in phase 'fetching' (3 attempts)" in text
    assert "\x1b[" not in text


def test_render_colours_only_when_asked():
    """Colour marks a hung process red and the healthy headline green; padding stays outside."""
    text = status.render(full_status(), colour=True)
    assert "\x1b[32mhealthy" in text
    assert "\x1b[31mhung\x1b[0m" in text
    plain = re.sub(r"\x1b\[[0-9;]*m", "", text)
    assert plain == status.render(full_status())


def test_render_says_what_it_can_without_the_database():
    """With PostgreSQL unreadable the engine part is still shown, and the reason too."""
    data = full_status()
    data.update(outbox=None, accounts=None, database={"error": "PostgreSQL did not answer"})
    text = status.render(data)
    assert "database: PostgreSQL did not answer" in text
    assert "[53,824] INBOX" in text and "OUTBOX" not in text


def test_snapshot_of_a_missing_file_is_an_error_not_an_exception(tmp_path):
    """Reading a state DB that does not exist creates nothing and reports why."""
    path = tmp_path / "none.db"
    snap = state.read_snapshot(str(path))
    assert snap.error and "does not exist" in snap.error
    assert not path.exists()


def test_age_and_when_texts():
    """Ages read naturally from tenths of a second to days."""
    assert [status.age_text(s) for s in (None, 0.42, 12, 192, 7380, 360000)] == \
        ["-", "0.4s", "12s", "3m12s", "2h03m", "4d04h"]
    assert status.when_text(None, NOW) == "never"
    stamp = time.strftime("%m-%d %H:%M", time.localtime(NOW - 90))
    assert status.when_text(NOW - 90, NOW) == f"{stamp} (1m30s ago)"
