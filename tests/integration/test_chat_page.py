"""The chat page in a real headless Chromium, against the full stack (swarm, inference, gateway, ui)."""

from __future__ import annotations

import gzip
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from client.api import Api
from services.common.chat.formats import DEFAULT_PREAMBLE as PREAMBLE
from tests.helpers import (
    CHATML_DESCRIPTION,
    CHATML_MODEL,
    RECORD_CSP_VIOLATIONS,
    collect_page_errors,
    start_gateway,
    wait_for,
)

SEP = "\n\n"
STOP = "\n\nHuman:"
CHATML_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n"


@pytest.fixture(scope="module")
def site(inference, chatml_inference, ui, artifacts_dir) -> Iterator[str]:
    """The public entry point: a gateway serving the API (two models, the first the default) and
    forwarding the page to the ui."""
    replicas = {"inference-0": inference.base_url, chatml_inference.name: chatml_inference.base_url}
    gateway = start_gateway(artifacts_dir, replicas, "gateway-site", UI_URL=ui.base_url)
    yield gateway.base_url
    gateway.stop()


@pytest.fixture
def page(browser, site):
    """A fresh page with greedy settings. Console errors and Content-Security-Policy violations are
    asserted empty at the end, except the network log lines of HTTP statuses a test provokes on
    purpose (``page.expected_statuses``)."""
    context = browser.new_context(viewport={"width": 1000, "height": 800})
    context.add_init_script(
        "if (!localStorage.getItem('petals-chat-settings'))"
        " localStorage.setItem('petals-chat-settings', JSON.stringify({sampling: false, max_new_tokens: 24}))"
    )
    context.add_init_script(RECORD_CSP_VIOLATIONS)
    page = context.new_page()
    page.expected_statuses = set()
    problems = collect_page_errors(page, [])
    page.goto(site + "/")
    wait_for(page, "!document.getElementById('model').disabled")  # the models are in
    page.evaluate(
        "window.__updates = 0; new MutationObserver((m) => { window.__updates += m.length; })"
        ".observe(document.getElementById('dialogue'), {subtree: true, childList: true, characterData: true})"
    )
    yield page
    violations = page.evaluate("window.__violations")
    context.close()
    assert violations == [], f"Content-Security-Policy violations: {violations}"
    expected = [f"status of {status} " for status in page.expected_statuses]
    unexpected = [
        p for p in problems if not (p.startswith("Failed to load resource") and any(e in p for e in expected))
    ]
    assert unexpected == [], f"console errors: {unexpected}"


def send(page, text: str) -> None:
    page.fill("#message", text)
    page.press("#message", "Enter")


def wait_idle(page, timeout_ms: int = 60_000) -> None:
    wait_for(page, "!document.getElementById('send').disabled", timeout=timeout_ms)


def ai_texts(page) -> list[str]:
    return page.eval_on_selector_all(".turn.ai .text", "nodes => nodes.map(n => n.dataset.source)")


def api_answers(
    site: str, turns: list[str], max_new_tokens: int, model: str | None = None, stop: str = STOP
) -> list[str]:
    """What the API returns, greedy, when ``turns`` are sent in turn into one fresh session."""
    api = Api(site)
    session_id = api.open_session(1024, **({"model": model} if model else {}))
    answers = []
    for inputs in turns:
        body = {"inputs": inputs, "max_new_tokens": max_new_tokens, "stop": [stop], "session_id": session_id}
        _, events = api.stream(body)
        assert events[-1][0] == "done", events[-1]
        answers.append(events[-1][1]["outputs"])
    api.close_session(session_id)
    return answers


def set_setting(page, name: str, value: str) -> None:
    page.click(".settings summary") if not page.is_visible(f"#{name}") else None
    page.fill(f"#{name}", value)
    page.dispatch_event("#settings", "change")


def test_answer_streams_in_and_equals_the_api(page, site, artifacts_dir):
    send(page, "Hello! What is Petals?")
    page.wait_for_selector("#stop:not([hidden])")
    assert page.is_disabled("#message")
    wait_idle(page)
    assert page.evaluate("window.__updates") >= 5, "the answer should appear over several updates"
    assert re.match(r"[\d.]+ tokens/s · [\d.]+ s/token", page.inner_text("#speed"))
    assert page.is_enabled("#message") and page.is_hidden("#stop")
    expected = api_answers(site, [f"{PREAMBLE}{SEP}Human: Hello! What is Petals?{SEP}AI:"], 24)
    assert ai_texts(page) == expected
    shots = artifacts_dir / "screenshots"
    shots.mkdir(exist_ok=True)
    page.screenshot(path=str(shots / "chat.png"), full_page=True)


