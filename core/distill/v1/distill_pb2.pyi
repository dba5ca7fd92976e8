from google.rpc import status_pb2 as _status_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Dtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[Dtype]
    DTYPE_FLOAT32: _ClassVar[Dtype]
    DTYPE_FLOAT16: _ClassVar[Dtype]
    DTYPE_BFLOAT16: _ClassVar[Dtype]
    DTYPE_FLOAT64: _ClassVar[Dtype]

class LossKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LOSS_KIND_UNSPECIFIED: _ClassVar[LossKind]
    LOSS_KIND_MSE: _ClassVar[LossKind]
    LOSS_KIND_COSINE: _ClassVar[LossKind]
    LOSS_KIND_KL_DIVERGENCE: _ClassVar[LossKind]
    LOSS_KIND_COMBINED_KL_MSE: _ClassVar[LossKind]
    LOSS_KIND_SIMILARITY_PRESERVING: _ClassVar[LossKind]
    LOSS_KIND_LINEAR_CKA: _ClassVar[LossKind]
    LOSS_KIND_PKT: _ClassVar[LossKind]
    LOSS_KIND_ATTENTION_TRANSFER: _ClassVar[LossKind]
    LOSS_KIND_CORRELATION_CONGRUENCE: _ClassVar[LossKind]
    LOSS_KIND_NST: _ClassVar[LossKind]
    LOSS_KIND_RKD: _ClassVar[LossKind]
    LOSS_KIND_KD: _ClassVar[LossKind]
    LOSS_KIND_DIST: _ClassVar[LossKind]
    LOSS_KIND_LOGIT_STANDARDIZED_KD: _ClassVar[LossKind]
    LOSS_KIND_RESPONSE: _ClassVar[LossKind]

