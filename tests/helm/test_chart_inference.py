"""The chart's inference scaling, rendered offline (helm-python-sdk) and checked against the code:
batch fan-out over the headless Service, per-model dynamic batching values that the inference
service's own settings parse, the HPA on queue depth and the Prometheus adapter rule of the
chart README, and no bundled MinIO beside a DICOMweb datastore unless asked.
(ci/inference-scaling.yaml also runs through every check of test_chart.py, kubeconform included.)"""

from __future__ import annotations

import json
import re
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from services.common.models.batching import BatchPolicy
from services.infer.settings import InferSettings
from tests.fixtures.chart import (
    CHART,
    KUBE_VERSIONS,
    NAMESPACE,
    RELEASE,
    component_of,
    deployment_of,
    of_kind,
    pod_spec,
    render,
)

HEADLESS = f"{RELEASE}-labelgrid-inference-headless"


def _ci(name: str) -> dict[str, Any]:
    return yaml.safe_load((CHART / "ci" / name).read_text())


def _env(docs: list[dict[str, Any]], component: str) -> dict[str, str]:
    [container] = [c for c in pod_spec(deployment_of(docs, component))["containers"] if c["name"] == component]
    return {entry["name"]: entry.get("value", "<from a reference>") for entry in container["env"]}


def _hpa(docs: list[dict[str, Any]], component: str) -> dict[str, Any]:
    [found] = [doc for doc in of_kind(docs, "HorizontalPodAutoscaler") if component_of(doc) == component]
    return found


def _validate(docs: list[dict[str, Any]]) -> None:
    for doc in docs:
        if not doc["apiVersion"].startswith("monitoring.coreos.com"):
            for version in KUBE_VERSIONS:
                kubernetes_validate.validate(doc, version, strict=True)


def test_batch_inference_fans_out_over_the_headless_service(chart: Any) -> None:
    docs = render(chart, {})
    [headless] = [s for s in of_kind(docs, "Service") if s["metadata"]["name"] == HEADLESS]
    inference = deployment_of(docs, "inference")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"] == inference["spec"]["selector"]["matchLabels"]  # every inference pod
    port = headless["spec"]["ports"][0]["port"]
    env = _env(docs, "inference")
    assert env["LABELGRID_BATCH_ADDRESS"] == f"dns:///{HEADLESS}:{port}"
    # Default width: 2 x maxReplicas (autoscaling) x GPUs per pod x slots per GPU.
    assert env["LABELGRID_BATCH_WIDTH"] == str(2 * 4 * 1 * 1)
    settings = InferSettings.model_validate(
        {"batch_address": env["LABELGRID_BATCH_ADDRESS"], "batch_width": env["LABELGRID_BATCH_WIDTH"]}
    )
    assert settings.batch_width == 8
    # The inference pods may call each other on their gRPC port (and nothing else changed for others).
    [policy] = [p for p in of_kind(docs, "NetworkPolicy") if component_of(p) == "inference"]
    peers = [rule for rule in policy["spec"]["ingress"] if {"port": port, "protocol": "TCP"} in rule["ports"]]
    assert "inference" in peers[0]["from"][0]["podSelector"]["matchExpressions"][0]["values"]
    egress = [rule for rule in policy["spec"]["egress"] if {"port": port, "protocol": "TCP"} in rule.get("ports", [])]
    assert egress and "inference" in egress[0]["to"][0]["podSelector"]["matchExpressions"][0]["values"]
    [datastore_policy] = [p for p in of_kind(docs, "NetworkPolicy") if component_of(p) == "datastore"]
    allowed = datastore_policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchExpressions"][0]["values"]
    assert "datastore" not in allowed
    # Off: this pod's devices only; a fixed width still reaches the service.
    off = _env(render(chart, {"inference": {"batch": {"fanOut": False, "width": 3}}}), "inference")
    assert "LABELGRID_BATCH_ADDRESS" not in off and off["LABELGRID_BATCH_WIDTH"] == "3"
    fixed = _env(
        render(chart, {"inference": {"autoscaling": {"enabled": False}, "replicaCount": 3, "gpu": {"count": 2}}}),
        "inference",
    )
    assert fixed["LABELGRID_BATCH_WIDTH"] == str(2 * 3 * 2)


def test_per_model_batching_reaches_the_inference_settings(chart: Any) -> None:
    values = _ci("inference-scaling.yaml")
    env = _env(render(chart, values), "inference")
    settings = InferSettings.model_validate(
        {
            "max_batch_size": env["LABELGRID_MAX_BATCH_SIZE"],
            "max_queue_delay_ms": env["LABELGRID_MAX_QUEUE_DELAY_MS"],
            "model_batching": env["LABELGRID_MODEL_BATCHING"],
        }
    )
    assert (settings.max_batch_size, settings.max_queue_delay_ms) == (8, 5.0)
    assert settings.model_batching == {
        "segmentation": BatchPolicy(max_batch_size=16, max_queue_delay_ms=10.0),
        "deepedit": BatchPolicy(max_batch_size=1),
    }
    default = _env(render(chart, {}), "inference")  # unset: the service decides by device
    assert not {"LABELGRID_MAX_BATCH_SIZE", "LABELGRID_MAX_QUEUE_DELAY_MS", "LABELGRID_MODEL_BATCHING"} & set(default)


