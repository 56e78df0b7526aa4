"""The chart's session handover: the replicas' shared token, each model's peers (found through DNS), the replicas
reaching each other, and the headless Services keeping unready replicas' names."""

from __future__ import annotations

from tests.chart.test_chart import FULLNAME, NAMESPACE, container_env, find, inference_container, labels_match, render


def test_every_replica_gets_the_token_its_models_peers_and_the_linger(chart):
    docs = render(chart, {"inference": {"handover": {"lingerSeconds": 8}}})
    secret = find(docs, "Secret", f"{FULLNAME}-handover")
    assert len(secret["data"]["token"]) >= 64  # 48 random characters, base64
    pod, container = inference_container(docs)
    env = container_env(container)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert env["HANDOVER_TOKEN_FILE"] == f"{mounts['handover-token']}/token"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["handover-token"]["secret"]["secretName"] == f"{FULLNAME}-handover"
    assert "INFERENCE_PEERS" not in env  # no fixed list: its model's replicas are found through DNS
    own = find(docs, "Service", f"{FULLNAME}-inference-smollm2")  # the model's headless Service
    assert env["INFERENCE_DISCOVERY"] == f"dns://{own['metadata']['name']}.{NAMESPACE}.svc.cluster.local:8080"
    assert env["HANDOVER_LINGER_SECONDS"] == "8"


def test_the_replicas_reach_each_other_only_with_handover(chart):
    docs = render(chart)
    policy = find(docs, "NetworkPolicy", f"{FULLNAME}-inference")
    labels = find(docs, "StatefulSet", f"{FULLNAME}-inference-smollm2")["spec"]["template"]["metadata"]["labels"]
    peers = [peer["podSelector"] for rule in policy["spec"]["ingress"] for peer in rule["from"]]
    assert any(labels_match(selector, labels) for selector in peers)
    assert all(rule["ports"] == [{"protocol": "TCP", "port": 8080}] for rule in policy["spec"]["ingress"])
    off = render(chart, {"inference": {"handover": {"enabled": False}}})
    assert not [d for d in off if d["kind"] == "Secret" and d["metadata"]["name"] == f"{FULLNAME}-handover"]
    _pod, container = inference_container(off)
    assert "HANDOVER_TOKEN_FILE" not in container_env(container)


def test_unready_replicas_keep_their_names(chart):
    docs = render(chart)
    for name in (f"{FULLNAME}-inference", f"{FULLNAME}-inference-smollm2", f"{FULLNAME}-inference-tiny-bloom"):
        assert find(docs, "Service", name)["spec"]["publishNotReadyAddresses"] is True
