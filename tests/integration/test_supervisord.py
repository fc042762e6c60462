"""The engine under a real supervisord, configured from the sample in etc/supervisord.conf."""

from __future__ import annotations

import configparser
import os
import signal
import subprocess
import sys
import time
import xmlrpc.client
from pathlib import Path

import pytest
from running_engine import pid_alive, write_config
from supervisor.xmlrpc import SupervisorTransport

from supervisor_mail import pidfile

SAMPLE = Path(__file__).parents[2] / "etc" / "supervisord.conf"


def sample_sections() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(SAMPLE)
    return parser


class Supervisord:
    """supervisord in the foreground with the sample's program, in a temp directory."""

    def __init__(self, root: Path, engine_conf: Path, tick: str | None = None):
        self.root = root
        self.socket = root / "supervisor.sock"
        sample = sample_sections()
        program = dict(sample["program:supervisor_mail"])
        program["command"] = (f"{sys.executable} -m supervisor_mail run -c {engine_conf} "
                              "--log-stderr")
        program.pop("user", None)  # the test runs as whoever runs the suite
        program["stdout_logfile"] = str(root / "engine.out")
        program["startsecs"] = "2"
        sections = {"program:supervisor_mail": program}
        if tick:
            listener = dict(sample["eventlistener:supervisor_mail_watchdog"])
            listener["command"] = (f"{sys.executable} -m supervisor_mail.eventlistener "
                                   f"--program supervisor_mail -c {engine_conf}")
            listener["events"] = tick
            listener.pop("user", None)
            listener["stderr_logfile"] = str(root / "listener.err")
            sections["eventlistener:supervisor_mail_watchdog"] = listener
        text = (f"[supervisord]\nnodaemon=true\nlogfile={root}/supervisord.log\n"
                f"pidfile={root}/supervisord.pid\nchildlogdir={root}\n"
                f"[unix_http_server]\nfile={self.socket}\n"
                "[rpcinterface:supervisor]\nsupervisor.rpcinterface_factory = "
                "supervisor.rpcinterface:make_main_rpcinterface\n"
                f"[supervisorctl]\nserverurl=unix://{self.socket}\n")
        for name, values in sections.items():
            text += f"[{name}]\n" + "".join(f"{k}={v}\n" for k, v in values.items())
        self.conf = root / "supervisord.conf"
        self.conf.write_text(text)
        self.proc: subprocess.Popen | None = None

    def start(self) -> Supervisord:
        self.proc = subprocess.Popen([sys.executable, "-m", "supervisor.supervisord",
                                      "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        return self

    @property
    def rpc(self):
        transport = SupervisorTransport(None, None, f"unix://{self.socket}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)

    def info(self) -> dict:
        return self.rpc.supervisor.getProcessInfo("supervisor_mail")

    def wait(self, predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                result = predicate()
            except (OSError, xmlrpc.client.Fault):
                result = None
            if result:
                return result
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)


@pytest.fixture
def engine_conf(tmp_path, db_dsn):
    return write_config(tmp_path / "engine.conf", db_dsn, tmp_path)


def running_pid(sup: Supervisord) -> int | None:
    info = sup.info()
    return info["pid"] if info["statename"] == "RUNNING" else None


def workers(pid_dir: str) -> set[int]:
    return {pid for pid in pidfile.worker_pids(pid_dir).values() if pid_alive(pid)}


def test_runs_stops_and_restarts_under_supervisord(tmp_path, engine_conf):
    """RUNNING after start; restarted after the master is SIGKILLed (its workers leave with
    it); a clean stop leaves no worker behind."""
    pid_dir = str(tmp_path / "run" / "pid")
    sup = Supervisord(tmp_path, engine_conf).start()
    seen: set[int] = set()
    try:
        first = sup.wait(lambda: running_pid(sup), 30, "RUNNING")
        old_workers = sup.wait(lambda: len(workers(pid_dir)) == 5 and workers(pid_dir), 30,
                               "five workers")
        seen |= old_workers | {first}
        os.kill(first, signal.SIGKILL)
        second = sup.wait(lambda: (running_pid(sup) or first) != first and running_pid(sup),
                          30, "a new master")
        sup.wait(lambda: not any(pid_alive(p) for p in old_workers), 15, "old workers gone")
        seen |= sup.wait(lambda: len(workers(pid_dir)) == 5 and workers(pid_dir), 30,
                         "five new workers") | {second}
        sup.rpc.supervisor.stopProcess("supervisor_mail", True)
        assert sup.info()["statename"] == "STOPPED"
        assert [pid for pid in seen if pid_alive(pid)] == []
    finally:
        sup.stop()
        for pid in seen:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_event_listener_restarts_a_hung_master(tmp_path, engine_conf):
    """A SIGSTOPped master is restarted by the sample event listener on TICK_5 within two
    ticks plus stopwaitsecs; the listener leaves a healthy master alone."""
    pid_dir = str(tmp_path / "run" / "pid")
    sup = Supervisord(tmp_path, engine_conf, tick="TICK_5").start()
    seen: set[int] = set()
    try:
        first = sup.wait(lambda: running_pid(sup), 30, "RUNNING")
        seen |= sup.wait(lambda: len(workers(pid_dir)) == 5 and workers(pid_dir), 30,
                         "five workers") | {first}
        time.sleep(11)  # two ticks with a healthy master: nothing happens
        assert running_pid(sup) == first
        stopped_at = time.monotonic()
        os.kill(first, signal.SIGSTOP)
        stopwaitsecs = int(sample_sections()["program:supervisor_mail"]["stopwaitsecs"])
        second = sup.wait(lambda: (running_pid(sup) or first) != first and running_pid(sup),
                          10 + stopwaitsecs + 10, "a restarted master")
        took = time.monotonic() - stopped_at
        seen.add(second)
        assert took <= 10 + stopwaitsecs + 5, took
        assert not pid_alive(first)
        seen |= workers(pid_dir)
        sup.rpc.supervisor.stopProcess("supervisor_mail", True)
    finally:
        sup.stop()
        for pid in seen:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
