"""Settings: declared once in ``SETTINGS``; parsing, validation, ``config show``,
``config import-inc``, the sample file and the README reference all derive from it.

A configuration is an INI file (``-c FILE``), then environment overrides named
``SUPERVISOR_MAIL_<SECTION>_<KEY>``; anything not given keeps its default.
"""

from __future__ import annotations

import configparser
import difflib
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import time
from types import SimpleNamespace
from typing import Any

from supervisor_mail.errors import ConfigError

DEFAULT_PATH = "/etc/supervisor_mail/supervisor_mail.conf"
ENV_PREFIX = "SUPERVISOR_MAIL_"


class Kind:
    """How a setting's text becomes a value; ``allowed`` says what is accepted."""

    allowed = "a value"

    def parse(self, text: str) -> Any:
        return text

    def format(self, value: Any) -> str:
        return "" if value is None else str(value)


class Int(Kind):
    def __init__(self, minimum: int = 0, maximum: int | None = None):
        self.minimum, self.maximum = minimum, maximum
        upper = f" and <= {maximum}" if maximum is not None else ""
        self.allowed = f"an integer >= {minimum}{upper}"

    def parse(self, text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise ValueError(self.allowed) from None
        if value < self.minimum or (self.maximum is not None and value > self.maximum):
            raise ValueError(self.allowed)
        return value


class Bool(Kind):
    allowed = "true or false"
    _words = {"true": True, "yes": True, "on": True, "1": True,
              "false": False, "no": False, "off": False, "0": False}

    def parse(self, text: str) -> bool:
        try:
            return self._words[text.strip().lower()]
        except KeyError:
            raise ValueError(self.allowed) from None

    def format(self, value: Any) -> str:
        return "true" if value else "false"


class Text(Kind):
    """Free text; ``optional`` lets an empty value mean "not set"."""

    def __init__(self, optional: bool = False):
        self.optional = optional
        self.allowed = "any text" if optional else "a non-empty text"

    def parse(self, text: str) -> str | None:
        text = text.strip()
        if not text:
            if self.optional:
                return None
            raise ValueError(self.allowed)
        return text


class Path(Text):
    def __init__(self, optional: bool = False):
        super().__init__(optional)
        self.allowed = "an absolute path" + (" or nothing" if optional else "")

    def parse(self, text: str) -> str | None:
        value = super().parse(text)
        if value is not None and not value.startswith("/"):
            raise ValueError(self.allowed)
        return value


class TimeOfDay(Kind):
    allowed = "a local time HH:MM from 00:00 to 23:59"

    def parse(self, text: str) -> time:
        match = re.fullmatch(r"(\d{1,2}):(\d{2})", text.strip())
        if not match or int(match[1]) > 23 or int(match[2]) > 59:
            raise ValueError(self.allowed)
        return time(int(match[1]), int(match[2]))

    def format(self, value: Any) -> str:
        return value.strftime("%H:%M")


class Listen(Kind):
    allowed = "HOST:PORT (for example 127.0.0.1:9464) or nothing for off"

    def parse(self, text: str) -> tuple[str, int] | None:
        text = text.strip()
        if not text:
            return None
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(self.allowed)
        return host.strip("[]"), int(port)

    def format(self, value: Any) -> str:
        return "" if value is None else f"{value[0]}:{value[1]}"


@dataclass(frozen=True)
class Setting:
    """One key: where it lives, what it holds, its default and the PHP constant it replaces."""

    section: str
    key: str
    kind: Kind
    default: Any
    help: str
    php: str | None = None
    secret: bool = False
    required: bool = False

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}"

    @property
    def env(self) -> str:
        return f"{ENV_PREFIX}{self.section.upper()}_{self.key.upper()}"


def _s(name: str, kind: Kind, default: Any, help: str, **extra: Any) -> Setting:
    section, key = name.split(".")
    return Setting(section, key, kind, default, help, **extra)


