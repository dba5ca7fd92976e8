"""``DistillClient``: one channel to a DistillService, one method per RPC."""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt

from distill.v1 import distill_pb2 as pb
from distill_client._closing import Closing
from distill_client.cuda_ipc import CudaIpc, CudaIpcInfo
from distill_client.shared_memory import Batch, SharedMemory, SharedMemoryInfo, Transport
from distill_client.stream import StreamSession, step_bound
from distill_core import rpc, tensors, wire
from distill_core.errors import from_rpc_error
from distill_core.losses import DistilLoss, LayerLoss, LossKind
from distill_core.rpc import SERVICE_NAME

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_TARGET",
    "DEFAULT_TIMEOUT",
    "SERVICE_NAME",
    "ChannelSettings",
    "DistillClient",
    "LayerSpec",
    "ServerInfo",
    "TotalLoss",
    "channel_target",
    "default_target",
    "layer_config",
    "layer_loss_request",
    "service_config",
    "total_loss_request",
]

DEFAULT_TARGET = "localhost:50051"
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
"""Send and receive limit of the channel: real feature maps, not gRPC's 4 MiB."""
DEFAULT_TIMEOUT = 300.0
"""Default deadline of a call, in seconds (streams have none by default)."""

LayerSpec = tuple[float, DistilLoss]
"""A layer as the reference holds it: ``(weight, loss)``."""


def _read(path: str | os.PathLike[str] | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


def default_target() -> str:
    """``$DISTILL_TARGET``, else ``localhost:50051``."""
    return os.environ.get("DISTILL_TARGET") or DEFAULT_TARGET


@dataclass(frozen=True)
class TotalLoss:
    """The total loss and every layer's part of it."""

    total: float
    layers: list[LayerLoss]


@dataclass(frozen=True)
class ServerInfo:
    """What a server offers (``GetServerInfo``)."""

    version: str
    device: str
    device_description: str
    supported_dtypes: list[str]
    supported_loss_kinds: list[LossKind]
    max_message_bytes: int
    shared_memory: SharedMemoryInfo | None = None
    """Whether and how it shares memory with clients on its host (None: a
    server that does not say, so does not)."""
    cuda_ipc: CudaIpcInfo | None = None
    """Whether it takes CUDA memory of clients on its GPU by IPC handle, and
    its GPU's UUID (None: a server that does not say, so does not)."""

    @classmethod
    def from_proto(cls, response: pb.GetServerInfoResponse) -> ServerInfo:
        return cls(
            version=response.version,
            device=response.device,
            device_description=response.device_description,
            supported_dtypes=[pb.Dtype.Name(d) for d in response.supported_dtypes],
            supported_loss_kinds=[LossKind(k) for k in response.supported_loss_kinds],
            max_message_bytes=response.max_message_bytes,
            shared_memory=(
                SharedMemoryInfo.from_proto(response.shared_memory) if response.HasField("shared_memory") else None
            ),
            cuda_ipc=CudaIpcInfo.from_proto(response.cuda_ipc) if response.HasField("cuda_ipc") else None,
        )


@dataclass(frozen=True)
class ChannelSettings:
    """What a client's channel is made with: its arguments (limits, retries,
    balancing, health checking), credentials and call metadata (the token)."""

    options: list[tuple[str, Any]]
    credentials: grpc.ChannelCredentials | None
    metadata: tuple[tuple[str, str], ...] | None

    @classmethod
    def of(
        cls,
        max_message_bytes: int,
        retries: int,
        token: str | None,
        tls_ca: str | os.PathLike[str] | None,
        tls_cert: str | os.PathLike[str] | None,
        tls_key: str | os.PathLike[str] | None,
        tls: bool,
        credentials: grpc.ChannelCredentials | None,
        options: Sequence[tuple[str, Any]],
    ) -> ChannelSettings:
        """The settings of the clients' keyword arguments (see :class:`DistillClient`)."""
        token = token or os.environ.get("DISTILL_AUTH_TOKEN") or None
        channel_options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.enable_retries", int(retries > 0)),
            ("grpc.per_rpc_retry_buffer_size", max_message_bytes),
            ("grpc.service_config", json.dumps(service_config(retries))),
            *options,
        ]
        if credentials is None and (tls or tls_ca or tls_cert or tls_key):
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(tls_ca), private_key=_read(tls_key), certificate_chain=_read(tls_cert)
            )
        return cls(channel_options, credentials, (("authorization", f"Bearer {token}"),) if token else None)


