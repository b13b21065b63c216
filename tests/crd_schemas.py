"""Minimal structural JSON Schemas for the custom resources in deploy/k8s, which
kubernetes-validate's built-in schemas do not cover: Prometheus Operator's ServiceMonitor and
cert-manager's Certificate and Issuer. Written from the fields of their CRDs
(monitoring.coreos.com/v1, cert-manager.io/v1): required fields, types, enums and formats of what
these manifests use; an unknown field under `spec` fails, so a typo does not pass unnoticed."""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

GO_DURATION = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"           # cert-manager durations
PROM_DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
KEY_USAGES = ["signing", "digital signature", "content commitment", "key encipherment", "key agreement",
              "data encipherment", "cert sign", "crl sign", "encipher only", "decipher only", "any",
              "server auth", "client auth", "code signing", "email protection", "s/mime", "ipsec end system",
              "ipsec tunnel", "ipsec user", "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc"]

STRING = {"type": "string"}
STRINGS = {"type": "array", "items": STRING}
LABEL_SELECTOR = {
    "type": "object", "additionalProperties": False,
    "properties": {"matchLabels": {"type": "object", "additionalProperties": STRING},
                   "matchExpressions": {"type": "array", "items": {"type": "object"}}}}


def _resource(api_version: str, kind: str, spec: Schema) -> Schema:
    return {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": api_version}, "kind": {"const": kind},
            "metadata": {"type": "object", "required": ["name"],
                         "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"},
                                        "namespace": STRING,
                                        "labels": {"type": "object", "additionalProperties": STRING},
                                        "annotations": {"type": "object", "additionalProperties": STRING}}},
            "spec": spec}}


SERVICE_MONITOR = _resource("monitoring.coreos.com/v1", "ServiceMonitor", {
    "type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
    "properties": {
        "jobLabel": STRING, "selector": LABEL_SELECTOR, "targetLabels": STRINGS, "podTargetLabels": STRINGS,
        "namespaceSelector": {"type": "object", "additionalProperties": False,
                              "properties": {"any": {"type": "boolean"}, "matchNames": STRINGS}},
        "endpoints": {"type": "array", "minItems": 1, "items": {
            "type": "object", "additionalProperties": False,
            "properties": {"port": STRING, "targetPort": {"type": ["integer", "string"]}, "path": STRING,
                           "scheme": {"enum": ["http", "https"]},
                           "interval": {"type": "string", "pattern": PROM_DURATION},
                           "scrapeTimeout": {"type": "string", "pattern": PROM_DURATION},
                           "honorLabels": {"type": "boolean"},
                           "relabelings": {"type": "array"}, "metricRelabelings": {"type": "array"}}}}}})

ISSUER_REF = {"type": "object", "required": ["name"], "additionalProperties": False,
              "properties": {"name": STRING, "kind": {"enum": ["Issuer", "ClusterIssuer"]}, "group": STRING}}

CERTIFICATE = _resource("cert-manager.io/v1", "Certificate", {
    "type": "object", "required": ["secretName", "issuerRef"], "additionalProperties": False,
    "properties": {
        "secretName": STRING, "issuerRef": ISSUER_REF, "commonName": STRING, "isCA": {"type": "boolean"},
        "dnsNames": STRINGS, "ipAddresses": STRINGS, "uris": STRINGS,
        "duration": {"type": "string", "pattern": GO_DURATION},
        "renewBefore": {"type": "string", "pattern": GO_DURATION},
        "usages": {"type": "array", "items": {"enum": KEY_USAGES}},
        "privateKey": {"type": "object", "additionalProperties": False,
                       "properties": {"algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                                      "encoding": {"enum": ["PKCS1", "PKCS8"]},
                                      "size": {"type": "integer"},
                                      "rotationPolicy": {"enum": ["Never", "Always"]}}}}})

ISSUER = _resource("cert-manager.io/v1", "Issuer", {
    "type": "object", "minProperties": 1, "maxProperties": 1, "additionalProperties": False,
    "properties": {
        "selfSigned": {"type": "object", "additionalProperties": False,
                       "properties": {"crlDistributionPoints": STRINGS}},
        "ca": {"type": "object", "required": ["secretName"], "additionalProperties": False,
               "properties": {"secretName": STRING, "crlDistributionPoints": STRINGS}}}})

CRD_SCHEMAS: dict[tuple[str, str], Schema] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
    ("cert-manager.io/v1", "Certificate"): CERTIFICATE,
    ("cert-manager.io/v1", "Issuer"): ISSUER,
}