SETTINGS: tuple[Setting, ...] = (
    _s("engine.max_workers", Int(2, 256), 14,
       "Worker processes in all, sync and send together.", php="BG_MAX_THREADS"),
    _s("engine.send_workers", Int(1, 255), 8,
       "Send slots; the sync slots are max_workers - send_workers."),
    _s("engine.max_tasks_per_worker", Int(1), 200,
       "Most sync tasks queued in one worker's slice.", php="BG_MAX_TASKS_PER_THREAD"),
    _s("engine.host_id", Text(), "127.0.0.1",
       "Names the state DB file (<host_id>.db) and this host in a cluster."),
    _s("engine.data_dir", Path(), "/run/supervisor_mail",
       "The ramdisk (tmpfs) holding the state DB."),
    _s("engine.pid_dir", Path(), "/run/supervisor_mail/pid",
       "PID files of the master and the workers.", php="BACKPROC_PID_LOCATION"),
    _s("engine.log_dir", Path(), "/var/log/supervisor_mail",
       "YYYYMMDD-info.log and threading-error.txt."),
    _s("engine.log_keep_days", Int(1), 30, "Daily info logs kept."),
    _s("engine.user", Text(optional=True), None,
       "User (and its group) to drop to when started as root."),
    _s("engine.allow_root", Bool(), False,
       "Run as root without dropping privileges (containers, tests); logged as a warning."),
    _s("engine.stop_timeout", Int(1), 30,
       "Seconds a graceful stop waits for workers before SIGKILL."),
    _s("engine.tls_ca_file", Path(optional=True), None,
       "CA bundle that IMAP and SMTP certificates are verified against; "
       "empty means the system's trust store."),
    _s("database.dsn", Text(), None,
       "libpq DSN of the application's PostgreSQL; 'embedded' starts a local demo server.",
       secret=True, required=True),
    _s("database.statement_timeout", Int(1), 30,
       "Seconds; set on every PostgreSQL session."),
    _s("database.lock_timeout", Int(1), 10, "Seconds; set on every PostgreSQL session."),
    _s("planner.interval", Int(1), 5, "Seconds between planning passes."),
    _s("sync.enabled", Bool(), True,
       "Synchronize IMAP folders at all.", php="EMAIL_BACKGROUND_SYNC_ENABLED"),
    _s("sync.auth_error_retry", Int(1), 1800,
       "Seconds an account whose login failed is left alone (IMAP and SMTP separately).",
       php="EMAIL_AUTH_ERROR_CHECK_RETRY_TIME"),
    _s("sync.hi_recent_interval", Int(1), 600,
       "Seconds between recent syncs of hi folders, owner logged in.",
       php="EMAIL_BG_HI_FOLDERS_RECENT_SYNC_INTERVAL"),
    _s("sync.hi_recent_interval_nl", Int(1), 1800,
       "Seconds between recent syncs of hi folders, owner not logged in.",
       php="EMAIL_BG_HI_FOLDERS_RECENT_SYNC_INTERVAL_NL"),
    _s("sync.hi_full_interval", Int(1), 3600,
       "Seconds between full syncs of hi folders, owner logged in.",
       php="EMAIL_BG_HI_FOLDERS_FOLDERS_FULL_SYNC_INTERVAL"),
    _s("sync.hi_full_interval_nl", Int(1), 4800,
       "Seconds between full syncs of hi folders, owner not logged in.",
       php="EMAIL_BG_HI_FOLDERS_FOLDERS_FULL_SYNC_INTERVAL_NL"),
    _s("sync.lo_sync_start", TimeOfDay(), time(20, 0),
       "Local time the daily full sync of lo folders starts.",
       php="EMAIL_BG_LO_FOLDERS_SYNC_START"),
    _s("sync.logged_in_window", Int(1), 900,
       "Seconds; the owner counts as logged in when active this recently."),
    _s("sync.batch_size", Int(1, 10000), 500, "Messages per FETCH batch and per commit."),
    _s("sync.batch_bytes", Int(1048576), 33554432,
       "Bytes per FETCH batch and per commit (with batch_size, whichever comes first)."),
    _s("sync.max_message_size", Int(1024), 52428800,
       "Larger messages are stored as headers only, with the reason."),
    _s("sync.socket_timeout", Int(1), 60, "Seconds; connect and read timeout of IMAP sockets."),
    _s("outbox.enabled", Bool(), True,
       "Deliver the outbox at all.", php="EMAIL_OUTBOX_ENABLED"),
    _s("outbox.claim_timeout", Int(1), 300,
       "Seconds after which a 'sending' claim is reconsidered."),
    _s("outbox.max_lifetime", Int(1), 432000,
       "Seconds a deferred message is retried before it is failed."),
    _s("outbox.poll_interval", Int(1), 5,
       "Seconds between safety-net polls of the outbox besides LISTEN."),
    _s("outbox.socket_timeout", Int(1), 60, "Seconds; connect and read timeout of SMTP sockets."),
    _s("watchdog.check_interval", Int(1), 1, "Seconds between watchdog checks."),
    _s("watchdog.worker_timeout", Int(1), 120,
       "Seconds without progress before a process is hung."),
    _s("watchdog.kill_grace", Int(1), 5, "Seconds from SIGTERM to SIGKILL."),
    _s("watchdog.stall_timeout", Int(1), 600,
       "Seconds with due work but no progress before a role is stalled."),
    _s("watchdog.max_task_failures", Int(1), 3, "Hangs before a task is set aside."),
    _s("watchdog.max_reset_backoff", Int(1), 3600,
       "Seconds; cap of the exponential backoff between stall resets."),
    _s("watchdog.master_timeout", Int(2), 30,
       "Seconds without a master beat before healthcheck calls the master hung."),
    _s("metrics.listen", Listen(), None,
       "HOST:PORT of the Prometheus endpoint; empty means off."),
    _s("cluster.lease_ttl", Int(3), 60,
       "Seconds an account lease lives when several hosts share the database."),
)

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
BY_PHP: dict[str, Setting] = {s.php: s for s in SETTINGS if s.php}
SECTIONS: tuple[str, ...] = tuple(dict.fromkeys(s.section for s in SETTINGS))


