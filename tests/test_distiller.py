"""RemoteFeatureDistiller's own behaviour: construction, weights, targets, its client."""

from __future__ import annotations

from typing import Any

import pytest

from distill_client import DistillClient, DistilLoss, RemoteFeatureDistiller
from tests import seed
from tests.servers import InProcessServer


def _distiller(spec: dict[str, Any]) -> RemoteFeatureDistiller:
    if spec["ctor"] == "uniform_mse":
        return RemoteFeatureDistiller.uniform_mse(spec["n_layers"], target="127.0.0.1:1")
    return RemoteFeatureDistiller.with_weights(spec["weights"], seed.loss(spec["loss"]), target="127.0.0.1:1")


WEIGHT_CASES = seed.cases(
    "FeatureDistiller.uniform_mse", "FeatureDistiller.with_weights", "FeatureDistiller.normalise_weights"
)


@pytest.mark.parametrize("case", WEIGHT_CASES, ids=seed.case_id)
def test_weights_match_the_reference(case: dict[str, Any]) -> None:
    if case["op"] == "FeatureDistiller.uniform_mse":
        spec = {"ctor": "uniform_mse", **case["args"]}
    elif case["op"] == "FeatureDistiller.with_weights":
        spec = {"ctor": "with_weights", **case["args"]}
    else:
        spec = case["distiller"]
    with _distiller(spec) as distiller:
        if case["op"] == "FeatureDistiller.normalise_weights":
            distiller.normalise_weights()
        weights = [w for w, _ in distiller.layers]
        assert distiller.n_layers() == case["result"]["n_layers"]
    # Weights are float64 here, so they match the float64 reference to rounding.
    assert weights == pytest.approx(case["result"]["ref64"], rel=1e-15)


def test_layers_share_the_loss() -> None:
    loss = DistilLoss.combined(0.5, 0.5, 2.0)
    with RemoteFeatureDistiller.with_weights([1.0, 2.0], loss, target="127.0.0.1:1") as d:
        assert d.layers == [(1.0, loss), (2.0, loss)]


def test_uniform_mse_of_zero_layers_is_empty() -> None:
    with RemoteFeatureDistiller.uniform_mse(0, target="127.0.0.1:1") as d:
        assert d.n_layers() == 0
    with pytest.raises(ValueError):
        RemoteFeatureDistiller.uniform_mse(-1)


def test_target_defaults_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISTILL_TARGET", raising=False)
    with RemoteFeatureDistiller.uniform_mse(1) as d:
        assert d.client.target == "localhost:50051"  # the documented default
    monkeypatch.setenv("DISTILL_TARGET", "10.1.2.3:7000")
    with RemoteFeatureDistiller.uniform_mse(1) as d:
        assert d.client.target == "10.1.2.3:7000"
    with RemoteFeatureDistiller.uniform_mse(1, target="h:1") as d:
        assert d.client.target == "h:1"


def test_a_given_client_is_used_and_not_closed(client: DistillClient) -> None:
    d = RemoteFeatureDistiller.uniform_mse(1, client=client)
    assert d.client is client
    assert d.compute_total_loss([[1.0, 3.0]], [[1.0, 1.0]]) == 2.0
    d.close()
    # The channel is still open: the same client still computes.
    assert client.compute_total_loss([(1.0, DistilLoss.mse())], [[1.0, 3.0]], [[1.0, 1.0]]).total == 2.0
    with pytest.raises(ValueError):
        RemoteFeatureDistiller.uniform_mse(2, client=client, target="x:1")


def test_a_client_the_distiller_made_is_closed_with_it(server: InProcessServer) -> None:
    d = RemoteFeatureDistiller.uniform_mse(1, target=server.target)
    assert d.compute_total_loss([[1.0, 3.0]], [[1.0, 1.0]]) == 2.0
    d.close()
    with pytest.raises(ValueError, match="closed channel"):
        d.client.server_info()


def test_loss_reprs_read_like_their_constructors() -> None:
    assert repr(DistilLoss.mse()) == "DistilLoss.mse()"
    assert repr(DistilLoss.kl_divergence(2.0)) == "DistilLoss.kl_divergence(2.0)"
    assert repr(DistilLoss.combined(0.3, 0.7, 4.0)) == "DistilLoss.combined(0.3, 0.7, 4.0)"


@pytest.mark.parametrize(
    "loss", [DistilLoss.mse(), DistilLoss.cosine(), DistilLoss.kl_divergence(0.5), DistilLoss.combined(1, -2, 3)]
)
def test_loss_proto_round_trip(loss: DistilLoss) -> None:
    assert DistilLoss.from_proto(loss.to_proto()) == loss
