"""The whole stack under a real Prometheus: every component is scraped and its metrics make sense.

`labelgrid up` runs the stack on free ports as a user runs it; the services' metrics ports
are picked by the services (0) and read from their ready lines ("datastore | ... metrics on
127.0.0.1:PORT"). A generated prometheus.yml scrapes datastore, inference, the gateway's
/metrics and Envoy's /stats/prometheus every second; the real `prometheus` binary (Debian's
2.42: `apt-get install --no-install-recommends prometheus`) stores them, and the test asks
it over its HTTP API, as Grafana and the alert rules would. `promtool` checks the generated
config, the shipped alert rules (with a unit test of two alerts), and every dashboard query
is run against the live Prometheus so none is malformed.

Without the binaries these tests fail (never skip): `make test` installs them.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import nibabel as nib
import numpy as np
import pytest

from tests.fixtures.labelgrid_up import Stack, start_stack, stop_stack
from tests.fixtures.polling import wait_until
from tests.ports import free_ports

pytestmark = pytest.mark.timeout(240)

REPO = Path(__file__).resolve().parents[2]
ALERTS = REPO / "k8s" / "labelgrid" / "files" / "alerts.rules.yaml"
DASHBOARD = REPO / "k8s" / "labelgrid" / "files" / "dashboard.json"
INSTALL_HINT = (
    "the Prometheus binaries are missing: `apt-get install -y --no-install-recommends prometheus` "
    "(Debian/Ubuntu; `make test` does it) puts `prometheus` and `promtool` on PATH"
)
JOBS = ("labelgrid-datastore", "labelgrid-inference", "labelgrid-gateway", "labelgrid-envoy")
METRICS_LINE = r"(?m)^\s*{name} \| .*metrics on 127\.0\.0\.1:(\d+)"
# The uploaded image's id: it must never show up as a label value anywhere.
IMAGE_ID = f"promcheck_{secrets.token_hex(6)}"
SESSION_ID = f"nosuchsession{secrets.token_hex(6)}"


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` not found: {INSTALL_HINT}")
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([binary("promtool"), *args], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"promtool {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


# -- rules, config and dashboard, offline ------------------------------------------------


def test_promtool_checks_the_alert_rules() -> None:
    out = run_promtool("check", "rules", str(ALERTS)).stdout
    assert "SUCCESS" in out


ALERT_UNIT_TEST = """
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'up{{job="labelgrid-datastore", instance="a:1"}}'
        values: '1 0 0 0 0'
      - series: 'up{{job="labelgrid-gateway", instance="b:1"}}'
        values: '1 1 1 1 1'
      - series: 'labelgrid_gateway_requests_total{{job="labelgrid-gateway", method="POST", route="/infer/{{model}}", status="500"}}'
        values: '0+6x20'
      - series: 'labelgrid_gateway_requests_total{{job="labelgrid-gateway", method="POST", route="/infer/{{model}}", status="200"}}'
        values: '0+6x20'
      - series: 'labelgrid_gateway_requests_total{{job="labelgrid-gateway", method="GET", route="/train/", status="501"}}'
        values: '0+600x20'
    alert_rule_test:
      - eval_time: 4m
        alertname: LabelgridServiceDown
        exp_alerts:
          - exp_labels: {{severity: critical, job: labelgrid-datastore, instance: "a:1"}}
            exp_annotations:
              summary: "labelgrid labelgrid-datastore is down"
              description: >-
                Prometheus could not scrape labelgrid-datastore on a:1 for 2 minutes:
                the process is down, not ready, or its metrics port is unreachable.
      - eval_time: 15m
        alertname: LabelgridGatewayHigh5xxRate
        exp_alerts:
          - exp_labels: {{severity: warning, job: labelgrid-gateway}}
            exp_annotations:
              summary: "The REST gateway answers 50% of requests with 5xx"
              description: >-
                More than 5% of MONAI Label REST requests ended with a server error (501 excluded)
                over 5 minutes.
