"""The Prometheus endpoint (``metrics.listen = 127.0.0.1:9464``, off by default), served by the
master from a daemon thread, from the state DB alone: a hung PostgreSQL cannot hang it.

The processes that do the work add to the state DB's ``counters`` table
(``count_sync`` after a sync task, ``count_send`` after a delivery outcome); a scrape
reads that table, the heartbeats, the slices and the engine facts in one read-only
transaction and writes the text exposition format (version 0.0.4)::

    supervisor_mail_messages_synced_total 1234
    supervisor_mail_sends_total{outcome="sent"} 17
    supervisor_mail_send_latency_seconds_bucket{le="0.5"} 15
    supervisor_mail_heartbeat_age_seconds{role="sync",slot="0"} 0.21

The format is written here rather than with prometheus-client: the numbers are
already aggregated across processes in SQLite, which prometheus-client could only
serve through its multiprocess mode (a directory of mmap files per process: a
second copy of the state, to be cleaned at every reset) or through a custom
collector doing what this module does anyway; the format is a few lines of text,
and the master keeps one dependency less. The counters are totals since the state
DB was created; a watchdog reset deletes the file, which Prometheus sees as a
counter reset (``rate()`` handles it).

The master forks while this thread may be reading SQLite; a fork in the middle of a
SQLite call would leave its mutexes locked in the child. ``os.register_at_fork``
hooks therefore hold the read lock across every fork, and close the listening
socket in the child, so no worker keeps the port bound.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, HTTPServer

from supervisor_mail import outbox
from supervisor_mail.config import Config
from supervisor_mail.state import MASTER_SLOT, StateDB, StateSnapshot, read_snapshot
from supervisor_mail.states import ProcessRole, TaskState

log = logging.getLogger("supervisor_mail.metrics")

PREFIX = "supervisor_mail_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)  # seconds
SCRAPE_TIMEOUT = 1.0   # seconds a scrape waits for a writer's lock on the state DB
CLIENT_TIMEOUT = 5.0   # seconds a slow client may take; one thread serves all scrapes

# Counter names in the `counters` table, which are their Prometheus names.
MESSAGES = PREFIX + "messages_synced_total"
BYTES = PREFIX + "sync_bytes_total"
SYNC_TASKS = PREFIX + "sync_tasks_total"
SENDS = PREFIX + "sends_total"
LATENCY = PREFIX + "send_latency_seconds"  # stored per bucket, not cumulative (see count_send)
LATENCY_SUM = LATENCY + "_sum"

HELP = {
    MESSAGES: "Messages stored from IMAP into PostgreSQL.",
    BYTES: "Bytes of messages stored from IMAP into PostgreSQL.",
    SYNC_TASKS: "Sync tasks finished, by kind.",
    SENDS: "Outbox delivery attempts by outcome (sent, deferred, failed).",
}


# --- counting, in the worker processes --------------------------------------------------------

def count_sync(statedb: StateDB, kind: str, messages: int, size: int) -> None:
    """Count one finished sync task with the messages and bytes it stored."""
    statedb.count(SYNC_TASKS, 1, f'kind="{kind}"')
    if messages:
        statedb.count(MESSAGES, messages)
    if size:
        statedb.count(BYTES, size)


def count_send(statedb: StateDB, outcome: str, seconds: float | None = None) -> None:
    """Count one delivery outcome; ``seconds`` (the SMTP transaction) feeds the histogram.

    One bucket row is written per observation (the first bucket it fits), not every
    bucket from there up: the exposition adds them up, which keeps a send to three
    short writes.
    """
    statedb.count(SENDS, 1, f'outcome="{outcome}"')
    if seconds is None:
        return
    bucket = next((b for b in LATENCY_BUCKETS if seconds <= b), None)
    statedb.count(LATENCY, 1, f'le="{_le(bucket)}"')
    statedb.count(LATENCY_SUM, seconds)


# --- the exposition ---------------------------------------------------------------------------

def _le(bound: float | None) -> str:
    """A bucket's bound as client libraries print it (``0.5``, ``60.0``, ``+Inf``)."""
    return "+Inf" if bound is None else repr(float(bound))


