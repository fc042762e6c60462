"""A supervisord event listener that restarts the engine when its master is hung.

supervisord runs it with ``events=TICK_60`` (or ``TICK_5``); on every tick it asks
``healthcheck`` and restarts the program through supervisord's XML-RPC interface
when, and only when, the answer is 1 (master hung). A degraded engine (3) is
healing itself, and a stopped one (2) is supervisord's own business.

    python -m supervisor_mail.eventlistener --program supervisor_mail -c CONFIG
"""

from __future__ import annotations

import argparse
import os
import sys

from supervisor import childutils

from supervisor_mail import config, control


def restart(rpc, program: str) -> None:
    """Stop (supervisord escalates to SIGKILL after stopwaitsecs), then start."""
    try:
        rpc.supervisor.stopProcess(program, True)
    finally:
        rpc.supervisor.startProcess(program, False)


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
                    restart(rpc, args.program)
                except Exception as exc:  # an RPC fault must not kill the listener
                    print(f"{args.program}: restart failed: {exc}", file=sys.stderr, flush=True)
        childutils.listener.ok(sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
