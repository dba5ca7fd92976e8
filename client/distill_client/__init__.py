"""Client of DistillService: knowledge-distillation losses computed remotely.

>>> from distill_client import DistilLoss, RemoteFeatureDistiller
>>> d = RemoteFeatureDistiller.with_weights([0.3, 0.7], DistilLoss.kl_divergence(2.0))
>>> d.compute_total_loss(teacher_feats, student_feats)  # doctest: +SKIP
"""

from importlib.metadata import PackageNotFoundError, version

from distill_client.aio import AsyncDistillClient, AsyncStreamSession
from distill_client.client import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT,
    DistillClient,
    LayerSpec,
    ServerInfo,
    TotalLoss,
)
from distill_client.cuda_ipc import CudaIpcInfo
from distill_client.distiller import RemoteFeatureDistiller
from distill_client.response import RemoteResponseDistiller
from distill_client.shared_memory import SharedMemoryInfo
from distill_client.stream import StepResult, StreamSession
from distill_core.errors import (
    Cancelled,
    CudaIpcUnavailable,
    DeadlineExceeded,
    DimensionMismatch,
    DistillError,
    EmptyInput,
    Internal,
    InvalidArgument,
    LayerIndexOutOfRange,
    LimitExceeded,
    LossOverflow,
    MessageTooLarge,
    NonFiniteInput,
    OutOfRange,
    PermissionDenied,
    RegionNotFound,
    RegionOutOfBounds,
    RegionRefused,
    RegionTruncated,
    ResourceExhausted,
    ShapeMismatch,
    SharedMemoryDisabled,
    TeacherStudentMismatch,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from distill_core.losses import DistilLoss, LayerLoss, LossKind, Reduction

try:
    __version__ = version("distill-service")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_TARGET",
    "DEFAULT_TIMEOUT",
    "AsyncDistillClient",
    "AsyncStreamSession",
    "Cancelled",
    "CudaIpcInfo",
    "CudaIpcUnavailable",
    "DeadlineExceeded",
    "DimensionMismatch",
    "DistilLoss",
    "DistillClient",
    "DistillError",
    "EmptyInput",
    "Internal",
    "InvalidArgument",
    "LayerIndexOutOfRange",
    "LayerLoss",
    "LayerSpec",
    "LimitExceeded",
    "LossKind",
    "LossOverflow",
    "MessageTooLarge",
    "NonFiniteInput",
    "OutOfRange",
    "PermissionDenied",
    "Reduction",
    "RegionNotFound",
    "RegionOutOfBounds",
    "RegionRefused",
    "RegionTruncated",
    "RemoteFeatureDistiller",
    "RemoteResponseDistiller",
    "ResourceExhausted",
    "ServerInfo",
    "ShapeMismatch",
    "SharedMemoryDisabled",
    "SharedMemoryInfo",
    "StepResult",
    "StreamSession",
    "TeacherStudentMismatch",
    "TotalLoss",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "__version__",
]
