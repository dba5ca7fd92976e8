"""The batch losses (samples compared with samples, any widths) through the
whole service: the contract, the checks and the gradients, over real gRPC.

Their math against torchdistill, torch autograd and central differences is
in tests/test_relational.py; here the server must give exactly what that
math gives, in every transport, and refuse what it cannot compare.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill.v1 import distill_pb2 as pb
from distill_client import (
    DistillClient,
    DistilLoss,
    EmptyInput,
    InvalidArgument,
    LimitExceeded,
    NonFiniteInput,
    Reduction,
    ShapeMismatch,
)
from distill_client.torch import RemoteDistillLoss
from distill_core import tensors
from distill_server import engine, relational
from distill_server.config import ServerConfig
from tests.servers import InProcessServer, eventually
from tests.test_e2e import raw_call

MSE = [(1.0, DistilLoss.mse())]

BATCH_LOSSES = [
    DistilLoss.similarity_preserving(),
    DistilLoss.similarity_preserving(normalization="l1"),
    DistilLoss.linear_cka(),
    DistilLoss.pkt(),
    DistilLoss.pkt(eps=1e-3),
    DistilLoss.pkt(mode="code"),
    DistilLoss.attention_transfer(),
    DistilLoss.attention_transfer(p=3.0, mode="code"),
    DistilLoss.correlation_congruence(),
    DistilLoss.correlation_congruence(kernel="bilinear", mode="code"),
    DistilLoss.nst(),
    DistilLoss.nst(degree=1, c=1.0),
    DistilLoss.rkd(),
    DistilLoss.rkd(distance_weight=0.0),
]


def features(loss: DistilLoss, dtype: Any = np.float32, batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """A wider teacher than student: 32 and 12 features, or 16 and 6 channels of 4 x 4 maps."""
    rng = np.random.default_rng(7)
    if loss.kind.name in ("ATTENTION_TRANSFER", "NST"):
        shapes = (batch, 16, 4, 4), (batch, 6, 4, 4)
    else:
        shapes = (batch, 32), (batch, 12)
    return rng.normal(size=shapes[0]).astype(dtype), rng.normal(size=shapes[1]).astype(dtype)


def local(loss: DistilLoss, teacher: np.ndarray, student: np.ndarray) -> tuple[float, np.ndarray]:
    """The math module's float64 value and gradient, called directly."""
    value, grad = relational.LOSSES[loss.kind.name.lower()].evaluate(np, teacher, student, loss.params, True)
    return value, grad


@pytest.mark.parametrize("loss", BATCH_LOSSES, ids=repr)
def test_each_loss_round_trips_the_contract(loss: DistilLoss) -> None:
    message = loss.to_proto()
    assert DistilLoss.from_proto(pb.Loss.FromString(message.SerializeToString())) == loss
    assert eval(repr(loss), {"DistilLoss": DistilLoss}) == loss  # the repr is the constructor call
    assert loss.batched


@pytest.mark.parametrize("loss", BATCH_LOSSES, ids=repr)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_server_gives_the_math_exactly(client: DistillClient, loss: DistilLoss, dtype: Any) -> None:
    teacher, student = features(loss, dtype)
    value, grad = local(loss, teacher, student)
    result = client.compute_total_loss([(0.5, loss)], [teacher], [student], gradients=True)
    (layer,) = result.layers
    assert layer.loss == pytest.approx(value, rel=1e-13)  # the same float64 code, in another process' BLAS order
    assert result.total == pytest.approx(0.5 * value, rel=1e-13)
    assert layer.gradient is not None and layer.gradient.shape == student.shape and layer.gradient.dtype == dtype
    np.testing.assert_allclose(layer.gradient, (0.5 * grad).astype(dtype), rtol=1e-12 if dtype == np.float64 else 0)


LOGIT_LOSSES = [
    (DistilLoss.kd(4.0), (16, 10)),
    (DistilLoss.kd(2.0), (4, 10, 3, 3)),  # torchdistill's class axis 1, the KL summed over the positions
    (DistilLoss.dist(), (16, 10)),
    (DistilLoss.dist(beta=2.0, gamma=0.0, temperature=4.0), (1, 10)),
    (DistilLoss.logit_standardized_kd(), (16, 10)),
]


