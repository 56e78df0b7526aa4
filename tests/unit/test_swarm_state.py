"""The swarm's state per model: the summary of the servers a replica reads from the DHT
(services/common/api/swarm_state.py, services/inference/swarm_watch.py), its bounds on a public-sized
swarm, its JSON form, and the metrics it sets."""

from __future__ import annotations

import json
import random
import time
from datetime import UTC, datetime
from enum import Enum
from types import SimpleNamespace

from prometheus_client import REGISTRY

from services.common.api.swarm_state import (
    ModelSwarm,
    ServerEntry,
    SwarmHealth,
    SwarmThresholds,
    summarise,
    uncovered_ranges,
)
from services.inference.metrics import record_swarm
from services.inference.swarm_watch import server_entries

NOW = datetime(2026, 12, 7, 12, 0, 0, tzinfo=UTC)


def server(peer: str, start: int, end: int, state: str = "online", throughput=1.0, cache=4096) -> ServerEntry:
    return ServerEntry(peer, start, end, state, throughput, cache, "2.2.0")


def test_a_fully_served_model_is_healthy_and_counted_per_block():
    swarm = summarise("m", 4, [server("a", 0, 2), server("b", 2, 4), server("c", 0, 4, cache=100)], max_servers=10,
                      refresh_seconds=30, now=NOW)  # fmt: skip
    assert swarm.state is SwarmHealth.HEALTHY and swarm.full_route
    assert swarm.coverage == (2, 2, 2, 2) and swarm.min_redundancy == 2
    assert swarm.blocks_without_server == ()
    assert swarm.cache_tokens_left == 4096 * 2 + 100  # as announced: keys and values of one block
    assert swarm.min_block_cache_tokens_left == 4096 // 4 + 100 // 8  # session tokens: 2 per token and block
    assert swarm.updated_at == "2026-12-07T12:00:00Z" and swarm.refresh_seconds == 30


def test_a_block_range_without_an_online_server_is_broken():
    servers = [server("a", 0, 2, state="offline"), server("b", 2, 4), server("c", 5, 6), server("d", 0, 1, "joining")]
    swarm = summarise("m", 6, servers, max_servers=10, refresh_seconds=1, now=NOW)
    assert swarm.state is SwarmHealth.BROKEN and not swarm.full_route
    assert swarm.coverage == (0, 0, 1, 1, 0, 1) and swarm.min_redundancy == 0
    assert swarm.blocks_without_server == ((0, 2), (4, 5))
    assert swarm.servers_by_state == {"online": 2, "joining": 1, "offline": 1}
    assert [s.peer_id for s in swarm.servers] == ["b", "c", "d", "a"]  # online first, then joining, offline


def test_low_redundancy_or_nearly_full_caches_degrade():
    servers = [server("a", 0, 4, cache=500), server("b", 0, 2, cache=600)]
    assert summarise("m", 4, servers, max_servers=5, refresh_seconds=1).state is SwarmHealth.HEALTHY
    degraded = summarise("m", 4, servers, max_servers=5, refresh_seconds=1, thresholds=SwarmThresholds(2, 0))
    assert degraded.state is SwarmHealth.DEGRADED and degraded.min_redundancy == 1
    full = summarise("m", 4, servers, max_servers=5, refresh_seconds=1, thresholds=SwarmThresholds(1, 63))
    assert full.state is SwarmHealth.DEGRADED and full.min_block_cache_tokens_left == 500 // 8
    silent = summarise("m", 4, [server("a", 0, 4, cache=None)], max_servers=5, refresh_seconds=1,
                       thresholds=SwarmThresholds(1, 10**6))  # fmt: skip
    assert silent.state is SwarmHealth.HEALTHY and silent.cache_tokens_left is None


def test_uncovered_ranges_are_end_exclusive():
    assert uncovered_ranges([0, 0, 1, 0]) == ((0, 2), (3, 4))
    assert uncovered_ranges([]) == () and uncovered_ranges([1, 2]) == ()


