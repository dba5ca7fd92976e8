"""torchdistill integration: ``DistillServiceLoss`` in configs, against a real server.

The references are torchdistill's own ``KDLoss`` (through torch autograd) and
:mod:`tests.torch_reference`, all in float64. The server computes in float64
too, so values and gradients agree to rounding: the tolerances below are
``1e-12`` relative (measured over 20 seeds: at most 2e-14, the KL's
difference of log-partition terms scaled by ``tau^2``), and for gradients
``1e-12`` of the largest element absolute, since small elements of
``softmax(s) - softmax(t)`` lose relative digits to cancellation in either
computation.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from distill_client import DistillClient, DistilLoss, InvalidArgument, Reduction, TeacherStudentMismatch
from tests.servers import InProcessServer
from tests.torch_reference import torch_loss

torch = pytest.importorskip("torch")
pytest.importorskip("torchdistill")
yaml = pytest.importorskip("yaml")
td = pytest.importorskip("distill_client.torchdistill")
registry = pytest.importorskip("torchdistill.losses.registry")
mid_level = pytest.importorskip("torchdistill.losses.mid_level")
main_util = pytest.importorskip("torchdistill.common.main_util")

RTOL = 1e-12


def assert_close(actual: Any, expected: Any) -> None:
    """Equal to ``RTOL``, elements far below the largest to ``RTOL`` of it (see the module docstring)."""
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=RTOL * float(expected.abs().max()))


def logits(shape: tuple[int, ...], seed: int = 0) -> tuple[Any, Any]:
    """Teacher and student logits, float64, the student near the teacher."""
    gen = torch.Generator().manual_seed(seed)
    teacher = 3 * torch.randn(shape, generator=gen, dtype=torch.float64)
    return teacher, teacher + torch.randn(shape, generator=gen, dtype=torch.float64)


def io(path: str, tensor: Any) -> dict[str, dict[str, Any]]:
    """An io dict as torchdistill's forward hooks fill it."""
    return {path: {"output": tensor}}


def kl_pair(tau: float, **extra: Any) -> dict[str, Any]:
    loss = {"kind": "kl_divergence", "temperature": tau, "reduction": "per_row"}
    return {"teacher": {"path": "fc"}, "student": {"path": "fc"}, "loss": loss, **extra}


def kd_loss(tau: float, alpha: float) -> Any:
    # alpha=None fails in KDLoss.__init__ (1 - None) unless beta is given; without targets any alpha
    # gives the soft term.
    return mid_level.KDLoss("fc", "output", "fc", "output", temperature=tau, alpha=alpha)


# --- The mapping onto torchdistill's KDLoss -------------------------------------------------------


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_per_row_kl_is_tau_squared_times_kdloss_soft_term(client: DistillClient, tau: float) -> None:
    teacher, student = logits((8, 10))
    local, remote = student.clone().requires_grad_(), student.clone().requires_grad_()
    soft = kd_loss(tau, alpha=0.5)(io("fc", local), io("fc", teacher))  # no targets: the batchmean KL
    soft.backward()
    with td.DistillServiceLoss({"logits": kl_pair(tau)}, client=client) as loss:
        value = loss(io("fc", remote), io("fc", teacher))
    value.backward()
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(tau**2 * soft.item(), rel=RTOL)
    assert_close(remote.grad, tau**2 * local.grad)


