"""Deployment files: Kubernetes manifests against the Kubernetes schemas,
the compose file and the Dockerfile checked for what matters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifests_match_the_kubernetes_schemas(path: Path) -> None:
    kubernetes_validate.validate(load(path), kubernetes_validate.latest_version(), strict=True)


def test_deployment_requests_a_gpu_and_probes_grpc_health() -> None:
    deployment = load(ROOT / "deploy" / "k8s" / "deployment.yaml")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"cpu", "memory"} <= set(container["resources"]["limits"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == 50051
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"grpc": 50051, "metrics": 9090}
    mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
    assert container["securityContext"]["readOnlyRootFilesystem"] and "/tmp" in mounts  # CuPy's cache


def flag(container: dict[str, Any], name: str) -> float:
    """A server flag's value in a container: its args, else its ``DISTILL_*`` env."""
    args = container.get("args", [])
    if name in args:
        return float(args[args.index(name) + 1])
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    return float(env["DISTILL_" + name.lstrip("-").upper().replace("-", "_")])


def test_deployment_drains_before_it_stops() -> None:
    """The kubelet waits for the drain delay, then the grace, then the exit,
    before it kills the pod."""
    pod = load(ROOT / "deploy" / "k8s" / "deployment.yaml")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    drain, grace = flag(container, "--drain-delay"), flag(container, "--grace")
    assert drain >= 1  # clients and endpoints have time to leave the replica
    assert pod["terminationGracePeriodSeconds"] >= drain + grace + 5
    assert "preStop" not in container.get("lifecycle", {})  # --drain-delay is the preStop sleep


def test_service_is_headless_for_client_side_balancing() -> None:
    service = load(ROOT / "deploy" / "k8s" / "service.yaml")
    assert service["spec"]["clusterIP"] == "None"
    assert (
        service["spec"]["selector"]
        == load(ROOT / "deploy" / "k8s" / "deployment.yaml")["spec"]["selector"]["matchLabels"]
    )


def test_autoscaler_targets_the_deployment() -> None:
    hpa = load(ROOT / "deploy" / "k8s" / "hpa.yaml")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "distill"}
    assert hpa["spec"]["minReplicas"] >= 2


def test_compose_file() -> None:
    service = load(ROOT / "docker-compose.yml")["services"]["distill"]
    assert "50051:50051" in service["ports"]
    assert service["healthcheck"]["test"][1] == "distill-probe"
    assert service["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    environment = service["environment"]
    drain, grace = float(environment["DISTILL_DRAIN_DELAY"]), float(environment["DISTILL_GRACE"])
    stop_grace = service["stop_grace_period"]
    assert stop_grace.endswith("s") and float(stop_grace[:-1]) >= drain + grace + 5


def test_dockerfile_is_multi_stage_non_root_and_health_checked() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert text.count("\nFROM ") + text.startswith("FROM ") >= 2
    assert "COPY --from=build" in text
    assert "USER 10001" in text and "EXPOSE 50051" in text
    assert "HEALTHCHECK" in text and "distill-probe" in text
    assert "DISTILL_HOST=0.0.0.0" in text and "DISTILL_DEVICE=auto" in text
    assert 'ENTRYPOINT ["distill-server"]' in text  # flags would override DISTILL_* set at run time
    assert "CUPY_CACHE_DIR=/tmp/cupy" in text
