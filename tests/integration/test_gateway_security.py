"""The gateway's security edges, against a real gateway on loopback (no swarm needed: a request
that gets past the key check without a replica to serve it answers 503, which these tests tell
apart from a refusal): authorisation by the matched route whatever the path's spelling, throttled
refusals, deeply nested JSON, security headers, the WebSocket key in a subprotocol, redacted logs.
Requests go over raw sockets where an HTTP library would tidy the path up.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator

import pytest
import requests
from playwright.sync_api import Error as PlaywrightError
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from client.probes import wait_until
from deploy.local_stack import ServiceProcess, gateway_process, pick_free_port
from tests.helpers import (
    RECORD_CSP_VIOLATIONS,
    RawResponse,
    collect_page_errors,
    http_head,
    metric_value,
    raw_exchange,
    wait_for,
)

KEY = "sec-test-key-4f9a1c7e2b8d0365"
KEYS = f"alice:{KEY}"
WRONG = "not-the-key-9c2e7b41d0a6f385"
JSON_TYPE = ("Content-Type", "application/json")
NOT_SERVED = (401, 400, 404, 405)  # 401 refused; a path no route matches: 404, or 405 from the ui's (GET only)

# Every API route (method, path, body): v1, v2, the OpenAI-compatible API.
ROUTES = [
    ("POST", "/api/v1/generate", {"inputs": "Hi", "max_new_tokens": 1}),
    ("GET", "/api/v1/open_inference_session?max_length=8", None),
    ("GET", "/api/v1/close_inference_session?session_id=inference-0.abc", None),
    ("POST", "/api/v2/generate_stream", {"inputs": "Hi", "max_new_tokens": 1}),
    ("GET", "/api/v2/generate", None),  # the WebSocket's route, asked over plain HTTP
    ("GET", "/v1/models", None),
    ("GET", "/api/v2/swarm", None),
    ("GET", "/api/v2/swarm?model=m", None),
    ("POST", "/v1/completions", {"model": "m", "prompt": "Hi", "max_tokens": 1}),
    ("POST", "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}),
    ("POST", "/v1/completions", {"model": "m", "prompt": "Hi", "max_tokens": 1, "n": 2, "logprobs": 1, "echo": True}),
    ("POST", "/v1/tokenize", {"prompt": "Hi"}),
    ("POST", "/v1/detokenize", {"tokens": [1, 2]}),
    # structured output and tools: the same routes, with the new parameters
    ("POST", "/api/v2/generate_stream", {"inputs": "Hi", "max_new_tokens": 1, "json_schema": {"type": "object"}}),
    ("POST", "/v1/completions", {"model": "m", "prompt": "Hi", "response_format": {"type": "json_object"}}),
    (
        "POST",
        "/v1/chat/completions",
        {
            "model": "m",
            "messages": [{"role": "user", "content": "Hi"}],
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": "required",
        },
    ),
]


def variants(path: str) -> list[str]:
    """Spellings of ``path`` (its query kept) that a server may route to the same resource."""
    path, sep, query = path.partition("?")
    first, rest = path[1:].split("/", 1)
    head, _, last = path.rpartition("/")
    spellings = [
        "/" + path,  # //api/v1/generate
        "/." + path,  # /./api/v1/generate
        f"/{first}//{rest}",  # /api//v1/generate
        f"/{first}/./{rest}",
        f"/{first}/x/../{rest}",
        f"/{first}/%2e/{rest}",
        path.replace("/", "%2F").replace("%2F", "/", 1),  # /api%2Fv1%2Fgenerate
        f"{head}%2F{last}",
        f"{head}%2f{last}",
        path + "/",
        path + "//",
        path.upper(),
        "/%2F" + path[1:],
    ]
    return [spelling + sep + query for spelling in spellings]


def start(artifacts_dir, name: str, **env: str) -> ServiceProcess:
    """A gateway (one worker) whose one replica is down: nothing is ever served past the key check
    but a 503 or an empty list (of models, of swarms)."""
    env = {"GUNICORN_WORKERS": "1", "REPLICA_POLL_INTERVAL_SECONDS": "0.5", **env}
    (artifacts_dir / "logs" / f"{name}.log").unlink(missing_ok=True)  # its log is read: this run's only
    service = gateway_process(replicas={"inference-0": f"http://127.0.0.1:{pick_free_port()}"},
                              port=pick_free_port(), log_path=artifacts_dir / "logs" / f"{name}.log",
                              name=name, extra_env=env)  # fmt: skip
    return service.start_ready(timeout=60, path="/healthz")


@pytest.fixture(scope="module")
def gateway(artifacts_dir) -> Iterator[ServiceProcess]:
    """Keys on, access log on, no throttle of refusals."""
    service = start(artifacts_dir, "gateway-security", API_KEYS=KEYS, ACCESS_LOG="1", AUTH_FAILURES_PER_MINUTE="0")
    yield service
    service.stop()


def send(service: ServiceProcess, method: str, path: str, body: dict | None, key: str | None = None) -> RawResponse:
    headers = [("Authorization", f"Bearer {key}")] if key else []
    data = json.dumps(body).encode() if body is not None else b""
    if body is not None:
        headers += [JSON_TYPE, ("Content-Length", str(len(data)))]
    return raw_exchange(service.port, http_head(method, path, headers) + data)


def semantic_status(response: RawResponse) -> int:
    """The status an answer means (v1 answers errors with HTTP 200 and names the status in a header)."""
    return int(response.headers.get("x-petals-chat-status", response.status))


def metrics(service: ServiceProcess) -> str:
    return requests.get(f"{service.base_url}/metrics", timeout=10).text


# ---- authorisation by the matched route -------------------------------------------------------


@pytest.mark.parametrize("which", ["gateway", "site"])  # site: other paths go to the ui
@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=[route[1].split("?")[0] for route in ROUTES])
def test_no_spelling_of_an_api_path_is_served_without_a_key(request, which, method, path, body):
    gateway = request.getfixturevalue(which)
    canonical = send(gateway, method, path, body, KEY)
    assert semantic_status(canonical) != 401, canonical.body
    for spelling in variants(path):
        refused = send(gateway, method, spelling, body)
        assert semantic_status(refused) in NOT_SERVED, (spelling, refused.status, refused.body)
        assert semantic_status(send(gateway, method, spelling, body, WRONG)) in NOT_SERVED, spelling
        served = send(gateway, method, spelling, body, KEY)  # with the key: as the canonical path, or refused
        assert semantic_status(served) in (semantic_status(canonical), *NOT_SERVED[1:]), (spelling, served.body)


# The replicas' internal routes: the gateway routes none of them, in any spelling, with a key or not (a
# client must not hand a session over, or close another client's sessions, through it).
INTERNAL = [("POST", "/internal/adopt_session", {"session_id": "inference-0.x", "token_ids": [1]}),
            ("POST", "/internal/close_client_sessions?client=key:alice", None)]  # fmt: skip


@pytest.mark.parametrize("which", ["gateway", "site"])
@pytest.mark.parametrize(("method", "path", "body"), INTERNAL, ids=[route[1].split("?")[0] for route in INTERNAL])
def test_the_replicas_internal_routes_are_never_reached_through_the_gateway(request, which, method, path, body):
    gateway = request.getfixturevalue(which)
    for spelling in [path, *variants(path)]:
        for key in (None, WRONG, KEY):
            answer = send(gateway, method, spelling, body, key)
            assert semantic_status(answer) in NOT_SERVED, (spelling, key, answer.status, answer.body)


def test_refusals_and_served_spellings_are_counted_per_key(gateway):
    refused = 'petals_chat_gateway_client_requests_total{key_id="refused",status="401"}'
    served = 'petals_chat_gateway_client_requests_total{key_id="alice",status="200"}'
    before = metrics(gateway)
    assert send(gateway, "GET", "//v1/models", None).status == 401
    assert send(gateway, "GET", "//v1/models", None, KEY).status == 200
    after = metrics(gateway)
    assert metric_value(after, refused) == metric_value(before, refused) + 1
    assert metric_value(after, served) == metric_value(before, served) + 1


def ws_url(service: ServiceProcess, path: str = "/api/v2/generate") -> str:
    return f"ws://127.0.0.1:{service.port}{path}"


def ws_refused(url: str, **kwargs) -> bool:
    """The handshake is refused, or the connection answers one key error and closes with 1008."""
    try:
        with connect(url, proxy=None, open_timeout=10, **kwargs) as ws:
            message = json.loads(ws.recv(timeout=10))
            assert message["ok"] is False and "key" in message["traceback"], message
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=10)
            return closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    except InvalidStatus as error:
        return error.response.status_code in (400, 403, 404)


@pytest.mark.parametrize("spelling", ["/api/v2/generate", *variants("/api/v2/generate")])
def test_no_spelling_of_the_websocket_path_is_served_without_a_key(gateway, spelling):
    assert ws_refused(ws_url(gateway, spelling))
    assert ws_refused(ws_url(gateway, spelling), additional_headers={"Authorization": f"Bearer {WRONG}"})


@pytest.fixture
def rate_limited(artifacts_dir) -> Iterator[ServiceProcess]:
    service = start(artifacts_dir, "gateway-rate-limited", API_KEYS=KEYS, RATE_LIMIT_PER_MINUTE="1",
                    RATE_LIMIT_BURST="2", AUTH_FAILURES_PER_MINUTE="0")  # fmt: skip
    yield service
    service.stop()


def test_the_rate_limit_counts_every_spelling_of_an_api_path(rate_limited):
    statuses = [
        send(rate_limited, "GET", path, None, KEY).status for path in ("//v1/models", "/v1/models/", "//v1/models")
    ]
    assert statuses == [200, 200, 429]


# ---- refused keys, throttled per address ------------------------------------------------------


@pytest.fixture
def throttled(artifacts_dir) -> Iterator[ServiceProcess]:
    service = start(artifacts_dir, "gateway-throttled", API_KEYS=KEYS, AUTH_FAILURES_PER_MINUTE="3",
                    TRUSTED_PROXIES="127.0.0.1")  # fmt: skip
    yield service
    service.stop()


def test_refused_keys_are_throttled_per_address(throttled):
    def models(address: str, key: str | None) -> requests.Response:
        headers = {"X-Forwarded-For": address, **({"Authorization": f"Bearer {key}"} if key else {})}
        return requests.get(f"{throttled.base_url}/v1/models", headers=headers, timeout=10)

    assert [models("10.0.0.1", key).status_code for key in (WRONG, None, WRONG + "x")] == [401, 401, 401]
    throttled_answer = models("10.0.0.1", KEY)  # even the right key: a guess would be told apart otherwise
    assert throttled_answer.status_code == 429 and 1 <= int(throttled_answer.headers["Retry-After"]) <= 20
    assert throttled_answer.json()["error"]["code"] == "rate_limited"
    v1 = requests.get(f"{throttled.base_url}//api/v1/open_inference_session?max_length=8", timeout=10,
                      headers={"X-Forwarded-For": "10.0.0.1", "X-API-Key": WRONG})  # fmt: skip
    assert v1.status_code == 200 and v1.json()["ok"] is False and v1.headers["X-Petals-Chat-Status"] == "429"
    with pytest.raises(InvalidStatus):  # the WebSocket handshake too
        connect(ws_url(throttled), proxy=None, open_timeout=10, additional_headers={"X-Forwarded-For": "10.0.0.1"})
    assert models("10.0.0.2", KEY).status_code == 200  # another address
    assert models("10.0.0.2", WRONG).status_code == 401
    assert 'key_id="refused",status="429"' in metrics(throttled)


# ---- deeply nested JSON -----------------------------------------------------------------------

DEEP = {"arrays": "[" * 2000 + "]" * 2000, "objects": '{"a":' * 2000 + "1" + "}" * 2000}
JSON_APIS = {  # path -> (HTTP status, the error's message in the API's own shape)
    "/api/v1/generate": (200, lambda body: body["traceback"]),
    "/api/v2/generate_stream": (400, lambda body: body["error"]["message"]),
    "/v1/completions": (400, lambda body: body["error"]["message"]),
    "/v1/chat/completions": (400, lambda body: body["error"]["message"]),
    "/v1/tokenize": (400, lambda body: body["error"]["message"]),
}


@pytest.mark.parametrize("nesting", DEEP)
@pytest.mark.parametrize("path", JSON_APIS)
def test_deeply_nested_json_is_a_clear_400_in_each_apis_shape(gateway, path, nesting):
    data = DEEP[nesting].encode()
    headers = [("Authorization", f"Bearer {KEY}"), JSON_TYPE, ("Content-Length", str(len(data)))]
    response = raw_exchange(gateway.port, http_head("POST", path, headers) + data)
    status, message = JSON_APIS[path]
    assert (response.status, semantic_status(response)) == (status, 400), response.body
    assert "deeper than 32 levels" in message(response.json())
    log = gateway.log_path.read_text()
    assert "Traceback" not in log and "RecursionError" not in log


@pytest.mark.parametrize("nesting", DEEP)
def test_a_deeply_nested_websocket_message_is_answered_and_the_connection_stays(gateway, nesting):
    with connect(ws_url(gateway), proxy=None, open_timeout=10, additional_headers={"X-API-Key": KEY}) as ws:
        for _ in range(2):
            ws.send(DEEP[nesting])
            answer = json.loads(ws.recv(timeout=10))
            assert answer["ok"] is False and "deeper than 32 levels" in answer["traceback"]
    log = gateway.log_path.read_text()
    assert "Traceback" not in log and "RecursionError" not in log


# ---- the WebSocket's key in a subprotocol; keys redacted from the logs ------------------------


def test_a_websocket_key_in_a_subprotocol_is_taken_and_only_petals_chat_is_answered(gateway):
    with connect(ws_url(gateway), proxy=None, open_timeout=10, subprotocols=["petals-chat", f"bearer.{KEY}"]) as ws:
        assert ws.subprotocol == "petals-chat"
        ws.send(json.dumps({"type": "open_inference_session", "max_length": 8}))
        answer = json.loads(ws.recv(timeout=10))
        assert answer["ok"] is False and "key" not in answer["traceback"]  # past the key: no replica here
        assert "replica" in answer["traceback"]
    offered = ["petals-chat", f"bearer.{WRONG}"]
    with connect(ws_url(gateway), proxy=None, open_timeout=10, subprotocols=offered) as ws:
        assert ws.subprotocol == "petals-chat"  # a browser drops a handshake that names none: it reads the error
        assert "key" in json.loads(ws.recv(timeout=10))["traceback"]
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
        assert closed.value.rcvd.code == 1008


@pytest.mark.parametrize("query", ["api_key", "api%5Fkey", "api%5fkey", "%61pi_key", "API_KEY", "Api%5FKey"])
def test_a_key_in_any_spelling_of_the_query_never_reaches_the_logs(gateway, query):
    for key in (KEY, WRONG):
        with connect(ws_url(gateway, f"/api/v2/generate?{query}={key}"), proxy=None, open_timeout=10):
            pass
        with connect(ws_url(gateway), proxy=None, open_timeout=10, subprotocols=["petals-chat", f"bearer.{key}"]):
            pass
        requests.get(f"{gateway.base_url}/v1/models?{query}={key}", timeout=10)
    assert wait_until(lambda: f"/api/v2/generate?{query}=[redacted]" in gateway.log_path.read_text(), 10)
    log = gateway.log_path.read_text()
    assert KEY not in log and WRONG not in log


# ---- security headers -------------------------------------------------------------------------

API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; object-src 'none'; base-uri 'none'; form-action 'self'"
)


def assert_security_headers(headers, csp: str) -> None:
    assert headers["Content-Security-Policy"] == csp
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Referrer-Policy"] == "no-referrer"
    assert headers["X-Frame-Options"] == "DENY"


@pytest.mark.parametrize("path", ["/v1/models", "/api/v1/generate", "/healthz", "/metrics", "/api/openapi.json", "/no"])
def test_every_api_answer_carries_the_security_headers(gateway, path):
    assert_security_headers(requests.get(gateway.base_url + path, timeout=10).headers, API_CSP)


@pytest.fixture(scope="module")
def site(artifacts_dir, ui) -> Iterator[ServiceProcess]:
    """A gateway with keys that forwards the page to the ui."""
    service = start(
        artifacts_dir, "gateway-security-site", API_KEYS=KEYS, UI_URL=ui.base_url, AUTH_FAILURES_PER_MINUTE="0"
    )
    yield service
    service.stop()


def test_the_page_and_its_files_carry_the_pages_policy_also_through_the_gateway(ui, site):
    for base in (ui.base_url, site.base_url):
        page = requests.get(base + "/", timeout=10)
        assert_security_headers(page.headers, PAGE_CSP)
        script = re.search(r'src="(/static/chat\.js\?v=\w+)"', page.text).group(1)
        assert_security_headers(requests.get(base + script, timeout=10).headers, PAGE_CSP)
    tags = re.findall(r"<[a-z][^>]*>", page.text)  # nothing inline that the policy would block
    assert [tag for tag in tags if re.search(r"\s(on\w+|style)=", tag)] == []
    scripts = [tag for tag in tags if tag.startswith("<script")]
    assert scripts and all("src=" in tag or 'type="application/json"' in tag for tag in scripts)


def test_the_page_runs_under_its_policy_in_chromium(browser, site):
    context = browser.new_context()
    context.add_init_script(RECORD_CSP_VIOLATIONS)
    page = context.new_page()
    problems = collect_page_errors(page, [])
    try:
        assert page.goto(site.base_url + "/").headers["content-security-policy"] == PAGE_CSP
        page.wait_for_selector("#key-form:not([hidden])")  # the script ran and its fetch got the API's 401
        page.fill("#api-key", KEY)
        page.press("#api-key", "Enter")
        page.wait_for_selector("#key-form", state="hidden")  # the key works: the models are asked for again
        assert page.evaluate("getComputedStyle(document.querySelector('.chat')).display") == "flex"  # styled
        assert page.evaluate("window.__violations") == []
        with contextlib.suppress(PlaywrightError):  # the policy is in force: an injected inline script is refused
            page.add_script_tag(content="window.__injected = true")
        wait_for(page, "window.__violations.length")
        assert not page.evaluate("window.__injected")
        assert [violation.split()[0] for violation in page.evaluate("window.__violations")] == ["script-src-elem"]
    finally:
        context.close()
    unexpected = [p for p in problems if "status of 401" not in p and "Executing inline script violates" not in p]
    assert unexpected == [], unexpected
