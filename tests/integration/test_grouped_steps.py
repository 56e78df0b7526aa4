"""The replica's grouped steps (REPLICA_STEP_BATCHING) on a swarm that mixes our servers with stock ones.

Tiny BLOOM's blocks 0:2 are on a batching server (SWARM_BATCHING on: it serves the grouped inference
stream) and 2:4 on a stock one (batching off: Petals' own ``rpc_inference`` only). An inference replica's
sessions, of different lengths and started one after another so that they join and leave while others
decode, cross both: each session's greedy text equals the in-process oracle's, the replica's requests to
the batching server carried several sessions' steps at once, and the stock server's sessions were
Petals' own (the replica says so once for that server).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from client.api import Api
from services.swarm.batching_pool import ENV
from services.swarm.launcher import PrivateSwarm
from tests.helpers import each_in_a_thread, metric_value, start_inference

pytestmark = pytest.mark.integration
DHT_PREFIX = "petals-chat-grouped"
PROMPTS = ["Hello there", "The sea is", "Once upon a time", "A B C", "Grouped steps", "Two servers"]
TOKENS = [24, 10, 18, 30, 14, 20]
START_EVERY_S = 0.05
NO_STREAM = "has no grouped inference stream"


@pytest.fixture(scope="module")
def mixed_swarm(model_dir: Path, artifacts_dir: Path) -> Iterator[PrivateSwarm]:
    """Blocks 0:2 on a batching server, 2:4 on a stock one."""
    with PrivateSwarm(model_dir, ["0:2"], artifacts_dir / "grouped-swarm", dht_prefix=DHT_PREFIX,
                      env={ENV: "true"}) as swarm:  # fmt: skip
        swarm.env[ENV] = "false"  # the next server: stock Petals
        swarm.add_server("2:4")
        yield swarm


@pytest.fixture(scope="module")
def service(mixed_swarm: PrivateSwarm, model_dir: Path, artifacts_dir: Path):
    service = start_inference(mixed_swarm, model_dir, artifacts_dir, "inference-grouped", DHT_PREFIX=DHT_PREFIX)
    yield service
    service.stop()


def test_sessions_joining_and_leaving_through_a_grouped_and_a_stock_server_equal_the_oracle(
    mixed_swarm, service, oracle, decode
):
    api = Api(service.base_url)

    def generate(index: int) -> dict:
        time.sleep(index * START_EVERY_S)
        return api.generate(inputs=PROMPTS[index], max_new_tokens=TOKENS[index])

    bodies = each_in_a_thread(len(PROMPTS), generate)
    for index, (prompt, tokens) in enumerate(zip(PROMPTS, TOKENS, strict=True)):
        assert bodies[index] == {"ok": True, "outputs": decode(oracle(prompt, tokens))}, prompt
    metrics = requests.get(f"{service.base_url}/metrics", timeout=10).text
    requests_sent = metric_value(metrics, "petals_chat_inference_step_batch_sessions_count")
    alone = metric_value(metrics, 'petals_chat_inference_step_batch_sessions_bucket{le="1.0"}')
    assert requests_sent > alone > 0  # some requests to the batching server carried several sessions' steps
    grouped_peer, stock_peer = (server.multiaddr.rsplit("/p2p/", 1)[1] for server in mixed_swarm.servers)
    fallbacks = "".join(line for line in service.log_path.read_text(errors="replace").splitlines() if NO_STREAM in line)
    assert stock_peer in fallbacks and grouped_peer not in fallbacks
