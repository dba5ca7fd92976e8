"""End to end: the real server (in this process), driven over loopback gRPC."""

from __future__ import annotations

import math
import threading
from typing import Any

import grpc
import ml_dtypes
import numpy as np
import pytest

import distill_server
from distill.v1 import distill_pb2 as pb
from distill.v1 import distill_pb2_grpc as pb_grpc
from distill_client import (
    DimensionMismatch,
    DistillClient,
    DistilLoss,
    InvalidArgument,
    LayerIndexOutOfRange,
    LossKind,
    NonFiniteInput,
    Reduction,
    RemoteFeatureDistiller,
    ShapeMismatch,
)
from distill_core import tensors
from distill_core.errors import DistillError, from_rpc_error
from tests import seed
from tests.reference import ALL_LOSSES, reference
from tests.servers import InProcessServer

# ---------------------------------------------------------------- seed vectors


LOSS_CASES = seed.cases("DistilLoss.compute")


@pytest.mark.parametrize("case", LOSS_CASES, ids=seed.case_id)
def test_seed_loss_cases_over_the_wire(client: DistillClient, case: dict[str, Any]) -> None:
    loss = seed.loss(case["loss"])
    t, s = (seed.vector(case["args"][k]) for k in ("teacher", "student"))
    distiller = RemoteFeatureDistiller([(1.0, loss)], client=client)
    result = case["result"]
    if result["type"] == "error":
        with pytest.raises(DistillError) as info:
            distiller.compute_layer_loss(0, t, s)
        seed.assert_seed_error(info.value, result)
    elif result["ref64"] is None:  # NaN or infinity in the inputs
        with pytest.raises(NonFiniteInput) as info:
            distiller.compute_layer_loss(0, t, s)
        assert info.value.layer == 0
    else:
        value = distiller.compute_layer_loss(0, t, s)
        assert abs(value - result["ref64"]) <= seed.tolerance(result["ref64"], case["loss"]), value


@pytest.mark.parametrize(
    "case",
    seed.cases("FeatureDistiller.compute_layer_loss", "FeatureDistiller.compute_total_loss"),
    ids=seed.case_id,
)
def test_seed_distiller_cases_over_the_wire(client: DistillClient, case: dict[str, Any]) -> None:
    spec = seed.loss_of(case["distiller"])
    weights = seed.weights_of(case["distiller"])
    distiller = RemoteFeatureDistiller([(w, seed.loss(spec)) for w in weights], client=client)
    args = case["args"]
    if case["op"].endswith("compute_layer_loss"):
        call = lambda: distiller.compute_layer_loss(  # noqa: E731
            args["layer_index"], seed.vector(args["teacher"]), seed.vector(args["student"])
        )
        weight = weights[args["layer_index"]] if args["layer_index"] < len(weights) else 0.0
    else:
        call = lambda: distiller.compute_total_loss(  # noqa: E731
            [seed.vector(v) for v in args["teacher_feats"]], [seed.vector(v) for v in args["student_feats"]]
        )
        weight = sum(map(abs, weights))
    result = case["result"]
    if result["type"] == "error":
        with pytest.raises(DistillError) as info:
            call()
        seed.assert_seed_error(info.value, result)
    else:
        assert abs(call() - result["ref64"]) <= seed.tolerance(result["ref64"], spec, weight)


def test_layer_index_out_of_range_is_out_of_range_and_a_dimension_mismatch(client: DistillClient) -> None:
    distiller = RemoteFeatureDistiller.uniform_mse(2, client=client)
    with pytest.raises(LayerIndexOutOfRange) as info:
        distiller.compute_layer_loss(5, [1.0], [1.0])
    error = info.value
    assert isinstance(error, DimensionMismatch)
    assert error.code == grpc.StatusCode.OUT_OF_RANGE
    assert (error.expected, error.got, error.field) == (2, 6, "layer_index")
    assert isinstance(error.__cause__, grpc.RpcError)


# ------------------------------------------------------- the seed's unit tests


