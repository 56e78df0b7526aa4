"""``make run``: the whole stack on this machine, on the embedded default model.

Builds the offline tiny BLOOM (cached), starts a private Petals swarm on loopback, the
inference replicas and the gateway, prints the URLs, and runs in the foreground until Ctrl-C
(or SIGTERM), then stops everything it started. Settings (environment): PUBLIC_PORT (5000;
the ui service listens on PUBLIC_PORT+9 and
inference replicas on PUBLIC_PORT+10, +11, ...), INFERENCE_REPLICAS_LOCAL (2),
LOCAL_SWARM_BLOCKS ("0:2 2:4": one block range per Petals server), LOCAL_STATE_DIR
(.cache/local: logs, identities).

Stopping never depends on the terminal: SIGINT and SIGTERM both stop cleanly even when the
runner started with SIGINT ignored (`make run &` from a script) or its stdout is a pipe nobody
reads any more; and if the runner is SIGKILLed, what it started is SIGKILLed with it
(services/common/lifeline.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import TextIO

from deploy.local_stack import DEFAULT_STATE_DIR, LocalStack, StartupError
from services.common.config import Env, load_or_exit


def _settings() -> tuple[int, int, tuple[str, ...], Path]:
    env = Env()
    port = env.int("PUBLIC_PORT", 5000, minimum=1, maximum=65000)
    replicas = env.int("INFERENCE_REPLICAS_LOCAL", 2, minimum=1, maximum=8)
    blocks = env.list("LOCAL_SWARM_BLOCKS", ("0:2", "2:4"))
    state_dir = Path(env.str("LOCAL_STATE_DIR", str(DEFAULT_STATE_DIR)))
    return port, replicas, blocks, state_dir


class _Stop(BaseException):
    """Ctrl-C or SIGTERM: stop everything, as a BaseException so that no ``except Exception`` eats it."""


def _request_stop(signum: int, frame: object) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):  # a second one must not cut the clean-up short
        signal.signal(sig, signal.SIG_IGN)
    raise _Stop


def _say(text: str, file: TextIO | None = None) -> None:
    """Print, but never fail: with the reader of a piped stdout gone, later output goes nowhere."""
    stream = file or sys.stdout
    try:
        print(text, file=stream, flush=True)
    except (OSError, ValueError):  # BrokenPipeError, or a closed stream
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())  # so the flush at exit does not fail either
            os.close(devnull)


def main() -> int:
    port, replicas, blocks, state_dir = load_or_exit(_settings, "run_local")
    # Explicit handlers: a background job of a non-interactive shell (`make run &` in a script)
    # starts with SIGINT ignored, and Python then leaves it ignored.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _request_stop)
    stack: LocalStack | None = None
    try:
        _say(f"Starting a private Petals swarm ({len(blocks)} servers) and the services; logs in {state_dir}")
        stack = LocalStack(public_port=port, block_ranges=blocks, inference_replicas=replicas, state_dir=state_dir)
        stack.start()
        url = stack.public_url
        _say(
            f"\nPetals Chat is up.\n  Chat:    {url}/\n"
            f"  API:     {url}/api/v1/  (OpenAPI: {url}/api/openapi.json)\n"
            f"  Metrics: {url}/metrics (gateway), "
            f"{', '.join(s.base_url + '/metrics' for s in stack.services if s.name.startswith('inference'))}\n"
            f"  Swarm:   {' '.join(stack.swarm.initial_peers)}\n"
            f"Try:\n  curl -s -X POST '{url}/api/v1/generate' -d 'inputs=A cat sat on' -d 'max_new_tokens=8'\n"
            "Press Ctrl-C to stop."
        )
        while True:
            signal.pause()
    except StartupError as error:
        _say(f"run_local: start-up failed: {error}", sys.stderr)
        return 1
    except _Stop:
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        if stack is not None:
            try:
                _say("Stopping...")
            finally:
                stack.stop()


if __name__ == "__main__":
    sys.exit(main())
