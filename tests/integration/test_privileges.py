"""Who the engine's processes run as. Started as root with ``engine.user = nobody``, the master
and every worker run as nobody (real, effective, saved and filesystem ids, root's groups
dropped), and the directories it writes are nobody's. Started as an ordinary user, no
``engine.user`` is needed and everything runs as that user.

As root the engine runs from a ``make install`` tree (built on the system's python3 at a
path nobody can read): the test interpreter may live where nobody cannot (a pyenv under
/root), exactly the situation an installation must not be in.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from install_helpers import copy_source, make, staged_prefix
from running_engine import Engine, pid_alive, write_config

from supervisor_mail import pidfile
from supervisor_mail.state import read_snapshot

AS_ROOT = os.geteuid() == 0


def ids(pid: int) -> dict[str, list[int]]:
    """The Uid, Gid and Groups lines of /proc/<pid>/status."""
    found = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Uid", "Gid", "Groups"):
                found[key] = [int(n) for n in rest.split()]
    return found


def live_engine_pids(pid_dir: str, master: int) -> dict[str, int]:
    pids = {name: pid for name, pid in pidfile.worker_pids(pid_dir).items() if pid_alive(pid)}
    return {"master": master, **pids}


def wait_for_workers(pid_dir: str, data_dir: str, master: int, timeout: float = 30):
    """Until the master, the planner and both sync workers beat."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # read-only: a state DB created here, as root, would be one nobody cannot write
        beats = [hb for hb in read_snapshot(os.path.join(data_dir, "127.0.0.1.db")).heartbeats
                 if pid_alive(hb.pid)]
        if {"master", "planner", "sync"} <= {hb.role for hb in beats} \
                and sum(hb.role == "sync" for hb in beats) == 2:
            return live_engine_pids(pid_dir, master)
        time.sleep(0.2)
    raise AssertionError(f"the engine's workers did not start within {timeout}s")


@pytest.fixture
def installed():
    """A `make install` tree at a PREFIX every user can read; removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="supervisor_mail-privileges-"))
    base.chmod(0o755)
    try:
        source = copy_source(base / "src")
        prefix, stage = base / "opt" / "supervisor_mail", base / "stage"
        make(source, "install", DESTDIR=str(stage), PREFIX=str(prefix))
        shutil.copytree(staged_prefix(stage, prefix), prefix, symlinks=True)
        yield base, prefix
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_engine_user_is_who_the_workers_run_as(request, tmp_path, db_dsn):
    """As root with engine.user = nobody: master, planner, sync and send workers all run as
    nobody, with no group of root's left, and the data and log files are nobody's. As an
    ordinary user: engine.user is not needed (nor honoured) and every process runs as the
    invoking user."""
    if not AS_ROOT:
        not_root_runs_as_invoking_user(tmp_path, db_dsn)
        return
    base, prefix = request.getfixturevalue("installed")
    nobody = pwd.getpwnam("nobody")
    conf = write_config(base / "engine.conf", db_dsn, base, engine__allow_root=False,
                        engine__user="nobody")
    proc = subprocess.Popen([str(prefix / "bin/supervisor-mail"), "run", "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, cwd=base)
    seen: dict[str, int] = {}
    try:
        seen.update(wait_for_workers(str(base / "run/pid"), str(base / "run"), proc.pid))
        deadline = time.monotonic() + 3  # watch a while: a respawned worker must be nobody too
        while time.monotonic() < deadline:
            for name, pid in live_engine_pids(str(base / "run/pid"), proc.pid).items():
                seen.setdefault(f"{name}/{pid}", pid)
                found = ids(pid)
                assert found["Uid"] == [nobody.pw_uid] * 4, (name, found)
                assert found["Gid"] == [nobody.pw_gid] * 4, (name, found)
                assert 0 not in found["Groups"], (name, found)
            time.sleep(0.05)
        roles = {name.split("/")[0].split("-")[0] for name in seen}
        assert {"master", "planner", "sync", "send"} <= roles, seen
        for path in (base / "run", base / "run/pid", base / "log",
                     *(base / "log").glob("*-info.log")):
            assert path.stat().st_uid == nobody.pw_uid, path
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        for pid in seen.values():  # only pids this engine had
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert not [pid for pid in seen.values() if pid_alive(pid)]


def not_root_runs_as_invoking_user(tmp_path: Path, db_dsn: str) -> None:
    """No allow_root needed, a configured engine.user (only for starts as root) ignored: every
    process runs as whoever started the engine."""
    with Engine(tmp_path, db_dsn, engine__allow_root=False, engine__user="nobody") as engine:
        pids = live_engine_pids(engine.cfg.engine.pid_dir, engine.master_pid)
        assert len(pids) == engine.expected_workers() + 1
        for name, pid in pids.items():
            assert ids(pid)["Uid"] == [os.getuid()] * 4, name
    assert engine.leftovers() == []


def test_without_engine_user_everything_runs_as_the_invoking_user(tmp_path, db_dsn):
    """Without engine.user the engine never changes user: as root only with allow_root (the
    container case), otherwise as whoever started it; every worker has the master's ids."""
    with Engine(tmp_path, db_dsn, engine__allow_root=AS_ROOT) as engine:
        pids = live_engine_pids(engine.cfg.engine.pid_dir, engine.master_pid)
        assert len(pids) == engine.expected_workers() + 1
        for name, pid in pids.items():
            found = ids(pid)
            assert found["Uid"] == [os.getuid()] * 4, name
            assert found["Gid"] == [os.getgid()] * 4, name
    assert engine.leftovers() == []