def test_a_public_sized_swarm_stays_bounded():
    """5000 servers over 80 blocks: the summary lists at most max_servers (the online, fastest ones),
    its JSON stays small, and it is computed quickly."""
    rng = random.Random(7)
    states = ["online"] * 8 + ["joining", "offline"]
    servers = []
    for index in range(5000):
        start = rng.randrange(80)
        end = min(80, start + rng.randrange(1, 20))
        servers.append(
            server(f"peer-{index}", start, end, rng.choice(states), rng.uniform(1, 1000), rng.randrange(10**5))
        )
    started = time.perf_counter()
    swarm = summarise("big", 80, servers, max_servers=100, refresh_seconds=30, now=NOW)
    elapsed = time.perf_counter() - started
    assert len(swarm.servers) == 100 and swarm.servers_truncated and swarm.servers_total == 5000
    assert sum(swarm.servers_by_state.values()) == 5000
    assert all(s.state == "online" for s in swarm.servers)
    throughputs = [s.throughput for s in swarm.servers]
    online = sorted((s.throughput for s in servers if s.state == "online"), reverse=True)
    assert throughputs == online[:100]
    assert len(swarm.coverage) == 80 and len(swarm.blocks_without_server) <= 40
    assert sum(swarm.coverage) == sum(s.end_block - s.start_block for s in servers if s.state == "online")
    size = len(json.dumps(swarm.to_json()))
    assert size < 30_000, size
    print(f"5000 servers, 80 blocks: summarised in {elapsed * 1000:.1f} ms, {size} bytes of JSON")


def test_the_json_form_round_trips():
    swarm = summarise("m", 3, [server("a", 0, 2), server("b", 1, 3, "joining", None, None)], max_servers=1,
                      refresh_seconds=2.5, now=NOW)  # fmt: skip
    body = json.loads(json.dumps(swarm.to_json()))
    assert body["blocks_without_server"] == [[2, 3]] and body["state"] == "broken"
    assert body["servers"] == [{"peer_id": "a", "start_block": 0, "end_block": 2, "state": "online",
                                "throughput": 1.0, "cache_tokens_left": 4096, "version": "2.2.0"}]  # fmt: skip
    assert body["servers_truncated"] is True
    assert ModelSwarm.from_json(body) == swarm


def test_an_unread_swarm_is_unknown():
    body = ModelSwarm.unknown("m", 0, 30).to_json()
    assert body["state"] == "unknown" and body["updated_at"] is None and body["servers"] == []


class State(Enum):  # Petals' ServerState
    OFFLINE = 0
    JOINING = 1
    ONLINE = 2


def info(state: State, start=None, end=None, cache=None):
    return SimpleNamespace(state=state, throughput=5.0, start_block=start, end_block=end, cache_tokens_left=cache,
                           version="2.2.0")  # fmt: skip


def test_servers_are_read_from_the_module_infos_of_each_block():
    """Petals' RemoteModuleInfo per block (keys ``prefix.N``): one entry per peer, with its announced
    range (relative to the first block), else the blocks it was found on."""
    a, b = info(State.ONLINE, 10, 12, 300), info(State.JOINING)
    blocks = [
        SimpleNamespace(uid="p.10", servers={"peer-a": a, "peer-b": b}),
        SimpleNamespace(uid="p.11", servers={"peer-a": a, "peer-b": b}),
        SimpleNamespace(uid="p.12", servers={}),
    ]
    entries = {entry.peer_id: entry for entry in server_entries(blocks)}
    assert entries["peer-a"] == ServerEntry("peer-a", 0, 2, "online", 5.0, 300, "2.2.0")
    assert entries["peer-b"] == ServerEntry("peer-b", 0, 2, "joining", 5.0, None, "2.2.0")


def test_the_metrics_show_the_summary():
    swarm = summarise("metrics-model", 3, [server("a", 0, 1), server("b", 0, 1, "offline")], max_servers=5,
                      refresh_seconds=1)  # fmt: skip
    record_swarm(swarm)

    def value(name: str, **labels: str) -> float | None:
        return REGISTRY.get_sample_value(name, {"model": "metrics-model", **labels})

    assert value("petals_chat_swarm_blocks_without_server") == 2
    assert value("petals_chat_swarm_min_redundancy") == 0
    assert value("petals_chat_swarm_servers", state="offline") == 1
    assert value("petals_chat_swarm_block_servers", block="0") == 1
    assert value("petals_chat_swarm_health", state="broken") == 1
    assert value("petals_chat_swarm_health", state="healthy") == 0