class Config:
    """Effective settings; read as ``cfg.engine.max_workers`` or ``cfg["engine.max_workers"]``."""

    def __init__(self, values: Mapping[str, Any], source: str | None = None):
        self.values = dict(values)
        self.source = source
        for section in SECTIONS:
            fields = {s.key: self.values[s.name] for s in SETTINGS if s.section == section}
            setattr(self, section, SimpleNamespace(**fields))

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def replace(self, **changes: Any) -> Config:
        """A copy with some values changed, keys written ``section__key``."""
        values = dict(self.values)
        for key, value in changes.items():
            values[key.replace("__", ".", 1)] = value
        return Config(values, self.source)

    @property
    def sync_workers(self) -> int:
        return self.engine.max_workers - self.engine.send_workers

    def require(self, name: str) -> Any:
        """The value of a required key, or a ConfigError naming where to set it."""
        value = self.values[name]
        if value is None:
            setting = BY_NAME[name]
            where = self.source or DEFAULT_PATH
            raise ConfigError(
                f"{where}: [{setting.section}] {setting.key} is not set: "
                f"add it to the file or set {setting.env}")
        return value


def load(path: str | None = None, environ: Mapping[str, str] | None = None,
         must_exist: bool = False) -> Config:
    """Read ``path`` (default ``$SUPERVISOR_MAIL_CONFIG`` or ``/etc/...``) and the environment.

    A missing default file means built-in defaults; a missing named file is an error.
    """
    environ = os.environ if environ is None else environ
    named = path or environ.get(ENV_PREFIX + "CONFIG")
    path = named or DEFAULT_PATH
    values = {s.name: s.default for s in SETTINGS}
    if os.path.exists(path):
        values.update(_read_file(path))
    elif named or must_exist:
        raise ConfigError(f"{path}: no such configuration file: create it "
                          "(etc/supervisor_mail.conf is a documented sample) or pass -c FILE")
    values.update(_read_environ(environ))
    cfg = Config(values, path if os.path.exists(path) else None)
    _check_together(cfg)
    return cfg


