"""``make run``: the whole stack on this machine, on the embedded models.

Builds (or finds cached) SmolLM2-135M-Instruct and the tiny BLOOM, starts one private Petals
swarm on loopback serving both (each model's servers under its own DHT prefix, in one DHT), the
inference replicas of each model, the ui and the gateway (SmolLM2 its default model), prints the
URLs, and runs in the foreground until Ctrl-C (or SIGTERM), then stops everything it started.
Settings (environment): PUBLIC_PORT (5000; the ui service listens on PUBLIC_PORT+9 and the
inference replicas on PUBLIC_PORT+10, +11, ...), LOCAL_MODELS ("smollm2-135m-instruct
tiny-bloom": the models to serve, the first the default), INFERENCE_REPLICAS_LOCAL (1: replicas
per model), LOCAL_SWARM_BLOCKS_SMOLLM2 ("0:15 15:30") and LOCAL_SWARM_BLOCKS_TINY_BLOOM ("0:2
2:4"): one block range per Petals server of the model, LOCAL_STATE_DIR (.cache/local: logs,
identities).

Stopping never depends on the terminal: SIGINT and SIGTERM both stop cleanly even when the
runner started with SIGINT ignored (`make run &` from a script) or its stdout is a pipe nobody
reads any more; and if the runner is SIGKILLed, what it started is SIGKILLed with it
(services/common/processes/lifeline.py).

An inference replica stopped on its own (SIGTERM to its process: it hands its sessions to the other
replicas of its model first) is started again within a second, as a StatefulSet would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import TextIO

from deploy.local_stack import (
    DEFAULT_LOCAL_MODELS,
    DEFAULT_STATE_DIR,
    LOCAL_MODELS,
    LocalModel,
    LocalStack,
    StartupError,
)
from services.common.startup.config import ConfigError, Env, load_or_exit


def _models(env: Env) -> tuple[LocalModel, ...]:
    """LOCAL_MODELS, each with its LOCAL_SWARM_BLOCKS_<MODEL> block ranges."""
    if env.str("LOCAL_SWARM_BLOCKS", ""):
        raise ConfigError("LOCAL_SWARM_BLOCKS is replaced by one setting per model: " +
                          ", ".join(model.setting for model in LOCAL_MODELS.values()))  # fmt: skip
    names = env.list("LOCAL_MODELS", tuple(model.name for model in DEFAULT_LOCAL_MODELS))
    unknown = [name for name in names if name not in LOCAL_MODELS]
    if unknown or not names or len(set(names)) != len(names):
        raise ConfigError(
            f"LOCAL_MODELS must list distinct models of {', '.join(LOCAL_MODELS)}, got {' '.join(names)!r}"
        )
    models = []
    for name in names:
        model = LOCAL_MODELS[name]
        blocks = env.list(model.setting, model.block_ranges)
        if not blocks or not all(re.fullmatch(r"\d+:\d+", item) for item in blocks):
            raise ConfigError(f"{model.setting} must be block ranges like 0:2 2:4, got {' '.join(blocks)!r}")
        models.append(dataclasses.replace(model, block_ranges=blocks))
    return tuple(models)


def _settings() -> tuple[int, int, tuple[LocalModel, ...], Path]:
    env = Env()
    port = env.int("PUBLIC_PORT", 5000, minimum=1, maximum=65000)
    replicas = env.int("INFERENCE_REPLICAS_LOCAL", 1, minimum=1, maximum=8)
    models = _models(env)
    state_dir = Path(env.str("LOCAL_STATE_DIR", str(DEFAULT_STATE_DIR)))
    return port, replicas, models, state_dir


def _try_lines(url: str, models: tuple[LocalModel, ...]) -> str:
    """The "Try:" lines: a chat answer from the default model, a completion from each model."""
    question = '{"role": "user", "content": "What is the capital of France?"}'
    lines = [f"curl -s '{url}/v1/chat/completions' -H 'Content-Type: application/json' "
             f"""-d '{{"model": "{models[0].name}", "messages": [{question}], "temperature": 0}}'"""]  # fmt: skip
    lines += [f"curl -s -X POST '{url}/api/v1/generate' -d 'model={model.name}' -d 'inputs=A cat sat on' "
              "-d 'max_new_tokens=8'" for model in models]  # fmt: skip
    return "".join(f"  {line}\n" for line in lines)


RESTART_CHECK_S = 1.0  # how often the runner looks for a stopped inference replica


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
    port, replicas, models, state_dir = load_or_exit(_settings, "run_local")
    # Explicit handlers: a background job of a non-interactive shell (`make run &` in a script)
    # starts with SIGINT ignored, and Python then leaves it ignored.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _request_stop)
    stack: LocalStack | None = None
    servers = sum(len(model.block_ranges) for model in models)
    served = ", ".join(model.name for model in models)
    try:
        _say(f"Starting a private Petals swarm ({servers} servers: {served}) and the services; logs in {state_dir}")
        stack = LocalStack(public_port=port, models=models, inference_replicas=replicas, state_dir=state_dir)
        stack.start()
        url = stack.public_url
        _say(
            f"\nPetals Chat is up.\n  Chat:    {url}/\n"
            f"  API:     {url}/api/v1/  (OpenAPI: {url}/api/openapi.json)\n"
            f"  Metrics: {url}/metrics (gateway), "
            f"{', '.join(s.base_url + '/metrics' for s in stack.services if s.name.startswith('inference'))}\n"
            f"  Swarm:   {' '.join(stack.swarm.initial_peers)}\n"
            f"  Models:  {served} (the default: {models[0].name})\n"
            f"Try:\n{_try_lines(url, models)}"
            "Press Ctrl-C to stop."
        )
        while True:  # a replica stopped (SIGTERM hands its sessions over) starts again, as in a StatefulSet
            time.sleep(RESTART_CHECK_S)
            for name in stack.restart_stopped():
                _say(f"{name} stopped; starting it again")
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
