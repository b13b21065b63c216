"""Rendered Kubernetes manifests for tests: render an overlay with `kubectl kustomize`, look objects
up, resolve a container's environment, and decide what the NetworkPolicies allow."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
KUBECTL = shutil.which("kubectl")

Obj = dict[str, Any]


class Rendered:
    """The objects one overlay renders to."""

    def __init__(self, objects: list[Obj]) -> None:
        self.objects = objects

    def of_kind(self, kind: str) -> dict[str, Obj]:
        return {obj["metadata"]["name"]: obj for obj in self.objects if obj["kind"] == kind}

    def get(self, kind: str, name: str) -> Obj:
        return self.of_kind(kind)[name]

    def container(self, deployment: str) -> Obj:
        containers = self.get("Deployment", deployment)["spec"]["template"]["spec"]["containers"]
        assert len(containers) == 1, f"{deployment}: one container per pod"
        return containers[0]

    def env(self, deployment: str) -> dict[str, str]:
        """What the container's process sees: its envFrom ConfigMaps, then its own `env`."""
        container = self.container(deployment)
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            env.update(self.get("ConfigMap", source["configMapRef"]["name"])["data"])
        for var in container.get("env", []):
            assert "value" in var, f"{deployment}: {var['name']} must be a plain value"
            env[var["name"]] = var["value"]
        return env


def render(overlay: str) -> Rendered:
    """`kubectl kustomize deploy/k8s/overlays/<overlay>`."""
    assert KUBECTL is not None
    result = subprocess.run([KUBECTL, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return Rendered([obj for obj in yaml.safe_load_all(result.stdout) if obj])


def matches(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """A label selector (matchLabels only: these manifests use nothing else)."""
    assert set(selector) <= {"matchLabels"}, f"unsupported selector {selector}"
    return all(labels.get(key) == value for key, value in selector.get("matchLabels", {}).items())


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One side of a connection: a pod's labels in a namespace (or something outside the cluster)."""

    namespace: str | None
    labels: Mapping[str, str]

    def namespace_labels(self) -> dict[str, str]:
        return {"kubernetes.io/metadata.name": self.namespace} if self.namespace else {}


def _peer_matches(peer: Obj, policy_namespace: str, other: Endpoint) -> bool:
    assert set(peer) <= {"podSelector", "namespaceSelector"}, f"unsupported peer {peer}"
    if other.namespace is None:  # outside the cluster: only an ipBlock (unused here) could match
        return False
    if "namespaceSelector" in peer:
        if not matches(peer["namespaceSelector"], other.namespace_labels()):
            return False
    elif other.namespace != policy_namespace:
        return False
    return "podSelector" not in peer or matches(peer["podSelector"], other.labels)


def _rule_allows(rule: Obj, peers_key: str, policy_namespace: str, other: Endpoint, port: int,
                 protocol: str) -> bool:
    peers = rule.get(peers_key)
    if peers is not None and not any(_peer_matches(peer, policy_namespace, other) for peer in peers):
        return False
    ports = rule.get("ports")
    return ports is None or any(p.get("port") == port and p.get("protocol", "TCP") == protocol for p in ports)


def _direction_allows(policies: list[Obj], direction: str, pod: Endpoint, other: Endpoint, port: int,
                      protocol: str) -> bool:
    """Whether the policies selecting `pod` let `direction` traffic with `other` through."""
    selecting = [p for p in policies if p["metadata"].get("namespace") == pod.namespace
                 and direction in p["spec"].get("policyTypes", ["Ingress"])
                 and matches(p["spec"]["podSelector"], pod.labels)]
    if not selecting:
        return True
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    return any(_rule_allows(rule, peers_key, policy["metadata"]["namespace"], other, port, protocol)
               for policy in selecting for rule in policy["spec"].get(key, []))


def connection_allowed(rendered: Rendered, source: Endpoint, target: Endpoint, port: int,
                       protocol: str = "TCP") -> bool:
    """Whether the rendered NetworkPolicies let `source` open a connection to `target` on `port`."""
    policies = list(rendered.of_kind("NetworkPolicy").values())
    return (_direction_allows(policies, "Egress", source, target, port, protocol)
            and _direction_allows(policies, "Ingress", target, source, port, protocol))


def pod_labels(rendered: Rendered, kind: str, name: str) -> dict[str, str]:
    return rendered.get(kind, name)["spec"]["template"]["metadata"]["labels"]


def probes(container: Obj) -> Iterator[tuple[str, Obj]]:
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert kind in container, f"{container['name']} has no {kind}"
        yield kind, container[kind]
