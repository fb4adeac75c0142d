"""Generates the Helm chart's values.schema.json from values.yaml and its `## @param` lines.

    python scripts/gen_schema.py            writes k8s/labelgrid/values.schema.json
    python scripts/gen_schema.py --check    exits 1 if the committed file differs

The generator is the source of the schema: never edit values.schema.json by hand (tests/helm
checks that regenerating it changes nothing). Types come from the defaults, refined by name or
path below (enums, ports, quantities, bounds); a value without a `## @param` line is an error.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parent.parent / "k8s" / "labelgrid"
SRC = CHART / "values.yaml"
OUT = CHART / "values.schema.json"

FREEFORM = {
    "nodeSelector",
    "affinity",
    "resources",
    "podAnnotations",
    "podLabels",
    "annotations",
    "commonLabels",
    "commonAnnotations",
    "podSecurityContext",
    "containerSecurityContext",
    "customStartupProbe",
    "customLivenessProbe",
    "customReadinessProbe",
    "volume",
    "labels",
    "behavior",
}
STRING_MAPS = {
    "nodeSelector",
    "podAnnotations",
    "podLabels",
    "annotations",
    "commonLabels",
    "commonAnnotations",
    "labels",
}
PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
QUANTITY = {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"}


def INT_OR_EMPTY(lo: int, hi: int) -> dict[str, Any]:
    return {"anyOf": [{"type": "integer", "minimum": lo, "maximum": hi}, {"type": "string", "enum": [""]}]}


INT_OR_PERCENT = {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": r"^([0-9]+%)?$"}]}
DELAY_MS = {"type": "number", "minimum": 0, "maximum": 10000}
PULL = {"type": "string", "enum": ["Always", "IfNotPresent", "Never"]}
OBJ_ITEMS = {"type": "array", "items": {"type": "object"}}
STR_ITEMS = {"type": "array", "items": {"type": "string"}}

BY_NAME: dict[str, dict[str, Any]] = {
    "port": PORT,
    "metricsPort": PORT,
    "adminPort": PORT,
    "pullPolicy": PULL,
    "podAntiAffinityPreset": {"type": "string", "enum": ["soft", "hard", "none"]},
    "scratchSizeLimit": QUANTITY,
    "shmSizeLimit": QUANTITY,
    "size": QUANTITY,
    "targetCPUUtilizationPercentage": INT_OR_EMPTY(1, 100),
    "targetMemoryUtilizationPercentage": INT_OR_EMPTY(1, 100),
    "minAvailable": INT_OR_PERCENT,
    "maxUnavailable": INT_OR_PERCENT,
    "replicaCount": {"type": "integer", "minimum": 0},
    "minReplicas": {"type": "integer", "minimum": 1},
    "maxReplicas": {"type": "integer", "minimum": 1},
    "count": {"type": "integer", "minimum": 1},
    "terminationGracePeriodSeconds": {"type": "integer", "minimum": 0},
    "initialDelaySeconds": {"type": "integer", "minimum": 0},
    "periodSeconds": {"type": "integer", "minimum": 1},
    "timeoutSeconds": {"type": "integer", "minimum": 1},
    "failureThreshold": {"type": "integer", "minimum": 1},
    "successThreshold": {"type": "integer", "minimum": 1},
    "accessModes": {
        "type": "array",
        "minItems": 1,
        "items": {"type": "string", "enum": ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]},
    },
    "tolerations": OBJ_ITEMS,
    "topologySpreadConstraints": OBJ_ITEMS,
    "extraEnv": OBJ_ITEMS,
    "extraEnvFrom": OBJ_ITEMS,
    "extraVolumes": OBJ_ITEMS,
    "extraVolumeMounts": OBJ_ITEMS,
    "imagePullSecrets": OBJ_ITEMS,
    "relabelings": OBJ_ITEMS,
    "metricRelabelings": OBJ_ITEMS,
    "edgeFrom": OBJ_ITEMS,
    "metricsFrom": OBJ_ITEMS,
    "tokens": STR_ITEMS,
    "corsOrigins": STR_ITEMS,
    "command": STR_ITEMS,
    "extraHosts": STR_ITEMS,
    "externalCIDRs": STR_ITEMS,
    "dnsPorts": {"type": "array", "items": PORT},
    "externalPorts": {"type": "array", "items": PORT},
    "config": {
        "type": "object",
        "additionalProperties": {"type": ["string", "number", "boolean"]},
        "propertyNames": {"pattern": "^[a-z][a-z0-9_]*$"},
    },
}
BY_PATH: dict[str, dict[str, Any]] = {
    "storage.type": {"type": "string", "enum": ["minio", "s3"]},
    "index.type": {"type": "string", "enum": ["postgresql", "external", "sqlite"]},
    "gateway.service.type": {"type": "string", "enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
    "gateway.service.externalTrafficPolicy": {"type": "string", "enum": ["Cluster", "Local"]},
    "gateway.service.nodePort": INT_OR_EMPTY(30000, 32767),
    "gateway.service.port": PORT,
    "logLevel": {"type": "string", "enum": ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]},
    "logFormat": {"type": "string", "enum": ["json", "console"]},
    "gateway.edge.logLevel": {
        "type": "string",
        "enum": ["trace", "debug", "info", "warning", "warn", "error", "critical", "off"],
    },
    "ingress.pathType": {"type": "string", "enum": ["Prefix", "Exact", "ImplementationSpecific"]},
    "app.files": {"type": "object", "additionalProperties": {"type": "string"}},
    "app.module": {"type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"},
    "app.package": {"type": "string", "pattern": r"^([A-Za-z_][A-Za-z0-9_]*)?$"},
    "image.digest": {"type": "string", "pattern": r"^(sha256:[a-f0-9]{64})?$"},
    "storage.s3.endpoint": {"type": "string", "pattern": r"^([^:/\s]+:[0-9]+)?$"},
    "inference.device": {"type": "string", "minLength": 1},
    "inference.batching.maxBatchSize": {"anyOf": [{"type": "integer", "minimum": 1}, {"type": "string", "enum": [""]}]},
    "inference.batching.maxQueueDelayMs": {"anyOf": [DELAY_MS, {"type": "string", "enum": [""]}]},
    "inference.batching.models": {
        "type": "object",
        "propertyNames": {"pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]*$"},
        "additionalProperties": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"maxBatchSize": {"type": "integer", "minimum": 1}, "maxQueueDelayMs": DELAY_MS},
        },
    },
    "inference.batch.width": {"anyOf": [{"type": "integer", "minimum": 1}, {"type": "string", "enum": [""]}]},
    "inference.autoscaling.queueDepth.metricName": {"type": "string", "pattern": r"^[a-zA-Z_:][a-zA-Z0-9_:]*$"},
    "inference.autoscaling.queueDepth.averageValue": QUANTITY,
    "auth.users.existingSecretKey": {"type": "string", "minLength": 1},
    "auth.signingKey.existingSecretKey": {"type": "string", "minLength": 1},
    "auth.tokenTTLSeconds": {"type": "integer", "minimum": 30, "maximum": 86400},
    "auth.oidc.usernameClaim": {"type": "string", "minLength": 1},
    "auth.oidc.rolesClaim": {"type": "string", "minLength": 1},
    "auth.oidc.egressTo": OBJ_ITEMS,
    "auth.oidc.egressPorts": {"type": "array", "items": PORT},
    "training.device": {"type": "string", "minLength": 1},
    "metrics.port": PORT,
    "metrics.podAnnotations": {"type": "boolean"},
    "gateway.edge.port": PORT,
    "gateway.edge.streamIdleTimeoutSeconds": {"type": "integer", "minimum": 1},
    "gateway.edge.maxConnections": {"type": "integer", "minimum": 1},
    "gateway.edge.statsPort": PORT,
    "gateway.edge.requestHeadersTimeoutSeconds": {"type": "number", "exclusiveMinimum": 0},
    "gateway.edge.maxHeapBytes": {"type": "integer", "minimum": 16777216},
    "metrics.serviceMonitor.interval": {"type": "string", "pattern": r"^[0-9]+(ms|s|m|h)$"},
    "metrics.serviceMonitor.scrapeTimeout": {"type": "string", "pattern": r"^[0-9]+(ms|s|m|h)$"},
    "dicomweb.url": {"type": "string", "pattern": r"^(https?://.+)?$"},
    "dicomweb.auth": {"type": "string", "enum": ["none", "basic", "bearer"]},
    "dicomweb.usernameKey": {"type": "string", "minLength": 1},
    "dicomweb.passwordKey": {"type": "string", "minLength": 1},
    "dicomweb.tokenKey": {"type": "string", "minLength": 1},
    "dicomweb.searchFilter": {"type": "object"},
    "dicomweb.syncSeconds": {"type": "number", "minimum": 0},
    "dicomweb.timeoutSeconds": {"type": "number", "exclusiveMinimum": 0},
    "dicomweb.egressTo": OBJ_ITEMS,
    "dicomweb.egressPorts": {"type": "array", "items": PORT},
}


def scalar(value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"type": "boolean"}
    if isinstance(value, int):
        return {"type": "integer"}
    if isinstance(value, float):
        return {"type": "number"}
    return {"type": "string"}


def schema_for(path: str, name: str, value: Any, descs: dict[str, str]) -> dict[str, Any]:
    s: dict[str, Any]
    if path in BY_PATH:
        s = dict(BY_PATH[path])
    elif path.endswith("autoscaling.metrics"):
        s = dict(OBJ_ITEMS)
    elif name in BY_NAME:
        s = dict(BY_NAME[name])
    elif name in FREEFORM:
        s = {"type": "object"}
        if name in STRING_MAPS:
            s["additionalProperties"] = {"type": "string"}
    elif isinstance(value, dict):
        s = {
            "type": "object",
            "additionalProperties": False,
            "properties": {k: schema_for(f"{path}.{k}" if path else k, k, v, descs) for k, v in value.items()},
        }
    elif isinstance(value, list):
        s = {"type": "array"}
    else:
        s = scalar(value)
    if path in descs:
        s = {"description": descs[path], **s}
    elif isinstance(value, (str, int, bool, list)) or name in FREEFORM:
        raise SystemExit(f"gen_schema: no `## @param {path}` line in values.yaml")
    return s


def generate(values_yaml: str) -> str:
    """The schema (the file's whole text) for the text of values.yaml."""
    values = yaml.safe_load(values_yaml)
    descs: dict[str, str] = dict(re.findall(r"^\s*## @param (\S+) (.*)$", values_yaml, re.M))
    root: dict[str, Any] = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "labelgrid Helm chart values",
        "type": "object",
        "additionalProperties": False,
        "properties": {k: schema_for(k, k, v, descs) for k, v in values.items()},
    }
    # helm adds `global` to every chart's values.
    root["properties"]["global"] = {"type": "object", "description": "Global values shared with subcharts (unused)"}
    return json.dumps(root, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare with the committed file; 1 if it differs")
    args = parser.parse_args(argv)
    text = generate(SRC.read_text())
    if args.check:
        if OUT.read_text() != text:
            print(f"{OUT} is out of date: run python scripts/gen_schema.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print("wrote", OUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
