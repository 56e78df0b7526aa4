"""The inference service's /metrics: exposition parses, token counters follow real generation."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def samples(api) -> dict[tuple[str, tuple], float]:
    families = text_string_to_metric_families(api.metrics())  # raises if the exposition is malformed
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def value(snapshot: dict, name: str, **labels: str) -> float:
    return snapshot.get((name, tuple(sorted(labels.items()))), 0.0)


def test_token_metrics_count_generated_tokens(api):
    before = samples(api)
    n = 7
    assert api.generate(inputs="A human talks to", max_new_tokens=n)["ok"]
    session_id = api.open_session(64)
    assert api.generate(inputs="Hi", max_new_tokens=1, session_id=session_id)["ok"]
    assert api.generate(max_new_tokens=1, session_id=session_id)["ok"]
    api.close_session(session_id)
    after = samples(api)
    total = n + 2
    assert (
        value(after, "petals_chat_token_latency_seconds_count")
        - value(before, "petals_chat_token_latency_seconds_count")
        == total
    )
    assert (
        value(after, "petals_chat_generated_tokens_total") - value(before, "petals_chat_generated_tokens_total")
        == total
    )
    assert (
        value(after, "petals_chat_time_to_first_token_seconds_count")
        - value(before, "petals_chat_time_to_first_token_seconds_count")
        == 3
    )
    assert value(after, "petals_chat_prompt_tokens_total") > value(before, "petals_chat_prompt_tokens_total")
    assert value(after, "petals_chat_sessions_opened_total") - value(before, "petals_chat_sessions_opened_total") == 1
    closed = value(after, "petals_chat_sessions_closed_total", reason="closed")
    assert closed - value(before, "petals_chat_sessions_closed_total", reason="closed") == 1
    generate_ok = value(after, "petals_chat_requests_total", endpoint="/api/v1/generate", status="200")
    assert generate_ok - value(before, "petals_chat_requests_total", endpoint="/api/v1/generate", status="200") == 3
    assert value(after, "petals_chat_swarm_ready") == 1


def test_errors_are_counted_under_their_real_status(api):
    before = samples(api)
    assert api.generate(inputs="Hi", max_new_tokens=1, session_id="inference-0.gone")["ok"] is False
    after = samples(api)
    label = {"endpoint": "/api/v1/generate", "status": "404"}
    assert (
        value(after, "petals_chat_requests_total", **label) - value(before, "petals_chat_requests_total", **label) == 1
    )
