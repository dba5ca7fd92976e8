"""The floor: a raw TCP socket and one NumPy MSE, no gRPC, no framing.

Listens on 127.0.0.1 (port 0), prints the port, and serves one connection
until it closes. Each request is a 16-byte header (element count ``n`` and
flags, two little-endian uint64) followed by ``2 n`` float32 (the teacher,
then the student), received with ``recv_into`` into a buffer kept from call
to call. The answer is the MSE as one little-endian float64
(``d = a - b; float(d @ d) / n``) and, with flag 1, the gradient
``2 (s - t) / n`` as ``n`` float32. ``bench_loopback.py`` times this as the
cheapest way to move the same bytes between two processes and compute on them.
"""

from __future__ import annotations

import socket
import struct

import numpy as np

HEADER = struct.Struct("<QQ")
GRADIENT = 1


def receive_into(connection: socket.socket, buffer: memoryview) -> bool:
    """Fill ``buffer`` from ``connection``; False when the peer closed first."""
    view = buffer.cast("B")
    while view:
        got = connection.recv_into(view)
        if not got:
            return False
        view = view[got:]
    return True


def serve(connection: socket.socket) -> None:
    header = bytearray(HEADER.size)
    buffer = np.empty(0, dtype=np.float32)
    while receive_into(connection, memoryview(header)):
        n, flags = HEADER.unpack(header)
        if buffer.size != 2 * n:
            buffer = np.empty(2 * n, dtype=np.float32)
        if not receive_into(connection, memoryview(buffer)):
            return
        a, b = buffer[:n], buffer[n:]
        d = a - b
        connection.sendall(struct.pack("<d", float(d @ d) / n))
        if flags & GRADIENT:
            d *= np.float32(-2 / n)  # 2 (s - t) / n, in place
            connection.sendall(d)


def main() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        print(server.getsockname()[1], flush=True)
        connection, _ = server.accept()
        with connection:
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            serve(connection)


if __name__ == "__main__":
    main()
