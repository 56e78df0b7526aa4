"""The gateway-to-replica request: one serializer, one parser, nothing lost in between."""

from __future__ import annotations

import json

import pytest

from services.common.api.params import GenerateParams, Limits
from services.common.api.replica_request import ReplicaRequest
from services.common.web.errors import InvalidParameter

LIMITS = Limits()


def params(**overrides) -> GenerateParams:
    base = {"inputs": "Hi", "do_sample": True, "temperature": 0.7, "top_k": None, "top_p": 0.9, "max_length": None,
            "max_new_tokens": 8, "session_id": None, "stop": ("\n\n",), "seed": 3, "model": "tiny-bloom"}  # fmt: skip
    return GenerateParams(**{**base, **overrides})


@pytest.mark.parametrize(
    "request_",
    [
        ReplicaRequest(params()),
        ReplicaRequest(params(max_new_tokens=None), conversation=True, fill_context=True),
        ReplicaRequest(params(max_new_tokens=None, max_length=64, session_id="inference-0.abc", model=None)),
        ReplicaRequest(params(repetition_penalty=1.3)),
        ReplicaRequest(params(session_id="inference-0.abc"), stop_token="</s>", replace_last_token="\n"),
        ReplicaRequest(params(), conversation=True, client="key:alice"),
        ReplicaRequest(params(), conversation=True, client="ip:::1"),
    ],
)
def test_json_round_trip(request_):
    assert ReplicaRequest.from_json(json.loads(json.dumps(request_.to_json())), LIMITS) == request_


def test_a_plain_v1_call_is_a_replica_request():
    parsed = ReplicaRequest.from_json({"inputs": "Hi", "max_new_tokens": "2", "do_sample": "1"}, LIMITS)
    assert (parsed.params.max_new_tokens, parsed.params.do_sample, parsed.model) == (2, True, None)
    assert not parsed.conversation and not parsed.fill_context


def test_fill_context_excludes_the_lengths():
    with pytest.raises(InvalidParameter, match="fill_context excludes"):
        ReplicaRequest.from_json({"inputs": "Hi", "max_new_tokens": 2, "fill_context": True}, LIMITS)
    with pytest.raises(InvalidParameter, match="exactly one of max_length or max_new_tokens"):
        ReplicaRequest.from_json({"inputs": "Hi"}, LIMITS)


def test_repetition_penalty_is_validated():
    parsed = ReplicaRequest.from_json({"inputs": "Hi", "max_new_tokens": 2, "repetition_penalty": "1.2"}, LIMITS)
    assert parsed.params.repetition_penalty == 1.2
    for bad in (0, -1, 10.5, "x", float("nan")):
        with pytest.raises(InvalidParameter, match="repetition_penalty"):
            ReplicaRequest.from_json({"inputs": "Hi", "max_new_tokens": 2, "repetition_penalty": bad}, LIMITS)


def test_replacing_the_last_token_needs_a_session():
    with pytest.raises(InvalidParameter, match="replace_last_token needs a session_id"):
        ReplicaRequest.from_json({"inputs": "Hi", "max_new_tokens": 2, "replace_last_token": "x"}, LIMITS)


@pytest.mark.parametrize("client", ["alice", "key:", "ip:1.2.3.4 x", "key:" + "a" * 65, 7])
def test_a_client_is_key_or_ip(client):
    with pytest.raises(InvalidParameter, match="client must be key:<id> or ip:<address>"):
        ReplicaRequest.from_json({"inputs": "Hi", "max_new_tokens": 1, "client": client}, LIMITS)