def _read_file(path: str) -> dict[str, Any]:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    except configparser.Error as exc:
        detail = " ".join(str(exc).split())
        raise ConfigError(f"{path}: not a valid INI file: {detail}") from None
    values = {}
    for section in parser.sections():
        if section not in SECTIONS:
            raise ConfigError(f"{path}: unknown section [{section}]{_suggest(section, SECTIONS)}"
                              f"; sections are {', '.join(SECTIONS)}")
        for key, text in parser.items(section):
            setting = BY_NAME.get(f"{section}.{key}")
            if setting is None:
                keys = [s.key for s in SETTINGS if s.section == section]
                raise ConfigError(f"{path}: unknown key [{section}] {key}{_suggest(key, keys)}")
            values[setting.name] = _parse(setting, text, f"{path}: [{section}] {key}")
    return values


def _read_environ(environ: Mapping[str, str]) -> dict[str, Any]:
    by_env = {s.env: s for s in SETTINGS}
    values = {}
    for var, text in environ.items():
        if var in by_env:
            values[by_env[var].name] = _parse(by_env[var], text, f"environment {var}")
    return values


def _parse(setting: Setting, text: str, where: str) -> Any:
    try:
        return setting.kind.parse(text)
    except ValueError as exc:
        shown = mask_dsn(text.strip()) if setting.secret else text.strip()
        raise ConfigError(f"{where} = {shown!r}: must be {exc}") from None


def _check_together(cfg: Config) -> None:
    """Rules that involve more than one key."""
    if cfg.engine.send_workers >= cfg.engine.max_workers:
        where = cfg.source or "configuration"
        raise ConfigError(
            f"{where}: [engine] send_workers = {cfg.engine.send_workers} must be less than "
            f"max_workers = {cfg.engine.max_workers}, so that at least one sync slot remains")


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def mask_dsn(dsn: str | None) -> str:
    """The DSN with any password replaced by ``***``, for display."""
    if not dsn:
        return ""
    dsn = re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", dsn)
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", dsn)


def format_value(setting: Setting, value: Any) -> str:
    if setting.secret and setting.name == "database.dsn":
        return mask_dsn(value)
    if setting.secret and value:
        return "***"
    return setting.kind.format(value)


def show(cfg: Config) -> str:
    """The effective settings as INI, secrets masked (``config show``)."""
    lines = [f"# effective settings; file: {cfg.source or '(none, built-in defaults)'}"]
    for section in SECTIONS:
        lines.append(f"\n[{section}]")
        for s in SETTINGS:
            if s.section == section:
                lines.append(f"{s.key} = {format_value(s, cfg[s.name])}".rstrip())
    return "\n".join(lines) + "\n"


def sample() -> str:
    """The documented sample file, ``etc/supervisor_mail.conf`` (a test keeps them equal)."""
    out = ["# supervisor_mail configuration.",
           "# Every key is shown with its default, commented out; uncomment to change it.",
           "# Any key can also be set from the environment as SUPERVISOR_MAIL_<SECTION>_<KEY>.",
           "# Generated from supervisor_mail/config.py: `supervisor-mail config sample`."]
    for section in SECTIONS:
        out.append(f"\n[{section}]")
        for s in SETTINGS:
            if s.section != section:
                continue
            out.append(f"# {s.help}")
            if s.php:
                out.append(f"# Replaces the old engine's {s.php}.")
            if s.required:
                out.append("# Required.")
            out.append(f"#{s.key} = {s.kind.format(s.default)}".rstrip())
    return "\n".join(out) + "\n"


def reference_markdown() -> str:
    """The README's configuration reference table."""
    rows = ["| key | default | old constant | meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        default = s.kind.format(s.default) if s.default is not None else "(none)"
        if s.required:
            default = "(required)"
        old = f"`{s.php}`" if s.php else ""
        rows.append(f"| `{s.name}` | `{default}` | {old} | {s.help} |")
    return "\n".join(rows) + "\n"
