"""``supervisor-mail status``: one screen that answers "is mail flowing?".

It reads the state DB read-only (``mode=ro``, a one-second busy timeout) and
PostgreSQL read-only (connect_timeout 3, statement_timeout 3s, lock_timeout 1s, in a
thread abandoned after ``DB_DEADLINE`` seconds), so it still says what it can while the
engine or the database is hung: a part that cannot be read is reported as such
(``state_db.error``, ``database.error``) and the rest is shown.

``collect(cfg)`` returns a dict, the documented shape that ``status --json`` prints;
``render(status)`` turns the same dict into the aligned table. Times are epoch
seconds, ages and durations seconds, ``null`` for "never" or "unknown"::

    {"version": 1, "host_id": "127.0.0.1", "generated_at": 1700000000.0, "account": null,
     "health": {"code": 0, "state": "healthy", "reason": "healthy: master 4711, ..."},
     "master": {"pid": 4711, "started_at": 1699990000.0, "uptime": 10000.0,
                "beat_age": 0.4, "state": "ok", "hung": false},
     "processes": [{"slot": 0, "role": "sync", "pid": 4713, "state": "ok", "hung": false,
                    "task": {"id": 7, "kind": "sync_recent", "acntid": 53, "emfdid": 824,
                             "folder": "INBOX", "where": "[53,824]"},
                    "phase": "fetching", "progress": 120, "beat_age": 0.3,
                    "uptime": 3600.0}, ...],
     "slices": [{"slot": 0, "queued": 12, "running": 1, "due": 10, "set_aside": 0,
                 "oldest_due_age": 192.0}, ...],
     "set_aside": [{"kind": "sync_full", "acntid": 53, "emfdid": 824, "folder": "INBOX",
                    "attempts": 3, "reason": "hung its worker in phase 'fetching'"}],
     "watchdog": {"resets": 0, "backoff_until": null},
     "outbox": {"counts": {"queued": 0, "sending": 0, "sent": 12, "deferred": 0,
                           "failed": 0}, "oldest_queued_age": null},
     "accounts": [{"acntid": 53, "email": "a@example.com", "enabled": true,
                   "last_recent_sync": 1699999000.0, "last_full_sync": 1699990000.0,
                   "lag": 0.0, "due_folders": 0, "imap_backoff_until": null,
                   "imap_auth_error": null, "smtp_backoff_until": null,
                   "smtp_auth_error": null, "last_error": null, "last_error_at": null,
                   "folders": [   # only with --account
                       {"emfdid": 824, "name": "INBOX", "priority": "hi",
                        "last_recent_sync": 1699999000.0, "last_full_sync": 1699990000.0,
                        "last_uid": 4711, "lag": null, "gone": false, "last_error": null,
                        "last_error_at": null}]}],
     "state_db": {"path": "/run/supervisor_mail/127.0.0.1.db", "error": null},
     "database": {"error": null}}

A process's ``state`` is ``ok``, ``hung`` (no beat for ``watchdog.worker_timeout``,
``master_timeout`` for the master), ``stopped`` (SIGSTOPped: it cannot beat) or
``gone`` (its pid no longer exists); ``hung`` is true for all but ``ok``. ``lag`` is
how long the most overdue folder has been due by the planner's rules (0, or ``null``
for a folder, when none is); ``*_backoff_until`` is the end of a running auth
backoff. ``account`` is the acntid of ``--account N`` (then everything is narrowed
to that account, and its entry in ``accounts`` lists its ``folders``), else
``null``. ``outbox`` and ``accounts`` are ``null`` when PostgreSQL could not be
read. No password is ever selected, so none can be shown.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime
from typing import Any

import psycopg

from supervisor_mail import cluster, control, outbox, planner, store
from supervisor_mail.config import Config, mask_dsn
from supervisor_mail.errors import NotFoundError
from supervisor_mail.state import MASTER_SLOT, StateSnapshot, Task, db_path, read_snapshot
from supervisor_mail.states import OutboxState, TaskState

VERSION = 1               # of the --json shape; raised when a field changes meaning
PG_TIMEOUT = 3            # seconds: connect_timeout and statement_timeout of the status session
PG_LOCK_TIMEOUT = 1       # seconds a status query waits for a lock (a migration, a hung writer)
DB_DEADLINE = 2 * PG_TIMEOUT + 2  # seconds before a PostgreSQL read that hangs is given up
HEALTH_WORDS = {control.HEALTHY: "healthy", control.MASTER_HUNG: "hung",
                control.NOT_RUNNING: "not running", control.DEGRADED: "degraded"}


# --- the state DB, read-only ----------------------------------------------------------------

def process_state(pid: int) -> str:
    """``running``, ``stopped`` (SIGSTOP, or a tracer), ``zombie`` or ``gone``, from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            letter = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"
    return {"T": "stopped", "t": "stopped", "Z": "zombie", "X": "gone"}.get(letter, "running")


