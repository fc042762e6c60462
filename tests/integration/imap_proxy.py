"""A TCP proxy on loopback in front of a real IMAP server, to provoke what a real network
and a loaded server do: a connection cut in the middle of a FETCH, a LOGIN refused with
``NO [LIMIT]``, a BYE instead of an answer. Everything else is the real server's.
"""

from __future__ import annotations

import re
import socket
import ssl
import threading

from supervisor_mail.embedded.imap import LOOPBACK
from supervisor_mail.fetching import parse_uid_set

_LOGIN = re.compile(rb"^(\S+) LOGIN ", re.IGNORECASE)
_BODY_FETCH = re.compile(rb"^\S+ UID FETCH ([\d:,]+) .*BODY\.PEEK\[\]", re.IGNORECASE)


class ImapProxy:
    """``with ImapProxy(server.host, server.port, cut_after=30000) as proxy: proxy.port``.

    ``cut_after``: the first ``cuts`` connections are closed after that many bytes
    from the server (later ones pass). ``refuse_login``: a LOGIN gets this answer
    (``b"NO [LIMIT] ..."``) instead of reaching the server, or, when it starts
    with ``b"* BYE"``, this line and a closed connection. ``rewrite``: applied to
    what the server sends (to garble a response). ``tls``: the proxy's clients speak
    implicit TLS (port 993 style) with this server context. ``drop_fetch_of``: a UID whose
    body a FETCH asks for gets ``* BYE`` and a closed connection instead, as Dovecot
    answers for a message file it cannot read. ``stall_on``: once a client line contains
    these bytes, nothing more is forwarded and the connection stays open until the client
    leaves, which is what a hung server looks like. All may change while it runs.
    """

    def __init__(self, host: str, port: int, *, cut_after: int | None = None, cuts: int = 1,
                 refuse_login: bytes | None = None, tls: ssl.SSLContext | None = None,
                 stall_on: bytes | None = None):
        self.upstream = (host, port)
        self.tls = tls  # a server context: clients speak implicit TLS to the proxy
        self.cut_after, self.cuts_left = cut_after, cuts
        self.refuse_login = refuse_login
        self.rewrite = None
        self.drop_fetch_of: int | None = None
        self.stall_on = stall_on
        self.stalls = 0
        self.connections = 0
        self.cuts_done = 0
        self.logins_refused = 0
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._listener = socket.create_server((LOOPBACK, 0))
        self.host, self.port = LOOPBACK, self._listener.getsockname()[1]

    def __enter__(self) -> ImapProxy:
        self._spawn(self._accept)
        return self

    def __exit__(self, *exc: object) -> None:
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                _close(sock)
        for thread in self._threads:
            thread.join(5)

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed by __exit__
            if self.tls is not None:
                try:
                    client = self.tls.wrap_socket(client, server_side=True)
                except (OSError, ssl.SSLError):
                    client.close()  # a client that refused our certificate
                    continue
            server = socket.create_connection(self.upstream)
            with self._lock:
                self.connections += 1
                self._sockets += [client, server]
                cut = None
                if self.cut_after is not None and self.cuts_left > 0:
                    self.cuts_left -= 1
                    cut = self.cut_after
            self._spawn(self._from_client, client, server)
            self._spawn(self._from_server, server, client, cut)

    def _from_client(self, client: socket.socket, server: socket.socket) -> None:
        reader = client.makefile("rb")
        try:
            for line in reader:
                match = _LOGIN.match(line) if self.refuse_login else None
                if match:
                    with self._lock:
                        self.logins_refused += 1
                    if self.refuse_login.startswith(b"* BYE"):
                        client.sendall(self.refuse_login + b"\r\n")
                        break
                    client.sendall(match[1] + b" " + self.refuse_login + b"\r\n")
                    continue
                if self._drops(line):
                    client.sendall(b"* BYE FETCH failed: Internal error occurred.\r\n")
                    break
                if self.stall_on and self.stall_on in line:
                    with self._lock:
                        self.stalls += 1
                    for _ in reader:  # swallow everything until the client goes away
                        pass
                    break
                server.sendall(line)
        except OSError:
            pass
        _close(client)
        _close(server)

    def _drops(self, line: bytes) -> bool:
        match = _BODY_FETCH.match(line) if self.drop_fetch_of is not None else None
        return bool(match) and self.drop_fetch_of in parse_uid_set(match[1])

    def _from_server(self, server: socket.socket, client: socket.socket, cut: int | None) -> None:
        sent = 0
        try:
            while True:
                data = server.recv(65536)
                if not data:
                    break
                if self.rewrite:
                    data = self.rewrite(data)
                if cut is not None and sent + len(data) >= cut:
                    client.sendall(data[:cut - sent])
                    with self._lock:
                        self.cuts_done += 1
                    break
                client.sendall(data)
                sent += len(data)
        except OSError:
            pass
        _close(client)
        _close(server)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
