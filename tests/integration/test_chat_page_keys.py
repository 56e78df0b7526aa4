"""The chat page in a real headless Chromium when the gateway wants API keys, and under a session quota.

The stack: the test swarm, an inference replica with a quota of one session per client, a gateway
with keys that forwards the page to the ui. The page asks for a key once, keeps it in localStorage
and sends it with every request; two tabs of one user (one key, so one client) take turns in the
single session the quota allows, each recovering its dialogue without an error.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from client.api import Api
from services.common.chat.formats import DEFAULT_PREAMBLE as PREAMBLE
from tests.helpers import collect_page_errors, dedicated_stack, wait_for

KEY = "page-user-key-3b9d27c51e08"


@pytest.fixture(scope="module")
def site(swarm, model_dir, artifacts_dir, ui) -> Iterator[str]:
    with dedicated_stack(swarm, model_dir, artifacts_dir, "page-keys", inference_env={"MAX_SESSIONS_PER_CLIENT": "1"},
                         gateway_env={"API_KEYS": f"user:{KEY}", "UI_URL": ui.base_url}) as stack:  # fmt: skip
        yield stack.gateway.base_url


@pytest.fixture
def context(browser):
    """A fresh browser profile (empty localStorage) with greedy settings; console errors other than
    the statuses the page is meant to meet (401: no key yet; 404: a session the quota closed, which the
    page replays) are asserted absent at the end."""
    context = browser.new_context(viewport={"width": 1000, "height": 800})
    context.add_init_script(
        "if (!localStorage.getItem('petals-chat-settings'))"
        " localStorage.setItem('petals-chat-settings', JSON.stringify({sampling: false, max_new_tokens: 12}))"
    )
    context.problems = []
    yield context
    context.close()
    unexpected = [p for p in context.problems if not any(f"status of {s} " in p for s in (401, 404))]
    assert unexpected == [], f"console errors: {unexpected}"


def new_page(context, site: str):
    page = context.new_page()
    collect_page_errors(page, context.problems)
    page.goto(site + "/")
    return page


def enter_key(page, key: str) -> None:
    page.wait_for_selector("#key-form:not([hidden])")
    page.fill("#api-key", key)
    page.press("#api-key", "Enter")


def chat(page, text: str) -> str:
    page.fill("#message", text)
    page.press("#message", "Enter")
    wait_for(page, "!document.getElementById('send').disabled && !document.querySelector('.streaming')",
             timeout=60_000)  # fmt: skip
    assert page.is_hidden("#error"), page.inner_text("#error")
    return page.eval_on_selector_all(".turn.ai .text", "nodes => nodes.map(n => n.dataset.source)")[-1]


def api_answer(site: str, inputs: str) -> str:
    """The greedy answer of the API to the page's first request, with the key."""
    body = {"inputs": inputs, "max_new_tokens": 12, "stop": ["\n\nHuman:"], "do_sample": 0}
    return Api(site, headers={"Authorization": f"Bearer {KEY}"}).stream_text(body)["outputs"]


def test_the_page_asks_for_a_key_once_and_sends_it(context, site):
    page = new_page(context, site)
    enter_key(page, "not-the-key-0123456789")
    wait_for(page, "document.getElementById('key-message').textContent.includes('not valid')")
    assert page.is_disabled("#model") and page.evaluate("localStorage.getItem('petals-chat-api-key')") is None
    enter_key(page, KEY)
    wait_for(page, "!document.getElementById('model').disabled")
    assert page.is_hidden("#key-form")
    answer = chat(page, "Hello!")
    assert answer == api_answer(site, f"{PREAMBLE}\n\nHuman: Hello!\n\nAI:")
    page.reload()  # the key is remembered: no question this time
    wait_for(page, "!document.getElementById('model').disabled")
    assert page.is_hidden("#key-form")
    page.click("#new-chat")  # the reload reopened the conversation: the same question in a new one
    assert chat(page, "Hello!") == answer


def test_two_tabs_of_one_client_share_a_one_session_quota_without_errors(context, site):
    first = new_page(context, site)
    enter_key(first, KEY)
    wait_for(first, "!document.getElementById('model').disabled")
    second = new_page(context, site)  # the same profile: the key is already there
    wait_for(second, "!document.getElementById('model').disabled")
    chat(first, "Hello!")
    first_session = first.evaluate("document.body.dataset.sessionId")
    chat(second, "Hi there!")  # the quota: the first tab's idle session is closed for this one
    assert chat(first, "How are you?")  # its session expired: a new one, the dialogue replayed, no error
    assert first.evaluate("document.body.dataset.sessionId") != first_session
    assert len(first.query_selector_all(".turn.ai")) == 2
    assert chat(second, "And you?")  # and back again