def _where(acntid: int | None, emfdid: int | None) -> str:
    return f"[{acntid},{emfdid or '-'}]"


def _fact_float(facts: dict[str, str | None], key: str) -> float | None:
    try:
        return float(facts[key])  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError):
        return None


def engine_part(cfg: Config, snap: StateSnapshot, acntid: int | None = None) -> dict[str, Any]:
    """master, processes, slices, set_aside and watchdog, from a state DB snapshot."""
    tasks_by_id = {t.id: t for t in snap.tasks}
    master, processes = None, []
    for hb in snap.heartbeats:
        age = snap.monotonic - hb.beat
        timeout = cfg.watchdog.master_timeout if hb.slot == MASTER_SLOT \
            else cfg.watchdog.worker_timeout
        proc = process_state(hb.pid)
        state = {"stopped": "stopped", "zombie": "gone", "gone": "gone"}.get(proc, "ok")
        if state == "ok" and age > timeout:
            state = "hung"
        if hb.slot == MASTER_SLOT:
            master = {"pid": hb.pid, "beat_age": age, "state": state, "hung": state != "ok"}
            continue
        task = tasks_by_id.get(hb.task_id) if hb.task_id else None
        entry = {
            "slot": hb.slot, "role": hb.role, "pid": hb.pid, "state": state,
            "hung": state != "ok", "phase": hb.phase, "progress": hb.progress,
            "beat_age": age, "uptime": snap.monotonic - hb.started,
            "task": None if hb.acntid is None else {
                "id": hb.task_id, "kind": task.kind if task else None, "acntid": hb.acntid,
                "emfdid": hb.emfdid or None, "folder": hb.folder or "",
                "where": _where(hb.acntid, hb.emfdid)},
        }
        if acntid is None or hb.acntid == acntid:
            processes.append(entry)
    started_at = _fact_float(snap.facts, "started_at")
    master_pid = master["pid"] if master else _int_or_none(snap.facts.get("master_pid"))
    master_part = {"pid": master_pid, "started_at": started_at,
                   "uptime": snap.wall - started_at if started_at else None,
                   "beat_age": master["beat_age"] if master else None,
                   "state": master["state"] if master else None,
                   "hung": master["hung"] if master else None}
    tasks = [t for t in snap.tasks if acntid is None or t.acntid == acntid]
    return {"master": master_part, "processes": processes,
            "slices": slices(cfg, tasks, snap.wall),
            "set_aside": [{"kind": t.kind, "acntid": t.acntid, "emfdid": t.emfdid or None,
                           "folder": t.folder, "attempts": t.attempts, "reason": t.reason}
                          for t in tasks if t.state == TaskState.SET_ASIDE],
            "watchdog": {"resets": _int_or_none(snap.facts.get("resets")) or 0,
                         "backoff_until": _fact_float(snap.facts, "backoff_until")}}


def _int_or_none(text: str | None) -> int | None:
    return int(text) if text and text.lstrip("-").isdigit() else None


