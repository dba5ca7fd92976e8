"""Deployment files, checked for what they mean.

- Kubernetes: every kustomize target under deploy/k8s is rendered with
  ``kubectl kustomize``; each object is validated against the Kubernetes
  schemas and the rendered Deployment, PodDisruptionBudget, autoscaler and
  Service are checked against each other and against the server (its flags
  parse the container's environment; its memory budget fits the limit).
- The trainer-sidecar example (a Job, the server as a native sidecar, tensors
  through shared memory): rendered and validated the same way, checked for
  what shared memory needs (one /dev/shm, one uid, loopback), and its server
  configuration served to a client with ``transport="shm"``.
- The compose file, its optional trainer included.
- The Dockerfile is parsed into stages and instructions.
- ``distill-probe``, the image's health check, runs against real servers
  (in-process) with the environment a container would give it.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import numpy as np
import pytest
import yaml

from distill_client import DistillClient, DistilLoss
from distill_server import probe
from distill_server.admission import READ_COPIES
from distill_server.cli import parse_args
from distill_server.config import ServerConfig
from distill_server.metrics import Metrics
from distill_server.server import DistillServer
from tests.certs import Authority
from tests.scraping import scrape
from tests.servers import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
MIB = 1024 * 1024

# Every kustomize target, and what each must contain.
TARGETS = ["base", "overlays/gpu", "overlays/gpu-auth", "overlays/gpu-auth-tls"]
GPU = {"overlays/gpu", "overlays/gpu-auth", "overlays/gpu-auth-tls"}
AUTH = {"overlays/gpu-auth", "overlays/gpu-auth-tls"}
TLS = {"overlays/gpu-auth-tls"}
SIDECAR = "examples/trainer-sidecar"
"""A Job: a trainer with the server beside it as a native sidecar."""
EXAMPLES = [SIDECAR]
OLDEST_NATIVE_SIDECARS = "1.29.0"
"""The first Kubernetes release with native sidecars on by default."""

PROCESS_MARGIN_MIB = 1024
"""Memory for the server process itself, beyond what its limits let calls
hold (deploy/k8s/base/deployment.yaml explains the sum)."""


# Rendering.


@functools.cache
def render(target: str) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: its built-in kustomize renders deploy/k8s")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S / target)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


@pytest.fixture(params=TARGETS)
def target(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def one(objects: tuple[dict[str, Any], ...], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def pod_spec(target: str) -> dict[str, Any]:
    spec: dict[str, Any] = one(render(target), "Deployment")["spec"]["template"]["spec"]
    return spec


def container(target: str) -> dict[str, Any]:
    containers = pod_spec(target)["containers"]
    assert [c["name"] for c in containers] == ["distill"]
    return dict(containers[0])


def env(target: str) -> dict[str, str]:
    return container_env(container(target))


def quantity(text: str | int) -> int:
    """A Kubernetes quantity in bytes (or units): 10Gi, 512Mi, 1G, 4."""
    match = re.fullmatch(r"(\d+)([KMGT]i?)?", str(text))
    assert match, text
    number, suffix = int(match.group(1)), match.group(2) or ""
    power = "KMGT".index(suffix[0]) + 1 if suffix else 0
    return number * (1024 if suffix.endswith("i") else 1000) ** power


def mounted_secret(target: str, path: str) -> dict[str, Any]:
    """The Secret volume a file of the container comes from."""
    volumes = {v["name"]: v for v in pod_spec(target).get("volumes", [])}
    for mount in container(target).get("volumeMounts", []):
        if path.startswith(mount["mountPath"].rstrip("/") + "/"):
            volume = volumes[mount["name"]]
            assert "secret" in volume, f"{path} is not from a Secret"
            return dict(volume["secret"])
    raise AssertionError(f"{path} is on no volume")


def container_env(c: dict[str, Any]) -> dict[str, str]:
    entries = c.get("env", [])
    assert all("value" in e for e in entries), "settings are plain values (secrets come as files)"
    return {e["name"]: e["value"] for e in entries}


def parse_settings(
    settings: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> tuple[ServerConfig, Any]:
    """The server's configuration, parsed by its own CLI from a container's
    environment (over the image's), with a stand-in for the token file."""
    for name in list(os.environ):
        if name.startswith("DISTILL_"):
            monkeypatch.delenv(name)
    for name, value in {**dockerfile_env(), **settings}.items():
        if name == "DISTILL_AUTH_TOKEN_FILE":
            value = str(tmp_path / "token")
            Path(value).write_text("token\n")
        if name.startswith("DISTILL_"):  # not the image's PATH
            monkeypatch.setenv(name, value)
    return parse_args([])


@pytest.fixture
def server_config(target: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[ServerConfig, Any]:
    return parse_settings(env(target), monkeypatch, tmp_path)


# The rendered objects.


def test_every_target_and_component_is_rendered() -> None:
    kinds = {
        p.parent.relative_to(K8S).as_posix(): yaml.safe_load(p.read_text())["kind"]
        for p in K8S.rglob("kustomization.yaml")
    }
    assert sorted(d for d, k in kinds.items() if k == "Kustomization") == sorted(TARGETS + EXAMPLES)
    components = {(K8S / d).resolve() for d, k in kinds.items() if k == "Component"}
    used = {
        (K8S / t / c).resolve()
        for t in TARGETS
        for c in yaml.safe_load((K8S / t / "kustomization.yaml").read_text()).get("components", [])
    }
    assert components == used and len(components) == 3


def test_rendered_objects_match_the_kubernetes_schemas(target: str) -> None:
    objects = render(target)
    assert {o["kind"] for o in objects} == {
        "Namespace",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
    }
    for obj in objects:
        kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)


def test_image_comes_from_a_registry_at_the_project_version(target: str) -> None:
    image = container(target)["image"]
    repository, _, tag = image.rpartition(":")
    registry = repository.split("/")[0]
    assert "/" in repository and ("." in registry or registry == "localhost"), f"{image}: no registry"
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert version and tag == version.group(1), f"{image}: not the project's version"
    assert container(target)["imagePullPolicy"] == "IfNotPresent"


def test_pods_meet_the_restricted_pod_security_standard(target: str) -> None:
    objects = render(target)
    namespace = one(objects, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {
        namespace["metadata"]["name"]
    }
    assert_restricted(pod_spec(target))


def assert_restricted(pod: dict[str, Any]) -> None:
    """The restricted Pod Security Standard's fields, and what the pods add:
    a read-only root, no service account token, only emptyDir and Secret volumes."""
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
    assert security["seccompProfile"]["type"] == "RuntimeDefault"
    assert not any(pod.get(key) for key in ("hostNetwork", "hostPID", "hostIPC"))
    assert all(set(v) & {"emptyDir", "secret"} for v in pod["volumes"]), "only emptyDir and Secret volumes"
    assert pod["automountServiceAccountToken"] is False
    for c in pod["containers"] + pod.get("initContainers", []):
        context = c["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context.get("privileged", False) is False
        assert context["readOnlyRootFilesystem"] is True
        assert context["capabilities"]["drop"] == ["ALL"] and not context["capabilities"].get("add")
        assert "seccompProfile" not in context or context["seccompProfile"]["type"] == "RuntimeDefault"
        assert context.get("runAsUser", security["runAsUser"]) != 0 and context.get("runAsNonRoot", True) is True
        assert not any(p.get("hostPort") for p in c.get("ports", []))


def test_tmp_is_a_disk_volume_for_cupy(target: str) -> None:
    mounts = {m["mountPath"]: m["name"] for m in container(target)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(target)["volumes"]}
    tmp = volumes[mounts["/tmp"]]["emptyDir"]
    assert tmp.get("medium") != "Memory"  # tmpfs would count against the memory limit
    assert {**dockerfile_env(), **env(target)}["CUPY_CACHE_DIR"].startswith("/tmp/")


def test_every_setting_is_a_server_flag(target: str, server_config: tuple[ServerConfig, Any]) -> None:
    _, args = server_config
    for name in env(target):
        if not name.startswith("DISTILL_PROBE_"):  # distill-probe's own
            assert hasattr(args, name.removeprefix("DISTILL_").lower()), f"{name}: the server has no such flag"


def test_probes_check_grpc_health_on_the_served_port(target: str, server_config: tuple[ServerConfig, Any]) -> None:
    config, _ = server_config
    c = container(target)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": config.port, "metrics": config.metrics_port}
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe_spec = c[name]
        if target in TLS:  # the kubelet's gRPC probe has no TLS
            assert "grpc" not in probe_spec and probe_spec["exec"]["command"] == ["distill-probe"]
            assert probe_spec["timeoutSeconds"] >= 3
        else:
            assert probe_spec["grpc"]["port"] == config.port


def test_pods_drain_before_they_are_killed(target: str, server_config: tuple[ServerConfig, Any]) -> None:
    config, _ = server_config
    assert config.drain_delay_seconds >= 1  # clients and endpoints have time to leave the replica
    pod = pod_spec(target)
    assert pod["terminationGracePeriodSeconds"] >= config.drain_delay_seconds + config.grace_seconds + 5
    assert "preStop" not in container(target).get("lifecycle", {})  # --drain-delay is the preStop sleep


def test_connections_age_so_clients_find_new_pods(target: str, server_config: tuple[ServerConfig, Any]) -> None:
    config, _ = server_config
    age = config.max_connection_age_seconds
    assert age is not None and 60 <= age <= 3600


def server_memory(config: ServerConfig, args: Any) -> int:
    """The bytes a server may hold (deploy/k8s/base/deployment.yaml explains the sum)."""
    limits = config.limits
    message = limits.max_message_bytes
    return (
        limits.inflight_bytes  # unary calls
        + 2 * message * config.workers  # computing: a request's gradients and answer per worker
        + READ_COPIES * message * limits.max_concurrent_streams  # a step per stream, while gRPC copies it
    ) * args.processes + PROCESS_MARGIN_MIB * MIB


def assert_memory_covers(c: dict[str, Any], config: ServerConfig, args: Any) -> None:
    held = server_memory(config, args)
    resources = c["resources"]
    limit = quantity(resources["limits"]["memory"])
    assert limit >= held, f"{limit // MIB} MiB < {held // MIB} MiB"
    assert quantity(resources["requests"]["memory"]) == limit
    assert config.limits.max_message_bytes == 256 * MIB  # DistillClient's default


def test_memory_limit_covers_what_the_server_may_hold(target: str, server_config: tuple[ServerConfig, Any]) -> None:
    assert_memory_covers(container(target), *server_config)


def test_service_is_headless_for_client_side_balancing(target: str, server_config: tuple[ServerConfig, Any]) -> None:
    objects = render(target)
    service, deployment = one(objects, "Service"), one(objects, "Deployment")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    grpc_port = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert grpc_port["targetPort"] == "grpc" and grpc_port["port"] == server_config[0].port


def test_disruption_budget_lets_one_pod_go_at_a_time(target: str) -> None:
    objects = render(target)
    pdb, deployment, hpa = (one(objects, k) for k in ("PodDisruptionBudget", "Deployment", "HorizontalPodAutoscaler"))
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = pdb["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items() and selector == deployment["spec"]["selector"]["matchLabels"]
    fewest = min(deployment["spec"]["replicas"], hpa["spec"]["minReplicas"])
    assert fewest >= 2
    if "maxUnavailable" in pdb["spec"]:
        assert 1 <= pdb["spec"]["maxUnavailable"] < fewest
    else:
        assert pdb["spec"]["minAvailable"] < fewest


def adapter_rule() -> dict[str, Any]:
    """The Prometheus adapter rule written in the autoscaler's comment."""
    lines = (K8S / "base" / "horizontalpodautoscaler.yaml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("#   - seriesQuery:"))
    block = []
    for line in lines[start:]:
        if not line.startswith("#   "):
            break
        block.append(line[4:])
    rule: dict[str, Any] = yaml.safe_load("\n".join(block))[0]
    return rule


def test_autoscaler_follows_calls_in_flight(target: str) -> None:
    objects = render(target)
    hpa = one(objects, "HorizontalPodAutoscaler")
    deployment = one(objects, "Deployment")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"  # not CPU: on a GPU the host CPU does not follow the work
    assert metric["pods"]["target"]["type"] == "AverageValue"
    name = metric["pods"]["metric"]["name"]
    # The adapter rule in the comment serves a gauge of the server under that name.
    rule = adapter_rule()
    assert rule["name"]["as"] == name
    series = rule["seriesQuery"].split("{")[0].strip("'")
    gauges = {m.name for m in Metrics("cpu", "test").registry.collect() if m.type == "gauge"}
    assert series in gauges and re.fullmatch(rule["name"]["matches"], series)
    assert series == "distill_requests_in_flight"  # calls being served, not bytes held


def test_secrets_are_required_and_auth_only_where_configured(target: str) -> None:
    volumes = pod_spec(target)["volumes"]
    assert all(v["secret"].get("optional") is not True for v in volumes if "secret" in v)
    settings = env(target)
    assert "DISTILL_AUTH_TOKEN" not in settings  # a token in the manifest, or one from an optional Secret
    if target in AUTH:
        secret = mounted_secret(target, settings["DISTILL_AUTH_TOKEN_FILE"])
        assert secret["secretName"] == "distill-auth" and secret.get("optional") is False
    else:
        assert "DISTILL_AUTH_TOKEN_FILE" not in settings


def test_gpu_variants_get_a_gpu_node(target: str) -> None:
    pod, c, settings = pod_spec(target), container(target), env(target)
    if target in GPU:
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert c["resources"]["requests"]["nvidia.com/gpu"] == 1
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert pod["nodeSelector"]
        assert settings["DISTILL_DEVICE"] == "cuda"  # no silent fall-back to the CPU
    else:
        assert "nvidia.com/gpu" not in c["resources"]["limits"] and "tolerations" not in pod
        assert settings["DISTILL_DEVICE"] == "cpu"


def test_tls_variant_serves_its_secret(target: str) -> None:
    settings = env(target)
    if target not in TLS:
        assert not any(name.startswith(("DISTILL_TLS_", "DISTILL_PROBE_TLS_")) for name in settings)
        return
    for name in ("DISTILL_TLS_CERT", "DISTILL_TLS_KEY", "DISTILL_PROBE_TLS_CA"):
        secret = mounted_secret(target, settings[name])
        assert secret["secretName"] == "distill-tls" and secret.get("optional") is False


# The trainer-sidecar example.


def sidecar_pod() -> dict[str, Any]:
    spec: dict[str, Any] = one(render(SIDECAR), "Job")["spec"]["template"]["spec"]
    return spec


def sidecar_containers() -> tuple[dict[str, Any], dict[str, Any]]:
    """The server (the pod's one init container) and the trainer (its one container)."""
    pod = sidecar_pod()
    [server], [trainer] = pod["initContainers"], pod["containers"]
    assert (server["name"], trainer["name"]) == ("distill", "trainer")
    return server, trainer


@pytest.fixture
def sidecar_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[ServerConfig, Any]:
    return parse_settings(container_env(sidecar_containers()[0]), monkeypatch, tmp_path)


def shm_volume(c: dict[str, Any], path: str = "/dev/shm") -> tuple[str, dict[str, Any]]:
    """The name and emptyDir of the volume mounted at ``path`` in ``c``."""
    volumes = {v["name"]: v for v in sidecar_pod()["volumes"]}
    [name] = [m["name"] for m in c.get("volumeMounts", []) if m["mountPath"].rstrip("/") == path]
    assert "emptyDir" in volumes[name], f"{path} is not an emptyDir"
    return name, dict(volumes[name]["emptyDir"])


def uid(pod: dict[str, Any], c: dict[str, Any]) -> int:
    """The uid ``c`` runs as: its own runAsUser, else the pod's."""
    value = c.get("securityContext", {}).get("runAsUser", pod["securityContext"].get("runAsUser"))
    assert value is not None, f"{c['name']}: the image's user, which the manifest cannot see"
    return int(value)


def test_sidecar_example_matches_the_kubernetes_schemas() -> None:
    objects = render(SIDECAR)
    assert [o["kind"] for o in objects] == ["Job"]  # no Service: the server listens on loopback only
    for obj in objects:
        for version in (kubernetes_validate.latest_version(), OLDEST_NATIVE_SIDECARS):
            kubernetes_validate.validate(obj, version, strict=True)


def test_sidecar_is_a_native_sidecar_of_a_job() -> None:
    job = one(render(SIDECAR), "Job")
    pod = sidecar_pod()
    server, trainer = sidecar_containers()
    # An init container that keeps running: the Job completes when the trainer exits.
    assert server["restartPolicy"] == "Always"
    assert "restartPolicy" not in trainer
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    # Not the base Service's pods: its clients cannot reach a server on loopback.
    selector = one(render("base"), "Service")["spec"]["selector"]
    assert not selector.items() <= job["spec"]["template"]["metadata"]["labels"].items()
    # The base's image, pulled the same way.
    assert server["image"] == container("base")["image"]
    assert server["imagePullPolicy"] == "IfNotPresent"
    assert trainer["image"] != server["image"] and trainer["command"]


def test_sidecar_pod_meets_the_restricted_pod_security_standard() -> None:
    pod = sidecar_pod()
    assert_restricted(pod)
    for c in sidecar_containers():
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert "/tmp" in mounts  # the root is read-only
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes[mounts["/tmp"]]["emptyDir"].get("medium") != "Memory"  # disk, not the memory limit


def test_sidecar_and_trainer_share_dev_shm(sidecar_config: tuple[ServerConfig, Any]) -> None:
    config, _ = sidecar_config
    server, trainer = sidecar_containers()
    assert config.shared_memory_dir == Path("/dev/shm")  # where the client creates its files
    assert config.limits.max_shared_memory_bytes > 0 and config.limits.max_shared_memory_regions > 0  # enabled
    name, volume = shm_volume(server, str(config.shared_memory_dir))
    assert shm_volume(trainer) == (name, volume)  # one volume, mounted in both
    assert volume["medium"] == "Memory"  # tmpfs, as /dev/shm is
    size = quantity(volume["sizeLimit"])
    assert size >= config.limits.max_shared_memory_bytes, f"{size // MIB} MiB of /dev/shm for the regions"
    assert not any(m.get("readOnly") for c in (server, trainer) for m in c["volumeMounts"] if m["name"] == name)


def test_sidecar_and_trainer_run_as_one_uid() -> None:
    pod = sidecar_pod()
    server, trainer = sidecar_containers()
    image_user = int(dockerfile()[1][-1].all("USER")[-1].args.split(":")[0])
    assert uid(pod, server) == uid(pod, trainer) == image_user  # the server opens only its own uid's files


def test_sidecar_listens_on_loopback_for_its_trainer(sidecar_config: tuple[ServerConfig, Any]) -> None:
    config, _ = sidecar_config
    server, trainer = sidecar_containers()
    assert config.host == "127.0.0.1"  # only this pod reaches it
    settings = container_env(server)
    assert container_env(trainer)["DISTILL_TARGET"] == probe._default_target(settings) == f"127.0.0.1:{config.port}"
    assert "ports" not in server  # nothing outside the pod can reach them
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        # The kubelet's gRPC probe dials the pod's IP, where nothing listens;
        # distill-probe dials DISTILL_HOST.
        spec = server[name]
        assert "grpc" not in spec and spec["exec"]["command"] == ["distill-probe"]
        assert spec["timeoutSeconds"] >= 3


def test_sidecar_settings_are_server_flags(sidecar_config: tuple[ServerConfig, Any]) -> None:
    _, args = sidecar_config
    for name in container_env(sidecar_containers()[0]):
        assert hasattr(args, name.removeprefix("DISTILL_").lower()), f"{name}: the server has no such flag"


def test_sidecar_memory_limits_cover_what_each_container_holds(sidecar_config: tuple[ServerConfig, Any]) -> None:
    server, trainer = sidecar_containers()
    assert_memory_covers(server, *sidecar_config)
    # The region files are charged to the trainer, which creates and fills them.
    _, volume = shm_volume(trainer)
    limit = quantity(trainer["resources"]["limits"]["memory"])
    assert limit > quantity(volume["sizeLimit"])
    assert quantity(trainer["resources"]["requests"]["memory"]) == limit


def test_sidecar_stops_in_its_grace_period(sidecar_config: tuple[ServerConfig, Any]) -> None:
    config, _ = sidecar_config
    assert sidecar_pod()["terminationGracePeriodSeconds"] >= config.drain_delay_seconds + config.grace_seconds + 5


# The compose file.


def test_compose_file() -> None:
    service = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["distill"]
    assert service["ports"] == ["127.0.0.1:50051:50051", "127.0.0.1:9090:9090"]  # this host only
    assert service["healthcheck"]["test"] == ["CMD", "distill-probe"]  # it follows DISTILL_PORT and TLS
    assert service["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert service["read_only"] is True and service["tmpfs"] == ["/tmp"] and service["cap_drop"] == ["ALL"]
    environment = service["environment"]
    drain, grace = float(environment["DISTILL_DRAIN_DELAY"]), float(environment["DISTILL_GRACE"])
    stop_grace = service["stop_grace_period"]
    assert stop_grace.endswith("s") and float(stop_grace[:-1]) >= drain + grace + 5


def test_compose_agrees_with_the_client_on_the_message_limit() -> None:
    from distill_client.client import DEFAULT_MAX_MESSAGE_BYTES

    environment = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["distill"]["environment"]
    assert int(environment["DISTILL_MAX_MESSAGE_MB"]) * MIB == DEFAULT_MAX_MESSAGE_BYTES


def compose() -> dict[str, Any]:
    services: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return services


def docker_size(text: str) -> int:
    """A Docker size in bytes: 5120m, 5g, 64000000."""
    match = re.fullmatch(r"(\d+)([bkmg]?)", str(text).strip().lower())
    assert match, text
    return int(match.group(1)) * 1024 ** "bkmg".index(match.group(2) or "b")


def shm_mount(service: dict[str, Any]) -> str | None:
    """The named volume a compose service mounts at /dev/shm."""
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, _, rest = volume.partition(":")
            target = rest.split(":")[0]
        else:
            source, target = volume.get("source"), volume["target"]
            assert volume.get("type", "volume") == "volume"
        if target.rstrip("/") == "/dev/shm":
            return str(source)
    return None


def test_docker_size() -> None:
    assert docker_size("5120m") == docker_size("5g") == 5 * 1024**3
    assert docker_size("64") == docker_size("64b") == 64


def test_compose_trainer_shares_dev_shm_and_uid_with_the_server(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    document = compose()
    server, trainer = document["services"]["distill"], document["services"]["trainer"]
    # Only with --profile sidecar: plain `docker compose up` starts the server alone.
    assert "profiles" not in server and trainer["profiles"] == ["sidecar"]
    # One uid: the server's files are its own uid's only.
    image_user = dockerfile()[1][-1].all("USER")[-1].args
    assert server["user"] == trainer["user"] == image_user
    # One /dev/shm, large enough for the regions the server takes.
    config, _ = parse_settings(server["environment"], monkeypatch, tmp_path)
    assert config.shared_memory_dir == Path("/dev/shm") and config.limits.max_shared_memory_bytes > 0
    if "ipc" in trainer:
        assert trainer["ipc"] == "service:distill" and server["ipc"] == "shareable"
        size = docker_size(server["shm_size"])
    else:
        name = shm_mount(server)
        assert name is not None and shm_mount(trainer) == name
        volume = document["volumes"][name]
        options = volume["driver_opts"]
        assert volume.get("driver", "local") == "local" and options["type"] == "tmpfs"  # memory, as /dev/shm is
        settings = dict(o.partition("=")[::2] for o in options["o"].split(","))
        size = docker_size(settings["size"])
        assert settings["uid"] == image_user.split(":")[0] and int(settings["mode"], 8) & 0o077 == 0
    assert size >= config.limits.max_shared_memory_bytes, f"{size // MIB} MiB of /dev/shm"
    # The trainer starts once the server serves, and dials it.
    assert trainer["depends_on"]["distill"]["condition"] == "service_healthy"
    host, _, port = trainer["environment"]["DISTILL_TARGET"].rpartition(":")
    assert host in ("distill", "127.0.0.1") and int(port) == config.port
    assert trainer["read_only"] is True and trainer["cap_drop"] == ["ALL"]


# The Dockerfile.


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str

    def exec_form(self) -> list[str]:
        value = json.loads(self.args)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), self
        return value


@dataclass(frozen=True)
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction]
    args: dict[str, str]
    """ARGs in scope, with their values: a global ARG is seen in a stage only
    where the stage declares it again."""

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def expand(self, text: str) -> str:
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: self.args.get(m[1] or m[2], m[0]), text)

    def runs(self) -> list[list[str]]:
        """Each command of each RUN (split on &&), as words."""
        commands: list[list[str]] = [[]]
        for run in self.all("RUN"):
            for word in shlex.split(self.expand(run.args)):
                if word == "&&":
                    commands.append([])
                else:
                    commands[-1].append(word)
            commands.append([])
        return [c for c in commands if c]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """The global ARGs and the stages: instruction lines joined across
    backslash continuations, comments dropped."""
    instructions, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "a continuation runs off the end"
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for instruction in instructions:
        if instruction.keyword == "ARG":
            name, _, default = instruction.args.partition("=")
            if not stages:
                global_args[name] = default
            else:
                stages[-1].args[name] = default or global_args.get(name, "")
        elif instruction.keyword == "FROM":
            words = instruction.args.split()
            image = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m[1]], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(image, name, [], {}))
        else:
            assert stages, f"{instruction.keyword} before FROM"
            stages[-1].instructions.append(instruction)
    return global_args, stages


@functools.cache
def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    return parse_dockerfile((ROOT / "Dockerfile").read_text())


def dockerfile_env() -> dict[str, str]:
    """The final image's ENV."""
    found: dict[str, str] = {}
    for instruction in dockerfile()[1][-1].all("ENV"):
        for word in shlex.split(instruction.args):
            name, _, value = word.partition("=")
            found[name] = value
    return found


def test_dockerfile_parser_joins_continuations_and_scopes_args() -> None:
    global_args, stages = parse_dockerfile(
        "ARG V=1\nARG IMAGE=img:2\n# comment\nFROM ${IMAGE} AS one\nARG V\n"
        "RUN a \\\n    && b $V\nFROM scratch\nRUN c $V\n"
    )
    assert global_args == {"V": "1", "IMAGE": "img:2"}
    assert [(s.base, s.name) for s in stages] == [("img:2", "one"), ("scratch", None)]
    assert stages[0].runs() == [["a"], ["b", "1"]]
    assert stages[1].runs() == [["c", "$V"]]  # not declared in that stage: not expanded, as Docker does


def test_dockerfile_is_multi_stage_on_cuda_and_runs_as_a_user() -> None:
    _, stages = dockerfile()
    build, final = stages[0], stages[-1]
    assert len(stages) >= 2 and build.name == "build"
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-runtime-ubuntu\d+\.\d+", final.base)
    user = final.all("USER")[-1].args
    assert all(part.isdigit() for part in user.split(":")) and int(user.split(":")[0]) != 0, user
    environment = dockerfile_env()
    assert environment["DISTILL_HOST"] == "0.0.0.0" and environment["DISTILL_DEVICE"] == "auto"
    assert environment["CUPY_CACHE_DIR"].startswith("/tmp/")  # the only writable path in Kubernetes
    exposed = {int(port) for e in final.all("EXPOSE") for port in e.args.split()}
    assert exposed == {int(environment["DISTILL_PORT"]), int(environment["DISTILL_METRICS_PORT"])}


def test_dockerfile_starts_the_server_and_checks_it_with_the_probe() -> None:
    final = dockerfile()[1][-1]
    assert final.all("ENTRYPOINT")[-1].exec_form() == ["distill-server"]  # flags append to it
    assert not final.all("CMD")
    words = final.all("HEALTHCHECK")[-1].args.split(" CMD ", 1)
    assert all(option.startswith("--") for option in words[0].split())
    # Exec form, no flags: the probe itself reads DISTILL_PORT and DISTILL_TLS_* at run time.
    assert Instruction("CMD", words[1]).exec_form() == ["distill-probe"]


def test_dockerfile_installs_the_gpu_extra_with_cupy_and_cuda_headers_pinned() -> None:
    global_args, stages = dockerfile()
    build, final = stages[0], stages[-1]
    copied = {word for c in build.all("COPY") for word in c.args.split()[:-1]}
    assert {"pyproject.toml", "README.md", "core", "client", "server"} <= {w.rstrip("/") for w in copied}
    assert all((ROOT / w).exists() for w in copied)
    # The constraint file is written once, from the ARGs, in the build stage:
    # CuPy, and the CUDA headers of the base image's CUDA version.
    [printf] = [c for c in build.runs() if c[0] == "printf"]
    assert printf[-2] == ">"
    constraints = printf[-1]
    pins = (printf[1].replace("\\n", "\n") % tuple(printf[2:-2])).split()
    assert pins == [
        f"cupy-cuda12x=={global_args['CUPY_VERSION']}",
        f"nvidia-cuda-runtime-cu12=={global_args['CUDA_HEADERS_VERSION']}",
    ]
    cuda = re.fullmatch(r"nvidia/cuda:(\d+\.\d+)\.\d+-runtime-.*", global_args["CUDA_IMAGE"])
    assert cuda and global_args["CUDA_HEADERS_VERSION"].startswith(cuda[1] + "."), global_args
    assert re.fullmatch(r"\d+\.\d+\.\d+", global_args["CUPY_VERSION"])

    def pip(stage: Stage, verb: str) -> list[str]:
        [command] = [c for c in stage.runs() if c[:2] == ["pip", verb]]
        assert command[command.index("--constraint") + 1] == constraints
        return command

    assert {".[gpu]", "nvidia-cuda-runtime-cu12"} <= set(pip(build, "wheel"))
    assert {"distill-service[gpu]", "nvidia-cuda-runtime-cu12"} <= set(pip(final, "install"))
    assert f"--from=build {constraints} {constraints}" in [c.args for c in final.all("COPY")]


# The probe, against real servers.


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


@pytest.fixture
def serve(loop: asyncio.AbstractEventLoop) -> Iterator[Callable[[ServerConfig], int]]:
    """Start in-process servers (SERVING when this returns their port); all stop afterwards."""
    started: list[DistillServer] = []

    def start(config: ServerConfig) -> int:
        async def create() -> DistillServer:
            return DistillServer(config)

        server = asyncio.run_coroutine_threadsafe(create(), loop).result(30)
        started.append(server)
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(60)
        return server.port

    yield start
    for server in started:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(30)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("DISTILL_"):
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    directory = tmp_path_factory.mktemp("pki")
    ca, other = Authority(directory, "ca"), Authority(directory, "other-ca")
    return {
        "ca": ca.pair,
        "other-ca": other.pair,
        "server": ca.issue("server", server=True),  # names 127.0.0.1 and localhost
        "client": ca.issue("client", server=False),
        "dual": ca.issue("dual", server=True, client=True, names=("127.0.0.1",)),
        "service": ca.issue("service", server=True, names=("distill.distill.svc",)),
        "authority": ca,
    }


def test_probe_follows_distill_port(
    serve: Callable[[ServerConfig], int], clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    port = serve(ServerConfig(port=0, device="cpu"))
    clean_env.setenv("DISTILL_PORT", str(port))
    clean_env.setenv("DISTILL_HOST", "0.0.0.0")  # the image's: all addresses, so the probe dials 127.0.0.1
    assert probe.main([]) == 0
    assert f"127.0.0.1:{port}: SERVING" in capsys.readouterr().out
    assert probe.main(["--target", "127.0.0.1:1", "--timeout", "2"]) == 1  # the flag wins
    clean_env.setenv("DISTILL_PORT", "1")  # nothing listens there
    assert probe.main(["--timeout", "2"]) == 1
    assert "127.0.0.1:1: UNAVAILABLE" in capsys.readouterr().err
    assert probe.main(["--target", f"127.0.0.1:{port}"]) == 0


@pytest.mark.parametrize(
    ("settings", "target"),
    [
        ({}, "127.0.0.1:50051"),
        ({"DISTILL_HOST": "0.0.0.0", "DISTILL_PORT": "6000"}, "127.0.0.1:6000"),
        ({"DISTILL_HOST": "::"}, "127.0.0.1:50051"),  # all addresses, IPv4 too
        ({"DISTILL_HOST": "10.1.2.3", "DISTILL_PORT": "6000"}, "10.1.2.3:6000"),  # one address: that one
        ({"DISTILL_HOST": "fd00::1"}, "[fd00::1]:50051"),
    ],
)
def test_probe_dials_the_address_the_server_binds(settings: dict[str, str], target: str) -> None:
    assert probe._default_target(settings) == target


def test_probe_follows_the_servers_tls_settings(
    serve: Callable[[ServerConfig], int], clean_env: pytest.MonkeyPatch, pki: dict[str, Any]
) -> None:
    server = pki["server"]
    port = serve(ServerConfig(port=0, device="cpu", tls_cert=server.cert, tls_key=server.key))
    # What the container has: the server's own settings, nothing for the probe.
    clean_env.setenv("DISTILL_PORT", str(port))
    clean_env.setenv("DISTILL_TLS_CERT", str(server.cert))
    clean_env.setenv("DISTILL_TLS_KEY", str(server.key))
    assert probe.main([]) == 0  # TLS, trusting the server's own certificate
    assert probe.main(["--plaintext", "--timeout", "2"]) == 1  # the flag wins: plaintext cannot talk to it
    clean_env.setenv("DISTILL_PROBE_TLS_CA", str(pki["other-ca"].cert))
    assert probe.main(["--timeout", "2"]) == 1  # that CA, not the certificate, is trusted now
    assert probe.main(["--tls-ca", str(pki["ca"].cert)]) == 0
    clean_env.setenv("DISTILL_PROBE_TLS_CA", str(pki["ca"].cert))
    assert probe.main([]) == 0
    clean_env.setenv("DISTILL_PROBE_TLS_SERVER_NAME", "elsewhere.example")
    assert probe.main(["--timeout", "2"]) == 1  # the name is checked against the certificate's
    assert probe.main(["--tls-server-name", "localhost"]) == 0
    clean_env.setenv("DISTILL_PROBE_TLS_SERVER_NAME", "localhost")
    assert probe.main([]) == 0


def test_probe_presents_a_client_certificate_to_a_mutual_tls_server(
    serve: Callable[[ServerConfig], int], clean_env: pytest.MonkeyPatch, pki: dict[str, Any]
) -> None:
    ca, dual = pki["ca"], pki["dual"]
    port = serve(ServerConfig(port=0, device="cpu", tls_cert=dual.cert, tls_key=dual.key, tls_client_ca=ca.cert))
    clean_env.setenv("DISTILL_PORT", str(port))
    clean_env.setenv("DISTILL_TLS_CERT", str(dual.cert))
    clean_env.setenv("DISTILL_TLS_KEY", str(dual.key))
    assert probe.main(["--timeout", "2"]) == 1  # the server wants a client certificate
    clean_env.setenv("DISTILL_TLS_CLIENT_CA", str(ca.cert))
    assert probe.main([]) == 0  # the server's own pair, good for client authentication too
    client = pki["client"]
    clean_env.setenv("DISTILL_PROBE_TLS_CERT", str(client.cert))
    clean_env.setenv("DISTILL_PROBE_TLS_KEY", str(client.key))
    assert probe.main([]) == 0
    stranger = Authority(ca.cert.parent, "stranger-ca").issue(
        "stranger", server=True, client=True, names=("127.0.0.1",)
    )
    assert probe.main(["--tls-cert", str(stranger.cert), "--tls-key", str(stranger.key), "--timeout", "2"]) == 1


def test_tls_variant_serves_and_probes_as_rendered(
    serve: Callable[[ServerConfig], int], clean_env: pytest.MonkeyPatch, pki: dict[str, Any], tmp_path: Path
) -> None:
    """The TLS variant's container, on this machine: its Secret's files in a
    directory, the server configured by its environment, the probe by the
    same environment (with the port the server was given)."""
    target = sorted(TLS)[0]
    secret = tmp_path / "tls"
    secret.mkdir()
    service = pki["service"]  # names only distill.distill.svc, as a cert-manager Certificate would
    for name, source in (("tls.crt", service.cert), ("tls.key", service.key), ("ca.crt", pki["ca"].cert)):
        (secret / name).write_bytes(source.read_bytes())
    mount = next(m["mountPath"] for m in container(target)["volumeMounts"] if m["name"] == "tls")
    settings = {**dockerfile_env(), **env(target)}
    for name, value in settings.items():
        if name == "DISTILL_AUTH_TOKEN_FILE":
            value = str(tmp_path / "token")
            Path(value).write_text("token\n")
        if name.startswith("DISTILL_"):  # not the image's PATH
            clean_env.setenv(name, value.replace(mount, str(secret)))
    for name, value in {"DISTILL_HOST": "127.0.0.1", "DISTILL_PORT": "0", "DISTILL_DEVICE": "cpu"}.items():
        clean_env.setenv(name, value)
    clean_env.delenv("DISTILL_METRICS_PORT")
    config, _ = parse_args([])
    assert config.tls_cert == secret / "tls.crt" and config.auth_token == "token"
    clean_env.setenv("DISTILL_PORT", str(serve(config)))
    assert probe.main([]) == 0
    clean_env.delenv("DISTILL_PROBE_TLS_SERVER_NAME")
    assert probe.main(["--timeout", "2"]) == 1  # 127.0.0.1 is not in the certificate: the name is what made it pass


def test_sidecar_server_shares_memory_with_a_client_of_its_uid(
    serve: Callable[[ServerConfig], int], clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The sidecar's server, configured by its rendered environment (a
    directory of this test for its /dev/shm, a port of the system's), takes
    the tensors of a client running as the same user through shared memory."""
    shm = tmp_path / "shm"
    shm.mkdir(mode=0o700)
    for name, value in {**dockerfile_env(), **container_env(sidecar_containers()[0])}.items():
        if name.startswith("DISTILL_"):
            clean_env.setenv(name, value)
    clean_env.setenv("DISTILL_SHARED_MEMORY_DIR", str(shm))
    clean_env.setenv("DISTILL_PORT", "0")
    clean_env.delenv("DISTILL_METRICS_PORT")
    config, _ = parse_args([])
    assert config.host == "127.0.0.1"
    port = serve(config)
    rng = np.random.default_rng(0)
    teacher, student = (rng.standard_normal((64, 1024), dtype=np.float32) for _ in range(2))
    layers = [(1.0, DistilLoss.mse())]
    with DistillClient(f"127.0.0.1:{port}", transport="shm") as client:
        info = client.server_info().shared_memory
        assert info is not None and info.enabled and info.directory == str(shm)
        assert info.max_bytes == config.limits.max_shared_memory_bytes
        shared = client.compute_layer_loss(layers, 0, teacher, student, gradients=True)
    with DistillClient(f"127.0.0.1:{port}", transport="grpc") as client:
        inline = client.compute_layer_loss(layers, 0, teacher, student, gradients=True)
    assert shared.loss == inline.loss
    np.testing.assert_array_equal(shared.gradient, inline.gradient)
    # The client removed its files' names once the server held them (the
    # server's socket for sealed memory files may be there too).
    assert [f.name for f in shm.iterdir() if not f.is_socket()] == []


# The Grafana dashboard.


def test_every_dashboard_query_names_metrics_the_server_exports(start_server: type[ServerProcess]) -> None:
    """Each panel's PromQL names only series a real server's /metrics has,
    once it has served the calls that create them."""
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "distill-service.json").read_text())
    proc = start_server(["--device", "cpu", "--metrics-port", "0"])
    x = np.ones((2, 4), np.float32)
    with DistillClient(proc.target, timeout=30) as client:
        client.compute_total_loss([(1.0, DistilLoss.mse())], [x], [x])
        with client.stream([(1.0, DistilLoss.mse())]) as session:
            session.step([x], [x])
    exported = {name.split("{")[0] for name in scrape(proc)}
    queried = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = set(re.findall(r"\bdistill_[a-z_]+", target["expr"]))
            assert names, (panel["title"], target["expr"])
            queried |= names
    assert queried <= exported, sorted(queried - exported)
    # Every family the server exports has a panel.
    suffix = r"_(total|bucket|count|sum|created|info)$"
    families = {re.sub(suffix, "", name) for name in exported if name.startswith("distill_")}
    shown = {re.sub(suffix, "", name) for name in queried}
    assert families <= shown, sorted(families - shown)
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
