"""Tests of the Helm chart charts/petals-chat: rendered offline with helm-python-sdk (Helm's Go SDK), every
manifest validated against the Kubernetes 1.30 schemas with kubernetes-validate."""

from __future__ import annotations

import base64
import itertools
import json
import math
import re
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
# The default models (values.yaml): key -> (name, inference replicas, private servers' block ranges).
DEFAULT_MODELS = {
    "smollm2": ("smollm2-135m-instruct", 2, ["0:15", "15:30"]),
    "tiny-bloom": ("tiny-bloom", 1, ["0:4"]),
}
SWARM_SERVERS = sum(len(servers) for _, _, servers in DEFAULT_MODELS.values())


def combo_values(variant: str, ingress: bool, monitoring: bool, swarm: bool) -> dict:
    values: dict = {
        "inference": {"variant": variant},
        "swarm": {"enabled": swarm, "variant": variant, "batching": monitoring},  # its metrics port with monitoring
        "ingress": {
            "enabled": ingress,
            "className": "nginx",
            "tls": [{"secretName": "t", "hosts": ["chat.example.com"]}],
        },
        "gateway": {"apiKeys": {"enabled": ingress, "keys": ["ops:ops-key-0123456789abcdef"]}},  # a public deployment
        "monitoring": {
            "serviceMonitor": {"enabled": monitoring},
            "prometheusRule": {"enabled": monitoring},
            "dashboard": {"enabled": monitoring},
        },
    }
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
    assert len(swarm_sets) == (SWARM_SERVERS if swarm else 0)
    secrets = {d["metadata"]["name"] for d in docs if d["kind"] == "Secret"} - {f"{FULLNAME}-handover"}  # always
    assert bool(secrets) == (swarm or ingress)  # the swarm's seed, the API keys (on with the Ingress here)
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


def inference_container(docs: list[dict], key: str = "smollm2") -> tuple[dict, dict]:
    sts = find(docs, "StatefulSet", f"{FULLNAME}-inference-{key}")
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


# A model that sets no resources of its own: the inference block's per-variant defaults apply.
HUB_MODEL = {"name": "bigscience/bloom-560m", "key": "bloom-560m", "path": "bigscience/bloom-560m"}


def test_gpu_variant_switches_image_resources_scheduling_and_device(chart):
    docs = render(chart, {"models": [HUB_MODEL], "inference": {"variant": "gpu"}})
    pod, container = inference_container(docs, "bloom-560m")
    assert container["image"] == "petals-chat-inference-gpu:0.1.0"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["memory"] == "8Gi"  # inference.resources.gpu
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert container_env(container)["DEVICE"] == "cuda"


def test_cpu_variant_has_no_gpu_anything(chart):
    pod, container = inference_container(
        render(chart, {"models": [HUB_MODEL], "inference": {"variant": "cpu"}}), "bloom-560m"
    )
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
        ({"models": []}, "at '/models': minItems: got 0, want 1"),
        ({"models": [{"name": "m"}]}, "missing property 'path'"),
        ({"models": [{"name": "m", "path": ""}]}, "at '/models/0/path': minLength: got 0, want 1"),
        ({"models": [{"name": "a b", "path": "p"}]}, "at '/models/0/name': 'a b' does not match pattern"),
        (
            {"models": [{"name": "m", "path": "p", "key": "Not_DNS"}]},
            "at '/models/0/key': 'Not_DNS' does not match pattern",
        ),
        ({"models": [{"name": "m", "path": "p", "inference": {"variant": "tpu"}}]}, "at '/models/0/inference/variant'"),
        ({"models": [{"name": "m", "path": "p", "inference": {"replicas": 0}}]}, "at '/models/0/inference/replicas'"),
        ({"models": [{"name": "m", "path": "p", "swarm": {"servers": ["0-4"]}}]}, "at '/models/0/swarm/servers/0'"),
        ({"model": {"name": "m"}}, "additional properties 'model' not allowed"),
        ({"inference": {"sessionTtlSeconds": 0}}, "at '/inference/sessionTtlSeconds': minimum"),
        ({"inference": {"sessionTtlSeconds": -30}}, "at '/inference/sessionTtlSeconds': minimum"),
        ({"replicaCount": 3}, "additional properties 'replicaCount' not allowed"),
        ({"ingress": {"trustedProxies": ["ingress-nginx"]}}, "at '/ingress/trustedProxies/0'"),
        (
            {"networkPolicy": {"ingressController": {"namespace": "Bad_NS", "podLabels": {"a": "b"}}}},
            "at '/networkPolicy/ingressController/namespace'",
        ),
        ({"networkPolicy": {"ingressController": {"podLabels": None}}}, "missing property 'podLabels'"),
        ({"gateway": {"rateLimitPerMinute": -1}}, "at '/gateway/rateLimitPerMinute': minimum"),
        ({"swarm": {"pdb": {"enabled": "yes"}}}, "at '/swarm/pdb/enabled'"),
        ({"swarm": {"metrics": {"port": 31337}}}, "at '/swarm/metrics/port'"),
        ({"swarm": {"metrics": {"port": 0}}}, "at '/swarm/metrics/port': minimum"),
    ],
)
def test_schema_rejects_bad_values_with_a_clear_message(chart, values, message):
    with pytest.raises(helm_python.HelmValuesError) as info:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert message in info.value.detail


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"models": [HUB_MODEL, dict(HUB_MODEL, name="other")]}, 'key "bloom-560m" is used by two models'),
        ({"models": [HUB_MODEL, dict(HUB_MODEL, key="b")]}, 'name "bigscience/bloom-560m" is used by two models'),
        ({"models": [{"name": "m", "path": "/models/m"}]}, "the local path /models/m needs a dhtPrefix"),
        ({"models": [{"name": "---", "path": "p"}]}, "set models[0].key"),
        ({"gateway": {"defaultModel": "gpt-5"}}, 'gateway.defaultModel "gpt-5" is none of the models'),
        ({"fullnameOverride": "x" * 40}, "is longer than 52 characters"),
    ],
)
def test_models_that_cannot_work_fail_clearly(chart, values, message):
    with pytest.raises(helm_python.HelmRenderError) as info:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert message in str(info.value)


