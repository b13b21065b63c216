"""deploy/k8s, as far as a machine without a cluster allows: each overlay renders with
`kubectl kustomize`, every object validates against the Kubernetes schemas (kubernetes-validate;
custom resources against tests/crd_schemas.py), the structure keeps its promises (probes, drains,
disruption budgets, spreading, autoscaling, network policies, GPUs, TLS), and each container's
declared command and environment start the service on this machine and serve a request."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from services.client import GatewayClient
from services.decode.settings import DecodeSettings
from services.gateway.settings import GatewaySettings
from services.kvstore.settings import KvStoreSettings
from services.prefill.settings import PrefillSettings
from tests.crd_schemas import CRD_SCHEMAS
from tests.declared import DECLARED_PORTS, SERVICES, declared_spec, free_ports, running
from tests.manifests import K8S, KUBECTL, Endpoint, Rendered, connection_allowed, pod_labels, probes, render

if KUBECTL is None:
    pytest.skip("kubectl is not on PATH: install kubectl (with its built-in kustomize) to test deploy/k8s",
                allow_module_level=True)

OVERLAYS = ("cpu", "gpu", "cpu-tls")
NAMESPACE = "disagg-serve"
# The oldest release the manifests target (native gRPC probes, matchLabelKeys) and the newest known.
KUBERNETES_VERSIONS = ("1.30", kubernetes_validate.latest_version())
WORKERS = ("prefill", "decode")
DRAIN_MARGIN_SECONDS = 5     # after preStop and the drain: the final server stop and process exit
# Environment variables the services read besides their settings: the TLS files (and OTEL_*).
EXTRA_ENV = {"TLS_CERT", "TLS_KEY", "TLS_CA"}


@pytest.fixture(scope="module")
def overlays() -> dict[str, Rendered]:
    return {name: render(name) for name in OVERLAYS}


def grpc_port(rendered: Rendered, role: str) -> int:
    return int(rendered.env(role)[f"{role.upper()}_PORT"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_its_schema(overlays: dict[str, Rendered], overlay: str) -> None:
    for obj in overlays[overlay].objects:
        where = f"{overlay}: {obj['kind']}/{obj['metadata']['name']}"
        custom = CRD_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
        try:
            if custom is not None:
                jsonschema.validate(obj, custom)
            else:
                for version in KUBERNETES_VERSIONS:
                    kubernetes_validate.validate(obj, version, strict=True)
        except (jsonschema.ValidationError, kubernetes_validate.SchemaNotFoundError) as error:
            pytest.fail(f"{where}: {getattr(error, 'message', error)}")
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == NAMESPACE, where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_are_ones_the_services_read(overlays: dict[str, Rendered], overlay: str) -> None:
    known = EXTRA_ENV | {field.metadata["env"] for settings in (GatewaySettings, PrefillSettings, DecodeSettings,
                                                                KvStoreSettings)
                         for field in dataclasses.fields(settings)}
    for role in SERVICES:
        env = overlays[overlay].env(role)
        unknown = {name for name in env if name not in known and not name.startswith("OTEL_")}
        assert not unknown, f"{overlay} {role}: variables no service reads: {unknown}"
        assert env["REDIS_URL"] and env["KVSTORE_BACKEND"] == "redis"
        assert env[f"{role.upper()}_HOST"] == "0.0.0.0"


def test_services_route_to_every_pod(overlays: dict[str, Rendered]) -> None:
    rendered = overlays["cpu"]
    services = rendered.of_kind("Service")
    for role in SERVICES:
        service, container = services[role], rendered.container(role)
        for other in SERVICES:  # selects this role's pods and no other's
            selected = service["spec"]["selector"].items() <= pod_labels(rendered, "Deployment", other).items()
            assert selected == (other == role), (role, other)
        container_ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        for port in service["spec"]["ports"]:
            assert container_ports[port["targetPort"]] == port["port"], (role, port)
        assert container_ports["grpc"] == grpc_port(rendered, role) == DECLARED_PORTS[role][0]
        assert container_ports["metrics"] == int(rendered.env(role)[f"{role.upper()}_METRICS_PORT"])
    for role in WORKERS:  # headless: the name resolves to every ready pod, and the gateway expands it
        assert services[role]["spec"]["clusterIP"] == "None"
        assert rendered.env("gateway")[f"{role.upper()}_ADDRESSES"] == f"{role}:{DECLARED_PORTS[role][0]}"
    assert {port["name"]: port["port"] for port in services["gateway"]["spec"]["ports"]} == \
        {"grpc": 50051, "http": 8000, "metrics": 9100}
    assert services["redis"]["spec"]["ports"][0]["port"] == 6379
    assert rendered.of_kind("StatefulSet")["redis"]["spec"]["serviceName"] == "redis"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_ask_the_grpc_health_service(overlays: dict[str, Rendered], overlay: str) -> None:
    """Native gRPC probes; with mTLS, which they cannot speak, the healthcheck command in the pod.
    Readiness asks the overall health (a gateway without workers is not ready); startup and
    liveness ask the 'liveness' name (a gateway waiting for workers must not be restarted)."""
    rendered = overlays[overlay]
    for role in SERVICES:
        container, port = rendered.container(role), grpc_port(rendered, role)
        for kind, probe in probes(container):
            service = [] if kind == "readinessProbe" else ["liveness"]
            if "TLS_CERT" in rendered.env(role):
                assert "grpc" not in probe and probe["exec"]["command"] == [
                    "python", "-m", "services.common.healthcheck", f"127.0.0.1:{port}",
                    *(["--service", *service] if service else [])], (role, kind)
            else:
                assert probe["grpc"] == {"port": port, **({"service": service[0]} if service else {})}, (role, kind)
        startup = container["startupProbe"]
        budget = startup["periodSeconds"] * startup["failureThreshold"]
        assert budget >= (600 if role in WORKERS else 300), f"{role}: model load may take minutes"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_period_covers_pre_stop_and_drain(overlays: dict[str, Rendered], overlay: str) -> None:
    rendered = overlays[overlay]
    for role in SERVICES:
        pod = rendered.get("Deployment", role)["spec"]["template"]["spec"]
        command = rendered.container(role)["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep", role
        sleep, drain = float(command[1]), float(rendered.env(role)["GRACE_SECONDS"])
        refresh = float(rendered.env("gateway")["MEMBERSHIP_REFRESH_SECONDS"])
        assert sleep > refresh, f"{role}: the gateway must drop the pod before its drain starts"
        assert pod["terminationGracePeriodSeconds"] > sleep + drain + DRAIN_MARGIN_SECONDS, role


def test_disruption_budgets_and_spreading(overlays: dict[str, Rendered]) -> None:
    rendered = overlays["cpu"]
    budgets = rendered.of_kind("PodDisruptionBudget")
    for role in SERVICES:
        labels = pod_labels(rendered, "Deployment", role)
        assert budgets[role]["spec"]["selector"]["matchLabels"].items() <= labels.items(), role
        assert budgets[role]["spec"]["maxUnavailable"] == 1
    for role in WORKERS:
        spread = rendered.get("Deployment", role)["spec"]["template"]["spec"]["topologySpreadConstraints"]
        assert {c["topologyKey"] for c in spread} == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
        for constraint in spread:
            assert constraint["labelSelector"] == rendered.get("Deployment", role)["spec"]["selector"]
        resources = rendered.container(role)["resources"]
        assert resources["requests"]["cpu"] and resources["limits"]["memory"]


def test_each_role_scales_on_its_own_signal(overlays: dict[str, Rendered]) -> None:
    expected = {"prefill": {"disagg_model_loop_busy_fraction"},
                "decode": {"disagg_kv_pool_pressure", "disagg_decode_running_batch_size"},
                "gateway": {"disagg_gateway_active_requests"}}
    adapter = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    served = {rule["name"]["as"] for rule in adapter["rules"]["custom"]}
    autoscalers = overlays["cpu"].of_kind("HorizontalPodAutoscaler")
    assert set(autoscalers) == set(expected)
    for role, metrics in expected.items():
        spec = autoscalers[role]["spec"]
        assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": role}
        assert "replicas" not in overlays["cpu"].get("Deployment", role)["spec"], "the HPA owns the count"
        assert 1 <= spec["minReplicas"] < spec["maxReplicas"]
        names = {metric["pods"]["metric"]["name"] for metric in spec["metrics"] if metric["type"] == "Pods"}
        assert names == metrics and names <= served, role


def test_network_policies(overlays: dict[str, Rendered]) -> None:
    rendered = overlays["cpu"]
    pod = {role: Endpoint(NAMESPACE, pod_labels(rendered, "Deployment", role)) for role in SERVICES}
    pod["redis"] = Endpoint(NAMESPACE, pod_labels(rendered, "StatefulSet", "redis"))
    outside, prometheus = Endpoint(None, {}), Endpoint("monitoring", {"app": "prometheus"})
    stranger = Endpoint(NAMESPACE, {"app": "debug-shell"})
    ports = {role: DECLARED_PORTS[role][0] for role in SERVICES} | {"redis": 6379}
    allowed = {("outside", "gateway"), ("prometheus", "gateway"),  # the gateway serves anyone outside
               ("gateway", "prefill"), ("gateway", "decode"), ("prefill", "decode"),
               ("prefill", "kvstore"), ("decode", "kvstore"), ("kvstore", "redis")}
    sources = {"outside": outside, "stranger": stranger, "prometheus": prometheus, **pod}
    for source_name, source in sources.items():
        for target, port in ports.items():
            expected = (source_name, target) in allowed
            assert connection_allowed(rendered, source, pod[target], port) == expected, (source_name, target)
    assert connection_allowed(rendered, outside, pod["gateway"], 8000)
    for role in SERVICES:
        metrics = DECLARED_PORTS[role][1]
        assert connection_allowed(rendered, prometheus, pod[role], metrics), role
        assert not connection_allowed(rendered, outside, pod[role], metrics), role
        assert connection_allowed(rendered, pod[role], outside, 53, "UDP"), role  # DNS
        assert not connection_allowed(rendered, pod[role], outside, 443), role


def test_gpu_overlay_puts_workers_on_gpus(overlays: dict[str, Rendered]) -> None:
    rendered = overlays["gpu"]
    for role in SERVICES:
        container = rendered.container(role)
        assert container["image"].endswith(":latest-cuda")
        gpus = container["resources"]["limits"].get("nvidia.com/gpu")
        assert gpus == ("1" if role in WORKERS else None), role
    for role in WORKERS:
        assert rendered.env(role)["DEVICE"] == "cuda"
        tolerations = rendered.get("Deployment", role)["spec"]["template"]["spec"]["tolerations"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    assert overlays["cpu"].env("prefill")["DEVICE"] == "cpu"
    assert overlays["cpu"].container("prefill")["image"] == "disagg-serve:latest"


def test_tls_component_mounts_a_certificate_per_role(overlays: dict[str, Rendered]) -> None:
    rendered = overlays["cpu-tls"]
    certificates, issuers = rendered.of_kind("Certificate"), rendered.of_kind("Issuer")
    for role in SERVICES:
        pod = rendered.get("Deployment", role)["spec"]["template"]["spec"]
        container = rendered.container(role)
        certificate = certificates[role]["spec"]
        assert certificate["issuerRef"]["name"] in issuers
        assert {"server auth", "client auth"} <= set(certificate["usages"])
        assert {role, f"{role}.{NAMESPACE}.svc", f"{role}.{NAMESPACE}.svc.cluster.local"} <= \
            set(certificate["dnsNames"])
        if role in WORKERS:  # dialled by pod address behind the headless Service
            assert f"*.{role}.{NAMESPACE}.svc.cluster.local" in certificate["dnsNames"]
        volume = next(v for v in pod["volumes"] if v["name"] == "tls")
        assert volume["secret"]["secretName"] == certificate["secretName"]
        assert {"name": "tls", "mountPath": "/etc/disagg/tls", "readOnly": True} in container["volumeMounts"]
        env = rendered.env(role)
        assert (env["TLS_CERT"], env["TLS_KEY"], env["TLS_CA"]) == \
            ("/etc/disagg/tls/tls.crt", "/etc/disagg/tls/tls.key", "/etc/disagg/tls/ca.crt")
        assert "127.0.0.1" in certificate["ipAddresses"]  # the probes' healthcheck dials 127.0.0.1
    assert "TLS_CERT" not in overlays["cpu"].env("gateway")


def test_service_monitor_scrapes_every_metrics_port(overlays: dict[str, Rendered]) -> None:
    rendered = overlays["cpu"]
    monitor = rendered.get("ServiceMonitor", "disagg-serve")["spec"]
    selected = {name for name, service in rendered.of_kind("Service").items()
                if monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()}
    assert selected == set(SERVICES)
    assert [endpoint["port"] for endpoint in monitor["endpoints"]] == ["metrics"]
    for role in SERVICES:
        service = rendered.get("Service", role)
        assert service["metadata"]["labels"][monitor["jobLabel"]] == role  # job = role, as in prometheus.yml
        assert {p["name"]: p["port"] for p in service["spec"]["ports"]}["metrics"] == DECLARED_PORTS[role][1]


async def test_declared_containers_start_and_serve(overlays: dict[str, Rendered], redis_url: str,
                                                   tmp_path: Path) -> None:
    """Each Deployment's command and environment, as rendered, on loopback (tiny model for speed)."""
    rendered = overlays["cpu"]
    ports = free_ports()
    specs = []
    for role in SERVICES:
        container = rendered.container(role)
        env = rendered.env(role) | {"MODEL": "tiny"}
        specs.append(declared_spec(role, container["command"] + container.get("args", []), env, ports,
                                   {env["REDIS_URL"]: redis_url}))
    with running(specs, tmp_path):
        async with GatewayClient(specs[-1].address) as client:
            result = await client.complete("The capital of France is", max_tokens=4, temperature=0)
        assert len(result.token_ids) >= 1 and result.usage.completion_tokens == len(result.token_ids)