def test_seed_uniform_mse_layer_count(server: InProcessServer) -> None:
    with RemoteFeatureDistiller.uniform_mse(4, target=server.target) as d:
        assert d.n_layers() == 4
        assert [w for w, _ in d.layers] == [0.25] * 4  # 1 / 4, exact in float64
        assert all(loss == DistilLoss.mse() for _, loss in d.layers)


def test_seed_zero_loss_for_identical_features(client: DistillClient) -> None:
    d = RemoteFeatureDistiller.uniform_mse(2, client=client)
    feat = [1.0, 2.0, 3.0]
    assert d.compute_total_loss([feat, feat], [feat, feat]) == 0.0  # every difference is exactly 0


def test_seed_positive_loss_for_different_features(client: DistillClient) -> None:
    d = RemoteFeatureDistiller.uniform_mse(1, client=client)
    t, s = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]
    expected = reference(DistilLoss.mse(), np.array(t), np.array(s))  # 2 / 3
    # Computed in float64 as the reference is: equal to its last bits.
    assert d.compute_total_loss([t], [s]) == pytest.approx(expected, rel=1e-15)


def test_seed_layer_count_mismatch_error(client: DistillClient) -> None:
    d = RemoteFeatureDistiller.uniform_mse(2, client=client)
    feat = [1.0] * 4
    with pytest.raises(DimensionMismatch):
        d.compute_total_loss([feat, feat, feat], [feat, feat])


def test_seed_layer_index_out_of_range_error(client: DistillClient) -> None:
    d = RemoteFeatureDistiller.uniform_mse(2, client=client)
    with pytest.raises(DimensionMismatch):
        d.compute_layer_loss(5, [1.0] * 4, [1.0] * 4)


def test_seed_normalise_weights(client: DistillClient) -> None:
    d = RemoteFeatureDistiller.with_weights([2.0, 3.0, 5.0], DistilLoss.mse(), client=client)
    d.normalise_weights()
    assert [w for w, _ in d.layers] == pytest.approx([0.2, 0.3, 0.5], rel=1e-15)


def test_seed_with_weights_constructs_correctly(client: DistillClient) -> None:
    d = RemoteFeatureDistiller.with_weights([0.3, 0.7], DistilLoss.cosine(), client=client)
    assert d.layers == [(0.3, DistilLoss.cosine()), (0.7, DistilLoss.cosine())]


def test_seed_kl_feature_distillation(client: DistillClient) -> None:
    loss = DistilLoss.kl_divergence(2.0)
    d = RemoteFeatureDistiller.with_weights([1.0], loss, client=client)
    t, s = [0.1, 0.7, 0.2], [0.4, 0.4, 0.2]
    # The float32 inputs as the server receives them; KL through log-softmax, as the reference.
    expected = reference(loss, np.float32(t), np.float32(s))
    assert d.compute_total_loss([t], [s]) == pytest.approx(expected, rel=1e-12)


# ------------------------------------------------ kinds, dtypes, shapes, sizes


def features(shape: tuple[int, ...], dtype: Any, seed_: int, noise: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed_)
    t = rng.normal(size=shape).astype(np.float32)
    s = t + noise * rng.normal(size=shape).astype(np.float32)
    return t.astype(dtype), s.astype(dtype)


DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float64": np.float64}


@pytest.mark.parametrize("loss", ALL_LOSSES, ids=repr)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", [(1,), (257,), (8, 16), (2, 3, 5, 7)], ids=str)
def test_every_kind_dtype_and_shape(
    client: DistillClient, loss: DistilLoss, dtype: Any, shape: tuple[int, ...]
) -> None:
    t, s = features(shape, dtype, seed_=sum(shape))
    result = client.compute_layer_loss([(0.75, loss)], 0, t, s)
    # Inputs reach the server exactly in their dtype and are computed in
    # float64, so every dtype meets the same tolerance.
    expected = reference(loss, t, s)
    assert result.loss == pytest.approx(expected, rel=1e-11, abs=1e-14)
    assert result.weighted_loss == 0.75 * result.loss