"""


def test_alert_rules_fire_as_intended(tmp_path: Path) -> None:
    """A datastore that stops answering fires ServiceDown; half the infers failing fires the
    5xx alert even though the 501s of unserved routes (excluded) dominate the traffic."""
    shutil.copy(ALERTS, tmp_path / "alerts.rules.yaml")
    test_file = tmp_path / "alerts.test.yaml"
    test_file.write_text(ALERT_UNIT_TEST.format(rules=json.dumps("alerts.rules.yaml")))
    run_promtool("test", "rules", str(test_file))


def test_dashboard_is_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    exprs = dashboard_queries(dashboard)
    assert len(exprs) >= 20
    text = " ".join(exprs)
    for name in (
        "grpc_server_handled_total",
        "grpc_server_handling_seconds_bucket",
        "labelgrid_gateway_requests_total",
        "labelgrid_inference_queue_waiting",
        "labelgrid_inference_queue_estimated_wait_seconds",
        "labelgrid_inference_model_version_info",
        "labelgrid_datastore_objects",
        "labelgrid_datastore_bytes_received_total",
        "labelgrid_device_memory_used_bytes",
    ):
        assert name in text, f"the dashboard has no panel on {name}"


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


# -- the live stack under Prometheus -----------------------------------------------------


@dataclass
class Monitored:
    stack: Stack
    prometheus: subprocess.Popen[str]
    api: str
    config: Path
    gateway_port: int


def metrics_port(stack: Stack, name: str) -> int:
    """The metrics port from a child's (latest) ready line, as `labelgrid up` prefixes it."""
    stack.wait_for(METRICS_LINE.format(name=name), timeout=30)
    return int(re.findall(METRICS_LINE.format(name=name), stack.text(), re.MULTILINE)[-1])


def gateway_port(stack: Stack) -> int:
    match = stack.wait_for(r"gateway \| gateway listening on http://127\.0\.0\.1:(\d+)", timeout=30)
    return int(match[1])


def admin_port(stack: Stack) -> int:
    match = stack.wait_for(r"Envoy admin http://127\.0\.0\.1:(\d+)/", timeout=30)
    return int(match[1])


def prometheus_config(targets: dict[str, tuple[int, str]]) -> str:
    lines = ["global:", "  scrape_interval: 1s", "  scrape_timeout: 1s", "  evaluation_interval: 1s", "scrape_configs:"]
    for job, (port, path) in targets.items():
        lines += [
            f"  - job_name: {job}",
            f"    metrics_path: {path}",
            "    static_configs:",
            f"      - targets: ['127.0.0.1:{port}']",
        ]
    return "\n".join(lines) + "\n"


