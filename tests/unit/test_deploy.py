"""The KubeRay manifests in deploy/kuberay: what docs/deploy.md promises of them.

No Kubernetes cluster is needed (none can be reached here): the manifests are parsed and
checked against each other and against ``latentcast serve`` itself. The front end's
``args`` and ``env`` go through the real command-line parser, so an option that does not
exist, or a configuration the server refuses, fails here rather than in a pod; the Ray
address, the number of engines and the shared paths must agree with the RayCluster.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

from latentcast.server.cli import build_parser, config_from
from latentcast.server.config import ServerConfig

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT / "deploy" / "kuberay"
#: PROTOCOL.md section 7: the process exits within the drain timeout + 6 s.
EXIT_BOUND_AFTER_DRAIN = 6


def documents(name: str) -> dict[str, dict[str, Any]]:
    """The manifest's documents by kind (each kind appears once in our manifests)."""
    loaded = [doc for doc in yaml.safe_load_all((KUBERAY / name).read_text()) if doc]
    kinds = [doc["kind"] for doc in loaded]
    assert len(kinds) == len(set(kinds)), kinds
    return {doc["kind"]: doc for doc in loaded}


@pytest.fixture(scope="module")
def cluster() -> dict[str, dict[str, Any]]:
    return documents("raycluster.yaml")


@pytest.fixture(scope="module")
def frontend() -> dict[str, dict[str, Any]]:
    return documents("frontend.yaml")


def front_container(frontend: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (container,) = frontend["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


def front_config(frontend: dict[str, dict[str, Any]]) -> ServerConfig:
    """The configuration ``latentcast serve`` builds from the Deployment's args and env
    (a secret's value stands in for each ``secretKeyRef``)."""
    container = front_container(frontend)
    environ = {
        item["name"]: item.get("value", "secret-from-kubernetes") for item in container["env"]
    }
    args = build_parser().parse_args(["serve", *container["args"]])
    return config_from(args, environ)


def worker_groups(cluster: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = cluster["RayCluster"]["spec"]["workerGroupSpecs"]
    return groups


def test_the_front_end_is_a_valid_serve_configuration_that_joins_the_ray_cluster(
    cluster: dict[str, dict[str, Any]], frontend: dict[str, dict[str, Any]]
) -> None:
    config = front_config(frontend)
    assert config.host == "0.0.0.0" and config.device == "cuda"
    assert config.tokens == ("secret-from-kubernetes",), "the token comes from the Secret"
    # ray://<RayCluster name>-head-svc:<the head's Ray Client port>
    name = cluster["RayCluster"]["metadata"]["name"]
    (head,) = cluster["RayCluster"]["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    client_port = next(port for port in head["ports"] if port["name"] == "client")
    assert config.ray_address == f"ray://{name}-head-svc:{client_port['containerPort']}"


def test_one_engine_per_gpu_of_the_ray_cluster(
    cluster: dict[str, dict[str, Any]], frontend: dict[str, dict[str, Any]]
) -> None:
    gpus = 0
    for group in worker_groups(cluster):
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        assert group["minReplicas"] == group["replicas"] == group["maxReplicas"]
        gpus += group["replicas"] * int(limits.get("nvidia.com/gpu", 0))
    assert gpus > 0
    assert front_config(frontend).engines == gpus
    head = cluster["RayCluster"]["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "no engine may land on the head"


def test_every_pod_runs_the_same_image_and_a_ray_the_extra_allows(
    cluster: dict[str, dict[str, Any]], frontend: dict[str, dict[str, Any]]
) -> None:
    spec = cluster["RayCluster"]["spec"]
    images = {front_container(frontend)["image"]}
    images |= {c["image"] for c in spec["headGroupSpec"]["template"]["spec"]["containers"]}
    for group in worker_groups(cluster):
        images |= {c["image"] for c in group["template"]["spec"]["containers"]}
    assert len(images) == 1, f"Ray Client needs the same Ray and Python everywhere: {images}"
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (ray,) = (Requirement(item) for item in extras["optional-dependencies"]["ray"])
    assert ray.name == "ray"
    assert ray.specifier.contains(spec["rayVersion"]), (ray, spec["rayVersion"])


def test_engines_find_the_cache_and_the_model_at_the_paths_the_front_end_sends(
    cluster: dict[str, dict[str, Any]], frontend: dict[str, dict[str, Any]]
) -> None:
    config = front_config(frontend)
    for group in worker_groups(cluster):
        (container,) = group["template"]["spec"]["containers"]
        env = {item["name"]: item["value"] for item in container["env"]}
        mounts = [Path(mount["mountPath"]) for mount in container["volumeMounts"]]
        assert Path(env["LATENTCAST_CACHE_DIR"]) == config.cache_dir
        for path in (config.cache_dir, Path(env["HF_HOME"]), Path(config.default_model.spec)):
            assert path is not None
            assert any(path.is_relative_to(mount) for mount in mounts), (path, mounts)


def test_the_front_end_drains_within_its_grace_period_and_is_probed_as_documented(
    frontend: dict[str, dict[str, Any]],
) -> None:
    config = front_config(frontend)
    pod = frontend["Deployment"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > config.drain_timeout + EXIT_BOUND_AFTER_DRAIN
    assert frontend["Deployment"]["spec"]["strategy"]["type"] == "Recreate"
    container = front_container(frontend)
    (port,) = container["ports"]
    assert port["containerPort"] == config.port
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": port["name"]}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": port["name"]}
    (service_port,) = frontend["Service"]["spec"]["ports"]
    assert service_port["targetPort"] == port["name"]
    labels = frontend["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert frontend["Service"]["spec"]["selector"] == labels


def test_the_ray_network_policy_admits_the_front_end(
    cluster: dict[str, dict[str, Any]], frontend: dict[str, dict[str, Any]]
) -> None:
    policy = cluster["NetworkPolicy"]["spec"]
    name = cluster["RayCluster"]["metadata"]["name"]
    assert policy["podSelector"]["matchLabels"] == {"ray.io/cluster": name}
    (rule,) = policy["ingress"]
    admitted = [peer["podSelector"]["matchLabels"] for peer in rule["from"]]
    labels = frontend["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert labels in admitted and {"ray.io/cluster": name} in admitted