@pytest.mark.parametrize(("loss", "shape"), LOGIT_LOSSES, ids=lambda case: repr(case))
def test_the_server_gives_the_logit_math_exactly(client: DistillClient, loss: DistilLoss, shape: Any) -> None:
    rng = np.random.default_rng(5)
    teacher = (3 * rng.normal(size=shape)).astype(np.float32)
    student = teacher + rng.normal(size=shape).astype(np.float32)
    value, grad = local(loss, teacher, student)
    result = client.compute_total_loss([(0.5, loss)], [teacher], [student], gradients=True)
    assert result.layers[0].loss == pytest.approx(value, rel=1e-13)
    np.testing.assert_array_equal(result.layers[0].gradient, (0.5 * grad).astype(np.float32))


def test_logits_of_different_shapes_or_too_many_elements_are_refused(
    client: DistillClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ShapeMismatch) as info:
        client.compute_total_loss([(1.0, DistilLoss.kd(2.0))], [np.ones((4, 10))], [np.ones((4, 9))])
    assert info.value.field == "students[0].shape" and "10" in info.value.message and "9" in info.value.message
    monkeypatch.setattr(engine, "LOGITS_MAX_ELEMENTS", 30)
    with pytest.raises(LimitExceeded) as limit:
        client.compute_total_loss([(1.0, DistilLoss.dist())], [np.ones((4, 10))], [np.ones((4, 10))])
    assert (limit.value.limit, limit.value.got, limit.value.field) == (30, 40, "teachers[0]")


@pytest.mark.parametrize("loss", [BATCH_LOSSES[0], BATCH_LOSSES[6]], ids=repr)
def test_a_stream_and_a_layer_call_agree_with_a_total(client: DistillClient, loss: DistilLoss) -> None:
    teacher, student = features(loss)
    value, _ = local(loss, teacher, student)
    with client.stream([(2.0, loss)], gradients=True) as session:
        step = session.step([teacher], [student])
    assert step.total == pytest.approx(2 * value, rel=1e-13)
    layer = client.compute_layer_loss([(2.0, loss)], 0, teacher, student)
    assert layer.weighted_loss == pytest.approx(2 * value, rel=1e-13)


