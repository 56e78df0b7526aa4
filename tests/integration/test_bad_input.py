"""Bad input gets ``ok: false`` with a clear message: never a 5xx, never a stack trace."""

from __future__ import annotations

import pytest
import requests

OK_BASE = {"inputs": "Hello", "max_new_tokens": "2"}

# (name, how to send it, expected fragment of the message)
GENERATE_CASES = [
    ("no length", {"form": {"inputs": "Hi"}}, "exactly one of max_length or max_new_tokens"),
    ("both lengths", {"form": {**OK_BASE, "max_length": "10"}}, "exactly one of max_length or max_new_tokens"),
    ("no inputs, no session", {"form": {"max_new_tokens": "2"}}, "inputs is required"),
    (
        "max_new_tokens not a number",
        {"form": {**OK_BASE, "max_new_tokens": "ten"}},
        "max_new_tokens must be an integer",
    ),
    ("max_new_tokens float", {"form": {**OK_BASE, "max_new_tokens": "2.5"}}, "max_new_tokens must be an integer"),
    ("max_new_tokens zero", {"form": {**OK_BASE, "max_new_tokens": "0"}}, "max_new_tokens must be between 1 and"),
    ("max_new_tokens huge", {"form": {**OK_BASE, "max_new_tokens": "10" * 40}}, "max_new_tokens must be"),
    ("max_length negative", {"form": {"inputs": "Hi", "max_length": "-5"}}, "max_length must be between 1 and"),
    ("max_length too large", {"form": {"inputs": "Hi", "max_length": "999999"}}, "max_length must be between 1 and"),
    ("max_length below prompt", {"form": {"inputs": "Hello there", "max_length": "1"}}, "leaves no room"),
    (
        "temperature zero",
        {"form": {**OK_BASE, "do_sample": "1", "temperature": "0"}},
        "temperature must be at least 0.01",
    ),
    (
        "temperature nan",
        {"form": {**OK_BASE, "do_sample": "1", "temperature": "nan"}},
        "temperature must be at least 0.01",
    ),
    ("temperature text", {"form": {**OK_BASE, "temperature": "hot"}}, "temperature must be a number"),
    ("top_p above one", {"form": {**OK_BASE, "top_p": "1.5"}}, "top_p must be greater than 0.0 and at most 1.0"),
    ("top_p zero", {"form": {**OK_BASE, "top_p": "0"}}, "top_p must be greater than 0.0"),
    ("top_k zero", {"form": {**OK_BASE, "top_k": "0"}}, "top_k must be between 1 and"),
    ("do_sample word", {"form": {**OK_BASE, "do_sample": "maybe"}}, "do_sample must be 0 or 1"),
    ("inputs too long", {"form": {**OK_BASE, "inputs": "x" * 20_000}}, "inputs is 20000 characters long"),
    ("json list body", {"json": [1, 2, 3]}, "JSON body must be an object"),
    ("json wrong types", {"json": {"inputs": 5, "max_new_tokens": 2}}, "inputs must be a string"),
    ("json bool as int", {"json": {"inputs": "Hi", "max_new_tokens": True}}, "max_new_tokens must be an integer"),
    ("json nested", {"json": {"inputs": "Hi", "max_new_tokens": [2]}}, "max_new_tokens must be an integer"),
    ("invalid json", {"data": b"{not json", "headers": {"Content-Type": "application/json"}}, "not valid JSON"),
    (
        "json nested deeply",
        {"data": b"[" * 2000 + b"]" * 2000, "headers": {"Content-Type": "application/json"}},
        "deeper than 32 levels",
    ),
    (
        "json objects nested deeply",
        {"data": b'{"a":' * 2000 + b"1" + b"}" * 2000, "headers": {"Content-Type": "application/json"}},
        "deeper than 32 levels",
    ),
    (
        "invalid utf-8",
        {"data": b"inputs=\xff\xfe&max_new_tokens=1", "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
        "not valid UTF-8",
    ),
    ("unsupported type", {"data": b"hello", "headers": {"Content-Type": "text/plain"}}, "Unsupported Content-Type"),
    (
        "repeated parameter",
        {"params": [("max_new_tokens", "1"), ("max_new_tokens", "2")], "form": {"inputs": "Hi"}},
        "given more than once",
    ),
    (
        "query and body clash",
        {"params": {"max_new_tokens": "1"}, "form": {**OK_BASE}},
        "both in the query string and in the body",
    ),
    ("bad session id", {"form": {**OK_BASE, "session_id": "../../etc"}}, "session_id must be 1-128 characters"),
    (
        "unknown session",
        {"form": {**OK_BASE, "session_id": "inference-0.nope"}},
        "Session inference-0.nope expired or does not exist",
    ),
    (
        "body over the limit",
        {"data": b"inputs=" + b"a" * 1_100_000, "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
        "limit",
    ),
]


def assert_clean_error(response: requests.Response, fragment: str) -> None:
    assert response.status_code == 200, f"v1 answers errors with HTTP 200, got {response.status_code}: {response.text}"
    body = response.json()
    assert body["ok"] is False
    assert fragment in body["traceback"], body["traceback"]
    assert "Traceback" not in body["traceback"] and 'File "' not in body["traceback"]


@pytest.mark.parametrize(("name", "request_kwargs", "fragment"), GENERATE_CASES, ids=[c[0] for c in GENERATE_CASES])
def test_generate_rejects_bad_input(api, name, request_kwargs, fragment):
    kwargs = dict(request_kwargs)
    if "form" in kwargs:
        kwargs["data"] = kwargs.pop("form")
    response = requests.post(f"{api.base_url}/api/v1/generate", timeout=30, **kwargs)
    assert_clean_error(response, fragment)


SESSION_CASES = [
    ("open without max_length", "open_inference_session", {}, "max_length is required"),
    ("open with text max_length", "open_inference_session", {"max_length": "big"}, "max_length must be an integer"),
    ("open beyond the limit", "open_inference_session", {"max_length": "100000"}, "max_length must be between 1 and"),
    ("close without id", "close_inference_session", {}, "session_id is required"),
    ("close unknown id", "close_inference_session", {"session_id": "x.y"}, "Session x.y expired or does not exist"),
]


@pytest.mark.parametrize(("name", "endpoint", "params", "fragment"), SESSION_CASES, ids=[c[0] for c in SESSION_CASES])
def test_session_endpoints_reject_bad_input(api, name, endpoint, params, fragment):
    response = requests.get(f"{api.base_url}/api/v1/{endpoint}", params=params, timeout=30)
    assert_clean_error(response, fragment)


def test_session_too_small_for_the_request(api):
    session_id = api.open_session(max_length=8)
    body = api.generate(inputs="Hello there", max_new_tokens=20, session_id=session_id)
    assert body["ok"] is False and "Open a session with a larger max_length" in body["traceback"]
    assert api.generate(inputs="Hi", max_new_tokens=1, session_id=session_id)["ok"]  # the session survived
    api.close_session(session_id)


def test_wrong_method_and_unknown_path(api):
    wrong_method = requests.get(f"{api.base_url}/api/v1/generate", timeout=10)
    assert wrong_method.status_code == 200 and wrong_method.json()["ok"] is False
    missing = requests.get(f"{api.base_url}/api/v1/nothing-here", timeout=10)
    assert missing.status_code == 404 and missing.json()["ok"] is False
