"""PyTorch bridge: remote distillation losses that train (``pip install 'distill-service[torch]'``).

``RemoteDistillLoss`` is an ``nn.Module`` whose forward returns the remote
total loss as a scalar tensor attached to the students' graph: ``backward()``
feeds the server's gradients into it, as if the loss were computed locally.
Teacher features are detached. CUDA tensors work: with a server computing on
their GPU (and the client's ``transport`` ``"auto"`` or ``"cuda_ipc"``) they
go as CUDA IPC handles and the gradients are written straight into device
buffers, so nothing leaves the GPU; otherwise they travel through host
memory. Either way the gradients come back on each student's device and dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np
import torch

from distill_client.client import DistillClient, LayerSpec, TotalLoss
from distill_client.cuda_ipc import is_cuda_array
from distill_client.stream import StreamSession

__all__ = ["RemoteDistillLoss", "from_numpy", "remote_distill_loss", "to_numpy"]

Compute = Callable[[list[Any], list[Any], bool], TotalLoss]
"""``compute(teachers, students, gradients)``: NumPy arrays, or (where the
bridge passes CUDA tensors through) detached torch CUDA tensors."""


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A detached host copy of ``tensor`` as NumPy (bfloat16 via ml_dtypes)."""
    host = tensor.detach().to("cpu").contiguous()
    if host.dtype == torch.bfloat16:
        return host.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return host.numpy()


def from_numpy(array: np.ndarray | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``array`` as a tensor on ``like``'s device and dtype (a tensor already
    there, such as a gradient the server wrote into CUDA memory, as it is)."""
    if isinstance(array, torch.Tensor):
        return array.to(device=like.device, dtype=like.dtype)
    if array.dtype == ml_dtypes.bfloat16:
        tensor = torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
    else:
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.to(device=like.device, dtype=like.dtype)


class _RemoteLoss(torch.autograd.Function):
    """Forward: the remote total. Backward: the server's student gradients."""

    @staticmethod
    def forward(ctx: Any, compute: Compute, n_layers: int, on_device: bool, *features: torch.Tensor) -> torch.Tensor:
        teachers, students = features[:n_layers], features[n_layers:]
        wants_gradients = any(ctx.needs_input_grad[3 + n_layers :])

        def prepared(tensor: torch.Tensor) -> Any:
            return tensor.detach() if on_device and is_cuda_array(tensor) else to_numpy(tensor)

        result = compute([prepared(t) for t in teachers], [prepared(s) for s in students], wants_gradients)
        ctx.n_layers = n_layers
        ctx.gradients = [
            from_numpy(layer.gradient, like=student) if layer.gradient is not None else None
            for layer, student in zip(result.layers, students, strict=True)
        ]
        dtype = torch.promote_types(students[0].dtype, torch.float32) if students else torch.float32
        device = students[0].device if students else torch.device("cpu")
        return torch.tensor(result.total, dtype=dtype, device=device)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        students = [None if g is None else g * grad_output.to(device=g.device, dtype=g.dtype) for g in ctx.gradients]
        return (None, None, None, *([None] * ctx.n_layers), *students)


def remote_distill_loss(
    compute: Compute,
    teacher_feats: Sequence[torch.Tensor],
    student_feats: Sequence[torch.Tensor],
    *,
    on_device: bool = False,
) -> torch.Tensor:
    """The remote loss of one step as a scalar attached to the students' graph.

    ``compute(teachers, students, gradients)`` makes the remote call (see
    :class:`RemoteDistillLoss` for the usual ones). It gets NumPy copies of
    the features, or with ``on_device`` the CUDA ones detached as they are
    (for a client that sends them by CUDA IPC handle); the gradients it
    returns may be NumPy arrays or tensors.
    """
    if len(teacher_feats) != len(student_feats):
        raise ValueError(f"{len(teacher_feats)} teacher features but {len(student_feats)} student features")
    loss: torch.Tensor = _RemoteLoss.apply(  # type: ignore[no-untyped-call]
        compute, len(teacher_feats), on_device, *teacher_feats, *student_feats
    )
    return loss


class RemoteDistillLoss(torch.nn.Module):
    """``loss = remote_loss(teacher_feats, student_feats)``; ``loss.backward()`` trains.

    A context manager: ``with RemoteDistillLoss(...) as remote_loss:`` closes
    it (its stream, and its client if it made one) on the way out.

    Args:
        layers: ``(weight, DistilLoss)`` pairs, one per feature map.
        client: A :class:`DistillClient` to use; else one is created from
            ``target`` and ``client_options`` (and closed by :meth:`close`).
        stream: Send the steps over one ``StreamLosses`` stream (the layers
            travel once, gradients are always computed) instead of one
            ``ComputeTotalLoss`` call per step. A stream that ends with an
            error is reopened at the next step.
        names: Optional layer names, echoed in errors.
        **client_options: Passed to :class:`DistillClient` when it is created
            here: e.g. ``transport="shm"`` (or ``"grpc"``, default ``"auto"``)
            sends the features, and gets the gradients back, through shared
            memory with a server on this host. Features that are views of
            :meth:`DistillClient.shared_arrays` (``torch.from_numpy``) on the
            CPU go with no copy. CUDA features go by CUDA IPC handle to a
            server on their GPU with ``"auto"`` (``"cuda_ipc"``: always, or
            an error), their gradients written into CUDA memory: nothing
            leaves the GPU.
    """

    def __init__(
        self,
        layers: Sequence[LayerSpec],
        *,
        client: DistillClient | None = None,
        target: str | None = None,
        stream: bool = False,
        names: Sequence[str] | None = None,
        **client_options: Any,
    ) -> None:
        super().__init__()
        self.layers = list(layers)
        self.names = names
        self._owns_client = client is None
        self.client = client if client is not None else DistillClient(target, **client_options)
        self._use_stream = stream
        self._session: StreamSession | None = None
        self.last: TotalLoss | None = None
        """The last step's full result (per-layer losses)."""

    def _compute(
        self, teachers: list[Any], students: list[Any], gradients: bool, labels: Mapping[int, Any] | None = None
    ) -> TotalLoss:
        if not self._use_stream:
            result = self.client.compute_total_loss(
                self.layers, teachers, students, names=self.names, gradients=gradients, labels=labels
            )
        else:
            if self._session is None or self._session.closed:  # first step, or the stream ended
                self._session = self.client.stream(self.layers, gradients=True, names=self.names)
            step = self._session.step(teachers, students, labels=labels)
            result = TotalLoss(step.total, step.layers)
        self.last = result
        return result

    def forward(
        self,
        teacher_feats: Sequence[torch.Tensor],
        student_feats: Sequence[torch.Tensor],
        labels: Mapping[int, Any] | None = None,
    ) -> torch.Tensor:
        """The step's remote total loss; ``labels``: layer index -> class
        labels (integer tensors or lists), for layers with a response loss."""
        on_device = self.client.transport in ("auto", "cuda_ipc")  # the client sends CUDA tensors by handle
        compute = functools.partial(self._compute, labels=labels)
        return remote_distill_loss(compute, teacher_feats, student_feats, on_device=on_device)

    def close(self) -> None:
        """End the stream, and close the client if this module created it."""
        if self._session is not None:
            self._session.close()
            self._session = None
        if self._owns_client:
            self.client.close()

    def __enter__(self) -> RemoteDistillLoss:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