@pytest.mark.parametrize("replicas", [1, 3])
def test_gateway_discovers_each_model_through_its_own_headless_service(chart, replicas):
    models = [dict(HUB_MODEL, key="a", inference={"replicas": replicas}), dict(HUB_MODEL, name="b", key="b")]
    docs = render(chart, {"models": models, "inference": {"replicas": 2}, "gateway": {"discoveryIntervalSeconds": 2}})
    headless = find(docs, "Service", f"{FULLNAME}-inference")
    assert headless["spec"]["clusterIP"] == "None"
    discovery = {}
    for key, name, count in (("a", "bigscience/bloom-560m", replicas), ("b", "b", 2)):  # b: the default replicas
        sts = find(docs, "StatefulSet", f"{FULLNAME}-inference-{key}")
        assert sts["spec"]["replicas"] == count
        assert sts["spec"]["podManagementPolicy"] == "Parallel"
        assert sts["spec"]["serviceName"] == headless["metadata"]["name"]
        assert headless["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
        own = find(docs, "Service", sts["metadata"]["name"])  # the model's own: its replicas and no other model's
        assert own["spec"]["clusterIP"] == "None" and own["spec"]["publishNotReadyAddresses"] is True
        assert own["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
        assert own["spec"]["selector"]["petals-chat/model"] == key
        assert own["spec"]["ports"] == [{"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}]
        discovery[name] = f"dns://{own['metadata']['name']}.{NAMESPACE}.svc.cluster.local:8080"
        _, container = inference_container(docs, key)
        assert container_env(container)["MODEL_NAME"] == name

    env = gateway_env(docs)
    assert "INFERENCE_REPLICAS" not in env  # no fixed list: the replicas an autoscaler adds are found
    assert dict(entry.split("=", 1) for entry in env["INFERENCE_DISCOVERY"].split(" ")) == discovery
    assert list(discovery) == [entry.split("=", 1)[0] for entry in env["INFERENCE_DISCOVERY"].split(" ")]
    assert env["INFERENCE_DISCOVERY_INTERVAL_SECONDS"] == "2"
    assert gateway_env(render(chart))["INFERENCE_DISCOVERY_INTERVAL_SECONDS"] == "5"
    assert env["DEFAULT_MODEL"] == "bigscience/bloom-560m"  # the first model

    _, container = inference_container(docs, "a")
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


def gateway_env(docs: list[dict]) -> dict:
    return container_env(find(docs, "Deployment", f"{FULLNAME}-gateway")["spec"]["template"]["spec"]["containers"][0])


def test_gateway_env_and_ingress_routes(chart):
    docs = render(chart, {"ingress": {"enabled": True, "hosts": ["chat.example.com"]}, "gateway": {"workers": 3}})
    env = gateway_env(docs)
    assert env["TRUSTED_PROXIES"] == "10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,100.64.0.0/10,fc00::/7"
    assert "TRUST_PROXY_HEADERS" not in env  # replaced: it trusted X-Forwarded-For from any peer
    assert env["GUNICORN_WORKERS"] == "3"
    assert env["PROMETHEUS_MULTIPROC_DIR"] == "/tmp/metrics"
    ingress = find(docs, "Ingress", FULLNAME)
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "chat.example.com"
    routes = {p["path"]: (p["pathType"], p["backend"]["service"]["name"]) for p in rule["http"]["paths"]}
    gateway, ui = f"{FULLNAME}-gateway", f"{FULLNAME}-ui"
    assert routes == {"/": ("Exact", ui), "/swarm": ("Exact", ui), "/static": ("Prefix", ui),
                      "/api": ("Prefix", gateway), "/v1": ("Prefix", gateway)}  # fmt: skip
    assert gateway_env(render(chart, {"ingress": {"enabled": False}}))["TRUSTED_PROXIES"] == ""  # no proxy: none
    env = gateway_env(render(chart, {"ingress": {"enabled": True, "trustedProxies": ["10.42.0.0/16", "fd00::1"]}}))
    assert env["TRUSTED_PROXIES"] == "10.42.0.0/16,fd00::1"


def ingress_backend(paths: list[dict], path: str) -> str | None:
    """The Service an Ingress sends ``path`` to (Kubernetes' matching: the longest Prefix by path element)."""
    matches = []
    for rule in paths:
        prefix = rule["path"].rstrip("/")
        if rule["pathType"] == "Exact":
            hit = path == rule["path"]
        else:
            hit = prefix == "" or path == prefix or path.startswith(prefix + "/")
        if hit:
            matches.append((rule["pathType"] == "Exact", len(prefix), rule["backend"]["service"]["name"]))
    return max(matches)[2] if matches else None


def test_the_ingress_routes_only_the_page_and_its_assets_to_the_ui(chart):
    """Not the ui's /metrics, /healthz or /readyz: only what the page itself needs (its links, rendered as the
    ui renders them) and the API."""
    from services.ui.assets import load_static, render_page

    (rule,) = find(render(chart, {"ingress": {"enabled": True}}), "Ingress", FULLNAME)["spec"]["rules"]
    paths = rule["http"]["paths"]
    ui, gateway = f"{FULLNAME}-ui", f"{FULLNAME}-gateway"
    pages = [render_page(load_static(), {}, name).body.decode() for name in ("index.html", "swarm.html")]
    links = [link.split("?")[0] for page in pages for link in re.findall(r'(?:href|src)="(/[^"]*)"', page)]
    assert links and all(link.startswith("/static/") or link == "/" for link in links)
    for path in ["/", "/swarm", *links]:
        assert ingress_backend(paths, path) == ui, path
    for path in ("/api/v1/generate", "/api/v2/generate", "/v1/chat/completions", "/api/openapi.json"):
        assert ingress_backend(paths, path) == gateway, path
    for path in ("/metrics", "/healthz", "/readyz", "/static-x", "/index.html", "/swarm/x", "/anything"):
        assert ingress_backend(paths, path) is None, path


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
    assert set(selector) <= {"matchLabels", "matchExpressions"}, selector
    expressions = selector.get("matchExpressions", [])
    assert {e["operator"] for e in expressions} <= {"DoesNotExist"}, "only DoesNotExist expressions are checked"
    absent = all(e["key"] not in labels for e in expressions)
    return absent and selector.get("matchLabels", {}).items() <= labels.items()


def test_network_policy_lets_only_gateway_pods_reach_inference(chart):
    docs = render(chart, {"inference": {"handover": {"enabled": False}}})  # with it: tests/chart/test_handover_chart.py
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    labels = {
        tier: find(docs, kind, f"{FULLNAME}-{tier}")["spec"]["template"]["metadata"]["labels"]
        for tier, kind in (("inference-smollm2", "StatefulSet"), ("gateway", "Deployment"), ("ui", "Deployment"))
    }
    labels["inference"] = labels.pop("inference-smollm2")
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
    assert policy["spec"]["ingress"][-1] == {"from": [peer], "ports": [{"protocol": "TCP", "port": 8080}]}


def test_every_other_pod_opens_only_its_service_port(chart):
    docs = render(chart, combo_values("cpu", False, True, True))  # no Ingress: the web tiers take any client
    for tier, port in (("gateway", 8080), ("ui", 8080), ("swarm", 31337)):
        policy = find(docs, "NetworkPolicy", f"{FULLNAME}-{tier}")
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        assert [rule["ports"] for rule in policy["spec"]["ingress"]] == [[{"protocol": "TCP", "port": port}]], tier
    docs = render(chart, {"swarm": {"enabled": False}})
    assert not [d for d in docs if d["metadata"]["name"] == f"{FULLNAME}-swarm"]


def pod_labels(docs: list[dict]) -> dict[str, dict]:
    """Every workload's pod labels, by workload name."""
    return {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in docs
            if d["kind"] in ("Deployment", "StatefulSet")}  # fmt: skip


def admitted(policy: dict, labels: dict, namespace: str = NAMESPACE, namespace_labels: dict | None = None) -> bool:
    """Whether a pod with ``labels`` in ``namespace`` may connect under one NetworkPolicy's ingress rules."""
    namespace_labels = namespace_labels or {"kubernetes.io/metadata.name": namespace}
    for rule in policy["spec"]["ingress"]:
        if "from" not in rule:
            return True
        for peer in rule["from"]:
            assert set(peer) <= {"podSelector", "namespaceSelector"}, "no IP peers"
            selector = peer.get("namespaceSelector")
            in_namespace = labels_match(selector, namespace_labels) if selector else namespace == NAMESPACE
            if in_namespace and labels_match(peer.get("podSelector", {}), labels):
                return True
    return False


NGINX = {"app.kubernetes.io/name": "ingress-nginx", "app.kubernetes.io/instance": "x",
         "app.kubernetes.io/component": "controller"}  # fmt: skip


def test_with_the_ingress_only_its_controller_reaches_the_gateway_and_ui(chart):
    """Before, any pod could reach the gateway and (it trusting X-Forwarded-For) pick its client address."""
    docs = render(chart, {"ingress": {"enabled": True}})
    labels = pod_labels(docs)
    for tier in ("gateway", "ui"):
        policy = find(docs, "NetworkPolicy", f"{FULLNAME}-{tier}")
        assert [rule["ports"] for rule in policy["spec"]["ingress"]] == [[{"protocol": "TCP", "port": 8080}]]
        assert admitted(policy, NGINX, "ingress-nginx")
        assert not admitted(policy, NGINX, NAMESPACE)  # the controller's labels, in another namespace
        assert not admitted(policy, {"app": "attacker"}, "ingress-nginx")
        for name, pod in labels.items():  # none of the release's pods (the ui calls no gateway; nor the gateway it)
            assert not admitted(policy, pod), (tier, name)
        assert not admitted(policy, {"app": "prometheus"}, "monitoring")

    scrapers = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    traefik = {"app.kubernetes.io/name": "traefik", "app.kubernetes.io/component": None}  # null drops a default
    controller = {"namespace": "traefik", "podLabels": traefik}
    docs = render(chart, {"ingress": {"enabled": True}, "monitoring": {"serviceMonitor": {"enabled": True}},
                          "networkPolicy": {"metricsFrom": scrapers, "ingressController": controller}})  # fmt: skip
    for tier in ("gateway", "ui", "inference"):
        policy = find(docs, "NetworkPolicy", f"{FULLNAME}-{tier}")
        assert admitted(policy, {"app": "prometheus"}, "monitoring"), tier
        if tier != "inference":
            assert admitted(policy, {"app.kubernetes.io/name": "traefik"}, "traefik")
            assert not admitted(policy, NGINX, "ingress-nginx")


def test_notes_warn_when_no_scraper_is_admitted(chart):
    monitoring = {"serviceMonitor": {"enabled": True}}
    notes = chart.render({"ingress": {"enabled": True}, "monitoring": monitoring}, name=RELEASE, namespace=NAMESPACE)
    text = next(t for path, t in notes.items() if path.endswith("NOTES.txt"))
    assert "WARNING: the NetworkPolicies admit no scraper" in text and "the gateway and the ui" in text
    scrapers = {"metricsFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "mon"}}}]}
    for values in ({"monitoring": monitoring, "networkPolicy": scrapers}, {}):
        notes = chart.render(values, name=RELEASE, namespace=NAMESPACE)
        assert "WARNING" not in next(t for path, t in notes.items() if path.endswith("NOTES.txt"))


def test_the_swarm_port_admits_only_the_release_swarm_servers_and_inference_replicas(chart):
    """Petals' DHT and libp2p have no authentication: before, any pod (or anything routed in) could join."""
    docs = render(chart)
    policy = find(docs, "NetworkPolicy", f"{FULLNAME}-swarm")
    assert [rule["ports"] for rule in policy["spec"]["ingress"]] == [[{"protocol": "TCP", "port": 31337}]]
    assert labels_match(policy["spec"]["podSelector"], pod_labels(docs)[f"{FULLNAME}-swarm-smollm2-0"])
    for name, labels in pod_labels(docs).items():
        assert admitted(policy, labels) == ("-swarm-" in name or "-inference-" in name), name
    other_release = dict(pod_labels(docs)[f"{FULLNAME}-swarm-smollm2-0"], **{"app.kubernetes.io/instance": "other"})
    assert not admitted(policy, other_release)
    assert not admitted(policy, pod_labels(docs)[f"{FULLNAME}-inference-smollm2"], "elsewhere")
    peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "petals"}}}
    policy = find(render(chart, {"networkPolicy": {"swarmFrom": [peer]}}), "NetworkPolicy", f"{FULLNAME}-swarm")
    assert admitted(policy, {"app": "petals-server"}, "petals")


def test_each_model_swarm_has_a_pdb_that_lets_no_server_be_evicted(chart):
    """Each server holds blocks no other holds: a drain evicting one would cut its model's only route."""
    docs = render(chart)
    labels = pod_labels(docs)
    budgets = [d for d in docs if d["kind"] == "PodDisruptionBudget" and "-swarm-" in d["metadata"]["name"]]
    assert {b["metadata"]["name"] for b in budgets} == {f"{FULLNAME}-swarm-{key}" for key in DEFAULT_MODELS}
    for key, (_, _, servers) in DEFAULT_MODELS.items():
        budget = find(docs, "PodDisruptionBudget", f"{FULLNAME}-swarm-{key}")
        selected = {name for name, pod in labels.items() if labels_match(budget["spec"]["selector"], pod)}
        assert selected == {f"{FULLNAME}-swarm-{key}-{i}" for i in range(len(servers))}
        assert budget["spec"] == {"minAvailable": len(servers), "selector": budget["spec"]["selector"]}
    hub = render(
        chart, {"models": [HUB_MODEL, dict(HUB_MODEL, name="p", key="p", path="p", swarm={"servers": ["0:2"]})]}
    )
    assert [d["metadata"]["name"] for d in hub if d["kind"] == "PodDisruptionBudget" and "-swarm-" in
            d["metadata"]["name"]] == [f"{FULLNAME}-swarm-p"]  # fmt: skip
    docs = render(chart, {"swarm": {"pdb": {"enabled": False}}})
    assert not [d for d in docs if d["kind"] == "PodDisruptionBudget" and "-swarm-" in d["metadata"]["name"]]


def test_by_default_one_client_cannot_starve_the_rest(chart):
    """A request rate and a session quota per client, on by default; the operator's to change."""
    docs = render(chart)
    assert gateway_env(docs)["RATE_LIMIT_PER_MINUTE"] == "60"
    for sts in (d for d in docs if d["kind"] == "StatefulSet" and "-inference-" in d["metadata"]["name"]):
        env = container_env(sts["spec"]["template"]["spec"]["containers"][0])
        assert (env["MAX_SESSIONS_PER_CLIENT"], env["MAX_SESSIONLESS_REQUESTS"]) == ("4", "16")
    docs = render(chart, {"gateway": {"rateLimitPerMinute": 0}, "inference": {"maxSessionsPerClient": 0}})
    assert gateway_env(docs)["RATE_LIMIT_PER_MINUTE"] == "0"


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_every_container_runs_restricted(chart, variant):
    docs = render(chart, combo_values(variant, True, True, True))
    specs = pod_specs(docs)
    assert len(specs) == len(DEFAULT_MODELS) + 2 + SWARM_SERVERS  # inference per model, gateway, ui, servers
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
    tiers = ("ui", "gateway", "inference", "swarm")  # the swarm's: its servers' batching metrics, on by default
    assert {m["metadata"]["name"] for m in monitors} == {f"{FULLNAME}-{t}" for t in tiers}
    for monitor in monitors:
        service = find(docs, "Service", monitor["metadata"]["name"])
        assert labels_match(monitor["spec"]["selector"], service["metadata"]["labels"])
        assert monitor["spec"]["endpoints"][0]["port"] in [port["name"] for port in service["spec"]["ports"]]
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


def server_container(docs: list[dict], key: str, index: int) -> dict:
    return find(docs, "StatefulSet", f"{FULLNAME}-swarm-{key}-{index}")["spec"]["template"]["spec"]["containers"][0]


def arg(container: dict, flag: str) -> str:
    return container["args"][container["args"].index(flag) + 1]


def test_private_swarm_bootstraps_from_derived_identities(chart):
    """Server 0 of each model starts the swarm with the identity derived from the seed; the model's other
    servers and its inference replicas reach it by DNS name and derived peer id: nothing copied by hand."""
    docs = render(chart)
    secret = find(docs, "Secret", f"{FULLNAME}-swarm-seed")
    assert len(base64.b64decode(secret["data"]["seed"])) >= 16
    for key, (name, _, servers) in DEFAULT_MODELS.items():
        bootstrap = (
            f"/dns4/{FULLNAME}-swarm-{key}-0-0.{FULLNAME}-swarm.{NAMESPACE}.svc.cluster.local"
            f"/tcp/31337/p2p/derived:{key}"
        )
        for index, blocks in enumerate(servers):
            server = server_container(docs, key, index)
            assert server["image"] == "petals-chat-swarm:0.1.0"
            assert server["command"] == ["python", "-m", "services.swarm.serve"]
            assert server["args"][0] == f"/models/{name}"
            assert arg(server, "--dht_prefix") == name
            assert arg(server, "--block_indices") == blocks
            assert arg(server, "--device") == "cpu"
            env = container_env(server)
            assert env["SWARM_SEED_FILE"] == "/var/run/petals-swarm/seed"
            assert env["HF_HUB_OFFLINE"] == "1" and env["OMP_NUM_THREADS"] == "1"
            if index == 0:
                assert arg(server, "--identity_path") == f"derived:{key}"
                assert server["args"][-1] == "--new_swarm"
            else:
                assert arg(server, "--identity_path") == "/tmp/identity"
                assert server["args"][-2:] == ["--initial_peers", bootstrap]
                assert "--new_swarm" not in server["args"]
        _, inference = inference_container(docs, key)
        env = container_env(inference)
        assert env["INITIAL_PEERS"] == bootstrap
        assert env["DHT_PREFIX"] == name
        assert env["SWARM_SEED_FILE"] == "/var/run/petals-swarm/seed"
    for name, pod in pod_specs(docs):
        if "-swarm-" in name or "-inference-" in name:
            volumes = {v["name"]: v for v in pod["volumes"]}
            assert volumes["swarm-seed"]["secret"]["secretName"] == secret["metadata"]["name"], name
            mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
            assert mounts["swarm-seed"] == {
                "name": "swarm-seed",
                "mountPath": "/var/run/petals-swarm",
                "readOnly": True,
            }


def test_derived_peer_ids_are_what_the_bootstrap_server_gets(chart, tmp_path):
    """The chart's syntax through the code the images run: server 0's identity file and the replicas'
    INITIAL_PEERS name the same peer id (the one p2pd computes: tests/unit/test_swarm_identity.py)."""
    from services.common.p2p import swarm_identity
    from services.inference.settings import resolve_initial_peers
    from services.swarm.serve import resolve_args

    docs = render(chart)
    seed_file = tmp_path / "seed"
    seed_file.write_bytes(base64.b64decode(find(docs, "Secret", f"{FULLNAME}-swarm-seed")["data"]["seed"]))
    seed = swarm_identity.read_seed(seed_file)
    for key in DEFAULT_MODELS:
        args = resolve_args(server_container(docs, key, 0)["args"], str(seed_file), tmp_path)
        identity = Path(arg({"args": args}, "--identity_path"))
        assert identity.read_bytes() == swarm_identity.identity_file_bytes(seed, key)
        (peers,) = resolve_initial_peers(
            (container_env(inference_container(docs, key)[1])["INITIAL_PEERS"],), str(seed_file)
        )
        assert peers.endswith("/p2p/" + swarm_identity.peer_id(seed, key))
    args = resolve_args(server_container(docs, "smollm2", 1)["args"], str(seed_file), tmp_path)
    assert arg({"args": args}, "--initial_peers").endswith("/p2p/" + swarm_identity.peer_id(seed, "smollm2"))


def test_an_existing_seed_secret_replaces_the_generated_one(chart):
    docs = render(chart, {"swarm": {"seedSecret": "my-seed"}})
    assert not [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] != f"{FULLNAME}-handover"]
    for name, pod in pod_specs(docs):
        if "-swarm-" in name or "-inference-" in name:
            assert {v["name"]: v for v in pod["volumes"]}["swarm-seed"]["secret"]["secretName"] == "my-seed"


def test_a_re_render_changes_no_pod_and_only_a_new_seed_would(chart):
    """What an upgrade or a re-install renders. The seed lives only in the Secret: no pod template
    carries it, so a second render (a new random seed, as `helm template` makes with no `lookup`)
    renders the very same pods, and so does a render that names the first render's Secret as
    swarm.seedSecret (what `helm upgrade` renders: `lookup` hands back the kept seed, the Secret is
    unchanged, no pod rolls). Whether a cluster's `lookup` finds the Secret is not provable here."""
    first, second = render(chart), render(chart)
    kept = render(chart, {"swarm": {"seedSecret": f"{FULLNAME}-swarm-seed"}})
    seed = find(first, "Secret", f"{FULLNAME}-swarm-seed")["data"]["seed"]
    assert find(second, "Secret", f"{FULLNAME}-swarm-seed")["data"]["seed"] != seed  # random per render
    assert seed not in json.dumps([d for d in first if d["kind"] != "Secret"])
    assert not [d for d in kept if d["kind"] == "Secret" and d["metadata"]["name"] != f"{FULLNAME}-handover"]
    assert pod_specs(first) == pod_specs(second) == pod_specs(kept)
    templates = [
        {d["metadata"]["name"]: d["spec"]["template"] for d in docs if d["kind"] in ("Deployment", "StatefulSet")}
        for docs in (first, second, kept)
    ]
    assert templates[0] == templates[1] == templates[2]


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_swarm_and_inference_caches_live_in_an_emptydir_under_tmp(chart, variant):
    """HF_HOME (hub downloads) and PETALS_CACHE (Petals' block cache and its lock) of every inference
    replica and swarm server are under /tmp, an emptyDir: the root filesystem is read-only and
    uid 10001 has no writable home."""
    docs = render(chart, combo_values(variant, False, False, True))
    checked = 0
    for name, pod in pod_specs(docs):
        if "-swarm-" not in name and "-inference-" not in name:
            continue
        volumes = {v["name"]: v for v in pod["volumes"]}
        container = pod["containers"][0]
        env = container_env(container)
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        for var in ("HF_HOME", "PETALS_CACHE"):
            path = env[var]
            assert path.startswith("/tmp/"), (name, var, path)
            mount = max((m for m in mounts if path == m or path.startswith(m.rstrip("/") + "/")), key=len)
            assert mount == "/tmp" and "emptyDir" in volumes[mounts[mount]], (name, var, mount)
            assert not volumes[mounts[mount]]["emptyDir"].get("medium"), name  # node disk, not RAM
        checked += 1
    assert checked == len(DEFAULT_MODELS) + SWARM_SERVERS


def test_the_default_install_is_self_contained(chart):
    """No values: every model is embedded in the images, served offline by its own private servers."""
    from services.swarm.image_models import EMBEDDED, IMAGE_DIR

    docs = render(chart)
    for key, (name, replicas, servers) in DEFAULT_MODELS.items():
        assert name in EMBEDDED
        sts = find(docs, "StatefulSet", f"{FULLNAME}-inference-{key}")
        assert sts["spec"]["replicas"] == replicas
        env = container_env(sts["spec"]["template"]["spec"]["containers"][0])
        assert env["MODEL"] == f"{IMAGE_DIR}/{name}" and env["MODEL_NAME"] == name
        assert env["HF_HUB_OFFLINE"] == "1"
        assert len([d for d in docs if d["metadata"]["name"].startswith(f"{FULLNAME}-swarm-{key}-")]) == len(servers)
    assert container_env(inference_container(docs, "smollm2")[1])["CHAT_FORMAT"] == "chatml"
    gateway = find(docs, "Deployment", f"{FULLNAME}-gateway")["spec"]["template"]["spec"]["containers"][0]
    assert container_env(gateway)["DEFAULT_MODEL"] == "smollm2-135m-instruct"


def test_public_swarm_and_external_swarm_are_one_value_away(chart):
    docs = render(chart, {"models": [HUB_MODEL]})
    secrets = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] != f"{FULLNAME}-handover"]
    assert not secrets and not [d for d in docs if "-swarm" in d["metadata"]["name"]]
    env = container_env(inference_container(docs, "bloom-560m")[1])
    assert env["MODEL"] == "bigscience/bloom-560m"
    assert not {"INITIAL_PEERS", "DHT_PREFIX", "SWARM_SEED_FILE", "HF_HUB_OFFLINE"} & set(env)  # public swarm
    peers = ["/ip4/10.0.0.1/tcp/31337/p2p/QmA", "/ip4/10.0.0.2/tcp/1/p2p/QmB"]
    model = dict(HUB_MODEL, initialPeers=peers, swarm={"servers": ["0:24"]})  # initialPeers win over servers
    docs = render(chart, {"models": [model]})
    assert not [d for d in docs if "-swarm" in d["metadata"]["name"]]
    env = container_env(inference_container(docs, "bloom-560m")[1])
    assert env["INITIAL_PEERS"] == " ".join(peers) and "SWARM_SEED_FILE" not in env
    docs = render(chart, {"swarm": {"enabled": False}})  # the embedded models, no private servers
    assert not [d for d in docs if "-swarm" in d["metadata"]["name"]]
    assert "INITIAL_PEERS" not in container_env(inference_container(docs)[1])