def test_total_reports_every_layer(client: DistillClient) -> None:
    layers = [(w, loss) for w, loss in zip([0.5, -1.0, 0.0, 2.0], ALL_LOSSES, strict=True)]
    pairs = [features((3, 11 + i), np.float32, seed_=i) for i in range(4)]
    result = client.compute_total_loss(layers, [t for t, _ in pairs], [s for _, s in pairs], names=["a", "b", "c", "d"])
    assert [r.name for r in result.layers] == ["a", "b", "c", "d"]
    assert [r.index for r in result.layers] == [0, 1, 2, 3]
    for (weight, loss), (t, s), r in zip(layers, pairs, result.layers, strict=True):
        assert r.loss == pytest.approx(reference(loss, t, s), rel=1e-11)
        assert r.weighted_loss == weight * r.loss
    assert result.total == math.fsum(r.weighted_loss for r in result.layers)


def test_many_layers(client: DistillClient) -> None:
    rng = np.random.default_rng(7)
    n = 200
    layers = [(float(rng.uniform(-1, 2)), ALL_LOSSES[i % 4]) for i in range(n)]
    pairs = [features((int(rng.integers(1, 300)),), np.float32, seed_=i) for i in range(n)]
    total = RemoteFeatureDistiller(layers, client=client).compute_total_loss(
        [t for t, _ in pairs], [s for _, s in pairs]
    )
    expected = math.fsum(w * reference(loss, t, s) for (w, loss), (t, s) in zip(layers, pairs, strict=True))
    assert total == pytest.approx(expected, rel=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ALL_LOSSES, ids=repr)
def test_large_tensors(client: DistillClient, loss: DistilLoss) -> None:
    t, s = features((8, 1024, 1024), np.float32, seed_=11, noise=0.1)  # 2 x 32 MiB
    value = client.compute_layer_loss([(1.0, loss)], 0, t, s).loss
    assert value == pytest.approx(reference(loss, t, s), rel=1e-10)


def test_concurrent_calls_from_threads(client: DistillClient) -> None:
    failures: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for call in range(15):
                loss = ALL_LOSSES[(worker + call) % 4]
                t, s = features((50 + worker, 9), np.float32, seed_=worker * 100 + call)
                value = client.compute_total_loss([(1.0, loss)], [t], [s]).total
                assert value == pytest.approx(reference(loss, t, s), rel=1e-11, abs=1e-14)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures, failures
    assert not any(thread.is_alive() for thread in threads)


def test_server_info(client: DistillClient) -> None:
    info = client.server_info()
    assert info.device == "cpu"
    assert info.supported_dtypes == ["DTYPE_FLOAT32", "DTYPE_FLOAT16", "DTYPE_BFLOAT16", "DTYPE_FLOAT64"]
    assert info.supported_loss_kinds == list(LossKind)
    assert {LossKind.SIMILARITY_PRESERVING, LossKind.LINEAR_CKA, LossKind.PKT} <= set(info.supported_loss_kinds)
    assert info.max_message_bytes == 256 * 1024 * 1024
    assert info.version == distill_server.__version__


def test_dlpack_and_array_interface_inputs(client: DistillClient) -> None:
    class OnlyDlpack:
        def __init__(self, array: np.ndarray) -> None:
            self.array = array

        def __dlpack__(self, **kwargs: Any) -> Any:
            return self.array.__dlpack__(**kwargs)

        def __dlpack_device__(self) -> Any:
            return self.array.__dlpack_device__()

    class OnlyArray:
        def __init__(self, array: np.ndarray) -> None:
            self.array = array

        def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
            return self.array

    t, s = features((4, 6), np.float32, seed_=5)
    expected = client.compute_layer_loss([(1.0, ALL_LOSSES[2])], 0, t, s).loss
    assert client.compute_layer_loss([(1.0, ALL_LOSSES[2])], 0, OnlyDlpack(t), OnlyArray(s)).loss == expected


# ------------------------------------------- malformed requests, sent raw


def good_tensor() -> pb.Tensor:
    return tensors.encode(np.ones(4, np.float32))


def raw_call(server: InProcessServer, request: pb.ComputeTotalLossRequest) -> DistillError:
    with grpc.insecure_channel(server.target) as channel:
        try:
            pb_grpc.DistillServiceStub(channel).ComputeTotalLoss(request, timeout=30)
        except grpc.RpcError as exc:
            return from_rpc_error(exc)
    raise AssertionError("the request was accepted")


