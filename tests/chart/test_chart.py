"""Tests of the Helm chart charts/petals-chat: rendered offline with helm-python-sdk (Helm's Go SDK), every
manifest validated against the Kubernetes 1.30 schemas with kubernetes-validate."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import helm_python
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "petals-chat"
RELEASE = "chat"
NAMESPACE = "llm"
FULLNAME = f"{RELEASE}-petals-chat"
KUBE_VERSION = "1.30"
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}
SWARM_VALUES = {
    "enabled": True,
    "servers": ["0:12", "12:24"],
    "bootstrapPeer": f"/dns4/{FULLNAME}-swarm-0-0.{FULLNAME}-swarm.{NAMESPACE}.svc.cluster.local/tcp/31337/p2p/QmPeer",
    "identitySecret": "swarm-identity",
}


def combo_values(variant: str, ingress: bool, monitoring: bool, swarm: bool) -> dict:
    values: dict = {
        "inference": {"variant": variant},
        "ingress": {
            "enabled": ingress,
            "className": "nginx",
            "tls": [{"secretName": "t", "hosts": ["chat.example.com"]}],
        },
        "monitoring": {
            "serviceMonitor": {"enabled": monitoring},
            "prometheusRule": {"enabled": monitoring},
            "dashboard": {"enabled": monitoring},
        },
    }
    if swarm:
        values["swarm"] = dict(SWARM_VALUES, variant=variant)
        values["model"] = {"dhtPrefix": "bloom-560m-chat"}
    return values


COMBOS = list(itertools.product(["cpu", "gpu"], [False, True], [False, True], [False, True]))
COMBO_IDS = [f"{v}-ingress{int(i)}-monitoring{int(m)}-swarm{int(s)}" for v, i, m, s in COMBOS]


def render(chart, values: dict | None = None) -> list[dict]:
    """Every manifest of a render (NOTES.txt and disabled templates left out), parsed."""
    out = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE)
    docs = []
    for path, text in out.items():
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


def find(docs: list[dict], kind: str, name: str) -> dict:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def container_env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def pod_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    return [
        (f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"])
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet")
    ]


@pytest.mark.parametrize(("variant", "ingress", "monitoring", "swarm"), COMBOS, ids=COMBO_IDS)
def test_render_matrix_is_valid_kubernetes_1_30(chart, variant, ingress, monitoring, swarm):
    values = combo_values(variant, ingress, monitoring, swarm)
    docs = render(chart, values)
    kinds = {d["kind"] for d in docs}
    assert {"StatefulSet", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= kinds
    assert ("Ingress" in kinds) == ingress
    assert ({"ServiceMonitor", "PrometheusRule"} <= kinds) == monitoring
    assert ("ConfigMap" in kinds) == monitoring
    swarm_sets = [d for d in docs if d["kind"] == "StatefulSet" and "-swarm-" in d["metadata"]["name"]]
    assert len(swarm_sets) == (2 if swarm else 0)
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), doc
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            assert isinstance(doc.get("spec"), dict) and doc["spec"], doc["metadata"]["name"]
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
            continue
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.path}: {exc.message}")
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), names


@pytest.mark.parametrize(
    "values",
    [
        {},
        combo_values("gpu", True, True, True),
        combo_values("cpu", True, False, True),
    ],
    ids=["defaults", "gpu-all-on", "cpu-ingress-swarm"],
)
def test_helm_lint_is_clean(values):
    result = helm_python.lint(str(CHART), values=values, strict=True, kube_version="v1.30.0")
    serious = [m for m in result["messages"] if m["severity"] >= 2]
    assert not serious, serious
    assert not result["errors"], result["errors"]


def inference_container(docs: list[dict]) -> tuple[dict, dict]:
    sts = find(docs, "StatefulSet", f"{FULLNAME}-inference")
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


def test_gpu_variant_switches_image_resources_scheduling_and_device(chart):
    pod, container = inference_container(render(chart, {"inference": {"variant": "gpu"}}))
    assert container["image"] == "petals-chat-inference-gpu:0.1.0"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["memory"] == "8Gi"  # inference.resources.gpu
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert container_env(container)["DEVICE"] == "cuda"


def test_cpu_variant_has_no_gpu_anything(chart):
    pod, container = inference_container(render(chart, {"inference": {"variant": "cpu"}}))
    assert container["image"] == "petals-chat-inference:0.1.0"
    assert "nvidia.com/gpu" not in json.dumps(container["resources"])
    assert container["resources"]["requests"]["memory"] == "4Gi"  # inference.resources.cpu
    assert "nodeSelector" not in pod
    assert "tolerations" not in pod
    assert container_env(container)["DEVICE"] == "cpu"


def test_gpu_scheduling_merges_with_the_common_node_selector_and_tolerations(chart):
    values = {
        "inference": {
            "variant": "gpu",
            "nodeSelector": {"pool": "llm"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"}],
        }
    }
    pod, _ = inference_container(render(chart, values))
    assert pod["nodeSelector"] == {"pool": "llm", "nvidia.com/gpu.present": "true"}
    assert [t["key"] for t in pod["tolerations"]] == ["dedicated", "nvidia.com/gpu"]
    pod, _ = inference_container(render(chart, {"inference": dict(values["inference"], variant="cpu")}))
    assert pod["nodeSelector"] == {"pool": "llm"}
    assert [t["key"] for t in pod["tolerations"]] == ["dedicated"]


def test_image_registry_tag_and_pull_policy(chart):
    values = {"image": {"registry": "ghcr.io/acme/", "tag": "1.2.3", "pullPolicy": "Always"}}
    for _, pod in pod_specs(render(chart, values)):
        for container in pod["containers"]:
            assert container["image"].startswith("ghcr.io/acme/petals-chat-")
            assert container["image"].endswith(":1.2.3")
            assert container["imagePullPolicy"] == "Always"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"inference": {"variant": "tpu"}}, "at '/inference/variant': value must be one of 'cpu', 'gpu'"),
        ({"inference": {"replicas": -1}}, "at '/inference/replicas': minimum"),
        ({"inference": {"replicas": 0}}, "at '/inference/replicas': minimum"),
        ({"gateway": {"replicas": -2}}, "at '/gateway/replicas': minimum"),
        ({"inference": {"replicas": 1.5}}, "at '/inference/replicas': got number, want integer"),
        ({"inference": {"replicas": "2"}}, "at '/inference/replicas': got string, want integer"),
        ({"image": {"pullPolicy": "Sometimes"}}, "at '/image/pullPolicy': value must be one of"),
        ({"model": {"name": ""}}, "at '/model/name': minLength: got 0, want 1"),
        ({"model": {"name": None}}, "missing property 'name'"),
        ({"inference": {"sessionTtlSeconds": 0}}, "at '/inference/sessionTtlSeconds': minimum"),
        ({"inference": {"sessionTtlSeconds": -30}}, "at '/inference/sessionTtlSeconds': minimum"),
        ({"replicaCount": 3}, "additional properties 'replicaCount' not allowed"),
    ],
)
def test_schema_rejects_bad_values_with_a_clear_message(chart, values, message):
    with pytest.raises(helm_python.HelmValuesError) as info:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert message in info.value.detail


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"swarm": {"enabled": True}}, "swarm.enabled needs model.dhtPrefix"),
        ({"swarm": {"enabled": True}, "model": {"dhtPrefix": "p"}}, "swarm.enabled needs swarm.bootstrapPeer"),
        (
            {
                "swarm": {"enabled": True, "servers": ["0:1", "1:2"]},
                "model": {"dhtPrefix": "p", "initialPeers": ["/a"]},
            },
            "set swarm.bootstrapPeer",
        ),
    ],
)
def test_swarm_without_its_required_values_fails_clearly(chart, values, message):
    with pytest.raises(helm_python.HelmRenderError) as info:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert message in str(info.value)


@pytest.mark.parametrize("replicas", [1, 3])
def test_gateway_routes_to_exactly_the_statefulset_pods(chart, replicas):
    docs = render(chart, {"inference": {"replicas": replicas}})
    sts = find(docs, "StatefulSet", f"{FULLNAME}-inference")
    headless = find(docs, "Service", f"{FULLNAME}-inference")
    assert sts["spec"]["replicas"] == replicas
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    assert sts["spec"]["serviceName"] == headless["metadata"]["name"]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()

    gateway = find(docs, "Deployment", f"{FULLNAME}-gateway")
    env = container_env(gateway["spec"]["template"]["spec"]["containers"][0])
    entries = dict(entry.split("=", 1) for entry in env["INFERENCE_REPLICAS"].split(" "))
    pods = [f"{sts['metadata']['name']}-{i}" for i in range(replicas)]
    assert list(entries) == pods
    for pod in pods:
        assert entries[pod] == f"http://{pod}.{sts['spec']['serviceName']}.{NAMESPACE}.svc.cluster.local:8080"

    _, container = inference_container(docs)
    inference_env = container_env(container)
    assert inference_env["REPLICA_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert inference_env["BIND"] == "0.0.0.0:8080"
    assert container["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]


def test_inference_probes_and_graceful_drain(chart):
    pod, container = inference_container(render(chart))
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/healthz"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # model loading takes minutes
    assert pod["terminationGracePeriodSeconds"] > 60  # gunicorn's graceful timeout


def test_gateway_env_and_ingress_routes(chart):
    docs = render(chart, {"ingress": {"enabled": True, "hosts": ["chat.example.com"]}, "gateway": {"workers": 3}})
    env = container_env(find(docs, "Deployment", f"{FULLNAME}-gateway")["spec"]["template"]["spec"]["containers"][0])
    assert env["TRUST_PROXY_HEADERS"] == "1"
    assert env["GUNICORN_WORKERS"] == "3"
    assert env["PROMETHEUS_MULTIPROC_DIR"] == "/tmp/metrics"
    ingress = find(docs, "Ingress", FULLNAME)
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "chat.example.com"
    routes = {p["path"]: (p["pathType"], p["backend"]["service"]["name"]) for p in rule["http"]["paths"]}
    gateway = ("Prefix", f"{FULLNAME}-gateway")
    assert routes == {"/": ("Prefix", f"{FULLNAME}-ui"), "/api": gateway, "/v1": gateway}
    docs = render(chart, {"ingress": {"enabled": False}})
    env = container_env(find(docs, "Deployment", f"{FULLNAME}-gateway")["spec"]["template"]["spec"]["containers"][0])
    assert env["TRUST_PROXY_HEADERS"] == "0"


def test_autoscaling_owns_the_replica_count(chart):
    docs = render(chart)
    for tier in ("gateway", "ui"):
        assert "replicas" not in find(docs, "Deployment", f"{FULLNAME}-{tier}")["spec"]
        hpa = find(docs, "HorizontalPodAutoscaler", f"{FULLNAME}-{tier}")
        assert hpa["spec"]["scaleTargetRef"]["name"] == f"{FULLNAME}-{tier}"
        assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    docs = render(chart, {"gateway": {"autoscaling": {"enabled": False}, "replicas": 4}})
    assert find(docs, "Deployment", f"{FULLNAME}-gateway")["spec"]["replicas"] == 4
    assert not [d for d in docs if d["kind"] == "HorizontalPodAutoscaler" and "gateway" in d["metadata"]["name"]]


def labels_match(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are checked"
    return selector.get("matchLabels", {}).items() <= labels.items()


def test_network_policy_lets_only_gateway_pods_reach_inference(chart):
    docs = render(chart)
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    labels = {
        tier: find(docs, kind, f"{FULLNAME}-{tier}")["spec"]["template"]["metadata"]["labels"]
        for tier, kind in (("inference", "StatefulSet"), ("gateway", "Deployment"), ("ui", "Deployment"))
    }
    applying = [p for p in policies if labels_match(p["spec"]["podSelector"], labels["inference"])]
    assert len(applying) == 1
    spec = applying[0]["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    for rule in spec["ingress"]:
        assert rule["ports"] == [{"protocol": "TCP", "port": 8080}]
        for peer in rule["from"]:
            assert set(peer) == {"podSelector"}, "no namespace-wide or IP peers by default"
            assert labels_match(peer["podSelector"], labels["gateway"])
            assert not labels_match(peer["podSelector"], labels["ui"])
            assert not labels_match(peer["podSelector"], labels["inference"])
    assert not [d for d in render(chart, {"networkPolicy": {"enabled": False}}) if d["kind"] == "NetworkPolicy"]


def test_network_policy_metrics_peers_are_added_on_the_same_port(chart):
    peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    docs = render(chart, {"networkPolicy": {"metricsFrom": [peer]}})
    policy = find(docs, "NetworkPolicy", f"{FULLNAME}-inference")
    assert policy["spec"]["ingress"][1] == {"from": [peer], "ports": [{"protocol": "TCP", "port": 8080}]}


def test_every_other_pod_opens_only_its_service_port(chart):
    docs = render(chart, combo_values("cpu", True, True, True))
    for tier, port in (("gateway", 8080), ("ui", 8080), ("swarm", 31337)):
        policy = find(docs, "NetworkPolicy", f"{FULLNAME}-{tier}")
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        assert policy["spec"]["ingress"] == [{"ports": [{"protocol": "TCP", "port": port}]}], tier
    assert not [d for d in render(chart) if d["metadata"]["name"] == f"{FULLNAME}-swarm"]


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_every_container_runs_restricted(chart, variant):
    docs = render(chart, combo_values(variant, True, True, True))
    specs = pod_specs(docs)
    assert len(specs) == 5  # inference, gateway, ui, 2 swarm servers
    for name, pod in specs:
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod["automountServiceAccountToken"] is False, name
        for container in pod.get("initContainers", []) + pod["containers"]:
            ctx = container["securityContext"]
            assert ctx["runAsNonRoot"] is True, name
            assert ctx["runAsUser"] == 10001, name
            assert ctx["readOnlyRootFilesystem"] is True, name
            assert ctx["allowPrivilegeEscalation"] is False, name
            assert ctx["capabilities"] == {"drop": ["ALL"]}, name
            assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}, name
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            volumes = {v["name"]: v for v in pod["volumes"]}
            assert "emptyDir" in volumes[mounts["/tmp"]], name


def test_monitoring_ships_the_same_dashboard_and_rules_as_deploy(chart):
    on = {"enabled": True}
    docs = render(chart, {"monitoring": {"serviceMonitor": on, "prometheusRule": on, "dashboard": on}})
    dashboard = find(docs, "ConfigMap", f"{FULLNAME}-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    source = (ROOT / "deploy" / "grafana" / "petals-chat.json").read_text()
    assert dashboard["data"]["petals-chat.json"] == source.rstrip("\n")
    assert json.loads(dashboard["data"]["petals-chat.json"]) == json.loads(source)

    rule = find(docs, "PrometheusRule", FULLNAME)
    assert rule["spec"] == yaml.safe_load((ROOT / "deploy" / "prometheus" / "rules.yml").read_text())

    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert {m["metadata"]["name"] for m in monitors} == {f"{FULLNAME}-{t}" for t in ("ui", "gateway", "inference")}
    for monitor in monitors:
        service = find(docs, "Service", monitor["metadata"]["name"])
        assert labels_match(monitor["spec"]["selector"], service["metadata"]["labels"])
        assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
        assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


def test_chart_files_are_the_deploy_files():
    for chart_file, source in (
        ("petals-chat.json", "deploy/grafana/petals-chat.json"),
        ("rules.yml", "deploy/prometheus/rules.yml"),
    ):
        path = CHART / "files" / chart_file
        assert path.read_bytes() == (ROOT / source).read_bytes()
        if path.is_symlink():
            assert path.resolve() == (ROOT / source).resolve()


def test_private_swarm_servers_and_inference_peers(chart):
    docs = render(chart, combo_values("cpu", False, False, True))
    first = find(docs, "StatefulSet", f"{FULLNAME}-swarm-0")["spec"]["template"]["spec"]["containers"][0]
    second = find(docs, "StatefulSet", f"{FULLNAME}-swarm-1")["spec"]["template"]["spec"]["containers"][0]
    assert first["image"] == "petals-chat-swarm:0.1.0"
    assert first["command"] == ["python", "-m", "petals.cli.run_server"]
    common = ["bigscience/bloom-560m", "--dht_prefix", "bloom-560m-chat", "--host_maddrs", "/ip4/0.0.0.0/tcp/31337"]
    assert first["args"][:5] == common == second["args"][:5]
    assert first["args"][first["args"].index("--block_indices") + 1] == "0:12"
    assert second["args"][second["args"].index("--block_indices") + 1] == "12:24"
    assert first["args"][-1] == "--new_swarm"
    assert second["args"][-2:] == ["--initial_peers", SWARM_VALUES["bootstrapPeer"]]
    assert "--new_swarm" not in second["args"]
    assert first["args"][first["args"].index("--identity_path") + 1] == "/var/run/petals-identity/identity"
    assert second["args"][second["args"].index("--identity_path") + 1] == "/tmp/identity"
    _, inference = inference_container(docs)
    env = container_env(inference)
    assert env["INITIAL_PEERS"] == SWARM_VALUES["bootstrapPeer"]
    assert env["DHT_PREFIX"] == "bloom-560m-chat"
    docs = render(
        chart, {"model": {"initialPeers": ["/ip4/10.0.0.1/tcp/31337/p2p/QmA", "/ip4/10.0.0.2/tcp/1/p2p/QmB"]}}
    )
    env = container_env(inference_container(docs)[1])
    assert env["INITIAL_PEERS"] == "/ip4/10.0.0.1/tcp/31337/p2p/QmA /ip4/10.0.0.2/tcp/1/p2p/QmB"
    swarm_gpu = render(chart, combo_values("gpu", False, False, True))
    server = find(swarm_gpu, "StatefulSet", f"{FULLNAME}-swarm-1")["spec"]["template"]["spec"]["containers"][0]
    assert server["image"] == "petals-chat-swarm-gpu:0.1.0"
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_notes_render(chart):
    out = chart.render({"ingress": {"enabled": True}}, name=RELEASE, namespace=NAMESPACE)
    notes = next(text for path, text in out.items() if path.endswith("NOTES.txt"))
    assert "chat.example.com" in notes
    assert f"{FULLNAME}-inference" in notes


def test_the_models_chat_configuration_goes_to_the_inference_replicas_only_when_set(chart):
    template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    chat = {"format": "chatml", "template": template, "stop": "\n\nUser:"}
    docs = render(chart, {"model": {"chat": chat, "description": "A model."}, "gateway": {"defaultModel": "m"}})
    env = container_env(inference_container(docs)[1])
    assert env["CHAT_FORMAT"] == "chatml" and env["CHAT_TEMPLATE"] == template and env["CHAT_STOP"] == "\n\nUser:"
    assert env["MODEL_DESCRIPTION"] == "A model." and "CHAT_SYSTEM_PROMPT" not in env
    gateway = find(docs, "Deployment", f"{FULLNAME}-gateway")["spec"]["template"]["spec"]["containers"][0]
    assert container_env(gateway)["DEFAULT_MODEL"] == "m"
    defaults = render(chart, {})
    env = container_env(inference_container(defaults)[1])
    assert env["CHAT_FORMAT"] == "auto" and not {"CHAT_TEMPLATE", "CHAT_STOP", "CHAT_SYSTEM_PROMPT"} & set(env)
    gateway = find(defaults, "Deployment", f"{FULLNAME}-gateway")["spec"]["template"]["spec"]["containers"][0]
    assert "DEFAULT_MODEL" not in container_env(gateway)


@pytest.mark.parametrize(
    ("inference", "threads"),
    [
        ({}, "1"),  # the default request: cpu "1"
        ({"resources": {"cpu": {"requests": {"cpu": "2500m"}, "limits": {"memory": "8Gi"}}}}, "3"),
        ({"resources": {"cpu": {"requests": {"cpu": "1"}, "limits": {"cpu": 1.5, "memory": "8Gi"}}}}, "2"),
        ({"torchThreads": 4}, "4"),
        ({"variant": "gpu", "resources": {"gpu": {"requests": {"cpu": "6"}}}}, "6"),
    ],
    ids=["default", "request-millicores", "limit-wins", "override", "gpu-resources"],
)
def test_inference_torch_threads_follow_the_granted_cpus(chart, inference, threads):
    env = container_env(inference_container(render(chart, {"inference": inference}))[1])
    assert env["TORCH_THREADS"] == threads


def test_every_swarm_server_process_runs_one_torch_thread_unless_set(chart):
    for swarm, threads in ((SWARM_VALUES, "1"), (dict(SWARM_VALUES, torchThreads=2), "2")):
        docs = render(chart, {"swarm": swarm, "model": {"dhtPrefix": "p"}})
        for index in range(2):
            server = find(docs, "StatefulSet", f"{FULLNAME}-swarm-{index}")["spec"]["template"]["spec"]
            env = container_env(server["containers"][0])
            assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == threads