def test_the_page_chats_under_its_content_security_policy(page, site):
    policy = requests.get(site + "/", timeout=10).headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    send(page, "Hello!")
    wait_idle(page)
    assert ai_texts(page)[-1] and page.is_hidden("#error")  # violations: asserted none by the fixture


def test_second_turn_continues_the_session(page, site):
    send(page, "Hi")
    wait_idle(page)
    session_id = page.evaluate("document.body.dataset.sessionId")
    send(page, "Tell me a short story.")
    wait_idle(page)
    assert page.evaluate("document.body.dataset.sessionId") == session_id  # same session, only the new turn sent
    # The page sent the first turn, then only the second one (after the separator the model did not emit).
    turns = [f"{PREAMBLE}{SEP}Human: Hi{SEP}AI:", f"{SEP}Human: Tell me a short story.{SEP}AI:"]
    assert ai_texts(page) == api_answers(site, turns, 24)


def test_stop_interrupts_a_long_answer_and_the_next_message_works(page):
    set_setting(page, "max_new_tokens", "600")
    send(page, "Write a very long story.")
    wait_for(page, "window.__updates > 12", timeout=60_000)
    page.click("#stop")
    wait_idle(page, timeout_ms=5_000)
    stopped = ai_texts(page)[0]
    time.sleep(1)
    assert ai_texts(page)[0] == stopped, "no more text after Stop"
    set_setting(page, "max_new_tokens", "8")
    send(page, "Thanks!")
    wait_idle(page)
    assert len(ai_texts(page)) == 2 and page.is_hidden("#error")


def test_expired_session_is_recovered_silently(page, site):
    send(page, "Hi")
    wait_idle(page)
    assert page.is_hidden("#error"), page.inner_text("#error")
    old_session = page.evaluate("document.body.dataset.sessionId")
    closed = requests.get(f"{site}/api/v1/close_inference_session", params={"session_id": old_session}).json()
    assert closed == {"ok": True}  # expire it server-side
    page.expected_statuses.add(404)  # the page learns it from a 404, then reopens and replays
    send(page, "Are you still there?")
    wait_idle(page)
    assert page.is_hidden("#error")
    assert page.evaluate("document.body.dataset.sessionId") not in ("", old_session)
    first, second = ai_texts(page)
    transcript = f"{PREAMBLE}{SEP}Human: Hi{SEP}AI:{first}{SEP}Human: Are you still there?{SEP}AI:"
    assert [second] == api_answers(site, [transcript], 24)  # the dialogue was replayed into a new session


def test_a_full_session_is_grown_on_its_error_code(page):
    """On ``session_full`` (whatever the message says) the page opens a session twice as large
    (up to the model's limit) and replays the dialogue into it, showing no error."""
    opened: list[str] = []
    page.on("request", lambda request: opened.append(request.url) if "open_inference_session" in request.url else None)
    full = json.dumps({"ok": False, "error": {"code": "session_full", "message": "No room left"}})
    page.expected_statuses.add(400)
    page.route("**/api/v2/generate_stream", lambda route: route.fulfill(
        status=400, content_type="application/json", body=full), times=1)  # fmt: skip
    # Wait for the second open's request event itself: under load Playwright may deliver it after
    # the page has gone idle (seen once in a full suite run).
    with page.expect_request(
        lambda request: "open_inference_session" in request.url and "max_length=2048" in request.url
    ):
        send(page, "Hi")
    wait_idle(page)
    assert page.is_hidden("#error") and len(ai_texts(page)) == 1
    lengths = [parse_qs(urlsplit(url).query)["max_length"] for url in opened]
    assert lengths == [["1024"], ["2048"]]  # CHAT_SESSION_MAX_LENGTH's default, then doubled (the limit)


def test_errors_show_a_box_with_retry(page, site, inference):
    page.expected_statuses.add(503)
    page.route("**/api/v2/generate_stream", lambda route: route.fulfill(
        status=503, content_type="application/json",
        body=json.dumps({"ok": False, "error": {"code": "unavailable", "message": "No inference replica is ready"}}),
    ))  # fmt: skip
    send(page, "Hello")
    wait_idle(page)
    assert page.is_visible("#error") and "No inference replica is ready" in page.inner_text("#error")
    page.unroute("**/api/v2/generate_stream")
    page.click("#retry")
    wait_idle(page)
    assert page.is_hidden("#error") and len(ai_texts(page)) == 1


