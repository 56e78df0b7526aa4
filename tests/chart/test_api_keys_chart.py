"""The chart's API keys (a Secret mounted into the gateway as a file) and the per-client session quota."""

from __future__ import annotations

import base64

import helm_python
import kubernetes_validate
import pytest
import yaml

from tests.chart.test_chart import FULLNAME, KUBE_VERSION, NAMESPACE, RELEASE, container_env, find, render

KEYS = ["alice:alice-key-0123456789abcdef", "bob:bob-key-0123456789abcdef"]
MOUNT = "/etc/petals-chat/api-keys"


def gateway(docs: list[dict]) -> tuple[dict, dict]:
    """The gateway's pod spec and its container."""
    spec = find(docs, "Deployment", f"{FULLNAME}-gateway")["spec"]["template"]["spec"]
    return spec, spec["containers"][0]


def inference_env(docs: list[dict]) -> list[dict]:
    return [
        container_env(d["spec"]["template"]["spec"]["containers"][0])
        for d in docs
        if d["kind"] == "StatefulSet" and "-inference-" in d["metadata"]["name"]
    ]


def test_keys_are_off_by_default(chart):
    docs = render(chart)
    _, container = gateway(docs)
    assert "API_KEYS_FILE" not in container_env(container) and "API_KEYS" not in container_env(container)
    assert not [d for d in docs if d["kind"] == "Secret" and "api-keys" in d["metadata"]["name"]]
    assert {env["MAX_SESSIONS_PER_CLIENT"] for env in inference_env(docs)} == {"4"}  # the quota is on without keys


def test_keys_from_the_chart_made_secret_are_mounted_as_a_file(chart):
    values = {"gateway": {"apiKeys": {"enabled": True, "keys": KEYS, "anonymousRateLimitPerMinute": 6}}}
    docs = render(chart, values)
    secret = find(docs, "Secret", f"{FULLNAME}-api-keys")
    assert base64.b64decode(secret["data"]["keys"]).decode() == "\n".join(KEYS) + "\n"
    spec, container = gateway(docs)
    env = container_env(container)
    assert env["API_KEYS_FILE"] == f"{MOUNT}/keys" and env["ANONYMOUS_RATE_LIMIT_PER_MINUTE"] == "6"
    assert {"name": "api-keys", "mountPath": MOUNT, "readOnly": True} in container["volumeMounts"]
    volume = next(v for v in spec["volumes"] if v["name"] == "api-keys")
    assert volume["secret"]["secretName"] == f"{FULLNAME}-api-keys"
    for doc in (secret, find(docs, "Deployment", f"{FULLNAME}-gateway")):
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    # Never a plain value: no key in any ConfigMap, env value or anywhere but the Secret's (encoded) data.
    others = yaml.safe_dump_all([d for d in docs if d is not secret])
    assert not any(key.split(":", 1)[1] in others for key in KEYS)


def test_an_existing_secret_is_used_as_it_is(chart):
    docs = render(chart, {"gateway": {"apiKeys": {"enabled": True, "existingSecret": "my-keys"}}})
    assert not [d for d in docs if d["kind"] == "Secret" and "api-keys" in d["metadata"]["name"]]
    spec, _ = gateway(docs)
    assert next(v for v in spec["volumes"] if v["name"] == "api-keys")["secret"]["secretName"] == "my-keys"


def test_keys_on_without_any_key_fail_clearly(chart):
    with pytest.raises(helm_python.HelmRenderError) as info:
        chart.render({"gateway": {"apiKeys": {"enabled": True}}}, name=RELEASE, namespace=NAMESPACE)
    assert "gateway.apiKeys.enabled needs gateway.apiKeys.existingSecret or at least one" in str(info.value)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"gateway": {"apiKeys": {"keys": ["alice:short"]}}}, "at '/gateway/apiKeys/keys/0'"),
        ({"gateway": {"apiKeys": {"keys": ["no id here 0123456789"]}}}, "at '/gateway/apiKeys/keys/0'"),
        ({"gateway": {"apiKeys": {"anonymousRateLimitPerMinute": -1}}}, "anonymousRateLimitPerMinute': minimum"),
        ({"gateway": {"apiKeys": {"key": "x"}}}, "additional properties 'key' not allowed"),
        ({"inference": {"maxSessionsPerClient": -1}}, "at '/inference/maxSessionsPerClient': minimum"),
        ({"inference": {"maxSessionlessRequests": 0}}, "at '/inference/maxSessionlessRequests': minimum"),
    ],
)
def test_schema_rejects_bad_key_and_quota_values(chart, values, message):
    with pytest.raises(helm_python.HelmValuesError) as info:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert message in info.value.detail


def test_the_session_quota_reaches_every_replica(chart):
    docs = render(chart, {"inference": {"maxSessionsPerClient": 4}})
    assert {env["MAX_SESSIONS_PER_CLIENT"] for env in inference_env(docs)} == {"4"}
