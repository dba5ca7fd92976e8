"""Response distillation (the reference's ResponseDistiller) over real gRPC:
the reference's vectors, gradients against torch autograd, torchdistill's
KDLoss with targets, streams, the PyTorch bridge, and every refusal."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill.v1 import distill_pb2 as pb
from distill.v1 import distill_pb2_grpc as pb_grpc
from distill_client import (
    AsyncDistillClient,
    DimensionMismatch,
    DistillClient,
    DistilLoss,
    EmptyInput,
    InvalidArgument,
    LimitExceeded,
    NonFiniteInput,
    RemoteResponseDistiller,
    ShapeMismatch,
)
from distill_client.torch import RemoteDistillLoss
from distill_core import tensors, wire
from distill_core.errors import DistillError, from_rpc_error
from tests import seed
from tests.servers import InProcessServer, ServerProcess
from tests.test_e2e import raw_call

BALANCED = {"kind": "kl_divergence", "temperature": 4.0}


def distiller_of(spec: dict[str, Any], client: DistillClient) -> tuple[RemoteResponseDistiller, dict[str, Any], float]:
    """The reference distiller a case names, its soft loss spec and soft weight."""
    if spec["ctor"] == "balanced":
        return RemoteResponseDistiller.balanced(client=client), BALANCED, 0.5
    if spec["ctor"] == "pure_kl":
        soft = {"kind": "kl_divergence", "temperature": spec["temperature"]}
        return RemoteResponseDistiller.pure_kl(spec["temperature"], client=client), soft, 1.0
    soft_loss = seed.loss(spec["soft_loss"])
    distiller = RemoteResponseDistiller.new(
        soft_loss, spec["hard_label_weight"], spec["soft_label_weight"], client=client
    )
    return distiller, spec["soft_loss"], spec["soft_label_weight"]


@pytest.mark.parametrize(
    "case",
    seed.cases("ResponseDistiller.compute_loss", "ResponseDistiller.compute_batch_loss"),
    ids=seed.case_id,
)
def test_the_reference_vectors_over_the_wire(client: DistillClient, case: dict[str, Any]) -> None:
    distiller, soft, soft_weight = distiller_of(case["distiller"], client)
    args = case["args"]
    if case["op"] == "ResponseDistiller.compute_loss":
        student, teacher = seed.vector(args["student_logits"]), seed.vector(args["teacher_logits"])

        def compute() -> float:
            return distiller.compute_loss(student, teacher, args["hard_label"])
    else:
        student, teacher = seed.vector(args["student_batch"]), seed.vector(args["teacher_batch"])

        def compute() -> float:
            return distiller.compute_batch_loss(student, teacher, args["hard_labels"], args["n_classes"])

    result = case["result"]
    if result["type"] == "error":
        with pytest.raises(DistillError) as info:
            compute()
        seed.assert_seed_error(info.value, result)
    else:
        value, reference = compute(), result["ref64"]
        # The cross-entropy term is a log-sum-exp like KL: the soft term's tolerance covers it.
        assert abs(value - reference) <= seed.tolerance(reference, soft, soft_weight) + seed.KL_ATOL, value


def torch_response(teacher: torch.Tensor, student: torch.Tensor, labels: torch.Tensor, alpha: float, tau: float) -> Any:
    """Hinton et al.'s ``alpha * CE + (1 - alpha) * tau^2 * KL``, the mean over samples, for autograd."""
    kl = F.kl_div(F.log_softmax(student / tau, 1), F.log_softmax(teacher / tau, 1), log_target=True, reduction="sum")
    return alpha * F.cross_entropy(student, labels) + (1 - alpha) * tau**2 * kl / len(student)


def logits(batch: int = 16, classes: int = 10, seed_: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed_)
    teacher = 3 * torch.randn(batch, classes, generator=gen, dtype=torch.float64)
    student = teacher + torch.randn(batch, classes, generator=gen, dtype=torch.float64)
    return teacher, student, torch.randint(0, classes, (batch,), generator=gen)


