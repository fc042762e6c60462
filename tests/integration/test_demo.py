"""`supervisor-mail demo`: the sync and the delivery are shown, it exits 0 well within two
minutes, and no process it started (servers, engine, workers) outlives it.

The demo runs under a small wrapper that makes itself the child subreaper
(PR_SET_CHILD_SUBREAPER): every process the demo leaves behind, whatever session it
started, is reparented to the wrapper, which lists and then kills exactly those.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

DEMO_LIMIT = 120.0  # seconds: "under two minutes once installed"

WRAPPER = r"""
import ctypes, json, os, signal, subprocess, sys, time
PR_SET_CHILD_SUBREAPER = 36
if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
    raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
report, command = sys.argv[1], sys.argv[2:]
began = time.monotonic()
child = subprocess.Popen(command)
for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, lambda number, frame: child.send_signal(number))
code = child.wait()
elapsed = time.monotonic() - began
while True:  # reap what exited after being reparented here: it did not outlive the demo
    try:
        if os.waitpid(-1, os.WNOHANG)[0] == 0:
            break
    except ChildProcessError:
        break
left = {}
for entry in filter(str.isdigit, os.listdir("/proc")):
    try:
        with open(f"/proc/{entry}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{entry}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        continue
    if int(fields[1]) == os.getpid() and fields[0] != "Z":
        left[int(entry)] = cmdline
for pid in left:  # only processes the demo left behind, by pid
    os.kill(pid, signal.SIGKILL)
with open(report, "w") as f:
    json.dump({"code": code, "elapsed": elapsed, "left": left}, f)
"""


def start_demo(tmp_path, *args):
    """The demo under the subreaper wrapper; returns (process, report path)."""
    report = tmp_path / "report.json"
    proc = subprocess.Popen([sys.executable, "-c", WRAPPER, str(report), sys.executable, "-m",
                             "supervisor_mail", "demo", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, report


def test_demo_shows_sync_and_delivery_and_leaves_nothing(tmp_path):
    """The demo syncs every sample message, delivers the outbox message while the sync runs,
    prints the summary with the log location, exits 0 in under two minutes, and leaves no
    process behind."""
    proc, report = start_demo(tmp_path)
    out, _ = proc.communicate(timeout=DEMO_LIMIT + 60)
    result = json.loads(report.read_text())
    assert result["code"] == 0, out
    assert result["left"] == {}, f"left behind: {result['left']}\n{out}"
    assert result["elapsed"] < DEMO_LIMIT, out
    total = int(re.search(r": (\d+) sample messages in 4 folders", out)[1])
    assert total >= 200
    assert re.search(r"^engine started: master pid \d+, 2 sync and 2 send workers", out, re.M)
    assert re.search(r"^queued outbox message \d+ to someone@example.test while the sync runs",
                     out, re.M)
    assert f"synchronized {total} of {total} messages" in out
    assert re.search(r"^outbox: message \d+ delivered [\d.]+s after it was queued \(250 ", out,
                     re.M)
    assert f"synchronized: all {total} sample messages into PostgreSQL" in out
    assert re.search(rf"supervisor_mail_messages_synced_total ({total}|{total + 1})\b", out)
    log = re.search(r"^  logs: +(\S+-info\.log)", out, re.M)[1]
    with open(log) as f:
        assert "supervisor_mail started" in f.read()
    assert out.rstrip().splitlines()[-1].startswith("demo finished in ")


def test_keep_running_serves_status_until_stopped(tmp_path):
    """With --keep-running the engine stays up for `status` (healthy, the demo account
    synced), and a SIGTERM then stops the demo with exit 0 and nothing left."""
    proc, report = start_demo(tmp_path, "--keep-running")
    lines = []
    deadline = time.monotonic() + DEMO_LIMIT
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("press Ctrl-C") or time.monotonic() > deadline:
                break
        text = "".join(lines)
        conf = re.search(r"supervisor-mail -c (\S+) status\n", text)
        assert conf, text
        shown = subprocess.run([sys.executable, "-m", "supervisor_mail", "-c", conf[1], "status",
                                "--json"], capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0, shown.stderr
        data = json.loads(shown.stdout)
        assert data["health"]["state"] == "healthy"
        assert [a["email"] for a in data["accounts"]] == ["demo@example.test"]
        assert data["accounts"][0]["last_full_sync"] is not None
        assert data["outbox"]["counts"]["sent"] == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    result = json.loads(report.read_text())
    assert result["code"] == 0, text + rest
    assert result["left"] == {}, result["left"]
    assert "stopping the demo" in rest
