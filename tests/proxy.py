"""A loopback TCP proxy that stalls an upload or a download part way."""

from __future__ import annotations

import contextlib
import socket
import threading

__all__ = ["StallingProxy"]


class StallingProxy:
    """A loopback TCP proxy that forwards ``limit`` bytes of each upload, then
    stops reading it (a client gone silent mid-message); answers flow freely,
    or up to ``download`` bytes (a client that stops taking its answers)."""

    def __init__(self, target_port: int, limit: int | None, download: int | None = None) -> None:
        self.limit = limit
        self.download = download
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.sockets += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, self.limit), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, self.download), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket, limit: int | None) -> None:
        sent = 0
        try:
            while limit is None or sent < limit:
                chunk = source.recv(min(1 << 16, limit - sent) if limit is not None else 1 << 16)
                if not chunk:
                    return
                sink.sendall(chunk)
                sent += len(chunk)
        except OSError:
            return

    def close(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
