"""The PyTorch bridge and the training example, against a real server."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from distill_client import DeadlineExceeded, DistillClient, DistilLoss, Reduction, TeacherStudentMismatch
from distill_server.config import Limits, ServerConfig
from tests.devices import CUDA
from tests.servers import InProcessServer, eventually
from tests.torch_reference import torch_loss

torch = pytest.importorskip("torch")
bridge = pytest.importorskip("distill_client.torch")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "train_student.py"
LAYERS = [
    (0.5, DistilLoss.mse()),
    (-1.25, DistilLoss.cosine(reduction=Reduction.PER_ROW)),
    (2.0, DistilLoss.kl_divergence(3.0)),
    (1.0, DistilLoss.combined(0.3, 0.7, 2.0, reduction=Reduction.PER_ROW)),
]


def features(dtype: Any, device: str = "cpu") -> tuple[list[Any], list[Any]]:
    gen = torch.Generator().manual_seed(0)
    teachers = [torch.randn(4, 9, generator=gen, dtype=torch.float64) for _ in LAYERS]
    students = [(t + 0.5 * torch.randn(t.shape, generator=gen, dtype=torch.float64)) for t in teachers]
    return [t.to(dtype).to(device) for t in teachers], [s.to(dtype).to(device).requires_grad_() for s in students]


def local_total(teachers: list[Any], students: list[Any]) -> Any:
    return sum(
        w * torch_loss(loss, t.double(), s.double()) for (w, loss), t, s in zip(LAYERS, teachers, students, strict=True)
    )


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize(
    ("dtype", "rtol"),
    # The server computes in float64 and rounds the gradient once to the student's dtype.
    [("float64", 1e-10), ("float32", 1e-6), ("bfloat16", 2**-7)],
)
def test_backward_gives_the_local_gradients(client: DistillClient, stream: bool, dtype: str, rtol: float) -> None:
    torch_dtype = getattr(torch, dtype)
    teachers, students = features(torch_dtype)
    remote = bridge.RemoteDistillLoss(LAYERS, client=client, stream=stream)
    loss = remote(teachers, students)
    assert loss.dtype == (torch.float64 if dtype == "float64" else torch.float32)
    loss.backward()
    remote.close()

    local_students = [s.detach().double().requires_grad_() for s in students]
    expected = local_total(teachers, local_students)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    for s, ref in zip(students, local_students, strict=True):
        assert s.grad is not None and s.grad.dtype == torch_dtype
        torch.testing.assert_close(s.grad.double(), ref.grad, rtol=rtol, atol=rtol * float(ref.grad.abs().max()))


def test_gradients_flow_into_parameters_and_scale_with_the_upstream_gradient(client: DistillClient) -> None:
    layer = torch.nn.Linear(9, 9).double()
    teachers, _students = features(torch.float64)
    x = torch.randn(4, 9, dtype=torch.float64)
    remote = bridge.RemoteDistillLoss(LAYERS[:1], client=client)
    (3.0 * remote([teachers[0]], [layer(x)])).backward()
    remote_grad = layer.weight.grad.clone()
    layer.zero_grad()
    (3.0 * 0.5 * torch_loss(LAYERS[0][1], teachers[0], layer(x))).backward()
    torch.testing.assert_close(remote_grad, layer.weight.grad, rtol=1e-10, atol=1e-12)


def test_teachers_are_detached(client: DistillClient) -> None:
    teachers, students = features(torch.float32)
    teachers = [t.requires_grad_() for t in teachers]
    bridge.RemoteDistillLoss(LAYERS, client=client)(teachers, students).backward()
    assert all(t.grad is None for t in teachers)
    assert all(s.grad is not None for s in students)


def test_no_gradients_are_asked_for_without_autograd(client: DistillClient) -> None:
    teachers, students = features(torch.float32)
    remote = bridge.RemoteDistillLoss(LAYERS, client=client)
    with torch.no_grad():
        remote(teachers, [s.detach() for s in students])
    assert remote.last is not None and all(layer.gradient is None for layer in remote.last.layers)


def test_remote_errors_surface_typed(client: DistillClient) -> None:
    remote = bridge.RemoteDistillLoss([(1.0, DistilLoss.mse())], client=client)
    with pytest.raises(TeacherStudentMismatch):
        remote([torch.ones(3)], [torch.ones(4, requires_grad=True)])


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_tensors_come_back_on_their_device(client: DistillClient) -> None:
    teachers, students = features(torch.float32, device="cuda")
    bridge.RemoteDistillLoss(LAYERS, client=client)(teachers, students).backward()
    assert all(s.grad.device.type == "cuda" for s in students)


def test_the_example_trains_a_student(server: InProcessServer, tmp_path: Path) -> None:
    plot = tmp_path / "loss.png"
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--target", server.target, "--steps", "150", "--json", "--plot", str(plot)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.strip().splitlines()]
    # One line per step as it goes, then the summary.
    assert [line["step"] for line in lines[:-1]] == list(range(150))
    numbers = lines[-1]
    # Measured: the loss falls about 20x and the feature gap about 30x in 150 steps.
    assert numbers["last_loss"] < 0.2 * numbers["first_loss"]
    assert numbers["feature_gap_after"] < 0.2 * numbers["feature_gap_before"]
    assert plot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_the_example_teaches_a_narrower_student_with_no_adapter(server: InProcessServer) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--target", server.target, "--steps", "150", "--json", "--relational"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    # Measured: the loss falls about 12x and the linear CKA of the features rises from 0.43 to 0.97.
    assert numbers["last_loss"] < 0.3 * numbers["first_loss"]
    assert numbers["feature_cka_before"] < 0.6 and numbers["feature_cka_after"] > 0.9


def test_the_example_shows_a_progress_bar(server: InProcessServer) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--target", server.target, "--steps", "20"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "20/20" in result.stderr and "step/s" in result.stderr and "loss=" in result.stderr  # tqdm's bar
    assert result.stdout.startswith("loss ") and "feature gap" in result.stdout


def test_a_stream_that_fails_is_reopened(start_in_process: Callable[[ServerConfig], InProcessServer]) -> None:
    server = start_in_process(ServerConfig(port=0, device="cpu", limits=Limits(stream_idle_timeout=0.5)))
    teachers, students = features(torch.float32)

    def streams(code: str) -> float:
        return server.sample("distill_requests_total", rpc="StreamLosses", code=code)

    with DistillClient(server.target, timeout=10) as client:
        remote = bridge.RemoteDistillLoss(LAYERS, client=client, stream=True)
        first = remote(teachers, students)
        # The stream breaks: the server ends it once it has been idle too long.
        eventually(lambda: streams("DEADLINE_EXCEEDED") == 1, what="the server ending the idle stream")
        with pytest.raises(DeadlineExceeded, match="--stream-idle-timeout"):
            remote(teachers, students)
        again = remote(teachers, students)  # on a new stream
        assert again.item() == first.item()
        assert server.sample("distill_requests_in_flight", rpc="StreamLosses") == 1
        remote.close()
    eventually(lambda: server.sample("distill_requests_in_flight", rpc="StreamLosses") == 0, what="the stream closing")
    assert streams("DEADLINE_EXCEEDED") == 1


def test_as_a_context_manager_it_closes_its_stream_and_its_client(server: InProcessServer) -> None:
    t, s = torch.randn(4, 8), torch.randn(4, 8, requires_grad=True)
    with bridge.RemoteDistillLoss([(1.0, DistilLoss.mse())], target=server.target, stream=True) as remote:
        remote([t], [s]).backward()
        session = remote._session
        assert session is not None and not session.closed
    assert session.closed
    with pytest.raises(ValueError, match="closed"):  # its own client is closed too
        remote.client.compute_total_loss([(1.0, DistilLoss.mse())], [t.numpy()], [t.numpy()])
