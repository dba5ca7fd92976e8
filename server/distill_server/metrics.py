"""Prometheus metrics of one server, served on ``--metrics-port``.

Names follow Prometheus conventions (base units, ``_total`` counters):

- ``distill_requests_total{rpc, code}``: calls finished, by method and gRPC
  status code (stream steps are counted by ``distill_stream_steps_total``).
- ``distill_request_duration_seconds{rpc}``: call latency, server side.
- ``distill_requests_in_flight{rpc}``: calls being served now.
- ``distill_received_bytes_total{rpc}``: request bytes received.
- ``distill_elements_total{rpc}``: tensor elements computed (teachers and
  students).
- ``distill_stream_steps_total{code}``: StreamLosses steps answered.
- ``distill_inflight_bytes``: bytes of ``--max-inflight-mb`` reserved by unary
  calls: a message being received counts the message limit, then its size,
  then its answer's until the client has taken it.
- ``distill_shared_memory_regions`` and ``distill_shared_memory_bytes``: the
  shared-memory regions registered now, and their bytes.
- ``distill_cuda_ipc_mappings``: allocations of clients' CUDA memory mapped
  now (by calls in flight; 0 between calls).
- ``distill_device_info{device, description}``: the compute device (always 1).

The endpoint is bounded, whatever clients do (see ``_Endpoint``): one thread
reads requests for every connection, at most ``http_workers`` threads answer
complete ones, at most ``http_connections`` connections wait, and a request
that has not fully arrived ``http_timeout`` seconds after its connection was
accepted is dropped.
"""

from __future__ import annotations

import io
import logging
import selectors
import socket
import threading
import time
from collections import deque
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import MetricsHandler

__all__ = ["Metrics"]

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

_MAX_HEAD = 16 * 1024  # request line and headers; a scraper sends a few hundred bytes
_BACKLOG = 128


