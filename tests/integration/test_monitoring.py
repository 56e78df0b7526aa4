"""The shipped dashboard and alert rules use only exported metrics, and a real Prometheus gets data.

The metric names come from the running services' /metrics (never a hand-written list); a real
Prometheus (Debian's package) scrapes the gateway and an inference replica during a short
generation run, and every dashboard panel's query must return data.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml

from client.api import Api
from deploy.local_stack import REPO_ROOT
from tests.helpers import (
    BATCHING_ROW,
    DASHBOARD,
    dashboard_panels_by_row,
    exported_metric_names,
    metric_names,
    panel_queries,
    prometheus_query,
    prometheus_query_or_empty,
    running_prometheus,
)

RULES = REPO_ROOT / "deploy" / "prometheus" / "rules.yml"
RULES_TESTS = REPO_ROOT / "deploy" / "prometheus" / "rules_test.yml"
SWARM_ALERTS = {"PetalsChatSwarmBlocksWithoutServer", "PetalsChatSwarmRedundancyLow", "PetalsChatSwarmCachesNearlyFull"}


def dashboard_panels() -> list[dict]:
    """The services' panels: all but the batching servers' row (test_batching_faults.py covers it)."""
    rows = dashboard_panels_by_row()
    return [panel for title, panels in rows.items() if title != BATCHING_ROW for panel in panels]


def dashboard_queries() -> list[str]:
    return panel_queries(dashboard_panels())


def rule_queries() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def generate_traffic(api: Api, rounds: int = 3) -> None:
    """Sessions opened, used, closed; one-off requests; an error: every metric gets samples."""
    for index in range(rounds):
        session_id = api.open_session(64)
        assert api.generate(inputs=f"Traffic {index}", max_new_tokens=3, session_id=session_id)["ok"]
        assert api.close_session(session_id) == {"ok": True}
        assert api.generate(inputs="Hello", max_new_tokens=2)["ok"]
        assert api.generate(inputs="Hi", max_new_tokens=1, session_id="inference-0.gone")["ok"] is False


def test_every_metric_used_is_exported(gateway, inference):
    generate_traffic(Api(gateway.base_url), rounds=1)
    exported = exported_metric_names(gateway.base_url, inference.base_url)
    used = {name for query in dashboard_queries() + rule_queries() for name in metric_names(query)}
    assert used, "the dashboard and the rules use no metric?"
    assert used <= exported, f"used but not exported: {sorted(used - exported)}"


def test_promtool_accepts_the_rules():
    result = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_of_the_rules_pass():
    result = subprocess.run(["promtool", "test", "rules", str(RULES_TESTS)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_is_well_formed():
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"] == "petals-chat"
    assert [panel["title"] for panel in dashboard["panels"] if panel["type"] == "row"] == ["Swarm", BATCHING_ROW]
    for panel in (panel for panels in dashboard_panels_by_row().values() for panel in panels):
        assert panel["targets"] and all(t["expr"] and t["refId"] for t in panel["targets"]), panel["title"]


@pytest.fixture
def prometheus(gateway, inference, tmp_path: Path):
    """A real Prometheus scraping the gateway and the inference replica every second."""
    with running_prometheus({"gateway": gateway.base_url, "inference": inference.base_url}, RULES, tmp_path) as url:
        yield url


def test_a_real_prometheus_gets_data_for_every_panel(prometheus, gateway):
    deadline = time.monotonic() + 60
    while len(prometheus_query_or_empty(prometheus, "up == 1")) < 2:
        assert time.monotonic() < deadline, "Prometheus never scraped both targets"
        time.sleep(0.5)
    api = Api(gateway.base_url)
    for _ in range(4):  # traffic across several scrapes, so that rate() has points
        generate_traffic(api, rounds=1)
        time.sleep(1.5)
    time.sleep(2)
    ranged = [expr.replace("$__rate_interval", "30s") for expr in dashboard_queries()]
    empty = [expr for expr in ranged if not prometheus_query(prometheus, expr)]
    assert empty == [], f"panel queries without data: {empty}"
    rules = requests.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"][0]["rules"]
    assert {rule["name"] for rule in rules} == {"PetalsChatTokenLatencyHigh", "PetalsChatErrorRateHigh",
                                                "PetalsChatNoReadyReplica", *SWARM_ALERTS}  # fmt: skip
    assert all(rule["health"] == "ok" for rule in rules), rules
