"""The chat page's features in a real headless Chromium against the full stack (the stack and the
``page`` fixture of test_chat_page.py): rendered and sanitised Markdown, conversations kept in
IndexedDB across reloads, export and import, edit and regenerate with branches, copy, settings per
conversation, phone and dark screens, keyboard shortcuts, the swarm's status and axe-core's audit.

Hostile or formatted answers are served to the page by Playwright (``answer_with``), the rest come
from the real stack. Screenshots for the README land in test-artifacts/screenshots/.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

from services.common.chat.formats import DEFAULT_PREAMBLE as PREAMBLE
from tests.helpers import RECORD_CSP_VIOLATIONS, collect_page_errors, wait_for
from tests.integration import test_chat_page as chat_page
from tests.integration.test_chat_page import SEP, ai_texts, api_answers, send, set_setting, wait_idle

site = chat_page.site
page = chat_page.page

AXE = Path(__file__).resolve().parents[2] / "services" / "ui" / "node_modules" / "axe-core" / "axe.min.js"

FORMATTED = """Here is **bold**, *italic* and `code`, a [link](https://example.org/docs), then:

- one
- two

| name | value |
| ---- | ----- |
| a    | 1     |

```python
def add(a, b):
    return a + b  # the sum
```
"""

HOSTILE = """<img src=x onerror="window.__injected = 1"><script>window.__injected = 2</script>
[click me](javascript:window.__injected=3) <a href="javascript:window.__injected=4">raw link</a>
![tracker](http://203.0.113.9/pixel.png) <iframe src="http://203.0.113.9/"></iframe>
<style>body { display: none }</style><form action="http://203.0.113.9/"><input name="q"></form>
<svg onload="window.__injected = 5"></svg> [data](data:text/html,<script>alert(1)</script>)
```js
</code></pre><img src=x onerror="window.__injected = 6">
```
**unclosed bold [half a link]( ``` never closed
"""


def answer_with(page, text: str, times: int | None = None) -> None:
    """The page's next answers (all, or ``times``) are ``text``, streamed in pieces of 9 characters."""
    pieces = [text[i : i + 9] for i in range(0, len(text), 9)]
    events = "".join(
        f"event: token\ndata: {json.dumps({'text': piece, 'generated_tokens': i + 1})}\n\n"
        for i, piece in enumerate(pieces)
    )
    done = {"ok": True, "outputs": text, "finish_reason": "length", "stop_sequence": None}
    body = events + f"event: done\ndata: {json.dumps(done)}\n\n"
    page.route(
        "**/api/v2/generate_stream",
        lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body),
        **({"times": times} if times else {}),
    )


@contextmanager
def chat_page_in(browser, site: str, **context_options) -> Iterator:
    """A page in a context of its own (viewport, colour scheme, ...), checked like the ``page`` fixture's."""
    context = browser.new_context(**{"viewport": {"width": 1000, "height": 800}, **context_options})
    context.add_init_script(
        "localStorage.setItem('petals-chat-settings', JSON.stringify({sampling: false, max_new_tokens: 24}))"
    )
    context.add_init_script(RECORD_CSP_VIOLATIONS)
    new_page = context.new_page()
    problems = collect_page_errors(new_page, [])
    new_page.goto(site + "/")
    wait_for(new_page, "!document.getElementById('model').disabled")
    yield new_page
    violations = new_page.evaluate("window.__violations")
    context.close()
    assert violations == [] and problems == [], (violations, problems)


def screenshot(page, artifacts_dir: Path, name: str) -> None:
    shots = artifacts_dir / "screenshots"
    shots.mkdir(exist_ok=True)
    page.screenshot(path=str(shots / name), full_page=True)


def axe_violations(page) -> list[dict]:
    """axe-core's serious and critical violations on the page as it is now."""
    page.evaluate(AXE.read_text(encoding="utf-8"))  # evaluated by the driver, not as a page script
    results = page.evaluate("axe.run(document, {resultTypes: ['violations']})")
    return [
        {"id": v["id"], "impact": v["impact"], "nodes": [n["target"] for n in v["nodes"]][:5]}
        for v in results["violations"]
        if v["impact"] in ("serious", "critical")
    ]


def human_texts(page) -> list[str]:
    return page.eval_on_selector_all(".turn.human .text", "nodes => nodes.map(n => n.dataset.source)")


def sidebar_titles(page) -> list[str]:
    return page.eval_on_selector_all(".conversation-title", "nodes => nodes.map(n => n.textContent)")


STORED_COUNT = """new Promise((resolve, reject) => {
  const opening = indexedDB.open("petals-chat");
  opening.onerror = () => reject(opening.error);
  opening.onsuccess = () => {
    const counting = opening.result.transaction("conversations").objectStore("conversations").count();
    counting.onsuccess = () => { opening.result.close(); resolve(counting.result); };
  };
})"""


def wait_stored(page, count: int) -> None:
    """Until the page's IndexedDB holds ``count`` conversations (its writes end after the click)."""
    wait_for(page, f"{STORED_COUNT}.then((n) => n === {count})")


# ---- 1. rendered answers --------------------------------------------------------------------
def test_markdown_is_rendered_while_streaming_with_highlighted_code_and_a_copy_button(page, site, artifacts_dir):
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    send(page, "Hello! What is Petals?")  # a real answer: rendered as Markdown while it streams
    page.wait_for_selector(".turn.ai.streaming .text p")
    wait_idle(page)
    answer_with(page, FORMATTED, times=1)
    send(page, "Show me some formatting")
    wait_idle(page)
    answer = page.locator(".turn.ai .text").last
    assert answer.locator("strong").inner_text() == "bold" and answer.locator("em").inner_text() == "italic"
    assert answer.locator("li").all_inner_texts() == ["one", "two"]
    assert answer.locator("table td").all_inner_texts() == ["a", "1"]
    link = answer.locator("a")
    assert link.get_attribute("href") == "https://example.org/docs" and link.get_attribute("target") == "_blank"
    assert set(link.get_attribute("rel").split()) >= {"noopener", "noreferrer"}
    code = answer.locator("pre code.hljs")
    assert code.get_attribute("data-language") == "python"
    assert code.locator(".hljs-keyword").all_inner_texts()[:2] == ["def", "return"]
    assert code.locator(".hljs-comment").inner_text() == "# the sum"
    answer.locator(".copy-code").click()
    assert page.evaluate("navigator.clipboard.readText()") == "def add(a, b):\n    return a + b  # the sum\n"
    screenshot(page, artifacts_dir, "chat-desktop.png")


def test_hostile_answers_cannot_run_script_or_load_anything(page, site):
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    answer_with(page, HOSTILE)
    send(page, "Be hostile")
    wait_idle(page)
    dialogue = page.locator("#dialogue")
    assert dialogue.locator("img, script, iframe, style, form, input, svg, object, embed").count() == 0
    hrefs = dialogue.locator("a").evaluate_all("links => links.map(a => a.getAttribute('href'))")
    assert all(href is None or href.startswith(("http://", "https://", "mailto:")) for href in hrefs), hrefs
    assert page.evaluate("window.__injected") is None
    assert page.evaluate("getComputedStyle(document.body).display") != "none"
    assert "raw link" in page.locator(".turn.ai .text").inner_text()  # raw HTML is shown as text
    assert all(url.startswith(site) for url in requested), [u for u in requested if not u.startswith(site)]


# ---- 2. conversations that last ------------------------------------------------------------
def test_conversations_survive_a_reload_and_the_sidebar_renames_searches_and_deletes(page, site):
    send(page, "Hi")
    wait_idle(page)
    first_answer = ai_texts(page)
    page.click("#new-chat")
    send(page, "Tell me a short story.")
    wait_idle(page)
    page.reload()
    wait_for(page, "!document.getElementById('model').disabled")
    assert sidebar_titles(page) == ["Tell me a short story.", "Hi"]  # newest first; the newest is open
    assert human_texts(page) == ["Tell me a short story."]
    page.click(".conversation-title >> text=Hi")
    assert human_texts(page) == ["Hi"] and ai_texts(page) == first_answer
    send(page, "Are you still there?")  # a new session: the dialogue is replayed into it
    wait_idle(page)
    transcript = f"{PREAMBLE}{SEP}Human: Hi{SEP}AI:{first_answer[0]}{SEP}Human: Are you still there?{SEP}AI:"
    assert ai_texts(page)[1:] == api_answers(site, [transcript], 24)
    assert sidebar_titles(page)[0] == "Hi"  # it was updated last
    page.click(".conversation[data-id] >> nth=0 >> .rename")
    page.fill(".rename-input", "Greetings")
    page.press(".rename-input", "Enter")
    page.fill("#search", "story")
    assert sidebar_titles(page) == ["Tell me a short story."]
    page.fill("#search", "")
    page.click('[aria-label="Delete “Tell me a short story.”"]')
    wait_stored(page, 1)
    page.reload()
    wait_for(page, "!document.getElementById('model').disabled")
    assert sidebar_titles(page) == ["Greetings"] and human_texts(page) == ["Hi", "Are you still there?"]


def test_conversations_export_and_import_as_json(page, site, tmp_path):
    answer_with(page, "An answer with `code`.")
    send(page, "First question")
    wait_idle(page)
    with page.expect_download() as download:
        page.click("#export")
    exported = tmp_path / "export.json"
    download.value.save_as(exported)
    data = json.loads(exported.read_text())
    assert data["format"] == "petals-chat-conversations" and len(data["conversations"]) == 1
    page.click(".conversation .delete")
    assert sidebar_titles(page) == [] and human_texts(page) == []
    wait_stored(page, 0)
    damaged = tmp_path / "damaged.json"
    damaged.write_text(json.dumps({**data, "conversations": [{"id": 1}]}))
    page.set_input_files("#import-file", str(damaged))
    wait_for(page, "document.getElementById('transfer-message').textContent.includes('damaged')")
    page.set_input_files("#import-file", str(exported))
    wait_for(page, "document.getElementById('transfer-message').textContent.includes('Imported 1')")
    page.click(".conversation-title >> text=First question")
    assert human_texts(page) == ["First question"] and ai_texts(page) == ["An answer with `code`."]


# ---- 3. edit, regenerate, branches, copy ----------------------------------------------------
def test_regenerate_and_edit_keep_every_version_switchable(page, site):
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    answer_with(page, "First answer", times=1)
    send(page, "Hi")
    wait_idle(page)
    answer_with(page, "Second answer", times=1)
    page.click('[aria-label="Regenerate answer"]')
    wait_idle(page)
    assert ai_texts(page) == ["Second answer"] and page.inner_text(".turn.ai .branch-position") == "2 / 2"
    page.click('.turn.ai [aria-label="Previous version"]')
    assert ai_texts(page) == ["First answer"] and page.inner_text(".turn.ai .branch-position") == "1 / 2"
    page.click('.turn.ai [aria-label="Copy answer"]')
    assert page.evaluate("navigator.clipboard.readText()") == "First answer"
    page.click('[aria-label="Edit question"]')
    page.fill('[aria-label="Edited question"]', "Hello there")
    page.press('[aria-label="Edited question"]', "Enter")  # a real answer to the edited question
    wait_idle(page)
    assert human_texts(page) == ["Hello there"] and page.inner_text(".turn.human .branch-position") == "2 / 2"
    assert ai_texts(page) == api_answers(site, [f"{PREAMBLE}{SEP}Human: Hello there{SEP}AI:"], 24)
    page.click('[aria-label="Copy question"]')
    assert page.evaluate("navigator.clipboard.readText()") == "Hello there"
    page.click('.turn.human [aria-label="Previous version"]')
    assert human_texts(page) == ["Hi"] and ai_texts(page) == ["First answer"]  # the answer last seen there
    page.reload()
    wait_for(page, "!document.getElementById('model').disabled")
    assert human_texts(page) == ["Hi"] and ai_texts(page) == ["First answer"]  # kept across reloads


# ---- 4. settings per conversation ------------------------------------------------------------
def test_settings_are_per_conversation_with_the_models_defaults_shown(page, site):
    models = {m["id"]: m for m in requests.get(site + "/v1/models", timeout=10).json()["data"]}
    default = next(m for m in models.values() if m["default"])
    page.click(".settings summary")
    shown = page.inner_text("#model-defaults")
    d = default["defaults"]
    assert f"temperature {d['temperature']}, top-p {d['top_p']}, max new tokens {d['max_new_tokens']}" in shown
    assert page.input_value("#system_prompt") == default["chat"]["system_prompt"]
    bodies: list[dict] = []
    page.on("request", lambda r: bodies.append(r.post_data_json) if "generate_stream" in r.url else None)
    page.fill("#system_prompt", "You answer like a pirate.")
    page.dispatch_event("#settings", "change")
    set_setting(page, "max_new_tokens", "5")
    send(page, "Hi")
    wait_idle(page)
    assert bodies[-1]["inputs"].startswith("You answer like a pirate.\n\nHuman: Hi")
    assert bodies[-1]["max_new_tokens"] == 5 and bodies[-1]["do_sample"] == 0
    page.click("#new-chat")
    assert page.input_value("#system_prompt") == default["chat"]["system_prompt"]
    page.click(".conversation-title >> text=Hi")
    assert (
        page.input_value("#system_prompt") == "You answer like a pirate." and page.input_value("#max_new_tokens") == "5"
    )
    page.click("#reset-settings")
    assert page.input_value("#max_new_tokens") == str(d["max_new_tokens"])


# ---- 5. every screen ---------------------------------------------------------------------------
def test_a_360_px_phone_collapses_the_sidebar_and_nothing_overflows(browser, site, artifacts_dir):
    with chat_page_in(browser, site, viewport={"width": 360, "height": 740}, is_mobile=True, has_touch=True) as phone:
        assert phone.is_hidden("#sidebar") and phone.get_attribute("#toggle-sidebar", "aria-expanded") == "false"
        answer_with(phone, FORMATTED)
        send(phone, "Show me some formatting")
        wait_idle(phone)
        assert phone.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        screenshot(phone, artifacts_dir, "chat-phone-360.png")
        phone.click("#toggle-sidebar")
        assert phone.is_visible("#sidebar") and sidebar_titles(phone) == ["Show me some formatting"]
        assert phone.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        phone.click(".conversation-title")  # opening a conversation closes the sidebar again
        assert phone.is_hidden("#sidebar")


def background(page) -> str:
    return page.evaluate("getComputedStyle(document.documentElement).backgroundColor")


def test_dark_theme_follows_the_system_and_the_switch_and_axe_finds_nothing_serious(browser, site, artifacts_dir):
    with chat_page_in(browser, site, color_scheme="dark") as dark:
        assert background(dark) == "rgb(23, 24, 28)"
        answer_with(dark, FORMATTED)
        send(dark, "Show me some formatting")
        wait_idle(dark)
        screenshot(dark, artifacts_dir, "chat-dark.png")
        assert axe_violations(dark) == []
        dark.select_option("#theme", "light")
        assert background(dark) == "rgb(247, 247, 248)"
        dark.reload()
        wait_for(dark, "!document.getElementById('model').disabled")
        assert background(dark) == "rgb(247, 247, 248)" and dark.input_value("#theme") == "light"
        assert axe_violations(dark) == []  # light, with the reopened conversation
        dark.click(".settings summary")
        dark.click("#toggle-sidebar")
        dark.click("#toggle-sidebar")
        assert axe_violations(dark) == []


def test_keyboard_shortcuts_are_listed_and_work_and_focus_is_visible(page, site):
    answer_with(page, "An answer")
    send(page, "Hi")
    wait_idle(page)
    page.keyboard.press("Control+/")
    assert page.is_visible("#shortcuts") and "New chat" in page.inner_text("#shortcuts")
    page.keyboard.press("Escape")
    assert page.is_hidden("#shortcuts")
    page.keyboard.press("Control+Shift+Enter")  # regenerate
    wait_idle(page)
    assert page.inner_text(".turn.ai .branch-position") == "2 / 2"
    page.keyboard.press("Control+k")
    assert page.evaluate("document.activeElement.id") == "search"
    page.keyboard.press("Control+Shift+O")
    assert ai_texts(page) == [] and page.evaluate("document.activeElement.id") == "message"
    page.keyboard.press("Shift+Tab")  # the keyboard moves focus: it is drawn
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline not in ("none", ""), page.evaluate("document.activeElement.outerHTML")
    names = page.eval_on_selector_all(
        "button, select, input, textarea",
        "els => els.filter(e => e.offsetParent).map(e => [e.id || e.className, e.labels?.[0]?.textContent"
        " || e.getAttribute('aria-label') || e.textContent.trim()])",
    )
    assert all(name for _, name in names), names


# ---- 6. the swarm's status ---------------------------------------------------------------------
def test_the_swarm_status_shows_the_real_swarm(page, site):
    wait_for(page, "!document.getElementById('swarm').hidden")
    swarm = requests.get(site + "/api/v2/swarm", params={"model": page.input_value("#model")}, timeout=10).json()
    if swarm["state"] == "unknown":
        assert page.inner_text("#swarm-summary") == "The swarm's state is not known yet."
    else:
        online = swarm["servers_by_state"]["online"]
        assert page.inner_text("#swarm-summary").startswith(f"{online} server")
        assert f"all {swarm['num_blocks']} blocks served" in page.inner_text("#swarm-summary")


SWARM = {
    "model": "m", "state": "healthy", "num_blocks": 30, "full_route": True, "coverage": [2] * 30,
    "min_redundancy": 2, "blocks_without_server": [], "servers_total": 2, "servers_by_state": {"online": 2},
    "servers": [], "servers_truncated": False, "cache_tokens_left": 9000, "min_block_cache_tokens_left": 4000,
    "updated_at": "2026-12-07T12:00:00Z", "refresh_seconds": 1,
}  # fmt: skip
SWARM_CASES = [
    ({}, "2 servers online · all 30 blocks served", ""),
    ({"state": "broken", "full_route": False, "blocks_without_server": [[10, 20]], "servers_by_state": {"online": 1}},
     "1 server online · 20 of 30 blocks served", "No server holds blocks 10–19 of this model, so it cannot answer"),
    ({"state": "degraded", "min_block_cache_tokens_left": 0}, "2 servers online", "out of capacity"),
    ({"state": "degraded", "min_redundancy": 1}, "2 servers online", "held by a single server: answers may be slow"),
]  # fmt: skip


def fulfil_json(body: dict):
    return lambda route: route.fulfill(status=200, content_type="application/json", body=json.dumps(body))


def test_the_swarm_status_says_in_plain_words_what_is_wrong(page, site):
    for change, summary, message in SWARM_CASES:
        page.route("**/api/v2/swarm*", fulfil_json({**SWARM, **change}))
        page.reload()
        summary_shown = f"document.getElementById('swarm-summary').textContent.includes({json.dumps(summary)})"
        message_shown = f"document.getElementById('swarm-message').textContent.includes({json.dumps(message)})"
        wait_for(page, f"{summary_shown} && {message_shown}")
        assert page.get_attribute("#swarm", "data-state") == {**SWARM, **change}["state"]
        page.unroute("**/api/v2/swarm*")
