"""The gateway finds its replicas by itself (INFERENCE_DISCOVERY), with real processes on loopback.

A gateway (two workers, the default discovery interval of 5 s) reads a ``file://`` discovery file:
a replica added to the file takes new sessions within 10 s of being ready, and any worker serves its
sessions; a replica taken out of the file gets no new sessions, is forgotten by every worker, and its
session is gone. A model named by a ``MODEL=dns://`` entry with no replica answering gets the "being
started" 503 with Retry-After in each API's shape, counted for an autoscaler; its address, asked
each poll and never answering, counts as no replica's upstream error.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from client.api import Api, ask, connect_ws
from deploy.local_stack import ServiceProcess, pick_free_port, write_discovery_file
from tests.helpers import metric_value, start_gateway, start_inference

COLD = "cold-model"  # a configured model with no replica running
JOIN_DEADLINE_S = 10.0  # the discovery interval (5 s) plus the poll interval, with room


@pytest.fixture(scope="module")
def first(swarm, model_dir, artifacts_dir) -> Iterator[ServiceProcess]:
    service = start_inference(swarm, model_dir, artifacts_dir, "found-0")
    yield service
    service.stop()


@pytest.fixture(scope="module")
def replicas_file(first, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("discovery") / "inference-replicas.txt"
    write_discovery_file(path, {first.name: first.base_url})
    return path


@pytest.fixture(scope="module")
def gateway(replicas_file, artifacts_dir) -> Iterator[ServiceProcess]:
    discovery = f"file://{replicas_file} {COLD}=dns://localhost:{pick_free_port()}"
    service = start_gateway(artifacts_dir, {}, "discovery-gateway", INFERENCE_DISCOVERY=discovery)
    yield service
    service.stop()


def until(check: Callable[[], bool], deadline_s: float, what: str) -> float:
    """Poll ``check`` until true; the seconds it took (fails past ``deadline_s``)."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < deadline_s, f"{what}: not within {deadline_s} s"
        time.sleep(0.2)
    return time.monotonic() - started


def test_a_replica_added_to_the_file_takes_sessions_and_one_taken_out_is_forgotten(
    gateway, first, replicas_file, swarm, model_dir, artifacts_dir
):
    api, since = Api(gateway.base_url), gateway.log_path.stat().st_size  # the log is appended across runs
    kept = api.open_session(32)  # the first replica holds a session: the new one is less loaded
    assert kept.startswith("found-0.")
    second = start_inference(swarm, model_dir, artifacts_dir, "found-1")
    try:
        write_discovery_file(replicas_file, {first.name: first.base_url, second.name: second.base_url})
        opened: list[str] = []

        def lands_on_second() -> bool:
            opened.append(api.open_session(32))
            return opened[-1].startswith("found-1.")

        seconds = until(lands_on_second, JOIN_DEADLINE_S, "a new session on the discovered replica")
        print(f"a discovered replica took a new session {seconds:.1f} s after it was listed")
        known = f"discovered replica found-1 at {second.base_url}"
        until(lambda: _logged(gateway, since, known) == 2, JOIN_DEADLINE_S, "both workers know it")
        for _ in range(4):  # whichever worker takes each request
            assert api.call("POST", "generate", {"session_id": opened[-1], "inputs": "A", "max_new_tokens": 1})["ok"]

        write_discovery_file(replicas_file, {first.name: first.base_url})
        forgotten = f"forgot replica found-1 at {second.base_url}"
        until(lambda: _logged(gateway, since, forgotten) == 2, JOIN_DEADLINE_S, "both workers forget it")
        assert all(api.open_session(32).startswith("found-0.") for _ in range(4))
        gone = api.answer("POST", "generate", {"session_id": opened[-1], "inputs": "A", "max_new_tokens": 1})
        assert not gone["ok"] and "expired or does not exist" in gone["traceback"], gone
        assert api.call("POST", "generate", {"session_id": kept, "inputs": "A", "max_new_tokens": 1})["ok"]
    finally:
        second.stop()


def test_a_model_with_no_replica_running_is_being_started_in_every_api(gateway):
    base, counter = gateway.base_url, f'petals_chat_gateway_requests_without_replica_total{{model="{COLD}"}}'
    scraped = requests.get(f"{base}/metrics", timeout=10).text
    assert counter in scraped  # exported (at 0) from the start, so that an autoscaler sees the first increase
    before = metric_value(scraped, counter)
    v1 = requests.post(f"{base}/api/v1/generate", data={"model": COLD, "inputs": "A", "max_new_tokens": 1}, timeout=10)
    assert v1.status_code == 200 and v1.json()["ok"] is False and "no replica running yet" in v1.json()["traceback"]
    v2 = requests.post(
        f"{base}/api/v2/generate_stream", json={"model": COLD, "inputs": "A", "max_new_tokens": 1}, timeout=10
    )
    assert v2.status_code == 503 and v2.json()["error"]["code"] == "model_starting", v2.text
    chat = requests.post(f"{base}/v1/chat/completions", timeout=10,
                         json={"model": COLD, "messages": [{"role": "user", "content": "Hi"}]})  # fmt: skip
    assert chat.status_code == 503 and chat.json()["error"]["code"] == "model_starting", chat.text
    for answer in (v1, v2, chat):
        assert answer.headers["Retry-After"] == "15" and answer.headers["X-Petals-Chat-Error"] == "model_starting"
    ws = connect_ws(gateway.port)
    try:
        opened = ask(ws, {"type": "open_inference_session", "max_length": 16, "model": COLD})
    finally:
        ws.close()
    assert opened["ok"] is False and "retry in 15 s" in opened["traceback"], opened
    unknown = requests.post(f"{base}/v1/completions", json={"model": "nope", "prompt": "A"}, timeout=10)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    after = requests.get(f"{base}/metrics", timeout=10).text
    assert metric_value(after, counter) == before + 4
    assert 'requests_without_replica_total{model="nope"}' not in after
    # Its dns:// address has been asked each poll and never answered: no replica's upstream error.
    assert 'replica="discovered"' not in after


def _logged(service: ServiceProcess, since: int, text: str) -> int:
    """How many times the service's log holds ``text`` after its first ``since`` bytes."""
    with service.log_path.open("rb") as log:
        log.seek(since)
        return log.read().decode(errors="replace").count(text)
