"""The pod harness's plan (tests/deploy/pod_harness.py), from hand-written manifests: no podman, no images.

What a cluster would run: the replicas an autoscaler keeps with no load, and the DNS names each pod
answers to (a headless Service's name resolves to every pod it selects, ready or not).
"""

from __future__ import annotations

import pytest

from tests.deploy.pod_harness import PodHarness

NS = "llm"
LABELS = {"app.kubernetes.io/component": "inference", "model": "smollm2"}


def statefulset(name: str = "inference-smollm2", replicas: int | None = 2, labels: dict | None = None) -> dict:
    labels = labels or LABELS
    spec = {
        "serviceName": "inference",
        "selector": {"matchLabels": labels},
        "template": {
            "metadata": {"labels": labels},
            "spec": {"containers": [{"name": "inference", "image": "localhost/petals-chat-inference:0.1.0"}]},
        },
    }
    if replicas is not None:
        spec["replicas"] = replicas
    return {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": name, "namespace": NS}, "spec": spec}


def headless_service(name: str, selector: dict[str, str]) -> dict:
    spec = {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": selector, "ports": [{"port": 8080}]}
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": NS}, "spec": spec}


def hpa(target: str, kind: str, min_replicas: int | None) -> dict:
    spec: dict = {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": kind, "name": target}, "maxReplicas": 5}
    if min_replicas is not None:
        spec["minReplicas"] = min_replicas
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "h"}, "spec": spec}


def scaled_object(target: str, kind: str | None, min_count: int | None) -> dict:
    ref = {"name": target} | ({"apiVersion": "apps/v1", "kind": kind} if kind else {})
    spec: dict = {"scaleTargetRef": ref, "maxReplicaCount": 4, "triggers": [{"type": "prometheus"}]}
    if min_count is not None:
        spec["minReplicaCount"] = min_count
    return {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": "s"}, "spec": spec}


def planned(*docs: dict) -> dict[str, list[str]]:
    """Pod name -> its DNS aliases, as the harness plans them."""
    with PodHarness(list(docs), namespace=NS) as harness:
        return {pod.name: pod.aliases for pod in harness.plan()}


def test_every_pod_a_headless_service_selects_answers_to_its_names():
    pods = planned(
        statefulset(),
        statefulset("inference-bloom", 1, LABELS | {"model": "bloom"}),
        headless_service("inference", {"app.kubernetes.io/component": "inference"}),
        headless_service("inference-smollm2", LABELS),
    )
    assert sorted(pods) == ["inference-bloom-0", "inference-smollm2-0", "inference-smollm2-1"]
    model_fqdn = f"inference-smollm2.{NS}.svc.cluster.local"
    for name in ("inference-smollm2-0", "inference-smollm2-1"):
        # Its own StatefulSet name, then each Service's: every replica shares the Service's FQDN, so it
        # resolves to all of them, from their start (not only once ready: publishNotReadyAddresses).
        assert pods[name][:2] == [f"{name}.inference.{NS}.svc.cluster.local", f"{name}.inference.{NS}.svc"]
        assert {f"inference.{NS}.svc.cluster.local", model_fqdn, "inference-smollm2"} <= set(pods[name])
    assert f"inference.{NS}.svc.cluster.local" in pods["inference-bloom-0"]
    assert model_fqdn not in pods["inference-bloom-0"]  # a selector's every label, or not selected


@pytest.mark.parametrize(
    ("scaler", "expected"),
    [
        (None, 2),  # spec.replicas
        (hpa("inference-smollm2", "StatefulSet", 3), 3),  # an HPA's minReplicas wins over spec.replicas
        (hpa("inference-smollm2", "StatefulSet", None), 1),  # minReplicas defaults to 1
        (hpa("inference-smollm2", "Deployment", 3), 2),  # another kind: not this StatefulSet
        (scaled_object("inference-smollm2", "StatefulSet", 3), 3),
        (scaled_object("inference-smollm2", "StatefulSet", 0), 1),  # scale to zero: one runs here
        (scaled_object("inference-smollm2", "StatefulSet", None), 1),  # minReplicaCount defaults to 0
        (scaled_object("inference-smollm2", None, 3), 2),  # no kind: a Deployment
        (scaled_object("other", "StatefulSet", 3), 2),
    ],
)
def test_a_statefulset_runs_its_autoscalers_minimum(scaler, expected):
    docs = [statefulset(replicas=2)] + ([scaler] if scaler else [])
    assert len(planned(*docs)) == expected


def test_a_deployment_under_a_scaled_object_without_kind_runs_its_minimum():
    deployment = statefulset("gateway", replicas=None) | {"kind": "Deployment"}
    deployment["spec"].pop("serviceName")
    assert sorted(planned(deployment, scaled_object("gateway", None, 2))) == ["gateway-0", "gateway-1"]
    assert sorted(planned(deployment)) == ["gateway-0"]
