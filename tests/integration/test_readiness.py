"""/readyz follows the model and the swarm: not ready until a route through the swarm exists."""

from __future__ import annotations

import time

import requests

from client.api import Api
from deploy.local_stack import http_status, inference_process, pick_free_port
from services.swarm.launcher import PrivateSwarm

PREFIX = "petals-chat-readiness"


def test_not_ready_until_the_swarm_is_reachable(model_dir, artifacts_dir):
    """Start the service before its swarm: it answers 503 with a reason, then serves once the swarm is up."""
    work_dir = artifacts_dir / "readiness-swarm"
    swarm = PrivateSwarm(model_dir, ["0:4"], work_dir, dht_prefix=PREFIX, ports=[pick_free_port()])
    swarm.start()  # once, to learn its multiaddr (identity and port are reused below)
    peers = swarm.initial_peers
    swarm.stop()
    service = inference_process(
        model_dir=model_dir,
        initial_peers=peers,
        dht_prefix=PREFIX,
        port=pick_free_port(),
        log_path=artifacts_dir / "logs" / "inference-readiness.log",
        extra_env={"READINESS_INTERVAL_SECONDS": "1"},
    ).start()
    try:
        service.wait_ready(timeout=60, path="/healthz")  # alive at once
        api = Api(service.base_url)
        for _ in range(10):
            readiness = requests.get(f"{service.base_url}/readyz", timeout=5)
            assert readiness.status_code == 503
            assert readiness.json()["ok"] is False and readiness.json()["detail"]
            time.sleep(0.5)
        body = api.generate(inputs="Hi", max_new_tokens=1)
        assert body["ok"] is False and "Temporarily unavailable" in body["traceback"]
        swarm.start()  # the same server comes back at the same address
        service.wait_ready(timeout=120)
        assert http_status(f"{service.base_url}/readyz") == 200
        assert api.generate(inputs="Hi", max_new_tokens=2)["ok"]
    finally:
        service.stop()
        swarm.stop()
