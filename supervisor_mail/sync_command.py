"""``supervisor-mail sync ACCOUNT [--folder NAME] [--full]``: one sync in the foreground.

The tool for a first import: a progress bar (messages, bytes, rate, ETA) when
stderr is a terminal, the engine's log lines on stderr when it is not, and one
summary line per folder on stdout. Without ``--folder`` every folder that is
not switched off is synchronized; a folder that fails is reported and the
others still run.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

from supervisor_mail import accounts, folders, logs, store
from supervisor_mail.config import Config
from supervisor_mail.errors import EXIT_FAILURE, EXIT_OK, AuthError, NetworkError, ServerError
from supervisor_mail.imap_sync import AccountSession, Progress, discover_folders, sync_folder
from supervisor_mail.states import Priority, TaskKind

REDRAW = 0.2  # seconds between progress bar redraws


def run(cfg: Config, account_ref: str, folder_name: str | None, full: bool,
        out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    tty = err.isatty()
    logger = logs.setup(cfg, "c", stderr=True, files=False)
    if tty:  # the bar shows progress; only warnings and errors interrupt it
        for handler in logger.handlers:
            handler.setLevel(logging.WARNING)
    kind = TaskKind.SYNC_FULL if full else TaskKind.SYNC_RECENT
    failed = 0
    with store.connect(cfg, "sync") as conn, \
            AccountSession(conn, cfg, accounts.get(conn, account_ref).acntid) as session:
        listed = discover_folders(conn, session)
        targets = ([folders.find(listed, folder_name)] if folder_name else
                   [f for f in listed if f.effective_priority != Priority.OFF])
        for folder in targets:
            bar = Bar(err, folder.display_name) if tty else None
            try:
                result = sync_folder(conn, session, folder, kind, cfg, beat=lambda *_: None,
                                     on_progress=bar.update if bar else None)
            except (AuthError, NetworkError):
                raise  # the account as a whole is unreachable: nothing else will work
            except ServerError as exc:
                if folder_name:
                    raise
                failed += 1
                if bar:
                    bar.clear()
                print(f"{folder.display_name}: failed: {exc}", file=out)
                continue
            if bar:
                bar.clear()
            rate = result.new / result.seconds if result.seconds else 0.0
            print(f"{folder.display_name}: {result.new} new messages, "
                  f"{result.bytes / 1e6:.1f} MB in {result.seconds:.1f}s ({rate:.0f} msg/s)"
                  + (f", {result.flags_changed} flag changes, {result.expunged} expunged"
                     if full else "")
                  + (f", {result.skipped} stored without their bytes" if result.skipped else "")
                  + (f", {result.delivered_late} delivered late" if result.delivered_late
                     else ""), file=out)
    return EXIT_FAILURE if failed else EXIT_OK


class Bar:
    """One self-redrawing line: ``INBOX  1200/30000 msg  85.1/2100.0 MB  950 msg/s  ETA 0:30``."""

    def __init__(self, stream: TextIO, label: str):
        self.stream, self.label = stream, label
        self.started = time.monotonic()
        self.drawn = 0.0

    def update(self, p: Progress) -> None:
        now = time.monotonic()
        if now - self.drawn < REDRAW and p.messages_done < p.messages_total:
            return
        self.drawn = now
        elapsed = max(now - self.started, 1e-6)
        rate = p.messages_done / elapsed
        left = (p.bytes_total - p.bytes_done) / (p.bytes_done / elapsed) if p.bytes_done else 0
        eta = f"{int(left) // 60}:{int(left) % 60:02d}" if p.bytes_done else "--:--"
        line = (f"{self.label}  {p.messages_done}/{p.messages_total} msg  "
                f"{p.bytes_done / 1e6:.1f}/{p.bytes_total / 1e6:.1f} MB  "
                f"{rate:.0f} msg/s  ETA {eta}")
        self.stream.write("\r" + line[:119].ljust(79) + "\x1b[K")
        self.stream.flush()

    def clear(self) -> None:
        self.stream.write("\r\x1b[K")
        self.stream.flush()
