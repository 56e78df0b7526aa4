"""``make run``'s runner brings up swarm + services and answers the curl shown in the README."""

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

from deploy.local_stack import REPO_ROOT, pick_free_port


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


def test_local_runner_answers_the_readme_curl(artifacts_dir: Path):
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
    finally:
        os.killpg(runner.pid, signal.SIGINT)  # what Ctrl-C does
        runner.wait(60)
    assert runner.returncode == 0