class GramNormalization(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GRAM_NORMALIZATION_UNSPECIFIED: _ClassVar[GramNormalization]
    GRAM_NORMALIZATION_L2: _ClassVar[GramNormalization]
    GRAM_NORMALIZATION_L1: _ClassVar[GramNormalization]

class Formulation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FORMULATION_UNSPECIFIED: _ClassVar[Formulation]
    FORMULATION_PAPER: _ClassVar[Formulation]
    FORMULATION_CODE: _ClassVar[Formulation]

class CorrelationKernel(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CORRELATION_KERNEL_UNSPECIFIED: _ClassVar[CorrelationKernel]
    CORRELATION_KERNEL_GAUSSIAN: _ClassVar[CorrelationKernel]
    CORRELATION_KERNEL_BILINEAR: _ClassVar[CorrelationKernel]

class Reduction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REDUCTION_UNSPECIFIED: _ClassVar[Reduction]
    REDUCTION_FLATTEN: _ClassVar[Reduction]
    REDUCTION_PER_ROW: _ClassVar[Reduction]
DTYPE_UNSPECIFIED: Dtype
DTYPE_FLOAT32: Dtype
DTYPE_FLOAT16: Dtype
DTYPE_BFLOAT16: Dtype
DTYPE_FLOAT64: Dtype
LOSS_KIND_UNSPECIFIED: LossKind
LOSS_KIND_MSE: LossKind
LOSS_KIND_COSINE: LossKind
LOSS_KIND_KL_DIVERGENCE: LossKind
LOSS_KIND_COMBINED_KL_MSE: LossKind
LOSS_KIND_SIMILARITY_PRESERVING: LossKind
LOSS_KIND_LINEAR_CKA: LossKind
LOSS_KIND_PKT: LossKind
LOSS_KIND_ATTENTION_TRANSFER: LossKind
LOSS_KIND_CORRELATION_CONGRUENCE: LossKind
LOSS_KIND_NST: LossKind
LOSS_KIND_RKD: LossKind
LOSS_KIND_KD: LossKind
LOSS_KIND_DIST: LossKind
LOSS_KIND_LOGIT_STANDARDIZED_KD: LossKind
LOSS_KIND_RESPONSE: LossKind
GRAM_NORMALIZATION_UNSPECIFIED: GramNormalization
GRAM_NORMALIZATION_L2: GramNormalization
GRAM_NORMALIZATION_L1: GramNormalization
FORMULATION_UNSPECIFIED: Formulation
FORMULATION_PAPER: Formulation
FORMULATION_CODE: Formulation
CORRELATION_KERNEL_UNSPECIFIED: CorrelationKernel
CORRELATION_KERNEL_GAUSSIAN: CorrelationKernel
CORRELATION_KERNEL_BILINEAR: CorrelationKernel
REDUCTION_UNSPECIFIED: Reduction
REDUCTION_FLATTEN: Reduction
REDUCTION_PER_ROW: Reduction

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "shared_memory", "cuda_ipc")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    CUDA_IPC_FIELD_NUMBER: _ClassVar[int]
    dtype: Dtype
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    shared_memory: SharedMemoryRef
    cuda_ipc: CudaIpcRef
    def __init__(self, dtype: _Optional[_Union[Dtype, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., shared_memory: _Optional[_Union[SharedMemoryRef, _Mapping]] = ..., cuda_ipc: _Optional[_Union[CudaIpcRef, _Mapping]] = ...) -> None: ...

class SharedMemoryRef(_message.Message):
    __slots__ = ("region", "offset", "byte_size")
    REGION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    BYTE_SIZE_FIELD_NUMBER: _ClassVar[int]
    region: str
    offset: int
    byte_size: int
    def __init__(self, region: _Optional[str] = ..., offset: _Optional[int] = ..., byte_size: _Optional[int] = ...) -> None: ...

class CudaIpcRef(_message.Message):
    __slots__ = ("handle", "offset", "byte_size", "device_uuid")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    BYTE_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    handle: bytes
    offset: int
    byte_size: int
    device_uuid: str
    def __init__(self, handle: _Optional[bytes] = ..., offset: _Optional[int] = ..., byte_size: _Optional[int] = ..., device_uuid: _Optional[str] = ...) -> None: ...

class Loss(_message.Message):
    __slots__ = ("mse", "cosine", "kl_divergence", "combined_kl_mse", "similarity_preserving", "linear_cka", "pkt", "attention_transfer", "correlation_congruence", "nst", "rkd", "kd", "dist", "logit_standardized_kd", "response", "reduction")
    class Mse(_message.Message):
        __slots__ = ()
        def __init__(self) -> None: ...
    class Cosine(_message.Message):
        __slots__ = ()
        def __init__(self) -> None: ...
    class KlDivergence(_message.Message):
        __slots__ = ("temperature",)
        TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
        temperature: float
        def __init__(self, temperature: _Optional[float] = ...) -> None: ...
    class CombinedKlMse(_message.Message):
        __slots__ = ("kl_weight", "mse_weight", "temperature")
        KL_WEIGHT_FIELD_NUMBER: _ClassVar[int]
        MSE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
        TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
        kl_weight: float
        mse_weight: float
        temperature: float
        def __init__(self, kl_weight: _Optional[float] = ..., mse_weight: _Optional[float] = ..., temperature: _Optional[float] = ...) -> None: ...
    class SimilarityPreserving(_message.Message):
        __slots__ = ("normalization",)
        NORMALIZATION_FIELD_NUMBER: _ClassVar[int]
        normalization: GramNormalization
        def __init__(self, normalization: _Optional[_Union[GramNormalization, str]] = ...) -> None: ...
    class LinearCka(_message.Message):
        __slots__ = ()
        def __init__(self) -> None: ...
    class Pkt(_message.Message):
        __slots__ = ("eps", "mode")
        EPS_FIELD_NUMBER: _ClassVar[int]
        MODE_FIELD_NUMBER: _ClassVar[int]
        eps: float
        mode: Formulation
        def __init__(self, eps: _Optional[float] = ..., mode: _Optional[_Union[Formulation, str]] = ...) -> None: ...
    class AttentionTransfer(_message.Message):
        __slots__ = ("p", "mode")
        P_FIELD_NUMBER: _ClassVar[int]
        MODE_FIELD_NUMBER: _ClassVar[int]
        p: float
        mode: Formulation
        def __init__(self, p: _Optional[float] = ..., mode: _Optional[_Union[Formulation, str]] = ...) -> None: ...
    class CorrelationCongruence(_message.Message):
        __slots__ = ("kernel", "gamma", "max_p", "mode")
        KERNEL_FIELD_NUMBER: _ClassVar[int]
        GAMMA_FIELD_NUMBER: _ClassVar[int]
        MAX_P_FIELD_NUMBER: _ClassVar[int]
        MODE_FIELD_NUMBER: _ClassVar[int]
        kernel: CorrelationKernel
        gamma: float
        max_p: int
        mode: Formulation
        def __init__(self, kernel: _Optional[_Union[CorrelationKernel, str]] = ..., gamma: _Optional[float] = ..., max_p: _Optional[int] = ..., mode: _Optional[_Union[Formulation, str]] = ...) -> None: ...
    class Nst(_message.Message):
        __slots__ = ("degree", "c")
        DEGREE_FIELD_NUMBER: _ClassVar[int]
        C_FIELD_NUMBER: _ClassVar[int]
        degree: int
        c: float
        def __init__(self, degree: _Optional[int] = ..., c: _Optional[float] = ...) -> None: ...
    class Rkd(_message.Message):
        __slots__ = ("distance_weight", "angle_weight")
        DISTANCE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
        ANGLE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
        distance_weight: float
        angle_weight: float
        def __init__(self, distance_weight: _Optional[float] = ..., angle_weight: _Optional[float] = ...) -> None: ...
    class Kd(_message.Message):
        __slots__ = ("temperature",)
        TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
        temperature: float
        def __init__(self, temperature: _Optional[float] = ...) -> None: ...
    class Dist(_message.Message):
        __slots__ = ("beta", "gamma", "temperature")
        BETA_FIELD_NUMBER: _ClassVar[int]
        GAMMA_FIELD_NUMBER: _ClassVar[int]
        TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
        beta: float
        gamma: float
        temperature: float
        def __init__(self, beta: _Optional[float] = ..., gamma: _Optional[float] = ..., temperature: _Optional[float] = ...) -> None: ...
    class LogitStandardizedKd(_message.Message):
        __slots__ = ("temperature",)
        TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
        temperature: float
        def __init__(self, temperature: _Optional[float] = ...) -> None: ...
    class Response(_message.Message):
        __slots__ = ("hard_label_weight", "soft_label_weight", "soft_loss")
        HARD_LABEL_WEIGHT_FIELD_NUMBER: _ClassVar[int]
        SOFT_LABEL_WEIGHT_FIELD_NUMBER: _ClassVar[int]
        SOFT_LOSS_FIELD_NUMBER: _ClassVar[int]
        hard_label_weight: float
        soft_label_weight: float
        soft_loss: Loss
        def __init__(self, hard_label_weight: _Optional[float] = ..., soft_label_weight: _Optional[float] = ..., soft_loss: _Optional[_Union[Loss, _Mapping]] = ...) -> None: ...
    MSE_FIELD_NUMBER: _ClassVar[int]
    COSINE_FIELD_NUMBER: _ClassVar[int]
    KL_DIVERGENCE_FIELD_NUMBER: _ClassVar[int]
    COMBINED_KL_MSE_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_PRESERVING_FIELD_NUMBER: _ClassVar[int]
    LINEAR_CKA_FIELD_NUMBER: _ClassVar[int]
    PKT_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_TRANSFER_FIELD_NUMBER: _ClassVar[int]
    CORRELATION_CONGRUENCE_FIELD_NUMBER: _ClassVar[int]
    NST_FIELD_NUMBER: _ClassVar[int]
    RKD_FIELD_NUMBER: _ClassVar[int]
    KD_FIELD_NUMBER: _ClassVar[int]
    DIST_FIELD_NUMBER: _ClassVar[int]
    LOGIT_STANDARDIZED_KD_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    mse: Loss.Mse
    cosine: Loss.Cosine
    kl_divergence: Loss.KlDivergence
    combined_kl_mse: Loss.CombinedKlMse
    similarity_preserving: Loss.SimilarityPreserving
    linear_cka: Loss.LinearCka
    pkt: Loss.Pkt
    attention_transfer: Loss.AttentionTransfer
    correlation_congruence: Loss.CorrelationCongruence
    nst: Loss.Nst
    rkd: Loss.Rkd
    kd: Loss.Kd
    dist: Loss.Dist
    logit_standardized_kd: Loss.LogitStandardizedKd
    response: Loss.Response
    reduction: Reduction
    def __init__(self, mse: _Optional[_Union[Loss.Mse, _Mapping]] = ..., cosine: _Optional[_Union[Loss.Cosine, _Mapping]] = ..., kl_divergence: _Optional[_Union[Loss.KlDivergence, _Mapping]] = ..., combined_kl_mse: _Optional[_Union[Loss.CombinedKlMse, _Mapping]] = ..., similarity_preserving: _Optional[_Union[Loss.SimilarityPreserving, _Mapping]] = ..., linear_cka: _Optional[_Union[Loss.LinearCka, _Mapping]] = ..., pkt: _Optional[_Union[Loss.Pkt, _Mapping]] = ..., attention_transfer: _Optional[_Union[Loss.AttentionTransfer, _Mapping]] = ..., correlation_congruence: _Optional[_Union[Loss.CorrelationCongruence, _Mapping]] = ..., nst: _Optional[_Union[Loss.Nst, _Mapping]] = ..., rkd: _Optional[_Union[Loss.Rkd, _Mapping]] = ..., kd: _Optional[_Union[Loss.Kd, _Mapping]] = ..., dist: _Optional[_Union[Loss.Dist, _Mapping]] = ..., logit_standardized_kd: _Optional[_Union[Loss.LogitStandardizedKd, _Mapping]] = ..., response: _Optional[_Union[Loss.Response, _Mapping]] = ..., reduction: _Optional[_Union[Reduction, str]] = ...) -> None: ...

class Labels(_message.Message):
    __slots__ = ("classes",)
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    classes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, classes: _Optional[_Iterable[int]] = ...) -> None: ...

class Layer(_message.Message):
    __slots__ = ("weight", "loss", "name")
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    weight: float
    loss: Loss
    name: str
    def __init__(self, weight: _Optional[float] = ..., loss: _Optional[_Union[Loss, _Mapping]] = ..., name: _Optional[str] = ...) -> None: ...

class LayerLoss(_message.Message):
    __slots__ = ("layer_index", "name", "loss", "weighted_loss", "student_gradient")
    LAYER_INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTED_LOSS_FIELD_NUMBER: _ClassVar[int]
    STUDENT_GRADIENT_FIELD_NUMBER: _ClassVar[int]
    layer_index: int
    name: str
    loss: float
    weighted_loss: float
    student_gradient: Tensor
    def __init__(self, layer_index: _Optional[int] = ..., name: _Optional[str] = ..., loss: _Optional[float] = ..., weighted_loss: _Optional[float] = ..., student_gradient: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ComputeLayerLossRequest(_message.Message):
    __slots__ = ("layers", "layer_index", "teacher", "student", "return_gradients", "gradient_output", "gradient_cuda_output", "labels")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    LAYER_INDEX_FIELD_NUMBER: _ClassVar[int]
    TEACHER_FIELD_NUMBER: _ClassVar[int]
    STUDENT_FIELD_NUMBER: _ClassVar[int]
    RETURN_GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_CUDA_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedCompositeFieldContainer[Layer]
    layer_index: int
    teacher: Tensor
    student: Tensor
    return_gradients: bool
    gradient_output: SharedMemoryRef
    gradient_cuda_output: CudaIpcRef
    labels: Labels
    def __init__(self, layers: _Optional[_Iterable[_Union[Layer, _Mapping]]] = ..., layer_index: _Optional[int] = ..., teacher: _Optional[_Union[Tensor, _Mapping]] = ..., student: _Optional[_Union[Tensor, _Mapping]] = ..., return_gradients: _Optional[bool] = ..., gradient_output: _Optional[_Union[SharedMemoryRef, _Mapping]] = ..., gradient_cuda_output: _Optional[_Union[CudaIpcRef, _Mapping]] = ..., labels: _Optional[_Union[Labels, _Mapping]] = ...) -> None: ...

class ComputeLayerLossResponse(_message.Message):
    __slots__ = ("layer_loss",)
    LAYER_LOSS_FIELD_NUMBER: _ClassVar[int]
    layer_loss: LayerLoss
    def __init__(self, layer_loss: _Optional[_Union[LayerLoss, _Mapping]] = ...) -> None: ...

class ComputeTotalLossRequest(_message.Message):
    __slots__ = ("layers", "teachers", "students", "return_gradients", "gradient_outputs", "gradient_cuda_outputs", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: Labels
        def __init__(self, key: _Optional[int] = ..., value: _Optional[_Union[Labels, _Mapping]] = ...) -> None: ...
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    TEACHERS_FIELD_NUMBER: _ClassVar[int]
    STUDENTS_FIELD_NUMBER: _ClassVar[int]
    RETURN_GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_CUDA_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedCompositeFieldContainer[Layer]
    teachers: _containers.RepeatedCompositeFieldContainer[Tensor]
    students: _containers.RepeatedCompositeFieldContainer[Tensor]
    return_gradients: bool
    gradient_outputs: _containers.RepeatedCompositeFieldContainer[SharedMemoryRef]
    gradient_cuda_outputs: _containers.RepeatedCompositeFieldContainer[CudaIpcRef]
    labels: _containers.MessageMap[int, Labels]
    def __init__(self, layers: _Optional[_Iterable[_Union[Layer, _Mapping]]] = ..., teachers: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., students: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., return_gradients: _Optional[bool] = ..., gradient_outputs: _Optional[_Iterable[_Union[SharedMemoryRef, _Mapping]]] = ..., gradient_cuda_outputs: _Optional[_Iterable[_Union[CudaIpcRef, _Mapping]]] = ..., labels: _Optional[_Mapping[int, Labels]] = ...) -> None: ...

class ComputeTotalLossResponse(_message.Message):
    __slots__ = ("total_loss", "layer_losses")
    TOTAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    LAYER_LOSSES_FIELD_NUMBER: _ClassVar[int]
    total_loss: float
    layer_losses: _containers.RepeatedCompositeFieldContainer[LayerLoss]
    def __init__(self, total_loss: _Optional[float] = ..., layer_losses: _Optional[_Iterable[_Union[LayerLoss, _Mapping]]] = ...) -> None: ...

class StreamConfig(_message.Message):
    __slots__ = ("layers", "return_gradients")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    RETURN_GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedCompositeFieldContainer[Layer]
    return_gradients: bool
    def __init__(self, layers: _Optional[_Iterable[_Union[Layer, _Mapping]]] = ..., return_gradients: _Optional[bool] = ...) -> None: ...

class StreamLossesRequest(_message.Message):
    __slots__ = ("config", "step_id", "teachers", "students", "gradient_outputs", "gradient_cuda_outputs", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: Labels
        def __init__(self, key: _Optional[int] = ..., value: _Optional[_Union[Labels, _Mapping]] = ...) -> None: ...
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    TEACHERS_FIELD_NUMBER: _ClassVar[int]
    STUDENTS_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_CUDA_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    config: StreamConfig
    step_id: int
    teachers: _containers.RepeatedCompositeFieldContainer[Tensor]
    students: _containers.RepeatedCompositeFieldContainer[Tensor]
    gradient_outputs: _containers.RepeatedCompositeFieldContainer[SharedMemoryRef]
    gradient_cuda_outputs: _containers.RepeatedCompositeFieldContainer[CudaIpcRef]
    labels: _containers.MessageMap[int, Labels]
    def __init__(self, config: _Optional[_Union[StreamConfig, _Mapping]] = ..., step_id: _Optional[int] = ..., teachers: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., students: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., gradient_outputs: _Optional[_Iterable[_Union[SharedMemoryRef, _Mapping]]] = ..., gradient_cuda_outputs: _Optional[_Iterable[_Union[CudaIpcRef, _Mapping]]] = ..., labels: _Optional[_Mapping[int, Labels]] = ...) -> None: ...

class StreamLossesResponse(_message.Message):
    __slots__ = ("step_id", "total_loss", "layer_losses", "error")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    TOTAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    LAYER_LOSSES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    total_loss: float
    layer_losses: _containers.RepeatedCompositeFieldContainer[LayerLoss]
    error: _status_pb2.Status
    def __init__(self, step_id: _Optional[int] = ..., total_loss: _Optional[float] = ..., layer_losses: _Optional[_Iterable[_Union[LayerLoss, _Mapping]]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetServerInfoResponse(_message.Message):
    __slots__ = ("version", "device", "device_description", "supported_dtypes", "supported_loss_kinds", "max_message_bytes", "shared_memory", "cuda_ipc")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    SUPPORTED_DTYPES_FIELD_NUMBER: _ClassVar[int]
    SUPPORTED_LOSS_KINDS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    CUDA_IPC_FIELD_NUMBER: _ClassVar[int]
    version: str
    device: str
    device_description: str
    supported_dtypes: _containers.RepeatedScalarFieldContainer[Dtype]
    supported_loss_kinds: _containers.RepeatedScalarFieldContainer[LossKind]
    max_message_bytes: int
    shared_memory: SharedMemoryInfo
    cuda_ipc: CudaIpcInfo
    def __init__(self, version: _Optional[str] = ..., device: _Optional[str] = ..., device_description: _Optional[str] = ..., supported_dtypes: _Optional[_Iterable[_Union[Dtype, str]]] = ..., supported_loss_kinds: _Optional[_Iterable[_Union[LossKind, str]]] = ..., max_message_bytes: _Optional[int] = ..., shared_memory: _Optional[_Union[SharedMemoryInfo, _Mapping]] = ..., cuda_ipc: _Optional[_Union[CudaIpcInfo, _Mapping]] = ...) -> None: ...

class SharedMemoryInfo(_message.Message):
    __slots__ = ("enabled", "directory", "key_prefix", "max_bytes", "max_regions", "socket")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    KEY_PREFIX_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_REGIONS_FIELD_NUMBER: _ClassVar[int]
    SOCKET_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    directory: str
    key_prefix: str
    max_bytes: int
    max_regions: int
    socket: str
    def __init__(self, enabled: _Optional[bool] = ..., directory: _Optional[str] = ..., key_prefix: _Optional[str] = ..., max_bytes: _Optional[int] = ..., max_regions: _Optional[int] = ..., socket: _Optional[str] = ...) -> None: ...

class CudaIpcInfo(_message.Message):
    __slots__ = ("enabled", "device_uuid")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    device_uuid: str
    def __init__(self, enabled: _Optional[bool] = ..., device_uuid: _Optional[str] = ...) -> None: ...

class SystemSharedMemory(_message.Message):
    __slots__ = ("key", "byte_size")
    KEY_FIELD_NUMBER: _ClassVar[int]
    BYTE_SIZE_FIELD_NUMBER: _ClassVar[int]
    key: str
    byte_size: int
    def __init__(self, key: _Optional[str] = ..., byte_size: _Optional[int] = ...) -> None: ...

class SealedSharedMemory(_message.Message):
    __slots__ = ("ticket", "byte_size")
    TICKET_FIELD_NUMBER: _ClassVar[int]
    BYTE_SIZE_FIELD_NUMBER: _ClassVar[int]
    ticket: str
    byte_size: int
    def __init__(self, ticket: _Optional[str] = ..., byte_size: _Optional[int] = ...) -> None: ...

class RegisterSharedMemoryRequest(_message.Message):
    __slots__ = ("system", "sealed")
    SYSTEM_FIELD_NUMBER: _ClassVar[int]
    SEALED_FIELD_NUMBER: _ClassVar[int]
    system: SystemSharedMemory
    sealed: SealedSharedMemory
    def __init__(self, system: _Optional[_Union[SystemSharedMemory, _Mapping]] = ..., sealed: _Optional[_Union[SealedSharedMemory, _Mapping]] = ...) -> None: ...

class RegisterSharedMemoryResponse(_message.Message):
    __slots__ = ("region", "byte_size")
    REGION_FIELD_NUMBER: _ClassVar[int]
    BYTE_SIZE_FIELD_NUMBER: _ClassVar[int]
    region: str
    byte_size: int
    def __init__(self, region: _Optional[str] = ..., byte_size: _Optional[int] = ...) -> None: ...

class UnregisterSharedMemoryRequest(_message.Message):
    __slots__ = ("region",)
    REGION_FIELD_NUMBER: _ClassVar[int]
    region: str
    def __init__(self, region: _Optional[str] = ...) -> None: ...

class UnregisterSharedMemoryResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetSharedMemoryStatusRequest(_message.Message):
    __slots__ = ("regions",)
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    regions: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, regions: _Optional[_Iterable[str]] = ...) -> None: ...

class SharedMemoryRegionStatus(_message.Message):
    __slots__ = ("region", "key", "byte_size", "calls_in_flight")
    REGION_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    BYTE_SIZE_FIELD_NUMBER: _ClassVar[int]
    CALLS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    region: str
    key: str
    byte_size: int
    calls_in_flight: int
    def __init__(self, region: _Optional[str] = ..., key: _Optional[str] = ..., byte_size: _Optional[int] = ..., calls_in_flight: _Optional[int] = ...) -> None: ...

class GetSharedMemoryStatusResponse(_message.Message):
    __slots__ = ("regions",)
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    regions: _containers.RepeatedCompositeFieldContainer[SharedMemoryRegionStatus]
    def __init__(self, regions: _Optional[_Iterable[_Union[SharedMemoryRegionStatus, _Mapping]]] = ...) -> None: ...
