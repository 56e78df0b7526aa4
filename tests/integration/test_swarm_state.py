"""The swarm in view, against the real test swarm: ``GET /api/v2/swarm`` and the replica's swarm metrics
show which servers hold which blocks (the replicas of the tests read the DHT every second,
``SWARM_STATE_REFRESH_SECONDS=1`` in tests/helpers.py); and the acceptance test: one server stops,
and the endpoint, the metrics, a real Prometheus's alert and the status page in Chromium show its
blocks uncovered; it starts again, and they all clear."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml

from client.probes import wait_until
from services.common.api.swarm_state import ModelSwarm
from tests.helpers import collect_page_errors, metric_value, running_prometheus, start_gateway, wait_for
from tests.integration.test_monitoring import RULES, SWARM_ALERTS


def read_once(inference) -> None:
    """Wait for the replica's first read of the swarm (it reads every second once its model is loaded)."""
    metrics = lambda: requests.get(f"{inference.base_url}/metrics", timeout=10).text  # noqa: E731
    assert wait_until(lambda: "petals_chat_swarm_blocks{" in metrics(), 30), "the replica never read the swarm"


def test_the_endpoint_shows_every_server_and_block(gateway, inference, model_dir):
    read_once(inference)
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
    read_once(inference)
    text = requests.get(f"{inference.base_url}/metrics", timeout=10).text
    model = f'model="{model_dir.name}"'
    assert metric_value(text, f"petals_chat_swarm_blocks{{{model}}}") == 4
    assert metric_value(text, f"petals_chat_swarm_blocks_without_server{{{model}}}") == 0
    assert metric_value(text, f'petals_chat_swarm_servers{{{model},state="online"}}') == 2
    assert metric_value(text, f'petals_chat_swarm_health{{{model},state="healthy"}}') == 1


# ---- acceptance: a server stops, and everything shows it; it comes back, and it clears -------------

KEY = "swarm-ops-key-5c1e9a7d3f20b846"
AUTH = {"Authorization": f"Bearer {KEY}"}
ALERT = "PetalsChatSwarmBlocksWithoutServer"
STOPPED = 1  # the test swarm's second server (blocks 2:4); the first one bootstraps the DHT
FIRES_WITHIN_S = 90  # a generous bound for polls; the figures measured are printed


@pytest.fixture(scope="module")
def site(inference, ui, artifacts_dir) -> Iterator[str]:
    """A gateway with API keys in front of the shared replica, forwarding the pages to the ui."""
    gateway = start_gateway(artifacts_dir, {"inference-0": inference.base_url}, "gateway-swarm",
                            API_KEYS=f"ops:{KEY}", UI_URL=ui.base_url)  # fmt: skip
    yield gateway.base_url
    gateway.stop()


def rules_firing_at_once(work_dir: Path) -> Path:
    """The shipped rules, the swarm alerts' ``for`` cut to nothing (the test's scale, not an operator's)."""
    rules = yaml.safe_load(RULES.read_text())
    for rule in rules["groups"][0]["rules"]:
        if rule["alert"] in SWARM_ALERTS:
            rule["for"] = "0s"
    path = work_dir / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    return path


def firing(prometheus: str, model: str) -> bool:
    try:
        alerts = requests.get(f"{prometheus}/api/v1/alerts", timeout=5).json()["data"]["alerts"]
    except requests.RequestException:
        return False  # not listening yet
    return any(a["labels"]["alertname"] == ALERT and a["labels"]["model"] == model and a["state"] == "firing"
               for a in alerts)  # fmt: skip