def slices(cfg: Config, tasks: list[Task], now: float) -> list[dict[str, Any]]:
    """Queue depth of every sync slot's slice (a slot with nothing queued shows zeros)."""
    by_slot: dict[int, list[Task]] = {slot: [] for slot in range(cfg.sync_workers)}
    for task in tasks:
        by_slot.setdefault(task.slot, []).append(task)
    out = []
    for slot, held in sorted(by_slot.items()):
        queued = [t for t in held if t.state == TaskState.QUEUED]
        due = [t for t in queued if t.due <= now]
        out.append({"slot": slot, "queued": len(queued),
                    "running": sum(t.state == TaskState.RUNNING for t in held),
                    "due": len(due),
                    "set_aside": sum(t.state == TaskState.SET_ASIDE for t in held),
                    "oldest_due_age": now - min(t.due for t in due) if due else None})
    return out


# --- PostgreSQL, read-only, with short timeouts -------------------------------------------------

_ACCOUNTS = """
    SELECT a.acntid, a.email, a.enabled, coalesce(a.imap_host, '') <> '',
           extract(epoch FROM a.imap_auth_error_at)::float8, a.imap_auth_error,
           extract(epoch FROM a.smtp_auth_error_at)::float8, a.smtp_auth_error,
           a.last_error, extract(epoch FROM a.last_error_at)::float8,
           extract(epoch FROM a.folders_listed_at)::float8,
           extract(epoch FROM u.last_active)::float8
    FROM email_accounts a LEFT JOIN email_user_activity u ON u.user_id = a.owner_id
    WHERE %(acntid)s::bigint IS NULL OR a.acntid = %(acntid)s
    ORDER BY a.acntid"""

_FOLDERS = """
    SELECT f.acntid, f.emfdid, f.display_name, f.priority, f.user_priority,
           extract(epoch FROM f.last_recent_sync)::float8,
           extract(epoch FROM f.last_full_sync)::float8,
           extract(epoch FROM f.last_error_at)::float8,
           extract(epoch FROM f.gone_at)::float8, f.last_error, f.last_uid
    FROM email_folders f
    WHERE %(acntid)s::bigint IS NULL OR f.acntid = %(acntid)s
    ORDER BY f.acntid, f.emfdid"""


def read_only_session(cfg: Config) -> psycopg.Connection:
    """A read-only PostgreSQL session with the short timeouts above."""
    conn = psycopg.connect(store.dsn_of(cfg), autocommit=True,
                           connect_timeout=PG_TIMEOUT, application_name="supervisor_mail status")
    conn.execute("SELECT set_config('statement_timeout', %s, false),"
                 " set_config('lock_timeout', %s, false),"
                 " set_config('default_transaction_read_only', 'on', false)",
                 (f"{PG_TIMEOUT}s", f"{PG_LOCK_TIMEOUT}s"))
    return conn


def read_database(cfg: Config, acntid: int | None, now: float) -> dict[str, Any]:
    """outbox and accounts from PostgreSQL in one read-only session with short timeouts."""
    with read_only_session(cfg) as conn:
        params = {"acntid": acntid}
        with conn.transaction():
            queue = outbox.counts(conn, acntid)
            account_rows = conn.execute(_ACCOUNTS, params).fetchall()
            folder_rows = conn.execute(_FOLDERS, params).fetchall()
    return {"outbox": {"counts": queue.by_state, "oldest_queued_age": queue.oldest_waiting_age},
            "accounts": accounts_part(cfg, account_rows, folder_rows, now,
                                      with_folders=acntid is not None)}


