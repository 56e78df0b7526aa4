"""The servers' own refusals in the API's error shapes (services/common/web/protocol_errors.py)."""

from __future__ import annotations

import importlib
import inspect
import json
import re

import pytest

from services.common.web.protocol_errors import envelope_of, error_response, status_code

ROUTE = re.compile(r'add_route\("([^"]+)", (\w+)\(')


@pytest.mark.parametrize("module", ["services.gateway.app", "services.inference.app", "services.ui.app"])
def test_the_path_rule_agrees_with_every_route(module):
    """A route's error_envelope is the one its path gives the refusals (one rule for both)."""
    app = importlib.import_module(module)
    routes = ROUTE.findall(inspect.getsource(app))
    assert routes
    for path, name in routes:
        assert envelope_of(path) == getattr(getattr(app, name), "error_envelope", ""), (path, name)


def parse(data: bytes) -> tuple[str, dict[str, str], dict]:
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    assert int(headers["content-length"]) == len(body)
    return status, headers, json.loads(body)


def test_each_envelope():
    status, headers, body = parse(error_response(431, "Too many header fields", "/api/v1/generate"))
    assert status == "HTTP/1.1 200 OK" and headers["x-petals-chat-status"] == "431"
    assert body == {"ok": False, "traceback": "Too many header fields"}
    status, headers, body = parse(error_response(414, "Too long", "/v1/chat/completions"))
    assert status == "HTTP/1.1 414 URI Too Long" and headers["content-type"] == "application/json"
    assert body["error"] == {"message": "Too long", "type": "invalid_request_error", "param": None,
                             "code": "uri_too_long"}  # fmt: skip
    status, headers, body = parse(error_response(400, "Bad request line", None))
    assert status == "HTTP/1.1 400 Bad Request" and headers["connection"] == "close"
    assert body == {"ok": False, "error": {"code": "bad_request", "message": "Bad request line"}}


def test_a_long_message_is_cut():
    *_, body = parse(error_response(400, "x" * 5000, None))
    assert len(body["error"]["message"]) == 300


def test_codes_are_the_reason_phrases():
    assert [status_code(s) for s in (400, 414, 431)] == [
        "bad_request",
        "uri_too_long",
        "request_header_fields_too_large",
    ]
