"""The swarm in view, against the real test swarm: ``GET /api/v2/swarm`` and the replica's swarm metrics
show which servers hold which blocks (the replicas of the tests read the DHT every second,
``SWARM_STATE_REFRESH_SECONDS=1`` in tests/helpers.py)."""

from __future__ import annotations

import requests

from services.common.api.swarm_state import ModelSwarm
from tests.helpers import metric_value


def test_the_endpoint_shows_every_server_and_block(gateway, swarm, model_dir):
    everything = requests.get(f"{gateway.base_url}/api/v2/swarm", timeout=10)
    assert everything.status_code == 200
    [listed] = everything.json()["models"]
    one = requests.get(f"{gateway.base_url}/api/v2/swarm", params={"model": model_dir.name}, timeout=10).json()
    for body in (listed, one):
        state = ModelSwarm.from_json(body)
        assert state.model == model_dir.name and state.state == "healthy" and state.full_route
        assert state.coverage == (1, 1, 1, 1) and state.blocks_without_server == () and state.min_redundancy == 1
        assert state.servers_by_state == {"online": 2, "joining": 0, "offline": 0} and not state.servers_truncated
        assert sorted((s.start_block, s.end_block) for s in state.servers) == [(0, 2), (2, 4)]
        assert all(s.version and s.throughput and s.cache_tokens_left for s in state.servers)
        assert state.updated_at and state.updated_at.endswith("Z") and state.refresh_seconds == 1


def test_an_unknown_or_malformed_model_is_refused_in_the_v2_shape(gateway):
    unknown = requests.get(f"{gateway.base_url}/api/v2/swarm", params={"model": "no-such-model"}, timeout=10)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    malformed = requests.get(f"{gateway.base_url}/api/v2/swarm", params={"model": "a b"}, timeout=10)
    assert malformed.status_code == 400 and malformed.json()["ok"] is False


def test_the_replica_exports_the_swarm_metrics(inference, model_dir):
    text = requests.get(f"{inference.base_url}/metrics", timeout=10).text
    model = f'model="{model_dir.name}"'
    assert metric_value(text, f"petals_chat_swarm_blocks{{{model}}}") == 4
    assert metric_value(text, f"petals_chat_swarm_blocks_without_server{{{model}}}") == 0
    assert metric_value(text, f'petals_chat_swarm_servers{{{model},state="online"}}') == 2
    assert metric_value(text, f'petals_chat_swarm_health{{{model},state="healthy"}}') == 1
