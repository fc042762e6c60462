"""A TCP proxy in front of a real IMAP server that stops forwarding, without closing, once
a client sends a line containing a given word: the client then waits on a live socket,
which is what a hung server or a dead network path looks like. The server stays real.
"""

from __future__ import annotations

import socket
import threading


class StallProxy:
    """``with StallProxy(host, port, b'"Poison"') as proxy:`` listen on ``proxy.port``."""

    def __init__(self, host: str, port: int, stall_on: bytes):
        self.target = (host, port)
        self.stall_on = stall_on
        self.stalls = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.host, self.port = self._listener.getsockname()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False

    def __enter__(self) -> StallProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed = True
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            with self._lock:
                self._sockets += [client, server]
            stalled = threading.Event()
            threading.Thread(target=self._pump, args=(client, server, stalled, True),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, stalled, False),
                             daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, stalled: threading.Event,
              from_client: bool) -> None:
        try:
            while not stalled.is_set():
                data = src.recv(65536)
                if not data:
                    break
                if from_client and self.stall_on in data:
                    self.stalls += 1
                    stalled.set()  # swallow it and everything after: the session hangs
                    self._drain(src)
                    break
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):  # one side left: so does the other
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    @staticmethod
    def _drain(client: socket.socket) -> None:
        """Read and drop what a stalled client sends until it goes away."""
        try:
            while client.recv(65536):
                pass
        except OSError:
            pass
