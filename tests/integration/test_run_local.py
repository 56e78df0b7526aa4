"""``make run``'s runner brings up swarm + services (both models, SmolLM2 the default), answers the
curls shown in the README and, in the chat page as it opens, the real model's answer; and
however it is stopped (Ctrl-C with SIGINT ignored at its start, SIGTERM with its stdout's reader
gone, SIGKILL), no process it started is left behind.

"Every process it started" is read from /proc while the stack is up: the runner's descendants,
and every member of the sessions its children lead (each server and service has a session of
its own, so a process orphaned by a dead parent is still found). Whatever the outcome, each test
ends by SIGKILLing whatever of that set still runs, so a failing test leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from bench.load_test import run_load
from client.api import Api
from client.probes import wait_until
from deploy.local_stack import LOCAL_MODELS, REPO_ROOT, SMOLLM2, TINY_BLOOM, http_status, pick_free_port
from services.common.web.sse import parse_sse
from tests.helpers import collect_page_errors, wait_for

FRANCE = "What is the capital of France?"
CODE_QUESTION = "Write a Python function to reverse a string."  # greedy, SmolLM2 answers with a fenced block

STOP_TIMEOUT_S = 60  # a clean stop: SIGTERM, the services' and servers' grace periods, SIGKILL
DIE_WITH_RUNNER_S = 30  # a SIGKILLed runner: everything it started is gone within this


def readme_curl_commands() -> list[str]:
    readme = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"<!-- local-run-example -->\s*```bash\n(.*?)```", readme, re.DOTALL)
    assert block, "README.md must keep its local-run example block"
    return [line for line in block.group(1).splitlines() if line.startswith("curl ")]


def answer_is_ok(output: str) -> bool:
    """A JSON answer with ok=true, an event stream whose last event is a successful ``done``,
    an OpenAI-style completion, or the model list of ``make run``."""
    if output.startswith("event:"):
        event, data = list(parse_sse([output.encode()]))[-1]
        return event == "done" and data["ok"] is True
    answer = json.loads(output)
    if answer.get("object") == "list":  # GET /v1/models: both models, the default first
        return [model["id"] for model in answer["data"]] == list(LOCAL_MODELS)
    return answer.get("ok") is True or bool(answer.get("choices"))


def answer_text(output: str) -> str:
    """The generated text of an answer that ``answer_is_ok``."""
    if output.startswith("event:"):
        return list(parse_sse([output.encode()]))[-1][1]["outputs"]
    answer = json.loads(output)
    return answer["choices"][0]["message"]["content"] if "choices" in answer else answer["outputs"]


def check_the_load_test_picks_the_model(url: str) -> None:
    """``bench.load_test --model``: the sessions of each model land on that model's replica."""
    for model in (TINY_BLOOM, SMOLLM2):
        report = run_load(url, sessions=2, tokens=3, max_length=48, timeout_s=120, model=model.name)
        assert report.errors == [], report.summary()
        assert report.replicas() == {f"inference-{model.name}-0": 2}, report.summary()
        assert all(run.tokens == 3 and run.text for run in report.runs), report.summary()


def check_the_chat_page(browser, url: str, screenshot: Path) -> None:
    """The page opens with SmolLM2 and answers the France question (greedy) with Paris, then a second
    turn in the same session whose answer holds a fenced Python block, rendered as highlighted code;
    the screenshot is the README's."""
    context = browser.new_context(viewport={"width": 1000, "height": 800})
    context.add_init_script(
        "localStorage.setItem('petals-chat-settings', JSON.stringify({sampling: false, max_new_tokens: 96}))"
    )
    page = context.new_page()
    errors = collect_page_errors(page, [])
    try:
        page.goto(url + "/")
        wait_for(page, "!document.getElementById('model').disabled")
        assert page.input_value("#model") == SMOLLM2.name
        assert page.inner_text("#model-description") == SMOLLM2.description
        answers = []
        for question in (FRANCE, CODE_QUESTION):
            page.fill("#message", question)
            page.press("#message", "Enter")
            page.wait_for_selector("#stop:not([hidden])")
            wait_for(page, "!document.getElementById('send').disabled", timeout=120_000)
            answers = page.eval_on_selector_all(".turn.ai .text", "nodes => nodes.map(n => n.dataset.source)")
        assert page.is_hidden("#error"), page.inner_text("#error")
        assert len(answers) == 2 and "Paris" in answers[0], answers
        assert "```python" in answers[1] and "\ufffd" not in "".join(answers), answers
        code = page.locator(".turn.ai").nth(1).locator("pre code.hljs")
        assert code.first.get_attribute("data-language") == "python", answers[1]
        assert "def" in code.first.locator(".hljs-keyword").all_inner_texts(), answers[1]
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot), full_page=True)
    finally:
        context.close()
    assert errors == [], f"console errors: {errors}"


