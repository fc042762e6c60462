"""A supervisord event listener that restarts the engine when its master is hung.

supervisord runs it with ``events=TICK_60`` (or ``TICK_5``); on every tick it asks
``healthcheck`` and restarts the program when, and only when, the answer is 1
(master hung). A degraded engine (3) is healing itself, and a stopped one (2) is
supervisord's own business.

A hung master cannot stop gracefully, so waiting out ``stopwaitsecs`` would only
delay the mail: the listener does the old manual procedure (``reset``: SIGKILL the
master and its workers by their PID files, delete the state DB and PID files) and
then has supervisord start the program through its XML-RPC interface.

    python -m supervisor_mail.eventlistener --program supervisor_mail -c CONFIG
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import xmlrpc.client

from supervisor import childutils

from supervisor_mail import config, control

RESTART_WAIT = 10.0   # seconds to see supervisord notice the killed master
ALREADY_STARTED = 60  # supervisor.xmlrpc.Faults.ALREADY_STARTED


def restart(rpc, cfg: config.Config, program: str) -> str:
    """Kill the hung engine by its PID files, then see that supervisord starts it again."""
    old = rpc.supervisor.getProcessInfo(program)["pid"]
    done = control.reset(cfg, force=True)
    deadline = time.monotonic() + RESTART_WAIT
    while time.monotonic() < deadline:
        info = rpc.supervisor.getProcessInfo(program)
        if info["statename"] in ("STARTING", "RUNNING") and info["pid"] != old:
            return done  # autorestart brought it back
        if info["statename"] in ("EXITED", "BACKOFF", "STOPPED", "FATAL"):
            try:
                rpc.supervisor.startProcess(program, False)
            except xmlrpc.client.Fault as fault:
                if fault.faultCode != ALREADY_STARTED:
                    raise
            return done
        time.sleep(0.2)
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="supervisor_mail.eventlistener")
    parser.add_argument("--program", default="supervisor_mail",
                        help="the supervisord program name of the engine")
    parser.add_argument("-c", "--config", help="the engine's configuration file")
    args = parser.parse_args(argv)
    cfg = config.load(args.config)
    rpc = childutils.getRPCInterface(os.environ)
    while True:
        headers, _payload = childutils.listener.wait(sys.stdin, sys.stdout)
        if headers["eventname"].startswith("TICK"):
            state = control.health(cfg)
            if state.code == control.MASTER_HUNG:
                print(f"{args.program}: {state.reason}; restarting it", file=sys.stderr,
                      flush=True)
                try:
                    print(f"{args.program}: {restart(rpc, cfg, args.program)}",
                          file=sys.stderr, flush=True)
                except Exception as exc:  # an RPC fault must not kill the listener
                    print(f"{args.program}: restart failed: {exc}", file=sys.stderr, flush=True)
        childutils.listener.ok(sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