def test_4d_logits_need_the_class_axis_last_and_differ_by_the_positions_per_sample(client: DistillClient) -> None:
    tau, (n, c, h, w) = 2.0, (3, 5, 4, 6)
    teacher, student = logits((n, c, h, w))
    local, remote = student.clone().requires_grad_(), student.clone().requires_grad_()
    soft = kd_loss(tau, alpha=0.5)(io("fc", local), io("fc", teacher))
    soft.backward()
    # KDLoss: sum over N*H*W rows / N. Service: tau^2 * sum over N*H*W rows / (N*H*W).
    factor = tau**2 / (h * w)
    with td.DistillServiceLoss({"logits": kl_pair(tau, dim=1)}, client=client) as loss:
        value = loss(io("fc", remote), io("fc", teacher))
        value.backward()
        assert value.item() == pytest.approx(factor * soft.item(), rel=RTOL)
        assert_close(remote.grad, factor * local.grad)
    with td.DistillServiceLoss({"logits": kl_pair(tau)}, client=client) as loss:  # rows along W: another loss
        assert loss(io("fc", student), io("fc", teacher)).item() != pytest.approx(factor * soft.item(), rel=1e-3)


KD_WITH_ALPHA = """
key: 'WeightedSumLoss'
kwargs:
  sub_terms:
    ce:
      criterion: {key: 'CrossEntropyLoss', kwargs: {reduction: 'mean'}}
      criterion_wrapper:
        key: 'SimpleLossWrapper'
        kwargs:
          input: {is_from_teacher: false, module_path: 'fc', io: 'output'}
          target: {uses_label: true}
      weight: 0.3                      # alpha
    kd:
      criterion:
        key: 'DistillServiceLoss'
        kwargs:
          target: '{target}'
          client: {timeout: 60, transport: 'grpc'}
          feature_pairs:
            logits:
              teacher: {path: 'fc', io: 'output'}
              student: {path: 'fc', io: 'output'}
              loss: {kind: 'kl_divergence', temperature: 4.0, reduction: 'PER_ROW'}
      weight: 0.7                      # 1 - alpha
"""


@pytest.fixture
def build(server: InProcessServer) -> Iterator[Callable[[str], Any]]:
    """Build a high-level loss from YAML naming the server; its remote terms are closed afterwards."""
    built: list[Any] = []

    def make(text: str) -> Any:
        criterion = registry.get_high_level_loss(yaml.safe_load(text.replace("{target}", server.target)))
        built.append(criterion)
        return criterion

    yield make
    for criterion in built:
        for term, _weight in criterion.term_dict.values():
            if isinstance(term, td.DistillServiceLoss):
                term.close()


def test_kdloss_with_alpha_is_a_local_ce_term_plus_the_remote_term(build: Callable[[str], Any]) -> None:
    teacher, student = logits((8, 10))
    targets = torch.arange(8) % 10
    local, remote = student.clone().requires_grad_(), student.clone().requires_grad_()
    expected = kd_loss(4.0, alpha=0.3)(io("fc", local), io("fc", teacher), targets)
    expected.backward()
    criterion = build(KD_WITH_ALPHA)
    value = criterion({"student": io("fc", remote), "teacher": io("fc", teacher)}, {}, targets)
    value.backward()
    assert value.item() == pytest.approx(expected.item(), rel=RTOL)
    assert_close(remote.grad, local.grad)


# --- A config on two models --------------------------------------------------------------------

CONFIG = """
key: 'WeightedSumLoss'
kwargs:
  sub_terms:
    remote:
      criterion:
        key: 'DistillServiceLoss'
        kwargs:
          target: '{target}'
          stream: {stream}
          client: {timeout: 60}
          feature_pairs:
            hidden:
              teacher: {path: 'body', io: 'output'}
              student: {path: 'body', io: 'output'}
              loss: 'mse'
              weight: 0.75
            direction:
              teacher: {path: 'body', io: 'output'}
              student: {path: 'body', io: 'output'}
              loss: {kind: 'Cosine', reduction: 'per_row'}
              weight: -0.25
            logits:
              teacher: {path: 'fc', io: 'output'}
              student: {path: 'fc', io: 'output'}
              loss: {kind: 'combined', kl_weight: 0.6, mse_weight: 0.4, temperature: 3.0, reduction: 'per_row'}
      weight: 2.0
"""
# The pairs of CONFIG: (weight, loss, module path), for the local computation.
PAIRS = [
    (0.75, DistilLoss.mse(), "body"),
    (-0.25, DistilLoss.cosine(reduction=Reduction.PER_ROW), "body"),
    (1.0, DistilLoss.combined(0.6, 0.4, 3.0, reduction=Reduction.PER_ROW), "fc"),
]
TERM_WEIGHT = 2.0