def accounts_part(cfg: Config, account_rows: list[tuple], folder_rows: list[tuple], now: float,
                  with_folders: bool = False) -> list[dict[str, Any]]:
    """Per account: last syncs, lag behind the schedule, auth backoffs, last error.

    The lag is the planner's own verdict (``planner.due_tasks``) of how long the
    account's most overdue folder has been due, so status and the planner cannot
    disagree on what "due" means.
    """
    retry = cfg.sync.auth_error_retry
    states, accounts = [], []
    for (acntid, email, enabled, has_imap, imap_err_at, imap_err, smtp_err_at, smtp_err,
         last_error, last_error_at, listed_at, active_at) in account_rows:
        if enabled and has_imap:
            states.append(planner.AccountState(acntid, imap_err_at, active_at, listed_at,
                                               last_error_at))
        accounts.append({
            "acntid": acntid, "email": email, "enabled": enabled,
            "last_recent_sync": None, "last_full_sync": None, "lag": 0.0, "due_folders": 0,
            "imap_backoff_until": _until(imap_err_at, retry, now),
            "imap_auth_error": imap_err if _until(imap_err_at, retry, now) else None,
            "smtp_backoff_until": _until(smtp_err_at, retry, now),
            "smtp_auth_error": smtp_err if _until(smtp_err_at, retry, now) else None,
            "last_error": last_error, "last_error_at": last_error_at})
    folders = [planner.FolderState(acntid, emfdid, name, priority, user_priority, recent, full,
                                   err_at, gone_at)
               for (acntid, emfdid, name, priority, user_priority, recent, full, err_at, gone_at,
                    _error, _uid) in folder_rows]
    due = planner.due_tasks(states, folders, cfg, now, planner.local_zone())
    by_id = {a["acntid"]: a for a in accounts}
    folder_lag: dict[int, float] = {}
    for task in due:
        account = by_id[task.acntid]
        account["lag"] = max(account["lag"], now - task.due)
        account["due_folders"] += bool(task.emfdid)
        folder_lag[task.emfdid] = now - task.due
    for row in folder_rows:
        account = by_id[row[0]]
        recent, full, err_at, error = row[5], row[6], row[7], row[9]
        account["last_recent_sync"] = _newest(account["last_recent_sync"], recent)
        account["last_full_sync"] = _newest(account["last_full_sync"], full)
        if error and (account["last_error_at"] or 0) < (err_at or 0):
            account["last_error"], account["last_error_at"] = f"{row[2]}: {error}", err_at
    if with_folders:
        for account in accounts:
            account["folders"] = [
                {"emfdid": emfdid, "name": name, "priority": user_priority or priority,
                 "last_recent_sync": recent, "last_full_sync": full, "last_uid": uid,
                 "lag": folder_lag.get(emfdid), "gone": gone_at is not None,
                 "last_error": error, "last_error_at": err_at}
                for (acntid, emfdid, name, priority, user_priority, recent, full, err_at,
                     gone_at, error, uid) in folder_rows if acntid == account["acntid"]]
    return accounts


def _until(failed_at: float | None, retry: int, now: float) -> float | None:
    return failed_at + retry if failed_at is not None and failed_at + retry > now else None


def _newest(a: float | None, b: float | None) -> float | None:
    return max((x for x in (a, b) if x is not None), default=None)


