"""CUDA IPC: tensors and gradient outputs in CUDA memory of a trainer on the
server's GPU (``Tensor.cuda_ipc``, ``gradient_cuda_outputs``).

- the contract: the proto's fields, a CPU server's refusals and what a
  malformed reference gets on any server, the flag, the client's choice of
  transport;
- on a GPU (``-m gpu``): a ``--device cuda`` server in a subprocess (a
  process cannot open the handles it exported) gives the CPU server's
  numbers for CuPy arrays and torch tensors, writes gradients into the
  client's device buffers, keeps no mapping after a call, and answers bad
  handles with errors while it goes on serving.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import ml_dtypes
import numpy as np
import pytest

from distill.v1 import distill_pb2 as pb
from distill_client import CudaIpcUnavailable, DistillClient, DistilLoss
from distill_client import cuda_ipc as client_ipc
from distill_core import cuda, errors, rpc, tensors, wire
from distill_core.errors import DistillError, from_rpc_error
from distill_server import cuda_ipc as server_ipc
from distill_server.cli import parse_args
from tests.devices import CUDA
from tests.reference import ALL_LOSSES
from tests.scraping import scrape
from tests.servers import InProcessServer, ServerProcess

ROOT = Path(__file__).resolve().parent.parent
OTHER_GPU = "GPU-00000000-0000-0000-0000-000000000000"
LAYERS = [(0.5, loss) for loss in ALL_LOSSES]
ULP = {
    np.dtype(np.float32): 2**-23,
    np.dtype(np.float16): 2**-10,
    np.dtype(ml_dtypes.bfloat16): 2**-7,
    np.dtype(np.float64): 2**-52,
}
"""One ulp of each dtype, relative: float64 gradients computed in another order
may differ in their last bits, which rounding to the dtype makes one ulp."""


def features(dtype: Any, seed: int = 0, shape: tuple[int, ...] = (8, 300)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = rng.normal(size=shape)
    return t.astype(dtype), (t + rng.normal(size=shape)).astype(dtype)


def assert_close_gradients(got: np.ndarray, expected: np.ndarray) -> None:
    """Equal within one ulp of their dtype (of the largest magnitude, for values near zero)."""
    assert got.dtype == expected.dtype and got.shape == expected.shape
    ulp = ULP[got.dtype]
    exact = expected.astype(np.float64)
    np.testing.assert_allclose(got.astype(np.float64), exact, rtol=ulp, atol=ulp * float(np.abs(exact).max()))


def call(channel: grpc.Channel, name: str, request: Any) -> Any:
    """One unary call; a failure as its DistillError."""
    method = rpc.RPCS[name]
    stub = channel.unary_unary(method.path, response_deserializer=method.response.FromString)
    payload = request if isinstance(request, bytes) else request.SerializeToString()
    try:
        return stub(payload, timeout=60)
    except grpc.RpcError as exc:
        raise from_rpc_error(exc) from None


def ipc_tensor(
    shape: tuple[int, ...] = (16,),
    dtype: int = pb.DTYPE_FLOAT32,
    handle: bytes = b"\1" * 64,
    offset: int = 0,
    byte_size: int | None = None,
    uuid: str = OTHER_GPU,
    **fields: Any,
) -> pb.Tensor:
    if byte_size is None:
        byte_size = math.prod(shape) * tensors.DTYPES[dtype].itemsize  # type: ignore[index]
    ref = pb.CudaIpcRef(handle=handle, offset=offset, byte_size=byte_size, device_uuid=uuid)
    return pb.Tensor(dtype=dtype, shape=shape, cuda_ipc=ref, **fields)


def ipc_ref(nbytes: int = 64, handle: bytes = b"\1" * 64, uuid: str = OTHER_GPU) -> pb.CudaIpcRef:
    return pb.CudaIpcRef(handle=handle, byte_size=nbytes, device_uuid=uuid)


def total_request(teachers: list[Any], students: list[Any], **fields: Any) -> bytes:
    config = [pb.Layer(weight=1.0, loss=DistilLoss.mse().to_proto()) for _ in teachers]
    return wire.build(pb.ComputeTotalLossRequest(layers=config, **fields), teachers=teachers, students=students)


@pytest.fixture
def channel(server: InProcessServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as channel:
        yield channel


# ------------------------------------------------------------------ the contract


def test_the_proto_has_the_cuda_ipc_fields_documented(tmp_path: Path) -> None:
    from tests.test_protos import _descriptor, _elements

    expected = {
        "CudaIpcRef.handle": (1, "bytes"),
        "CudaIpcRef.offset": (2, "uint64"),
        "CudaIpcRef.byte_size": (3, "uint64"),
        "CudaIpcRef.device_uuid": (4, "string"),
        "Tensor.cuda_ipc": (5, "CudaIpcRef"),
        "ComputeLayerLossRequest.gradient_cuda_output": (7, "CudaIpcRef"),
        "ComputeTotalLossRequest.gradient_cuda_outputs": (6, "CudaIpcRef"),
        "StreamLossesRequest.gradient_cuda_outputs": (6, "CudaIpcRef"),
        "GetServerInfoResponse.cuda_ipc": (8, "CudaIpcInfo"),
        "CudaIpcInfo.enabled": (1, "bool"),
        "CudaIpcInfo.device_uuid": (2, "string"),
    }
    for name, (number, kind) in expected.items():
        message, field = name.split(".")
        descriptor = pb.DESCRIPTOR.message_types_by_name[message].fields_by_name[field]
        shown = descriptor.message_type.name if descriptor.message_type else descriptor.type
        scalar = {descriptor.TYPE_BYTES: "bytes", descriptor.TYPE_UINT64: "uint64", descriptor.TYPE_STRING: "string"}
        scalar[descriptor.TYPE_BOOL] = "bool"
        assert (descriptor.number, scalar.get(shown, shown)) == (number, kind), name
        assert descriptor.is_repeated == name.endswith("outputs"), name
    proto = _descriptor(tmp_path)
    comments = {tuple(loc.path): loc.leading_comments for loc in proto.source_code_info.location}
    names = {name: path for path, name in _elements(proto).items()}
    for name in [*expected, "CudaIpcRef", "CudaIpcInfo"]:
        assert comments.get(names[name], "").strip(), f"{name} is undocumented"
    text = (ROOT / "protos" / "distill" / "v1" / "distill.proto").read_text()
    assert "CUDA_IPC_UNAVAILABLE" in text and "OUT_OF_RANGE when `offset + byte_size`" in text


def test_the_error_travels_with_its_reason_and_field() -> None:
    from distill_server.status import to_rich_status

    assert CudaIpcUnavailable.reason == "CUDA_IPC_UNAVAILABLE"
    assert CudaIpcUnavailable.code is grpc.StatusCode.FAILED_PRECONDITION
    error = errors.from_rich_status(to_rich_status(CudaIpcUnavailable("off", field="teachers[0].cuda_ipc")))
    assert type(error) is CudaIpcUnavailable and error.field == "teachers[0].cuda_ipc"


def test_a_cpu_server_says_it_takes_no_cuda_memory(channel: grpc.Channel, server: InProcessServer) -> None:
    info = call(channel, "GetServerInfo", pb.GetServerInfoRequest())
    assert info.HasField("cuda_ipc") and not info.cuda_ipc.enabled and info.cuda_ipc.device_uuid == ""
    with DistillClient(server.target) as client:
        assert client.server_info().cuda_ipc == client_ipc.CudaIpcInfo(False, "")


def test_a_cpu_server_refuses_cuda_memory_naming_the_field(channel: grpc.Channel) -> None:
    t = tensors.encode(np.ones(16, np.float32))
    with pytest.raises(CudaIpcUnavailable) as info:
        call(channel, "ComputeTotalLoss", total_request([t, ipc_tensor()], [t, t]))
    assert info.value.code is grpc.StatusCode.FAILED_PRECONDITION and info.value.field == "teachers[1].cuda_ipc"
    assert "CPU" in info.value.message
    request = pb.ComputeLayerLossRequest(layers=[pb.Layer(weight=1.0, loss=DistilLoss.mse().to_proto())])
    with pytest.raises(CudaIpcUnavailable) as info:
        call(channel, "ComputeLayerLoss", wire.build(request, teacher=t, student=ipc_tensor()))
    assert info.value.field == "student.cuda_ipc"
    with pytest.raises(CudaIpcUnavailable) as info:
        call(
            channel,
            "ComputeTotalLoss",
            total_request([t], [t], return_gradients=True, gradient_cuda_outputs=[ipc_ref()]),
        )
    assert info.value.field == "gradient_cuda_outputs[0]"
    assert call(channel, "ComputeTotalLoss", total_request([t], [t])).total_loss == 0.0  # and goes on


def test_malformed_cuda_references_are_invalid_on_any_server(channel: grpc.Channel) -> None:
    t = tensors.encode(np.ones(16, np.float32))
    shared = pb.SharedMemoryRef(region="r", byte_size=64)
    cases: list[tuple[pb.Tensor, str]] = [
        (ipc_tensor(handle=b"\1" * 10), "teachers[0].cuda_ipc.handle"),
        (ipc_tensor(byte_size=60), "teachers[0].cuda_ipc.byte_size"),
        (ipc_tensor(dtype=pb.DTYPE_FLOAT64, byte_size=64), "teachers[0].cuda_ipc.byte_size"),
        (ipc_tensor(offset=2), "teachers[0].cuda_ipc.offset"),
        (ipc_tensor(data=b"\0" * 64), "teachers[0]"),
        (ipc_tensor(shared_memory=shared), "teachers[0]"),
        (ipc_tensor(dtype=pb.DTYPE_UNSPECIFIED, byte_size=64), "teachers[0].dtype"),
    ]
    for teacher, field in cases:
        with pytest.raises(DistillError) as info:
            call(channel, "ComputeTotalLoss", total_request([teacher], [t]))
        assert type(info.value) is errors.InvalidArgument and info.value.field == field, info.value

    def gradients(**fields: Any) -> DistillError:
        with pytest.raises(DistillError) as info:
            call(channel, "ComputeTotalLoss", total_request([t, t], [t, t], **fields))
        assert type(info.value) is errors.InvalidArgument, info.value
        return info.value

    assert gradients(return_gradients=True, gradient_cuda_outputs=[ipc_ref()]).field == "gradient_cuda_outputs"
    assert "no gradients are asked for" in gradients(gradient_cuda_outputs=[ipc_ref(), ipc_ref()]).message
    both = gradients(return_gradients=True, gradient_cuda_outputs=[ipc_ref()] * 2, gradient_outputs=[shared] * 2)
    assert both.field == "gradient_cuda_outputs" and "one kind" in both.message
    short = gradients(return_gradients=True, gradient_cuda_outputs=[ipc_ref(), ipc_ref(nbytes=60)])
    assert short.field == "gradient_cuda_outputs[1].byte_size"
    assert gradients(return_gradients=True, gradient_cuda_outputs=[ipc_ref(), ipc_ref(handle=b"")]).field == (
        "gradient_cuda_outputs[1].handle"
    )
    request = pb.ComputeLayerLossRequest(
        layers=[pb.Layer(weight=1.0, loss=DistilLoss.mse().to_proto())],
        return_gradients=True,
        gradient_output=shared,
        gradient_cuda_output=ipc_ref(),
    )
    with pytest.raises(errors.InvalidArgument) as info:
        call(channel, "ComputeLayerLoss", wire.build(request, teacher=t, student=t))
    assert info.value.field == "gradient_cuda_output"
    assert call(channel, "ComputeTotalLoss", total_request([t], [t])).total_loss == 0.0


def test_the_flag_and_its_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_args([])[0].cuda_ipc is True
    assert parse_args(["--no-cuda-ipc"])[0].cuda_ipc is False
    monkeypatch.setenv("DISTILL_CUDA_IPC", "false")
    assert parse_args([])[0].cuda_ipc is False
    assert parse_args(["--cuda-ipc"])[0].cuda_ipc is True
    with pytest.raises(SystemExit):
        parse_args(["--cuda-ipc", "--no-cuda-ipc"])


def test_a_server_on_the_cpu_or_with_ipc_off_has_no_uuid() -> None:
    for ipc in (server_ipc.CudaIpc(None, True), server_ipc.CudaIpc(0, False)):
        assert not ipc.enabled and ipc.info() == pb.CudaIpcInfo(enabled=False, device_uuid="")


def test_gpu_uuids_are_printed_as_nvidia_smi_does() -> None:
    assert cuda.format_uuid(bytes.fromhex("0b42632abc5cf731724b6936a19c4b24")) == (
        "GPU-0b42632a-bc5c-f731-724b-6936a19c4b24"
    )
    with pytest.raises(ValueError, match="16 bytes"):
        cuda.format_uuid(b"\0" * 15)


def test_bfloat16_widens_exactly_and_rounds_to_nearest_even() -> None:
    bits = np.arange(1 << 16, dtype=np.uint16)
    widened = server_ipc.widen_bfloat16(np, bits)
    np.testing.assert_array_equal(
        widened.view(np.uint32), bits.view(ml_dtypes.bfloat16).astype(np.float32).view(np.uint32)
    )
    rng = np.random.default_rng(3)
    values = np.concatenate(
        [
            rng.normal(scale=10.0 ** rng.integers(-40, 38, 20_000), size=20_000).astype(np.float32),
            (bits.astype(np.uint32) << 16 | 0x8000).view(np.float32),  # every tie
            (bits.astype(np.uint32) << 16 | 0x7FFF).view(np.float32),
            np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, 3.4e38], np.float32),
        ]
    )
    out = np.empty(values.shape, np.uint16)
    overflowed = server_ipc.narrow_bfloat16(np, values, out)
    with np.errstate(invalid="ignore", over="ignore"):  # NaN and the overflows, on purpose
        expected = values.astype(ml_dtypes.bfloat16)
    finite = ~np.isnan(values)
    np.testing.assert_array_equal(out[finite], expected.view(np.uint16)[finite])
    assert np.isnan(out[~finite].view(ml_dtypes.bfloat16).astype(np.float32)).all()
    assert overflowed  # 3.4e38 and the largest finite floats round to infinity
    assert not server_ipc.narrow_bfloat16(np, np.array([1.5, -3e38], np.float32), np.empty(2, np.uint16))


def test_auto_never_uses_cuda_ipc_for_host_arrays(server: InProcessServer, monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*args: Any) -> Any:
        raise AssertionError("a host array went by CUDA IPC")

    monkeypatch.setattr(client_ipc, "export", never)
    monkeypatch.setattr(client_ipc, "device_array", never)
    monkeypatch.setattr(client_ipc.CudaIpc, "_probe", never)  # not even the server is asked
    t, s = features(np.float32)
    with DistillClient(server.target) as client:
        result = client.compute_total_loss(LAYERS, [t] * 4, [s] * 4, gradients=True)
        layer = client.compute_layer_loss(LAYERS, 0, t, s, gradients=True)
        with client.stream(LAYERS, gradients=True) as session:
            step = session.step([t] * 4, [s] * 4)
    assert all(isinstance(x.gradient, np.ndarray) for x in [*result.layers, *step.layers, layer])


class _OnDevice:
    """Something that says it is in CUDA memory (``__cuda_array_interface__``)."""

    __cuda_array_interface__ = property(lambda self: {"shape": (4,), "typestr": "<f4", "data": (1, False)})


def test_cuda_ipc_without_cuda_arrays_or_a_gpu_server_raises(server: InProcessServer) -> None:
    t = np.ones(4, np.float32)
    with DistillClient(server.target, transport="cuda_ipc") as client:
        with pytest.raises(CudaIpcUnavailable, match="not every tensor is in CUDA memory"):
            client.compute_total_loss(LAYERS[:1], [t], [t])
        with pytest.raises(CudaIpcUnavailable, match="takes no CUDA memory") as info:
            client.compute_layer_loss(LAYERS[:1], 0, _OnDevice(), _OnDevice())
        assert info.value.code is grpc.StatusCode.FAILED_PRECONDITION
        assert client.compute_total_loss([], [], []).total == 0.0  # nothing to send: nothing to refuse


# ------------------------------------------------------------------ on a GPU

on_a_gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device and CuPy")


@pytest.fixture(scope="module")
def gpu_server() -> Iterator[ServerProcess]:
    """A ``--device cuda`` server in another process: a process cannot open
    the CUDA IPC handles it exported itself."""
    running = ServerProcess(["--device", "cuda", "--metrics-port", "0"])
    yield running
    running.stop()


def _torch_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.gpu
@on_a_gpu
def test_gpu_cupy_arrays_by_handle_give_the_cpu_servers_numbers(
    gpu_server: ServerProcess, server: InProcessServer, dtype: Any
) -> None:
    import cupy

    pairs = [features(dtype, seed, shape=(64, 1000)) for seed in range(4)]
    teachers, students = [t for t, _ in pairs], [s for _, s in pairs]
    with DistillClient(server.target, transport="grpc") as on_cpu:
        expected = on_cpu.compute_total_loss(LAYERS, teachers, students, gradients=True)
        expected_layer = on_cpu.compute_layer_loss(LAYERS, 1, teachers[1], students[1], gradients=True)
    with DistillClient(gpu_server.target, transport="cuda_ipc") as client:
        info = client.server_info().cuda_ipc
        assert info is not None and info.enabled and info.device_uuid == cuda.device_uuid(0)
        device_t, device_s = [cupy.asarray(t) for t in teachers], [cupy.asarray(s) for s in students]
        result = client.compute_total_loss(LAYERS, device_t, device_s, gradients=True)
        layer = client.compute_layer_loss(LAYERS, 1, device_t[1], device_s[1], gradients=True)
        with client.stream(LAYERS, gradients=True) as session:
            step = session.step(device_t, device_s)
    assert result.total == pytest.approx(expected.total, rel=1e-10)
    assert step.total == pytest.approx(expected.total, rel=1e-10)
    assert layer.weighted_loss == pytest.approx(expected_layer.weighted_loss, rel=1e-10)
    pairs_of_results = [
        *zip(result.layers, expected.layers, strict=True),
        *zip(step.layers, expected.layers, strict=True),
    ]
    for got, want in [*pairs_of_results, (layer, expected_layer)]:
        assert isinstance(got.gradient, cupy.ndarray) and want.gradient is not None
        assert got.loss == pytest.approx(want.loss, rel=1e-10)
        assert_close_gradients(cupy.asnumpy(got.gradient), want.gradient)
    assert scrape(gpu_server)["distill_cuda_ipc_mappings"] == 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.gpu
@on_a_gpu
def test_gpu_torch_tensors_by_handle_and_the_bridge(
    gpu_server: ServerProcess, server: InProcessServer, dtype: str
) -> None:
    if not _torch_cuda():
        pytest.skip("needs torch with CUDA")
    import torch

    from distill_client.torch import RemoteDistillLoss, to_numpy

    wire_dtype = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
    pairs = [features(wire_dtype, seed, shape=(32, 500)) for seed in range(4)]
    with DistillClient(server.target, transport="grpc") as on_cpu:
        expected = on_cpu.compute_total_loss(LAYERS, [t for t, _ in pairs], [s for _, s in pairs], gradients=True)
    torch_dtype = getattr(torch, dtype)
    teachers = [torch.tensor(t.astype(np.float32)).to("cuda", torch_dtype) for t, _ in pairs]
    students = [torch.tensor(s.astype(np.float32)).to("cuda", torch_dtype).requires_grad_() for _, s in pairs]
    with DistillClient(gpu_server.target, transport="cuda_ipc") as client:
        result = client.compute_total_loss(LAYERS, teachers, [s.detach() for s in students], gradients=True)
        remote = RemoteDistillLoss(LAYERS, client=client)
        loss = remote(teachers, students)
        loss.backward()
    assert result.total == pytest.approx(expected.total, rel=1e-10)
    assert float(loss) == pytest.approx(expected.total, rel=1e-6)
    for got, student, want in zip(result.layers, students, expected.layers, strict=True):
        assert isinstance(got.gradient, torch.Tensor) and got.gradient.is_cuda and got.gradient.dtype == torch_dtype
        assert want.gradient is not None and student.grad is not None
        assert_close_gradients(to_numpy(got.gradient), want.gradient)
        assert_close_gradients(to_numpy(student.grad), want.gradient)


@pytest.mark.gpu
@on_a_gpu
def test_gpu_bfloat16_by_handle_over_the_protocol(gpu_server: ServerProcess, server: InProcessServer) -> None:
    """bfloat16 without torch: its bits in CuPy uint16 arrays, sent by hand."""
    import cupy

    t, s = features(ml_dtypes.bfloat16, shape=(16, 777))
    with DistillClient(server.target, transport="grpc") as on_cpu:
        expected = on_cpu.compute_total_loss(LAYERS, [t] * 4, [s] * 4, gradients=True)
    uuid = cuda.device_uuid(0)
    bits = [cupy.asarray(x.view(np.uint16)) for x in (t, s)]
    outputs = [cupy.empty(t.shape, cupy.uint16) for _ in LAYERS]

    def ref(array: Any) -> pb.CudaIpcRef:
        device = client_ipc.DeviceArray("cupy", array, 0, pb.DTYPE_BFLOAT16, array.shape, array.data.ptr, array.nbytes)
        return client_ipc.export(device, uuid)

    cupy.cuda.get_current_stream().synchronize()
    teacher, student = (pb.Tensor(dtype=pb.DTYPE_BFLOAT16, shape=t.shape, cuda_ipc=ref(b)) for b in bits)
    config = [pb.Layer(weight=w, loss=loss.to_proto()) for w, loss in LAYERS]
    refs = [ref(o) for o in outputs]
    request = pb.ComputeTotalLossRequest(layers=config, return_gradients=True, gradient_cuda_outputs=refs)
    with grpc.insecure_channel(gpu_server.target) as channel:
        payload = wire.build(request, teachers=[teacher] * 4, students=[student] * 4)
        response = call(channel, "ComputeTotalLoss", payload)
    assert response.total_loss == pytest.approx(expected.total, rel=1e-10)
    for message, output, sent, want in zip(response.layer_losses, outputs, refs, expected.layers, strict=True):
        assert message.student_gradient.cuda_ipc == sent and not message.student_gradient.data
        assert tuple(message.student_gradient.shape) == t.shape and want.gradient is not None
        assert_close_gradients(cupy.asnumpy(output).view(ml_dtypes.bfloat16), want.gradient)


@pytest.mark.gpu
@on_a_gpu
def test_gpu_no_mapping_outlives_its_call(start_server: type[ServerProcess]) -> None:
    import cupy

    proc = start_server(["--device", "cuda", "--workers", "1", "--metrics-port", "0"])
    pool = cupy.get_default_memory_pool()
    t, s = features(np.float32, shape=(1024, 8192))  # 32 MiB each

    def one_call(client: DistillClient) -> float:
        teacher, student = cupy.asarray(t), cupy.asarray(s)
        total = client.compute_total_loss(LAYERS, [teacher] * 4, [student] * 4, gradients=True).total
        del teacher, student
        pool.free_all_blocks()  # cudaFree: memory a mapping still held would not come back
        return total

    with DistillClient(proc.target, transport="cuda_ipc") as client:
        first = one_call(client)
        for _ in range(3):
            assert one_call(client) == first  # the server's pool has its size now
        free_before = cupy.cuda.runtime.memGetInfo()[0]
        totals = {one_call(client) for _ in range(20)}
        free_after = cupy.cuda.runtime.memGetInfo()[0]
    assert totals == {first}
    assert free_before - free_after < 256 << 20, (free_before, free_after)  # 20 calls held would be 2.5 GiB
    assert scrape(proc)["distill_cuda_ipc_mappings"] == 0


@pytest.mark.gpu
@on_a_gpu
def test_gpu_bad_handles_are_errors_and_the_server_goes_on(gpu_server: ServerProcess) -> None:
    import cupy

    uuid = cuda.device_uuid(0)
    array = cupy.ones(256, cupy.float32)
    device = client_ipc.device_array(array)
    assert device is not None
    good = client_ipc.export(device, uuid)
    freed = cupy.cuda.runtime.malloc(1 << 20)
    stale = client_ipc.export(client_ipc.DeviceArray("cupy", None, 0, pb.DTYPE_FLOAT32, (256,), freed, 1024), uuid)
    cupy.cuda.runtime.free(freed)
    cupy.cuda.get_current_stream().synchronize()

    def tensor(ref: pb.CudaIpcRef, **changes: Any) -> pb.Tensor:
        changed = pb.CudaIpcRef()
        changed.CopyFrom(ref)
        for name, value in changes.items():
            setattr(changed, name, value)
        return pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[256], cuda_ipc=changed)

    with grpc.insecure_channel(gpu_server.target) as channel:
        ok = call(channel, "ComputeTotalLoss", total_request([tensor(good)], [tensor(good)]))
        assert ok.total_loss == 0.0
        with pytest.raises(CudaIpcUnavailable) as info:
            call(channel, "ComputeTotalLoss", total_request([tensor(good, device_uuid=OTHER_GPU)], [tensor(good)]))
        assert OTHER_GPU in info.value.message and uuid in info.value.message
        for bad in (tensor(stale), tensor(good, handle=bytes(64)), tensor(good, handle=bytes(range(64)))):
            with pytest.raises(CudaIpcUnavailable) as info:
                call(channel, "ComputeTotalLoss", total_request([bad], [tensor(good)]))
            assert "cannot be opened" in info.value.message
        with pytest.raises(errors.OutOfRange):
            call(channel, "ComputeTotalLoss", total_request([tensor(good, offset=1 << 40)], [tensor(good)]))
        assert call(channel, "ComputeTotalLoss", total_request([tensor(good)], [tensor(good)])).total_loss == 0.0
    assert scrape(gpu_server)["distill_cuda_ipc_mappings"] == 0
    del array


@pytest.mark.gpu
@on_a_gpu
def test_gpu_auto_and_a_server_with_ipc_off(start_server: type[ServerProcess], gpu_server: ServerProcess) -> None:
    import cupy

    t, s = (cupy.asarray(x) for x in features(np.float32))
    with DistillClient(gpu_server.target) as auto:  # transport="auto": by handle
        by_handle = auto.compute_total_loss(LAYERS, [t] * 4, [s] * 4, gradients=True)
    assert all(isinstance(layer.gradient, cupy.ndarray) for layer in by_handle.layers)
    off = start_server(["--device", "cuda", "--no-cuda-ipc"])
    with DistillClient(off.target) as auto, DistillClient(off.target, transport="cuda_ipc") as strict:
        info = auto.server_info().cuda_ipc
        assert info is not None and not info.enabled
        copied = auto.compute_total_loss(LAYERS, [t] * 4, [s] * 4, gradients=True)  # through the host
        with pytest.raises(CudaIpcUnavailable):
            strict.compute_total_loss(LAYERS, [t] * 4, [s] * 4)
    assert copied.total == pytest.approx(by_handle.total, rel=1e-12)
    assert all(isinstance(layer.gradient, np.ndarray) for layer in copied.layers)
