"""Autoscaling of each model's inference replicas: a KEDA ScaledObject (down to zero) or an HPA per model, the
StatefulSet leaving its count to it, PDBs valid at any count, and every manifest checked against its API's schema
by the kubernetes-models packages (tests/js/validate_manifests.mjs)."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess

import helm_python
import kubernetes_validate
import pytest

from tests.chart.test_chart import CHART, FULLNAME, KUBE_VERSION, NAMESPACE, ROOT, find, labels_match, render

VALIDATOR = ROOT / "tests" / "js" / "validate_manifests.mjs"
KEYS = {"smollm2": "smollm2-135m-instruct", "tiny-bloom": "tiny-bloom"}  # the default models: key -> name
ENGINES = {  # what each case turns on, for both default models
    "keda": {"enabled": True, "engine": "keda"},
    "hpa": {"enabled": True, "engine": "hpa", "targets": {"requestsRunning": 2}},
    "keda-to-zero": {"enabled": True, "engine": "keda", "minReplicas": 0},
}


def autoscaled(case: str, **more: object) -> dict:
    return {"inference": {"autoscaling": {**copy.deepcopy(ENGINES[case]), **more}}}


def scaler(docs: list[dict], kind: str, key: str) -> dict:
    return find(docs, kind, f"{FULLNAME}-inference-{key}")


def inference_statefulset(docs: list[dict], key: str) -> dict:
    return find(docs, "StatefulSet", f"{FULLNAME}-inference-{key}")


def inference_scalers(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] in ("ScaledObject", "HorizontalPodAutoscaler") and "-inference-" in
            d["metadata"]["name"]]  # fmt: skip


def test_off_by_default_the_statefulsets_keep_their_count(chart):
    docs = render(chart)
    assert not inference_scalers(docs)
    assert inference_statefulset(docs, "smollm2")["spec"]["replicas"] == 2
    assert inference_statefulset(docs, "tiny-bloom")["spec"]["replicas"] == 1


def test_keda_scales_each_statefulset_on_its_replicas_gauges(chart):
    values = autoscaled("keda", maxReplicas=6, cooldownSeconds=120,
                        keda={"serverAddress": "http://prom.mon:9090", "pollingIntervalSeconds": 10},
                        targets={"sessionUtilization": 0.6, "requestsRunning": 0, "requestsWaiting": 1})  # fmt: skip
    docs = render(chart, values)
    assert len(inference_scalers(docs)) == 2
    for key in KEYS:
        statefulset = inference_statefulset(docs, key)
        assert "replicas" not in statefulset["spec"]  # the autoscaler's
        scaled = scaler(docs, "ScaledObject", key)
        assert scaled["apiVersion"] == "keda.sh/v1alpha1"
        assert labels_match({"matchLabels": {"app.kubernetes.io/component": "inference"}}, scaled["metadata"]["labels"])
        spec = scaled["spec"]
        assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet",
                                          "name": statefulset["metadata"]["name"]}  # fmt: skip
        assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (1, 6)
        assert (spec["pollingInterval"], spec["cooldownPeriod"]) == (10, 120)
        scale_down = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
        assert scale_down["stabilizationWindowSeconds"] == 120
        assert scale_down["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 60}]  # one handover at once
        triggers = {t["name"]: t for t in spec["triggers"]}
        assert set(triggers) == {"session-utilization", "requests-waiting"}  # requestsRunning: 0, not used
        pods = f'namespace="{NAMESPACE}",pod=~"{statefulset["metadata"]["name"]}-[0-9]+"'
        for name, metric, threshold in (("session-utilization", "petals_chat_session_utilization", "0.6"),
                                        ("requests-waiting", "petals_chat_requests_waiting", "1")):  # fmt: skip
            assert triggers[name]["type"] == "prometheus" and triggers[name]["metricType"] == "AverageValue"
            assert triggers[name]["metadata"] == {
                "serverAddress": "http://prom.mon:9090",
                "query": f"sum({metric}{{{pods}}})",
                "threshold": threshold,
                "ignoreNullValues": "true",
            }


def test_the_default_signals_are_generations_in_progress_and_the_session_share(chart):
    """The targets docs/deploying.md justifies from bench/autoscale_signal.py's figures."""
    scaled = inference_scalers(render(chart, autoscaled("keda")))[0]
    thresholds = {t["name"]: t["metadata"]["threshold"] for t in scaled["spec"]["triggers"]}
    assert thresholds == {"session-utilization": "0.8", "requests-running": "4"}


