"""Logs in the old engine's format, so existing habits (``tail -f``, ``grep 99,``) keep working::

    [2014-01-12 22:28:05][#13817.t12] received 31468 new messages in 432s [53,824]

``<log_dir>/YYYYMMDD-info.log`` takes every line (named by the local date, switching
at midnight); ``<log_dir>/threading-error.txt`` takes errors too, with tracebacks.
Every line is written with one ``write()`` on a file opened ``O_APPEND``, so lines
from many processes never interleave inside a line.

Code logs through the standard ``logging`` module under the ``supervisor_mail``
logger and names the account and folder with ``extra=where(acntid, emfdid)``::

    log.info("received %d new messages in %ds", n, secs, extra=where(53, 824))
"""

from __future__ import annotations

import glob
import logging
import os
import sys
import time
from typing import Any

from supervisor_mail.config import Config

INFO_SUFFIX = "-info.log"
ERROR_FILE = "threading-error.txt"
ROOT = "supervisor_mail"


def where(acntid: int | None, emfdid: int | None = None) -> dict[str, Any]:
    """``extra=`` for a line about an account: ``[acntid,emfdid]``, or ``[acntid,-]``."""
    return {"acntid": acntid, "emfdid": emfdid}


def suffix(record: logging.LogRecord) -> str:
    acntid = getattr(record, "acntid", None)
    if acntid is None:
        return ""
    emfdid = getattr(record, "emfdid", None)
    return f" [{acntid},{'-' if emfdid is None else emfdid}]"


class OldEngineFormatter(logging.Formatter):
    """``[date][#pid.TAG] message [acntid,emfdid]`` on one line."""

    def __init__(self, tag: str):
        super().__init__()
        self.tag = tag

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        message = " ".join(record.getMessage().split())
        return f"[{stamp}][#{record.process}.{self.tag}] {message}{suffix(record)}"


class DailyFileHandler(logging.Handler):
    """Appends to ``<dir>/YYYYMMDD-info.log``, opening the next day's file after midnight."""

    def __init__(self, log_dir: str, keep_days: int):
        super().__init__()
        self.log_dir = log_dir
        self.keep_days = keep_days
        self._day = ""
        self._fd = -1

    def emit(self, record: logging.LogRecord) -> None:
        try:
            day = time.strftime("%Y%m%d", time.localtime(record.created))
            if day != self._day:
                self._open(day)
            os.write(self._fd, (self.format(record) + "\n").encode("utf-8", "replace"))
        except Exception:
            self.handleError(record)

    def _open(self, day: str) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        path = os.path.join(self.log_dir, day + INFO_SUFFIX)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._day = day
        prune(self.log_dir, self.keep_days)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        super().close()


class ErrorFileHandler(logging.Handler):
    """Appends errors, traceback included, to ``threading-error.txt`` in one write each."""

    def __init__(self, path: str):
        super().__init__(logging.ERROR)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            if record.exc_info:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
            if record.stack_info:
                text += "\n" + record.stack_info
            os.write(self._fd, (text + "\n").encode("utf-8", "replace"))
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        super().close()


def prune(log_dir: str, keep_days: int) -> None:
    """Delete daily info logs older than ``keep_days`` days."""
    cutoff = time.strftime("%Y%m%d", time.localtime(time.time() - keep_days * 86400))
    for path in glob.glob(os.path.join(log_dir, "[0-9]" * 8 + INFO_SUFFIX)):
        if os.path.basename(path)[:8] < cutoff:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass  # another process pruned it first


def setup(cfg: Config, tag: str, stderr: bool = False, files: bool = True) -> logging.Logger:
    """Route the ``supervisor_mail`` logger to the log files (and stderr) tagged ``tag``.

    Called once in each process after the fork, so each has its own descriptors.
    """
    logger = logging.getLogger(ROOT)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(logging.INFO)
    logger.propagate = False
    formatter = OldEngineFormatter(tag)
    handlers: list[logging.Handler] = []
    if files:
        os.makedirs(cfg.engine.log_dir, exist_ok=True)
        handlers.append(DailyFileHandler(cfg.engine.log_dir, cfg.engine.log_keep_days))
        handlers.append(ErrorFileHandler(os.path.join(cfg.engine.log_dir, ERROR_FILE)))
    if stderr:
        handlers.append(logging.StreamHandler(sys.stderr))
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    return logger

