"""``make run``'s runner brings up swarm + services (both models, SmolLM2 the default) and answers
the curl shown in the README; the chat page, as it opens, answers with the real model."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from deploy.local_stack import REPO_ROOT, SMOLLM2, pick_free_port

FRANCE = "What is the capital of France?"


def readme_curl_commands() -> list[str]:
    readme = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"<!-- local-run-example -->\s*```bash\n(.*?)```", readme, re.DOTALL)
    assert block, "README.md must keep its local-run example block"
    return [line for line in block.group(1).splitlines() if line.startswith("curl ")]


def answer_is_ok(output: str) -> bool:
    """A JSON answer with ok=true, an event stream whose last event is a successful ``done``,
    or an OpenAI-style completion."""
    if output.startswith("event:"):
        last = output.strip().split("\n\n")[-1].splitlines()
        return last[0] == "event: done" and json.loads(last[1].removeprefix("data: "))["ok"] is True
    answer = json.loads(output)
    return answer.get("ok") is True or bool(answer.get("choices"))


def answer_text(output: str) -> str:
    """The generated text of an answer that ``answer_is_ok``."""
    if output.startswith("event:"):
        return json.loads(output.strip().split("\n\n")[-1].splitlines()[1].removeprefix("data: "))["outputs"]
    answer = json.loads(output)
    return answer["choices"][0]["message"]["content"] if "choices" in answer else answer["outputs"]


def check_the_chat_page(browser, url: str, screenshot: Path) -> None:
    """The page opens with SmolLM2 and answers the France question (greedy) with Paris, then a second
    turn in the same session with text; the screenshot is the README's."""
    context = browser.new_context(viewport={"width": 1000, "height": 800})
    context.add_init_script(
        "localStorage.setItem('petals-chat-settings', JSON.stringify({sampling: false, max_new_tokens: 64}))"
    )
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        page.goto(url + "/")
        page.wait_for_function("!document.getElementById('model').disabled")
        assert page.input_value("#model") == SMOLLM2.name
        assert page.inner_text("#model-description") == SMOLLM2.description
        answers = []
        for question in (FRANCE, "Write a haiku about the sea."):
            page.fill("#message", question)
            page.press("#message", "Enter")
            page.wait_for_selector("#stop:not([hidden])")
            page.wait_for_function("!document.getElementById('send').disabled", timeout=120_000)
            answers = page.eval_on_selector_all(".turn.ai .text", "nodes => nodes.map(n => n.textContent)")
        assert page.is_hidden("#error"), page.inner_text("#error")
        assert len(answers) == 2 and "Paris" in answers[0], answers
        assert answers[1].strip() and "\ufffd" not in "".join(answers), answers
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot), full_page=True)
    finally:
        context.close()
    assert errors == [], f"console errors: {errors}"


def test_local_runner_answers_the_readme_curl(artifacts_dir: Path, browser):
    port = pick_free_port()
    env = {**os.environ, "PUBLIC_PORT": str(port), "LOCAL_STATE_DIR": str(artifacts_dir / "run-local")}
    runner = subprocess.Popen(
        [sys.executable, "-m", "deploy.run_local"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output = ""
        deadline = time.monotonic() + 240
        while "Press Ctrl-C to stop." not in output:
            line = runner.stdout.readline()
            assert line or runner.poll() is None, f"runner exited early:\n{output}"
            output += line
            assert time.monotonic() < deadline, f"runner not up in time:\n{output}"
        assert f"http://127.0.0.1:{port}/api/v1/" in output
        commands = readme_curl_commands()
        assert commands, "the README example has no curl command"
        for command in commands:
            command = command.replace("127.0.0.1:5000", f"127.0.0.1:{port}")
            result = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=60, check=True)
            assert answer_is_ok(result.stdout), result.stdout
            if FRANCE in command:  # SmolLM2, greedy: v1 with model=..., the v2 stream, OpenAI chat
                assert "Paris" in answer_text(result.stdout), (command, result.stdout)
        assert sum(FRANCE in command and SMOLLM2.name in command for command in commands) == 3, commands
        check_the_chat_page(browser, f"http://127.0.0.1:{port}", artifacts_dir / "screenshots" / "chat-smollm2.png")
    finally:
        os.killpg(runner.pid, signal.SIGINT)  # what Ctrl-C does
        runner.wait(60)
    assert runner.returncode == 0
