"""Load through the gateway: many concurrent sessions over two replicas, and a burst of sessions
beyond a replica's limit. Every output is checked against the in-process oracle.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from bench.load_test import Expected, prompts, run_load
from client.api import Api
from deploy.local_stack import ServiceProcess
from tests.helpers import Stack, dedicated_stack, start_gateway, start_inference


@pytest.fixture(scope="module")
def expected(oracle, decode_partial, tokenizer) -> Expected:
    """The text a greedy session generating one token per request must produce (a request after
    an end-of-sequence token goes on from it), a character still incomplete held back."""

    def text(prompt: str, tokens: int) -> str:
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        new: list[int] = []
        while len(new) < tokens:  # the oracle stops at end-of-sequence: go on after it
            new += oracle(ids + new, tokens - len(new))
        return decode_partial(new)

    return text


@pytest.fixture(scope="module")
def two_replicas(swarm, model_dir, artifacts_dir, inference: ServiceProcess) -> Iterator[ServiceProcess]:
    """A gateway in front of the shared replica and a second one."""
    second = start_inference(swarm, model_dir, artifacts_dir, "inference-load")
    try:
        gateway = start_gateway(
            artifacts_dir, {"inference-0": inference.base_url, "inference-load": second.base_url}, "gateway-load"
        )
        yield gateway
        gateway.stop()
    finally:
        second.stop()


def test_32_concurrent_sessions_over_two_replicas(two_replicas, expected):
    report = run_load(two_replicas.base_url, sessions=32, tokens=32, max_length=64, timeout_s=240, expected=expected)
    print(f"\n{report.summary()}")
    assert report.errors == []
    assert report.mismatches == []
    assert all(run.tokens == 32 for run in report.runs)
    assert set(report.replicas()) == {"inference-0", "inference-load"}  # both replicas took sessions


MAX_SESSIONS = 4


@pytest.fixture(scope="module")
def small_replica(swarm, model_dir, artifacts_dir) -> Iterator[Stack]:
    env = {"MAX_SESSIONS": str(MAX_SESSIONS)}
    with dedicated_stack(swarm, model_dir, artifacts_dir, "burst", inference_env=env) as stack:
        yield stack


def open_session(base_url: str) -> dict:
    return Api(base_url).answer("GET", "open_inference_session", {"max_length": 32})


def test_burst_beyond_the_session_limit(small_replica, expected):
    base = small_replica.gateway.base_url
    with ThreadPoolExecutor(12) as pool:
        first = list(pool.map(lambda _: open_session(base), range(12)))
        admitted = [answer["session_id"] for answer in first if answer["ok"]]
        assert len(admitted) == MAX_SESSIONS
        second = list(pool.map(lambda _: open_session(base), range(12)))
    for answer in [a for a in first if not a["ok"]] + second:
        assert answer["ok"] is False
        assert f"maximum of {MAX_SESSIONS} sessions" in answer["traceback"], answer
    with ThreadPoolExecutor(MAX_SESSIONS) as pool:
        texts = list(pool.map(lambda pair: generate_in(base, *pair), zip(admitted, prompts(MAX_SESSIONS), strict=True)))
    assert texts == [expected(prompt, 8) for prompt in prompts(MAX_SESSIONS)]
    for session_id in admitted:
        Api(base, 30).call("GET", "close_inference_session", {"session_id": session_id})
    reopened = open_session(base)  # room again
    assert reopened["ok"], reopened
    Api(base, 30).call("GET", "close_inference_session", {"session_id": reopened["session_id"]})


def generate_in(base_url: str, session_id: str, prompt: str) -> str:
    """Eight greedy tokens in the session, one request per token."""
    client, text = Api(base_url, 60), ""
    for index in range(8):
        fields = {"max_new_tokens": 1, "do_sample": 0, "session_id": session_id}
        text += client.call("POST", "generate", {**fields, **({"inputs": prompt} if index == 0 else {})})["outputs"]
    client.close()
    return text