def layer_loss_request(
    config: list[pb.Layer], layer_index: int, gradients: bool, batch: Batch, labels: Any = None
) -> bytes:
    """A framed ``ComputeLayerLossRequest`` for ``batch``'s one pair (and its class labels)."""
    outputs, cuda_outputs = batch.gradient_outputs, batch.gradient_cuda_outputs
    return wire.build(
        pb.ComputeLayerLossRequest(
            layers=config,
            layer_index=layer_index,
            return_gradients=gradients,
            gradient_output=outputs[0] if outputs else None,
            gradient_cuda_output=cuda_outputs[0] if cuda_outputs else None,
            labels=None if labels is None else tensors.to_labels(labels),
        ),
        teacher=batch.teachers[0],
        student=batch.students[0],
    )


def total_loss_request(
    config: list[pb.Layer], gradients: bool, batch: Batch, labels: Mapping[int, Any] | None = None
) -> bytes:
    """A framed ``ComputeTotalLossRequest`` for ``batch`` (and its layers' class labels)."""
    return wire.build(
        pb.ComputeTotalLossRequest(
            layers=config,
            return_gradients=gradients,
            gradient_outputs=batch.gradient_outputs,
            gradient_cuda_outputs=batch.gradient_cuda_outputs,
            labels=tensors.labels_by_layer(labels),
        ),
        teachers=batch.teachers,
        students=batch.students,
    )


def layer_config(layers: Sequence[LayerSpec], names: Sequence[str] | None) -> list[pb.Layer]:
    """The layers as the requests carry them (names, if given, one per layer)."""
    if names is not None and len(names) != len(layers):
        raise ValueError(f"{len(names)} names for {len(layers)} layers")
    return [
        pb.Layer(weight=float(weight), loss=loss.to_proto(), name=names[i] if names else "")
        for i, (weight, loss) in enumerate(layers)
    ]


def service_config(retries: int) -> dict[str, Any]:
    """The channel's gRPC service config.

    - ``round_robin`` over every address the target resolves to;
    - client-side health checking (``healthCheckConfig``): the channel
      watches ``grpc.health.v1.Health/Watch`` for ``distill.v1.DistillService``
      on each connection and round_robin sends new calls only to replicas
      that report SERVING, so a replica leaves the rotation the moment it
      starts draining (NOT_SERVING), before it stops accepting. A server
      without the health service (UNIMPLEMENTED) counts as healthy. When no
      replica is SERVING, calls fail at once with UNAVAILABLE (then retried);
    - with ``retries`` > 0, calls that fail with UNAVAILABLE or CANCELLED
      are retried up to ``retries`` times with
      exponential backoff (0.1 s doubling, at most 2 s; gRPC allows at most
      5 attempts in all, so ``retries`` above 4 counts as 4). A stream is
      retried only until the server has answered on it.

    The retried codes are UNAVAILABLE (the replica could not be reached or
    went away: killed, connection dropped, none SERVING) and CANCELLED (a
    draining replica's gRPC core cancels the calls that reach it as it stops
    accepting, and those still running when its ``--grace`` runs out).
    Retrying is safe for every method: a loss is a pure function of its
    request, so computing it twice costs time, never correctness. A call the
    client cancels itself, or whose deadline passes, is never retried.
    """
    config: dict[str, Any] = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": SERVICE_NAME},
    }
    if retries > 0:
        config["methodConfig"] = [
            {
                "name": [{"service": SERVICE_NAME}],
                "retryPolicy": {
                    "maxAttempts": retries + 1,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
                },
            }
        ]
    return config


def channel_target(target: str | Sequence[str]) -> str:
    """A gRPC target for one address, or for several ``ip:port`` literals
    (``ipv4:`` / ``ipv6:`` lists, balanced round-robin)."""
    if isinstance(target, str):
        return target
    addresses = list(target)
    if len(addresses) == 1:
        return addresses[0]
    families = set()
    for address in addresses:
        host, _, port = address.rpartition(":")
        try:
            families.add(ipaddress.ip_address(host.strip("[]")).version)
        except ValueError:
            raise ValueError(
                f"{address!r}: a list of servers takes ip:port literals; for host names use one DNS name "
                "that resolves to them all (dns:///name:port)"
            ) from None
        if not port.isdigit():
            raise ValueError(f"{address!r} has no port")
    if len(families) != 1:
        raise ValueError("a list of servers must be all IPv4 or all IPv6")
    return f"ipv{families.pop()}:{','.join(addresses)}"