MSE = pb.Loss(mse=pb.Loss.Mse())


def layer(**kwargs: Any) -> pb.Layer:
    return pb.Layer(**{"weight": 1.0, "loss": MSE, **kwargs})


@pytest.mark.parametrize(
    ("request_", "field", "words"),
    [
        (
            pb.ComputeTotalLossRequest(
                layers=[layer()], teachers=[pb.Tensor(dtype=77, shape=[1], data=b"\0" * 4)], students=[good_tensor()]
            ),
            "teachers[0].dtype",
            "77",
        ),
        (
            pb.ComputeTotalLossRequest(
                layers=[layer()], teachers=[good_tensor()], students=[pb.Tensor(shape=[1], data=b"\0" * 4)]
            ),
            "students[0].dtype",
            "DTYPE_UNSPECIFIED",
        ),
        (
            pb.ComputeTotalLossRequest(
                layers=[layer()],
                teachers=[good_tensor()],
                students=[pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2, 2], data=b"\0" * 15)],
            ),
            "students[0].data",
            "15 bytes",
        ),
        (
            pb.ComputeTotalLossRequest(
                layers=[layer()],
                teachers=[pb.Tensor(dtype=pb.DTYPE_FLOAT16, shape=[-2, -2], data=b"\0" * 8)],
                students=[good_tensor()],
            ),
            "teachers[0].shape",
            "-2",
        ),
        (
            pb.ComputeTotalLossRequest(
                layers=[pb.Layer(weight=1.0)], teachers=[good_tensor()], students=[good_tensor()]
            ),
            "layers[0].loss",
            "no kind",
        ),
        (
            pb.ComputeTotalLossRequest(
                layers=[layer(weight=math.nan)], teachers=[good_tensor()], students=[good_tensor()]
            ),
            "layers[0].weight",
            "nan",
        ),
        (
            pb.ComputeTotalLossRequest(
                layers=[layer(loss=pb.Loss(kl_divergence=pb.Loss.KlDivergence()))],
                teachers=[good_tensor()],
                students=[good_tensor()],
            ),
            "layers[0].loss.kl_divergence.temperature",
            "0.0",
        ),
        (
            pb.ComputeTotalLossRequest(
                layers=[layer(loss=pb.Loss(combined_kl_mse=pb.Loss.CombinedKlMse(kl_weight=math.inf, temperature=1)))],
                teachers=[good_tensor()],
                students=[good_tensor()],
            ),
            "layers[0].loss.combined_kl_mse.kl_weight",
            "inf",
        ),
    ],
    ids=[
        "unknown-dtype",
        "unspecified-dtype",
        "byte-length",
        "negative-shape",
        "no-loss",
        "nan-weight",
        "zero-temperature",
        "inf-kl-weight",
    ],
)
def test_malformed_requests_name_the_field(
    server: InProcessServer, request_: pb.ComputeTotalLossRequest, field: str, words: str
) -> None:
    error = raw_call(server, request_)
    assert type(error) is InvalidArgument
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.field == field
    assert words in error.message


def test_negative_layer_index(server: InProcessServer) -> None:
    request = pb.ComputeLayerLossRequest(layers=[layer()], layer_index=-1, teacher=good_tensor(), student=good_tensor())
    with grpc.insecure_channel(server.target) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.DistillServiceStub(channel).ComputeLayerLoss(request, timeout=30)
    error = from_rpc_error(info.value)
    assert type(error) is InvalidArgument
    assert error.field == "layer_index"


@pytest.mark.parametrize("temperature", [0.0, -1.0, math.nan, math.inf])
def test_client_rejects_bad_temperatures_locally(temperature: float) -> None:
    with pytest.raises(InvalidArgument) as info:
        DistilLoss.kl_divergence(temperature)
    assert info.value.field == "kl_divergence.temperature"


# ------------------------------------------------ gradients, per-row, half precision