@pytest.mark.parametrize("stream", [False, True])
def test_the_gradient_is_torch_autograds_through_the_bridge(client: DistillClient, stream: bool) -> None:
    teacher, student, labels = logits()
    alpha, tau = 0.3, 4.0
    student.requires_grad_(True)
    loss = DistilLoss.response(DistilLoss.kl_divergence(tau), alpha, 1 - alpha)
    with RemoteDistillLoss([(2.0, loss)], client=client, stream=stream) as remote:
        value = remote([teacher], [student], labels={0: labels})
        (remote_grad,) = torch.autograd.grad(value, student)
    expected = 2.0 * torch_response(teacher, student, labels, alpha, tau)
    (local_grad,) = torch.autograd.grad(expected, student)
    assert value.item() == pytest.approx(expected.item(), rel=1e-12)
    torch.testing.assert_close(remote_grad, local_grad, rtol=1e-10, atol=1e-13)


def test_float32_logits_agree_with_float64_to_their_rounding(client: DistillClient) -> None:
    teacher, student, labels = logits(batch=64, classes=100, seed_=1)
    loss = DistilLoss.response(DistilLoss.combined(0.5, 0.25, 2.0), 0.5, 0.5)
    exact = client.compute_total_loss([(1.0, loss)], [teacher.numpy()], [student.numpy()], gradients=True,
                                      labels={0: labels})  # fmt: skip
    low = client.compute_total_loss(
        [(1.0, loss)], [teacher.float().numpy()], [student.float().numpy()], gradients=True, labels={0: labels}
    )
    # float32 inputs are computed in float64: only the inputs' rounding (2^-24 relative) and the result's differ.
    assert low.total == pytest.approx(exact.total, rel=1e-6)
    assert low.layers[0].gradient.dtype == np.float32
    np.testing.assert_allclose(low.layers[0].gradient, exact.layers[0].gradient, rtol=1e-4, atol=1e-7)


def test_torchdistills_kdloss_with_targets_is_a_response_loss(client: DistillClient) -> None:
    mid_level = pytest.importorskip("torchdistill.losses.mid_level")
    teacher, student, labels = logits(batch=8, classes=5, seed_=2)
    student.requires_grad_(True)
    kd = mid_level.KDLoss("fc", "output", "fc", "output", temperature=3.0, alpha=0.2)
    expected = kd({"fc": {"output": student}}, {"fc": {"output": teacher}}, labels)
    (local_grad,) = torch.autograd.grad(expected, student)
    loss = DistilLoss.response(DistilLoss.kl_divergence(3.0), 0.2, 0.8)
    with RemoteDistillLoss([(1.0, loss)], client=client) as remote:
        value = remote([teacher], [student], labels={0: labels.tolist()})
        (remote_grad,) = torch.autograd.grad(value, student)
    assert value.item() == pytest.approx(expected.item(), rel=1e-12)
    torch.testing.assert_close(remote_grad, local_grad, rtol=1e-10, atol=1e-13)


def test_a_response_layer_beside_feature_layers(client: DistillClient) -> None:
    teacher, student, labels = logits(batch=4, classes=3)
    features = np.ones((4, 7), np.float32)
    layers = [(1.0, DistilLoss.mse()), (0.5, DistilLoss.response(DistilLoss.mse(), 1.0, 0.0))]
    result = client.compute_total_loss(
        layers, [features, teacher.numpy()], [2 * features, student.numpy()], labels={1: labels}
    )
    cross_entropy = F.cross_entropy(student, labels).item()
    assert result.layers[0].loss == 1.0 and result.layers[1].loss == pytest.approx(cross_entropy, rel=1e-13)
    assert result.total == pytest.approx(1.0 + 0.5 * cross_entropy, rel=1e-13)