def _read_database_guarded(cfg: Config, acntid: int | None, now: float) -> dict[str, Any]:
    """``read_database`` in a daemon thread given up after DB_DEADLINE: a server that
    accepts the connection and then never answers cannot hang status."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result.update(read_database(cfg, acntid, now))
        except psycopg.Error as exc:
            text = str(exc).strip().splitlines()
            result["error"] = f"PostgreSQL ({mask_dsn(cfg['database.dsn'])}): " \
                              f"{text[0] if text else type(exc).__name__}"
        except Exception as exc:  # status must show the engine part whatever happens here
            result["error"] = f"PostgreSQL: {type(exc).__name__}: {exc}"

    thread = threading.Thread(target=target, name="status-database", daemon=True)
    thread.start()
    thread.join(DB_DEADLINE)
    if thread.is_alive():
        return {"error": f"PostgreSQL did not answer within {DB_DEADLINE}s "
                         "(a hung server, a lock, or the network)"}
    return result


# --- the whole status -------------------------------------------------------------------------

def collect(cfg: Config, acntid: int | None = None) -> dict[str, Any]:
    """Everything ``status`` shows, as the documented dict (see the module docstring)."""
    health = control.health(cfg)
    snap = read_snapshot(db_path(cfg))
    status: dict[str, Any] = {
        "version": VERSION, "host_id": cfg.engine.host_id, "generated_at": snap.wall,
        "account": acntid,
        "health": {"code": health.code, "state": HEALTH_WORDS[health.code],
                   "reason": health.reason},
    }
    status.update(engine_part(cfg, snap, acntid))
    if health.code == control.NOT_RUNNING:
        status["master"]["pid"] = None
    db = _read_database_guarded(cfg, acntid, snap.wall)
    if acntid is not None and db.get("accounts") == []:
        raise NotFoundError(f"no account {acntid}: `supervisor-mail account list` shows them")
    status["outbox"] = db.get("outbox")
    status["accounts"] = db.get("accounts")
    status["state_db"] = {"path": snap.path, "error": snap.error}
    status["database"] = {"error": db.get("error")}
    return status


# --- rendering ----------------------------------------------------------------------------------

_COLOURS = {"green": "32", "red": "31", "yellow": "33", "bold": "1", "dim": "2"}
_STATE_COLOUR = {"ok": "green", "healthy": "green", "hung": "red", "stopped": "red",
                 "gone": "red", "not running": "red", "degraded": "yellow"}


def age_text(seconds: float | None) -> str:
    """``0.4s``, ``12s``, ``3m12s``, ``2h03m``, ``4d02h``; ``-`` for unknown."""
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def when_text(epoch: float | None, now: float) -> str:
    """An instant as local ``MM-DD HH:MM`` with its age: ``03-01 08:00 (2h03m ago)``."""
    if epoch is None:
        return "never"
    stamp = datetime.fromtimestamp(epoch).strftime("%m-%d %H:%M")
    delta = now - epoch
    return f"{stamp} ({age_text(abs(delta))} {'ago' if delta >= 0 else 'from now'})"


class _Painter:
    def __init__(self, colour: bool):
        self.colour = colour

    def __call__(self, text: str, name: str | None) -> str:
        if not self.colour or not name or not text:
            return text
        return f"\x1b[{_COLOURS[name]}m{text}\x1b[0m"


def table(headers: list[str], rows: list[list[str]], paint: _Painter,
          colours: list[list[str | None]] | None = None,
          right: frozenset[int] = frozenset()) -> list[str]:
    """Columns aligned on the widest cell; colour is applied after padding, so it never
    disturbs the alignment."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]

    def line(cells: list[str], tints: list[str | None]) -> str:
        out = []
        for i, cell in enumerate(cells):
            padded = cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            if i == len(cells) - 1:
                padded = padded.rstrip()  # no trailing blanks, coloured or not
            out.append(paint(padded, tints[i]))
        return "  ".join(out).rstrip()

    lines = [line(headers, ["bold"] * len(headers))]
    for n, row in enumerate(rows):
        lines.append(line(row, colours[n] if colours else [None] * len(row)))
    return lines


def render(status: dict[str, Any], colour: bool = False) -> str:
    """The status as the aligned text screen (ANSI colour when ``colour``)."""
    paint = _Painter(colour)
    now = status["generated_at"]
    health = status["health"]
    out = [paint(f"supervisor_mail on {status['host_id']}: ", "bold")
           + paint(health["reason"], _STATE_COLOUR.get(health["state"]))]
    master = status["master"]
    if master["pid"] is not None:
        out.append(f"master pid {master['pid']}, up {age_text(master['uptime'])}, "
                   f"last beat {age_text(master['beat_age'])} ago")
    wd = status["watchdog"]
    backoff = wd["backoff_until"]
    out.append(f"watchdog: {wd['resets']} reset(s) since the master started; " + (
        paint(f"reset backoff until {when_text(backoff, now)}", "yellow")
        if backoff and backoff > now else "no backoff"))
    if status["state_db"]["error"]:
        out.append(paint(f"state DB: {status['state_db']['error']}", "red"))
    out += ["", paint("PROCESSES", "bold")]
    out += _processes(status["processes"], paint)
    out += ["", paint("SYNC QUEUE (slices)", "bold")]
    out += _slices(status["slices"], paint)
    if status["set_aside"]:
        out += ["", paint("SET ASIDE (hung their worker too often)", "bold")]
        for t in status["set_aside"]:
            out.append(paint(f"{t['kind']} {_where(t['acntid'], t['emfdid'])} {t['folder']}: "
                             f"{t['reason']} ({t['attempts']} attempts)", "yellow"))
    out += [""]
    if status["database"]["error"]:
        out.append(paint(f"database: {status['database']['error']}", "red"))
    if status["outbox"] is not None:
        out.append(_outbox(status["outbox"], paint))
    if status["accounts"] is not None:
        out += ["", paint("ACCOUNTS", "bold")]
        out += _accounts(status["accounts"], now, paint)
        for account in status["accounts"]:
            if "folders" in account:
                out += ["", paint(f"FOLDERS of account {account['acntid']} "
                                  f"<{account['email']}>", "bold")]
                out += _folders(account["folders"], now, paint)
    return "\n".join(out) + "\n"