class DistillClient(Closing):
    """A connection to DistillService (thread-safe; use as a context manager).

    Args:
        target: ``host:port``, any gRPC target (``dns:///name:port`` balances
            over every address the name resolves to), or a list of
            ``ip:port`` servers; default :func:`default_target`.
        max_message_bytes: Send and receive limit of the channel; raise it
            (and the server's ``--max-message-mb``) for larger feature maps.
        timeout: Default deadline of each call in seconds (None: none).
        retries: How often a call that failed with UNAVAILABLE or CANCELLED
            is retried, with exponential backoff, by gRPC itself (0: never;
            at most 4). Retrying is always safe: a loss is a pure function
            of its request. UNAVAILABLE is a replica that went away;
            CANCELLED is a call a draining replica cancelled as it stopped
            (see :func:`service_config`). Calls the client cancels, and
            deadlines, are never retried.
        token: Bearer token sent with every call; default ``$DISTILL_AUTH_TOKEN``.
        tls_ca: PEM file of the CA that signed the server's certificate; set it
            (or ``tls_cert``) to use TLS. Without it TLS uses the system roots.
        tls_cert: PEM client certificate chain, for mutual TLS.
        tls_key: PEM private key of ``tls_cert``.
        tls: Use TLS even without any of the files above (system roots).
        credentials: Ready-made channel credentials (instead of the TLS files).
        options: Extra gRPC channel options.
        transport: How tensors travel. ``"grpc"``: as bytes in the messages.
            ``"shm"``: through shared memory the client registers with the
            server (a trainer on the server's host, same user): each call's
            tensors are copied into a pooled region once, the server computes
            on them in place (a sealed memory file, on Linux; else it reads a
            file in its shared-memory directory) and writes gradients there;
            raises
            :class:`~distill_core.errors.SharedMemoryDisabled` where the
            server cannot share memory with this client. ``"auto"`` (the
            default): shared memory for calls of at least
            :data:`~distill_client.shared_memory.SHM_THRESHOLD_BYTES` where
            the server can share it (found out at the first such call),
            bytes otherwise. Arrays of :meth:`shared_arrays` go with no copy
            at all. Shared memory needs every call to reach the replica that
            holds the regions: with ``"auto"`` a call that does not is sent
            again as bytes, and shared memory is off from then on.
            CUDA arrays (CuPy arrays, torch CUDA tensors, anything with
            ``__cuda_array_interface__``): with ``"auto"``, where the server
            computes on their GPU (GetServerInfo's ``cuda_ipc``), they go as
            CUDA IPC handles and the gradients are written into device
            buffers of the students' library, dtype and shape, which come
            back as the layers' gradients; elsewhere they are copied to the
            host first. ``"cuda_ipc"`` sends every call so or raises
            :class:`~distill_core.errors.CudaIpcUnavailable`.

    Calls are balanced round-robin over the target's addresses, and only
    over replicas whose ``grpc.health.v1`` status for
    ``distill.v1.DistillService`` is SERVING (client-side health checking,
    see :func:`service_config`): a replica that starts draining gets no new
    calls, so a rolling restart of servers started with ``--drain-delay``
    costs no call.

    Every method raises a :class:`~distill_core.errors.DistillError`
    subclass on failure.
    """

    def __init__(
        self,
        target: str | Sequence[str] | None = None,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        timeout: float | None = DEFAULT_TIMEOUT,
        retries: int = 4,
        token: str | None = None,
        tls_ca: str | os.PathLike[str] | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        tls: bool = False,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
        transport: Transport = "auto",
    ) -> None:
        self.target = channel_target(target or default_target())
        self.timeout = timeout
        settings = ChannelSettings.of(
            max_message_bytes, retries, token, tls_ca, tls_cert, tls_key, tls, credentials, options
        )
        self._metadata = settings.metadata
        if settings.credentials is None:
            self._channel = grpc.insecure_channel(self.target, options=settings.options)
        else:
            self._channel = grpc.secure_channel(self.target, settings.credentials, options=settings.options)
        # Requests go out serialized: the loss methods' framed by distill_core.wire.
        self._layer_loss = self._unary(rpc.COMPUTE_LAYER_LOSS)
        self._total_loss = self._unary(rpc.COMPUTE_TOTAL_LOSS)
        self._server_info = self._unary(rpc.GET_SERVER_INFO)
        self._stream_losses = self._channel.stream_stream(
            rpc.STREAM_LOSSES.path, response_deserializer=rpc.STREAM_LOSSES.response.FromString
        )
        try:
            self._shared_memory = SharedMemory(
                transport, self._channel, self._metadata, timeout, lambda: self.server_info().shared_memory, self.target
            )
        except ValueError:
            self._channel.close()
            raise
        self._cuda_ipc = CudaIpc(transport, self._shared_memory, lambda: self.server_info().cuda_ipc, self.target)
        self.transport = transport

    def _unary(self, method: rpc.Rpc) -> grpc.UnaryUnaryMultiCallable:
        """A callable of ``method`` that sends serialized requests."""
        return self._channel.unary_unary(method.path, response_deserializer=method.response.FromString)

    def close(self) -> None:
        """Release every shared-memory region, then close the channel; calls
        in flight are cancelled."""
        self._shared_memory.close()
        self._cuda_ipc.close()
        self._channel.close()

    def _call(self, method: Any, request: bytes, timeout: float | None) -> Any:
        """Make one call; every gRPC error becomes its DistillError here."""
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    def compute_layer_loss(
        self,
        layers: Sequence[LayerSpec],
        layer_index: int,
        teacher: Any,
        student: Any,
        *,
        names: Sequence[str] | None = None,
        gradients: bool = False,
        timeout: float | None = None,
        labels: Any = None,
    ) -> LayerLoss:
        """Layer ``layer_index``'s loss, weighted by its weight.

        ``teacher`` and ``student`` are arrays of any shape (flattened),
        DLPack or ``__array__`` objects, CUDA arrays (see ``transport``), or
        lists of floats. With
        ``gradients``, the result's ``gradient`` is ``weight * d loss / d student``.
        ``labels``: the layer's class labels, for a response loss.
        """
        config = layer_config(layers, names)

        def send(batch: Batch) -> LayerLoss:
            request = layer_loss_request(config, layer_index, gradients, batch, labels)
            response: pb.ComputeLayerLossResponse = self._call(self._layer_loss, request, timeout)
            return batch.layers([response.layer_loss])[0]

        return self._cuda_ipc.exchange([teacher], [student], gradients, send)

    def compute_total_loss(
        self,
        layers: Sequence[LayerSpec],
        teachers: Sequence[Any],
        students: Sequence[Any],
        *,
        names: Sequence[str] | None = None,
        gradients: bool = False,
        timeout: float | None = None,
        labels: Mapping[int, Any] | None = None,
    ) -> TotalLoss:
        """The weighted sum of every layer's loss, and each layer's part.

        With ``gradients``, each layer's ``gradient`` is the gradient of the
        total with respect to that layer's student tensor. ``labels``: layer
        index -> class labels, for the layers with a response loss.
        """
        config = layer_config(layers, names)

        def send(batch: Batch) -> TotalLoss:
            request = total_loss_request(config, gradients, batch, labels)
            response: pb.ComputeTotalLossResponse = self._call(self._total_loss, request, timeout)
            return TotalLoss(response.total_loss, batch.layers(response.layer_losses))

        return self._cuda_ipc.exchange(teachers, students, gradients, send)

    def stream(
        self,
        layers: Sequence[LayerSpec],
        *,
        gradients: bool = False,
        names: Sequence[str] | None = None,
        timeout: float | None = None,
        step_timeout: float | None = None,
    ) -> StreamSession:
        """Open a ``StreamLosses`` stream for a training loop.

        The layers are sent once; then each :meth:`StreamSession.step`
        sends one step's tensors. ``timeout`` bounds the whole stream (none by
        default, unlike the other calls); ``step_timeout`` bounds each step
        (None: the client's ``timeout``, as for any call; ``math.inf``: no
        bound): a step with no answer in time ends the stream with
        ``DeadlineExceeded``.

        Raises:
            ValueError: a step bound (``step_timeout``, else the client's
                ``timeout``) of zero or less.
        """
        config = pb.StreamConfig(layers=layer_config(layers, names), return_gradients=gradients)
        per_step = step_bound(self.timeout if step_timeout is None else step_timeout)
        return StreamSession(self._stream_losses, config, timeout, self._metadata, self._cuda_ipc, per_step)

    def shared_arrays(
        self, shapes: Sequence[int | Sequence[int]], dtype: npt.DTypeLike = np.float32
    ) -> list[npt.NDArray[Any]]:
        """Zeroed arrays of ``shapes`` in shared memory registered with the
        server: fill them (``torch.from_numpy`` views them) and pass them, or
        views of them in C order, to the loss methods, and the server reads
        them where they are, with no copy.

        The memory stays registered while any of the arrays is alive, and
        until :meth:`close`. With ``transport="grpc"``, or ``"auto"`` where
        the server cannot share memory, they are ordinary arrays (sent as
        bytes).

        Raises:
            SharedMemoryDisabled: with ``transport="shm"``, where the server
                cannot share memory with this client.
            ValueError: a dtype other than float32, float16, bfloat16 or
                float64 (little-endian), or a negative dimension.
        """
        return self._shared_memory.shared_arrays(shapes, dtype)

    def server_info(self, *, timeout: float | None = None) -> ServerInfo:
        """What the server offers: version, device, dtypes, loss kinds, limits."""
        response: pb.GetServerInfoResponse = self._call(
            self._server_info, pb.GetServerInfoRequest().SerializeToString(), timeout
        )
        return ServerInfo.from_proto(response)