def _number(value: float) -> str:
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _labels(**labels: object) -> str:
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
    return "{" + inner + "}" if inner else ""


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Writer:
    """Collects families: one ``# HELP`` and ``# TYPE`` line each, then their samples."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help: str,
               samples: Iterable[tuple[str, str, float]]) -> None:
        """``samples`` are (name suffix, label text with braces, value)."""
        self.lines.append(f"# HELP {name} {help}")
        self.lines.append(f"# TYPE {name} {kind}")
        for suffix, labels, value in samples:
            self.lines.append(f"{name}{suffix}{labels} {_number(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def exposition(cfg: Config, snap: StateSnapshot) -> str:
    """The text format for one state DB snapshot (a pure function of it, for the tests)."""
    out = _Writer()
    out.family(PREFIX + "state_db_up", "gauge",
               "1 when the state DB could be read for this scrape, else 0.",
               [("", "", 0 if snap.error else 1)])
    stored: dict[str, dict[str, float]] = {}
    for name, labels, value in snap.counters:
        stored.setdefault(name, {})[labels] = value
    for name in sorted(set(stored) | set(HELP)):
        if name in (LATENCY, LATENCY_SUM):
            continue
        help = HELP.get(name, "Counted by the engine.")
        kind = "counter" if name.endswith("_total") else "untyped"
        family = name.removesuffix("_total") if kind == "counter" else name
        values = stored.get(name) or ({"": 0.0} if name in (MESSAGES, BYTES) else {})
        out.family(family, kind, help, [("_total" if kind == "counter" else "",
                                         "{" + labels + "}" if labels else "", value)
                                        for labels, value in sorted(values.items())])
    _latency(out, stored.get(LATENCY, {}), stored.get(LATENCY_SUM, {}).get("", 0.0))
    _engine(out, cfg, snap)
    return out.text()


def _latency(out: _Writer, per_bucket: dict[str, float], total: float) -> None:
    running, samples = 0.0, []
    for bound in LATENCY_BUCKETS:
        running += per_bucket.get(f'le="{_le(bound)}"', 0.0)
        samples.append(("_bucket", _labels(le=_le(bound)), running))
    running += per_bucket.get(f'le="{_le(None)}"', 0.0)
    samples += [("_bucket", _labels(le=_le(None)), running), ("_sum", "", total),
                ("_count", "", running)]
    out.family(LATENCY, "histogram",
               "Seconds from the start of an SMTP delivery to the server's final reply.",
               samples)


def _engine(out: _Writer, cfg: Config, snap: StateSnapshot) -> None:
    """Gauges from the heartbeats, the slices and the engine facts."""
    beats = snap.heartbeats
    out.family(PREFIX + "heartbeat_age_seconds", "gauge",
               "Seconds since each process last made progress.",
               [("", _labels(role=hb.role, slot=hb.slot), snap.monotonic - hb.beat)
                for hb in beats])
    roles = [ProcessRole.PLANNER, ProcessRole.SYNC, ProcessRole.SEND]
    out.family(PREFIX + "processes", "gauge", "Worker processes beating, by role.",
               [("", _labels(role=role), sum(hb.role == role for hb in beats
                                             if hb.slot != MASTER_SLOT))
                for role in roles])
    depth = {slot: 0 for slot in range(cfg.sync_workers)}
    due = aside = 0
    for task in snap.tasks:
        if task.state == TaskState.QUEUED:
            depth[task.slot] = depth.get(task.slot, 0) + 1
            due += task.due <= snap.wall
        aside += task.state == TaskState.SET_ASIDE
    out.family(PREFIX + "sync_queue_depth", "gauge",
               "Sync tasks queued in each sync slot's slice.",
               [("", _labels(slot=slot), n) for slot, n in sorted(depth.items())])
    out.family(PREFIX + "sync_tasks_due", "gauge", "Queued sync tasks that are due now.",
               [("", "", due)])
    out.family(PREFIX + "sync_tasks_set_aside", "gauge",
               "Sync tasks set aside after hanging their worker too often.", [("", "", aside)])
    out.family(PREFIX + "resets", "counter",
               "Watchdog resets (of a role or of the whole engine) since the master started.",
               [("_total", "", _fact(snap, "resets") or 0.0)])
    backoff = _fact(snap, "backoff_until")
    out.family(PREFIX + "reset_backoff_seconds", "gauge",
               "Seconds before the watchdog may reset a stalled engine again.",
               [("", "", max(0.0, backoff - snap.wall) if backoff else 0.0)])
    _backlog(out, snap)
    started = _fact(snap, "started_at")
    if started is not None:
        out.family(PREFIX + "master_start_time_seconds", "gauge",
                   "When the master started, in seconds since the epoch.", [("", "", started)])


def _backlog(out: _Writer, snap: StateSnapshot) -> None:
    """The outbox backlog as the planner last read it (absent before its first pass)."""
    waiting = [(state, _fact(snap, f"outbox_{state}")) for state in outbox.WAITING]
    if any(n is None for _, n in waiting):
        return
    out.family(PREFIX + "outbox_waiting", "gauge",
               "Outbox messages not yet delivered, by state, as of the planner's last pass "
               "(the queue is shared: every host reports all of it).",
               [("", _labels(state=state), n) for state, n in waiting])
    since = _fact(snap, "outbox_oldest_since")
    out.family(PREFIX + "outbox_oldest_waiting_seconds", "gauge",
               "Age of the oldest outbox message not yet delivered; 0 when none waits.",
               [("", "", max(0.0, snap.wall - since) if since is not None else 0.0)])


def _fact(snap: StateSnapshot, key: str) -> float | None:
    try:
        return float(snap.facts[key])  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError):
        return None


# --- the server ---------------------------------------------------------------------------------

_FORK_LOCK = threading.Lock()             # held by a scrape's SQLite read, and across forks
_SERVERS: set[MetricsServer] = set()      # running in this process


def _before_fork() -> None:
    _FORK_LOCK.acquire()


def _after_fork_in_parent() -> None:
    _FORK_LOCK.release()


def _after_fork_in_child() -> None:
    _FORK_LOCK.release()  # the child's only thread is the one that forked, which held it
    for server in list(_SERVERS):
        server.socket.close()  # a worker must not keep the port bound
    _SERVERS.clear()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                    after_in_child=_after_fork_in_child)


class _Handler(BaseHTTPRequestHandler):
    server: MetricsServer
    timeout = CLIENT_TIMEOUT

    def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
        if self.path.split("?", 1)[0] not in ("/metrics", "/"):
            self.send_error(404, "only /metrics is served here")
            return
        body = self.server.scrape().encode()
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Scrapes are not logged: one line every 15 seconds would drown the info log."""


