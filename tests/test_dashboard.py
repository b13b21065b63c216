"""The Grafana dashboard, the Prometheus config and the autoscaling rules ask only for metrics the
services export: every metric name in their PromQL is read off a running stack's /metrics pages.
And the docker-compose monitoring (Prometheus, Grafana) is wired to the files in deploy/."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from services.client import GatewayClient
from tests.conftest import SERVICE_NAMES, start_stack
from tests.declared import DECLARED_PORTS

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "disagg-serve.json"
ADAPTER = ROOT / "deploy" / "k8s" / "prometheus-adapter" / "values.yaml"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
            "offset", "inf", "nan", "Inf", "NaN"}
LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*\w+\s*\)\s*$")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers followed by a label matcher or a
    range, or standing bare; not functions, aggregations, keywords, label names or numbers."""
    expr = re.sub(r"<<[^>]*>>", "", expr)                                # prometheus-adapter templates
    expr = re.sub(r"\$\{[^}]*\}|\$\w+", "", expr)                        # Grafana variables
    expr = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)  # strings
    expr = re.sub(r"\{[^{}]*\}", "", expr)                               # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)                               # ranges, subqueries
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)  # label lists
    names = set()
    for match in re.finditer(r"(?<![\w.])[a-zA-Z_:][\w:]*", expr):
        if match.group() not in KEYWORDS and not expr[match.end():].lstrip().startswith("("):
            names.add(match.group())
    return names


def test_metric_names_parser() -> None:
    assert metric_names('histogram_quantile(0.99, sum by (le, job) (rate(a_bucket{code!="OK", x=~"$v"}'
                        '[$__rate_interval])))') == {"a_bucket"}
    assert metric_names("sum(rate(b_total[5m])) by (pod) / on(pod) group_left(node) c > bool 1e9") == \
        {"b_total", "c"}
    assert metric_names("max by (<<.GroupBy>>) (avg_over_time(d{<<.LabelMatchers>>}[1m])) or vector(0)") == {"d"}
    assert metric_names("e offset 5m unless f[10m:1m]") == {"e", "f"}
    assert metric_names('count(g{name="h(i)"}) + topk(5, j)') == {"g", "j"}


def dashboard_expressions() -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every query in the dashboard: panel targets (rows included) and variables."""
    dashboard = json.loads(DASHBOARD.read_text())

    def panels(items: list[dict]) -> Iterator[dict]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r}", target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            label_values = LABEL_VALUES.match(query)
            yield f"variable {variable['name']}", label_values.group(1) if label_values else query


def adapter_expressions() -> Iterator[tuple[str, str]]:
    for rule in yaml.safe_load(ADAPTER.read_text())["rules"]["custom"]:
        yield f"adapter rule {rule['name']['as']}", rule["seriesQuery"]
        yield f"adapter rule {rule['name']['as']}", rule["metricsQuery"]


@pytest.fixture(scope="module")
async def exported(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Every metric sample name on the four services' /metrics pages, after one request (the
    prefill checkpoints its KV, so the kvstore handles calls too)."""
    running = start_stack(tmp_path_factory.mktemp("dashboard-stack"), "tiny",
                          extra={"prefill": ("--checkpoint-kv",)})
    try:
        async with GatewayClient(running["gateway"]) as client:
            await client.complete("The capital of France is", max_tokens=4, temperature=0)
        names: set[str] = set()
        for service in SERVICE_NAMES:
            url = f"http://127.0.0.1:{running.metrics_ports[service]}/metrics"
            with urllib.request.urlopen(url, timeout=10) as reply:
                text = reply.read().decode()
            names |= {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}
        return names
    finally:
        running.stack.stop()


def test_every_queried_metric_is_exported(exported: set[str]) -> None:
    queried = [*dashboard_expressions(), *adapter_expressions()]
    assert len(queried) > 20
    for where, expr in queried:
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), (where, expr)
        names = metric_names(expr)
        assert names, (where, expr)
        assert names <= exported, f"{where}: {sorted(names - exported)} not exported ({expr})"


def test_dashboard_covers_each_signal() -> None:
    """TTFT, TPOT/ITL, handoff, KV bytes and throughput, pool pressure, queues, busy, errors by code."""
    dashboard = json.loads(DASHBOARD.read_text())
    used = set().union(*(metric_names(expr) for _, expr in dashboard_expressions()))
    for name in ("disagg_ttft_seconds_bucket", "disagg_time_per_output_token_seconds_bucket",
                 "disagg_inter_token_latency_seconds_bucket", "disagg_kv_handoff_seconds_bucket",
                 "disagg_kv_transfer_bytes_total", "disagg_kv_received_bytes_total",
                 "disagg_kv_transfer_throughput_bytes_per_second_bucket", "disagg_kv_pool_pressure",
                 "disagg_decode_queue_depth", "disagg_model_loop_queue_depth", "disagg_model_loop_busy_fraction",
                 "disagg_rpc_requests_total"):
        assert name in used, name
    assert any("by (service, method, code)" in expr for _, expr in dashboard_expressions())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert all(panel.get("datasource", {"uid": "${datasource}"})["uid"] == "${datasource}"
               for panel in dashboard["panels"] if panel["type"] != "row")


def test_compose_scrapes_every_service_and_provisions_grafana() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    scrape_configs = yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]
    jobs = {job["job_name"]: job["dns_sd_configs"][0] for job in scrape_configs}
    assert set(jobs) == set(SERVICE_NAMES)
    for name, discovery in jobs.items():
        assert discovery["names"] == [name] and discovery["type"] == "A"
        assert discovery["port"] == int(compose[name]["environment"][f"{name.upper()}_METRICS_PORT"]) == \
            DECLARED_PORTS[name][1]
    mounts = {}
    for service in ("prometheus", "grafana"):
        for volume in compose[service]["volumes"]:
            source, target = volume.split(":")[:2]
            assert (ROOT / source).exists(), volume
            mounts[target] = ROOT / source
    assert mounts["/etc/prometheus/prometheus.yml"] == ROOT / "deploy/prometheus/prometheus.yml"
    datasource = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090" and datasource["type"] == "prometheus"
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "disagg-serve.yml").read_text())["providers"][0]
    assert mounts[f"{provider['options']['path']}/disagg-serve.json"] == DASHBOARD
    assert mounts["/etc/grafana/provisioning"] == PROVISIONING
