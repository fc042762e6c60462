"""Real IMAP servers on loopback: pymap always, Dovecot where it is installed.

Each server is a child process with its own temporary directory and a free
127.0.0.1 port; accounts are added by writing the server's own user files, and
login attempts are counted from the server's own log.

What each server does to line endings (pymap 0.36, Dovecot 2.3), which is why a
byte-exactness test compares with what the server returns (``Mailbox.fetch_raw``),
never with what it appended:

- Dovecot stores messages with bare LF on disk (``mail_save_crlf = no``) and
  turns every CRLF, bare LF and bare CR into CRLF when it sends one: a CRLF
  message comes back exactly as appended, a bare-LF or bare-CR one comes back
  with CRLF, and RFC822.SIZE counts the CRLF form.
- pymap stores through Python's ``mailbox.Maildir``, which turns CRLF and bare
  CR into LF, and sends the stored bytes as they are: FETCH BODY[] returns bare
  LF whatever was appended, and RFC822.SIZE counts the LF form.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import getpass
import grp
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, NamedTuple

LOOPBACK = "127.0.0.1"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
# Another process may take the port between free_port() and the server's bind.
START_ATTEMPTS = 3


class ServerStartError(RuntimeError):
    """A local server did not come up; the message carries the end of its log."""


def free_port() -> int:
    """A TCP port that is free on loopback now (the kernel's pick)."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class TlsFiles:
    """A throwaway CA and a server certificate it signed, as PEM files."""

    ca_pem_path: Path
    cert_path: Path
    key_path: Path


def issue_loopback_cert(directory: Path) -> TlsFiles:
    """Create a CA and a certificate for 127.0.0.1 and localhost in ``directory``."""
    import trustme  # in the test extra: only servers started with TLS need it

    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    cert = ca.issue_cert(LOOPBACK, "localhost")
    files = TlsFiles(directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
    ca.cert_pem.write_to_path(str(files.ca_pem_path))
    for index, pem in enumerate(cert.cert_chain_pems):
        pem.write_to_path(str(files.cert_path), append=index > 0)
    cert.private_key_pem.write_to_path(str(files.key_path))
    return files


def client_ssl_context(ca_pem_path: Path | str) -> ssl.SSLContext:
    """A client context that trusts only the given CA, with hostname checks on."""
    return ssl.create_default_context(cafile=str(ca_pem_path))


class Account(NamedTuple):
    """One IMAP account on a running server."""

    server: ImapServer
    login: str
    password: str


# Logins name files and directories on both servers; passwords sit in colon-separated lines.
_LOGIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]*")


def _check_credentials(login: str, password: str) -> None:
    if not _LOGIN.fullmatch(login):
        raise ValueError(f"login must match {_LOGIN.pattern}: {login!r}")
    if not password or any(char in password for char in ":\r\n"):
        raise ValueError("password must be non-empty, without ':' or line breaks")


class ImapServer(ABC):
    """A real IMAP server in a child process; ``with Server() as server: ...``.

    Subclasses write their configuration and user files and parse their log;
    this class owns the temporary directory, the process and the readiness check.
    """

    name: ClassVar[str]

    def __init__(self, *, starttls: bool = False) -> None:
        self.host = LOOPBACK
        self.port = 0
        self.starttls = starttls
        self.ca_pem_path: Path | None = None
        self.directory: Path | None = None
        self._tls: TlsFiles | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._login_counter: _LoginCounter | None = None
        self._logins_issued = 0
        # A unique word in the greeting proves we reached our own process, not
        # another server that got the port first.
        self._greeting_token = f"supervisor-mail-{secrets.token_hex(6)}"

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> ImapServer:
        """Create the directory and configuration, start the server, wait for its greeting."""
        if self._process is not None:
            raise RuntimeError(f"{self.name} is already running")
        self.directory = Path(tempfile.mkdtemp(prefix=f"supervisor_mail-{self.name}-"))
        try:
            if self.starttls:
                self._tls = issue_loopback_cert(self.directory / "tls")
                self.ca_pem_path = self._tls.ca_pem_path
            self._prepare()
            self._login_counter = self._make_login_counter()
            for attempt in range(1, START_ATTEMPTS + 1):
                self.port = free_port()
                try:
                    self._launch()
                    return self
                except ServerStartError as error:
                    self._terminate()
                    if attempt == START_ATTEMPTS or "already in use" not in str(error).lower():
                        raise
        except BaseException:
            self.stop()
            raise
        raise AssertionError("unreachable: the last attempt returns or raises")

    def stop(self) -> None:
        """Stop the process we started (by its PID) and delete the directory."""
        self._terminate()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def __enter__(self) -> ImapServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        """PID of the server's main process while it runs."""
        return self._process.pid if self._process is not None else None

    def _launch(self) -> None:
        assert self.directory is not None
        command, env = self._command()
        with open(self.directory / "output.log", "ab") as output:
            self._process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                env={**os.environ, **env}, cwd=self.directory, start_new_session=True)
        self._wait_for_greeting()

    def _wait_for_greeting(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise ServerStartError(f"{self.name} exited with {self._process.returncode}"
                                       f" during start:\n{self._log_tail()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1.0) as sock:
                    greeting = sock.makefile("rb").readline()
            except OSError:
                time.sleep(0.02)
                continue
            if self._greeting_token.encode() in greeting:
                return
            # Our process will fail to bind; the message makes start() try another port.
            raise ServerStartError(f"port {self.port} already in use by another server:"
                                   f" {greeting!r}")
        raise ServerStartError(f"{self.name} did not greet within {START_TIMEOUT}s:\n"
                               f"{self._log_tail()}")

    def _terminate(self) -> None:
        """SIGTERM the process group of the process we started; SIGKILL what outlives it.

        The server runs in a session of its own (``start_new_session``), so its
        group ID is the PID we started and holds the server's children too.
        Signalled alone, Dovecot's master sleeps a second for its log process
        and leaves mail processes of still-connected clients running.
        """
        process, self._process = self._process, None
        if process is None:
            return
        _signal_group(process.pid, signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            _signal_group(process.pid, signal.SIGKILL)
            process.wait()
        # Children that have not exited with the master would be orphans now.
        _signal_group(process.pid, signal.SIGKILL)

    def _log_tail(self, lines: int = 20) -> str:
        assert self.directory is not None
        text = ""
        for path in dict.fromkeys([self.directory / "output.log", self.log_path]):
            if path.exists():
                text += path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    # -- accounts and logins -----------------------------------------------------

    def add_user(self, login: str, password: str) -> Account:
        """Create an account (or replace its password); usable at once, while running."""
        _check_credentials(login, password)
        if self.directory is None:
            raise RuntimeError(f"start {self.name} before adding users")
        self._write_user(login, password)
        return Account(self, login, password)

    def new_account(self) -> Account:
        """A fresh account with a generated login and password, so tests never share mail."""
        self._logins_issued += 1
        return self.add_user(f"user{self._logins_issued:04d}", secrets.token_urlsafe(12))

    def login_attempts(self, login: str) -> int:
        """Login attempts (successful or not) for ``login`` that the server has logged."""
        if self._login_counter is None:
            raise RuntimeError(f"start {self.name} before counting logins")
        return self._login_counter.count(login)

    # -- what each server defines ------------------------------------------------

    @property
    @abstractmethod
    def log_path(self) -> Path:
        """The file in which the server logs login attempts."""

    @abstractmethod
    def _prepare(self) -> None:
        """Fill ``self.directory`` with what the server needs before it can start."""

    @abstractmethod
    def _command(self) -> tuple[list[str], dict[str, str]]:
        """The command line and extra environment that start the server on ``self.port``."""

    @abstractmethod
    def _write_user(self, login: str, password: str) -> None:
        """Add or replace one user in the server's user files."""

    @abstractmethod
    def _make_login_counter(self) -> _LoginCounter:
        """A counter reading this server's log format."""


class _LoginCounter(ABC):
    """Counts login attempts per user from a log file, reading only what is new."""

    # Dovecot writes its log through a separate log process, so a line can land a
    # few milliseconds after the client saw the reply: wait for the file to settle.
    SETTLE_QUIET = 0.05
    SETTLE_LIMIT = 1.0

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._counts: Counter[str] = Counter()

    def count(self, login: str) -> int:
        self._wait_until_quiet()
        self._read_new_lines()
        return self._counts[login]

    def _wait_until_quiet(self) -> None:
        deadline = time.monotonic() + self.SETTLE_LIMIT
        size = self._size()
        while time.monotonic() < deadline:
            time.sleep(self.SETTLE_QUIET)
            new_size = self._size()
            if new_size == size:
                return
            size = new_size

    def _size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def _read_new_lines(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as log:
            log.seek(self._offset)
            chunk = log.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a partial last line waits for next time
        self._offset += len(complete)
        for line in complete.decode("utf-8", "replace").splitlines():
            login = self._login_in(line)
            if login is not None:
                self._counts[login] += 1

    @abstractmethod
    def _login_in(self, line: str) -> str | None:
        """The login a log line records an attempt for, or None."""


# -- pymap ------------------------------------------------------------------------------


class PymapServer(ImapServer):
    """pymap's on-disk ``maildir`` backend, users in ``pymap-etc-passwd``/``-shadow``.

    pymap writes no log line per login, so it runs with ``--debug``, which logs
    every line a client sends (passwords included: the log lives in the
    server's temporary directory and goes with it); LOGIN and AUTHENTICATE
    commands are counted from there.
    """

    name = "pymap"
    # pymap reads the number of PBKDF2 rounds from the stored hash; pymap's own
    # default (500 000) would cost a third of a second per login.
    HASH_ROUNDS = 1000

    @property
    def log_path(self) -> Path:
        assert self.directory is not None
        return self.directory / "output.log"

    def __init__(self, *, starttls: bool = False) -> None:
        super().__init__(starttls=starttls)
        self._users: dict[str, str] = {}  # login -> password hash

    def _prepare(self) -> None:
        self._save_user_files()

    def _command(self) -> tuple[list[str], dict[str, str]]:
        assert self.directory is not None
        # pymap.main has no __main__ guard; this is what its console script runs.
        command = [sys.executable, "-c", "from pymap.main import main; main()", "--debug",
                   "--host", self.host, "--port", str(self.port)]
        # Only the IMAP service: the others are optional extras with ports of their own.
        for service in ("admin", "managesieve", "swim"):
            command += ["--no-service", service]
        if self._tls is None:
            command.append("--no-tls")
        else:
            command += ["--cert", str(self._tls.cert_path), "--key", str(self._tls.key_path)]
        command += ["maildir", str(self.directory / "mail")]
        # pymap puts FQDN in its greeting (and would ask DNS for it otherwise).
        return command, {"FQDN": self._greeting_token}

    def _write_user(self, login: str, password: str) -> None:
        from pysasl.hashing import BuiltinHash  # pymap's own dependency
        from pysasl.prep import saslprep

        self._users[login] = BuiltinHash(rounds=self.HASH_ROUNDS).hash(saslprep(password))
        self._save_user_files()

    def _save_user_files(self) -> None:
        assert self.directory is not None
        mail = self.directory / "mail"
        mail.mkdir(exist_ok=True)
        # passwd(5) and shadow(5) field counts; the home field is the maildir,
        # relative to the base directory. pymap creates it at the first login.
        passwd = "".join(f"{login}:x::::{login}:\r\n" for login in self._users)
        shadow = "".join(f"{login}:{digest}:::::::\r\n" for login, digest in self._users.items())
        _replace_file(mail / "pymap-etc-passwd", passwd)
        _replace_file(mail / "pymap-etc-shadow", shadow)

    def _make_login_counter(self) -> _LoginCounter:
        return _PymapLoginCounter(self.log_path)


class _PymapLoginCounter(_LoginCounter):
    """Reads ``DEBUG:pymap.imap:<connection> -->| <line>`` (what each client sent).

    ``LOGIN user pass`` names the user; ``AUTHENTICATE <mech>`` names it in the
    next base64 line from the same connection (PLAIN: authzid NUL authcid NUL
    password; LOGIN: the user name first). Logins sent as IMAP literals are not
    counted; the clients here send them as atoms or quoted strings.
    """

    _CLIENT_LINE = re.compile(r"^DEBUG:pymap\.imap:(?P<conn>[0-9a-f]+) -->\| (?P<line>.*)$")
    _LOGIN = re.compile(r'^\S+ LOGIN (?P<user>"(?:[^"\\]|\\.)*"|[^\s"{]+)', re.IGNORECASE)
    _AUTHENTICATE = re.compile(r"^\S+ AUTHENTICATE (?P<mech>\S+)(?: (?P<initial>\S+))?",
                               re.IGNORECASE)

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._pending_mech: dict[str, str] = {}

    def _login_in(self, line: str) -> str | None:
        match = self._CLIENT_LINE.match(line)
        if match is None:
            return None
        conn, sent = match["conn"], match["line"]
        if conn in self._pending_mech:
            return _sasl_user(self._pending_mech.pop(conn), sent)
        if login := self._LOGIN.match(sent):
            user = login["user"]
            return re.sub(r"\\(.)", r"\1", user[1:-1]) if user.startswith('"') else user
        if auth := self._AUTHENTICATE.match(sent):
            mech = auth["mech"].upper()
            if auth["initial"] is not None:
                return _sasl_user(mech, auth["initial"])
            self._pending_mech[conn] = mech
        return None


def _sasl_user(mech: str, response: str) -> str | None:
    """The user named by the first client response of a PLAIN or LOGIN exchange."""
    try:
        decoded = base64.b64decode(response.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None  # "*" (cancelled) or garbage: not an attempt for anyone
    if mech == "PLAIN":
        parts = decoded.split("\0")
        return parts[1] if len(parts) == 3 else None
    return decoded if mech == "LOGIN" else None


# -- Dovecot ------------------------------------------------------------------------------


def dovecot_binary() -> str | None:
    """Path of the ``dovecot`` binary, also where sbin is not on PATH."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    return shutil.which("dovecot", path=search)


class DovecotServer(ImapServer):
    """Dovecot with a generated ``dovecot.conf``: maildir, passwd-file users, plain passwords.

    As root, mail is accessed as ``nobody`` (Dovecot 2.3 refuses mail access as
    root); as another user, everything runs as that user.
    """

    name = "dovecot"

    @property
    def log_path(self) -> Path:
        assert self.directory is not None
        return self.directory / "dovecot.log"

    def _prepare(self) -> None:
        assert self.directory is not None
        binary = dovecot_binary()
        if binary is None:
            raise ServerStartError("dovecot is not installed")
        self._binary = binary
        self._mail_uid, self._mail_gid = _mail_ids()
        # Dovecot's unprivileged processes must traverse the directory to reach
        # their sockets and the mail.
        self.directory.chmod(0o711)
        mail = self.directory / "mail"
        mail.mkdir()
        os.chown(mail, self._mail_uid, self._mail_gid)
        (self.directory / "users").mkdir()

    def _config(self) -> str:
        assert self.directory is not None
        d, tls = self.directory, self._tls
        lines = [
            "protocols = imap",
            f"listen = {self.host}",
            f"base_dir = {d / 'run'}",
            f"state_dir = {d / 'state'}",
            f"log_path = {self.log_path}",
            f"login_greeting = {self._greeting_token}",
            f"mail_location = maildir:{d / 'mail'}/%u",
            f"mail_uid = {self._mail_uid}",
            f"mail_gid = {self._mail_gid}",
            f"first_valid_uid = {self._mail_uid}",
            f"last_valid_uid = {self._mail_uid}",
            f"first_valid_gid = {self._mail_gid}",
            "disable_plaintext_auth = no",
            "auth_mechanisms = plain login",
            # auth_verbose logs each failed attempt, imap-login each success.
            "auth_verbose = yes",
            # Dovecot still answers a failure only at its next check, within 0.5 s.
            "auth_failure_delay = 0",
        ]
        if tls is None:
            lines.append("ssl = no")
        else:
            lines += ["ssl = yes", f"ssl_cert = <{tls.cert_path}", f"ssl_key = <{tls.key_path}"]
        if os.geteuid() != 0:
            # Not root: Dovecot cannot switch users, so every process runs as us.
            user, group = getpass.getuser(), grp.getgrgid(os.getegid()).gr_name
            lines += [f"default_login_user = {user}", f"default_internal_user = {user}",
                      f"default_internal_group = {group}"]
        lines += [
            "passdb {",
            "driver = passwd-file",
            f"args = scheme=PLAIN {d / 'users'}/%u",
            "}",
            "userdb {",
            "driver = passwd-file",
            f"args = {d / 'users'}/%u",
            "}",
            "service imap-login {",
            "chroot =",
            "inet_listener imap {",
            f"address = {self.host}",
            f"port = {self.port}",
            "}",
            "inet_listener imaps {",
            "port = 0",
            "}",
            "}",
            "service anvil {",
            "chroot =",
            # Without this socket the auth process disables its per-IP penalty,
            # which would delay every login after a failed one by up to 15 s, and
            # every test logs in from 127.0.0.1.
            "unix_listener anvil-auth-penalty {",
            "mode = 0",
            "}",
            "}",
        ]
        return "\n".join(lines) + "\n"

    def _command(self) -> tuple[list[str], dict[str, str]]:
        assert self.directory is not None
        # Written per attempt: each attempt has its own port.
        config = self.directory / "dovecot.conf"
        config.write_text(self._config())
        # -F keeps the master in the foreground, so the PID we hold is the master's.
        return [self._binary, "-F", "-c", str(config)], {}

    def _write_user(self, login: str, password: str) -> None:
        assert self.directory is not None
        # user:password:uid:gid:gecos:home:shell; empty uid/gid fall back to mail_uid/mail_gid.
        # One file per user: Dovecot looks at a passwd-file at most once a second,
        # so a user added to a shared file could stay unknown for that second. A
        # new file is read at the user's first login; a changed password may take
        # up to a second to apply.
        home = self.directory / "mail" / login
        _replace_file(self.directory / "users" / login,
                      f"{login}:{{PLAIN}}{password}::::{home}::\n")

    def _make_login_counter(self) -> _LoginCounter:
        return _DovecotLoginCounter(self.log_path)


class _DovecotLoginCounter(_LoginCounter):
    """One line per attempt: imap-login's ``Login: user=<u>`` for a success; for a
    failure, auth's ``passwd-file(u,<ip>,<session>): Password mismatch`` or, for a
    user without a file, ``missing passwd file: <dir>/users/u``."""

    _SUCCESS = re.compile(r" imap-login: Info: Login: user=<(?P<user>[^>]*)>")
    _MISMATCH = re.compile(r" auth: Info: passwd-file\((?P<user>[^,]*),[^)]*\): Password mismatch")
    _UNKNOWN = re.compile(r" auth: Info: missing passwd file: \S*/users/(?P<user>[^/\s]+)$")

    def _login_in(self, line: str) -> str | None:
        for pattern in (self._SUCCESS, self._MISMATCH, self._UNKNOWN):
            if match := pattern.search(line):
                return match["user"]
        return None


def _signal_group(group: int, signal_number: int) -> None:
    """Signal every process of a group; a group already gone is fine."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal_number)


def _mail_ids() -> tuple[int, int]:
    """The uid and gid Dovecot accesses mail as: ``nobody`` for root, else ourselves."""
    if os.geteuid() != 0:
        return os.geteuid(), os.getegid()
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        return 65534, 65534
    return nobody.pw_uid, nobody.pw_gid


def _replace_file(path: Path, text: str) -> None:
    """Write atomically, so a server reading its user file never sees half of it."""
    partial = path.with_name(path.name + ".new")
    partial.write_text(text)
    partial.chmod(0o644)  # Dovecot's auth process reads it as an unprivileged user
    os.replace(partial, path)


# -- choosing a server ---------------------------------------------------------------------

SERVERS: dict[str, type[ImapServer]] = {"dovecot": DovecotServer, "pymap": PymapServer}


def make_server(name: str, *, starttls: bool = False) -> ImapServer:
    """An unstarted server by name: ``with make_server("pymap") as server: ...``."""
    return SERVERS[name](starttls=starttls)


@functools.cache
def available_servers() -> tuple[str, ...]:
    """Names of the servers that start on this machine: "dovecot" if it does, "pymap" always."""
    names = []
    if dovecot_binary() is not None:
        try:
            with DovecotServer():
                names.append("dovecot")
        except (ServerStartError, OSError):
            pass
    names.append("pymap")
    return tuple(names)