class Metrics:
    """The server's metrics, in a registry of their own (one per server).

    ``http_timeout``, ``http_workers`` and ``http_connections`` bound the HTTP
    endpoint (see ``_Endpoint``); they may be given to the constructor or set
    on the class or instance before ``serve``.
    """

    http_timeout: float = 5.0
    """Seconds a connection has to send its whole request (line and headers),
    and the socket timeout for each write of the answer."""
    http_workers: int = 8
    """Requests answered at once (threads)."""
    http_connections: int = 64
    """Connections held while their request arrives or waits for a worker."""

    def __init__(
        self,
        device: str,
        description: str,
        *,
        http_timeout: float | None = None,
        http_workers: int | None = None,
        http_connections: int | None = None,
    ) -> None:
        if http_timeout is not None:
            self.http_timeout = http_timeout
        if http_workers is not None:
            self.http_workers = http_workers
        if http_connections is not None:
            self.http_connections = http_connections
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.requests = Counter(
            "distill_requests", "Calls finished, by method and status code.", ["rpc", "code"], registry=registry
        )
        self.duration = Histogram(
            "distill_request_duration_seconds",
            "Call latency on the server, by method.",
            ["rpc"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge("distill_requests_in_flight", "Calls being served.", ["rpc"], registry=registry)
        self.received = Counter(
            "distill_received_bytes", "Request bytes received, by method.", ["rpc"], registry=registry
        )
        self.elements = Counter("distill_elements", "Tensor elements computed, by method.", ["rpc"], registry=registry)
        self.stream_steps = Counter(
            "distill_stream_steps", "StreamLosses steps answered, by status code.", ["code"], registry=registry
        )
        self.inflight_bytes = Gauge(
            "distill_inflight_bytes", "Bytes reserved by unary calls in flight (--max-inflight-mb).", registry=registry
        )
        self.shared_memory_regions = Gauge(
            "distill_shared_memory_regions", "Shared-memory regions registered.", registry=registry
        )
        self.shared_memory_bytes = Gauge(
            "distill_shared_memory_bytes", "Bytes of the shared-memory regions registered.", registry=registry
        )
        self.cuda_ipc_mappings = Gauge(
            "distill_cuda_ipc_mappings",
            "Allocations of clients' CUDA memory mapped by calls in flight.",
            registry=registry,
        )
        Info("distill_device", "The device computing losses.", registry=registry).info(
            {"device": device, "description": description}
        )
        self._http: _Endpoint | None = None
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}

    def labelled(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, looked up once: ``labels()`` checks its
        values and takes a lock on every call, a cost each call of the
        service would pay several times over."""
        key = (metric, values)
        child = self._children.get(key)
        if child is None:
            child = self._children.setdefault(key, metric.labels(*values))
        return child

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` over HTTP; returns the bound port."""
        self.close()
        endpoint = _Endpoint(
            host,
            port,
            self.registry,
            timeout=self.http_timeout,
            workers=self.http_workers,
            connections=self.http_connections,
        )
        self._http = endpoint
        return endpoint.port

    def close(self) -> None:
        """Stop the HTTP endpoint: every connection is closed and every thread
        it started has ended when this returns."""
        if self._http is not None:
            self._http.close()
            self._http = None


class _Handler(MetricsHandler):
    """prometheus_client's handler (content negotiation: text or OpenMetrics,
    gzip; ``name[]`` filters), reading a request head already received
    instead of the socket, so a worker never waits on a client's request."""

    head = b""

    def __init__(self, request: socket.socket, client_address: Any, server: Any, head: bytes) -> None:
        self.head = head
        super().__init__(request, client_address, server)

    def setup(self) -> None:
        super().setup()  # the socket timeout (``timeout``) bounds each write of the answer
        self.rfile.close()
        self.rfile = io.BytesIO(self.head)


class _Connection:
    """A client connection whose request is still arriving."""

    __slots__ = ("address", "deadline", "head", "sock")

    def __init__(self, sock: socket.socket, address: Any, deadline: float) -> None:
        self.sock = sock
        self.address = address
        self.deadline = deadline
        self.head = bytearray()


def _bind_address(host: str, port: int) -> tuple[socket.AddressFamily, Any]:
    """The family and socket address to bind: the first ``getaddrinfo`` gives,
    as prometheus_client and ``http.server`` do (IPv6 hosts included)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, address = infos[0]
    return family, address


class _Endpoint:
    """A bounded HTTP/1.0 endpoint for ``/metrics``.

    Unlike ``http.server``'s ``ThreadingHTTPServer`` (a thread per connection,
    waiting on it without a timeout), a connection costs a thread only once
    its whole request has arrived:

    - One I/O thread accepts connections and reads their requests without
      blocking, for all of them at once. A connection whose request (line and
      headers) is not complete ``timeout`` seconds after it was accepted (a
      silent one, a half-sent one, or one trickling a byte at a time), or is
      larger than 16 KiB, is closed.
    - At most ``connections`` connections are held. When one more comes, the
      oldest one still sending its request is closed (it is the likeliest to be
      stuck: a scraper sends its request as soon as it connects), so idle
      connections cannot lock scrapers out; if all of them hold complete
      requests waiting for a worker, the new one is closed at once.
    - At most ``workers`` threads answer complete requests, one each; further
      complete requests wait, without a thread, for one to be free. A worker
      only writes (the request was read for it); each write has the socket
      timeout ``timeout``, so a client that does not read cannot hold it.
    - ``close`` stops the I/O thread, closes every connection (those being
      answered too) and joins every thread.
    """

    def __init__(
        self, host: str, port: int, registry: CollectorRegistry, *, timeout: float, workers: int, connections: int
    ) -> None:
        if timeout <= 0 or workers < 1 or connections < 1:
            raise ValueError("the metrics endpoint needs timeout > 0, workers >= 1 and connections >= 1")
        self.timeout = timeout
        self.workers = workers
        self.connections = connections
        self.handler = type("MetricsHandler", (_Handler,), {"registry": registry, "timeout": timeout})
        family, address = _bind_address(host, port)
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(address)
            self.sock.listen(_BACKLOG)
            self.sock.setblocking(False)
        except BaseException:
            self.sock.close()
            raise
        self.port = int(self.sock.getsockname()[1])
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._lock = threading.Lock()
        self._stopping = False
        self._answering: dict[threading.Thread, socket.socket] = {}  # guarded by _lock
        self._reading: dict[socket.socket, _Connection] = {}  # I/O thread only; oldest first
        self._ready: deque[tuple[socket.socket, Any, bytes]] = deque()  # I/O thread only
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.sock, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._run, name=f"metrics-http:{self.port}", daemon=True)
        self._thread.start()

    # The I/O thread.

    def _run(self) -> None:
        try:
            while not self._stopping:
                timeout = None
                if self._reading:
                    oldest = next(iter(self._reading.values()))
                    timeout = max(0.0, oldest.deadline - time.monotonic())
                for key, _ in self._selector.select(timeout):
                    if key.fileobj is self.sock:
                        self._accept()
                    elif key.fileobj is self._wake_r:
                        self._drain_wake()
                    else:
                        connection: _Connection = key.data
                        if self._reading.get(connection.sock) is connection:  # not dropped earlier this round
                            self._read(connection)
                self._expire()
                self._dispatch()
        except Exception:
            log.exception("metrics endpoint failed")
        finally:
            for connection in list(self._reading.values()):
                self._drop(connection)
            while self._ready:
                _close(self._ready.popleft()[0])

    def _accept(self) -> None:
        while True:
            try:
                sock, address = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. out of file descriptors: wait for the next round
                log.warning("metrics endpoint cannot accept: %s", exc)
                return
            if len(self._reading) + len(self._ready) >= self.connections:
                if not self._reading:
                    _close(sock)
                    continue
                self._drop(next(iter(self._reading.values())))
            sock.setblocking(False)
            connection = _Connection(sock, address, time.monotonic() + self.timeout)
            self._reading[sock] = connection
            self._selector.register(sock, selectors.EVENT_READ, connection)

    def _read(self, connection: _Connection) -> None:
        try:
            data = connection.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(connection)
            return
        head = connection.head
        start = max(0, len(head) - 3)
        head.extend(data)
        if len(head) > _MAX_HEAD:
            self._drop(connection)
        elif head.find(b"\n\r\n", start) >= 0 or head.find(b"\n\n", start) >= 0:
            self._selector.unregister(connection.sock)
            del self._reading[connection.sock]
            self._ready.append((connection.sock, connection.address, bytes(head)))

    def _expire(self) -> None:
        now = time.monotonic()
        while self._reading:
            oldest = next(iter(self._reading.values()))
            if oldest.deadline > now:
                return
            self._drop(oldest)

    def _drop(self, connection: _Connection) -> None:
        self._selector.unregister(connection.sock)
        del self._reading[connection.sock]
        _close(connection.sock)

    def _dispatch(self) -> None:
        with self._lock:
            while self._ready and len(self._answering) < self.workers and not self._stopping:
                sock, address, head = self._ready.popleft()
                thread = threading.Thread(
                    target=self._answer, args=(sock, address, head), name=f"metrics-http:{self.port}", daemon=True
                )
                self._answering[thread] = sock
                thread.start()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(512):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:  # its buffer is full (the I/O thread will wake anyway) or it is closed
            pass

    # The workers.

    def _answer(self, sock: socket.socket, address: Any, head: bytes) -> None:
        try:
            sock.setblocking(True)
            self.handler(sock, address, self, head)
        except OSError as exc:  # the client went away, or did not read within the timeout
            log.debug("metrics endpoint: %s: %s", address, exc)
        except Exception:
            log.exception("metrics endpoint: answering %s failed", address)
        finally:
            with self._lock:  # before closing it, so that close() never shuts down a closed socket
                del self._answering[threading.current_thread()]
            _close(sock)
            self._wake()

    # Shutting down.

    def close(self) -> None:
        with self._lock:
            if self._stopping:
                return
            self._stopping = True  # no worker starts after this
        self._wake()
        self._thread.join()
        with self._lock:
            answering = list(self._answering)
            for sock in self._answering.values():  # cut the answers being written short
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for thread in answering:
            thread.join()
        self._selector.close()
        self.sock.close()
        self._wake_r.close()
        self._wake_w.close()


def _close(sock: socket.socket) -> None:
    """Close a client connection, telling the client (FIN) when it can."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