def test_each_model_has_its_own_variant_resources_and_servers(chart):
    gpu_resources = {"requests": {"cpu": "2", "memory": "20Gi"}, "limits": {"memory": "40Gi"}}
    models = [
        {"name": "small", "path": "org/small", "dhtPrefix": "small", "swarm": {"servers": ["0:4"]}},
        {
            "name": "org/Big-Model.v2",
            "path": "org/big",
            "inference": {"replicas": 3, "variant": "gpu", "resources": gpu_resources},
            "swarm": {"servers": ["0:40", "40:80"], "variant": "gpu", "attnCacheTokens": 1000000},
            "chat": {"format": "chatml", "systemPrompt": "Be brief."},
        },
    ]
    docs = render(chart, {"models": models, "gateway": {"defaultModel": "org/Big-Model.v2"}})
    small_pod, small = inference_container(docs, "small")
    big_pod, big = inference_container(docs, "org-big-model-v2")
    assert small["image"] == "petals-chat-inference:0.1.0" and "nodeSelector" not in small_pod
    assert small["resources"]["requests"]["memory"] == "4Gi"  # inference.resources.cpu
    assert big["image"] == "petals-chat-inference-gpu:0.1.0"
    assert big["resources"] == {
        "requests": gpu_resources["requests"],
        "limits": {"memory": "40Gi", "nvidia.com/gpu": 1},
    }
    assert big_pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert container_env(big)["DEVICE"] == "cuda" and container_env(small)["DEVICE"] == "cpu"
    assert container_env(big)["DHT_PREFIX"] == "org-big-model-v2"  # the key, with private servers
    assert container_env(big)["CHAT_SYSTEM_PROMPT"] == "Be brief."
    assert find(docs, "StatefulSet", f"{FULLNAME}-inference-org-big-model-v2")["spec"]["replicas"] == 3
    server = server_container(docs, "org-big-model-v2", 1)
    assert server["image"] == "petals-chat-swarm-gpu:0.1.0" and arg(server, "--device") == "cuda"
    assert arg(server, "--attn_cache_tokens") == "1000000"
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in json.dumps(server_container(docs, "small", 0)["resources"])
    gateway = find(docs, "Deployment", f"{FULLNAME}-gateway")["spec"]["template"]["spec"]["containers"][0]
    env = container_env(gateway)
    assert env["DEFAULT_MODEL"] == "org/Big-Model.v2"
    assert len(env["INFERENCE_DISCOVERY"].split(" ")) == 2  # one entry per model, whatever its replicas
    for key in ("small", "org-big-model-v2"):
        pdb = find(docs, "PodDisruptionBudget", f"{FULLNAME}-inference-{key}")
        labels = find(docs, "StatefulSet", f"{FULLNAME}-inference-{key}")["spec"]["template"]["metadata"]["labels"]
        assert labels_match(pdb["spec"]["selector"], labels)
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) not in CRD_KINDS:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_notes_render(chart):
    out = chart.render({"ingress": {"enabled": True}}, name=RELEASE, namespace=NAMESPACE)
    notes = next(text for path, text in out.items() if path.endswith("NOTES.txt"))
    assert "chat.example.com" in notes
    assert f"{FULLNAME}-inference" in notes


