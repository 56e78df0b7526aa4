"""No leaks over 1,000 session cycles: open, generate, close through a gateway.

Measured on the gateway (master and workers) and the inference service (master, worker and its
p2p daemon), from /proc, after a warm-up and again after the cycles: open file descriptors come
back to where they were, resident memory grows by a bounded amount, and the Petals servers hold
no leftover session (their whole attention cache is free again, as they say themselves).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from client.api import Api, session_cycles
from client.probes import wait_until
from tests.helpers import DHT_PREFIX, Resources, Stack, SwarmProbe, dedicated_stack, metric_value

CYCLES, WARM_UP, THREADS = 1000, 50, 8  # 8 clients: ~20 % more cycles/s than 4 on 2 cores
FD_TOLERANCE = 5
# Resident memory growth allowed over the 1,000 cycles, per process. Measured on this project's
# 2-core machine: gateway master and workers +0.5 MiB at most; inference worker +2.3 to +3.9 MiB
# with 4 clients, +6.7 MiB with 8 (a creep of about 1.2 KiB per cycle that goes on: +0.6 MiB
# per 500 cycles over 2,500; allocator arenas or a small leak in the Petals client, not found
# yet); the other Python processes flat. So 16 MiB for a Python process: a leak of 16 KiB per
# session fails it. The p2p daemon (Go) grows by about 20 MiB over its first 500 cycles, then
# by 0.2 MiB over the next 2,000: its heap warming up, not a leak; it is allowed 30 MiB.
RSS_GROWTH_LIMIT = {"p2pd": 30 * 2**20}
PYTHON_RSS_GROWTH_LIMIT = 16 * 2**20


@pytest.fixture(scope="module")
def leak_stack(swarm, model_dir, artifacts_dir) -> Iterator[Stack]:
    with dedicated_stack(swarm, model_dir, artifacts_dir, "leaks") as stack:
        yield stack


@pytest.fixture(scope="module")
def probe(swarm, model_dir: Path, artifacts_dir: Path) -> Iterator[SwarmProbe]:
    blocks = json.loads((model_dir / "config.json").read_text())["n_layer"]
    running = SwarmProbe(swarm.initial_peers, DHT_PREFIX, blocks, artifacts_dir / "logs" / "swarm-probe.log")
    yield running
    running.close()


def all_free(probe: SwarmProbe, baseline: dict[str, int]) -> bool:
    """Every server has at least as much cache free as in ``baseline`` (a session left open
    earlier by another test may expire meanwhile and free more)."""
    free = probe.free()
    return free.keys() == baseline.keys() and all(free[peer] >= tokens for peer, tokens in baseline.items())


def test_the_probe_sees_an_open_session(leak_stack: Stack, probe: SwarmProbe) -> None:
    """The cache figure is live: a session that has run a step holds cache on every server."""
    client = Api(leak_stack.gateway.base_url, timeout_s=60)
    baseline = probe.free()
    session_id = client.call("GET", "open_inference_session", {"max_length": 64})["session_id"]
    client.call("POST", "generate", {"inputs": "Hello", "max_new_tokens": 1, "session_id": session_id})
    held = probe.free()
    client.call("GET", "close_inference_session", {"session_id": session_id})
    client.close()
    assert all(held[peer] < baseline[peer] for peer in baseline), (held, baseline)
    assert wait_until(lambda: all_free(probe, baseline), timeout=10)


def test_a_thousand_session_cycles_leak_nothing(leak_stack: Stack, probe: SwarmProbe) -> None:
    gateway, (inference,) = leak_stack.gateway, leak_stack.replicas
    session_cycles(gateway.base_url, 0, WARM_UP, THREADS, max_length=16)
    time.sleep(2)  # let closed connections and sessions settle
    free_cache = probe.free()
    before = {"gateway": Resources.of(gateway), "inference": Resources.of(inference)}

    started = time.monotonic()
    session_cycles(gateway.base_url, WARM_UP, CYCLES, THREADS, max_length=16)
    elapsed = time.monotonic() - started
    time.sleep(2)
    after = {name: Resources.of(service) for name, service in (("gateway", gateway), ("inference", inference))}
    print(f"\n{CYCLES} cycles in {elapsed:.1f} s ({CYCLES / elapsed:.1f}/s, {THREADS} threads)")
    for name in before:
        print(f"{name}: {before[name].describe(after[name])}")

    for name, first in before.items():
        last, report = after[name], f"{name}: {first.describe(after[name])}"
        assert set(last.fds) == set(first.fds), f"a process died or was replaced: {report}"
        for pid in first.fds:
            assert last.fds[pid] <= first.fds[pid] + FD_TOLERANCE, report
            limit = RSS_GROWTH_LIMIT.get(first.names[pid], PYTHON_RSS_GROWTH_LIMIT)
            assert last.rss[pid] - first.rss[pid] < limit, report
    assert requests.get(f"{inference.base_url}/readyz", timeout=10).json()["active_sessions"] == 0
    metrics = requests.get(f"{inference.base_url}/metrics", timeout=10).text
    assert metric_value(metrics, "petals_chat_active_sessions") == 0
    # The servers' caches are as free as before (allow a moment for the last closes to land).
    assert wait_until(lambda: all_free(probe, free_cache), timeout=10), (probe.free(), free_cache)