def scraped_blocks_without_server(prometheus: str, model: str) -> float | None:
    try:
        query = f'petals_chat_swarm_blocks_without_server{{model="{model}"}}'
        body = requests.get(f"{prometheus}/api/v1/query", params={"query": query}, timeout=5).json()
    except requests.RequestException:
        return None
    result = body["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def swarm_state(site: str, model: str) -> ModelSwarm:
    response = requests.get(f"{site}/api/v2/swarm", params={"model": model}, headers=AUTH, timeout=10)
    assert response.status_code == 200, response.text
    return ModelSwarm.from_json(response.json())


def on_page(state: str, uncovered: int = 0) -> str:
    """A page expression: the model in ``state`` on the page, with ``uncovered`` blocks without a server."""
    model = f".model[data-state='{state}']"
    blocks = f"document.querySelectorAll(`{model} .block[data-servers='0']`).length"
    return f"!!document.querySelector(`{model}`) && {blocks} == {uncovered}"


def seconds_until(condition, what: str, since: float) -> float:
    """Seconds from ``since`` (a ``time.monotonic()``) until ``condition()`` holds (polled)."""
    assert wait_until(condition, FIRES_WITHIN_S), what
    return time.monotonic() - since


def test_a_stopped_server_shows_everywhere_and_clears_when_back(swarm, inference, site, model_dir, browser,
                                                                 artifacts_dir, tmp_path):  # fmt: skip
    """Stop one server of the swarm: the endpoint and the replica's metrics show its blocks uncovered,
    a real Prometheus fires the alert, the status page (keys on) shows it; start it again: all clear."""
    model = model_dir.name
    targets = {"inference": inference.base_url}
    with running_prometheus(targets, rules_firing_at_once(tmp_path), tmp_path) as prometheus:
        assert wait_until(lambda: scraped_blocks_without_server(prometheus, model) == 0, 60), "never scraped"
        context = browser.new_context(viewport={"width": 1000, "height": 700})
        page = context.new_page()
        problems = collect_page_errors(page, [])
        page.goto(f"{site}/swarm")
        page.wait_for_selector("#key-form:not([hidden])")  # keys are on: the page asks once
        page.fill("#api-key", KEY)
        page.press("#api-key", "Enter")
        wait_for(page, on_page("healthy"))
        server = swarm.servers[STOPPED]
        try:
            stopped = time.monotonic()
            server.stop(30)  # SIGTERM: Petals announces the server offline, and exits
            uncovered = ((2, 4),)
            shown = seconds_until(
                lambda: swarm_state(site, model).blocks_without_server == uncovered, "endpoint", stopped
            )
            state = swarm_state(site, model)
            assert state.state == "broken" and not state.full_route and state.coverage == (1, 1, 0, 0)
            assert state.servers_by_state["offline"] == 1
            metrics = requests.get(f"{inference.base_url}/metrics", timeout=10).text
            assert metric_value(metrics, f'petals_chat_swarm_blocks_without_server{{model="{model}"}}') == 2
            fired = seconds_until(lambda: firing(prometheus, model), "the alert never fired", stopped)
            wait_for(page, on_page("broken", uncovered=2))
            assert "Blocks without a server: 2–3" in page.inner_text(".model .gaps")
            page.screenshot(path=str(artifacts_dir / "swarm-page-broken.png"))
            print(f"\nserver stopped: shown by the endpoint {shown:.1f} s after SIGTERM, alert at {fired:.1f} s")
        finally:
            restarted = time.monotonic()
            if server.process.poll() is not None:
                swarm.restart(STOPPED)
        healthy = lambda: swarm_state(site, model).state == "healthy"  # noqa: E731
        cleared = seconds_until(healthy, "the endpoint never cleared", restarted)
        assert swarm_state(site, model).coverage == (1, 1, 1, 1)
        resolved = seconds_until(lambda: not firing(prometheus, model), "the alert never resolved", restarted)
        wait_for(page, on_page("healthy"))
        assert page.inner_text(".model .gaps") == ""
        context.close()
        print(f"server started again: endpoint healthy {cleared:.1f} s after, alert resolved at {resolved:.1f} s")
    assert problems == ["Failed to load resource: the server responded with a status of 401 (Unauthorized)"]
    inference.wait_ready(timeout=120)  # the shared replica routes again, for the tests after this one