@pytest.mark.parametrize(
    "batching",
    [
        {"maxBatchSize": 0},
        {"maxQueueDelayMs": 10_001},
        {"models": {"segmentation": {"maxBatchSize": 0}}},
        {"models": {"segmentation": {"max_batch_size": 8}}},  # the values' spelling is camelCase
        {"models": {"../x": {"maxBatchSize": 2}}},
    ],
)
def test_wrong_batching_values_are_refused(chart: Any, batching: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        chart.render({"inference": {"batching": batching}}, name=RELEASE, namespace=NAMESPACE)


def _adapter_rule() -> dict[str, Any]:
    """The Prometheus adapter rule of the chart README (its first yaml block with `rules:`)."""
    blocks = re.findall(r"```yaml\n(.*?)```", (CHART / "README.md").read_text(), re.S)
    [rules] = [yaml.safe_load(block)["rules"] for block in blocks if block.startswith("rules:")]
    [rule] = rules["custom"]
    return rule


def test_queue_depth_autoscaling_and_its_adapter_rule(chart: Any) -> None:
    """Off by default; on, the HPA asks for the Pods metric the README's adapter rule serves,
    and that rule reads a metric the inference service really exports, per pod."""
    default = _hpa(render(chart, {}), "inference")
    assert [m["type"] for m in default["spec"]["metrics"]] == ["Resource"]
    docs = render(chart, _ci("inference-scaling.yaml"))
    _validate([_hpa(docs, "inference")])
    hpa = _hpa(docs, "inference")
    [pods] = [m for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert pods["pods"]["target"] == {"type": "AverageValue", "averageValue": "2"}
    assert hpa["spec"]["maxReplicas"] == 6 and [m["type"] for m in hpa["spec"]["metrics"]] == ["Pods"]
    rule = _adapter_rule()
    assert pods["pods"]["metric"]["name"] == rule["name"]["as"]
    series = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", rule["seriesQuery"])
    assert series is not None and re.fullmatch(rule["name"]["matches"].strip("^$"), series.group(1))
    exported = (CHART.parents[1] / "services" / "infer" / "adapters" / "metrics.py").read_text()
    assert f'"{series.group(1)}"' in exported, "the rule must read a metric the inference service exports"
    assert series.group(1) in rule["metricsQuery"] and "by (<<.GroupBy>>)" in rule["metricsQuery"]
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    # The HPA's metric name is the value's.
    renamed = render(chart, {"inference": {"autoscaling": {"queueDepth": {"enabled": True, "metricName": "queue_x"}}}})
    assert "queue_x" in json.dumps(_hpa(renamed, "inference")["spec"]["metrics"])
    with pytest.raises(helm.HelmValuesError):
        chart.render(
            {"inference": {"autoscaling": {"queueDepth": {"averageValue": "two"}}}}, name=RELEASE, namespace=NAMESPACE
        )
    # An autoscaler with nothing to scale on is refused, not rendered without metrics.
    with pytest.raises(helm.HelmError, match=r"inference\.autoscaling is on without a metric"):
        chart.render(
            {"inference": {"autoscaling": {"targetCPUUtilizationPercentage": ""}}}, name=RELEASE, namespace=NAMESPACE
        )


def _minio_objects(docs: list[dict[str, Any]]) -> list[str]:
    return [f"{doc['kind']}/{doc['metadata']['name']}" for doc in docs if "minio" in doc["metadata"]["name"]]


def test_no_minio_beside_a_dicomweb_datastore_unless_asked(chart: Any) -> None:
    assert _minio_objects(render(chart, {}))  # the default: MinIO bundled
    values = _ci("dicomweb.yaml")
    docs = render(chart, values)
    assert _minio_objects(docs) == []
    env = _env(docs, "datastore")
    assert env["LABELGRID_BACKEND"] == "dicomweb" and not [name for name in env if name.startswith("LABELGRID_S3_")]
    [policy] = [p for p in of_kind(docs, "NetworkPolicy") if component_of(p) == "datastore"]
    assert "minio" not in json.dumps(policy["spec"]["egress"])
    _validate(docs)
    asked = render(chart, {**values, "minio": {"withDicomweb": True}})
    assert {"StatefulSet", "Service", "Secret", "NetworkPolicy"} <= {
        name.split("/")[0] for name in _minio_objects(asked)
    }
    assert "LABELGRID_S3_ENDPOINT" in _env(asked, "datastore")
    external = {
        **values,
        "storage": {"type": "s3", "s3": {"endpoint": "s3.example.org:443", "existingSecret": "s3-keys"}},
    }
    assert _env(render(chart, external), "datastore")["LABELGRID_S3_ENDPOINT"] == "s3.example.org:443"