def test_the_models_chat_configuration_goes_to_its_inference_replicas_only_when_set(chart):
    template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    chat = {"format": "chatml", "template": template, "stop": "\n\nUser:"}
    model = dict(HUB_MODEL, key="m", chat=chat, description="A model.")
    docs = render(chart, {"models": [model, dict(HUB_MODEL, name="plain", key="plain")]})
    env = container_env(inference_container(docs, "m")[1])
    assert env["CHAT_FORMAT"] == "chatml" and env["CHAT_TEMPLATE"] == template and env["CHAT_STOP"] == "\n\nUser:"
    assert env["MODEL_DESCRIPTION"] == "A model." and "CHAT_SYSTEM_PROMPT" not in env
    env = container_env(inference_container(docs, "plain")[1])
    assert env["CHAT_FORMAT"] == "auto" and not {"CHAT_TEMPLATE", "CHAT_STOP", "CHAT_SYSTEM_PROMPT"} & set(env)


def granted_cpus(resources: dict) -> str:
    """What the chart should render: the cpu limit, else the request, rounded up, at least 1."""
    cpu = str(resources.get("limits", {}).get("cpu") or resources.get("requests", {}).get("cpu") or "1")
    cores = int(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
    return str(max(1, math.ceil(cores)))


def test_torch_threads_follow_the_granted_cpus_and_the_servers_run_one():
    """TORCH_THREADS from each model's inference cpu limit, else request, rounded up; servers OMP_NUM_THREADS=1."""
    with helm_python.Chart.load(str(CHART)) as loaded:
        defaults = render(loaded)
        custom = render(loaded, {"inference": {"torchThreads": 4}, "swarm": {"torchThreads": 2}})
    for docs, inference, server in ((defaults, None, "1"), (custom, "4", "2")):
        for sts in (d for d in docs if d["kind"] == "StatefulSet"):
            container = sts["spec"]["template"]["spec"]["containers"][0]
            env = container_env(container)
            if "-swarm-" in sts["metadata"]["name"]:
                assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == server
            else:
                assert env["TORCH_THREADS"] == (inference or granted_cpus(container["resources"]))
    assert granted_cpus({"requests": {"cpu": "2500m"}}) == "3" and granted_cpus({"limits": {"cpu": 1.5}}) == "2"


def test_servers_batch_only_when_swarm_batching_is_on():
    """SWARM_BATCHING of every server from swarm.batching, on by default."""
    with helm_python.Chart.load(str(CHART)) as loaded:
        defaults = render(loaded)
        off = render(loaded, {"swarm": {"batching": False}})
    for docs, expected in ((defaults, "true"), (off, "false")):
        servers = [d for d in docs if d["kind"] == "StatefulSet" and "-swarm-" in d["metadata"]["name"]]
        assert servers
        for sts in servers:
            assert container_env(sts["spec"]["template"]["spec"]["containers"][0])["SWARM_BATCHING"] == expected


def test_with_batching_each_server_serves_its_metrics_to_the_scrapers_of_the_other_services(chart):
    """swarm.batching: SWARM_METRICS_PORT and a port "metrics" on every server, on the swarm's Service, scraped by a
    ServiceMonitor and admitted from networkPolicy.metricsFrom only; nothing of it with batching off."""
    scrapers = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    values = {"monitoring": {"serviceMonitor": {"enabled": True}}, "networkPolicy": {"metricsFrom": scrapers}}
    docs = render(chart, dict(values, swarm={"batching": True, "metrics": {"port": 9200}}))
    for key, (_, _, servers) in DEFAULT_MODELS.items():
        for index in range(len(servers)):
            container = server_container(docs, key, index)
            assert container_env(container)["SWARM_METRICS_PORT"] == "9200"
            assert {"name": "metrics", "containerPort": 9200, "protocol": "TCP"} in container["ports"]
    service = find(docs, "Service", f"{FULLNAME}-swarm")
    assert {"name": "metrics", "port": 9200, "targetPort": "metrics", "protocol": "TCP"} in service["spec"]["ports"]
    monitor = find(docs, "ServiceMonitor", f"{FULLNAME}-swarm")
    assert labels_match(monitor["spec"]["selector"], service["metadata"]["labels"])
    assert [(e["port"], e["path"]) for e in monitor["spec"]["endpoints"]] == [("metrics", "/metrics")]
    assert monitor["spec"]["podTargetLabels"] == ["petals-chat/model", "petals-chat/swarm-server"]  # bounded
    policy = find(docs, "NetworkPolicy", f"{FULLNAME}-swarm")
    p2p_rule, metrics_rule = policy["spec"]["ingress"]
    assert p2p_rule["ports"] == [{"protocol": "TCP", "port": 31337}]
    assert not admitted({"spec": {"ingress": [p2p_rule]}}, {"app": "prometheus"}, "monitoring")
    assert metrics_rule == {"from": scrapers, "ports": [{"protocol": "TCP", "port": 9200}]}

    docs = render(chart, dict(values, swarm={"batching": False}))
    for key in DEFAULT_MODELS:
        container = server_container(docs, key, 0)
        assert "SWARM_METRICS_PORT" not in container_env(container)
        assert [port["name"] for port in container["ports"]] == ["p2p"]
    assert [port["name"] for port in find(docs, "Service", f"{FULLNAME}-swarm")["spec"]["ports"]] == ["p2p"]
    assert not [d for d in docs if d["kind"] == "ServiceMonitor" and d["metadata"]["name"] == f"{FULLNAME}-swarm"]
    assert len(find(docs, "NetworkPolicy", f"{FULLNAME}-swarm")["spec"]["ingress"]) == 1


def test_notes_warn_that_no_scraper_reaches_the_batching_servers(chart):
    values = {"monitoring": {"serviceMonitor": {"enabled": True}}, "swarm": {"batching": True}}
    notes = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert "the swarm servers' batching metrics" in next(t for path, t in notes.items() if path.endswith("NOTES.txt"))


def test_each_server_runs_one_connection_handler_per_granted_cpu():
    """--num_handlers from the server's cpu limit, else its request, rounded up, at most 8; swarm.numHandlers
    overrides."""
    with helm_python.Chart.load(str(CHART)) as loaded:
        defaults = render(loaded)
        custom = render(loaded, {"swarm": {"numHandlers": 8}})
    for docs, fixed in ((defaults, None), (custom, "8")):
        servers = [d for d in docs if d["kind"] == "StatefulSet" and "-swarm-" in d["metadata"]["name"]]
        assert len(servers) == 3  # SmolLM2's two, tiny BLOOM's one
        for sts in servers:
            container = sts["spec"]["template"]["spec"]["containers"][0]
            assert arg(container, "--num_handlers") == (fixed or granted_cpus(container["resources"]))
    assert {arg(server_container(defaults, key, 0), "--num_handlers") for key in ("smollm2", "tiny-bloom")} == {"1"}
    for cpu, handlers in (("3", "3"), ("16", "8")):  # at most Petals' own default
        model = {**HUB_MODEL, "swarm": {"servers": ["0:24"], "resources": {"limits": {"cpu": cpu, "memory": "8Gi"}}}}
        with helm_python.Chart.load(str(CHART)) as loaded:
            big = render(loaded, {"models": [model]})
        assert arg(server_container(big, "bloom-560m", 0), "--num_handlers") == handlers


def test_the_swarm_state_settings_reach_every_replica(chart):
    """inference.swarmState: the replicas' SWARM_STATE_* (their defaults, or the operator's)."""
    values = {"inference": {"swarmState": {"refreshSeconds": 5, "maxServers": 20, "minRedundancy": 2,
                                           "minCacheTokens": 0}}}  # fmt: skip
    for rendered, expected in (
        (render(chart), ("30", "100", "1", "1024")),
        (render(chart, values), ("5", "20", "2", "0")),
    ):
        env = container_env(inference_container(rendered)[1])
        names = ("REFRESH_SECONDS", "MAX_SERVERS", "MIN_REDUNDANCY", "MIN_CACHE_TOKENS")
        assert tuple(env[f"SWARM_STATE_{name}"] for name in names) == expected