def test_scale_to_zero_wakes_on_the_gateways_requests_without_a_replica(chart):
    docs = render(chart, autoscaled("keda-to-zero"))
    for key, name in KEYS.items():
        spec = scaler(docs, "ScaledObject", key)["spec"]
        assert spec["minReplicaCount"] == 0
        wake = next(t for t in spec["triggers"] if t["name"] == "requests-without-replica")
        query = wake["metadata"]["query"]
        assert "petals_chat_gateway_requests_without_replica_total" in query
        assert f'model="{name}"' in query and f'namespace="{NAMESPACE}"' in query
        assert query.startswith("clamp_max(") and query.endswith(", 1)")  # asks for one replica, never more
        assert wake["metadata"]["activationThreshold"] == "0" and wake["metadata"]["threshold"] == "1"
    keda = render(chart, autoscaled("keda"))
    for scaled in inference_scalers(keda):  # no wake trigger at min 1
        assert "requests-without-replica" not in {t["name"] for t in scaled["spec"]["triggers"]}


def test_hpa_scales_on_pods_metrics(chart):
    docs = render(chart, autoscaled("hpa", minReplicas=2, maxReplicas=5))
    for key in KEYS:
        hpa = scaler(docs, "HorizontalPodAutoscaler", key)
        assert "replicas" not in inference_statefulset(docs, key)["spec"]
        assert hpa["spec"]["scaleTargetRef"]["kind"] == "StatefulSet"
        assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 5)
        metrics = {m["pods"]["metric"]["name"]: m["pods"]["target"] for m in hpa["spec"]["metrics"]}
        assert all(m["type"] == "Pods" for m in hpa["spec"]["metrics"])
        assert metrics == {
            "petals_chat_session_utilization": {"type": "AverageValue", "averageValue": "800m"},
            "petals_chat_requests_running": {"type": "AverageValue", "averageValue": "2000m"},
        }
        kubernetes_validate.validate(hpa, KUBE_VERSION, strict=True)


def test_a_model_overrides_the_defaults_key_by_key(chart):
    models = [
        {"name": "a", "key": "a", "path": "a/a", "inference": {"autoscaling": {"minReplicas": 0, "targets": {
            "requestsRunning": 3}}}},
        {"name": "b", "key": "b", "path": "b/b", "inference": {"autoscaling": {"engine": "hpa"}}},
        {"name": "c", "key": "c", "path": "c/c", "inference": {"replicas": 3, "autoscaling": {"enabled": False}}},
    ]  # fmt: skip
    docs = render(chart, {"models": models, **autoscaled("keda")})
    a = scaler(docs, "ScaledObject", "a")["spec"]
    assert a["minReplicaCount"] == 0  # 0 over the default's 1
    assert {t["name"] for t in a["triggers"]} == {"session-utilization", "requests-running", "requests-without-replica"}
    assert next(t for t in a["triggers"] if t["name"] == "requests-running")["metadata"]["threshold"] == "3"
    assert scaler(docs, "HorizontalPodAutoscaler", "b")["spec"]["minReplicas"] == 1
    assert inference_statefulset(docs, "c")["spec"]["replicas"] == 3  # false over the default's true
    assert len(inference_scalers(docs)) == 2


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (autoscaled("hpa", minReplicas=0), "minimum"),  # the schema: an HPA keeps one replica
        (
            {
                "models": [{"name": "m", "path": "m/m", "inference": {"autoscaling": {"minReplicas": 0}}}],
                **autoscaled("hpa"),
            },
            "minReplicas 0 (scale to zero) needs engine keda",
        ),
        (autoscaled("keda", minReplicas=3, maxReplicas=2), "maxReplicas 2 is below minReplicas 3"),
        (autoscaled("keda", targets={"sessionUtilization": 0, "requestsRunning": 0}), "every target is 0"),
        (autoscaled("keda", engine="knative"), "engine"),
        (autoscaled("keda", targets={"sessionUtilization": 1.5}), "sessionUtilization"),
        (autoscaled("keda", keda={"serverAddress": "prometheus:9090"}), "serverAddress"),
    ],
    ids=["hpa-to-zero-schema", "hpa-to-zero-model", "max-below-min", "no-target", "engine", "share", "address"],
)
def test_autoscaling_that_cannot_work_fails_clearly(chart, values, message):
    with pytest.raises((helm_python.HelmRenderError, helm_python.HelmValuesError)) as info:
        chart.render(values, name="chat", namespace=NAMESPACE)
    assert message in str(info.value)


