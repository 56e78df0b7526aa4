"""A batching server (SWARM_BATCHING) killed mid-batch, and the dashboard's batching row on real servers.

The swarm starts with one batching server holding every tiny BLOOM block (A), each server serving its
batching metrics (SWARM_METRICS_PORT). Four sessions of an inference service start there, a spare server
with the same blocks (B) joins, then the four stream at once: once A's metrics show a pass of more than one
session, A is SIGKILLed, every stream under way. Each session goes on on B: Petals' client reroutes it itself
(replaying its history) when A's death reaches it as a broken connection, and the service rebuilds it as for a
server dying under one session (test_swarm_faults.py) when the step fails otherwise; which one is the kill's
timing. Every stream ends done, its text equal to the in-process oracle, and the sessions go on batching on B.
Then a real Prometheus scrapes the live servers while sessions decode together: every query of the dashboard's
batching row returns data, from metrics the servers export.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from client.api import Api
from client.probes import wait_until
from deploy.local_stack import REPO_ROOT
from services.swarm.batching_pool import ENV
from services.swarm.launcher import PrivateSwarm, SwarmServer
from tests.helpers import (
    BATCHING_ROW,
    dashboard_panels_by_row,
    each_in_a_thread,
    exported_metric_names,
    metric_names,
    metric_value,
    panel_queries,
    prometheus_query,
    prometheus_query_or_empty,
    running_prometheus,
    start_inference,
)

pytestmark = pytest.mark.integration
DHT_PREFIX = "petals-chat-batching-faults"
PROMPTS = ["A server dies under", "Four sessions decode", "The batch goes on", "Rebuilt on the spare"]
FIRST_TOKENS = 3  # each session's prefill and first steps, on A alone
MORE_TOKENS = 20  # streamed by the four at once
KILL_AFTER = 3  # A dies once it has batched and one stream has this many tokens


@pytest.fixture(scope="module")
def batching_swarm(model_dir: Path, artifacts_dir: Path) -> Iterator[PrivateSwarm]:
    with PrivateSwarm(model_dir, ["0:4"], artifacts_dir / "batching-fault-swarm", dht_prefix=DHT_PREFIX,
                      env={ENV: "true"}, metrics=True) as swarm:  # fmt: skip
        yield swarm


@pytest.fixture(scope="module")
def service(batching_swarm, model_dir, artifacts_dir):
    service = start_inference(
        batching_swarm,
        model_dir,
        artifacts_dir,
        "inference-batching-faults",
        DHT_PREFIX=DHT_PREFIX,
        SWARM_UPDATE_PERIOD_SECONDS="1",
        SWARM_MAX_RETRIES="3",
        SWARM_REQUEST_TIMEOUT_SECONDS="10",  # a step in flight to the killed server waits this long (default 60)
    )
    yield service
    service.stop()


def batched(server: SwarmServer) -> bool:
    """Whether the server (this process of it) has run a pass of more than one session, by its own metrics."""
    text = requests.get(f"{server.metrics_base_url}/metrics", timeout=10).text
    passes = metric_value(text, "petals_chat_swarm_pass_sessions_count")
    return passes > metric_value(text, 'petals_chat_swarm_pass_sessions_bucket{le="1.0"}')


def stream_all(api: Api, session_ids: list[str], tokens: int, on_token: Callable[[int, int], None]) -> list[dict]:
    """Each session streams ``tokens`` more in its own thread; ``on_token(session index, its tokens so far)``."""

    def stream(index: int) -> dict:
        body = {"session_id": session_ids[index], "max_new_tokens": tokens}
        return api.stream_text(body, lambda count: on_token(index, count))

    results = each_in_a_thread(len(session_ids), stream)
    for index, result in enumerate(results):
        assert isinstance(result, dict), f"session {index}: {result!r}"
    return results  # type: ignore[return-value]


def test_sessions_of_a_batch_whose_server_dies_are_rebuilt_and_equal_the_oracle(batching_swarm, service, oracle,
                                                                                decode):  # fmt: skip
    api = Api(service.base_url, timeout_s=180)
    session_ids = [api.open_session(128) for _ in PROMPTS]
    firsts = [api.generate(inputs=prompt, max_new_tokens=FIRST_TOKENS, session_id=session_id)["outputs"]
              for prompt, session_id in zip(PROMPTS, session_ids, strict=True)]  # fmt: skip
    server_a = batching_swarm.servers[0]
    server_b = batching_swarm.add_server("0:4")  # the spare, with the same blocks
    time.sleep(3)  # the client refreshes its view of the swarm every second
    rebuilds = metric_value(api.metrics(), "petals_chat_session_rebuilds_total")
    counts = [0] * len(PROMPTS)
    at_kill: list[int] = []
    lock = threading.Lock()

    def kill_a_mid_batch(index: int, count: int) -> None:
        with lock:
            counts[index] = count
            if not at_kill and max(counts) >= KILL_AFTER and batched(server_a):
                at_kill.extend(counts)
                server_a.kill()

    dones = stream_all(api, session_ids, MORE_TOKENS, kill_a_mid_batch)
    assert at_kill, "A was never killed: its steps never batched while the sessions were streaming"
    assert max(at_kill) < MORE_TOKENS, f"a session had ended before A died: {at_kill}"
    for prompt, first, done in zip(PROMPTS, firsts, dones, strict=True):
        assert done["event"] == "done", (prompt, done)
        assert first + done["outputs"] == decode(oracle(prompt, FIRST_TOKENS + MORE_TOKENS)), prompt
    rebuilt = metric_value(api.metrics(), "petals_chat_session_rebuilds_total") - rebuilds
    print(f"A killed at {at_kill} tokens: {rebuilt:.0f} rebuilt by the service, the others rerouted by Petals")
    assert batched(server_b), "the sessions never batched on the spare"
    for session_id in session_ids:
        api.close_session(session_id)


def test_the_dashboard_batching_row_gets_data_from_the_servers(batching_swarm, service, tmp_path: Path):
    queries = panel_queries(dashboard_panels_by_row()[BATCHING_ROW])
    live = {f"server-{i}": s.metrics_base_url for i, s in enumerate(batching_swarm.servers) if s.process.poll() is None}
    used = {name for query in queries for name in metric_names(query)}
    assert used and used <= exported_metric_names(*live.values()), used - exported_metric_names(*live.values())
    with running_prometheus(live, REPO_ROOT / "deploy" / "prometheus" / "rules.yml", tmp_path) as prometheus:
        assert wait_until(lambda: len(prometheus_query_or_empty(prometheus, "up == 1")) == len(live), 60)
        api = Api(service.base_url, timeout_s=180)
        session_ids = [api.open_session(64) for _ in PROMPTS]
        for prompt, session_id in zip(PROMPTS, session_ids, strict=True):
            api.generate(inputs=prompt, max_new_tokens=1, session_id=session_id)
        stream_all(api, session_ids, 8, lambda index, count: None)  # steps batched, across a few scrapes
        ranged = [query.replace("$__rate_interval", "30s") for query in queries]
        assert wait_until(lambda: all(prometheus_query(prometheus, query) for query in ranged), 30), "no data"
        for session_id in session_ids:
            api.close_session(session_id)