def _processes(processes: list[dict[str, Any]], paint: _Painter) -> list[str]:
    if not processes:
        return ["(no process is beating)"]
    rows, tints = [], []
    for p in processes:
        task = p["task"]
        rows.append([str(p["slot"]), p["role"], str(p["pid"]),
                     f"{task['where']} {task['folder']}".rstrip() if task else "-",
                     (task["kind"] or "") if task else "", p["phase"], str(p["progress"]),
                     age_text(p["beat_age"]), p["state"]])
        tints.append([None] * 8 + [_STATE_COLOUR.get(p["state"])])
    return table(["slot", "role", "pid", "task", "kind", "phase", "progress", "beat", "state"],
                 rows, paint, tints, right=frozenset({0, 2, 6, 7}))


def _slices(slices_: list[dict[str, Any]], paint: _Painter) -> list[str]:
    rows = [[str(s["slot"]), str(s["queued"]), str(s["running"]), str(s["due"]),
             str(s["set_aside"]), age_text(s["oldest_due_age"])] for s in slices_]
    return table(["slot", "queued", "running", "due", "set aside", "oldest due"], rows, paint,
                 right=frozenset(range(6)))


def _outbox(outbox: dict[str, Any], paint: _Painter) -> str:
    alarming = {OutboxState.FAILED.value: "red", OutboxState.DEFERRED.value: "yellow"}
    parts = [paint(f"{state} {n}", alarming.get(state) if n else None)
             for state, n in outbox["counts"].items()]
    oldest = outbox["oldest_queued_age"]
    return (paint("OUTBOX", "bold") + "  " + ", ".join(parts)
            + f"; oldest waiting {age_text(oldest) if oldest is not None else 'none'}")


def _ago(epoch: float | None, now: float) -> str:
    return "never" if epoch is None else f"{age_text(now - epoch)} ago"


def _left(until: float | None, now: float) -> str:
    return "-" if until is None else f"{age_text(until - now)} left"


def _accounts(accounts: list[dict[str, Any]], now: float, paint: _Painter) -> list[str]:
    if not accounts:
        return ["(no account: `supervisor-mail account add` adds one)"]
    rows, tints = [], []
    for a in accounts:
        error = a["last_error"] or ""
        for proto in ("imap", "smtp"):
            if a[f"{proto}_auth_error"]:
                error = f"{proto.upper()} login: {a[f'{proto}_auth_error']}"
        lag = age_text(a["lag"]) + f" ({a['due_folders']} due)" if a["lag"] else "-"
        rows.append([str(a["acntid"]), a["email"], "yes" if a["enabled"] else "no",
                     _ago(a["last_recent_sync"], now), _ago(a["last_full_sync"], now), lag,
                     _left(a["imap_backoff_until"], now), _left(a["smtp_backoff_until"], now),
                     error[:70]])
        tints.append([None] * 5 + ["yellow" if a["lag"] else None,
                                   "yellow" if a["imap_backoff_until"] else None,
                                   "yellow" if a["smtp_backoff_until"] else None,
                                   "red" if error else None])
    return table(["acntid", "email", "enabled", "last recent", "last full", "lag",
                  "imap backoff", "smtp backoff", "last error"],
                 rows, paint, tints, right=frozenset({0}))


def _folders(folders: list[dict[str, Any]], now: float, paint: _Painter) -> list[str]:
    rows, tints = [], []
    for f in folders:
        rows.append([str(f["emfdid"]), f["name"], "gone" if f["gone"] else f["priority"],
                     _ago(f["last_recent_sync"], now), _ago(f["last_full_sync"], now),
                     str(f["last_uid"]), age_text(f["lag"]) if f["lag"] is not None else "-",
                     (f["last_error"] or "")[:70]])
        tints.append([None] * 6 + ["yellow" if f["lag"] else None,
                                   "red" if f["last_error"] else None])
    return table(["emfdid", "folder", "priority", "last recent", "last full", "last uid", "lag",
                  "last error"], rows, paint, tints, right=frozenset({0, 5}))