def free_port_block(size: int = 16) -> int:
    """A port whose next ``size`` ports are free too: the runner puts the ui at +9, replicas at +10..."""
    while True:
        port = pick_free_port()
        if port + size < 65536 and all(_port_is_free(port + offset) for offset in range(size)):
            return port


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class Proc:
    """One process as /proc shows it; ``start`` (boot ticks) tells it apart from a later one with its PID."""

    pid: int
    ppid: int
    pgid: int
    sid: int
    start: int
    state: str
    cmdline: str


def read_proc(pid: int) -> Proc | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm)"; comm may hold spaces
    return Proc(pid, int(fields[1]), int(fields[2]), int(fields[3]), int(fields[19]), fields[0], cmdline.strip())


def process_table() -> dict[int, Proc]:
    procs = (read_proc(int(entry.name)) for entry in Path("/proc").iterdir() if entry.name.isdigit())
    return {proc.pid: proc for proc in procs if proc is not None}


def started_by(runner_pid: int) -> dict[int, Proc]:
    """Every process ``runner_pid`` started: its descendants and the members of its children's sessions."""
    table = process_table()
    found, index = [runner_pid], 0
    while index < len(found):
        found += [proc.pid for proc in table.values() if proc.ppid == found[index] and proc.pid not in found]
        index += 1
    sessions = {table[pid].sid for pid in found[1:] if pid in table} - {table[runner_pid].sid}
    pids = set(found[1:]) | {proc.pid for proc in table.values() if proc.sid in sessions}
    return {pid: table[pid] for pid in pids if pid in table}


def still_running(recorded: dict[int, Proc]) -> list[Proc]:
    """The recorded processes that still run (a zombie has ended; a reused PID is someone else)."""
    alive = []
    for proc in recorded.values():
        now = read_proc(proc.pid)
        if now is not None and now.start == proc.start and now.state not in "ZX":
            alive.append(now)
    return alive


def kill_all(recorded: dict[int, Proc]) -> None:
    """SIGKILL every recorded process that still runs, and its group."""
    for proc in still_running(recorded):
        for kill, target in ((os.killpg, proc.pgid), (os.kill, proc.pid)):
            with suppress(ProcessLookupError, PermissionError):
                kill(target, signal.SIGKILL)


def describe(procs: list[Proc]) -> str:
    return "\n".join(f"  {proc.pid} (group {proc.pgid}, {proc.state}): {proc.cmdline[:120]}" for proc in procs)


@dataclass
class Runner:
    process: subprocess.Popen
    port: int
    output: str = ""
    recorded: dict[int, Proc] = field(default_factory=dict)

    def record(self) -> dict[int, Proc]:
        """Add what the runner has started by now to the processes the test must see gone."""
        self.recorded.update(started_by(self.process.pid))
        return self.recorded

    def assert_all_gone(self, timeout: float) -> None:
        assert wait_until(lambda: not still_running(self.recorded), timeout), (
            f"still running {timeout} s after the stop:\n{describe(still_running(self.recorded))}"
        )


@contextmanager
def local_runner(
    state_dir: Path,
    *,
    models: tuple[str, ...] = tuple(LOCAL_MODELS),
    preexec_fn: Callable[[], None] | None = None,
    replicas: int = 1,
) -> Iterator[Runner]:
    """``python -m deploy.run_local`` on free ports serving ``models`` (``replicas`` replicas each), up;
    on the way out, nothing it started survives."""
    port = free_port_block()
    env = {
        **os.environ,
        "PUBLIC_PORT": str(port),
        "LOCAL_STATE_DIR": str(state_dir),
        "LOCAL_MODELS": " ".join(models),
        "INFERENCE_REPLICAS_LOCAL": str(replicas),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "deploy.run_local"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=preexec_fn,  # a signal disposition, set in the child before exec
    )
    runner = Runner(process, port)
    try:
        deadline = time.monotonic() + 240
        while "Press Ctrl-C to stop." not in runner.output:
            line = process.stdout.readline()
            assert line or process.poll() is None, f"runner exited early:\n{runner.output}"
            runner.output += line
            assert time.monotonic() < deadline, f"runner not up in time:\n{runner.output}"
        assert f"http://127.0.0.1:{port}/api/v1/" in runner.output
        recorded = runner.record()
        commands = [proc.cmdline for proc in recorded.values()]
        servers = sum(len(LOCAL_MODELS[name].block_ranges) for name in models)
        replicas = len(models) * replicas
        # What the runner starts: the Petals servers with their forks and p2pd, replicas + ui + gateway
        # under gunicorn (master and workers; each inference worker with its own p2pd), the watchdog.
        assert sum("services.swarm.serve" in command for command in commands) > servers, describe(recorded.values())
        assert sum("gunicorn" in command for command in commands) > replicas + 2, describe(recorded.values())
        assert sum("p2pd" in command for command in commands) >= servers + replicas, describe(recorded.values())
        assert any("services.common.processes.lifeline" in command for command in commands), describe(recorded.values())
        yield runner
    finally:
        if process.poll() is None:
            runner.record()
            process.kill()
        process.wait(10)
        leftovers = still_running(runner.recorded)
        kill_all(runner.recorded)
        if process.stdout is not None:
            process.stdout.close()
    assert not leftovers, f"left running after the test:\n{describe(leftovers)}"