class MetricsServer(HTTPServer):
    """The endpoint; ``stop()`` ends its thread and frees the port."""

    def __init__(self, cfg: Config, statedb_path: str):
        host, port = cfg.metrics.listen
        super().__init__((host, port), _Handler)
        self.cfg = cfg
        self.statedb_path = statedb_path
        self.thread = threading.Thread(target=self.serve_forever, name="metrics", daemon=True)

    def scrape(self) -> str:
        with _FORK_LOCK:
            snap = read_snapshot(self.statedb_path, timeout=SCRAPE_TIMEOUT)
        return exposition(self.cfg, snap)

    def start(self) -> MetricsServer:
        _SERVERS.add(self)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        _SERVERS.discard(self)


def start_metrics(cfg: Config, statedb_path: str) -> MetricsServer | None:
    """Serve ``/metrics`` on ``metrics.listen`` from a daemon thread; None when it is off.

    A port that cannot be bound is logged and leaves the engine running without
    metrics: monitoring must not be the reason mail stops.
    """
    if cfg.metrics.listen is None:
        return None
    host, port = cfg.metrics.listen
    try:
        server = MetricsServer(cfg, statedb_path).start()
    except OSError as exc:
        log.error("metrics: cannot listen on %s:%d (%s); running without metrics", host, port,
                  exc.strerror or exc)
        return None
    log.info("metrics: serving http://%s:%d/metrics", host, server.server_address[1])
    return server