# --- status --cluster ---------------------------------------------------------------------------

def collect_cluster(cfg: Config) -> dict[str, Any]:
    """What ``status --cluster`` shows: ``cluster.overview`` (hosts with their heartbeat
    age and leases, accounts no host holds, recent moves) with this host's id::

        {"version": 1, "host_id": "mail-a", "generated_at": 1700000000.0, "lease_ttl": 60,
         "hosts": [...], "unleased": [...], "moves": [...], "database": {"error": null}}

    ``hosts``, ``unleased`` and ``moves`` are ``null`` when PostgreSQL could not be read.
    """
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            with read_only_session(cfg) as conn:
                result.update(cluster.overview(conn))
        except psycopg.Error as exc:
            text = str(exc).strip().splitlines()
            result["error"] = f"PostgreSQL ({mask_dsn(cfg['database.dsn'])}): " \
                              f"{text[0] if text else type(exc).__name__}"

    thread = threading.Thread(target=target, name="status-cluster", daemon=True)
    thread.start()
    thread.join(DB_DEADLINE)
    if thread.is_alive():
        result = {"error": f"PostgreSQL did not answer within {DB_DEADLINE}s "
                           "(a hung server, a lock, or the network)"}
    return {"version": VERSION, "host_id": cfg.engine.host_id, "generated_at": time.time(),
            "lease_ttl": cfg.cluster.lease_ttl, "hosts": result.get("hosts"),
            "unleased": result.get("unleased"), "moves": result.get("moves"),
            "database": {"error": result.get("error")}}


def id_ranges(ids: list[int]) -> str:
    """``1-20, 25, 30-31`` for a sorted list of ids; ``-`` for none."""
    parts: list[str] = []
    for n in ids:
        if parts and parts[-1][1] == n - 1:
            parts[-1] = (parts[-1][0], n)
        else:
            parts.append((n, n))
    return ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in parts) or "-"


def render_cluster(status: dict[str, Any], colour: bool = False) -> str:
    """``collect_cluster``'s dict as text (ANSI colour when ``colour``)."""
    paint = _Painter(colour)
    now = status["generated_at"]
    out = [paint(f"supervisor_mail cluster, seen from {status['host_id']} "
                 f"(lease_ttl {status['lease_ttl']}s)", "bold")]
    if status["database"]["error"]:
        out.append(paint(f"database: {status['database']['error']}", "red"))
        return "\n".join(out) + "\n"
    rows, tints = [], []
    for h in status["hosts"]:
        state = "live" if h["live"] else "gone"
        name = h["host_id"] + (" (this host)" if h["host_id"] == status["host_id"] else "")
        rows.append([name, h["hostname"], str(h["pid"]), h["version"],
                     age_text(h["heartbeat_age"]), state, str(h["leases"]),
                     str(h["releasing"]), str(h["synced_last_hour"]), id_ranges(h["accounts"])])
        tints.append([None] * 5 + ["green" if h["live"] else "red"] + [None] * 4)
    out += ["", paint("HOSTS", "bold")]
    out += table(["host", "hostname", "pid", "version", "heartbeat", "state", "leases",
                  "releasing", "synced (1h)", "accounts"], rows, paint, tints,
                 right=frozenset({2, 4, 6, 7, 8})) if rows else ["(no host has registered)"]
    unleased = status["unleased"]
    out += ["", paint("UNLEASED", "bold") + "  " + (
        paint(f"{len(unleased)} accounts no live host holds: {id_ranges(unleased)}", "yellow")
        if unleased else "none: every account is held")]
    out += ["", paint("RECENT MOVES (newest first)", "bold")]
    moves = [[when_text(m["moved_at"], now), str(m["acntid"]), m["from"] or "-", m["to"],
              str(m["generation"]), m["reason"]] for m in status["moves"]]
    out += table(["when", "account", "from", "to", "generation", "why"], moves, paint,
                 right=frozenset({1, 4})) if moves else ["(none)"]
    return "\n".join(out) + "\n"