def test_refusals_are_typed_and_name_the_field(client: DistillClient) -> None:
    teacher, student, labels = (x.numpy() for x in logits(batch=4, classes=3))
    layers = [(1.0, DistilLoss.response(DistilLoss.kl_divergence(2.0), 0.5, 0.5))]

    def refused(kind: type[DistillError], **kwargs: Any) -> DistillError:
        args = {"teachers": [teacher], "students": [student], "labels": {0: labels}} | kwargs
        with pytest.raises(kind) as info:
            client.compute_total_loss(layers, args["teachers"], args["students"], labels=args["labels"])
        return info.value

    missing = refused(InvalidArgument, labels=None)
    assert missing.field == "labels[0]" and "needs class labels" in missing.message
    count = refused(DimensionMismatch, labels={0: labels[:3]})
    assert (count.field, count.expected, count.got) == ("labels[0]", 4, 3)
    beyond = refused(DimensionMismatch, labels={0: [0, 1, 3, 0]})
    assert (beyond.field, beyond.expected, beyond.got) == ("labels[0][2]", 3, 4)
    negative = refused(InvalidArgument, labels={0: [0, -1, 0, 0]})
    assert negative.field == "labels[0][1]" and "-1" in negative.message
    shape = refused(ShapeMismatch, teachers=[teacher.reshape(2, 6)])
    assert shape.field == "students[0].shape"
    empty = refused(EmptyInput, students=[np.zeros((0, 3))], teachers=[np.zeros((0, 3))])
    assert empty.field == "students[0]"
    bad = student.copy()
    bad[1, 2] = np.inf
    assert refused(NonFiniteInput, students=[bad]).field == "students[0].data"
    other = refused(InvalidArgument, labels={0: labels, 1: labels})
    assert other.field == "labels[1]" and other.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(InvalidArgument, match="expected integer class labels") as floats:
        client.compute_total_loss(layers, [teacher], [student], labels={0: [0.5, 1.0, 0.0, 2.0]})
    assert floats.value.field == "labels[0]"
    with pytest.raises(InvalidArgument, match="takes no labels"):
        client.compute_total_loss([(1.0, DistilLoss.mse())], [teacher], [student], labels={0: labels})


def test_a_stream_step_carries_its_labels(client: DistillClient) -> None:
    teacher, student, labels = (x.numpy() for x in logits(batch=4, classes=3))
    layers = [(1.0, DistilLoss.response(DistilLoss.kl_divergence(1.0), 1.0, 0.0))]
    with client.stream(layers) as session:
        first = session.step([teacher], [student], labels={0: labels})
        with pytest.raises(InvalidArgument, match="needs class labels"):
            session.step([teacher], [student])  # the step fails; the stream goes on
        second = session.step([teacher], [student], labels={0: (labels + 1) % 3})
    assert first.total == pytest.approx(F.cross_entropy(torch.from_numpy(student), torch.from_numpy(labels)).item())
    assert second.total != first.total


@pytest.mark.parametrize(
    ("loss", "field", "words"),
    [
        (pb.Loss(response=pb.Loss.Response(hard_label_weight=1.0)), "layers[0].loss.response.soft_loss", "none"),
        (
            pb.Loss(response=pb.Loss.Response(soft_loss=pb.Loss(linear_cka=pb.Loss.LinearCka()))),
            "layers[0].loss.response.soft_loss",
            "linear_cka",
        ),
        (
            pb.Loss(response=pb.Loss.Response(soft_loss=pb.Loss(kl_divergence=pb.Loss.KlDivergence()))),
            "layers[0].loss.response.soft_loss.kl_divergence.temperature",
            "0.0",
        ),
        (
            pb.Loss(response=pb.Loss.Response(soft_label_weight=float("nan"), soft_loss=pb.Loss(mse=pb.Loss.Mse()))),
            "layers[0].loss.response.soft_label_weight",
            "nan",
        ),
    ],
    ids=["no-soft-loss", "batch-soft-loss", "zero-temperature", "nan-weight"],
)
def test_malformed_response_losses_name_the_field(
    server: InProcessServer, loss: pb.Loss, field: str, words: str
) -> None:
    logits_ = tensors.encode(np.ones((2, 3), np.float32))
    request = pb.ComputeTotalLossRequest(
        layers=[pb.Layer(weight=1.0, loss=loss)],
        teachers=[logits_],
        students=[logits_],
        labels={0: pb.Labels(classes=[0, 1])},
    )
    error = raw_call(server, request)
    assert type(error) is InvalidArgument and error.field == field and words in error.message, error


def test_the_distiller_mirrors_the_reference(client: DistillClient) -> None:
    distiller = RemoteResponseDistiller.balanced(client=client)
    assert distiller.loss == DistilLoss.response(DistilLoss.kl_divergence(4.0), 0.5, 0.5)
    assert repr(distiller).startswith("RemoteResponseDistiller(DistilLoss.kl_divergence(4.0), 0.5, 0.5")
    with pytest.raises(ValueError, match="either a client or a target"):
        RemoteResponseDistiller.pure_kl(1.0, client=client, target="x:1")
    with pytest.raises(InvalidArgument, match="soft loss"):
        RemoteResponseDistiller(DistilLoss.rkd(), 0.5, 0.5, client=client)