class Net(torch.nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        with torch.random.fork_rng():  # seeded initial weights, the global generator untouched
            torch.manual_seed(seed)
            self.body = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh())
            self.fc = torch.nn.Linear(8, 5)
        self.double()

    def forward(self, x: Any) -> Any:
        return self.fc(self.body(x))


def hooked(model: Any, paths: list[str]) -> dict[str, dict[str, Any]]:
    """Forward hooks that fill an io dict as torchdistill's do (``{path: {'output': tensor}}``)."""
    io_dict: dict[str, dict[str, Any]] = {}
    modules = dict(model.named_modules())
    for path in paths:
        modules[path].register_forward_hook(lambda _m, _i, out, path=path: io_dict.__setitem__(path, {"output": out}))
    return io_dict


def local_total(student_io: dict[str, Any], teacher_io: dict[str, Any]) -> Any:
    return TERM_WEIGHT * sum(
        w * torch_loss(loss, teacher_io[path]["output"].detach(), student_io[path]["output"]) for w, loss, path in PAIRS
    )


def sgd_step(student: Any, loss_of: Callable[[], Any]) -> float:
    """One SGD step of ``student`` on ``loss_of()``; the loss's value."""
    optimiser = torch.optim.SGD(student.parameters(), lr=0.5)
    loss = loss_of()
    loss.backward()
    optimiser.step()
    return float(loss.item())


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_a_config_trains_the_student_as_the_local_loss_does(build: Callable[[str], Any], stream: bool) -> None:
    criterion = build(CONFIG.replace("{stream}", str(stream).lower()))
    teacher, student = Net(0), Net(1)
    twin = copy.deepcopy(student)
    teacher_io, student_io, twin_io = (hooked(model, ["body", "fc"]) for model in (teacher, student, twin))
    x = torch.randn(7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        teacher(x)
    student(x)
    twin(x)
    before = [p.detach().clone() for p in student.parameters()]

    remote = sgd_step(student, lambda: criterion({"student": student_io, "teacher": teacher_io}, {}, None))
    local = sgd_step(twin, lambda: local_total(twin_io, teacher_io))

    assert remote == pytest.approx(local, rel=RTOL)
    for after, reference, old in zip(student.parameters(), twin.parameters(), before, strict=True):
        assert not torch.equal(after, old)  # the step moved every parameter
        assert_close(after.detach() - old, reference.detach() - old)
    remote_term = criterion.term_dict["remote"][0]
    assert [layer.name for layer in remote_term.last.layers] == ["hidden", "direction", "logits"]


def test_a_batch_loss_config_is_torchdistills_own_loss_for_a_narrower_student(
    build: Callable[[str], Any],
) -> None:
    gen = torch.Generator().manual_seed(3)
    teacher = torch.randn(8, 64, generator=gen, dtype=torch.float64)  # 64 wide; the student 16: no adapter
    student = torch.randn(8, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    criterion = build(
        """
        key: WeightedSumLoss
        kwargs:
          sub_terms:
            sp:
              criterion:
                key: DistillServiceLoss
                kwargs:
                  target: '{target}'
                  feature_pairs:
                    hidden:
                      teacher: {path: h}
                      student: {path: h}
                      loss: {kind: similarity_preserving, normalization: L1}
              weight: 1.0
        """
    )
    remote = criterion({"student": io("h", student), "teacher": io("h", teacher)}, {}, None)
    (remote_grad,) = torch.autograd.grad(remote, student)
    spkd = mid_level.SPKDLoss(student_output_path="h", teacher_output_path="h", reduction="batchmean")
    local = spkd(io("h", student), io("h", teacher))
    (local_grad,) = torch.autograd.grad(local, student)
    assert remote.item() == pytest.approx(local.item(), rel=RTOL)
    assert_close(remote_grad, local_grad)
    with pytest.raises(InvalidArgument) as raised:
        td.loss_from_config({"kind": "rkd", "angle_weight": 0, "distance_weight": 0}, layer=2)
    assert (raised.value.field, raised.value.layer) == ("loss.angle_weight", 2) and "both 0" in str(raised.value)
    assert td.loss_from_config("linear_cka") == DistilLoss.linear_cka()


def test_kdloss_with_targets_is_one_remote_response_term(build: Callable[[str], Any]) -> None:
    teacher, student = logits((8, 10))
    targets = torch.arange(8) % 10
    student.requires_grad_(True)
    criterion = build(
        """
        key: WeightedSumLoss
        kwargs:
          sub_terms:
            kd:
              criterion:
                key: DistillServiceLoss
                kwargs:
                  target: '{target}'
                  feature_pairs:
                    logits:
                      teacher: {path: fc}
                      student: {path: fc}
                      loss:
                        kind: response
                        hard_label_weight: 0.3
                        soft_label_weight: 0.7
                        soft_loss: {kind: kl_divergence, temperature: 4.0}
              weight: 1.0
        """
    )
    remote = criterion({"student": io("fc", student), "teacher": io("fc", teacher)}, {}, targets)
    (remote_grad,) = torch.autograd.grad(remote, student)
    local = kd_loss(4.0, 0.3)(io("fc", student), io("fc", teacher), targets)
    (local_grad,) = torch.autograd.grad(local, student)
    assert remote.item() == pytest.approx(local.item(), rel=RTOL)
    assert_close(remote_grad, local_grad)
    with pytest.raises(InvalidArgument, match="passed no targets") as raised:
        criterion({"student": io("fc", student), "teacher": io("fc", teacher)}, {}, None)
    assert (raised.value.field, raised.value.layer) == ("feature_pairs.logits.loss", 0)


def test_torchdistill_describes_the_remote_term_on_one_line(
    build: Callable[[str], Any], server: InProcessServer
) -> None:
    description = str(build(CONFIG.replace("{stream}", "false")))
    assert "\n" not in description
    assert description.startswith(f"Loss = 2.0 * DistillServiceLoss(target={server.target!r}, stream=False, ")
    assert (
        "logits: 1.0 * DistilLoss.combined(0.6, 0.4, 3.0, reduction=Reduction.PER_ROW)"
        " on student['fc']['output'] vs teacher['fc']['output']"
    ) in description
    assert "direction: -0.25 * DistilLoss.cosine(reduction=Reduction.PER_ROW)" in description


# --- Errors ------------------------------------------------------------------------------------


def pairs_with(**changes: Any) -> dict[str, Any]:
    """Two pairs; ``changes`` replace keys of the second (``logits``), a None value removes one."""
    second = {key: value for key, value in {**kl_pair(2.0), **changes}.items() if value is not None}
    return {"hidden": {"teacher": {"path": "body"}, "student": {"path": "body"}, "loss": "mse"}, "logits": second}


def kl(**params: Any) -> dict[str, Any]:
    return {"kind": "kl_divergence", "temperature": 2.0, **params}


@pytest.mark.parametrize(
    ("pairs", "field", "words"),
    [
        (pairs_with(loss={"kind": "kld", "temperature": 2.0}), "loss.kind", ["'kld'", "'kl_divergence'", "'mse'"]),
        (pairs_with(loss="huber"), "loss", ["'huber'", "expected one of", "'cosine'"]),
        (pairs_with(loss="kl_divergence"), "loss", ["takes parameters", "temperature: ..."]),
        (pairs_with(loss=kl(temperature=0)), "loss.temperature", ["is 0.0", "expected a finite number > 0"]),
        (pairs_with(loss=kl(temperature=-2.5)), "loss.temperature", ["is -2.5", "> 0"]),
        (pairs_with(loss=kl(temperature=float("nan"))), "loss.temperature", ["is nan", "finite"]),
        (pairs_with(loss=kl(temperature="1e-3")), "loss.temperature", ["'1e-3' (type str)", "write 1.0e-3"]),
        (pairs_with(loss={"kind": "kl_divergence"}), "loss.temperature", ["is missing", "> 0"]),
        (pairs_with(loss=kl(reduction="rows")), "loss.reduction", ["'rows'", "'per_row'", "'flatten'"]),
        (pairs_with(loss={"kind": "mse", "temperature": 2.0}), "loss", ["'temperature'", "mse does not take"]),
        (pairs_with(loss=kl(kl_weight=0.5)), "loss", ["'kl_weight'", "kl_divergence does not take"]),
        (pairs_with(loss={"kind": "combined", "temperature": 2.0, "kl_weight": 1}), "loss.mse_weight", ["missing"]),
        (pairs_with(weight=True), "weight", ["True (type bool)", "a finite number"]),
        (pairs_with(student=None), "student", ["is missing"]),
        (pairs_with(student={"path": 3}), "student.path", ["3 (type int)", "a string"]),
        (pairs_with(teacher={"path": "fc", "io": "out", "extra": 1}), "teacher", ["'extra'"]),
        (pairs_with(dim=1.0), "dim", ["1.0 (type float)", "integer axis"]),
        (pairs_with(wieght=2.0), "", ["'wieght'", "a feature pair does not take"]),
    ],
    ids=[
        "unknown-kind",
        "unknown-kind-string",
        "kl-as-a-string",
        "zero-temperature",
        "negative-temperature",
        "nan-temperature",
        "string-temperature",
        "no-temperature",
        "unknown-reduction",
        "mse-with-a-temperature",
        "kl-with-a-kl-weight",
        "combined-without-mse-weight",
        "boolean-weight",
        "no-student",
        "numeric-path",
        "unknown-side-key",
        "float-dim",
        "unknown-pair-key",
    ],
)
def test_a_malformed_pair_is_named_with_its_layer_index_key_and_values(
    pairs: dict[str, Any], field: str, words: list[str]
) -> None:
    with pytest.raises(InvalidArgument) as raised:
        td.DistillServiceLoss(pairs, target="127.0.0.1:1")
    error = raised.value
    expected_field = "feature_pairs.logits" + (f".{field}" if field else "")
    assert (error.field, error.layer) == (expected_field, 1)
    assert str(error).startswith(f"{expected_field} (layer 1) ")
    for word in words:
        assert word in str(error)


@pytest.mark.parametrize(
    ("kwargs", "field", "words"),
    [
        ({"feature_pairs": {}}, "feature_pairs", ["{} (type dict)", "non-empty mapping"]),
        ({"feature_pairs": [kl_pair(2.0)]}, "feature_pairs", ["(type list)", "mapping of pair names"]),
        ({"feature_pairs": pairs_with(), "stream": "yes"}, "stream", ["'yes' (type str)"]),
        ({"feature_pairs": pairs_with(), "client": {"target": "x:1"}}, "client.target", ["loss's own target"]),
    ],
)
def test_a_malformed_loss_config_is_named(kwargs: dict[str, Any], field: str, words: list[str]) -> None:
    with pytest.raises(InvalidArgument) as raised:
        td.DistillServiceLoss(**kwargs)
    assert (raised.value.field, raised.value.layer) == (field, None)
    for word in words:
        assert word in str(raised.value)


def test_a_client_and_a_target_are_one_too_many(client: DistillClient) -> None:
    with pytest.raises(InvalidArgument, match="given with a client"):
        td.DistillServiceLoss(pairs_with(), client=client, target=client.target)


@pytest.fixture
def two_layers(client: DistillClient) -> Iterator[Any]:
    with td.DistillServiceLoss(pairs_with(dim=1), client=client) as loss:
        yield loss


def io_dicts() -> tuple[dict[str, Any], dict[str, Any]]:
    """Student and teacher io dicts that ``two_layers`` takes."""
    teacher, student = logits((4, 10))
    return {"body": {"output": student}, "fc": {"output": student}}, {
        "body": {"output": teacher},
        "fc": {"output": teacher},
    }


@pytest.mark.parametrize(
    ("fc", "field", "words"),
    [
        (None, "student.path", ["'fc'", "student's io dict lacks", "['body']", "forward_hook"]),
        ({"input": torch.ones(4, 10)}, "student.io", ["'output'", "student_io_dict['fc'] lacks", "['input']"]),
        ({"output": [torch.ones(4, 10)]}, "student", ["student_io_dict['fc']['output'], a list", "a tensor"]),
        ({"output": torch.ones(10)}, "dim", ["is 1", "1 axes", "shape (10,)"]),
    ],
    ids=["no-path", "no-io", "not-a-tensor", "dim-out-of-range"],
)
def test_io_dicts_without_the_tensors_are_named(
    two_layers: Any, fc: dict[str, Any] | None, field: str, words: list[str]
) -> None:
    student_io, teacher_io = io_dicts()
    del student_io["fc"]
    if fc is not None:
        student_io["fc"] = fc
    with pytest.raises(InvalidArgument) as raised:
        two_layers(student_io, teacher_io)
    assert (raised.value.field, raised.value.layer) == (f"feature_pairs.logits.{field}", 1)
    for word in words:
        assert word in str(raised.value)


def test_teacher_and_student_of_different_lengths_come_back_typed(two_layers: Any) -> None:
    student_io, teacher_io = io_dicts()
    student_io["fc"] = {"output": torch.ones(4, 12, dtype=torch.float64, requires_grad=True)}
    with pytest.raises(TeacherStudentMismatch) as raised:
        two_layers(student_io, teacher_io)
    assert (raised.value.teacher, raised.value.student, raised.value.layer) == (40, 48, 1)


# --- The registry ------------------------------------------------------------------------------


def test_importing_the_module_registers_the_loss() -> None:
    assert registry.MIDDLE_LEVEL_LOSS_DICT["DistillServiceLoss"] is td.DistillServiceLoss


def test_a_configs_dependencies_register_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # As a fresh process would: neither the module nor its registration there yet (both restored after).
    import distill_client

    monkeypatch.delitem(sys.modules, "distill_client.torchdistill")
    monkeypatch.delattr(distill_client, "torchdistill")
    monkeypatch.delitem(registry.MIDDLE_LEVEL_LOSS_DICT, "DistillServiceLoss")
    main_util.import_dependencies(yaml.safe_load("[{name: 'distill_client.torchdistill'}]"))
    registered = registry.MIDDLE_LEVEL_LOSS_DICT["DistillServiceLoss"]
    assert registered is sys.modules["distill_client.torchdistill"].DistillServiceLoss
    assert registered is not td.DistillServiceLoss  # the module was imported again, by the config


def test_closing_ends_its_stream_and_the_client_it_made(server: InProcessServer) -> None:
    teacher, student = logits((4, 10))
    with td.DistillServiceLoss({"logits": kl_pair(2.0)}, target=server.target, stream=True) as loss:
        loss(io("fc", student.requires_grad_()), io("fc", teacher)).backward()
        session = loss.remote._session
        assert session is not None and not session.closed
    assert session.closed
    with pytest.raises(ValueError, match="closed"):
        loss.remote.client.compute_total_loss([(1.0, DistilLoss.mse())], [teacher.numpy()], [teacher.numpy()])
