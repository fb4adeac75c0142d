"""The chart's DICOMweb backend (values `dicomweb.*`): rendered into the datastore's and the
gateway's env (one PACS for the datastore and /proxy/dicom), credentials only from an existing
Secret, the search filter as JSON the datastore parses, egress to the PACS in the
NetworkPolicies. Rendered offline with helm-python-sdk and validated with kubernetes-validate
(ci/dicomweb.yaml also runs through every check of test_chart.py)."""

from __future__ import annotations

import json
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from services.datastore.adapters.dicomweb import parse_search_filter
from tests.fixtures.chart import CHART, NAMESPACE, RELEASE, component_of, deployment_of, of_kind, pod_spec, render


def _ci() -> dict[str, Any]:
    return yaml.safe_load((CHART / "ci" / "dicomweb.yaml").read_text())


def _env(docs: list[dict[str, Any]], component: str) -> dict[str, dict[str, Any]]:
    [container] = [c for c in pod_spec(deployment_of(docs, component))["containers"] if c["name"] == component]
    return {entry["name"]: entry for entry in container["env"]}


def _secret_ref(entry: dict[str, Any]) -> tuple[str, str]:
    ref = entry["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


def test_dicomweb_values_reach_the_datastore_and_the_gateway(chart: Any) -> None:
    values = _ci()
    docs = render(chart, values)
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com"):
            continue
        kubernetes_validate.validate(doc, "1.33", strict=True)
    datastore, gateway = _env(docs, "datastore"), _env(docs, "gateway")
    assert datastore["LABELGRID_BACKEND"]["value"] == "dicomweb"
    for env in (datastore, gateway):
        assert env["LABELGRID_DICOMWEB_URL"]["value"] == values["dicomweb"]["url"]
        assert _secret_ref(env["LABELGRID_DICOMWEB_USERNAME"]) == ("labelgrid-pacs", "username")
        assert _secret_ref(env["LABELGRID_DICOMWEB_PASSWORD"]) == ("labelgrid-pacs", "password")
        assert "LABELGRID_DICOMWEB_TOKEN" not in env
    # The filter is JSON the datastore's own parser takes, with every attribute of the values.
    assert (
        parse_search_filter(datastore["LABELGRID_DICOMWEB_SEARCH_FILTER"]["value"])
        == values["dicomweb"]["searchFilter"]
    )
    assert datastore["LABELGRID_DICOMWEB_SYNC_SECONDS"]["value"] == "120"
    assert "LABELGRID_DICOMWEB_SEARCH_FILTER" not in gateway  # the proxy passes any query on
    # Both may reach the PACS (and only where the values say).
    for component in ("datastore", "gateway"):
        [policy] = [p for p in of_kind(docs, "NetworkPolicy") if component_of(p) == component]
        rules = [
            rule for rule in policy["spec"]["egress"] if {"port": 8042, "protocol": "TCP"} in rule.get("ports", [])
        ]
        assert rules and rules[0]["to"] == values["dicomweb"]["egressTo"], component
    [inference] = [p for p in of_kind(docs, "NetworkPolicy") if component_of(p) == "inference"]
    assert all({"port": 8042, "protocol": "TCP"} not in rule.get("ports", []) for rule in inference["spec"]["egress"])


def test_bearer_credentials_and_the_default_without_a_pacs(chart: Any) -> None:
    values = _ci()
    values["dicomweb"].update(auth="bearer", tokenKey="access-token")
    for env in (_env(render(chart, values), "datastore"), _env(render(chart, values), "gateway")):
        assert _secret_ref(env["LABELGRID_DICOMWEB_TOKEN"]) == ("labelgrid-pacs", "access-token")
        assert "LABELGRID_DICOMWEB_USERNAME" not in env and "LABELGRID_DICOMWEB_PASSWORD" not in env
    default = render(chart, {})
    for component in ("datastore", "gateway"):
        assert not [name for name in _env(default, component) if name.startswith("LABELGRID_DICOMWEB_")]
    assert _env(default, "datastore")["LABELGRID_BACKEND"]["value"] == "s3"
    assert json.loads(_env(render(chart, {"dicomweb": {"enabled": True, "url": "https://pacs.example.org/dicom-web"}}), "datastore")[
        "LABELGRID_DICOMWEB_SEARCH_FILTER"
    ]["value"]) == {"Modality": "CT"}  # fmt: skip


@pytest.mark.parametrize(
    "dicomweb",
    [
        {"enabled": True},  # no URL
        {"enabled": True, "url": "pacs:8042/dicom-web"},  # not http(s)
        {"enabled": True, "url": "http://pacs/dicom-web", "auth": "basic"},  # no Secret
        {"enabled": True, "url": "http://pacs/dicom-web", "auth": "bearer"},
        {"enabled": True, "url": "http://pacs/dicom-web", "auth": "digest"},
    ],
)
def test_wrong_dicomweb_values_fail_to_render(chart: Any, dicomweb: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmError):
        chart.render({"dicomweb": dicomweb}, name=RELEASE, namespace=NAMESPACE)