def stop_process(proc: subprocess.Popen[str], timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def monitored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Monitored]:
    prometheus_bin = binary("prometheus")
    binary("promtool")
    root = tmp_path_factory.mktemp("prometheus")
    stack = start_stack(root / "stack")
    prometheus: subprocess.Popen[str] | None = None
    try:
        gw = gateway_port(stack)
        targets = {
            "labelgrid-datastore": (metrics_port(stack, "datastore"), "/metrics"),
            "labelgrid-inference": (metrics_port(stack, "inference"), "/metrics"),
            "labelgrid-gateway": (metrics_port(stack, "gateway"), "/metrics"),
            "labelgrid-envoy": (admin_port(stack), "/stats/prometheus"),
        }
        config = root / "prometheus.yml"
        config.write_text(prometheus_config(targets))
        (port,) = free_ports(1)
        log = (root / "prometheus.log").open("w")
        prometheus = subprocess.Popen(
            [
                prometheus_bin,
                f"--config.file={config}",
                f"--storage.tsdb.path={root / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        api = f"http://127.0.0.1:{port}/api/v1"

        def ready() -> bool:
            assert prometheus.poll() is None, f"prometheus exited:\n{(root / 'prometheus.log').read_text()[-4000:]}"
            try:
                return httpx.get(f"http://127.0.0.1:{port}/-/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, "prometheus to be ready", timeout=20)
        running = Monitored(stack, prometheus, api, config, gw)
        drive_traffic(running, root)
        yield running
    finally:
        if prometheus is not None:
            stop_process(prometheus)
        stop_stack(stack)


def query(monitored: Monitored, promql: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{monitored.api}/query", params={"query": promql}, timeout=10)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", f"{promql}: {body}"
    return body["data"]["result"]  # type: ignore[no-any-return]


def wait_for(monitored: Monitored, promql: str, timeout: float = 30.0) -> None:
    wait_until(lambda: query(monitored, promql), f"a series for {promql}", timeout=timeout, interval=0.5)


def drive_traffic(monitored: Monitored, tmp_path: Path) -> None:
    """Through Envoy, as clients do: an upload, an inference, and requests that fail."""
    url = monitored.stack.url
    image = tmp_path / f"{IMAGE_ID}.nii.gz"
    volume = np.zeros((32, 32, 32), dtype=np.float32)
    volume[8:20, 8:20, 8:20] = 1.0
    nib.save(nib.Nifti1Image(volume, np.eye(4)), image)
    with image.open("rb") as handle:
        uploaded = httpx.put(
            f"{url}/datastore/image", params={"image": IMAGE_ID}, files={"file": (image.name, handle)}, timeout=60
        )
    assert uploaded.status_code == 200, uploaded.text
    inferred = httpx.post(f"{url}/infer/segmentation", params={"image": IMAGE_ID, "output": "json"}, timeout=120)
    assert inferred.status_code == 200, inferred.text[:500]
    # Fails in the gateway and in the datastore (gRPC NotFound): a non-OK code is counted.
    missing = httpx.get(f"{url}/datastore/image", params={"image": f"{IMAGE_ID}_missing"}, timeout=30)
    assert missing.status_code == 404, missing.text
    # An id in the path: the route label must be the template, not this path.
    no_session = httpx.get(f"{url}/session/{SESSION_ID}", timeout=30)
    assert no_session.status_code == 404, no_session.text


# PromQL that must return at least one series once the traffic above was scraped.
EXPECTED: dict[str, str] = {
    **{f"{job} is up": f'up{{job="{job}"}} == 1' for job in JOBS},
    "handled RPCs carry service, method and code": (
        'grpc_server_handled_total{job="labelgrid-datastore", grpc_service="labelgrid.datastore.v1.DatastoreService",'
        ' grpc_method="UploadImage", grpc_code="OK"} > 0'
    ),
    "a non-OK gRPC code was counted": 'grpc_server_handled_total{job="labelgrid-datastore", grpc_code="NotFound"} > 0',
    "inference RPCs were counted": 'sum(grpc_server_handled_total{job="labelgrid-inference", grpc_code="OK", grpc_service!="grpc.health.v1.Health"}) > 0',
    "handling-time histogram": 'grpc_server_handling_seconds_bucket{job="labelgrid-datastore", le="+Inf"} > 0',
    "gateway counted the inference by template": (
        'labelgrid_gateway_requests_total{job="labelgrid-gateway", method="POST", route="/infer/{model}", status="200"} > 0'
    ),
    "gateway counted the 404 of a path with an id by template": (
        'labelgrid_gateway_requests_total{route="/session/{session_id}", status="404"} > 0'
    ),
    "gateway latency histogram": 'labelgrid_gateway_request_duration_seconds_bucket{route="/infer/{model}", le="+Inf"} > 0',
    "gateway bytes in": 'labelgrid_gateway_request_bytes_total{route="/datastore/image", method="PUT"} > 0',
    "inference queue depth": 'labelgrid_inference_queue_waiting{job="labelgrid-inference", model="segmentation"}',
    "model version served": 'labelgrid_inference_model_version_info{job="labelgrid-inference", model="segmentation"} == 1',
    "datastore objects": 'labelgrid_datastore_objects{job="labelgrid-datastore", kind="images"} >= 1',
    "datastore bytes received": 'labelgrid_datastore_bytes_received_total{kind="images"} > 0',
    "datastore bytes sent (the inference read the image)": 'labelgrid_datastore_bytes_sent_total{kind="images"} > 0',
    "datastore leases": 'labelgrid_datastore_leases{job="labelgrid-datastore"}',
    "envoy stats": 'envoy_cluster_upstream_rq_total{job="labelgrid-envoy"} > 0',
}


def test_prometheus_scrapes_every_component(monitored: Monitored) -> None:
    run_promtool("check", "config", str(monitored.config))
    missing: dict[str, str] = {}

    def all_scraped() -> bool:
        missing.clear()
        missing.update({name: promql for name, promql in EXPECTED.items() if not query(monitored, promql)})
        return not missing

    try:
        wait_until(all_scraped, "a series for every expected query", timeout=45, interval=1.0)
    except AssertionError:
        targets = httpx.get(f"{monitored.api}/targets", timeout=10).json()["data"]["activeTargets"]
        health = {t["labels"]["job"]: (t["health"], t.get("lastError")) for t in targets}
        pytest.fail(f"no series for {json.dumps(missing, indent=1)}\ntargets: {health}")


def test_no_label_value_is_an_id(monitored: Monitored) -> None:
    """Every series of every job, every label value: no image or session id, no raw path."""
    wait_for(monitored, 'labelgrid_gateway_requests_total{route="/session/{session_id}"}')
    response = httpx.get(
        f"{monitored.api}/series", params={"match[]": '{job=~"labelgrid-.*"}', "start": time.time() - 600}, timeout=30
    )
    series = response.json()["data"]
    assert len(series) > 100
    offending = [
        labels for labels in series if any(IMAGE_ID in value or SESSION_ID in value for value in labels.values())
    ]
    assert not offending, f"ids in label values: {offending[:5]}"
    routes = {labels["route"] for labels in series if labels.get("__name__") == "labelgrid_gateway_requests_total"}
    assert "/infer/{model}" in routes and "/session/{session_id}" in routes, routes


def test_every_dashboard_query_runs(monitored: Monitored) -> None:
    """Grafana's variables substituted, each panel's PromQL is valid for this Prometheus."""
    for expr in dashboard_queries(json.loads(DASHBOARD.read_text())):
        promql = expr.replace("$__rate_interval", "1m").replace("$__range", "5m").replace('"$job"', '"labelgrid-.*"')
        query(monitored, promql)