def test_labels_travel_with_the_async_client(server: InProcessServer, client: DistillClient) -> None:
    teacher, student, labels = (x.numpy() for x in logits(batch=6, classes=4, seed_=3))
    layers = [(1.0, DistilLoss.response(DistilLoss.kl_divergence(2.0), 0.4, 0.6))]

    async def main() -> tuple[Any, Any, Any]:
        async with AsyncDistillClient(server.target) as aio:
            total = await aio.compute_total_loss(layers, [teacher], [student], gradients=True, labels={0: labels})
            layer = await aio.compute_layer_loss(layers, 0, teacher, student, labels=labels)
            async with aio.stream(layers) as session:
                step = await session.step([teacher], [student], labels={0: labels})
            return total, layer, step

    total, layer, step = asyncio.run(main())
    expected = client.compute_total_loss(layers, [teacher], [student], gradients=True, labels={0: labels})
    assert total.total == layer.weighted_loss == step.total == expected.total
    np.testing.assert_array_equal(total.layers[0].gradient, expected.layers[0].gradient)


def test_labels_travel_with_tensors_in_shared_memory(server: InProcessServer, client: DistillClient) -> None:
    teacher, student, labels = (x.numpy() for x in logits(batch=6, classes=4, seed_=4))
    layers = [(1.0, DistilLoss.response(DistilLoss.mse(), 1.0, 1.0))]
    expected = client.compute_total_loss(layers, [teacher], [student], gradients=True, labels={0: labels})
    with DistillClient(server.target, transport="shm") as shared:
        got = shared.compute_total_loss(layers, [teacher], [student], gradients=True, labels={0: labels})
        with shared.stream(layers, gradients=True) as session:
            step = session.step([teacher], [student], labels={0: labels})
    assert got.total == step.total == expected.total
    np.testing.assert_array_equal(got.layers[0].gradient, expected.layers[0].gradient)
    np.testing.assert_array_equal(step.layers[0].gradient, expected.layers[0].gradient)


def test_a_flood_of_labels_is_refused_by_a_server_process(start_server: type[ServerProcess]) -> None:
    proc = start_server(["--device", "cpu"])
    flood = pb.ComputeTotalLossRequest(labels={0: pb.Labels(classes=[1] * (wire.MAX_LABEL_BYTES + 1))})
    with grpc.insecure_channel(proc.target) as channel:
        stub = pb_grpc.DistillServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ComputeTotalLoss(flood, timeout=30)
    error = from_rpc_error(info.value)
    assert isinstance(error, LimitExceeded) and error.field == "labels" and error.limit == wire.MAX_LABEL_BYTES
    with DistillClient(proc.target, timeout=10) as client:  # and it goes on serving
        teacher, student, labels = (x.numpy() for x in logits(batch=4, classes=3))
        loss = DistilLoss.response(DistilLoss.mse(), 1.0, 0.0)
        assert client.compute_total_loss([(1.0, loss)], [teacher], [student], labels={0: labels}).total > 0


def test_a_scalar_is_not_logits(client: DistillClient) -> None:
    loss = DistilLoss.response(DistilLoss.kl_divergence(2.0), 0.5, 0.5)
    with pytest.raises(ShapeMismatch) as info:
        client.compute_layer_loss([(1.0, loss)], 0, np.array(1.0, np.float32), np.array(2.0, np.float32), labels=[0])
    assert info.value.field == "student.shape" and "[classes]" in info.value.message


def test_labels_that_are_not_class_labels_are_refused_on_the_client(client: DistillClient) -> None:
    teacher, student, _ = (x.numpy() for x in logits(batch=2, classes=3))
    layers = [(1.0, DistilLoss.response(DistilLoss.mse(), 1.0, 0.0))]
    for labels, words in (
        ({-1: [0, 1]}, "expected layer indices from 0"),
        ({0: np.array([0, 2**63], np.uint64)}, "beyond int64"),
        ({0: [[0], [1]]}, "one label per sample"),
        ([0, 1], "mapping of layer index"),
        ({0: [True, False]}, "expected integer class labels"),
    ):
        with pytest.raises(InvalidArgument, match=words):
            client.compute_total_loss(layers, [teacher], [student], labels=labels)  # type: ignore[arg-type]


def test_numpy_numbers_are_options_and_lists_are_not() -> None:
    assert DistilLoss.nst(degree=np.int64(3), c=np.float32(0.5)) == DistilLoss.nst(degree=3, c=0.5)
    with pytest.raises(InvalidArgument, match="normalization is"):
        DistilLoss.similarity_preserving(normalization=["l2"])  # type: ignore[arg-type]
