"""The gateway's upstream metrics: replicas by route, the ui in metrics of its own."""

from __future__ import annotations

from prometheus_client import REGISTRY

from services.gateway.upstream import ReplicaCall, UiCall


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_replica_call_is_counted_by_replica_and_route():
    before = sample("petals_chat_gateway_upstream_duration_seconds_count", replica="inference-9", endpoint="/readyz")
    ReplicaCall("inference-9", "/readyz").observe(0.01)
    after = sample("petals_chat_gateway_upstream_duration_seconds_count", replica="inference-9", endpoint="/readyz")
    assert after == before + 1


def test_the_ui_is_no_replica_and_its_paths_make_no_labels():
    errors = sample("petals_chat_gateway_ui_errors_total", kind="connect")
    seen = sample("petals_chat_gateway_ui_duration_seconds_count")
    UiCall().failed("connect")
    UiCall().observe(0.01)
    assert sample("petals_chat_gateway_ui_errors_total", kind="connect") == errors + 1
    assert sample("petals_chat_gateway_ui_duration_seconds_count") == seen + 1
    assert sample("petals_chat_gateway_upstream_errors_total", replica="ui", kind="connect") == 0
