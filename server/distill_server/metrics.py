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
- ``distill_device_info{device, description}``: the compute device (always 1).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The server's metrics, in a registry of their own (one per server)."""

    def __init__(self, device: str, description: str) -> None:
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
        Info("distill_device", "The device computing losses.", registry=registry).info(
            {"device": device, "description": description}
        )
        self._http: object | None = None

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` over HTTP; returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return int(server.server_address[1])

    def close(self) -> None:
        """Stop the HTTP endpoint."""
        if self._http is not None:
            self._http.shutdown()  # type: ignore[attr-defined]
            self._http.server_close()  # type: ignore[attr-defined]
            self._http = None