def sp_paper(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Similarity-preserving KD as the paper writes it, for autograd."""
    gram = [F.normalize(x.flatten(1) @ x.flatten(1).T, dim=1) for x in (teacher, student)]
    return ((gram[0] - gram[1]) ** 2).sum() / teacher.shape[0] ** 2


def test_a_narrower_student_trains_through_the_torch_bridge(client: DistillClient) -> None:
    torch.manual_seed(0)
    inputs = torch.randn(16, 10, dtype=torch.float64)
    teacher = torch.nn.Linear(10, 64, dtype=torch.float64)
    student = torch.nn.Linear(10, 8, dtype=torch.float64)
    with torch.no_grad():
        target = teacher(inputs)
    remote = RemoteDistillLoss([(1.0, DistilLoss.similarity_preserving())], client=client)
    loss = remote([target], [student(inputs)])
    loss.backward()
    remote_grads = [p.grad.clone() for p in student.parameters()]  # type: ignore[union-attr]
    student.zero_grad()
    expected = sp_paper(target, student(inputs))
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    for got, want in zip(remote_grads, (p.grad for p in student.parameters()), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        step = remote([target], [student(inputs)])
        step.backward()
        optimizer.step()
        losses.append(step.item())
    assert losses[-1] < 0.5 * losses[0]  # 8 features learn the 64-wide teacher's similarities


def test_a_batch_size_mismatch_is_a_shape_error(client: DistillClient) -> None:
    loss = DistilLoss.similarity_preserving()
    with pytest.raises(ShapeMismatch) as info:
        client.compute_total_loss([(1.0, loss)], [np.ones((8, 4), np.float32)], [np.ones((6, 4), np.float32)])
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert (info.value.layer, info.value.field) == (0, "students[0].shape")
    assert "8" in info.value.message and "6" in info.value.message


def test_attention_transfer_needs_equal_spatial_sizes(client: DistillClient) -> None:
    loss = DistilLoss.attention_transfer()
    teacher, student = np.ones((4, 8, 7, 7), np.float32), np.ones((4, 8, 14, 14), np.float32)
    with pytest.raises(ShapeMismatch) as info:
        client.compute_layer_loss([(1.0, loss)], 0, teacher, student)
    assert info.value.field == "student.shape" and "7" in info.value.message and "14" in info.value.message


def test_an_empty_student_and_non_finite_features_are_refused(client: DistillClient) -> None:
    loss = DistilLoss.linear_cka()
    with pytest.raises(EmptyInput) as empty:
        client.compute_total_loss([(1.0, loss)], [np.ones((4, 3), np.float32)], [np.ones((0, 3), np.float32)])
    assert empty.value.field == "students[0]"
    teacher, student = features(loss)
    student[3, 2] = np.nan
    with pytest.raises(NonFiniteInput) as bad:
        client.compute_total_loss([(1.0, loss)], [teacher], [student])
    assert (bad.value.field, bad.value.index) == ("students[0].data", 3 * 12 + 2)


def test_batches_beyond_the_limits_are_refused(client: DistillClient, monkeypatch: pytest.MonkeyPatch) -> None:
    loss = DistilLoss.similarity_preserving()
    limit = relational.MAX_BATCH["similarity_preserving"]
    big = np.zeros((limit + 1, 1), np.float32)
    with pytest.raises(LimitExceeded) as info:
        client.compute_total_loss([(1.0, loss)], [big], [big])
    assert (info.value.limit, info.value.got, info.value.field) == (limit, limit + 1, "teachers[0].shape")
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    monkeypatch.setattr(engine, "BATCH_MAX_ELEMENTS", 100)  # the in-process server's engine
    with pytest.raises(LimitExceeded) as info:
        client.compute_total_loss([(1.0, loss)], [np.ones((4, 25), np.float32)], [np.ones((4, 26), np.float32)])
    assert (info.value.limit, info.value.got, info.value.field) == (100, 104, "students[0]")


def test_options_out_of_range_are_refused_at_once() -> None:
    with pytest.raises(InvalidArgument, match="expected one of 'l2', 'l1'"):
        DistilLoss.similarity_preserving(normalization="l3")
    with pytest.raises(InvalidArgument, match="both 0") as both:
        DistilLoss.rkd(distance_weight=0, angle_weight=0)
    assert both.value.field == "rkd.angle_weight"
    with pytest.raises(InvalidArgument, match="from 1 to 8"):
        DistilLoss.nst(degree=9)
    with pytest.raises(InvalidArgument, match="eps is -1; expected a finite number > 0"):
        DistilLoss.pkt(eps=-1)
    with pytest.raises(InvalidArgument, match="p is nan; expected a number from 1 to 16"):
        DistilLoss.attention_transfer(p=float("nan"))
    with pytest.raises(InvalidArgument, match="first axis as the batch") as info:
        DistilLoss(DistilLoss.linear_cka().kind, reduction=Reduction.PER_ROW)
    assert info.value.field == "reduction"


@pytest.mark.parametrize(
    ("loss", "field", "words"),
    [
        (pb.Loss(pkt=pb.Loss.Pkt(eps=float("inf"))), "layers[0].loss.pkt.eps", "inf"),
        (pb.Loss(attention_transfer=pb.Loss.AttentionTransfer(p=-2)), "layers[0].loss.attention_transfer.p", "-2"),
        (pb.Loss(pkt=pb.Loss.Pkt(eps=0.0)), "layers[0].loss.pkt.eps", "0.0"),  # set to 0: not the default
        (pb.Loss(rkd=pb.Loss.Rkd(distance_weight=0, angle_weight=0)), "layers[0].loss.rkd.angle_weight", "both 0"),
        (pb.Loss(nst=pb.Loss.Nst(degree=100)), "layers[0].loss.nst.degree", "100"),
        (pb.Loss(attention_transfer=pb.Loss.AttentionTransfer(mode=7)), "layers[0].loss.attention_transfer.mode", "7"),
        (
            pb.Loss(similarity_preserving=pb.Loss.SimilarityPreserving(normalization=3)),
            "layers[0].loss.similarity_preserving.normalization",
            "3",
        ),
        (
            pb.Loss(linear_cka=pb.Loss.LinearCka(), reduction=pb.REDUCTION_PER_ROW),
            "layers[0].loss.reduction",
            "PER_ROW",
        ),
    ],
    ids=[
        "inf-eps",
        "negative-p",
        "zero-eps",
        "no-rkd-term",
        "huge-degree",
        "unknown-mode",
        "unknown-normalization",
        "per-row",
    ],
)
def test_malformed_batch_losses_name_the_field(server: InProcessServer, loss: pb.Loss, field: str, words: str) -> None:
    teacher = tensors.encode(np.ones((4, 3), np.float32))
    request = pb.ComputeTotalLossRequest(
        layers=[pb.Layer(weight=1.0, loss=loss)], teachers=[teacher], students=[teacher]
    )
    error = raw_call(server, request)
    assert type(error) is InvalidArgument and error.field == field and words in error.message, error


def test_unset_options_mean_the_defaults() -> None:
    loss = DistilLoss.from_proto(pb.Loss(pkt=pb.Loss.Pkt()))
    assert loss == DistilLoss.pkt(eps=1e-7)
    at = DistilLoss.from_proto(pb.Loss(attention_transfer=pb.Loss.AttentionTransfer()))
    assert at == DistilLoss.attention_transfer(p=2.0, mode="paper")
    rkd = DistilLoss.from_proto(pb.Loss(rkd=pb.Loss.Rkd(distance_weight=0.0)))  # set, so not the default 1
    assert rkd.params == {"distance_weight": 0.0, "angle_weight": 2.0}
    sp = DistilLoss.from_proto(pb.Loss(similarity_preserving=pb.Loss.SimilarityPreserving()))
    assert sp.params == {"normalization": "l2"}


def test_a_small_but_slow_batch_loss_does_not_stall_other_calls(
    start_in_process: Callable[[ServerConfig], InProcessServer],
) -> None:
    # 12 KB of RKD at its batch limit is ~10^7 angle terms: computed on the event loop it would
    # hold every other call until it ended; in the pool, a small call is answered meanwhile.
    server = start_in_process(ServerConfig(port=0))
    rng = np.random.default_rng(9)
    teacher = rng.normal(size=(256, 16)).astype(np.float16)
    student = rng.normal(size=(256, 8)).astype(np.float16)
    with DistillClient(server.target, timeout=60) as client:
        slow = threading.Thread(
            target=client.compute_total_loss,
            args=([(1.0, DistilLoss.rkd())], [teacher], [student]),
            kwargs={"gradients": True},
        )
        slow.start()
        eventually(lambda: server.server.servicer.active_calls == 1, what="the RKD call in flight")
        time.sleep(0.05)  # it is computing now (it takes about 0.5 s on two cores)
        assert client.compute_total_loss(MSE, [np.ones(3)], [np.zeros(3)]).total == 1.0
        assert slow.is_alive()  # answered while the batch loss still computes
        slow.join(60)


def test_nst_beyond_its_work_budget_is_refused(client: DistillClient, monkeypatch: pytest.MonkeyPatch) -> None:
    work, most = relational.MAX_WORK["nst"]
    assert work((8192, 2048, 1), (8192, 2048, 1)) > most  # 64 MiB of float16 within every size limit: refused
    assert work((256, 128, 8, 8), (256, 64, 8, 8)) < most  # a realistic pair of maps: taken
    teacher, student = np.ones((4, 8, 2, 2), np.float32), np.ones((4, 4, 2, 2), np.float32)
    monkeypatch.setitem(relational.MAX_WORK, "nst", (work, 100))
    with pytest.raises(LimitExceeded) as info:
        client.compute_total_loss([(1.0, DistilLoss.nst())], [teacher], [student])
    assert (info.value.limit, info.value.got) == (100, 4 * (64 + 16 + 32) * (4 + 40))
    assert info.value.field == "teachers[0].shape" and "multiply-adds" in info.value.message


@pytest.mark.parametrize(
    ("loss", "shape"), [(DistilLoss.dist(), (4, 5)), (DistilLoss.similarity_preserving(), (4, 5))], ids=repr
)
def test_an_infinity_a_softmax_would_hide_is_refused(client: DistillClient, loss: DistilLoss, shape: Any) -> None:
    teacher = np.ones(shape, np.float32)
    teacher[1, 2] = -np.inf  # DIST's softmax makes it a probability of 0: a finite, wrong loss
    with pytest.raises(NonFiniteInput) as info:
        client.compute_total_loss([(1.0, loss)], [teacher], [np.ones(shape, np.float32)])
    assert (info.value.field, info.value.index) == ("teachers[0].data", 7)