def test_local_runner_answers_the_readme_curl(artifacts_dir: Path, browser):
    with local_runner(artifacts_dir / "run-local") as runner:
        commands = readme_curl_commands()
        assert commands, "the README example has no curl command"
        for command in commands:
            command = command.replace("127.0.0.1:5000", f"127.0.0.1:{runner.port}")
            result = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=60, check=True)
            assert answer_is_ok(result.stdout), result.stdout
            if FRANCE in command:  # SmolLM2, greedy: v1 with model=..., the v2 stream, OpenAI chat
                assert "Paris" in answer_text(result.stdout), (command, result.stdout)
        assert sum(FRANCE in command and SMOLLM2.name in command for command in commands) == 3, commands
        url = f"http://127.0.0.1:{runner.port}"
        check_the_load_test_picks_the_model(url)
        check_the_chat_page(browser, url, artifacts_dir / "screenshots" / "chat-smollm2.png")
        runner.record()
        os.killpg(runner.process.pid, signal.SIGINT)  # what Ctrl-C does
        assert runner.process.wait(STOP_TIMEOUT_S) == 0, runner.output
        runner.assert_all_gone(10)


def test_ctrl_c_stops_a_runner_started_with_sigint_ignored(artifacts_dir: Path):
    """`make run &` from a script: the runner inherits SIGINT ignored; a Ctrl-C must still stop it all."""
    with local_runner(
        artifacts_dir / "run-local-sigint",
        models=(TINY_BLOOM.name,),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    ) as runner:
        runner.record()
        os.killpg(runner.process.pid, signal.SIGINT)
        assert runner.process.wait(STOP_TIMEOUT_S) == 0, runner.output
        runner.assert_all_gone(10)


def test_sigterm_stops_everything_when_nobody_reads_the_output(artifacts_dir: Path):
    """The reader of the runner's stdout is gone: "Stopping..." cannot be written, the clean-up still runs."""
    with local_runner(artifacts_dir / "run-local-pipe", models=(TINY_BLOOM.name,)) as runner:
        runner.record()
        runner.process.stdout.close()  # the only reader of the pipe
        runner.process.terminate()
        assert runner.process.wait(STOP_TIMEOUT_S) == 0
        runner.assert_all_gone(10)


def test_a_sigkilled_runner_takes_everything_it_started_with_it(artifacts_dir: Path):
    """A supervisor's timeout: the runner gets SIGKILL and has no chance to stop anything itself."""
    with local_runner(artifacts_dir / "run-local-sigkill", models=(TINY_BLOOM.name,)) as runner:
        runner.record()
        runner.process.kill()
        runner.process.wait(10)
        runner.assert_all_gone(DIE_WITH_RUNNER_S)


def test_a_replica_stopped_with_sigterm_hands_its_session_over_and_starts_again(artifacts_dir: Path):
    """INFERENCE_REPLICAS_LOCAL=2: SIGTERM to the process of the replica holding a session (its gunicorn
    master, as Kubernetes signals a pod) leaves the stack up, the session goes on on the other replica
    with the same text, and the runner starts the stopped replica again, as a StatefulSet would."""
    with local_runner(artifacts_dir / "run-local-handover", models=(TINY_BLOOM.name,), replicas=2) as runner:
        api = Api(f"http://127.0.0.1:{runner.port}")
        session_id = api.open_session(64)
        first = api.call("POST", "generate", {"session_id": session_id, "inputs": "A cat sat on", "max_new_tokens": 4})
        holder = session_id.rpartition(".")[0]
        masters = {p.pid: p for p in runner.record().values() if p.ppid == runner.process.pid}
        (master,) = [pid for pid in masters if f"REPLICA_ID={holder}".encode() in read_environ(pid)]
        os.kill(master, signal.SIGTERM)
        assert wait_until(lambda: read_proc(master) is None or read_proc(master).state in "ZX", 60)
        second = api.call("POST", "generate", {"session_id": session_id, "max_new_tokens": 4})
        whole = api.call("POST", "generate", {"inputs": "A cat sat on", "max_new_tokens": 8})
        assert first["outputs"] + second["outputs"] == whole["outputs"]
        port = runner.port + 10 + int(holder.rpartition("-")[2])
        assert wait_until(lambda: http_status(f"http://127.0.0.1:{port}/readyz") == 200, 120), runner.output
        third = api.call("POST", "generate", {"session_id": session_id, "max_new_tokens": 1})
        assert third["ok"]
        runner.record()
        runner.process.terminate()
        assert runner.process.wait(STOP_TIMEOUT_S) == 0
        runner.assert_all_gone(10)


def read_environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().replace(b"\0", b"\n")
    except OSError:
        return b""