ROW_LOSSES = [
    DistilLoss.cosine(reduction=Reduction.PER_ROW),
    DistilLoss.kl_divergence(2.0, reduction=Reduction.PER_ROW),
    DistilLoss.combined(0.5, 0.5, 4.0, reduction=Reduction.PER_ROW),
]


@pytest.mark.parametrize("loss", ALL_LOSSES + ROW_LOSSES, ids=repr)
@pytest.mark.parametrize(
    ("dtype", "rtol"),
    # float64 end to end; otherwise one rounding of the float64 gradient to the student's dtype.
    [(np.float64, 1e-10), (np.float32, 2**-23), (np.float16, 2**-10), (ml_dtypes.bfloat16, 2**-7)],
    ids=["float64", "float32", "float16", "bfloat16"],
)
def test_gradients_over_the_wire(client: DistillClient, loss: DistilLoss, dtype: Any, rtol: float) -> None:
    from distill_server import engine

    t, s = features((3, 16), dtype, seed_=2)
    result = client.compute_total_loss([(0.5, loss), (1.5, loss)], [t, t], [s, s], gradients=True)
    _, exact = engine.evaluate(loss, t.astype(np.float64), s.astype(np.float64), 1.0)
    for weight, layer in zip([0.5, 1.5], result.layers, strict=True):
        assert layer.gradient is not None
        assert layer.gradient.dtype == np.dtype(dtype) and layer.gradient.shape == (3, 16)
        np.testing.assert_allclose(
            layer.gradient.astype(np.float64), weight * exact, rtol=rtol, atol=rtol * float(np.abs(exact).max())
        )
    single = client.compute_layer_loss([(0.5, loss), (1.5, loss)], 1, t, s, gradients=True)
    assert single.gradient is not None
    np.testing.assert_array_equal(single.gradient, result.layers[1].gradient)
    assert client.compute_layer_loss([(1.0, loss)], 0, t, s).gradient is None


@pytest.mark.parametrize("loss", ROW_LOSSES, ids=repr)
def test_per_row_over_the_wire(client: DistillClient, loss: DistilLoss) -> None:
    t, s = features((4, 2, 9), np.float32, seed_=8)
    flat = DistilLoss(loss.kind, loss.temperature, loss.kl_weight, loss.mse_weight)
    rows = [reference(flat, t.reshape(-1, 9)[r], s.reshape(-1, 9)[r]) for r in range(8)]
    if loss.kind is LossKind.COMBINED:
        kl = DistilLoss.kl_divergence(loss.temperature)
        rows = [loss.kl_weight * reference(kl, t.reshape(-1, 9)[r], s.reshape(-1, 9)[r]) for r in range(8)]
        expected = float(np.mean(rows)) + loss.mse_weight * reference(DistilLoss.mse(), t, s)
    else:
        expected = float(np.mean(rows))
    assert client.compute_layer_loss([(1.0, loss)], 0, t, s).loss == pytest.approx(expected, rel=1e-11)
    with pytest.raises(ShapeMismatch) as info:
        client.compute_layer_loss([(1.0, loss)], 0, t, s.reshape(8, 9))
    assert info.value.field == "student.shape" and info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_unknown_reduction_is_refused(server: InProcessServer) -> None:
    bad = pb.Layer(weight=1.0, loss=pb.Loss(cosine=pb.Loss.Cosine(), reduction=9))
    error = raw_call(
        server, pb.ComputeTotalLossRequest(layers=[bad], teachers=[good_tensor()], students=[good_tensor()])
    )
    assert type(error) is InvalidArgument and error.field == "layers[0].loss.reduction"


def test_one_tensor_for_a_layer_list_is_refused_before_sending(client: DistillClient) -> None:
    """An array where a list of layers is expected would send its rows as layers."""
    batch = np.ones((32, 8), np.float32)
    with pytest.raises(InvalidArgument, match=r"teachers is one tensor of shape \[32, 8\]"):
        client.compute_total_loss([(1.0, DistilLoss.mse())], batch, [batch])  # type: ignore[arg-type]
    assert client.compute_total_loss([(1.0, DistilLoss.mse())], [batch], [batch]).total == 0.0
