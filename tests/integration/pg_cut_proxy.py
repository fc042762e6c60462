"""A TCP proxy on loopback in front of the test PostgreSQL, whose traffic can be cut and
healed, for a host that loses its database while the others keep theirs.

The embedded server listens on a Unix socket only; the proxy bridges TCP on 127.0.0.1
to it (or to a TCP server named by ``TEST_DATABASE_DSN``). ``cut()`` stops every byte
in both directions, on open connections and new ones alike, and holds them — closes
too — as a network partition does; ``heal()`` lets them all through again, in order.
"""

from __future__ import annotations

import socket
import threading

from psycopg.conninfo import conninfo_to_dict, make_conninfo


class CutProxy:
    """``with CutProxy(dsn) as proxy: proxy.dsn`` reaches the server through the proxy."""

    def __init__(self, dsn: str):
        params = conninfo_to_dict(dsn)
        host, port = params.get("host") or "/tmp", int(params.get("port") or 5432)
        self.upstream: str | tuple[str, int] = (
            f"{host}/.s.PGSQL.{port}" if host.startswith("/") else (host, port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.dsn = make_conninfo(dsn, host="127.0.0.1", port=str(self.port))
        self.flowing = threading.Event()
        self.flowing.set()
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()

    @property
    def port(self) -> int:
        return self.listener.getsockname()[1]

    def cut(self) -> None:
        self.flowing.clear()

    def heal(self) -> None:
        self.flowing.set()

    def __enter__(self) -> CutProxy:
        threading.Thread(target=self._accept, name="cut-proxy", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.heal()
        self.listener.close()
        with self.lock:
            for sock in self.sockets:
                sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            if isinstance(self.upstream, str):
                server = socket.socket(socket.AF_UNIX)
            else:
                server = socket.socket()
            try:
                server.connect(self.upstream)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.sockets += [client, server]
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                self.flowing.wait()
                dst.sendall(data)
        except OSError:
            pass
        self.flowing.wait()  # a close is held by the cut too
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