def test_the_model_picker_lists_the_models_and_a_switch_starts_a_new_chat(page, site):
    options = page.eval_on_selector_all("#model option", "nodes => nodes.map(n => [n.value, n.textContent])")
    default = options[0][0]
    assert options == [[default, default], [CHATML_MODEL, CHATML_MODEL]] and page.input_value("#model") == default
    send(page, "Hi")
    wait_idle(page)
    default_session = page.evaluate("document.body.dataset.sessionId")
    page.select_option("#model", CHATML_MODEL)
    assert ai_texts(page) == [] and page.evaluate("document.body.dataset.sessionId") == ""  # a new chat
    assert page.inner_text("#model-description") == CHATML_DESCRIPTION  # markup in a card stays text
    assert page.locator("#model-description b").count() == 0
    send(page, "Hi")
    wait_idle(page)
    send(page, "And you?")
    wait_idle(page)
    session_id = page.evaluate("document.body.dataset.sessionId")
    assert session_id.startswith("inference-chatml.") and not default_session.startswith("inference-chatml.")
    # The page wrote the dialogue in the model's ChatML, then sent only the new turn.
    turns = [f"{CHATML_SYSTEM}<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
             "<|im_end|>\n<|im_start|>user\nAnd you?<|im_end|>\n<|im_start|>assistant\n"]  # fmt: skip
    assert ai_texts(page) == api_answers(site, turns, 24, model=CHATML_MODEL, stop="<|im_end|>")


MARKUP = '<img src=x onerror="window.__injected = 1"><script>window.__injected = 2</script><b>bold</b>'


def test_markup_in_messages_and_answers_is_shown_as_text(page):
    send(page, MARKUP)
    wait_idle(page)
    assert page.inner_text(".turn.human .text") == MARKUP
    events = "".join(f"event: token\ndata: {json.dumps({'text': part, 'generated_tokens': i + 1})}\n\n"
                     for i, part in enumerate([MARKUP[:20], MARKUP[20:]]))  # fmt: skip
    done = {"ok": True, "outputs": MARKUP, "finish_reason": "length", "stop_sequence": None}
    page.route("**/api/v2/generate_stream", lambda route: route.fulfill(
        status=200, content_type="text/event-stream", body=events + f"event: done\ndata: {json.dumps(done)}\n\n",
    ))  # fmt: skip
    send(page, "Answer with markup")
    wait_idle(page)
    assert ai_texts(page)[-1] == MARKUP
    assert page.locator("#dialogue img, #dialogue script, #dialogue b").count() == 0
    assert page.evaluate("window.__injected") is None


def test_shift_enter_inserts_a_newline_and_settings_persist(page, site):
    page.fill("#message", "line one")
    page.press("#message", "Shift+Enter")
    page.type("#message", "line two")
    assert page.input_value("#message") == "line one\nline two"
    set_setting(page, "temperature", "1.3")
    page.reload()
    page.click(".settings summary")
    assert page.input_value("#temperature") == "1.3"


def test_phone_sized_screen_and_labels(browser, site, artifacts_dir):
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    page = context.new_page()
    page.goto(site + "/")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    for label in ["Model", "Your message", "Temperature", "Top-p", "Max new tokens"]:
        assert page.get_by_label(label).count() == 1
    assert page.get_attribute("#dialogue", "aria-live") == "polite"
    page.screenshot(path=str(artifacts_dir / "screenshots" / "chat-phone.png"))
    context.close()


def test_static_responses_are_cached_and_compressed(site):
    page = requests.get(site + "/", headers={"Accept-Encoding": "gzip"}, timeout=10)
    assert page.headers["Cache-Control"] == "no-cache" and page.headers["Content-Encoding"] == "gzip"
    assert page.headers["Vary"] == "Accept-Encoding" and page.headers["ETag"]
    again = requests.get(site + "/", headers={"If-None-Match": page.headers["ETag"]}, timeout=10)
    assert again.status_code == 304 and again.content == b""
    for asset in re.findall(r'(?:href|src)="(/static/[^"]+)"', page.text):
        response = requests.get(site + asset, headers={"Accept-Encoding": "gzip"}, stream=True, timeout=10)
        raw = response.raw.read()
        assert response.headers["Cache-Control"] == "public, max-age=31536000, immutable"
        assert response.headers["Content-Encoding"] == "gzip" and gzip.decompress(raw)
        plain = requests.get(site + asset.split("?")[0], headers={"Accept-Encoding": "identity"}, timeout=10)
        assert plain.headers["Cache-Control"] == "no-cache" and "Content-Encoding" not in plain.headers
    assert requests.get(site + "/static/missing.js", timeout=10).status_code == 404


def test_no_asset_comes_from_the_internet():
    static = Path(__file__).resolve().parents[2] / "services" / "ui" / "static"
    for path in static.iterdir():
        text = path.read_text(encoding="utf-8")
        external = re.findall(r'(?:src|href)="(https?://[^"]+)"|url\((https?://[^)]+)\)|@import\s+"?(https?://)', text)
        links = [e for e in external if e[0] and "github.com/bigscience-workshop/petals" not in e[0]]
        assert not links and not any(e[1] or e[2] for e in external), (path.name, external)