@pytest.mark.parametrize("case", ["keda-to-zero", "hpa"])
def test_the_inference_pdbs_stay_valid_at_any_count(chart, case):
    """maxUnavailable, never minAvailable: at 0 replicas nothing to protect, at 1 a drain may take it (its
    sessions are handed over, or a scaled-to-zero model wakes again on the next request)."""
    docs = render(chart, autoscaled(case))
    for key in KEYS:
        pdb = find(docs, "PodDisruptionBudget", f"{FULLNAME}-inference-{key}")
        assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]
        labels = inference_statefulset(docs, key)["spec"]["template"]["metadata"]["labels"]
        assert labels_match(pdb["spec"]["selector"], labels)
        assert not [d for d in docs if d["kind"] == "PodDisruptionBudget" and labels_match(d["spec"]["selector"],
                    labels) and d is not pdb]  # fmt: skip


def test_each_replica_is_scraped_once(chart):
    """The per-model headless Services would scrape every replica twice: the sums the autoscalers read would double."""
    docs = render(chart, {"monitoring": {"serviceMonitor": {"enabled": True}}})
    monitor = find(docs, "ServiceMonitor", f"{FULLNAME}-inference")
    services = [
        d for d in docs if d["kind"] == "Service" and labels_match(monitor["spec"]["selector"], d["metadata"]["labels"])
    ]
    assert [s["metadata"]["name"] for s in services] == [f"{FULLNAME}-inference"]


def test_notes_say_what_the_autoscalers_need(chart):
    out = chart.render(autoscaled("keda"), name="chat", namespace=NAMESPACE)
    notes = next(text for path, text in out.items() if path.endswith("NOTES.txt"))
    assert "1-4 (autoscaled, keda)" in notes
    assert "networkPolicy.metricsFrom is empty" in notes


def test_helm_lint_is_clean_with_autoscaling():
    for case in ENGINES:
        result = helm_python.lint(str(CHART), values=autoscaled(case), strict=True, kube_version="v1.30.0")
        assert not [m for m in result["messages"] if m["severity"] >= 2] and not result["errors"], result


def validate(manifests: list[dict]) -> tuple[int, dict]:
    """tests/js/validate_manifests.mjs on these manifests: its exit status and report."""
    if shutil.which("node") is None or not (VALIDATOR.parent / "node_modules" / "kubernetes-models").is_dir():
        pytest.fail("node or tests/js/node_modules is missing: run `npm ci --prefix tests/js` (make test does)")
    result = subprocess.run(["node", str(VALIDATOR)], input=json.dumps(manifests), capture_output=True, text=True,
                            timeout=120, cwd=VALIDATOR.parent)  # fmt: skip
    assert result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout)


@pytest.mark.parametrize("case", list(ENGINES))
def test_rendered_manifests_pass_their_api_schemas(chart, case):
    """Both models autoscaled: the ScaledObjects (keda.sh/v1alpha1) or HPAs, and every built-in manifest."""
    docs = render(chart, {**autoscaled(case), "monitoring": {"serviceMonitor": {"enabled": True}}})
    status, report = validate(docs)
    assert status == 0 and report["errors"] == [], report["errors"]
    kind = "HorizontalPodAutoscaler" if case == "hpa" else "ScaledObject"
    assert {f"{kind}/{FULLNAME}-inference-{key}" for key in KEYS} <= set(report["validated"])
    assert {f"StatefulSet/{FULLNAME}-inference-{key}" for key in KEYS} <= set(report["validated"])
    assert len(report["validated"]) + len(report["skipped"]) == len(docs)
    assert all(name.startswith("ServiceMonitor/") for name in report["skipped"])  # no model package for these


def test_the_schema_check_catches_a_broken_manifest(chart):
    """The negative case: the same manifests with a wrong field type each fail, by field."""
    docs = inference_scalers(render(chart, autoscaled("keda-to-zero")))
    hpa = inference_scalers(render(chart, autoscaled("hpa")))[0]
    broken_scaled, broken_hpa = copy.deepcopy(docs[0]), copy.deepcopy(hpa)
    broken_scaled["spec"]["minReplicaCount"] = "zero"
    broken_hpa["spec"]["maxReplicas"] = "5"
    status, report = validate([broken_scaled, docs[1], broken_hpa])
    assert status == 1
    assert report["validated"] == [f"ScaledObject/{docs[1]['metadata']['name']}"]
    messages = {error["resource"]: error["message"] for error in report["errors"]}
    assert "minReplicaCount must be integer" in messages[f"ScaledObject/{broken_scaled['metadata']['name']}"]
    assert "maxReplicas must be integer" in messages[f"HorizontalPodAutoscaler/{broken_hpa['metadata']['name']}"]
